//! The queue between the data path and the log's writer.

use std::sync::{Condvar, Mutex};

use super::*;

/// The gate a test opens to let the writer go on.
type Gate = Arc<(Mutex<bool>, Condvar)>;
/// What the writer wrote, in order.
type Seen = Arc<Mutex<Vec<u32>>>;

/// A writer whose thread blocks in `emit` until the test opens the gate.
fn gated(capacity: usize) -> (Writer<u32>, Arc<Counters>, Gate, Seen) {
    let counters = Arc::new(Counters::default());
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (g, s) = (gate.clone(), seen.clone());
    let emit = move |item: &u32| {
        let (open, cv) = &*g;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        s.lock().unwrap().push(*item);
    };
    let writer = Writer::spawn_with(counters.clone(), capacity, emit).unwrap();
    (writer, counters, gate, seen)
}

#[test]
fn a_log_that_does_not_keep_up_costs_the_data_path_nothing_and_drops_are_counted() {
    let (writer, counters, gate, seen) = gated(8);
    // The writer thread takes the first and blocks on it; eight more fill the queue.
    let started = Instant::now();
    for i in 0..1000 {
        writer.write(i);
    }
    let spent = started.elapsed();
    assert!(
        spent < Duration::from_secs(1),
        "1,000 writes against a stuck log took {spent:?}"
    );
    let dropped = counters.dropped.load(Ordering::Relaxed);
    assert!((990..=992).contains(&dropped), "dropped {dropped}");

    // Unblocked, it writes what it held, in order, and nothing else.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let kept = 1000 - dropped;
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters.written.load(Ordering::Relaxed) < kept {
        assert!(Instant::now() < deadline, "the writer did not drain its queue");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, kept);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    assert_eq!(seen[0], 0);
}

#[test]
fn a_log_that_keeps_up_loses_nothing() {
    let (writer, counters, gate, seen) = gated(8);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    for i in 0..200 {
        writer.write(i);
        // Paced below what the writer takes: the queue never fills.
        if i % 4 == 0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while counters.written.load(Ordering::Relaxed) < u64::from(i) + 1 {
                assert!(Instant::now() < deadline, "the writer stopped");
                std::thread::yield_now();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters.written.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the writer did not drain its queue");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
}
