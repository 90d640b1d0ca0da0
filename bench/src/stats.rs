//! Latency summaries: exact nearest-rank percentiles over every recorded sample.

use serde::Serialize;

/// Latency in microseconds, rounded to 0.1 µs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarises samples in nanoseconds (sorts them in place); all zero when there are none.
pub fn summarize(samples_ns: &mut [u32]) -> Latency {
    if samples_ns.is_empty() {
        return Latency::default();
    }
    samples_ns.sort_unstable();
    let sum: u64 = samples_ns.iter().map(|&s| u64::from(s)).sum();
    let mean_ns = sum as f64 / samples_ns.len() as f64;
    Latency {
        p50: micros(percentile(samples_ns, 50)),
        p90: micros(percentile(samples_ns, 90)),
        p99: micros(percentile(samples_ns, 99)),
        max: micros(samples_ns[samples_ns.len() - 1]),
        mean: round1(mean_ns / 1000.0),
    }
}

/// The nearest-rank `pct`th percentile of sorted, non-empty samples: the smallest sample with at least
/// `pct`% of the samples at or below it.
pub fn percentile(sorted: &[u32], pct: usize) -> u32 {
    let rank = (pct * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(ns: u32) -> f64 {
    round1(f64::from(ns) / 1000.0)
}

/// Rounds to one decimal.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).rev().map(|i| i * 1000).collect();
        let l = summarize(&mut samples);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(l.mean, 50.5);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 50), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 99), 4);
        assert_eq!(summarize(&mut []), Latency::default());
        let mut one = [1234u32];
        assert_eq!(summarize(&mut one).p99, 1.2);
    }
}
