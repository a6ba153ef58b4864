//! From a [`Config`] to the builders: [`ServiceBuilder::from_config`],
//! [`Client::from_config`](crate::Client::from_config) and
//! [`Config::telemetry`]. What needs another crate (the registry, the
//! broker) is opened there (`lodestar_registry::from_config`,
//! `lodestar_broker::from_config`).

use std::path::Path;

use super::error::ConfigError;
use super::model::{
    ClientLimits, CodecName, Config, LogFormatName, MetricsConfig, ProtocolName, SamplerName,
    ServiceLimits, WebConfig,
};
use crate::client::{Client, ClientBuilder, IntoRegistry};
use crate::server::{Service, ServiceBuilder};
use crate::telemetry::{LogFormat, Protocol, Sampler, Telemetry};
use crate::tls::{ClientTls, ServerTls};

impl ServiceBuilder {
    /// A service described by `config.service` (and `config.metrics`,
    /// `config.telemetry`): everything but the registry and the broker,
    /// which other crates open (`lodestar_registry::from_config`,
    /// `lodestar_broker::from_config`) and which are then given with
    /// [`registry`](Self::registry) and [`broker`](Self::broker). The
    /// builder can be changed further in code, which wins over the file
    /// and the environment.
    ///
    /// Logs and traces come from `[telemetry]`
    /// ([`Config::telemetry`]), into which [`Config::load`] reads `RUST_LOG`,
    /// `LODESTAR_LOG_FORMAT` and the `OTEL_*` variables; a config read
    /// without the environment ([`Config::from_toml`]) ignores them.
    ///
    /// Refused: an empty `service.name`, TLS files that cannot be read,
    /// a server policy that is not valid, limits too large for this
    /// machine.
    ///
    /// ```
    /// use lodestar::config::Config;
    /// use lodestar::ServiceBuilder;
    ///
    /// let config = Config::from_toml("[service]\nname = \"greeter\"\nversion = \"1.4.0\"")?;
    /// let builder = ServiceBuilder::from_config(&config)?;
    /// # drop(builder);
    /// # Ok::<(), lodestar::config::ConfigError>(())
    /// ```
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let s = &config.service;
        if s.name.is_empty() {
            return Err(ConfigError::invalid(
                "service.name",
                "\"\"",
                "the name the service registers under (service.name or LODESTAR_SERVICE_NAME)",
            ));
        }
        let mut builder = Service::builder(&s.name)
            .version(&s.version)
            .namespace(&s.namespace)
            .group(&s.group)
            .weight(s.weight)
            .zone(&s.zone)
            .labels(s.metadata.clone())
            .bind(s.bind)
            .admin_addr(s.admin)
            .ttl(s.ttl)
            .grace_period(s.grace_period)
            .message_limits(service_message_limits(&s.limits)?)
            .connection_limits(connection_limits(&s.limits)?)
            .http2((&s.http2).into())
            .web(web(&s.web)?)
            .metrics(metrics(&config.metrics))
            .telemetry(config.telemetry.install)
            .telemetry_settings(config.telemetry()?);
        if !s.id.is_empty() {
            builder = builder.id(&s.id);
        }
        if !s.advertise.is_empty() {
            builder = builder.advertise(&s.advertise);
        }
        if let Some(interval) = s.heartbeat_interval {
            builder = builder.heartbeat_interval(interval);
        }
        if let Some(encoding) = s.send_compressed.encoding() {
            builder = builder.send_compressed(encoding);
        }
        let tls = &s.tls;
        if is_set(&tls.cert) {
            let mut server = ServerTls::from_pem_files(&tls.cert, &tls.key)
                .map_err(|e| unreadable("service.tls.cert", &tls.cert, &e))?;
            if is_set(&tls.client_ca) {
                server = server
                    .require_client_certs_from_file(&tls.client_ca)
                    .map_err(|e| unreadable("service.tls.client_ca", &tls.client_ca, &e))?;
            }
            builder = builder.tls(server);
        }
        builder
            .policy(s.policy.clone())
            .map_err(|error| ConfigError::Policy {
                key: "service.policy",
                origin: None,
                error: Box::new(error),
            })
    }
}

