//! The one table of keys: every key of `lodestar.toml`, with its type, its
//! default, its environment variables and its meaning. Loading checks files
//! and variables against it, `lodestar config defaults` and
//! `docs/configuration.md` are generated from it, and tests check it against
//! [`Config`](super::Config) itself, so the three cannot drift apart.

use std::fmt::Write as _;

use super::parse_duration;

/// The longest string value a key takes (names are shorter still).
pub const MAX_TEXT: usize = 4096;
/// The most entries a table of labels (`service.metadata`, ...) may have.
pub const MAX_LABELS: usize = 64;

/// What a key's value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A string of at most `max` bytes.
    Text {
        /// The most bytes.
        max: usize,
    },
    /// `tracing` filter directives, as `RUST_LOG` takes them.
    LogFilter,
    /// A duration in the shared grammar (`"500ms"`, `"2s"`, `"1m"`).
    Duration,
    /// A duration, or the word given for none.
    DurationOr(&'static str),
    /// A socket address, `ip:port`.
    Address,
    /// A socket address, or the word given for none.
    AddressOr(&'static str),
    /// A whole number from `min` to `max`.
    Integer {
        /// The smallest.
        min: u64,
        /// The largest.
        max: u64,
    },
    /// `true` or `false`.
    Bool,
    /// A number from 0.0 to 1.0.
    Ratio,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A URL with one of these schemes (checked in full when opened).
    Url(&'static [&'static str]),
    /// A file path; empty for none.
    Path,
    /// A table of string labels (at most [`MAX_LABELS`]); in the
    /// environment, `key=value,key=value` with values percent-encoded.
    Labels,
    /// A policy table, read by the policy's own type (its fields are
    /// documented there); not settable from the environment.
    Policy,
}

/// One key of `lodestar.toml`.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Key {
    /// Its dotted path: `service.bind`.
    pub path: &'static str,
    /// What its value must be.
    pub kind: Kind,
    /// Its default, as a TOML value.
    pub default: &'static str,
    /// Older or standard variables that also set it, weaker than
    /// [`env`](Self::env), in order.
    pub aliases: &'static [&'static str],
    /// What it means.
    pub doc: &'static str,
}

impl Key {
    /// The environment variable that sets it: `LODESTAR_` and the path in
    /// upper case with `.` as `_` (`service.bind`:
    /// `LODESTAR_SERVICE_BIND`). `None` for policy tables.
    pub fn env(&self) -> Option<String> {
        if self.kind == Kind::Policy {
            return None;
        }
        Some(format!(
            "LODESTAR_{}",
            self.path.to_ascii_uppercase().replace('.', "_")
        ))
    }

    /// The section it is written in (`service.limits`), and its own name
    /// (`max_connections`).
    pub fn split(&self) -> (&'static str, &'static str) {
        self.path.rsplit_once('.').unwrap_or(("", self.path))
    }

    /// Whether the key is a table of its own (labels, policies).
    pub fn is_table(&self) -> bool {
        matches!(self.kind, Kind::Labels | Kind::Policy)
    }
}

impl Kind {
    /// What the value must be, for errors and the reference.
    pub fn expected(&self) -> String {
        match *self {
            Kind::Text { max } => format!("a string of at most {max} bytes"),
            Kind::LogFilter => "filter directives such as \"info,lodestar=debug\"".to_owned(),
            Kind::Duration => "a duration such as \"500ms\", \"2s\", \"1m\"".to_owned(),
            Kind::DurationOr(none) => {
                format!("a duration such as \"500ms\", \"2s\", \"1m\", or \"{none}\"")
            }
            Kind::Address => "an address such as \"127.0.0.1:50051\" (ip:port)".to_owned(),
            Kind::AddressOr(none) => {
                format!("an address such as \"127.0.0.1:9464\" (ip:port), or \"{none}\"")
            }
            Kind::Integer { min, max } => format!("a whole number from {min} to {max}"),
            Kind::Bool => "true or false".to_owned(),
            Kind::Ratio => "a number from 0.0 to 1.0".to_owned(),
            Kind::Choice(words) => format!("one of {}", quoted_list(words)),
            Kind::Url(schemes) => {
                let schemes: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
                format!("a URL starting with {}", schemes.join(", "))
            }
            Kind::Path => "a file path (a string; empty for none)".to_owned(),
            Kind::Labels => format!("a table of at most {MAX_LABELS} string values"),
            Kind::Policy => "a policy table".to_owned(),
        }
    }

