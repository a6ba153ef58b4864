//! `lodestar call`, `lodestar list`, `lodestar health`: services called from a shell.
//!
//! A call needs no `.proto` on the caller's side. The target (a service name
//! found through the registry, or an address) is asked for its schema
//! through gRPC server reflection (`grpc.reflection.v1`, else `v1alpha`),
//! which every lodestar service serves. The files it returns, every file
//! they import (asked for by name when the server did not send it) and the
//! well-known types make one descriptor pool; with it, JSON typed by the
//! user becomes protobuf on the way out, and each protobuf reply becomes
//! JSON on the way back, printed as it arrives.
//!
//! One concept per file:
//!
//! * [`target`]: what TARGET names, TLS, and the connection (a lodestar
//!   client pinned to the one instance chosen);
//! * [`reflection`]: the reflection client and the descriptor pool;
//! * [`method`]: which method METHOD names, with the closest candidates when
//!   it names none or several;
//! * [`json_io`]: JSON values in (streamed, bounded, with positions in
//!   errors) and out (pretty, or one per line);
//! * [`codec`]: the gRPC codec of dynamic messages;
//! * [`status`]: statuses as JSON, and the exit-code table;
//! * [`call`], [`list`], [`health`]: the commands.

pub(crate) mod call;
pub(crate) mod codec;
pub(crate) mod health;
pub(crate) mod json_io;
pub(crate) mod list;
pub(crate) mod method;
pub(crate) mod reflection;
pub(crate) mod status;
pub(crate) mod target;

use std::fmt;

/// What went wrong on this side of a call (the server's statuses are
/// [`status::RpcFailure`]). Each exits 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Which step failed.
    pub(crate) kind: FailureKind,
    /// What was wrong, and what was expected.
    pub(crate) message: String,
}

/// The step a [`Failure`] happened in; its name is the `error` field of
/// the JSON printed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// TARGET names nothing reachable: no such service, no such instance,
    /// not an address, TLS files that cannot be read.
    Target,
    /// The connection failed or timed out.
    Transport,
    /// Server reflection failed, or its descriptors do not make a schema.
    Reflection,
    /// METHOD names no method, or several.
    Method,
    /// The input is not JSON, or not JSON of the request's type.
    Input,
    /// A reply could not be written as JSON, or stdout went away.
    Output,
}

impl FailureKind {
    /// The name printed in the error's JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            FailureKind::Target => "target",
            FailureKind::Transport => "transport",
            FailureKind::Reflection => "reflection",
            FailureKind::Method => "method",
            FailureKind::Input => "input",
            FailureKind::Output => "output",
        }
    }
}

impl Failure {
    /// A failure of `kind`.
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The one JSON object printed on stderr for it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.kind.name(), "message": self.message })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Reports `what` on stderr if it takes more than a second (see
/// [`crate::progress`]), on a terminal only: piped, stderr is for the one
/// JSON object a failed `call` prints.
pub(crate) fn waiting(what: impl Into<String>) -> Option<crate::progress::Progress> {
    std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| crate::progress::waiting(what))
}

/// The client's own error behind a status, if the status came from this
/// side's connection (the target could not be reached, or the connection
/// failed) rather than from a server.
fn transport_error(status: &tonic::Status) -> Option<&lodestar::client::Error> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(error) = error.downcast_ref::<lodestar::client::Error>() {
            return Some(error);
        }
        source = error.source();
    }
    None
}

/// Whether a status came from this side's connection rather than from a server.
pub(crate) fn is_transport(status: &tonic::Status) -> bool {
    transport_error(status).is_some()
}

/// A status as a local [`Failure`] of `kind`, unless the connection failed
/// (then it is a [`FailureKind::Transport`] one).
pub(crate) fn status_failure(kind: FailureKind, what: &str, status: &tonic::Status) -> Failure {
    if let Some(error) = transport_error(status) {
        // The client's own words name its internal service; say what matters.
        let message = match error {
            lodestar::client::Error::Unreachable {
                address, reason, ..
            } if reason.contains(address.as_str()) => format!("{what}: {reason}"),
            lodestar::client::Error::Unreachable {
                address, reason, ..
            } => format!("{what}: cannot connect to {address}: {reason}"),
            other => format!("{what}: {other}"),
        };
        return Failure::new(FailureKind::Transport, message);
    }
    Failure::new(
        kind,
        format!(
            "{what}: {} ({})",
            lodestar::registry::limits::printable(status.message()),
            status::code_name(status.code())
        ),
    )
}

/// The Levenshtein distance between `a` and `b` (by characters), to list
/// the closest names first when one is not found.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `names` ordered closest to `wanted` first (ties by name), at most `max`.
/// A dotted name (`pkg.Service`) is as close as its last part is.
pub(crate) fn closest<'a>(
    wanted: &str,
    names: impl IntoIterator<Item = &'a str>,
    max: usize,
) -> Vec<&'a str> {
    let wanted = wanted.to_lowercase();
    let mut scored: Vec<(usize, &str)> = names
        .into_iter()
        .map(|name| {
            let lower = name.to_lowercase();
            let last = lower.rsplit('.').next().unwrap_or(&lower);
            (distance(&wanted, &lower).min(distance(&wanted, last)), name)
        })
        .collect();
    scored.sort();
    scored.dedup();
    scored.into_iter().take(max).map(|(_, name)| name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("", ""), 0);
        assert_eq!(distance("GetFeature", "GetFeature"), 0);
        assert_eq!(distance("GetFeatur", "GetFeature"), 1);
        assert_eq!(distance("GetFaeture", "GetFeature"), 2);
        assert_eq!(distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_orders_by_distance_then_name() {
        let names = ["route-guide", "greeter", "route-guides", "orders"];
        assert_eq!(
            closest("route-gide", names, 2),
            ["route-guide", "route-guides"]
        );
        let services = ["a.Echo", "routeguide.RouteGuide", "b.Echo"];
        assert_eq!(closest("RouteGuid", services, 1), ["routeguide.RouteGuide"]);
    }
}
