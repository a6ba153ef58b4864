//! Circuit breakers: refusing a method's calls locally, in microseconds,
//! while the calls that went out recently mostly failed.
//!
//! Two kinds, set per method ([`MethodPolicy::breaker`](super::policy::MethodPolicy::breaker)):
//!
//! * **`ratio`** (the state machine of Sentinel and resilience4j): calls
//!   are counted over a sliding `window_ms` (in [`BUCKETS`] buckets). Once
//!   the window holds at least `min_calls`, and `failure_percent` of them
//!   failed (or `slow_call_percent` were slower than `slow_call_ms`), the
//!   breaker **opens**: every call fails at once with `UNAVAILABLE`, for
//!   `open_ms`. Then it is **half-open**: exactly `probes` calls go out.
//!   When they all succeed it **closes** (with an empty window); the first
//!   that fails, or is slow, opens it again. Every probe resolves, however
//!   it ends: a probe the caller cancels, or whose deadline passes (its
//!   future dropped, seen by a guard's `Drop`), frees its place for another
//!   probe (unless it was already slow, which counts against it), so
//!   half-open never sticks (Sentinel's bug 1638).
//! * **`sre`** (Google SRE's adaptive throttling, as in kratos and
//!   go-zero): over the window, `requests` (calls made, refused ones
//!   included) and `accepts` (calls that did not fail); once `min_calls`
//!   requests were counted, a call is refused with probability
//!   `max(0, (requests − k × accepts) / (requests + 1))`. Against a
//!   backend that accepts a fixed number of calls it settles where the
//!   backend receives about `k` times what it accepts; when the backend
//!   recovers, the window forgets the failures and refusals stop within
//!   one window. If no call went out for a second, the next one does
//!   (a forced probe), so that a service failing completely is still
//!   tried.
//!
//! What fails: a transport error, or a code in `failure_codes` (by default
//! those of outlier detection); never the caller's own cancellation or
//! deadline. A breaker's refusal is never retried (the breaker sits above
//! the retry layer), and breakers' state changes and refusals are
//! reported to observers ([`DecisionKind`]).
//!
//! Each name a [`MethodPolicy`](super::policy::MethodPolicy) lists gets a
//! breaker of its own, and so does each method `"*"` covers, on its first
//! call (at most [`MAX_OTHER_METHODS`](super::policy::MAX_OTHER_METHODS);
//! the methods past that share one): a failing method never opens
//! another's breaker. A breaker is shared by every clone of the client, and kept
//! across [`Client::set_policy`](crate::Client::set_policy) while its
//! settings stay the same.
//!
//! ```
//! use lodestar::client::policy::Policy;
//!
//! let policy = Policy::from_toml(r#"
//!     [[methods]]
//!     names = ["Get"]
//!     breaker = { failure_percent = 50, min_calls = 20, open_ms = 5_000, probes = 3 }
//!
//!     [[methods]]
//!     names = ["*"]
//!     breaker = { kind = "sre", k = 2.0 }
//! "#)?;
//! let error = Policy::from_toml("[[methods]]\nnames = [\"Get\"]\nbreaker = { probes = 0 }");
//! assert_eq!(
//!     error.unwrap_err().to_string(),
//!     "policy field `methods[0].breaker.probes` is 0: expected 1 to 1000",
//! );
//! # Ok::<(), lodestar::client::policy::PolicyError>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use http::uri::PathAndQuery;
use lodestar_core::sync::MutexExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::Code;

use super::observe::{CALLER_DEADLINE_SLACK, DecisionKind, Outcome, Reporter};
use super::outlier::{DEFAULT_FAILURE_CODES, FailureCodes};
use super::policy::{MAX_DURATION_MS, PolicyError, code_name};
use crate::deadline::Deadline;
use crate::policy_data::{in_range, invalid, validate_codes};

/// How many buckets a breaker's window is counted in: 20 (a window of
/// 10 s forgets its oldest calls half a second at a time).
pub const BUCKETS: u32 = 20;

/// The shortest `window_ms`: 100 ms.
pub const MIN_WINDOW_MS: u64 = 100;

