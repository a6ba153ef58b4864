//! The `grpc-timeout` header: at most eight digits and a unit.

use std::time::Duration;

use http::HeaderValue;

pub(crate) const HEADER: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` value such as `250m` or `3S`.
pub(crate) fn parse(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `d` in the finest unit that fits in eight digits, rounding down so
/// that the peer never waits longer than we do.
pub(crate) fn encode(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (value, unit) = units
        .iter()
        .find(|(per, _)| nanos / per <= MAX)
        .map(|(per, unit)| (nanos / per, *unit))
        .unwrap_or((MAX, 'H'));
    let text = format!("{value}{unit}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("0n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_down() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(250),
            Duration::from_secs(3),
            Duration::from_secs(86_400 * 365),
        ] {
            let parsed = parse(&encode(d)).unwrap();
            assert!(parsed <= d, "{d:?} -> {parsed:?}");
            assert!(
                d - parsed <= d / 1_000_000 + Duration::from_nanos(1),
                "{d:?} -> {parsed:?}"
            );
        }
        assert_eq!(encode(Duration::from_millis(250)), "250000u");
        assert_eq!(encode(Duration::from_millis(50)), "50000000n");
        assert_eq!(encode(Duration::from_secs(100)), "100000m");
        assert_eq!(encode(Duration::from_micros(99_999_999)), "99999999u");
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in ["", "m", "1", "123456789S", "12x", "-1S", "1.5S", "１S"] {
            assert_eq!(parse(&HeaderValue::from_str(bad).unwrap()), None, "{bad}");
        }
        assert_eq!(
            parse(&HeaderValue::from_static("2H")),
            Some(Duration::from_secs(7200))
        );
    }
}
