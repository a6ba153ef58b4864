//! [`Bounded`]: series by label value, found without a lock, at most so
//! many of them: what keeps a label's cardinality bounded when its values
//! come from calls (a client's methods, a broker's topics).

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use lodestar_core::sync::MutexExt;

/// The label value of everything past the bound (and of values refused),
/// as the OpenTelemetry conventions name it: one series for all of them.
pub(crate) const OTHER: &str = "_OTHER";

/// Values by key: a lookup is a lock-free load and a binary search; a new
/// key is added under a lock, until `max` keys are known; past that, and
/// for keys refused, the value of [`OTHER`].
#[derive(Debug)]
pub(crate) struct Bounded<V> {
    max: usize,
    /// Sorted by key; replaced whole when a key is added.
    known: ArcSwap<Vec<(Box<str>, V)>>,
    adding: Mutex<()>,
}

impl<V: Clone> Bounded<V> {
    /// At most `max` keys, besides [`OTHER`].
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            known: ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
        }
    }

    /// The value of `key`, made by `make` (given the label value: `key`,
    /// or [`OTHER`]) the first time, if `admit` takes the key and there is
    /// room.
    #[inline]
    pub(crate) fn find(
        &self,
        key: &str,
        admit: impl FnOnce(&str) -> bool,
        make: impl FnOnce(&str) -> V,
    ) -> V {
        match Self::get(&self.known.load(), key) {
            Some(value) => value,
            None => self.add(key, admit, make),
        }
    }

    fn get(known: &[(Box<str>, V)], key: &str) -> Option<V> {
        let index = known.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        known.get(index).map(|(_, value)| value.clone())
    }

    #[cold]
    fn add(&self, key: &str, admit: impl FnOnce(&str) -> bool, make: impl FnOnce(&str) -> V) -> V {
        let _adding = self.adding.lock_unpoisoned();
        let known = self.known.load_full();
        if let Some(value) = Self::get(&known, key) {
            return value;
        }
        let others = usize::from(Self::get(&known, OTHER).is_some());
        let key = if known.len() - others < self.max && admit(key) {
            key
        } else {
            OTHER
        };
        if let Some(value) = Self::get(&known, key) {
            return value;
        }
        let value = make(key);
        let mut grown = Vec::with_capacity(known.len() + 1);
        grown.extend(known.iter().cloned());
        grown.push((key.into(), value.clone()));
        grown.sort_by(|a, b| a.0.cmp(&b.0));
        self.known.store(Arc::new(grown));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_past_the_bound_or_refused_share_the_other_value() {
        let map = Bounded::new(2);
        let made = std::cell::Cell::new(0);
        let find = |key: &str| {
            map.find(
                key,
                |k| !k.contains(' '),
                |label| {
                    made.set(made.get() + 1);
                    label.to_owned()
                },
            )
        };
        assert_eq!(find("a"), "a");
        assert_eq!(find("not admitted"), OTHER);
        assert_eq!(find("b"), "b");
        assert_eq!(find("c"), OTHER);
        assert_eq!(find("a"), "a");
        assert_eq!(made.get(), 3, "a, b and _OTHER, each made once");
    }
}