    /// Its type, in a word or two, for the reference.
    pub fn type_name(&self) -> String {
        match *self {
            Kind::Text { .. } => "string".to_owned(),
            Kind::LogFilter => "log filter".to_owned(),
            Kind::Duration => "duration".to_owned(),
            Kind::DurationOr(none) => format!("duration or \"{none}\""),
            Kind::Address => "address".to_owned(),
            Kind::AddressOr(none) => format!("address or \"{none}\""),
            Kind::Integer { min, max } => format!("integer ({min} to {max})"),
            Kind::Bool => "boolean".to_owned(),
            Kind::Ratio => "float (0.0 to 1.0)".to_owned(),
            Kind::Choice(words) => words.join(" \\| "),
            Kind::Url(_) => "URL".to_owned(),
            Kind::Path => "path".to_owned(),
            Kind::Labels => "table of strings".to_owned(),
            Kind::Policy => "policy table".to_owned(),
        }
    }

    /// Checks a value; the error says what was wrong with it.
    pub(crate) fn check(&self, value: &toml::Value) -> Result<(), String> {
        let fail = |why: Option<String>| {
            let expected = self.expected();
            Err(match why {
                Some(why) => format!("{expected} ({why})"),
                None => expected,
            })
        };
        match (*self, value) {
            (Kind::Text { max }, toml::Value::String(s)) => {
                if s.len() > max {
                    return fail(Some(format!("{} bytes", s.len())));
                }
            }
            (Kind::Path, toml::Value::String(s)) => {
                if s.len() > MAX_TEXT {
                    return fail(Some(format!("{} bytes", s.len())));
                }
            }
            (Kind::LogFilter, toml::Value::String(s)) => {
                if s.len() > MAX_TEXT {
                    return fail(Some(format!("{} bytes", s.len())));
                }
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(s) {
                    return fail(Some(e.to_string()));
                }
            }
            (Kind::Duration, toml::Value::String(s)) => {
                if let Err(e) = parse_duration(s) {
                    return fail(Some(e.reason().to_owned()));
                }
            }
            (Kind::DurationOr(none), toml::Value::String(s)) => {
                if s.trim() != none
                    && let Err(e) = parse_duration(s)
                {
                    return fail(Some(e.reason().to_owned()));
                }
            }
            (Kind::Address, toml::Value::String(s)) => {
                if s.trim().parse::<std::net::SocketAddr>().is_err() {
                    return fail(None);
                }
            }
            (Kind::AddressOr(none), toml::Value::String(s)) => {
                if s.trim() != none && s.trim().parse::<std::net::SocketAddr>().is_err() {
                    return fail(None);
                }
            }
            (Kind::Integer { min, max }, toml::Value::Integer(n)) => {
                if !u64::try_from(*n).is_ok_and(|n| (min..=max).contains(&n)) {
                    return fail(None);
                }
            }
            (Kind::Bool, toml::Value::Boolean(_)) => {}
            (Kind::Ratio, toml::Value::Float(f)) => {
                if !(0.0..=1.0).contains(f) {
                    return fail(None);
                }
            }
            // A whole number where a ratio is expected: 0 or 1.
            (Kind::Ratio, toml::Value::Integer(n)) => {
                if !(0..=1).contains(n) {
                    return fail(None);
                }
            }
            (Kind::Choice(words), toml::Value::String(s)) => {
                if !words.contains(&s.as_str()) {
                    return fail(None);
                }
            }
            (Kind::Url(schemes), toml::Value::String(s)) => {
                if s.len() > MAX_TEXT {
                    return fail(Some(format!("{} bytes", s.len())));
                }
                let scheme = s.split_once("://").map(|(scheme, _)| scheme);
                if !scheme.is_some_and(|scheme| schemes.contains(&scheme)) {
                    return fail(None);
                }
            }
            (Kind::Labels, toml::Value::Table(table)) => {
                if table.len() > MAX_LABELS {
                    return fail(Some(format!("{} entries", table.len())));
                }
                for (key, value) in table {
                    match value {
                        toml::Value::String(s) if s.len() <= MAX_TEXT && key.len() <= MAX_TEXT => {}
                        toml::Value::String(_) => {
                            return fail(Some(format!("`{key}` is too long")));
                        }
                        other => {
                            return fail(Some(format!("`{key}` is {}", other.type_str())));
                        }
                    }
                }
            }
            // Checked by the policy's own type.
            (Kind::Policy, toml::Value::Table(_)) => {}
            (_, other) => return fail(Some(format!("found {}", other.type_str()))),
        }
        Ok(())
    }