/// The most `probes` a half-open breaker may let through: 1,000.
pub const MAX_PROBES: u32 = 1_000;

/// The largest `min_calls`: 1,000,000.
pub const MAX_MIN_CALLS: u32 = 1_000_000;

/// The largest SRE `k`: 100.
pub const MAX_K: f64 = 100.0;

/// After this long without a call let through, an `sre` breaker lets the
/// next one through whatever its odds: 1 s.
pub const FORCED_PROBE: Duration = Duration::from_secs(1);

/// Which breaker (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerKind {
    /// Closed, open, half-open, on the failure and slow-call ratios.
    #[default]
    Ratio,
    /// Google SRE's adaptive throttling.
    Sre,
}

/// The circuit breaker of a method (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSettings {
    /// Which breaker. Default: `ratio`.
    pub kind: BreakerKind,
    /// The sliding window calls are counted over, in milliseconds
    /// ([`MIN_WINDOW_MS`] to one hour). Default: 10,000.
    pub window_ms: u64,
    /// The fewest calls in the window before the breaker may act (1 to
    /// [`MAX_MIN_CALLS`]). Default: 20.
    pub min_calls: u32,
    /// `ratio`: opens when at least this percentage of the window's calls
    /// failed (1 to 100). Default: 50.
    pub failure_percent: u32,
    /// `ratio`: a call that lasts at least this long (from its start to the
    /// end of its response), in milliseconds, is slow. Default: none (no
    /// call is slow).
    pub slow_call_ms: Option<u64>,
    /// `ratio`: opens when at least this percentage of the window's calls
    /// were slow (1 to 100). Default: 100.
    pub slow_call_percent: u32,
    /// `ratio`: how long it stays open before probing, in milliseconds (1
    /// to one hour). Default: 5,000.
    pub open_ms: u64,
    /// `ratio`: how many calls a half-open breaker lets through; all must
    /// succeed for it to close (1 to [`MAX_PROBES`]). Default: 3.
    pub probes: u32,
    /// `sre`: the multiplier `k` of accepted calls (1 to [`MAX_K`]); lower
    /// refuses sooner. Default: 2.
    pub k: f64,
    /// The codes that count as failures (names, not `OK`); transport
    /// errors always do, the caller's own cancellation and deadline never.
    /// Default: those of outlier detection: `UNAVAILABLE`, `INTERNAL`,
    /// `UNKNOWN`, `DATA_LOSS`, `DEADLINE_EXCEEDED`.
    pub failure_codes: Vec<String>,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            kind: BreakerKind::Ratio,
            window_ms: 10_000,
            min_calls: 20,
            failure_percent: 50,
            slow_call_ms: None,
            slow_call_percent: 100,
            open_ms: 5_000,
            probes: 3,
            k: 2.0,
            failure_codes: DEFAULT_FAILURE_CODES
                .map(|code| code_name(code).to_owned())
                .to_vec(),
        }
    }
}

impl BreakerSettings {
    /// Checks every field, naming it under `at` (e.g. `methods[0].breaker`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), PolicyError> {
        let field = |name: &str| format!("{at}.{name}");
        in_range(
            &field("window_ms"),
            self.window_ms,
            MIN_WINDOW_MS,
            MAX_DURATION_MS,
        )?;
        in_range(
            &field("min_calls"),
            self.min_calls.into(),
            1,
            MAX_MIN_CALLS.into(),
        )?;
        in_range(
            &field("failure_percent"),
            self.failure_percent.into(),
            1,
            100,
        )?;
        if let Some(slow) = self.slow_call_ms {
            in_range(&field("slow_call_ms"), slow, 1, MAX_DURATION_MS)?;
        }
        in_range(
            &field("slow_call_percent"),
            self.slow_call_percent.into(),
            1,
            100,
        )?;
        in_range(&field("open_ms"), self.open_ms, 1, MAX_DURATION_MS)?;
        in_range(&field("probes"), self.probes.into(), 1, MAX_PROBES.into())?;
        if !(1.0..=MAX_K).contains(&self.k) {
            return Err(invalid(field("k"), self.k, format!("1 to {MAX_K}")));
        }
        validate_codes(&field("failure_codes"), &self.failure_codes)
    }
}

