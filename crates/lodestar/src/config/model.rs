//! The typed settings: [`Config`] and its sections, one plain struct per
//! table of `lodestar.toml`. Every field's default is the builder's own
//! (see [`keys::KEYS`](super::keys::KEYS), which documents each one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::text;

/// Everything `lodestar.toml` can say: the settings of a service
/// (`[service]`), of a client (`[client]`), where the registry and the
/// broker are, and what is measured and traced. Read it with
/// [`Config::load`], [`Config::from_file`] or [`Config::from_toml`]; every
/// field left out keeps its default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The service: what it registers, where it listens, its limits.
    pub service: ServiceConfig,
    /// The client: how it finds and calls services.
    pub client: ClientConfig,
    /// The registry services register in and clients find them in.
    pub registry: RegistryConfig,
    /// The event broker.
    pub broker: BrokerConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

/// `[service]`: the settings of [`ServiceBuilder`](crate::ServiceBuilder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The name the service registers under; required by
    /// [`ServiceBuilder::from_config`](crate::ServiceBuilder::from_config).
    pub name: String,
    /// The version registered.
    pub version: String,
    /// The namespace registered in.
    pub namespace: String,
    /// The group registered in.
    pub group: String,
    /// The weight for weighted balancing.
    pub weight: u32,
    /// The zone the instance runs in; empty for none.
    pub zone: String,
    /// The instance id; empty for `{name}-{random hex}`.
    pub id: String,
    /// Where the service listens.
    pub bind: SocketAddr,
    /// The address registered; empty for the bound address.
    pub advertise: String,
    /// Where the admin endpoint listens; `None` (`"off"`) for none.
    #[serde(with = "text::address_or_off")]
    pub admin: Option<SocketAddr>,
    /// The lease TTL.
    #[serde(with = "text::duration")]
    pub ttl: Duration,
    /// The heartbeat interval; `None` (`"auto"`) for a third of the TTL.
    #[serde(with = "text::duration_or_auto")]
    pub heartbeat_interval: Option<Duration>,
    /// How long shutdown waits for calls in flight.
    #[serde(with = "text::duration")]
    pub grace_period: Duration,
    /// How responses are compressed.
    pub send_compressed: Compression,
    /// Metadata labels registered with the instance.
    pub metadata: BTreeMap<String, String>,
    /// Message and connection limits.
    pub limits: ServiceLimits,
    /// HTTP/2 and TCP settings of the server's connections.
    pub http2: Http2Config,
    /// TLS; off unless `cert` and `key` are set.
    pub tls: ServerTlsConfig,
    /// The web protocols on the service's port (gRPC-Web, Connect, CORS).
    pub web: WebConfig,
    /// The server policy ([`server::policy`](crate::server::policy)).
    pub policy: crate::server::policy::Policy,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            version: String::new(),
            namespace: lodestar_core::DEFAULT_NAMESPACE.to_owned(),
            group: lodestar_core::DEFAULT_GROUP.to_owned(),
            weight: 100,
            zone: String::new(),
            id: String::new(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: String::new(),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ttl: Duration::from_secs(6),
            heartbeat_interval: None,
            grace_period: Duration::from_secs(10),
            send_compressed: Compression::None,
            metadata: BTreeMap::new(),
            limits: ServiceLimits::default(),
            http2: Http2Config::from(crate::Http2Settings::server()),
            tls: ServerTlsConfig::default(),
            web: WebConfig::default(),
            policy: crate::server::policy::Policy::default(),
        }
    }
}

/// `[service.limits]`: [`MessageLimits`](crate::MessageLimits) and
/// [`ConnectionLimits`](crate::ConnectionLimits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceLimits {
    /// The largest request message accepted, in bytes.
    pub max_receive_message_size: u64,
    /// The largest response message sent, in bytes.
    pub max_send_message_size: u64,
    /// Connections served at once.
    pub max_connections: u64,
    /// Response bytes one connection may hold unsent.
    pub max_unsent_bytes_per_connection: u64,
    /// Response bytes all connections may hold unsent.
    pub max_unsent_bytes: u64,
    /// How long a connection may hold unsent data without progress.
    #[serde(with = "text::duration")]
    pub stall_timeout: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        let messages = crate::MessageLimits::default();
        let connections = crate::ConnectionLimits::default();
        Self {
            max_receive_message_size: messages.max_decoding_message_size as u64,
            max_send_message_size: messages.max_encoding_message_size as u64,
            max_connections: connections.max_connections as u64,
            max_unsent_bytes_per_connection: connections.max_unsent_bytes_per_connection as u64,
            max_unsent_bytes: connections.max_unsent_bytes as u64,
            stall_timeout: connections.stall_timeout,
        }
    }
}

