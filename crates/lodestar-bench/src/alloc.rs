//! The heap bytes a piece of code keeps: the system allocator, counting
//! while [`kept_by`] runs (one load of a flag per allocation otherwise),
//! for the `pick` scenario's memory per endpoint; and the allocations a
//! process makes while [`count_allocations`] is on (the client's
//! allocations per call).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};

/// The system allocator, counting bytes allocated and freed while
/// [`kept_by`] runs.
#[derive(Debug)]
pub(crate) struct Counting;

/// Whether [`kept_by`] is running.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed while counting.
static NET: AtomicIsize = AtomicIsize::new(0);
/// Whether allocations are counted (see [`count_allocations`]).
static COUNTING_ALLOCS: AtomicBool = AtomicBool::new(false);
/// Allocations (and reallocations) made while counting them.
static ALLOCS: AtomicU64 = AtomicU64::new(0);

fn count_one() {
    if COUNTING_ALLOCS.load(Ordering::Relaxed) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts every allocation from now (`on`) or stops; returns the count so
/// far.
pub(crate) fn count_allocations(on: bool) -> u64 {
    COUNTING_ALLOCS.store(on, Ordering::SeqCst);
    ALLOCS.load(Ordering::Relaxed)
}

fn count(bytes: usize, sign: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        NET.fetch_add(
            sign * isize::try_from(bytes).unwrap_or(isize::MAX),
            Ordering::Relaxed,
        );
    }
}

// SAFETY: every call goes to `System` with the caller's arguments,
// unchanged; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size(), 1);
            count_one();
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size(), 1);
            count_one();
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) };
        count(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size, 1);
            count(layout.size(), -1);
            count_one();
        }
        new
    }
}

/// Runs `f` and returns what it returned, with the heap bytes allocated
/// and not freed while it ran (by any thread: run it while the others
/// are idle). Not reentrant.
pub(crate) fn kept_by<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let before = NET.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, NET.load(Ordering::Relaxed) - before)
}
