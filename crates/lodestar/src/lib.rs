//! # lodestar
//!
//! A microservice framework for Rust. Write a `.proto`, generate a typed
//! server trait and client with [`lodestar-build`](https://docs.rs/lodestar-build),
//! implement the trait, and start it with [`Service::builder`]. Other
//! processes call it **by service name**: lodestar finds the instances in a
//! [`Registry`], balances calls across them, carries deadlines and
//! metadata, and keeps working when instances come and go.
//!
//! ```
//! // `greeter` is the example crate: `helloworld.proto` plus a `Greeter` implementation.
//! use greeter::{GreeterClient, GreeterServer, HelloRequest, MyGreeter};
//! use lodestar::{Client, MemoryRegistry, Service};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//!
//! // A server: serves gRPC (with health and reflection), registers itself
//! // and heartbeats. `run()` instead of `start()` would also shut down
//! // gracefully on SIGINT/SIGTERM.
//! let running = Service::builder("greeter")
//!     .version("1.0.0")
//!     .bind("127.0.0.1:0".parse()?)
//!     .registry(registry.clone())
//!     .add_service(GreeterServer::new(MyGreeter))
//!     .start()
//!     .await?;
//!
//! // A client: calls `greeter` by name.
//! let client = Client::new(registry);
//! let mut greeter = GreeterClient::by_name(&client, "greeter");
//! let reply = greeter.say_hello(HelloRequest { name: "Ada".into() }).await?;
//! assert_eq!(reply.into_inner().message, "Hello Ada!");
//!
//! running.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The parts:
//!
//! * [`Registry`] with [`MemoryRegistry`] (in process);
//! * [`Client`] and [`client::Channel`]: discovery, load balancing,
//!   ejection of dead instances, deadlines, circuit breakers and a bulkhead;
//! * [`Service`]: the builder that serves, registers and owns the lifecycle;
//! * [`Deadline`]: deadlines that travel from an inbound call to the calls it makes;
//! * [`fault`]: fault injection, in the client and server policies.
//!
//! See `docs/architecture.md` in the repository for how a call flows.

pub mod admin;
mod body;
pub mod client;
pub mod codec;
pub mod compression;
pub mod config;
mod deadline;
pub mod events;
pub mod fault;
mod frames;
#[doc(hidden)]
pub mod fuzzing;
mod grpc_timeout;
mod headers;
mod io;
pub mod metrics;
mod policy_data;

pub mod server;
mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;
mod web_text;

pub use client::Client;
pub use codec::Codec;
pub use deadline::Deadline;
pub use lodestar_core::{
    Broker, BrokerError, DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, InstanceKey, MemoryBroker,
    MemoryRegistry, Message, Registry, RegistryError, Revision, ServiceKey, StaticRegistry,
    WatchEvent, WatchStream, broker, parse_host_ports, registry,
};
pub use server::{ConnectionLimits, RunningService, Service, ServiceBuilder};
/// gRPC metadata (headers and trailers) types.
pub use tonic::metadata;
pub use tonic::{Code, Request, Response, Status, Streaming, async_trait};

/// Trailing metadata for a successful response.
///
/// A failed call carries trailers in its [`Status`]'s metadata; a handler
/// that succeeds puts a `Trailers` in its response's extensions, and the
/// server sends them with the final status.
///
/// ```
/// let mut trailers = lodestar::metadata::MetadataMap::new();
/// trailers.insert("x-checksum", "5a2f".parse().unwrap());
/// let mut response = lodestar::Response::new(());
/// response.extensions_mut().insert(lodestar::Trailers(trailers));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Trailers(pub tonic::metadata::MetadataMap);

