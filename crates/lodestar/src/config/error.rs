//! Why a configuration was refused: [`ConfigError`], which names the key,
//! where it was set (file, line and column, or environment variable), the
//! value, and what was expected.

use std::fmt;
use std::path::PathBuf;

use crate::policy_data::PolicyError;

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// A place in a TOML document.
    File {
        /// The file; `None` for text given directly ([`Config::from_toml`](super::Config::from_toml)).
        path: Option<PathBuf>,
        /// The line, from 1.
        line: usize,
        /// The column, from 1 (in characters).
        column: usize,
    },
    /// An environment variable.
    Env {
        /// Its name.
        variable: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path: Some(path),
                line,
                column,
            } => write!(f, "{}:{line}:{column}", path.display()),
            Origin::File {
                path: None,
                line,
                column,
            } => write!(f, "line {line}, column {column}"),
            Origin::Env { variable } => write!(f, "environment variable {variable}"),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text is not TOML.
    #[error("{origin}: not valid TOML: {message}")]
    Syntax {
        /// Where the parser stopped.
        origin: Origin,
        /// What it said.
        message: String,
    },
    /// A key `lodestar.toml` does not have.
    #[error("unknown key `{key}` at {origin}{}", suggestion.map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        /// The key, as a dotted path.
        key: String,
        /// Where it is.
        origin: Origin,
        /// The known key (or section) closest to it, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A value that is not what its key takes.
    #[error("{}: expected {expected}", invalid_subject(key, value, origin.as_ref()))]
    Invalid {
        /// The key, as a dotted path.
        key: String,
        /// The value, as written (strings quoted).
        value: String,
        /// What was expected.
        expected: String,
        /// Where it was set; `None` for a setting made in code.
        origin: Option<Origin>,
    },
    /// A policy table (`client.policy`, `service.policy`) refused by the
    /// policy's own rules.
    #[error("key `{key}`{}: {error}", origin.as_ref().map(|o| format!(" at {o}")).unwrap_or_default())]
    Policy {
        /// `client.policy` or `service.policy`.
        key: &'static str,
        /// Where the table starts.
        origin: Option<Origin>,
        /// Why the policy was refused; it names the policy's field.
        #[source]
        error: Box<PolicyError>,
    },
    /// The file could not be read.
    #[error("configuration file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl ConfigError {
    /// The key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Policy { key, .. } => Some(key),
            ConfigError::Syntax { .. } | ConfigError::File { .. } => None,
        }
    }

    /// A value of `key` refused, set in code or by the defaults.
    pub(crate) fn invalid(
        key: impl Into<String>,
        value: impl fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
            origin: None,
        }
    }
}

fn invalid_subject(key: &str, value: &str, origin: Option<&Origin>) -> String {
    match origin {
        Some(Origin::Env { variable }) => format!("{variable} (key `{key}`) is {value}"),
        Some(origin) => format!("key `{key}` at {origin} is {value}"),
        None => format!("key `{key}` is {value}"),
    }
}
