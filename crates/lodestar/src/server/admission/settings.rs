//! The admission settings of a [`MethodPolicy`](super::super::policy::MethodPolicy)
//! entry, as data: a [`RateLimit`] and a [`Concurrency`] limit, and their
//! validation.

use serde::{Deserialize, Serialize};

use crate::policy_data::{PolicyError, in_range, invalid};

/// A token bucket: calls at a steady `per_second`, with bursts of up to
/// `burst` at once (the bucket starts full). Over a time `T`, at most
/// `burst + per_second × T` calls pass. One bucket per policy entry, shared
/// by every method it names, every connection and every clone of the
/// service; or, with a `key`, one per caller.
///
/// ```
/// use lodestar::server::policy::Policy;
///
/// let policy = Policy::from_toml(r#"
///     [[methods]]
///     names = ["helloworld.Greeter/SayHello"]
///     rate_limit = { per_second = 100, burst = 10, key = "x-caller", max_keys = 1000 }
/// "#)?;
/// let limit = policy.methods[0].rate_limit.as_ref().map(|r| r.burst);
/// assert_eq!(limit, Some(10));
/// # Ok::<(), lodestar::server::policy::PolicyError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimit {
    /// Calls per second, in the long run: more than 0, at most
    /// [`MAX_RATE`]. Fractions are allowed (`0.5` is one call every 2 s).
    pub per_second: f64,
    /// Calls allowed at once, after a quiet time: at least 1, at most
    /// [`MAX_BURST`].
    pub burst: u32,
    /// A metadata key (an HTTP header name, lower case) whose value names
    /// the caller: each caller gets a bucket of its own. Calls without it
    /// share one bucket (the *shared* bucket). Default: none (one bucket
    /// for every caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The most callers given a bucket of their own at once (with `key`):
    /// at least 1, at most [`MAX_KEYS`]. Default: 10,000. A caller's bucket
    /// is forgotten once it has filled up again (it then holds nothing a
    /// new bucket would not); a new caller that finds no room shares the
    /// shared bucket until some bucket fills up, so random keys cannot
    /// grow the server's memory beyond this. Values longer than
    /// [`MAX_KEY_LEN`] bytes share the shared bucket too.
    #[serde(default = "default_max_keys")]
    pub max_keys: u32,
}

impl RateLimit {
    /// `per_second` calls per second, in bursts of up to `burst`, for
    /// every caller together.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            key: None,
            max_keys: default_max_keys(),
        }
    }

    /// The same limit for each caller, as named by metadata `key`.
    pub fn per_caller(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

fn default_max_keys() -> u32 {
    10_000
}

/// The highest [`RateLimit::per_second`]: 1,000,000,000.
pub const MAX_RATE: f64 = 1e9;
/// The largest [`RateLimit::burst`]: 1,000,000,000.
pub const MAX_BURST: u32 = 1_000_000_000;
/// The largest [`RateLimit::max_keys`]: 1,000,000.
pub const MAX_KEYS: u32 = 1_000_000;
/// The longest caller key given a bucket of its own: 256 bytes.
pub const MAX_KEY_LEN: usize = 256;

/// A limit on the calls in flight (from the moment a call is admitted to
/// its final status; a stream holds its place until it ends): calls over
/// it are refused at once (*shed*) with `RESOURCE_EXHAUSTED`. One limit
/// per policy entry, shared by every method it names.
///
/// ```
/// use lodestar::server::policy::{Concurrency, Policy};
///
/// let policy = Policy::from_toml(r#"
///     [[methods]]
///     names = ["a.Fixed/*"]
///     concurrency = { fixed = 64 }
///
///     [[methods]]
///     names = ["a.Adaptive/*"]
///     concurrency = { adaptive = { min = 4, max = 500 } }
/// "#)?;
/// assert_eq!(policy.methods[0].concurrency, Some(Concurrency::Fixed(64)));
/// # Ok::<(), lodestar::server::policy::PolicyError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Concurrency {
    /// At most this many calls in flight: at least 1, at most
    /// [`MAX_CONCURRENCY`].
    Fixed(u32),
    /// A limit estimated from the calls' latency and throughput (see
    /// [`Adaptive`]).
    Adaptive(Adaptive),
}

