//! What every policy that is data shares (the client's
//! [`Policy`](crate::client::policy::Policy) and the server's
//! [`Policy`](crate::server::policy::Policy)): reading it from TOML, JSON or
//! a file, the error that names the field, value and expectation, the
//! range checks, and gRPC codes by name.

use std::fmt;
use std::path::{Path, PathBuf};

use lodestar_core::registry::limits::quoted;
use serde::de::DeserializeOwned;

/// The largest policy file a policy's `from_file` reads: 1 MiB (a policy
/// with every list at its limit is far smaller).
pub const MAX_POLICY_FILE: u64 = 1024 * 1024;

/// The readers of a policy type (`from_toml`, `from_json`, `from_file`),
/// each validating what it read with the type's `validate`: written once
/// for the client's and the server's policies, inside their `impl`.
macro_rules! readers {
    () => {
        /// Reads a policy from TOML and [validates](Self::validate) it.
        /// Fields left out keep their defaults (see the [module docs](self)).
        pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
            crate::policy_data::from_toml(text).and_then(Self::validated)
        }

        /// Reads a policy from JSON and [validates](Self::validate) it.
        /// Fields left out keep their defaults.
        pub fn from_json(text: &str) -> Result<Self, PolicyError> {
            crate::policy_data::from_json(text).and_then(Self::validated)
        }

        /// Reads a policy file: TOML if its name ends in `.toml`, JSON if
        /// in `.json`; at most [`MAX_POLICY_FILE`](crate::policy_data::MAX_POLICY_FILE)
        /// bytes. Blocks while reading (call it from a blocking context,
        /// or at startup).
        pub fn from_file(path: &std::path::Path) -> Result<Self, PolicyError> {
            crate::policy_data::from_file(path, Self::from_toml, Self::from_json)
        }

        fn validated(self) -> Result<Self, PolicyError> {
            self.validate()?;
            Ok(self)
        }
    };
}
pub(crate) use readers;

/// Parses a policy from TOML (not yet validated).
pub(crate) fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, PolicyError> {
    toml::Deserializer::parse(text)
        .map_err(|e| toml_error(text, String::new(), &e))
        .and_then(|de| {
            serde_path_to_error::deserialize(de)
                .map_err(|e| toml_error(text, e.path().to_string(), e.inner()))
        })
}

/// Parses a policy from JSON (not yet validated).
pub(crate) fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, PolicyError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; the position is
        // given separately.
        let message = inner.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        PolicyError::Parse {
            format: "JSON",
            field,
            line: inner.line(),
            column: inner.column(),
            message: message.to_owned(),
        }
    })?;
    de.end().map_err(|e| PolicyError::Parse {
        format: "JSON",
        field: String::new(),
        line: e.line(),
        column: e.column(),
        message: "trailing characters after the policy".to_owned(),
    })?;
    Ok(parsed)
}

/// Reads a policy file with `toml` if its name ends in `.toml`, `json` if
/// in `.json`; at most [`MAX_POLICY_FILE`] bytes.
pub(crate) fn from_file<T>(
    path: &Path,
    toml: fn(&str) -> Result<T, PolicyError>,
    json: fn(&str) -> Result<T, PolicyError>,
) -> Result<T, PolicyError> {
    let file_error = |reason: String| PolicyError::File {
        path: path.to_owned(),
        reason,
    };
    let parse = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml,
        Some("json") => json,
        _ => {
            return Err(file_error(
                "expected a name ending in `.toml` or `.json`".to_owned(),
            ));
        }
    };
    let text =
        crate::io::read_bounded(path, MAX_POLICY_FILE, "a policy file").map_err(file_error)?;
    parse(&text).map_err(|error| PolicyError::InFile {
        path: path.to_owned(),
        error: Box::new(error),
    })
}

/// Checks that `value` is within `min..=max`.
pub(crate) fn in_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), PolicyError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let expected = match (min, max) {
        (0, max) => format!("at most {max}"),
        (min, u64::MAX) => format!("at least {min}"),
        (min, max) => format!("{min} to {max}"),
    };
    Err(invalid(field, value, expected))
}

/// Checks that a list of `len` `what` has at most `max`.
pub(crate) fn at_most(field: &str, len: usize, max: usize, what: &str) -> Result<(), PolicyError> {
    if len > max {
        return Err(invalid(
            field,
            format!("{len} {what}"),
            format!("at most {max}"),
        ));
    }
    Ok(())
}

/// The code `name` names, other than `OK` (a code a call may fail with).
pub(crate) fn failure_code(field: &str, name: &str) -> Result<tonic::Code, PolicyError> {
    let quoted = lodestar_core::registry::limits::quoted;
    match code_from_name(name) {
        Some(tonic::Code::Ok) => Err(invalid(field, quoted(name), "a code other than `OK`")),
        Some(code) => Ok(code),
        None => Err(invalid(
            field,
            quoted(name),
            "a gRPC code name such as `UNAVAILABLE` (upper case)",
        )),
    }
}