/// `[service.web]`: [`WebProtocols`](crate::server::WebProtocols).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WebConfig {
    /// Serve gRPC-Web.
    pub grpc_web: bool,
    /// Serve the Connect protocol.
    pub connect: bool,
    /// Serve WebSocket.
    pub websocket: bool,
    /// Serve REST routes from `google.api.http` annotations.
    pub rest: bool,
    /// How long a WebSocket may be silent before it is pinged.
    #[serde(with = "text::duration")]
    pub websocket_ping_interval: Duration,
    /// How long a pinged WebSocket may stay silent before it is closed.
    #[serde(with = "text::duration")]
    pub websocket_ping_timeout: Duration,
    /// Cross-origin access.
    pub cors: CorsConfig,
    /// Serve the browser client at `/_lodestar/client.js`.
    pub client_js: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        let web = crate::server::WebProtocols::default();
        Self {
            grpc_web: web.grpc_web,
            connect: web.connect,
            websocket: web.websocket,
            rest: web.rest,
            websocket_ping_interval: web.websocket_ping_interval,
            websocket_ping_timeout: web.websocket_ping_timeout,
            cors: CorsConfig::default(),
            client_js: web.client_js,
        }
    }
}

/// `[service.web.cors]`: [`Cors`](crate::server::Cors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorsConfig {
    /// The origins allowed, separated by commas; `*` for any; empty for none.
    pub allow_origins: String,
    /// More request headers allowed, separated by commas.
    pub allow_headers: String,
    /// How long browsers may cache a preflight's answer.
    #[serde(with = "text::duration")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allow_origins: String::new(),
            allow_headers: String::new(),
            max_age: crate::server::Cors::default().max_age,
        }
    }
}

/// `[service.http2]`: [`Http2Settings`](crate::Http2Settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Http2Config {
    /// HTTP/2 keepalive PINGs; `None` (`"off"`) for none.
    #[serde(with = "text::duration_or_off")]
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered.
    #[serde(with = "text::duration")]
    pub keepalive_timeout: Duration,
    /// TCP keepalive; `None` (`"off"`) for none.
    #[serde(with = "text::duration_or_off")]
    pub tcp_keepalive: Option<Duration>,
    /// Calls one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Flow-control windows sized by measured bandwidth.
    pub adaptive_window: bool,
    /// How long a new connection has for its handshake.
    #[serde(with = "text::duration")]
    pub handshake_timeout: Duration,
}

impl Default for Http2Config {
    fn default() -> Self {
        crate::Http2Settings::server().into()
    }
}

impl From<crate::Http2Settings> for Http2Config {
    fn from(settings: crate::Http2Settings) -> Self {
        Self {
            keepalive_interval: settings.keepalive_interval,
            keepalive_timeout: settings.keepalive_timeout,
            tcp_keepalive: settings.tcp_keepalive,
            max_concurrent_streams: settings.max_concurrent_streams,
            adaptive_window: settings.adaptive_window,
            handshake_timeout: settings.handshake_timeout,
        }
    }
}

impl From<&Http2Config> for crate::Http2Settings {
    fn from(config: &Http2Config) -> Self {
        Self {
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            tcp_keepalive: config.tcp_keepalive,
            max_concurrent_streams: config.max_concurrent_streams,
            adaptive_window: config.adaptive_window,
            handshake_timeout: config.handshake_timeout,
        }
    }
}