    /// The value a variable's text stands for; the error says what was
    /// expected.
    pub(crate) fn parse_env(&self, text: &str) -> Result<toml::Value, String> {
        let value = match *self {
            Kind::Integer { .. } => text
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| self.expected())?,
            Kind::Bool => match text.trim() {
                "true" | "1" => toml::Value::Boolean(true),
                "false" | "0" => toml::Value::Boolean(false),
                _ => return Err(self.expected()),
            },
            Kind::Ratio => text
                .trim()
                .parse::<f64>()
                .map(toml::Value::Float)
                .map_err(|_| self.expected())?,
            Kind::Labels => {
                let mut table = toml::Table::new();
                for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
                    let (key, raw) = pair
                        .split_once('=')
                        .ok_or_else(|| "key=value pairs separated by commas".to_owned())?;
                    let value = crate::telemetry::settings::percent_decode(raw.trim())
                        .ok_or_else(|| "values percent-encoded as UTF-8".to_owned())?;
                    table.insert(key.trim().to_owned(), toml::Value::String(value));
                }
                toml::Value::Table(table)
            }
            Kind::Policy => return Err("a policy table, which only a file may set".to_owned()),
            Kind::Text { .. }
            | Kind::LogFilter
            | Kind::Duration
            | Kind::DurationOr(_)
            | Kind::Address
            | Kind::AddressOr(_)
            | Kind::Choice(_)
            | Kind::Url(_)
            | Kind::Path => toml::Value::String(text.trim().to_owned()),
        };
        self.check(&value)?;
        Ok(value)
    }
}

fn quoted_list(words: &[&str]) -> String {
    let mut out = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            out.push_str(if i + 1 == words.len() { " or " } else { ", " });
        }
        let _ = write!(out, "\"{word}\"");
    }
    out
}

const NAME: Kind = Kind::Text {
    max: lodestar_core::registry::limits::MAX_NAME,
};
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
const BYTES: Kind = Kind::Integer {
    min: 1,
    max: 4 * GIB,
};
const COMPRESSION: Kind = Kind::Choice(&["none", "gzip"]);

