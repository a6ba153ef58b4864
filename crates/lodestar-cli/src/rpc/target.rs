//! TARGET: a service name found through the registry, or an address; and
//! the connection to it.
//!
//! A name is looked up in the registry (`--registry`, else
//! `LODESTAR_REGISTRY`, else `lodestar://127.0.0.1:7070`) and one of its
//! healthy, enabled instances is chosen (`--instance ID` pins one). Every
//! request of a command (reflection, then the call) then goes to that one
//! instance, through a lodestar client whose only instance it is: the
//! connection, its timeout, TLS and message limits are lodestar's own.

use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::time::Duration;

use lodestar::registry::limits::printable;
use lodestar::tls::ClientTls;
use lodestar::{
    Client, DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, MessageLimits, Registry, ServiceKey,
    StaticRegistry,
};

use super::{Failure, FailureKind};
use crate::args::Span;

/// The name the chosen instance has in the client's own registry.
const PINNED: &str = "lodestar-cli-target";

/// Where the system's CA certificates usually are, for `--tls` without `--ca`.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// How many known names an error lists at most.
const MAX_SUGGESTIONS: usize = 10;

/// TARGET and how to reach it; shared by `call`, `list` and `health`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TargetArgs {
    /// A service name (found through the registry), or host:port,
    /// http://host:port (plaintext) or https://host:port (TLS).
    pub(crate) target: String,
    /// Registry to find a service name in (lodestar://host:port,
    /// lodestars://…, etcd://…). Default: lodestar://127.0.0.1:7070.
    #[arg(long, env = "LODESTAR_REGISTRY", value_parser = crate::args::registry_url, help_heading = "Target")]
    registry: Option<String>,
    /// Namespace of the service name.
    #[arg(long, default_value = DEFAULT_NAMESPACE, help_heading = "Target")]
    namespace: String,
    /// Group of the service name.
    #[arg(long, default_value = DEFAULT_GROUP, help_heading = "Target")]
    group: String,
    /// Call this instance of the service (its id, as `lodestar describe`
    /// shows it), even if it is unhealthy. Default: a healthy one.
    #[arg(long, value_name = "ID", help_heading = "Target")]
    instance: Option<String>,
    /// Connect over TLS (implied by https://, --ca and --cert). Without
    /// --ca, the system's CA certificates are trusted (SSL_CERT_FILE, else
    /// the usual bundle paths).
    #[arg(long, help_heading = "Target")]
    tls: bool,
    /// TLS: trust servers whose certificates chain to this CA (PEM).
    #[arg(long, value_name = "FILE", help_heading = "Target")]
    ca: Option<PathBuf>,
    /// Mutual TLS: present this client certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "key", help_heading = "Target")]
    cert: Option<PathBuf>,
    /// Mutual TLS: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = "Target")]
    key: Option<PathBuf>,
    /// TLS: verify the server's certificate against this name (and send it
    /// as SNI) instead of the target's host.
    #[arg(long, value_name = "NAME", help_heading = "Target")]
    server_name: Option<String>,
    /// Longest wait for the connection (and for the registry), e.g. 500ms, 10s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        help_heading = "Target"
    )]
    connect_timeout: Span,
}

/// What the TARGET text is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TargetName {
    /// `host:port`; `tls` is `Some` when a scheme said which.
    Address { address: String, tls: Option<bool> },
    /// A service name, for the registry.
    Service(String),
}

impl TargetName {
    /// Reads TARGET: an address (with or without `http://`/`https://`), or
    /// a service name (no `:` and no `/`).
    pub(crate) fn parse(text: &str) -> Result<Self, Failure> {
        let bad = |why: &str| {
            Failure::new(
                FailureKind::Target,
                format!(
                    "TARGET `{}` {why} (expected a service name, host:port, \
                     http://host:port or https://host:port)",
                    printable(text)
                ),
            )
        };
        let (rest, tls) = if let Some(rest) = text.strip_prefix("http://") {
            (rest, Some(false))
        } else if let Some(rest) = text.strip_prefix("https://") {
            (rest, Some(true))
        } else if text.contains("://") {
            return Err(bad("has a scheme other than http or https"));
        } else {
            (text, None)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(bad("is empty"));
        }
        if rest.contains('/') {
            return Err(bad("has a path"));
        }
        if tls.is_none() && !rest.contains(':') {
            return Ok(TargetName::Service(rest.to_owned()));
        }
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(bad("has no port"));
        };
        let host_ok = !host.is_empty()
            && (host.starts_with('[') && host.ends_with(']') || !host.contains(':'));
        if !host_ok {
            return Err(bad("is not host:port (an IPv6 host goes in brackets)"));
        }
        if port.parse::<u16>().is_err() {
            return Err(bad(&format!("has `{}` as its port", printable(port))));
        }
        Ok(TargetName::Address {
            address: rest.to_owned(),
            tls,
        })
    }
}

