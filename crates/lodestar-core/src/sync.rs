//! Locks that outlive a panic.
//!
//! A `std::sync::Mutex` is *poisoned* when a thread panics while holding
//! it. lodestar's locks guard plain data that every critical section leaves
//! consistent, so a panic elsewhere is no reason to stop serving: the lock
//! is taken anyway, with [`MutexExt::lock_unpoisoned`].

use std::sync::{Mutex, MutexGuard};

/// Locking a [`Mutex`] without caring whether it was poisoned.
pub trait MutexExt<T: ?Sized> {
    /// Locks the mutex, blocking the thread until it is free, and takes the
    /// guard even if a thread panicked while holding it.
    ///
    /// ```
    /// use std::sync::Mutex;
    /// use lodestar_core::sync::MutexExt;
    ///
    /// let counter = Mutex::new(0);
    /// *counter.lock_unpoisoned() += 1;
    /// assert_eq!(*counter.lock_unpoisoned(), 1);
    /// ```
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_poisoned_mutex_is_still_locked_and_keeps_its_value() {
        let shared = std::sync::Arc::new(Mutex::new(vec![1]));
        let holder = shared.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = holder.lock().unwrap();
            guard.push(2);
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.is_poisoned());
        let mut guard = shared.lock_unpoisoned();
        assert_eq!(*guard, [1, 2]);
        guard.push(3);
        drop(guard);
        assert_eq!(*shared.lock_unpoisoned(), [1, 2, 3]);
    }
}