/// An adaptive concurrency limit, estimated as the largest throughput seen
/// × the lowest latency seen (over a sliding window): the number of calls
/// the handlers can have in flight without queueing (BBR's estimate). While the
/// latency stays within `tolerance` × the lowest, the limit is twice that
/// estimate, so that normal bursts pass; once it rises above (calls are
/// queueing), the limit is the estimate itself, for at least `cooldown_ms`.
///
/// Every field has a default; `adaptive = {}` takes them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Adaptive {
    /// The lowest the limit goes: at least 1. Default: 4.
    pub min: u32,
    /// The highest the limit goes: at least `min`, at most
    /// [`MAX_CONCURRENCY`]. Default: 1,000.
    pub max: u32,
    /// The limit until the first estimate: `min` to `max`. Default: 20.
    pub initial: u32,
    /// The sliding window of the throughput and latency seen, in 100
    /// buckets: 100 ms to 600,000 ms. Default: 10,000 (10 s).
    pub window_ms: u64,
    /// How far above the lowest latency the latency of the last bucket may
    /// be before the calls count as queueing: more than 1, at most 100.
    /// Default: 1.5.
    pub tolerance: f64,
    /// How long the limit stays at the estimate after the latency was last
    /// seen queueing: at most 600,000 ms. Default: 1,000.
    pub cooldown_ms: u64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            min: 4,
            max: 1_000,
            initial: 20,
            window_ms: 10_000,
            tolerance: 1.5,
            cooldown_ms: 1_000,
        }
    }
}

/// The highest concurrency limit: 1,000,000.
pub const MAX_CONCURRENCY: u32 = 1_000_000;

/// The longest adaptive window or cooldown: 600,000 ms (10 minutes).
pub const MAX_WINDOW_MS: u64 = 600_000;

/// Checks a rate limit, at field path `at` (`methods[0].rate_limit`).
pub(crate) fn validate_rate_limit(at: &str, limit: &RateLimit) -> Result<(), PolicyError> {
    let rate = limit.per_second;
    if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE) {
        return Err(invalid(
            format!("{at}.per_second"),
            rate,
            format!("more than 0 and at most {MAX_RATE} calls per second"),
        ));
    }
    in_range(
        &format!("{at}.burst"),
        limit.burst.into(),
        1,
        MAX_BURST.into(),
    )?;
    if let Some(key) = &limit.key
        && !is_header_name(key)
    {
        return Err(invalid(
            format!("{at}.key"),
            lodestar_core::registry::limits::quoted(key),
            "a metadata key: a lower-case HTTP header name, not `grpc-` or `:` reserved",
        ));
    }
    in_range(
        &format!("{at}.max_keys"),
        limit.max_keys.into(),
        1,
        MAX_KEYS.into(),
    )
}

/// Whether `key` is a header a caller can set: a valid lower-case HTTP
/// header name, not one gRPC reserves.
fn is_header_name(key: &str) -> bool {
    !key.starts_with("grpc-")
        && key.bytes().all(|b| !b.is_ascii_uppercase())
        && http::HeaderName::from_bytes(key.as_bytes()).is_ok()
}

