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