impl Client {
    /// A client described by `config.client` (and `config.metrics`),
    /// finding services in `registry` (open it from the same config with
    /// `lodestar_registry::from_config`). The builder can be changed
    /// further in code.
    ///
    /// ```
    /// use lodestar::{Client, MemoryRegistry};
    /// use lodestar::config::Config;
    ///
    /// let config = Config::from_toml("[client]\ntimeout = \"2s\"")?;
    /// let client = Client::from_config(MemoryRegistry::new(), &config)?.build();
    /// # drop(client);
    /// # Ok::<(), lodestar::config::ConfigError>(())
    /// ```
    pub fn from_config(
        registry: impl IntoRegistry,
        config: &Config,
    ) -> Result<ClientBuilder, ConfigError> {
        config.validate()?;
        let c = &config.client;
        let mut builder = Client::builder(registry)
            .namespace(&c.namespace)
            .group(&c.group)
            .labels(c.labels.clone())
            .connect_timeout(c.connect_timeout)
            .resolve_timeout(c.resolve_timeout)
            .max_attempts(c.max_attempts as usize)
            .ejection(c.ejection_base, c.ejection_max)
            .protection_threshold(c.protection_threshold)
            .codec(match c.codec {
                CodecName::Protobuf => crate::Codec::Protobuf,
                CodecName::Json => crate::Codec::Json,
            })
            .protocol(c.protocol.into())
            .message_limits(client_message_limits(&c.limits)?)
            .http2((&c.http2).into())
            .metrics(metrics(&config.metrics));
        // Empty: the builder's default, `LODESTAR_ZONE` if set.
        if !c.zone.is_empty() {
            builder = builder.zone(&c.zone);
        }
        if let Some(timeout) = c.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(encoding) = c.send_compressed.encoding() {
            builder = builder.send_compressed(encoding);
        }
        let tls = &c.tls;
        if is_set(&tls.ca) {
            let mut client = ClientTls::from_ca_file(&tls.ca)
                .map_err(|e| unreadable("client.tls.ca", &tls.ca, &e))?;
            if is_set(&tls.cert) {
                client = client
                    .with_identity_files(&tls.cert, &tls.key)
                    .map_err(|e| unreadable("client.tls.cert", &tls.cert, &e))?;
            }
            if !tls.server_name.is_empty() {
                client = client.with_server_name(&tls.server_name).map_err(|e| {
                    ConfigError::invalid(
                        "client.tls.server_name",
                        format!("{:?}", tls.server_name),
                        format!("a DNS name or IP address ({e})"),
                    )
                })?;
            }
            builder = builder.tls(client);
        }
        builder
            .policy(c.policy.clone())
            .map_err(|error| ConfigError::Policy {
                key: "client.policy",
                origin: None,
                error: Box::new(error),
            })
    }
}

impl Config {
    /// The log and trace settings of `[telemetry]`, for
    /// [`Telemetry::init`] or, at a service's start,
    /// [`ServiceBuilder::telemetry_settings`]. Spans are exported only when
    /// `telemetry.otlp_endpoint` is set.
    pub fn telemetry(&self) -> Result<Telemetry, ConfigError> {
        let t = &self.telemetry;
        let mut telemetry =
            Telemetry::new()
                .log_filter(&t.log_filter)
                .log_format(match t.log_format {
                    LogFormatName::Text => LogFormat::Text,
                    LogFormatName::Json => LogFormat::Json,
                });
        if t.otlp_endpoint.is_empty() {
            return Ok(telemetry);
        }
        let protocol = match t.otlp_protocol {
            ProtocolName::Grpc => Protocol::Grpc,
            ProtocolName::HttpProtobuf => Protocol::HttpProtobuf,
        };
        let ratio = t.sampler_ratio;
        let sampler = match t.sampler {
            SamplerName::AlwaysOn => Sampler::AlwaysOn,
            SamplerName::AlwaysOff => Sampler::AlwaysOff,
            SamplerName::Traceidratio => Sampler::TraceIdRatio(ratio),
            SamplerName::ParentbasedAlwaysOn => Sampler::ParentBasedAlwaysOn,
            SamplerName::ParentbasedAlwaysOff => Sampler::ParentBasedAlwaysOff,
            SamplerName::ParentbasedTraceidratio => Sampler::ParentBasedTraceIdRatio(ratio),
        };
        telemetry = telemetry.otlp(&t.otlp_endpoint, protocol).sampler(sampler);
        if !t.service_name.is_empty() {
            telemetry = telemetry.service_name(&t.service_name);
        }
        for (key, value) in &t.resource_attributes {
            telemetry = telemetry.resource_attribute(key, value);
        }
        Ok(telemetry)
    }
}

