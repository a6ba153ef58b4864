//! Settings as text: the grammar of durations shared by `lodestar.toml`,
//! environment variables and the `lodestar` command's flags.

mod duration;

pub use duration::{DurationError, MAX_DURATION, format_duration, parse_duration};