/// HTTP/2 connection settings, for servers
/// ([`ServiceBuilder::http2`](crate::ServiceBuilder::http2)) and clients
/// ([`ClientBuilder::http2`](crate::client::ClientBuilder::http2)).
///
/// A connection whose peer died without a word is found by TCP keepalive
/// (`tcp_keepalive`), which the kernel runs at no cost per call. HTTP/2
/// keepalive PINGs are off by default: gRPC servers in every language
/// refuse a client's PINGs more often than every 5 minutes unless told
/// otherwise (`GOAWAY` with `too_many_pings`), and on servers hyper's PING
/// bookkeeping reads the clock on every frame.
///
/// ```
/// use std::time::Duration;
/// let settings = lodestar::Http2Settings {
///     keepalive_interval: Some(Duration::from_secs(300)),
///     ..lodestar::Http2Settings::client()
/// };
/// assert_eq!(settings.keepalive_timeout, Duration::from_secs(20));
/// assert_eq!(settings.tcp_keepalive, Some(Duration::from_secs(30)));
/// assert_eq!(lodestar::Http2Settings::server().keepalive_interval, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// Send an HTTP/2 PING this often (servers: after this long without
    /// frames from the client), and close the connection if it is not
    /// answered within `keepalive_timeout`. `None`: never. Default: none. A
    /// peer that is a gRPC server allows one every 5 minutes at most, by
    /// default.
    pub keepalive_interval: Option<std::time::Duration>,
    /// Close the connection if a keepalive PING is not answered within
    /// this; clients also close it if data they sent is not acknowledged
    /// by the instance's TCP within this (`TCP_USER_TIMEOUT`, on Linux).
    /// Default: 20 s.
    pub keepalive_timeout: std::time::Duration,
    /// Have the kernel probe a connection idle for this long (TCP
    /// keepalive: then every 10 s, closing it after 3 probes go
    /// unanswered). `None`: never. Default: 30 s for clients, 60 s for
    /// servers.
    pub tcp_keepalive: Option<std::time::Duration>,
    /// Servers: how many calls one connection may have open at once; a
    /// client waits for a slot beyond that. Default: 1024.
    pub max_concurrent_streams: u32,
    /// Servers: size flow-control windows by measured bandwidth and
    /// latency (BDP), starting from 64 KiB and growing to at most 16 MiB
    /// per connection, instead of the fixed windows of 2 MiB per call and
    /// 5 MiB per connection that clients use too. Default: off. Turn it on
    /// for clients that upload large requests over long, fast links (more
    /// than 5 MiB in flight per round trip); it costs a lock and a clock
    /// read for every DATA frame received (callgrind: about 5% of the
    /// server's instructions per bidi round trip), and lets a connection
    /// hold up to 16 MiB of unread requests.
    pub adaptive_window: bool,
    /// Servers: how long a new connection has to finish its TLS handshake
    /// and send the HTTP/2 preface before it is closed. Default: 10 s.
    pub handshake_timeout: std::time::Duration,
}

impl Http2Settings {
    /// The defaults for clients.
    pub fn client() -> Self {
        Self {
            tcp_keepalive: Some(std::time::Duration::from_secs(30)),
            ..Self::server()
        }
    }

    /// The defaults for servers.
    pub fn server() -> Self {
        Self {
            keepalive_interval: None,
            keepalive_timeout: std::time::Duration::from_secs(20),
            tcp_keepalive: Some(std::time::Duration::from_secs(60)),
            max_concurrent_streams: 1024,
            adaptive_window: false,
            handshake_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// The flow-control window of one call's received data (responses on a
/// client; requests on a server without
/// [`adaptive_window`](Http2Settings::adaptive_window)): 2 MiB, hyper's
/// client default.
pub(crate) const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// The flow-control window of all the calls of one connection, as
/// [`STREAM_WINDOW`]: 5 MiB, hyper's client default.
pub(crate) const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Limits on the size of one gRPC message, in bytes, after decompression.
///
/// A message larger than `max_decoding_message_size` is refused with
/// `RESOURCE_EXHAUSTED`; the connection and the server carry on. Servers and
/// clients each apply their own limits.
///
/// ```
/// let limits = lodestar::MessageLimits::default();
/// assert_eq!(limits.max_decoding_message_size, 4 * 1024 * 1024);
/// assert_eq!(limits.max_encoding_message_size, 4 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Largest message accepted. Default: 4 MiB (gRPC's usual default).
    pub max_decoding_message_size: usize,
    /// Largest message sent. Default: 4 MiB.
    pub max_encoding_message_size: usize,
}

impl Default for MessageLimits {
    fn default() -> Self {
        Self {
            max_decoding_message_size: 4 * 1024 * 1024,
            max_encoding_message_size: 4 * 1024 * 1024,
        }
    }
}

/// Includes the code that `lodestar-build` generated for a protobuf package.
///
/// ```ignore
/// pub mod routeguide {
///     lodestar::include_proto!("routeguide");
/// }
/// ```
#[macro_export]
macro_rules! include_proto {
    ($package:tt) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
    };
}

/// What generated code refers to. Not for direct use; its contents follow
/// the generator and may change.
#[doc(hidden)]
pub mod codegen {
    pub use crate::codec::ProstCodec;
    pub use prost;
    pub use prost_types;
    pub use tonic;
    pub use tonic_prost;
}
