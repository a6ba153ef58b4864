//! Waiting longer after each failure.

use std::time::Duration;

/// Exponential backoff: the first wait is `first`, each next one twice the
/// last, never more than `max`; [`reset`](Self::reset) starts over after
/// a success.
///
/// ```
/// use std::time::Duration;
/// use lodestar_core::backoff::Backoff;
///
/// let ms = Duration::from_millis;
/// let mut backoff = Backoff::new(ms(50), ms(150));
/// assert_eq!([backoff.next_wait(), backoff.next_wait(), backoff.next_wait()], [ms(50), ms(100), ms(150)]);
/// backoff.reset();
/// assert_eq!(backoff.next_wait(), ms(50));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits of `first`, then doubling up to `max` (at least `first`).
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            next: first,
        }
    }

    /// The wait to take now; the one after it is twice as long, up to the
    /// maximum.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// The wait [`next_wait`](Self::next_wait) will give, without taking it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Starts over from the first wait.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_starts_over_on_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(50), Duration::from_secs(5));
        let waits: Vec<Duration> = (0..9).map(|_| backoff.next_wait()).collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000].map(ms)
        );
        assert_eq!(backoff.peek(), ms(5000));
        backoff.reset();
        assert_eq!(backoff.next_wait(), ms(50));
    }

    #[test]
    fn a_maximum_below_the_first_wait_is_the_first_wait() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        assert_eq!(backoff.next_wait(), Duration::from_secs(1));
        assert_eq!(backoff.next_wait(), Duration::from_secs(1));
    }

    #[test]
    fn a_huge_maximum_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1 << 40), Duration::MAX);
        for _ in 0..100 {
            backoff.next_wait();
        }
        assert_eq!(backoff.peek(), Duration::MAX);
    }
}