/// A list of failure codes: each a code other than `OK`, listed once;
/// named `field[i]`.
pub(crate) fn validate_codes(field: &str, codes: &[String]) -> Result<(), PolicyError> {
    for (i, name) in codes.iter().enumerate() {
        let at = format!("{field}[{i}]");
        failure_code(&at, name)?;
        if codes[..i].contains(name) {
            return Err(invalid(
                at,
                lodestar_core::registry::limits::quoted(name),
                "each code once",
            ));
        }
    }
    Ok(())
}

/// A field's value refused: `expected` says what would do.
pub(crate) fn invalid(
    field: impl Into<String>,
    value: impl fmt::Display,
    expected: impl Into<String>,
) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// A TOML error, with the field path, and the position where the parser
/// knows it.
fn toml_error(text: &str, field: String, error: &toml::de::Error) -> PolicyError {
    let (line, column) = error.span().map_or((0, 0), |span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
        (line, column)
    });
    PolicyError::Parse {
        format: "TOML",
        field,
        line,
        column,
        message: error.message().trim_end().to_owned(),
    }
}

/// Why a policy was refused. The old policy, if any, stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A field's value is out of range or malformed.
    #[error("policy field `{field}` is {value}: expected {expected}")]
    Invalid {
        /// The field, as a path: `split.subsets[1].weight`.
        field: String,
        /// Its value (strings quoted, shortened and escaped).
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The text is not a policy: not TOML (or JSON), a field of the wrong
    /// type, an unknown field or an unknown kind.
    #[error("{}", parse_message(format, field, *line, *column, message))]
    Parse {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// The field, as a path (`strategy`, `split.subsets[0].weight`);
        /// empty when the document itself is malformed.
        field: String,
        /// The line, from 1; 0 when not known.
        line: usize,
        /// The column, from 1; 0 when not known.
        column: usize,
        /// What the parser said, which names the value and what was
        /// expected.
        message: String,
    },
    /// A policy file could not be read.
    #[error("policy file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A policy file was read, but its policy was refused.
    #[error("policy file {}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// Why its policy was refused.
        #[source]
        error: Box<PolicyError>,
    },
}

fn parse_message(format: &str, field: &str, line: usize, column: usize, message: &str) -> String {
    let field = if field.is_empty() || field == "." {
        String::new()
    } else {
        format!(" field `{field}`")
    };
    let at = if line > 0 {
        format!(" (line {line}, column {column})")
    } else {
        String::new()
    };
    format!("{format} policy{field}{at}: {message}")
}

/// Every gRPC code, in the order of its number.
pub(crate) const CODES: [tonic::Code; 17] = [
    tonic::Code::Ok,
    tonic::Code::Cancelled,
    tonic::Code::Unknown,
    tonic::Code::InvalidArgument,
    tonic::Code::DeadlineExceeded,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::PermissionDenied,
    tonic::Code::ResourceExhausted,
    tonic::Code::FailedPrecondition,
    tonic::Code::Aborted,
    tonic::Code::OutOfRange,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
    tonic::Code::Unauthenticated,
];

/// The name the gRPC specification gives `code` (`UNAVAILABLE`,
/// `DEADLINE_EXCEEDED`), as policies name it.
///
/// ```
/// use lodestar::client::policy::code_name;
/// assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
/// ```
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC code a policy names, e.g. `UNAVAILABLE` (as the gRPC
/// specification spells them: upper case, words joined by `_`).
///
/// ```
/// use lodestar::client::policy::code_from_name;
/// assert_eq!(code_from_name("DEADLINE_EXCEEDED"), Some(tonic::Code::DeadlineExceeded));
/// assert_eq!(code_from_name("unavailable"), None);
/// ```
pub fn code_from_name(name: &str) -> Option<tonic::Code> {
    CODES.into_iter().find(|&code| code_name(code) == name)
}

/// How a policy names its methods, for [`validate_method_names`].
pub(crate) struct MethodNames<'a> {
    /// The most `methods` entries, and names in one entry.
    pub(crate) max_entries: usize,
    pub(crate) max_names: usize,
    /// Whether a name is one this policy understands.
    pub(crate) well_formed: fn(&str) -> bool,
    /// What a name must look like, and what an entry without one needs,
    /// for the errors.
    pub(crate) expected: &'a str,
    pub(crate) empty: &'a str,
}

/// Checks the names of a policy's `methods` entries (`names` gives each
/// entry's): at most `max_entries` entries, each with one to `max_names`
/// names, each well formed, and none listed by two entries (or twice).
pub(crate) fn validate_method_names<'e>(
    entries: impl ExactSizeIterator<Item = &'e [String]>,
    rules: &MethodNames<'_>,
) -> Result<(), PolicyError> {
    at_most("methods", entries.len(), rules.max_entries, "entries")?;
    let mut seen = std::collections::HashSet::new();
    for (i, names) in entries.enumerate() {
        let at = format!("methods[{i}].names");
        if names.is_empty() {
            return Err(invalid(&at, "[]", rules.empty));
        }
        at_most(&at, names.len(), rules.max_names, "names")?;
        for (j, name) in names.iter().enumerate() {
            let field = format!("{at}[{j}]");
            if !(rules.well_formed)(name) {
                return Err(invalid(&field, quoted(name), rules.expected));
            }
            if !seen.insert(name.as_str()) {
                return Err(invalid(
                    &field,
                    quoted(name),
                    "a name no earlier entry lists",
                ));
            }
        }
    }
    Ok(())
}