/// The instance a command talks to; channels to it are made with the
/// message limits each use needs (reflection's answers may be larger than
/// the call's messages are allowed to be).
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    /// The target as messages name it: the address, or the service and instance.
    pub(crate) description: String,
    /// `host:port`.
    address: String,
    tls: Option<ClientTls>,
    connect_timeout: Duration,
}

impl Connection {
    /// A channel to the instance, whose messages are bounded by `limits`;
    /// each channel opens its own connection, lazily, within the connect
    /// timeout.
    pub(crate) fn channel(&self, limits: MessageLimits) -> lodestar::client::Channel {
        self.channel_over(limits, lodestar::client::Protocol::Grpc)
    }

    /// [`Connection::channel`], its calls over `protocol`.
    pub(crate) fn channel_over(
        &self,
        limits: MessageLimits,
        protocol: lodestar::client::Protocol,
    ) -> lodestar::client::Channel {
        // A static registry: the one instance stays for as long as the command runs.
        let registry = StaticRegistry::new().with(PINNED, [self.address.clone()]);
        let mut builder = Client::builder(registry)
            .connect_timeout(self.connect_timeout)
            .max_attempts(1)
            .protocol(protocol)
            .message_limits(limits)
            .metrics(None);
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.clone());
        }
        builder.build().channel(PINNED)
    }
}

