//! lodestar's event brokers beyond the in-process
//! [`MemoryBroker`](lodestar::MemoryBroker):
//!
//! * [`HttpBroker`]: no infrastructure; subscribers run a small HTTP
//!   endpoint and are found through the registry (as in go-micro);
//! * `NatsBroker` (feature `nats`, on by default): NATS core, at most once,
//!   and JetStream durable subscriptions, at least once.
//!
//! [`from_url`] picks one from a URL: `memory://`, `http://` (with a
//! registry) or `nats://host:4222[,host:4222]`.

#[doc(hidden)]
pub mod fuzzing;
pub mod http;
#[cfg(feature = "nats")]
pub mod nats;

use std::sync::Arc;

pub use http::HttpBroker;
pub use lodestar::broker::{
    Broker, BrokerError, Delivery, Durable, Message, SubscribeOptions, Subscription, header,
};
#[cfg(feature = "nats")]
pub use nats::NatsBroker;

/// The broker URL used when none is given.
pub const DEFAULT_URL: &str = "memory://";

/// A broker URL that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", match .unreachable {
    false => format!("unsupported broker URL `{}`: {}", .url, .reason),
    true => format!("the broker at `{}` cannot be used: {}", .url, .reason),
})]
pub struct UrlError {
    /// The URL, with any credentials removed.
    url: String,
    reason: String,
    /// The URL is fine; the broker could not be reached.
    unreachable: bool,
}

impl UrlError {
    /// Whether the URL itself is fine and the broker could not be reached
    /// (worth retrying), rather than the URL being unusable.
    pub fn is_unreachable(&self) -> bool {
        self.unreachable
    }
}

/// `url` without `user:password@` parts.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let hosts: Vec<&str> = rest
        .split(',')
        .map(|h| h.rsplit_once('@').map_or(h, |(_, host)| host))
        .collect();
    format!("{scheme}://{}", hosts.join(","))
}

/// A broker from its URL:
///
/// * `memory://`: a broker inside this process;
/// * `http://[bind_host:port][?advertise=host:port]`: the HTTP broker,
///   finding subscribers through `registry`; its subscribers listen on
///   `bind` (default `127.0.0.1:0`) and register `advertise` (default the
///   bound address; required for an unspecified one like `0.0.0.0`);
/// * `nats://host:4222[,host:4222…]`: a NATS cluster (feature `nats`).
///
/// Connecting to NATS happens here, so an unreachable server is an error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = std::sync::Arc::new(lodestar::MemoryRegistry::new());
/// assert!(lodestar_broker::from_url("memory://", registry.clone()).await.is_ok());
/// let error = lodestar_broker::from_url("kafka://h:9092", registry).await.unwrap_err();
/// assert!(error.to_string().contains("expected memory://"));
/// # }
/// ```
pub async fn from_url(
    url: &str,
    registry: Arc<dyn lodestar::Registry>,
) -> Result<Arc<dyn Broker>, UrlError> {
    let error = |reason: String| UrlError {
        url: without_credentials(url),
        reason,
        unreachable: false,
    };
    let expected = "expected memory://, http:// or nats://host:4222[,host:4222]";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| error(expected.to_owned()))?;
    match scheme {
        "memory" if rest.is_empty() => Ok(Arc::new(lodestar::MemoryBroker::new())),
        "http" => http_broker(rest, registry).map_err(error),
        #[cfg(feature = "nats")]
        "nats" => match NatsBroker::connect(url).await {
            Ok(broker) => Ok(Arc::new(broker)),
            Err(BrokerError::Unavailable(reason)) => Err(UrlError {
                unreachable: true,
                ..error(reason)
            }),
            Err(e) => Err(error(e.to_string())),
        },
        _ => Err(error(expected.to_owned())),
    }
}

/// The broker a configuration names: `[broker] url` (see [`from_url`]),
/// which is `memory://` unless the file or the environment
/// (`LODESTAR_BROKER_URL`, or `LODESTAR_BROKER` as before) says otherwise.
/// `registry` is where the HTTP broker finds subscribers (usually
/// `lodestar_registry::from_config(&config)?`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = lodestar::config::Config::from_toml("[broker]\nurl = \"memory://\"")?;
/// let registry = std::sync::Arc::new(lodestar::MemoryRegistry::new());
/// let broker = lodestar_broker::from_config(&config, registry).await?;
/// let builder = lodestar::ServiceBuilder::from_config(
///     &lodestar::config::Config::from_toml("service.name = \"billing\"")?,
/// )?
/// .broker(broker);
/// # drop(builder);
/// # Ok(()) }
/// ```
pub async fn from_config(
    config: &lodestar::config::Config,
    registry: Arc<dyn lodestar::Registry>,
) -> Result<Arc<dyn Broker>, UrlError> {
    from_url(&config.broker.url, registry).await
}

/// The HTTP broker from the part of its URL after `http://`.
fn http_broker(
    rest: &str,
    registry: Arc<dyn lodestar::Registry>,
) -> Result<Arc<dyn Broker>, String> {
    let (bind, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut builder = HttpBroker::builder(registry);
    let bind = bind.trim_end_matches('/');
    if !bind.is_empty() {
        let address: std::net::SocketAddr = bind
            .parse()
            .map_err(|_| format!("`{bind}` is not an address to listen on (ip:port)"))?;
        builder = builder.bind(address);
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("advertise", address)) if address.rsplit_once(':').is_some() => {
                builder = builder.advertise(address);
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{pair}` (expected advertise=host:port)"
                ));
            }
        }
    }
    Ok(Arc::new(builder.build()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_checked_with_clear_errors() {
        let registry: Arc<dyn lodestar::Registry> = Arc::new(lodestar::MemoryRegistry::new());
        for good in [
            "memory://",
            "http://",
            "http://127.0.0.1:0",
            "http://0.0.0.0:0?advertise=10.0.0.7:0",
        ] {
            assert!(from_url(good, registry.clone()).await.is_ok(), "{good}");
        }
        for (bad, says) in [
            ("memory://x", "expected memory://"),
            ("http://nohost", "not an address to listen on"),
            ("http://127.0.0.1:0?advertise", "unknown parameter"),
            ("nats://h", "is not host:port"),
            ("nats://127.0.0.1:1", "cannot be used: cannot connect"),
            ("amqp://h:5672", "expected memory://"),
            ("no-scheme", "expected memory://"),
        ] {
            let error = from_url(bad, registry.clone())
                .await
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(bad) && error.contains(says),
                "{bad}: {error}"
            );
        }
    }
}
