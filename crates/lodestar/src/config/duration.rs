//! Durations as people write them: `500ms`, `2s`, `1m30s`, `1h`.
//!
//! One grammar for `lodestar.toml`, environment variables and every
//! command-line flag: one or more `<integer><unit>` parts, where the unit is
//! `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h` or `d`. A bare `0` is zero.
//! Fractions (`1.5s`) are refused: write `1500ms`.

use std::fmt;
use std::time::Duration;

/// The longest duration accepted: 100 years, far beyond any timeout or lease,
/// and small enough that adding it to an `Instant` cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The longest text [`parse_duration`] reads (longer is refused unread).
const MAX_TEXT: usize = 64;

/// A duration that could not be read: the text and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: {} (expected e.g. 500ms, 2s, 1m30s, 1h)",
            self.text, self.reason
        )
    }
}

impl std::error::Error for DurationError {}

impl DurationError {
    /// Why the text is not a duration (`unknown unit (expected ...)`).
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Reads a duration such as `500ms`, `2s`, `1m30s` or `1h`.
///
/// ```
/// use std::time::Duration;
/// use lodestar::config::parse_duration;
///
/// assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
/// assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert!(parse_duration("1.5s").is_err());
/// assert!(parse_duration("10").is_err()); // a unit is required
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let error = |reason| DurationError {
        text: text.chars().take(MAX_TEXT).collect(),
        reason,
    };
    if text.len() > MAX_TEXT {
        return Err(error("too long"));
    }
    let trimmed = text.trim();
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    if trimmed.is_empty() {
        return Err(error("empty"));
    }
    let mut rest = trimmed;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(error("each part must start with a whole number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| error("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ns" => Some(Duration::from_nanos(number)),
            "us" | "µs" => Some(Duration::from_micros(number)),
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            "" => return Err(error("missing unit (ns, us, ms, s, m, h or d)")),
            _ => return Err(error("unknown unit (expected ns, us, ms, s, m, h or d)")),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MAX_DURATION)
            .ok_or_else(|| error("longer than 100 years"))?;
    }
    Ok(total)
}

/// Writes a duration in the grammar [`parse_duration`] reads, in its
/// largest exact units: `1m30s`, `250ms`, `0`.
///
/// ```
/// use std::time::Duration;
/// use lodestar::config::format_duration;
///
/// assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
/// assert_eq!(format_duration(Duration::ZERO), "0");
/// ```
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0".to_owned();
    }
    let mut out = String::new();
    let mut nanos = duration.as_nanos();
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    for (unit, size) in UNITS {
        if nanos >= size {
            out.push_str(&format!("{}{unit}", nanos / size));
            nanos %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_every_unit_and_compound_forms() {
        for (text, want) in [
            ("0", Duration::ZERO),
            ("1ns", Duration::from_nanos(1)),
            ("7us", Duration::from_micros(7)),
            ("7µs", Duration::from_micros(7)),
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86_400)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            (" 3s ", Duration::from_secs(3)),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
            assert_eq!(parse_duration(&format_duration(want)).unwrap(), want);
        }
    }

    #[test]
    fn refuses_nonsense_with_the_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("10", "missing unit"),
            ("1.5s", "unknown unit"),
            ("-1s", "whole number"),
            ("5 parsecs", "unknown unit"),
            ("s", "whole number"),
            ("99999999999999999999s", "too large"),
            ("36501d", "100 years"),
            (
                "1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s",
                "too long",
            ),
        ] {
            let error = parse_duration(text).unwrap_err().to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }
}
