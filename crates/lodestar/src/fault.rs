//! Fault injection, for rehearsing failures: settings per method
//! ([`FaultSettings`]), shared by the client policy
//! ([`client::policy::MethodPolicy::fault`](crate::client::policy::MethodPolicy::fault))
//! and the server policy
//! ([`server::policy::MethodPolicy::fault`](crate::server::policy::MethodPolicy::fault)).
//!
//! A call of a method with settings is **delayed** with probability
//! `delay_percent`, and **aborted** (fails with `abort_code`, without
//! reaching the service) with probability `abort_percent`, each drawn on
//! its own (as Envoy and gRPC's A33 do: 20% delays and 5% aborts touch
//! 24% of calls; a call drawn for both is delayed, then aborted). At most
//! `max_active` faults are in progress at once (a fault is in progress
//! while its delay lasts); a call drawn beyond that goes through
//! untouched. Off by default: a method without settings is never touched.
//!
//! **Asking for a fault with metadata.** A call may carry
//! [`DELAY_HEADER`] (`x-lodestar-fault-delay-ms: 250`, at most
//! [`MAX_DELAY_MS`]) and [`ABORT_HEADER`] (`x-lodestar-fault-abort:
//! UNAVAILABLE`, a code's name or number, not `OK`). They are obeyed only
//! where the method's settings say `allow_headers = true`: the first side
//! that allows them (the client, then the server) injects that fault into
//! the call, whatever the percentages, still within `max_active`, and
//! removes the header so the fault happens once. Where they are not
//! allowed they are ignored (and passed on): a header alone can never
//! make a production service fail. Malformed values are ignored.
//!
//! ```
//! use lodestar::fault::FaultSettings;
//! use lodestar::client::policy::Policy;
//!
//! let policy = Policy::from_toml(r#"
//!     [[methods]]
//!     names = ["Get"]
//!     fault = { abort_percent = 10.0, abort_code = "UNAVAILABLE", delay_percent = 5.0, delay_ms = 200 }
//! "#)?;
//! let fault = policy.method("Get").and_then(|m| m.fault.as_ref());
//! assert_eq!(fault.map(|f| f.max_active), Some(FaultSettings::default().max_active));
//!
//! let error = Policy::from_toml("[[methods]]\nnames = [\"Get\"]\nfault = { abort_percent = 120.0 }");
//! assert_eq!(
//!     error.unwrap_err().to_string(),
//!     "policy field `methods[0].fault.abort_percent` is 120: expected a percentage from 0 to 100",
//! );
//! # Ok::<(), lodestar::client::policy::PolicyError>(())
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use crate::policy_data::{PolicyError, code_from_name, failure_code, in_range, invalid};

/// The metadata asking for a delay of this many milliseconds (obeyed only
/// where allowed: see the [module docs](self)).
pub const DELAY_HEADER: &str = "x-lodestar-fault-delay-ms";

/// The metadata asking for an abort with this code, by name
/// (`UNAVAILABLE`) or number (`14`) (obeyed only where allowed: see the
/// [module docs](self)).
pub const ABORT_HEADER: &str = "x-lodestar-fault-abort";

/// The longest delay a policy or a call's metadata may ask for: 60,000
/// ms. A longer one in metadata is ignored.
pub const MAX_DELAY_MS: u64 = 60_000;

/// The most faults [`FaultSettings::max_active`] may allow at once:
/// 1,000,000.
pub const MAX_ACTIVE: u32 = 1_000_000;

/// The faults injected into the calls of some methods (see the [module
/// docs](self)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct FaultSettings {
    /// The share of calls delayed, in percent (0 to 100; fractions
    /// allowed). Default: 0.
    pub delay_percent: f64,
    /// How long a delayed call waits before it goes on, in milliseconds
    /// (at most [`MAX_DELAY_MS`]). Default: 0.
    pub delay_ms: u64,
    /// The share of calls aborted, in percent (0 to 100; fractions
    /// allowed), drawn independently of the delay. Default: 0.
    pub abort_percent: f64,
    /// The code an aborted call fails with (its name, not `OK`). Default:
    /// `UNAVAILABLE`.
    pub abort_code: String,
    /// The most faults in progress at once (1 to [`MAX_ACTIVE`]); a call
    /// drawn for a fault beyond it goes through untouched. Default: 100.
    pub max_active: u32,
    /// Whether a call's metadata ([`DELAY_HEADER`], [`ABORT_HEADER`]) may
    /// ask for a fault. Default: no (such metadata is ignored).
    pub allow_headers: bool,
}

impl Default for FaultSettings {
    fn default() -> Self {
        Self {
            delay_percent: 0.0,
            delay_ms: 0,
            abort_percent: 0.0,
            abort_code: "UNAVAILABLE".to_owned(),
            max_active: 100,
            allow_headers: false,
        }
    }
}