/// Why a breaker refused a call (the layer names the service and method).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// Open: probes go out from `probe_at`.
    Open { probe_at: Instant },
    /// Half-open, with all its probes out.
    Probing { probes: u32 },
    /// The SRE throttle drew a refusal.
    Throttled {
        requests: u32,
        accepts: u32,
        window: Duration,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Refusal::Open { probe_at } => {
                let wait = probe_at.saturating_duration_since(Instant::now());
                write!(
                    f,
                    "is open; it lets probes through in {} ms",
                    wait.as_millis()
                )
            }
            Refusal::Probing { probes } => write!(
                f,
                "is half-open, waiting for its {probes} probes to end; it closes when they \
                 all succeed"
            ),
            Refusal::Throttled {
                requests,
                accepts,
                window,
            } => write!(
                f,
                "(adaptive throttle) refused the call locally: {accepts} of {requests} calls \
                 accepted in the last {} ms; a call goes out at least once a second",
                window.as_millis()
            ),
        }
    }
}

/// Calls, failures and slow calls over a sliding window, in [`BUCKETS`]
/// buckets, with their totals kept as calls are added and buckets age out
/// (a call costs no walk over the buckets).
#[derive(Debug)]
struct Window {
    origin: Instant,
    bucket_nanos: u64,
    buckets: [Totals; BUCKETS as usize],
    /// The newest bucket's number (since `origin`): the window is it and
    /// the `BUCKETS - 1` before it.
    newest: u64,
    /// What the window's buckets hold.
    totals: Totals,
}

/// What a window (or one of its buckets) holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.calls = self.calls.saturating_add(other.calls);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }

    fn remove(&mut self, other: Totals) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }
}

impl Window {
    fn new(window: Duration, now: Instant) -> Self {
        let bucket = u64::try_from((window / BUCKETS).as_nanos()).unwrap_or(u64::MAX);
        Self {
            origin: now,
            bucket_nanos: bucket.max(1_000),
            buckets: [Totals::default(); BUCKETS as usize],
            newest: 0,
            totals: Totals::default(),
        }
    }

    /// Moves the window on to `now` (a time before its newest bucket
    /// counts in that bucket); returns the bucket `now` falls in.
    fn advance(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.origin);
        let number = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / self.bucket_nanos;
        if number > self.newest {
            if number - self.newest >= u64::from(BUCKETS) {
                self.clear();
            } else {
                for aged in self.newest + 1..=number {
                    let bucket = &mut self.buckets[slot(aged)];
                    self.totals.remove(*bucket);
                    *bucket = Totals::default();
                }
            }
            self.newest = number;
        }
        slot(self.newest)
    }

    fn add(&mut self, now: Instant, failure: bool, slow: bool) {
        let call = Totals {
            calls: 1,
            failures: u32::from(failure),
            slow: u32::from(slow),
        };
        let bucket = self.advance(now);
        self.buckets[bucket].add(call);
        self.totals.add(call);
    }

    fn totals(&mut self, now: Instant) -> Totals {
        self.advance(now);
        self.totals
    }

    fn clear(&mut self) {
        self.buckets = [Totals::default(); BUCKETS as usize];
        self.totals = Totals::default();
    }
}