/// Every key, in the order of the generated file and reference.
pub static KEYS: &[Key] = &[
    // [service]
    Key {
        path: "service.name",
        kind: NAME,
        default: "\"\"",
        aliases: &[],
        doc: "The name the service registers under, and clients call it by. Required by \
              `ServiceBuilder::from_config`.",
    },
    Key {
        path: "service.version",
        kind: Kind::Text {
            max: lodestar_core::registry::limits::MAX_VERSION,
        },
        default: "\"\"",
        aliases: &[],
        doc: "The version registered with the instance.",
    },
    Key {
        path: "service.namespace",
        kind: NAME,
        default: "\"default\"",
        aliases: &[],
        doc: "The namespace the service registers in.",
    },
    Key {
        path: "service.group",
        kind: NAME,
        default: "\"default\"",
        aliases: &[],
        doc: "The group the service registers in.",
    },
    Key {
        path: "service.weight",
        kind: Kind::Integer {
            min: 0,
            max: lodestar_core::registry::limits::MAX_WEIGHT as u64,
        },
        default: "100",
        aliases: &[],
        doc: "The weight for weighted balancing.",
    },
    Key {
        path: "service.zone",
        kind: NAME,
        default: "\"\"",
        aliases: &[],
        doc: "The zone (failure domain) the instance runs in, for callers that prefer their \
              own; empty for none.",
    },
    Key {
        path: "service.id",
        kind: Kind::Text {
            max: lodestar_core::registry::limits::MAX_ID,
        },
        default: "\"\"",
        aliases: &[],
        doc: "The instance id; empty for `{name}-{random hex}`.",
    },
    Key {
        path: "service.bind",
        kind: Kind::Address,
        default: "\"127.0.0.1:0\"",
        aliases: &[],
        doc: "The address to listen on (port 0: any free port).",
    },
    Key {
        path: "service.advertise",
        kind: Kind::Text {
            max: lodestar_core::registry::limits::MAX_ADDRESS,
        },
        default: "\"\"",
        aliases: &[],
        doc: "The address to register, `host:port`, when it differs from the bound one; empty \
              for the bound address (127.0.0.1 for an unspecified IP).",
    },
    Key {
        path: "service.admin",
        kind: Kind::AddressOr("off"),
        default: "\"127.0.0.1:0\"",
        aliases: &[],
        doc: "Where the admin endpoint (`/metrics`, `/healthz`, `/readyz`) listens, or \
              \"off\".",
    },
    Key {
        path: "service.ttl",
        kind: Kind::Duration,
        default: "\"6s\"",
        aliases: &[],
        doc: "The lease TTL: how long the registry keeps the instance without a heartbeat.",
    },
    Key {
        path: "service.heartbeat_interval",
        kind: Kind::DurationOr("auto"),
        default: "\"auto\"",
        aliases: &[],
        doc: "How often the lease is renewed; \"auto\" for a third of the TTL. Must be \
              shorter than the TTL.",
    },
    Key {
        path: "service.grace_period",
        kind: Kind::Duration,
        default: "\"10s\"",
        aliases: &[],
        doc: "How long shutdown waits for calls and streams in flight before cutting them.",
    },
    Key {
        path: "service.send_compressed",
        kind: COMPRESSION,
        default: "\"none\"",
        aliases: &[],
        doc: "Compress responses (for clients that accept it).",
    },
    Key {
        path: "service.metadata",
        kind: Kind::Labels,
        default: "{}",
        aliases: &[],
        doc: "Metadata labels registered with the instance.",
    },
    // [service.limits]
    Key {
        path: "service.limits.max_receive_message_size",
        kind: BYTES,
        default: "4194304",
        aliases: &[],
        doc: "The largest request message accepted, in bytes (larger: `RESOURCE_EXHAUSTED`).",
    },
    Key {
        path: "service.limits.max_send_message_size",
        kind: BYTES,
        default: "4194304",
        aliases: &[],
        doc: "The largest response message sent, in bytes.",
    },
    Key {
        path: "service.limits.max_connections",
        kind: Kind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: "4096",
        aliases: &[],
        doc: "Connections served at once; one more is accepted and closed at once.",
    },
    Key {
        path: "service.limits.max_unsent_bytes_per_connection",
        kind: BYTES,
        default: "33554432",
        aliases: &[],
        doc: "Response bytes one connection may hold unsent.",
    },
    Key {
        path: "service.limits.max_unsent_bytes",
        kind: Kind::Integer {
            min: 1,
            max: 64 * GIB,
        },
        default: "268435456",
        aliases: &[],
        doc: "Response bytes all connections together may hold unsent.",
    },
    Key {
        path: "service.limits.stall_timeout",
        kind: Kind::Duration,
        default: "\"30s\"",
        aliases: &[],
        doc: "A connection holding unsent data that makes no progress for this long is closed.",
    },
    Key {
        path: "service.http2.keepalive_interval",
        kind: Kind::DurationOr("off"),
        default: "\"off\"",
        aliases: &[],
        doc: "Send an HTTP/2 PING after this long without frames from the client, and close the connection if it is not answered within `keepalive_timeout`; \"off\" for never.",
    },
    Key {
        path: "service.http2.keepalive_timeout",
        kind: Kind::Duration,
        default: "\"20s\"",
        aliases: &[],
        doc: "How long a keepalive PING may go unanswered.",
    },
    Key {
        path: "service.http2.tcp_keepalive",
        kind: Kind::DurationOr("off"),
        default: "\"1m\"",
        aliases: &[],
        doc: "Have the kernel probe a connection idle this long (TCP keepalive); \"off\" for never.",
    },
    Key {
        path: "service.http2.max_concurrent_streams",
        kind: Kind::Integer {
            min: 1,
            max: u32::MAX as u64,
        },
        default: "1024",
        aliases: &[],
        doc: "How many calls one connection may have open at once.",
    },
    Key {
        path: "service.http2.adaptive_window",
        kind: Kind::Bool,
        default: "false",
        aliases: &[],
        doc: "Size flow-control windows by measured bandwidth (BDP), up to 16 MiB per connection, instead of fixed windows (2 MiB per call, 5 MiB per connection).",
    },
    Key {
        path: "service.http2.handshake_timeout",
        kind: Kind::Duration,
        default: "\"10s\"",
        aliases: &[],
        doc: "How long a new connection has to finish its TLS handshake and send the HTTP/2 preface.",
    },
    // [service.web]
    Key {
        path: "service.web.grpc_web",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Serve gRPC-Web (binary and text, HTTP/1.1 and HTTP/2) on the service's port.",
    },
    Key {
        path: "service.web.connect",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Serve the Connect protocol (unary POST, GET for NO_SIDE_EFFECTS methods, streams) on the service's port. With either web protocol on, the port also takes HTTP/1.1.",
    },
    Key {
        path: "service.web.websocket",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Serve WebSocket (the lodestar.v1 sub-protocol, every call kind; HTTP/1.1 Upgrade and HTTP/2 extended CONNECT) on the service's port. A socket's Origin, when sent, must be in cors.allow_origins or be the service's own (its host and port those of the Host).",
    },
    Key {
        path: "service.web.rest",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Serve REST routes from the services' `google.api.http` annotations (JSON in and out; unary methods, and server-streaming ones as a line of JSON per reply) on the service's port. Costs nothing when no method is annotated.",
    },
    Key {
        path: "service.web.websocket_ping_interval",
        kind: Kind::Duration,
        default: "\"30s\"",
        aliases: &[],
        doc: "How long a WebSocket may be silent before the server pings it.",
    },
    Key {
        path: "service.web.websocket_ping_timeout",
        kind: Kind::Duration,
        default: "\"10s\"",
        aliases: &[],
        doc: "How long the server waits for any frame after a ping before it closes a silent WebSocket.",
    },
    Key {
        path: "service.web.client_js",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Serve the browser client (an ES module calling every call kind over Connect and WebSocket) at `GET /_lodestar/client.js` while a web protocol is on.",
    },
    Key {
        path: "service.web.cors.allow_origins",
        kind: Kind::Text { max: MAX_TEXT },
        default: "\"\"",
        aliases: &[],
        doc: "Browser origins allowed to call the web protocols, separated by commas (`https://app.example.com`, exact); `*` for any; empty for no cross-origin access.",
    },
    Key {
        path: "service.web.cors.allow_headers",
        kind: Kind::Text { max: MAX_TEXT },
        default: "\"\"",
        aliases: &[],
        doc: "Request headers allowed cross-origin besides Connect's, gRPC-Web's and `Authorization`, separated by commas.",
    },
    Key {
        path: "service.web.cors.max_age",
        kind: Kind::Duration,
        default: "\"2h\"",
        aliases: &[],
        doc: "How long browsers may cache a preflight's answer (`Access-Control-Max-Age`).",
    },
    // [service.tls]
    Key {
        path: "service.tls.cert",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "The server's certificate chain (PEM); with `key`, serve over TLS.",
    },
    Key {
        path: "service.tls.key",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "The server's private key (PEM).",
    },
    Key {
        path: "service.tls.client_ca",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "Require client certificates that chain to this CA (PEM): mutual TLS.",
    },
    Key {
        path: "service.policy",
        kind: Kind::Policy,
        default: "{}",
        aliases: &[],
        doc: "The server policy: settings per method (faults, rate limits, concurrency), as \
              `lodestar::server::policy::Policy` reads them.",
    },
    // [client]
    Key {
        path: "client.namespace",
        kind: NAME,
        default: "\"default\"",
        aliases: &[],
        doc: "The namespace services are looked up in.",
    },
    Key {
        path: "client.group",
        kind: NAME,
        default: "\"default\"",
        aliases: &[],
        doc: "The group services are looked up in.",
    },
    Key {
        path: "client.zone",
        kind: NAME,
        default: "\"\"",
        aliases: &["LODESTAR_ZONE"],
        doc: "The caller's zone, for zone affinity; empty for none.",
    },
    Key {
        path: "client.timeout",
        kind: Kind::DurationOr("off"),
        default: "\"off\"",
        aliases: &[],
        doc: "The deadline of a call that sets none itself; \"off\" for none.",
    },
    Key {
        path: "client.connect_timeout",
        kind: Kind::Duration,
        default: "\"3s\"",
        aliases: &[],
        doc: "How long opening a connection to an instance may take.",
    },
    Key {
        path: "client.resolve_timeout",
        kind: Kind::Duration,
        default: "\"5s\"",
        aliases: &[],
        doc: "How long a call waits for the registry's first answer about a service.",
    },
    Key {
        path: "client.max_attempts",
        kind: Kind::Integer { min: 1, max: 8 },
        default: "3",
        aliases: &[],
        doc: "How many instances one call may try when it is safe to try another.",
    },
    Key {
        path: "client.ejection_base",
        kind: Kind::Duration,
        default: "\"1s\"",
        aliases: &[],
        doc: "How long an instance that refused a connection is first skipped (doubling on \
              each further failure).",
    },
    Key {
        path: "client.ejection_max",
        kind: Kind::Duration,
        default: "\"30s\"",
        aliases: &[],
        doc: "The longest an instance is skipped.",
    },
    Key {
        path: "client.protection_threshold",
        kind: Kind::Ratio,
        default: "0.0",
        aliases: &[],
        doc: "Below this share of healthy instances, calls go to every instance.",
    },
    Key {
        path: "client.codec",
        kind: Kind::Choice(&["protobuf", "json"]),
        default: "\"protobuf\"",
        aliases: &[],
        doc: "How messages are encoded on the wire.",
    },
    Key {
        path: "client.protocol",
        kind: Kind::Choice(&["grpc", "grpc-web", "grpc-web-text", "connect"]),
        default: "\"grpc\"",
        aliases: &[],
        doc: "The wire protocol of calls: native gRPC, gRPC-Web (binary), gRPC-Web text (base64) or Connect; all over HTTP/2.",
    },
    Key {
        path: "client.send_compressed",
        kind: COMPRESSION,
        default: "\"none\"",
        aliases: &[],
        doc: "Compress requests.",
    },
    Key {
        path: "client.labels",
        kind: Kind::Labels,
        default: "{}",
        aliases: &[],
        doc: "The caller's labels, which policy routes match.",
    },
    Key {
        path: "client.limits.max_receive_message_size",
        kind: BYTES,
        default: "4194304",
        aliases: &[],
        doc: "The largest response message accepted, in bytes.",
    },
    Key {
        path: "client.limits.max_send_message_size",
        kind: BYTES,
        default: "4194304",
        aliases: &[],
        doc: "The largest request message sent, in bytes.",
    },
    Key {
        path: "client.http2.keepalive_interval",
        kind: Kind::DurationOr("off"),
        default: "\"off\"",
        aliases: &[],
        doc: "Send an HTTP/2 PING this often, and close the connection if it is not answered within `keepalive_timeout`; \"off\" for never. gRPC servers refuse PINGs more often than every 5 minutes unless told otherwise.",
    },
    Key {
        path: "client.http2.keepalive_timeout",
        kind: Kind::Duration,
        default: "\"20s\"",
        aliases: &[],
        doc: "How long a keepalive PING, or data sent (`TCP_USER_TIMEOUT`), may go unacknowledged.",
    },
    Key {
        path: "client.http2.tcp_keepalive",
        kind: Kind::DurationOr("off"),
        default: "\"30s\"",
        aliases: &[],
        doc: "Have the kernel probe a connection idle this long (TCP keepalive); \"off\" for never.",
    },
    Key {
        path: "client.tls.ca",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "Call over TLS, trusting this CA (PEM); empty for plaintext.",
    },
    Key {
        path: "client.tls.cert",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "A client certificate chain (PEM) for mutual TLS.",
    },
    Key {
        path: "client.tls.key",
        kind: Kind::Path,
        default: "\"\"",
        aliases: &[],
        doc: "The client certificate's private key (PEM).",
    },
    Key {
        path: "client.tls.server_name",
        kind: NAME,
        default: "\"\"",
        aliases: &[],
        doc: "Verify the services' certificates against this name instead of their hosts.",
    },
    Key {
        path: "client.policy",
        kind: Kind::Policy,
        default: "{}",
        aliases: &[],
        doc: "The client policy of every service called (strategy, routes, outlier \
              detection, breakers, retries), as `lodestar::client::Policy` reads it.",
    },
    // [registry], [broker]
    Key {
        path: "registry.url",
        kind: Kind::Url(&["memory", "lodestar", "lodestars", "etcd"]),
        default: "\"memory://\"",
        aliases: &["LODESTAR_REGISTRY"],
        doc: "The registry, opened by `lodestar_registry::from_config`. Its token comes from \
              `LODESTAR_REGISTRY_TOKEN`, never from the file.",
    },
    Key {
        path: "broker.url",
        kind: Kind::Url(&["memory", "http", "nats"]),
        default: "\"memory://\"",
        aliases: &["LODESTAR_BROKER"],
        doc: "The event broker, opened by `lodestar_broker::from_config`.",
    },
    // [metrics]
    Key {
        path: "metrics.enabled",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Count calls (in the process's metrics registry, served at `/metrics`).",
    },
    Key {
        path: "metrics.grpc_compat",
        kind: Kind::Bool,
        default: "false",
        aliases: &[],
        doc: "Also serve go-grpc-prometheus's families (`grpc_server_handled_total`, ...). \
              Process-wide once on.",
    },
    // [telemetry]
    Key {
        path: "telemetry.install",
        kind: Kind::Bool,
        default: "true",
        aliases: &[],
        doc: "Install lodestar's log and trace subscriber when the service starts, if the \
              process has none.",
    },
    Key {
        path: "telemetry.log_filter",
        kind: Kind::LogFilter,
        default: "\"info\"",
        aliases: &["RUST_LOG"],
        doc: "Which events are logged (`EnvFilter` directives, as `RUST_LOG`).",
    },
    Key {
        path: "telemetry.log_format",
        kind: Kind::Choice(&["text", "json"]),
        default: "\"text\"",
        aliases: &["LODESTAR_LOG_FORMAT"],
        doc: "Log lines as text or JSON.",
    },
    Key {
        path: "telemetry.otlp_endpoint",
        kind: Kind::Text { max: MAX_TEXT },
        default: "\"\"",
        aliases: &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"],
        doc: "Export spans here (HTTP: the full URL of `/v1/traces`; gRPC: the collector's \
              address); empty for no spans. `OTEL_EXPORTER_OTLP_ENDPOINT` also sets it, with \
              `/v1/traces` appended for HTTP.",
    },
    Key {
        path: "telemetry.otlp_protocol",
        kind: Kind::Choice(&["grpc", "http/protobuf"]),
        default: "\"http/protobuf\"",
        aliases: &[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
        doc: "How spans are exported.",
    },
    Key {
        path: "telemetry.sampler",
        kind: Kind::Choice(&[
            "always_on",
            "always_off",
            "traceidratio",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
        ]),
        default: "\"parentbased_always_on\"",
        aliases: &["OTEL_TRACES_SAMPLER"],
        doc: "Which traces are recorded (as `OTEL_TRACES_SAMPLER`).",
    },
    Key {
        path: "telemetry.sampler_ratio",
        kind: Kind::Ratio,
        default: "1.0",
        aliases: &["OTEL_TRACES_SAMPLER_ARG"],
        doc: "The share of traces the `*traceidratio` samplers record.",
    },
    Key {
        path: "telemetry.service_name",
        kind: Kind::Text { max: MAX_TEXT },
        default: "\"\"",
        aliases: &["OTEL_SERVICE_NAME"],
        doc: "The spans' `service.name`; empty for the service's own name.",
    },
    Key {
        path: "telemetry.resource_attributes",
        kind: Kind::Labels,
        default: "{}",
        aliases: &["OTEL_RESOURCE_ATTRIBUTES"],
        doc: "More resource attributes of the spans.",
    },
];

/// The key at `path`, if there is one.
pub fn key(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.path == path)
}

/// Whether `path` is a section that holds keys (`service`,
/// `service.limits`), rather than a key.
pub(crate) fn is_section(path: &str) -> bool {
    KEYS.iter().any(|key| {
        key.path
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The known key or section closest to `path`, if one is close enough to
/// be a likely typo.
pub(crate) fn closest(path: &str) -> Option<&'static str> {
    // Every key, and every section (each prefix of a key's path).
    let candidates = KEYS.iter().flat_map(|key| {
        key.path
            .match_indices('.')
            .map(|(at, _)| &key.path[..at])
            .chain([key.path])
    });
    candidates
        .map(|candidate| (edit_distance(path, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// For a variable that no key reads, the one closest to it, if one is close
/// enough to be a likely typo: `LODESTAR_SERVICE_BND` gives
/// `LODESTAR_SERVICE_BIND`. `None` for a variable a key reads, and for one
/// far from all of them (other programs' variables).
///
/// ```
/// use lodestar::config::closest_variable;
/// assert_eq!(closest_variable("LODESTAR_SERVICE_BND").as_deref(), Some("LODESTAR_SERVICE_BIND"));
/// assert_eq!(closest_variable("LODESTAR_SERVICE_BIND"), None);
/// assert_eq!(closest_variable("HOME"), None);
/// ```
pub fn closest_variable(name: &str) -> Option<String> {
    let known: Vec<String> = KEYS
        .iter()
        .flat_map(|key| {
            key.env()
                .into_iter()
                .chain(key.aliases.iter().map(|a| (*a).to_owned()))
        })
        .collect();
    if known.iter().any(|k| k == name) {
        return None;
    }
    known
        .into_iter()
        .map(|candidate| (edit_distance(name, &candidate), candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The edit distance between two strings, by characters: insertions,
/// deletions, substitutions, and swaps of two neighbours (`bnid` for
/// `bind`), each counting one (the optimal string alignment distance).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    // d[i * width + j]: the distance between a[..i] and b[..j].
    let mut d: Vec<usize> = vec![0; (a.len() + 1) * width];
    for (i, cell) in d.iter_mut().step_by(width).enumerate() {
        *cell = i;
    }
    for (j, cell) in d.iter_mut().take(width).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}