impl FaultSettings {
    /// Checks every field, naming it under `at` (e.g. `methods[0].fault`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), PolicyError> {
        percent(&format!("{at}.delay_percent"), self.delay_percent)?;
        percent(&format!("{at}.abort_percent"), self.abort_percent)?;
        in_range(&format!("{at}.delay_ms"), self.delay_ms, 0, MAX_DELAY_MS)?;
        failure_code(&format!("{at}.abort_code"), &self.abort_code)?;
        in_range(
            &format!("{at}.max_active"),
            self.max_active.into(),
            1,
            MAX_ACTIVE.into(),
        )
    }
}

/// Checks that `value` is a percentage: 0 to 100 (not NaN).
pub(crate) fn percent(field: &str, value: f64) -> Result<(), PolicyError> {
    if (0.0..=100.0).contains(&value) {
        return Ok(());
    }
    Err(invalid(field, value, "a percentage from 0 to 100"))
}

/// `percent` as a threshold for a uniform `u32` draw: a draw below it
/// hits (0 never does, 100 always does).
fn threshold(percent: f64) -> u64 {
    // In range (validated): the product is at most 2^32, exact enough.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a validated percentage: 0 to 2^32"
    )]
    let threshold = (percent / 100.0 * 4_294_967_296.0).round() as u64;
    threshold
}

/// One draw with probability `threshold` / 2^32.
fn draw(threshold: u64) -> bool {
    threshold > 0 && u64::from(fastrand::u32(..)) < threshold
}

/// The fault injection of one method (or of the methods of one `"*"`
/// entry), built from its settings when the policy is set: the draws'
/// thresholds and the count of faults in progress.
#[derive(Debug)]
pub(crate) struct Injector {
    delay_threshold: u64,
    delay: Duration,
    abort_threshold: u64,
    abort: Code,
    max_active: u32,
    allow_headers: bool,
    active: AtomicU32,
}

impl Injector {
    pub(crate) fn new(settings: &FaultSettings) -> Arc<Self> {
        Arc::new(Self {
            delay_threshold: threshold(settings.delay_percent),
            delay: Duration::from_millis(settings.delay_ms),
            abort_threshold: threshold(settings.abort_percent),
            abort: code_from_name(&settings.abort_code).unwrap_or(Code::Unavailable),
            max_active: settings.max_active,
            allow_headers: settings.allow_headers,
            active: AtomicU32::new(0),
        })
    }

    /// The fault this call gets, if any: drawn, or asked for by its
    /// metadata where that is allowed (the header is then removed).
    pub(crate) fn draw(self: &Arc<Self>, headers: &mut HeaderMap) -> Option<Fault> {
        let mut delay = draw(self.delay_threshold).then_some(self.delay);
        let mut abort = draw(self.abort_threshold).then_some(self.abort);
        if self.allow_headers {
            if let Some(asked) = headers.remove(DELAY_HEADER) {
                delay = asked
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|&ms| ms <= MAX_DELAY_MS)
                    .map(Duration::from_millis)
                    .or(delay);
            }
            if let Some(asked) = headers.remove(ABORT_HEADER) {
                abort = asked
                    .to_str()
                    .ok()
                    .and_then(parse_code)
                    .filter(|&code| code != Code::Ok)
                    .or(abort);
            }
        }
        if delay.is_none() && abort.is_none() {
            return None;
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_active {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Fault {
            delay: delay.filter(|d| !d.is_zero()),
            abort,
            active: Active(self.clone()),
        })
    }

    /// How many faults are in progress.
    #[cfg(test)]
    pub(crate) fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }
}

/// The fault a call to `request`'s method gets from `injector` (the
/// method's, if it has one), with the method's path to report it under.
pub(crate) fn for_call<B>(
    injector: Option<Arc<Injector>>,
    request: &mut http::Request<B>,
) -> Option<(Fault, String)> {
    let fault = injector?.draw(request.headers_mut())?;
    Some((fault, request.uri().path().to_owned()))
}

/// A code by name (`UNAVAILABLE`) or number (`14`).
fn parse_code(value: &str) -> Option<Code> {
    let value = value.trim();
    code_from_name(value).or_else(|| {
        value
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=16).contains(n))
            .map(Code::from_i32)
    })
}

/// The fault one call gets: counted in progress until dropped.
#[derive(Debug)]
pub(crate) struct Fault {
    /// Wait this long first.
    pub(crate) delay: Option<Duration>,
    /// Then fail with this code.
    pub(crate) abort: Option<Code>,
    active: Active,
}

impl Fault {
    /// The status of an aborted call of `method` (`/pkg.Service/Method`),
    /// injected by `side` (`client` or `server`) policy.
    pub(crate) fn status(code: Code, side: &str, method: &str) -> Status {
        Status::new(
            code,
            format!("fault injected by the {side} policy of {method}"),
        )
    }

    /// The fault is over (its delay has passed): it no longer counts
    /// against `max_active`.
    pub(crate) fn end(self) -> Option<Code> {
        drop(self.active);
        self.abort
    }
}