/// `[client.http2]`: the client's side of
/// [`Http2Settings`](crate::Http2Settings) (the rest concerns servers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientHttp2Config {
    /// HTTP/2 keepalive PINGs; `None` (`"off"`) for none.
    #[serde(with = "text::duration_or_off")]
    pub keepalive_interval: Option<Duration>,
    /// How long a PING or sent data may go unacknowledged.
    #[serde(with = "text::duration")]
    pub keepalive_timeout: Duration,
    /// TCP keepalive; `None` (`"off"`) for none.
    #[serde(with = "text::duration_or_off")]
    pub tcp_keepalive: Option<Duration>,
}

impl Default for ClientHttp2Config {
    fn default() -> Self {
        let settings = crate::Http2Settings::client();
        Self {
            keepalive_interval: settings.keepalive_interval,
            keepalive_timeout: settings.keepalive_timeout,
            tcp_keepalive: settings.tcp_keepalive,
        }
    }
}

impl From<&ClientHttp2Config> for crate::Http2Settings {
    fn from(config: &ClientHttp2Config) -> Self {
        Self {
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            tcp_keepalive: config.tcp_keepalive,
            ..crate::Http2Settings::client()
        }
    }
}

/// `[service.tls]`: the server's certificate and key, and the CA its
/// clients' certificates must chain to (mutual TLS). Empty paths: unset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerTlsConfig {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) client certificates must chain to; empty: none asked.
    pub client_ca: PathBuf,
}

/// `[client]`: the settings of [`ClientBuilder`](crate::client::ClientBuilder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The namespace services are looked up in.
    pub namespace: String,
    /// The group services are looked up in.
    pub group: String,
    /// The caller's zone; empty for none.
    pub zone: String,
    /// The default deadline of a call; `None` (`"off"`) for none.
    #[serde(with = "text::duration_or_off")]
    pub timeout: Option<Duration>,
    /// How long opening a connection may take.
    #[serde(with = "text::duration")]
    pub connect_timeout: Duration,
    /// How long a call waits for the registry's first answer.
    #[serde(with = "text::duration")]
    pub resolve_timeout: Duration,
    /// How many instances one call may try.
    pub max_attempts: u32,
    /// How long an instance that refused a connection is first skipped.
    #[serde(with = "text::duration")]
    pub ejection_base: Duration,
    /// The longest an instance is skipped.
    #[serde(with = "text::duration")]
    pub ejection_max: Duration,
    /// The share of instances below which ejected ones are used anyway.
    pub protection_threshold: f64,
    /// How messages are encoded.
    pub codec: CodecName,
    /// The wire protocol of calls.
    pub protocol: ClientProtocolName,
    /// How requests are compressed.
    pub send_compressed: Compression,
    /// The caller's labels, matched by routes.
    pub labels: BTreeMap<String, String>,
    /// Message limits.
    pub limits: ClientLimits,
    /// HTTP/2 and TCP settings of the client's connections.
    pub http2: ClientHttp2Config,
    /// TLS towards the services; off unless `ca` is set.
    pub tls: ClientTlsConfig,
    /// The client policy of every service called
    /// ([`client::policy`](crate::client::policy)).
    pub policy: crate::client::Policy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            namespace: lodestar_core::DEFAULT_NAMESPACE.to_owned(),
            group: lodestar_core::DEFAULT_GROUP.to_owned(),
            zone: String::new(),
            timeout: None,
            connect_timeout: Duration::from_secs(3),
            resolve_timeout: Duration::from_secs(5),
            max_attempts: 3,
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(30),
            protection_threshold: 0.0,
            codec: CodecName::Protobuf,
            protocol: ClientProtocolName::Grpc,
            send_compressed: Compression::None,
            labels: BTreeMap::new(),
            limits: ClientLimits::default(),
            http2: ClientHttp2Config::default(),
            tls: ClientTlsConfig::default(),
            policy: crate::client::Policy::default(),
        }
    }
}

/// `[client.limits]`: [`MessageLimits`](crate::MessageLimits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientLimits {
    /// The largest response message accepted, in bytes.
    pub max_receive_message_size: u64,
    /// The largest request message sent, in bytes.
    pub max_send_message_size: u64,
}

impl Default for ClientLimits {
    fn default() -> Self {
        let messages = crate::MessageLimits::default();
        Self {
            max_receive_message_size: messages.max_decoding_message_size as u64,
            max_send_message_size: messages.max_encoding_message_size as u64,
        }
    }
}

