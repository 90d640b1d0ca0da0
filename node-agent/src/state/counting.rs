//! A counting global allocator for this crate's unit tests: how many allocations, and how many
//! bytes, the code under test made on its own thread (tests run in parallel, each on its thread).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static LIVE_ALLOCATIONS: Cell<i64> = const { Cell::new(0) };
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
}

fn count(allocations: i64, bytes: i64) {
    // `try_with`: a thread being torn down still frees memory after its counters are gone.
    let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + allocations.max(0) as u64));
    let _ = LIVE_ALLOCATIONS.try_with(|a| a.set(a.get() + allocations));
    let _ = LIVE_BYTES.try_with(|b| b.set(b.get() + bytes));
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only
// const-initialized thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(1, new_size as i64 - layout.size() as i64);
        let _ = LIVE_ALLOCATIONS.try_with(|a| a.set(a.get() - 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-1, -(layout.size() as i64));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// What this thread allocated so far (every allocation and reallocation).
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// What this thread holds now: (allocations, bytes) it made and did not free (as far as this
/// thread freed them: memory freed by another thread is counted there).
pub(crate) fn live() -> (i64, i64) {
    (LIVE_ALLOCATIONS.with(Cell::get), LIVE_BYTES.with(Cell::get))
}
