//! The retry budget: how many retries (and hedges) the calls to one service
//! may add, so that a sick service is not buried under retries.
//!
//! Each call counts once, when it starts; each retry or hedge asks the
//! budget first. Over a sliding window
//! ([`BudgetSettings::window_ms`], in ten slots), the retries granted may
//! be at most [`BudgetSettings::percent`] of the calls made plus
//! [`BudgetSettings::min_per_second`] for each second of the window that
//! has passed (so that a service called rarely can still retry). A call
//! denied a retry returns the error of its last attempt.
//!
//! Two mistakes of other budgets are avoided by construction: calls are
//! counted once, when they start, never per attempt (so a failing service,
//! whose calls turn into retries, does not earn more retries, as Envoy's
//! budget, counted on active requests, did); and a retry is counted when it
//! is granted, before its backoff (so retries waiting to go out are counted
//! too, which Envoy's missed).
//!
//! The budget is shared by every clone of a client (it belongs to the
//! service's channel) and is a set of atomic counters: no lock is taken.
//!
//! ```
//! use lodestar::client::budget::BudgetSettings;
//!
//! let settings = BudgetSettings::default();
//! assert_eq!((settings.percent, settings.min_per_second, settings.window_ms), (20, 10, 10_000));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::policy::{MAX_DURATION_MS, PolicyError};
use super::selector::nanos_since_epoch;
use crate::policy_data::in_range;

/// How many retries and hedges the calls to one service may add (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetSettings {
    /// Whether retries and hedges are held to the budget. Default: yes.
    pub enabled: bool,
    /// Retries may add at most this percentage of the calls made in the
    /// window (at most [`MAX_BUDGET_PERCENT`]). Default: 20.
    pub percent: u32,
    /// ... plus this many retries for each second of the window (at most
    /// [`MAX_BUDGET_PER_SECOND`]). Default: 10.
    pub min_per_second: u32,
    /// The window, in milliseconds, from [`MIN_BUDGET_WINDOW_MS`] to
    /// [`MAX_DURATION_MS`]. Default: 10,000.
    pub window_ms: u64,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            percent: 20,
            min_per_second: 10,
            window_ms: 10_000,
        }
    }
}

/// The largest [`BudgetSettings::percent`]: 1,000 (ten retries per call;
/// no retry policy allows more than four).
pub const MAX_BUDGET_PERCENT: u32 = 1_000;

/// The largest [`BudgetSettings::min_per_second`]: 100,000.
pub const MAX_BUDGET_PER_SECOND: u32 = 100_000;

/// The shortest [`BudgetSettings::window_ms`]: 100 ms (ten slots of 10 ms).
pub const MIN_BUDGET_WINDOW_MS: u64 = 100;

/// Checks `settings`, naming fields under `at` (`retry_budget`).
pub(crate) fn validate(at: &str, settings: &BudgetSettings) -> Result<(), PolicyError> {
    in_range(
        &format!("{at}.percent"),
        settings.percent.into(),
        0,
        MAX_BUDGET_PERCENT.into(),
    )?;
    in_range(
        &format!("{at}.min_per_second"),
        settings.min_per_second.into(),
        0,
        MAX_BUDGET_PER_SECOND.into(),
    )?;
    in_range(
        &format!("{at}.window_ms"),
        settings.window_ms,
        MIN_BUDGET_WINDOW_MS,
        MAX_DURATION_MS,
    )
}

/// How many slots the window is counted in.
const SLOTS: usize = 10;

/// The counters of one slot of the window.
#[derive(Debug, Default)]
struct Slot {
    /// Which slot of time (since the process's epoch) these counts are
    /// for, plus one (0: never used).
    era: AtomicU64,
    calls: AtomicU64,
    retries: AtomicU64,
}

/// A retry budget in use (see the [module docs](self)): counters per slot
/// of the window, read and written with atomics only.
///
/// A slot is reused when its time comes round again: the first call of the
/// new slot clears it. Two calls racing at that moment may lose a count or
/// two, never more: the budget is exact to within the calls of a few
/// microseconds.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    settings: BudgetSettings,
    /// The length of a slot, in nanoseconds.
    slot_nanos: u64,
    /// The slot the budget was made in: the floor counts only the seconds
    /// since.
    first: u64,
    slots: [Slot; SLOTS],
}