/// `[service.web]` as [`WebProtocols`](crate::server::WebProtocols):
/// each origin must be `*` or `scheme://host[:port]`.
fn web(config: &WebConfig) -> Result<crate::server::WebProtocols, ConfigError> {
    let list = |text: &str| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let origins = list(&config.cors.allow_origins);
    for origin in &origins {
        let well_formed = origin == "*"
            || origin.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty() && !host.is_empty() && !host.contains('/')
            });
        if !well_formed {
            return Err(ConfigError::invalid(
                "service.web.cors.allow_origins",
                format!("{origin:?}"),
                "origins as browsers send them, `scheme://host[:port]` (no path), or `*`",
            ));
        }
    }
    let headers = list(&config.cors.allow_headers);
    if let Some(bad) = headers
        .iter()
        .find(|h| http::HeaderName::try_from(h.as_str()).is_err())
    {
        return Err(ConfigError::invalid(
            "service.web.cors.allow_headers",
            format!("{bad:?}"),
            "header names separated by commas",
        ));
    }
    Ok(crate::server::WebProtocols {
        grpc_web: config.grpc_web,
        connect: config.connect,
        websocket: config.websocket,
        rest: config.rest,
        websocket_ping_interval: config.websocket_ping_interval,
        websocket_ping_timeout: config.websocket_ping_timeout,
        cors: crate::server::Cors {
            allow_origins: origins,
            allow_headers: headers,
            max_age: config.cors.max_age,
        },
        client_js: config.client_js,
        assets: Vec::new(),
    })
}

/// [`web`], for the config tests.
#[cfg(test)]
pub(super) fn web_for_tests(
    config: &WebConfig,
) -> Result<crate::server::WebProtocols, ConfigError> {
    web(config)
}

fn is_set(path: &Path) -> bool {
    !path.as_os_str().is_empty()
}

fn unreadable(key: &str, path: &Path, error: &crate::tls::TlsError) -> ConfigError {
    ConfigError::invalid(
        key,
        format!("{:?}", path.display().to_string()),
        format!("readable PEM files ({error})"),
    )
}

/// The metrics registry `[metrics]` asks for.
fn metrics(config: &MetricsConfig) -> Option<crate::metrics::Metrics> {
    if !config.enabled {
        return None;
    }
    let global = crate::metrics::Metrics::global().clone();
    // Only ever turned on: the flag is the process's.
    Some(if config.grpc_compat {
        global.with_grpc_compat(true)
    } else {
        global
    })
}

/// A byte count as a `usize`, naming the key if this machine cannot hold it.
fn bytes(key: &str, value: u64) -> Result<usize, ConfigError> {
    usize::try_from(value).map_err(|_| {
        ConfigError::invalid(
            key,
            value,
            format!("at most {} on this machine", usize::MAX),
        )
    })
}

fn service_message_limits(limits: &ServiceLimits) -> Result<crate::MessageLimits, ConfigError> {
    Ok(crate::MessageLimits {
        max_decoding_message_size: bytes(
            "service.limits.max_receive_message_size",
            limits.max_receive_message_size,
        )?,
        max_encoding_message_size: bytes(
            "service.limits.max_send_message_size",
            limits.max_send_message_size,
        )?,
    })
}

fn client_message_limits(limits: &ClientLimits) -> Result<crate::MessageLimits, ConfigError> {
    Ok(crate::MessageLimits {
        max_decoding_message_size: bytes(
            "client.limits.max_receive_message_size",
            limits.max_receive_message_size,
        )?,
        max_encoding_message_size: bytes(
            "client.limits.max_send_message_size",
            limits.max_send_message_size,
        )?,
    })
}

fn connection_limits(limits: &ServiceLimits) -> Result<crate::ConnectionLimits, ConfigError> {
    Ok(crate::ConnectionLimits {
        max_connections: bytes("service.limits.max_connections", limits.max_connections)?,
        max_unsent_bytes_per_connection: bytes(
            "service.limits.max_unsent_bytes_per_connection",
            limits.max_unsent_bytes_per_connection,
        )?,
        max_unsent_bytes: bytes("service.limits.max_unsent_bytes", limits.max_unsent_bytes)?,
        stall_timeout: limits.stall_timeout,
    })
}
