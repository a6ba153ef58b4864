//! Settings as text: `lodestar.toml`, the environment over it, and the
//! grammar of durations shared with the `lodestar` command's flags.
//!
//! # One file, then the environment, then code
//!
//! Every setting of a service and a client can be written in one file,
//! `lodestar.toml`, read into a plain typed [`Config`]. Each key has an
//! environment variable that wins over the file (`LODESTAR_<SECTION>_<KEY>`:
//! `service.bind` is `LODESTAR_SERVICE_BIND`), and what is then set in code
//! on the builders wins over both. The order is the twelve-factor one: the
//! file is the shape of the deployment, the environment what differs
//! between its instances, code what the program insists on.
//!
//! # One table of keys
//!
//! Every key is one entry of [`KEYS`]: its path, what its value must be
//! ([`Kind`]), its default, its variables and what it means. Loading checks
//! files and variables against it; [`default_toml`] (what `lodestar config
//! defaults` prints and `lodestar new` writes) and [`reference_markdown`]
//! (`docs/configuration.md`) are generated from it; and tests check it
//! against [`Config`] itself, so that the table, the types and the docs
//! cannot drift apart.
//!
//! # Errors that say where
//!
//! A [`ConfigError`] names the file, line, column and key. An unknown key is
//! refused with the closest known key; a bad value with the value and what
//! was expected; a variable by its name:
//!
//! ```
//! use lodestar::config::Config;
//!
//! let error = Config::from_toml("[servce]\nbind = \"0.0.0.0:50051\"").unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "unknown key `servce.bind` at line 2, column 1; did you mean `service.bind`?"
//! );
//!
//! let error = Config::from_toml("[service]\nttl = \"5 parsecs\"").unwrap_err();
//! assert!(error.to_string().starts_with("key `service.ttl` at line 2, column 7 is \"5 parsecs\": expected a duration"));
//!
//! let env = [("LODESTAR_SERVICE_WEIGHT".to_owned(), "-1".to_owned())];
//! let error = Config::from_env(env).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "LODESTAR_SERVICE_WEIGHT (key `service.weight`) is \"-1\": expected a whole number from 0 to 10000"
//! );
//! ```
//!
//! # Who opens what
//!
//! `lodestar` builds what it owns from a [`Config`]:
//! [`ServiceBuilder::from_config`](crate::ServiceBuilder::from_config),
//! [`Client::from_config`](crate::Client::from_config) and
//! [`Config::telemetry`]. The registry and the broker have their own crates,
//! which depend on this one, so they open theirs: `lodestar_registry::from_config`
//! (`[registry] url`, `memory://` by default) and
//! `lodestar_broker::from_config` (`[broker] url`, `memory://` by default).
//! A service started from a file:
//!
//! ```
//! use greeter::{GreeterServer, MyGreeter};
//! use lodestar::config::Config;
//! use lodestar::{Client, MemoryRegistry, ServiceBuilder};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Usually `Config::load("lodestar.toml")?`: the file, then the environment.
//! let config = Config::from_toml(r#"
//!     [service]
//!     name = "greeter"
//!     version = "1.4.0"
//!     bind = "127.0.0.1:0"
//!     admin = "off"
//!     [service.metadata]
//!     team = "greetings"
//!
//!     [client]
//!     timeout = "2s"
//!
//!     [telemetry]
//!     install = false
//! "#)?;
//!
//! // With lodestar-registry: `let registry = lodestar_registry::from_config(&config)?;`
//! let registry = MemoryRegistry::new();
//! let running = ServiceBuilder::from_config(&config)?
//!     .registry(registry.clone()) // what code sets wins
//!     .add_service(GreeterServer::new(MyGreeter))
//!     .start()
//!     .await?;
//!
//! let client = Client::from_config(registry, &config)?.build();
//! let mut greeter = greeter::GreeterClient::by_name(&client, "greeter");
//! let reply = greeter.say_hello(greeter::HelloRequest { name: "Ada".into() }).await?;
//! assert_eq!(reply.into_inner().message, "Hello Ada!");
//! running.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Durations
//!
//! One grammar for `lodestar.toml`, environment variables and every flag:
//! [`parse_duration`] (`500ms`, `2s`, `1m30s`), written back by
//! [`format_duration`].

mod builders;
mod duration;
mod error;
mod keys;
mod load;
mod model;
mod reference;
#[cfg(test)]
mod tests;
mod text;

pub use duration::{DurationError, MAX_DURATION, format_duration, parse_duration};
pub use error::{ConfigError, Origin};
pub use keys::{KEYS, Key, Kind, MAX_LABELS, MAX_TEXT, closest_variable, key};
pub use load::{MAX_CONFIG_FILE, MAX_ENV_VALUE};
pub use model::{
    BrokerConfig, ClientConfig, ClientHttp2Config, ClientLimits, ClientProtocolName,
    ClientTlsConfig, CodecName, Compression, Config, CorsConfig, Http2Config, LogFormatName,
    MetricsConfig, ProtocolName, RegistryConfig, SamplerName, ServerTlsConfig, ServiceConfig,
    ServiceLimits, TelemetryConfig, WebConfig,
};
pub use reference::{default_toml, reference_markdown};