impl RetryBudget {
    /// A budget of `settings` (valid ones), starting now.
    pub(crate) fn new(settings: BudgetSettings) -> Self {
        let window = Duration::from_millis(settings.window_ms);
        let slot_nanos = u64::try_from(window.as_nanos() / SLOTS as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        let first = nanos_since_epoch(Instant::now()) / slot_nanos;
        Self {
            settings,
            slot_nanos,
            first,
            slots: Default::default(),
        }
    }

    /// The settings it keeps.
    pub(crate) fn settings(&self) -> &BudgetSettings {
        &self.settings
    }

    /// The current slot's number, and its counters (cleared if they were
    /// for an older slot).
    fn slot(&self) -> (u64, &Slot) {
        let now = nanos_since_epoch(Instant::now()) / self.slot_nanos;
        let slot = &self.slots[(now % SLOTS as u64) as usize];
        let era = slot.era.load(Ordering::Acquire);
        if era != now + 1
            && slot
                .era
                .compare_exchange(era, now + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.calls.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        (now, slot)
    }

    /// Counts a call.
    pub(crate) fn call(&self) {
        self.slot().1.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks for one retry (or hedge): granted, and counted, if the window
    /// has room for it.
    pub(crate) fn try_spend(&self) -> bool {
        let (now, current) = self.slot();
        let (mut calls, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            // Only the slots of this window: `now - SLOTS + 1 ..= now`.
            let era = slot.era.load(Ordering::Acquire);
            if era != 0 && era + SLOTS as u64 > now + 1 {
                calls += slot.calls.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        // The floor, for the part of the window since the budget began
        // (the current slot counting whole).
        let slots_passed = (now.saturating_sub(self.first) + 1).min(SLOTS as u64);
        let floor_nanos = u128::from(slots_passed) * u128::from(self.slot_nanos);
        let floor = u128::from(self.settings.min_per_second) * floor_nanos / 1_000_000_000;
        // In hundredths of a retry, so that 20% of 3 calls is 0.6 of one.
        let allowed = u128::from(calls) * u128::from(self.settings.percent) + floor * 100;
        if u128::from(retries + 1) * 100 > allowed {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Gives back a retry granted but not made (no instance could take it).
    pub(crate) fn refund(&self) {
        let _ = self
            .slot()
            .1
            .retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(percent: u32, min_per_second: u32, window_ms: u64) -> RetryBudget {
        RetryBudget::new(BudgetSettings {
            enabled: true,
            percent,
            min_per_second,
            window_ms,
        })
    }

    fn spend_all(budget: &RetryBudget) -> u32 {
        let mut granted = 0;
        while budget.try_spend() {
            granted += 1;
            assert!(granted < 1_000_000, "the budget never ran out");
        }
        granted
    }

    #[tokio::test(start_paused = true)]
    async fn retries_add_the_percentage_of_calls_plus_the_floor_per_second_passed() {
        // Start at a slot's beginning, so that time passed is exact.
        let slot = made(20, 10, 10_000).slot_nanos;
        tokio::time::advance(Duration::from_nanos(
            slot - nanos_since_epoch(Instant::now()) % slot,
        ))
        .await;
        let budget = &made(20, 10, 10_000);
        // In the first second: 10 free retries, and 20 for 100 calls.
        for _ in 0..100 {
            budget.call();
        }
        assert_eq!(spend_all(budget), 30);
        // A second later: 10 more free ones, and 20% of the 100 new calls.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..100 {
            budget.call();
        }
        assert_eq!(spend_all(budget), 30);
        // Once the whole window has passed, the floor stops growing (100
        // for a 10 s window) and old slots leave the window: 10 s after
        // the first calls, only the second second's calls are in it.
        tokio::time::advance(Duration::from_secs(9)).await;
        // Window: the second second onward, holding 100 calls and 30 retries;
        // allowed 20 + 100 = 120.
        assert_eq!(spend_all(budget), 90);
        // Fractions: 20% of 3 calls is not a whole retry, of 5 it is.
        let small = made(20, 0, 10_000);
        for _ in 0..3 {
            small.call();
        }
        assert!(!small.try_spend());
        small.call();
        small.call();
        assert!(small.try_spend());
        assert!(!small.try_spend());
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_of_steady_failures_is_held_to_its_share() {
        // 500 calls a second, every one wanting two retries, for 30 s.
        let budget = made(20, 10, 10_000);
        let (mut calls, mut retries) = (0u64, 0u64);
        for _ in 0..30 * 50 {
            for _ in 0..10 {
                budget.call();
                calls += 1;
                for _ in 0..2 {
                    retries += u64::from(budget.try_spend());
                }
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        // 20% of the calls, plus 10/s, and no more.
        let bound = calls / 5 + 30 * 10;
        assert!(retries <= bound, "{retries} retries, bound {bound}");
        assert!(
            retries >= bound * 95 / 100,
            "{retries} retries, bound {bound}"
        );
    }

    #[test]
    fn settings_are_checked_naming_the_field() {
        let check = |change: fn(&mut BudgetSettings)| {
            let mut settings = BudgetSettings::default();
            change(&mut settings);
            validate("retry_budget", &settings).map_err(|e| e.to_string())
        };
        assert_eq!(check(|_| {}), Ok(()));
        assert_eq!(
            check(|s| s.window_ms = 0),
            Err("policy field `retry_budget.window_ms` is 0: expected 100 to 3600000".into())
        );
        assert_eq!(
            check(|s| s.percent = 1_001),
            Err("policy field `retry_budget.percent` is 1001: expected at most 1000".into())
        );
    }
}