/// `[client.tls]`: the CA to trust, a client certificate, the name to
/// verify. Empty: unset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientTlsConfig {
    /// The CA certificate(s) (PEM) the services' certificates must chain to.
    pub ca: PathBuf,
    /// A client certificate chain (PEM), for mutual TLS.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The name the services' certificates are verified against, instead
    /// of their registered hosts.
    pub server_name: String,
}

/// `[registry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// The registry URL, opened by `lodestar_registry::from_config`.
    pub url: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_owned(),
        }
    }
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The broker URL, opened by `lodestar_broker::from_config`.
    pub url: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_owned(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Whether calls are counted (in the process's registry).
    pub enabled: bool,
    /// Whether go-grpc-prometheus's families are added.
    pub grpc_compat: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grpc_compat: false,
        }
    }
}

/// `[telemetry]`: [`Telemetry`](crate::telemetry::Telemetry)'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TelemetryConfig {
    /// Whether a service installs lodestar's subscriber at start.
    pub install: bool,
    /// Which events are logged (`EnvFilter` directives).
    pub log_filter: String,
    /// Text or JSON lines.
    pub log_format: LogFormatName,
    /// Where spans are exported; empty for nowhere.
    pub otlp_endpoint: String,
    /// How spans are exported.
    pub otlp_protocol: ProtocolName,
    /// Which traces are recorded.
    pub sampler: SamplerName,
    /// The ratio of the `*traceidratio` samplers.
    pub sampler_ratio: f64,
    /// The spans' `service.name`; empty for the service's name.
    pub service_name: String,
    /// More resource attributes of the spans.
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            install: true,
            log_filter: crate::telemetry::settings::DEFAULT_LOG_FILTER.to_owned(),
            log_format: LogFormatName::Text,
            otlp_endpoint: String::new(),
            otlp_protocol: ProtocolName::HttpProtobuf,
            sampler: SamplerName::ParentbasedAlwaysOn,
            sampler_ratio: 1.0,
            service_name: String::new(),
            resource_attributes: BTreeMap::new(),
        }
    }
}

/// How messages are compressed when sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not compressed.
    #[default]
    None,
    /// gzip.
    Gzip,
}

impl Compression {
    /// The encoding, if any.
    pub fn encoding(self) -> Option<crate::compression::Encoding> {
        match self {
            Self::None => None,
            Self::Gzip => Some(crate::compression::Encoding::Gzip),
        }
    }
}

/// How a client encodes messages: [`Codec`](crate::Codec) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// Protocol buffers.
    #[default]
    Protobuf,
    /// The proto3 JSON mapping.
    Json,
}

/// The wire protocol of a client's calls:
/// [`client::Protocol`](crate::client::Protocol) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ClientProtocolName {
    /// Native gRPC.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// gRPC-Web (binary).
    #[serde(rename = "grpc-web")]
    GrpcWeb,
    /// gRPC-Web text (base64).
    #[serde(rename = "grpc-web-text")]
    GrpcWebText,
    /// The Connect protocol.
    #[serde(rename = "connect")]
    Connect,
}

impl From<ClientProtocolName> for crate::client::Protocol {
    fn from(name: ClientProtocolName) -> Self {
        match name {
            ClientProtocolName::Grpc => crate::client::Protocol::Grpc,
            ClientProtocolName::GrpcWeb => crate::client::Protocol::GrpcWeb,
            ClientProtocolName::GrpcWebText => crate::client::Protocol::GrpcWebText,
            ClientProtocolName::Connect => crate::client::Protocol::Connect,
        }
    }
}

/// [`LogFormat`](crate::telemetry::LogFormat) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatName {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// [`Protocol`](crate::telemetry::Protocol) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ProtocolName {
    /// OTLP over gRPC.
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// [`Sampler`](crate::telemetry::Sampler) by name, as `OTEL_TRACES_SAMPLER`
/// spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerName {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// `sampler_ratio` of the traces.
    Traceidratio,
    /// As the caller decided; traces started here are sampled.
    #[default]
    ParentbasedAlwaysOn,
    /// As the caller decided; traces started here are not.
    ParentbasedAlwaysOff,
    /// As the caller decided; `sampler_ratio` of those started here.
    ParentbasedTraceidratio,
}