impl TargetArgs {
    /// The longest wait for the connection (`--connect-timeout`).
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout.0
    }

    /// Resolves TARGET to one instance, and reads the TLS files; nothing is
    /// connected yet (the first call on a channel connects, within
    /// --connect-timeout).
    pub(crate) async fn connect(&self) -> Result<Connection, Failure> {
        let name = TargetName::parse(&self.target)?;
        let (address, scheme_tls, description) = match name {
            TargetName::Address { address, tls } => {
                let description = address.clone();
                (address, tls, description)
            }
            TargetName::Service(service) => {
                let instance = self.pick_instance(&service).await?;
                let description = format!(
                    "service `{}` (instance `{}` at {})",
                    printable(&service),
                    printable(&instance.id),
                    printable(&instance.address)
                );
                (instance.address, None, description)
            }
        };
        if scheme_tls == Some(false) && (self.tls || self.ca.is_some() || self.cert.is_some()) {
            return Err(Failure::new(
                FailureKind::Target,
                format!(
                    "TARGET says http:// (plaintext) but TLS flags were given; use https://{address}"
                ),
            ));
        }
        let tls = self.client_tls(scheme_tls == Some(true))?;
        Ok(Connection {
            description,
            address,
            tls,
            connect_timeout: self.connect_timeout.0,
        })
    }

    /// The client's TLS settings, if TLS is on.
    fn client_tls(&self, scheme_says_tls: bool) -> Result<Option<ClientTls>, Failure> {
        if !(scheme_says_tls || self.tls || self.ca.is_some() || self.cert.is_some()) {
            if self.server_name.is_some() {
                return Err(Failure::new(
                    FailureKind::Target,
                    "--server-name needs TLS (--tls, --ca or https://)",
                ));
            }
            return Ok(None);
        }
        let tls_error =
            |e: lodestar::tls::TlsError| Failure::new(FailureKind::Target, e.to_string());
        let ca = match &self.ca {
            Some(ca) => ca.clone(),
            None => system_ca_file().ok_or_else(|| {
                Failure::new(
                    FailureKind::Target,
                    format!(
                        "--tls without --ca trusts the system's CA certificates, but none were \
                         found (SSL_CERT_FILE is unset and none of {} exists); give --ca FILE",
                        SYSTEM_CA_FILES.join(", ")
                    ),
                )
            })?,
        };
        let mut tls = ClientTls::from_ca_file(&ca).map_err(tls_error)?;
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.with_identity_files(cert, key).map_err(tls_error)?;
        }
        if let Some(name) = &self.server_name {
            tls = tls.with_server_name(name).map_err(tls_error)?;
        }
        Ok(Some(tls))
    }

    /// The instance of `service` to call: the one `--instance` names, else
    /// a healthy, enabled one, chosen at random.
    async fn pick_instance(&self, service: &str) -> Result<Instance, Failure> {
        let target = |message: String| Failure::new(FailureKind::Target, message);
        let registry = match &self.registry {
            Some(url) => lodestar_registry::from_url(url),
            None => lodestar_registry::from_env(),
        }
        .map_err(|e| target(format!("the registry: {e}")))?;
        let key = ServiceKey::new(service)
            .with_namespace(&self.namespace)
            .with_group(&self.group);
        let timed_out = || {
            Failure::new(
                FailureKind::Transport,
                format!(
                    "the registry did not answer within {} (--connect-timeout)",
                    lodestar::config::format_duration(self.connect_timeout.0)
                ),
            )
        };
        let instances = tokio::time::timeout(self.connect_timeout.0, registry.instances(&key))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                Failure::new(
                    FailureKind::Transport,
                    format!("looking up `{}` in the registry: {e}", printable(service)),
                )
            })?;
        if instances.is_empty() {
            let known =
                tokio::time::timeout(self.connect_timeout.0, registry.services(&self.namespace))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
            let names: Vec<String> = known
                .into_iter()
                .filter(|k| k.group == self.group)
                .map(|k| k.service)
                .collect();
            let suggestions =
                super::closest(service, names.iter().map(String::as_str), MAX_SUGGESTIONS);
            let known = if suggestions.is_empty() {
                "the registry knows no services there".to_owned()
            } else {
                format!(
                    "known services: {}",
                    suggestions
                        .iter()
                        .map(|s| printable(s).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(target(format!(
                "unknown service `{}` (namespace `{}`, group `{}`): no instance is registered; {known}",
                printable(service),
                printable(&self.namespace),
                printable(&self.group)
            )));
        }
        if let Some(id) = &self.instance {
            return instances
                .iter()
                .find(|i| &i.id == id)
                .cloned()
                .ok_or_else(|| {
                    let ids: Vec<String> = instances
                        .iter()
                        .map(|i| printable(&i.id).into_owned())
                        .collect();
                    target(format!(
                        "service `{}` has no instance `{}`; its instances: {}",
                        printable(service),
                        printable(id),
                        ids.join(", ")
                    ))
                });
        }
        let routable: Vec<&Instance> = instances.iter().filter(|i| i.is_routable()).collect();
        if routable.is_empty() {
            return Err(target(format!(
                "service `{}` has {} instance(s), none healthy and enabled (see `lodestar describe {}`; \
                 --instance ID calls one anyway)",
                printable(service),
                instances.len(),
                printable(service)
            )));
        }
        let pick = RandomState::new().hash_one(std::process::id()) as usize % routable.len();
        Ok(routable[pick].clone())
    }
}

/// The system's CA bundle: `SSL_CERT_FILE`, else the first usual path that exists.
fn system_ca_file() -> Option<PathBuf> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return Some(PathBuf::from(file));
    }
    SYSTEM_CA_FILES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(address: &str, tls: Option<bool>) -> TargetName {
        TargetName::Address {
            address: address.to_owned(),
            tls,
        }
    }

    #[test]
    fn targets_are_names_or_addresses() {
        let parse = |text| TargetName::parse(text).unwrap();
        assert_eq!(
            parse("route-guide"),
            TargetName::Service("route-guide".into())
        );
        assert_eq!(parse("127.0.0.1:50051"), address("127.0.0.1:50051", None));
        assert_eq!(parse("localhost:7"), address("localhost:7", None));
        assert_eq!(parse("[::1]:7"), address("[::1]:7", None));
        assert_eq!(parse("http://h:80/"), address("h:80", Some(false)));
        assert_eq!(parse("https://h:443"), address("h:443", Some(true)));
    }

    #[test]
    fn bad_targets_say_what_was_expected() {
        for (text, says) in [
            ("h:port", "as its port"),
            ("h:99999", "as its port"),
            ("::1:7", "IPv6"),
            ("https://h", "no port"),
            ("ftp://h:1", "scheme"),
            ("h:1/x", "path"),
            ("", "empty"),
        ] {
            let error = TargetName::parse(text).unwrap_err();
            assert_eq!(error.kind, FailureKind::Target);
            assert!(error.message.contains(says), "{text}: {}", error.message);
            assert!(error.message.contains("expected"), "{}", error.message);
        }
    }
}