/// The bucket of a window that bucket number `number` is kept in.
fn slot(number: u64) -> usize {
    // Below `BUCKETS`, so the cast loses nothing.
    (number % u64::from(BUCKETS)) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { out: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped at every change of state: a call admitted in an earlier
    /// state does not count in this one.
    generation: u64,
    window: Window,
    /// When the last call was let through (`sre`'s forced probes).
    last_admitted: Instant,
}

/// The circuit breaker of one method.
#[derive(Debug)]
pub(crate) struct Breaker {
    pub(crate) settings: BreakerSettings,
    codes: FailureCodes,
    window: Duration,
    open: Duration,
    slow: Option<Duration>,
    reporter: Reporter,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub(crate) fn new(settings: &BreakerSettings, reporter: Reporter) -> Arc<Self> {
        let now = Instant::now();
        let window = Duration::from_millis(settings.window_ms);
        let codes = FailureCodes::of(
            settings
                .failure_codes
                .iter()
                .filter_map(|name| super::policy::code_from_name(name))
                .filter(|&code| code != Code::Ok),
        );
        Arc::new(Self {
            settings: settings.clone(),
            codes,
            window,
            open: Duration::from_millis(settings.open_ms),
            slow: settings.slow_call_ms.map(Duration::from_millis),
            reporter,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window: Window::new(window, now),
                last_admitted: now,
            }),
        })
    }

    /// Lets a call of `method` through, with a permit that must see how it
    /// ends, or refuses it.
    pub(crate) fn admit(
        self: &Arc<Self>,
        method: &PathAndQuery,
        deadline: Option<Deadline>,
    ) -> Result<Permit, Refusal> {
        // A closed `ratio` breaker reads no clock (unless slow calls count).
        let now = Instant::now;
        let mut changed = None;
        let admitted = {
            let mut inner = self.inner.lock_unpoisoned();
            let inner = &mut *inner;
            match self.settings.kind {
                BreakerKind::Ratio => match inner.state {
                    State::Closed => Ok(false),
                    State::Open { until } if now() < until => {
                        Err(Refusal::Open { probe_at: until })
                    }
                    State::Open { .. } => {
                        inner.state = State::HalfOpen {
                            out: 1,
                            succeeded: 0,
                        };
                        inner.generation += 1;
                        changed = Some(DecisionKind::BreakerHalfOpen);
                        Ok(true)
                    }
                    State::HalfOpen { out, succeeded } => {
                        if out + succeeded < self.settings.probes {
                            inner.state = State::HalfOpen {
                                out: out + 1,
                                succeeded,
                            };
                            Ok(true)
                        } else {
                            Err(Refusal::Probing {
                                probes: self.settings.probes,
                            })
                        }
                    }
                },
                BreakerKind::Sre => {
                    let now = now();
                    let totals = inner.window.totals(now);
                    let accepts = totals.calls.saturating_sub(totals.failures);
                    let odds = (f64::from(totals.calls) - self.settings.k * f64::from(accepts))
                        / (f64::from(totals.calls) + 1.0);
                    let forced = now.saturating_duration_since(inner.last_admitted) >= FORCED_PROBE;
                    if totals.calls >= self.settings.min_calls
                        && !forced
                        && odds > 0.0
                        && fastrand::f64() < odds
                    {
                        // Refusals count as requests not accepted (the
                        // SRE book's formula); forced probes bound how
                        // long that can last.
                        inner.window.add(now, true, false);
                        Err(Refusal::Throttled {
                            requests: totals.calls,
                            accepts,
                            window: self.window,
                        })
                    } else {
                        inner.last_admitted = now;
                        Ok(false)
                    }
                }
            }
            .map(|probe| (probe, inner.generation))
        };
        if let Some(kind) = changed {
            self.reporter.report(method.path(), kind);
        }
        let (probe, generation) = admitted?;
        Ok(Permit {
            breaker: self.clone(),
            method: method.clone(),
            generation,
            probe,
            started: self.slow.map(|_| now()),
            deadline,
            done: false,
        })
    }

    /// Counts a call that ended: `outcome`, or dropped by its caller (`None`).
    fn end(&self, permit: &Permit, outcome: Option<&Outcome>) {
        let now = Instant::now();
        let slow = self
            .slow
            .zip(permit.started)
            .is_some_and(|(slow, started)| now.saturating_duration_since(started) >= slow);
        let by_caller = match outcome {
            None => true,
            Some(Outcome::Status(Code::DeadlineExceeded)) => permit
                .deadline
                .is_some_and(|d| d.remaining() < CALLER_DEADLINE_SLACK),
            Some(_) => false,
        };
        let failure = !by_caller
            && outcome.is_some_and(|outcome| self.codes.classify(outcome, false) == Some(true));
        if by_caller && !failure && !slow && self.settings.kind == BreakerKind::Sre {
            return; // says nothing of the service
        }
        let mut changed = None;
        {
            let mut inner = self.inner.lock_unpoisoned();
            if inner.generation != permit.generation {
                return; // admitted before the last change of state
            }
            let counted = !by_caller || slow;
            match inner.state {
                State::Closed => {
                    if counted {
                        inner.window.add(now, failure, slow);
                    }
                    if self.settings.kind == BreakerKind::Ratio
                        && self.trips(inner.window.totals(now))
                    {
                        inner.state = State::Open {
                            until: now + self.open,
                        };
                        inner.generation += 1;
                        inner.window.clear();
                        changed = Some(DecisionKind::BreakerOpened {
                            open_for: self.open,
                        });
                    }
                }
                State::HalfOpen { out, succeeded } if permit.probe => {
                    let out = out.saturating_sub(1);
                    if failure || slow {
                        inner.state = State::Open {
                            until: now + self.open,
                        };
                        inner.generation += 1;
                        changed = Some(DecisionKind::BreakerOpened {
                            open_for: self.open,
                        });
                    } else if !counted {
                        inner.state = State::HalfOpen { out, succeeded };
                    } else if succeeded + 1 >= self.settings.probes {
                        inner.state = State::Closed;
                        inner.generation += 1;
                        inner.window.clear();
                        changed = Some(DecisionKind::BreakerClosed);
                    } else {
                        inner.state = State::HalfOpen {
                            out,
                            succeeded: succeeded + 1,
                        };
                    }
                }
                State::HalfOpen { .. } | State::Open { .. } => {}
            }
        }
        if let Some(kind) = changed {
            self.reporter.report(permit.method.path(), kind);
        }
    }

    /// Whether a window holding `totals` opens a `ratio` breaker.
    fn trips(&self, totals: Totals) -> bool {
        let over = |count: u32, percent: u32| {
            u64::from(count) * 100 >= u64::from(percent) * u64::from(totals.calls)
        };
        totals.calls >= self.settings.min_calls
            && ((totals.failures > 0 && over(totals.failures, self.settings.failure_percent))
                || (totals.slow > 0 && over(totals.slow, self.settings.slow_call_percent)))
    }

    /// Whether it refuses calls now (`ratio`: open, or half-open with every
    /// probe out).
    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(self.inner.lock_unpoisoned().state, State::Closed)
    }
}

