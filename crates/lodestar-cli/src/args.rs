//! Flag types shared by the commands, parsed at the clap boundary.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration flag: `500ms`, `2s`, `1m30s` (lodestar's one grammar, see
/// [`lodestar::config::parse_duration`]); shown in `--help` the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span(pub(crate) Duration);

impl FromStr for Span {
    type Err = lodestar::config::DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        lodestar::config::parse_duration(text).map(Span)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&lodestar::config::format_duration(self.0))
    }
}

/// A `NAME=VALUE` flag (a message header): the name is lowercased, and
/// both are checked against the broker's bounds at the clap boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NameValue {
    pub(crate) name: String,
    pub(crate) value: String,
}

impl FromStr for NameValue {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, value) = text
            .split_once('=')
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| "expected NAME=VALUE, e.g. content-type=application/json".to_owned())?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "header name {name:?}: expected letters, digits, `-`, `_` and `.`"
            ));
        }
        if value.len() > lodestar::broker::MAX_HEADER_VALUE {
            return Err(format!(
                "header {name}: the value has {} bytes; at most {}",
                value.len(),
                lodestar::broker::MAX_HEADER_VALUE
            ));
        }
        Ok(Self {
            name: name.to_ascii_lowercase(),
            value: value.to_owned(),
        })
    }
}

/// A URL flag whose scheme must be one of a command's: checked when the
/// flags are parsed, so a typo is a usage error (exit 2) before anything
/// connects. The rest is checked by the registry or broker that opens it.
fn url_with_scheme(text: &str, schemes: &[&str]) -> Result<String, String> {
    let scheme = text.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some(scheme) if schemes.contains(&scheme) => Ok(text.to_owned()),
        _ => Err(format!(
            "expected a URL starting with {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Parses a registry URL flag (`memory://`, `lodestar://`, `lodestars://`, `etcd://`).
pub(crate) fn registry_url(text: &str) -> Result<String, String> {
    url_with_scheme(text, &["memory", "lodestar", "lodestars", "etcd"])
}

/// Parses a broker URL flag (`memory://`, `http://`, `nats://`).
pub(crate) fn broker_url(text: &str) -> Result<String, String> {
    url_with_scheme(text, &["memory", "http", "nats"])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_are_checked_when_parsed() {
        assert_eq!("2s".parse::<Span>().unwrap().to_string(), "2s");
        assert!("2".parse::<Span>().is_err());
        let header: NameValue = "Content-Type=a=b".parse().unwrap();
        assert_eq!(
            (header.name.as_str(), header.value.as_str()),
            ("content-type", "a=b")
        );
        assert!("=x".parse::<NameValue>().is_err());
        assert!("a b=x".parse::<NameValue>().is_err());
        assert!(registry_url("lodestar://h:1").is_ok());
        assert!(
            registry_url("lodestr://h:1")
                .unwrap_err()
                .contains("lodestar://")
        );
        assert!(broker_url("127.0.0.1:4222").is_err());
    }
}