/// Checks a concurrency limit, at field path `at` (`methods[0].concurrency`).
pub(crate) fn validate_concurrency(at: &str, limit: &Concurrency) -> Result<(), PolicyError> {
    let max = u64::from(MAX_CONCURRENCY);
    match limit {
        Concurrency::Fixed(n) => in_range(&format!("{at}.fixed"), (*n).into(), 1, max),
        Concurrency::Adaptive(a) => {
            let at = format!("{at}.adaptive");
            in_range(&format!("{at}.min"), a.min.into(), 1, max)?;
            in_range(&format!("{at}.max"), a.max.into(), a.min.into(), max)?;
            in_range(
                &format!("{at}.initial"),
                a.initial.into(),
                a.min.into(),
                a.max.into(),
            )?;
            in_range(&format!("{at}.window_ms"), a.window_ms, 100, MAX_WINDOW_MS)?;
            if !(a.tolerance.is_finite() && a.tolerance > 1.0 && a.tolerance <= 100.0) {
                return Err(invalid(
                    format!("{at}.tolerance"),
                    a.tolerance,
                    "more than 1 and at most 100",
                ));
            }
            in_range(
                &format!("{at}.cooldown_ms"),
                a.cooldown_ms,
                0,
                MAX_WINDOW_MS,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::server::policy::Policy;

    fn refused(entry: &str) -> String {
        let toml =
            format!("[[methods]]\nnames = [\"a.S/*\"]\n[[methods]]\nnames = [\"*\"]\n{entry}");
        Policy::from_toml(&toml).unwrap_err().to_string()
    }

    #[test]
    fn invalid_limits_are_refused_naming_the_field() {
        for (entry, message) in [
            (
                "rate_limit = { per_second = -1, burst = 10 }",
                "policy field `methods[1].rate_limit.per_second` is -1: expected more than 0 \
                 and at most 1000000000 calls per second",
            ),
            (
                "rate_limit = { per_second = 0, burst = 10 }",
                "policy field `methods[1].rate_limit.per_second` is 0: expected more than 0 \
                 and at most 1000000000 calls per second",
            ),
            (
                "rate_limit = { per_second = 10, burst = 0 }",
                "policy field `methods[1].rate_limit.burst` is 0: expected 1 to 1000000000",
            ),
            (
                "rate_limit = { per_second = 10, burst = 1, key = \"X-Caller\" }",
                "policy field `methods[1].rate_limit.key` is `X-Caller`: expected a metadata \
                 key: a lower-case HTTP header name, not `grpc-` or `:` reserved",
            ),
            (
                "rate_limit = { per_second = 10, burst = 1, key = \"x\", max_keys = 0 }",
                "policy field `methods[1].rate_limit.max_keys` is 0: expected 1 to 1000000",
            ),
            (
                "concurrency = { fixed = 0 }",
                "policy field `methods[1].concurrency.fixed` is 0: expected 1 to 1000000",
            ),
            (
                "concurrency = { adaptive = { min = 0 } }",
                "policy field `methods[1].concurrency.adaptive.min` is 0: expected 1 to 1000000",
            ),
            (
                "concurrency = { adaptive = { min = 10, max = 5, initial = 5 } }",
                "policy field `methods[1].concurrency.adaptive.max` is 5: expected 10 to 1000000",
            ),
            (
                "concurrency = { adaptive = { initial = 2000 } }",
                "policy field `methods[1].concurrency.adaptive.initial` is 2000: expected 4 to 1000",
            ),
            (
                "concurrency = { adaptive = { window_ms = 0 } }",
                "policy field `methods[1].concurrency.adaptive.window_ms` is 0: expected 100 to 600000",
            ),
            (
                "concurrency = { adaptive = { tolerance = 1.0 } }",
                "policy field `methods[1].concurrency.adaptive.tolerance` is 1: expected more \
                 than 1 and at most 100",
            ),
        ] {
            assert_eq!(refused(entry), message, "{entry}");
        }
        assert!(refused("concurrency = { both = 1 }").contains("unknown variant `both`"));
    }

    #[test]
    fn limits_survive_json_and_toml() {
        let policy = Policy::from_toml(
            r#"
            [[methods]]
            names = ["a.S/*"]
            rate_limit = { per_second = 2.5, burst = 5, key = "x-caller" }
            concurrency = { adaptive = { max = 64 } }
            "#,
        )
        .unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(Policy::from_json(&json).unwrap(), policy);
        let entry = &policy.methods[0];
        assert_eq!(entry.rate_limit.as_ref().map(|r| r.max_keys), Some(10_000));
        let Some(super::Concurrency::Adaptive(adaptive)) = &entry.concurrency else {
            panic!("adaptive: {entry:?}");
        };
        assert_eq!(adaptive.max, 64);
        assert_eq!(adaptive.min, super::Adaptive::default().min);
    }
}