/// A call the breaker let through: counted when it ends, whichever way
/// (dropped included, by `Drop`).
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    method: PathAndQuery,
    generation: u64,
    probe: bool,
    /// When it was let through, if slow calls count.
    started: Option<Instant>,
    deadline: Option<Deadline>,
    done: bool,
}

impl Permit {
    /// The call ended with `outcome`.
    pub(crate) fn finish(mut self, outcome: &Outcome) {
        self.done = true;
        self.breaker.end(&self, Some(outcome));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.end(self, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use lodestar_core::ServiceKey;

    use super::*;
    use crate::client::observe::{Decision, ObserverDebug};

    type Seen = Arc<Mutex<Vec<DecisionKind>>>;

    struct Recorder(Seen);

    impl super::super::observe::Observer for Recorder {
        fn attempt(&self, _: &super::super::observe::Attempt<'_>) {}
        fn decided(&self, decision: &Decision<'_>) {
            self.0.lock_unpoisoned().push(decision.kind.clone());
        }
    }

    fn breaker(change: impl FnOnce(&mut BreakerSettings)) -> (Arc<Breaker>, Seen) {
        let mut settings = BreakerSettings {
            min_calls: 10,
            open_ms: 1_000,
            probes: 2,
            ..BreakerSettings::default()
        };
        change(&mut settings);
        settings.validate("breaker").unwrap();
        let seen = Seen::default();
        let reporter = Reporter {
            service: ServiceKey::new("svc"),
            observers: Arc::from([Arc::new(Recorder(seen.clone())) as Arc<dyn ObserverDebug>]),
            counted: None,
        };
        (Breaker::new(&settings, reporter), seen)
    }

    fn method() -> PathAndQuery {
        PathAndQuery::from_static("/pkg.Svc/Get")
    }

    fn call(breaker: &Arc<Breaker>, code: Code) -> Result<(), Refusal> {
        breaker
            .admit(&method(), None)
            .map(|permit| permit.finish(&Outcome::Status(code)))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_min_calls_probes_then_closes_or_reopens() {
        let (breaker, seen) = breaker(|_| {});
        for _ in 0..9 {
            call(&breaker, Code::Unavailable).unwrap();
        }
        assert!(!breaker.is_open(), "9 calls are under min_calls");
        call(&breaker, Code::Unavailable).unwrap();
        assert!(breaker.is_open());
        assert!(matches!(
            call(&breaker, Code::Ok),
            Err(Refusal::Open { .. })
        ));
        // After open_ms: exactly `probes` calls go out.
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let first = breaker.admit(&method(), None).unwrap();
        let second = breaker.admit(&method(), None).unwrap();
        assert!(matches!(
            breaker.admit(&method(), None),
            Err(Refusal::Probing { probes: 2 })
        ));
        // One failing probe reopens it.
        first.finish(&Outcome::Status(Code::Internal));
        assert!(matches!(
            call(&breaker, Code::Ok),
            Err(Refusal::Open { .. })
        ));
        // The other probe, admitted before, no longer counts.
        second.finish(&Outcome::Status(Code::Ok));
        assert!(breaker.is_open());
        tokio::time::advance(Duration::from_millis(1_000)).await;
        call(&breaker, Code::Ok).unwrap();
        assert!(breaker.is_open(), "one of two probes");
        call(&breaker, Code::Ok).unwrap();
        assert!(!breaker.is_open());
        assert_eq!(
            *seen.lock_unpoisoned(),
            [
                DecisionKind::BreakerOpened {
                    open_for: Duration::from_secs(1)
                },
                DecisionKind::BreakerHalfOpen,
                DecisionKind::BreakerOpened {
                    open_for: Duration::from_secs(1)
                },
                DecisionKind::BreakerHalfOpen,
                DecisionKind::BreakerClosed,
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_or_expired_probe_frees_its_place() {
        let (breaker, _) = breaker(|s| s.probes = 1);
        for _ in 0..10 {
            call(&breaker, Code::Unavailable).unwrap();
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        // Cancelled by its caller: another probe may go.
        drop(breaker.admit(&method(), None).unwrap());
        // Its deadline passed, the server said so at the deadline.
        let deadline = Deadline::after(Duration::from_millis(100));
        let expired = breaker.admit(&method(), Some(deadline)).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        expired.finish(&Outcome::Status(Code::DeadlineExceeded));
        assert!(breaker.is_open(), "nothing decided yet");
        call(&breaker, Code::Ok).unwrap();
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_reopens_even_when_dropped() {
        let (breaker, _) = breaker(|s| {
            s.probes = 1;
            s.slow_call_ms = Some(200);
        });
        for _ in 0..10 {
            call(&breaker, Code::Unavailable).unwrap();
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let blocked = breaker.admit(&method(), None).unwrap();
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(blocked);
        assert!(matches!(
            call(&breaker, Code::Ok),
            Err(Refusal::Open { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_and_only_failure_codes_open_it() {
        let (breaker, _) = breaker(|s| {
            s.slow_call_ms = Some(100);
            s.slow_call_percent = 50;
        });
        // Codes that describe the request, and callers' cancellations, never count.
        for _ in 0..30 {
            call(&breaker, Code::NotFound).unwrap();
            drop(breaker.admit(&method(), None).unwrap());
        }
        assert!(!breaker.is_open());
        for _ in 0..30 {
            let permit = breaker.admit(&method(), None).unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
            permit.finish(&Outcome::Status(Code::Ok));
            if breaker.is_open() {
                return;
            }
        }
        panic!("slow calls did not open it");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_failures() {
        let (breaker, _) = breaker(|s| s.window_ms = 1_000);
        for _ in 0..9 {
            call(&breaker, Code::Unavailable).unwrap();
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        call(&breaker, Code::Unavailable).unwrap();
        assert!(!breaker.is_open(), "the 9 are out of the window");
    }

    /// A backend that accepts `capacity` calls per 100 ms and fails the rest.
    struct Backend {
        capacity: u32,
        used: u32,
    }

    /// Offers 100 calls per 100 ms for `rounds` rounds; returns (calls that
    /// reached the backend, calls it accepted, calls that succeeded of the
    /// last round's offered 100).
    async fn offer(breaker: &Arc<Breaker>, backend: &mut Backend, rounds: u32) -> (u32, u32, u32) {
        let (mut sent, mut accepted, mut last) = (0, 0, 0);
        for _ in 0..rounds {
            backend.used = 0;
            last = 0;
            for _ in 0..100 {
                if let Ok(permit) = breaker.admit(&method(), None) {
                    sent += 1;
                    let ok = backend.used < backend.capacity;
                    backend.used += u32::from(ok);
                    accepted += u32::from(ok);
                    last += u32::from(ok);
                    let code = if ok { Code::Ok } else { Code::Unavailable };
                    permit.finish(&Outcome::Status(code));
                }
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        (sent, accepted, last)
    }

    #[tokio::test(start_paused = true)]
    async fn sre_converges_near_k_times_accepted_and_recovers_within_a_window() {
        fastrand::seed(7);
        let (breaker, _) = breaker(|s| {
            s.kind = BreakerKind::Sre;
            s.window_ms = 10_000;
        });
        // Capacity 10 of 100 offered per round: warm up for a window, then
        // measure one.
        let mut backend = Backend {
            capacity: 10,
            used: 0,
        };
        offer(&breaker, &mut backend, 100).await;
        let (sent, accepted, _) = offer(&breaker, &mut backend, 100).await;
        let ratio = f64::from(sent) / f64::from(accepted);
        assert!(
            (1.7..=2.3).contains(&ratio),
            "{sent} sent, {accepted} accepted"
        );
        // Capacity returns: within one window, at least 99% succeed.
        backend.capacity = 1_000;
        offer(&breaker, &mut backend, 100).await;
        let (_, accepted, last) = offer(&breaker, &mut backend, 10).await;
        assert!(accepted >= 990, "{accepted} of 1000");
        assert_eq!(last, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn sre_still_probes_a_service_failing_completely() {
        let (breaker, _) = breaker(|s| s.kind = BreakerKind::Sre);
        let mut backend = Backend {
            capacity: 0,
            used: 0,
        };
        offer(&breaker, &mut backend, 50).await;
        // 10 s more at 1,000 calls/s: at least one forced probe a second.
        let (sent, _, _) = offer(&breaker, &mut backend, 100).await;
        assert!(sent >= 10, "{sent}");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        type Change = fn(&mut BreakerSettings);
        let cases: &[(Change, &str)] = &[
            (
                |s| s.window_ms = 0,
                "policy field `b.window_ms` is 0: expected 100 to 3600000",
            ),
            (
                |s| s.failure_percent = 101,
                "policy field `b.failure_percent` is 101: expected 1 to 100",
            ),
            (
                |s| s.slow_call_percent = 0,
                "policy field `b.slow_call_percent` is 0: expected 1 to 100",
            ),
            (
                |s| s.probes = 0,
                "policy field `b.probes` is 0: expected 1 to 1000",
            ),
            (
                |s| s.open_ms = 0,
                "policy field `b.open_ms` is 0: expected 1 to 3600000",
            ),
            (
                |s| s.min_calls = 0,
                "policy field `b.min_calls` is 0: expected 1 to 1000000",
            ),
            (
                |s| s.slow_call_ms = Some(0),
                "policy field `b.slow_call_ms` is 0: expected 1 to 3600000",
            ),
            (
                |s| s.k = -2.0,
                "policy field `b.k` is -2: expected 1 to 100",
            ),
            (
                |s| s.failure_codes.push("SLOW".into()),
                "policy field `b.failure_codes[5]` is `SLOW`: expected a gRPC code name",
            ),
        ];
        for (change, expected) in cases {
            let mut settings = BreakerSettings::default();
            change(&mut settings);
            let error = settings.validate("b").unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        }
    }
}