/// One fault in progress, counted out when dropped.
#[derive(Debug)]
struct Active(Arc<Injector>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn injector(change: impl FnOnce(&mut FaultSettings)) -> Arc<Injector> {
        let mut settings = FaultSettings::default();
        change(&mut settings);
        settings.validate("fault").unwrap();
        Injector::new(&settings)
    }

    #[test]
    fn ten_percent_aborts_over_twenty_thousand_calls_is_ten_percent() {
        let injector = injector(|s| s.abort_percent = 10.0);
        let mut headers = HeaderMap::new();
        let aborted = (0..20_000)
            .filter(|_| injector.draw(&mut headers).and_then(Fault::end).is_some())
            .count();
        // 3σ of a binomial(20 000, 0.1) is 0.64%; the acceptance asks ±0.6%.
        assert!((1_880..=2_120).contains(&aborted), "{aborted}");
        assert_eq!(injector.active(), 0);
    }

    #[test]
    fn delays_and_aborts_are_drawn_independently() {
        let both = injector(|s| {
            s.delay_percent = 20.0;
            s.delay_ms = 50;
            s.abort_percent = 10.0;
            s.max_active = MAX_ACTIVE;
        });
        let mut headers = HeaderMap::new();
        let touched = (0..20_000)
            .filter(|_| both.draw(&mut headers).is_some())
            .count();
        // 0.2 + 0.1 - 0.02 = 28%; 3σ ≈ 0.95%.
        assert!((5_400..=5_800).contains(&touched), "{touched}");
        assert!(injector(|_| {}).draw(&mut headers).is_none());
        let always = injector(|s| s.abort_percent = 100.0);
        assert!((0..1_000).all(|_| always.draw(&mut headers).is_some()));
    }

    #[test]
    fn at_most_max_active_faults_at_once() {
        let injector = injector(|s| {
            s.delay_percent = 100.0;
            s.delay_ms = 10;
            s.max_active = 3;
        });
        let mut headers = HeaderMap::new();
        let held: Vec<_> = (0..10)
            .filter_map(|_| injector.draw(&mut headers))
            .collect();
        assert_eq!(held.len(), 3);
        assert_eq!(injector.active(), 3);
        drop(held);
        assert_eq!(injector.active(), 0);
        assert!(injector.draw(&mut headers).is_some());
    }

    #[test]
    fn headers_ask_for_faults_only_where_allowed() {
        let asking = || {
            let mut headers = HeaderMap::new();
            headers.insert(DELAY_HEADER, HeaderValue::from_static("250"));
            headers.insert(ABORT_HEADER, HeaderValue::from_static("RESOURCE_EXHAUSTED"));
            headers
        };
        // Not allowed: ignored, and left for the other side.
        let mut headers = asking();
        assert!(injector(|_| {}).draw(&mut headers).is_none());
        assert_eq!(headers.len(), 2);
        // Allowed: obeyed, and removed.
        let mut headers = asking();
        let fault = injector(|s| s.allow_headers = true)
            .draw(&mut headers)
            .unwrap();
        assert_eq!(fault.delay, Some(Duration::from_millis(250)));
        assert_eq!(fault.abort, Some(Code::ResourceExhausted));
        assert!(headers.is_empty());
        // By number; malformed, `OK` and too long are ignored.
        let allowed = injector(|s| s.allow_headers = true);
        let mut headers = HeaderMap::new();
        headers.insert(ABORT_HEADER, HeaderValue::from_static("14"));
        let fault = allowed.draw(&mut headers).unwrap();
        assert_eq!(fault.abort, Some(Code::Unavailable));
        for (name, value) in [
            (ABORT_HEADER, "OK"),
            (ABORT_HEADER, "0"),
            (ABORT_HEADER, "17"),
            (ABORT_HEADER, "nope"),
            (DELAY_HEADER, "60001"),
            (DELAY_HEADER, "-5"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert!(allowed.draw(&mut headers).is_none(), "{name}: {value}");
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        type Change = fn(&mut FaultSettings);
        let cases: &[(Change, &str)] = &[
            (
                |s| s.delay_percent = -1.0,
                "policy field `f.delay_percent` is -1: expected a percentage from 0 to 100",
            ),
            (
                |s| s.abort_percent = 100.5,
                "policy field `f.abort_percent` is 100.5: expected a percentage from 0 to 100",
            ),
            (
                |s| s.abort_percent = f64::NAN,
                "policy field `f.abort_percent` is NaN",
            ),
            (
                |s| s.delay_ms = 60_001,
                "policy field `f.delay_ms` is 60001: expected at most 60000",
            ),
            (
                |s| s.abort_code = "BROKEN".into(),
                "policy field `f.abort_code` is `BROKEN`: expected a gRPC code name",
            ),
            (
                |s| s.abort_code = "OK".into(),
                "policy field `f.abort_code` is `OK`: expected a code other than `OK`",
            ),
            (
                |s| s.max_active = 0,
                "policy field `f.max_active` is 0: expected 1 to 1000000",
            ),
        ];
        for (change, expected) in cases {
            let mut settings = FaultSettings::default();
            change(&mut settings);
            let error = settings.validate("f").unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        }
    }
}
