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
#[error("unsupported broker URL `{url}`: {reason}")]
pub struct UrlError {
    url: String,
    reason: String,
}

/// A broker from its URL:
///
/// * `memory://`: a broker inside this process;
/// * `http://`: the HTTP broker, finding subscribers through `registry`;
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
        url: url.to_owned(),
        reason,
    };
    let expected = "expected memory://, http:// or nats://host:4222[,host:4222]";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| error(expected.to_owned()))?;
    match scheme {
        "memory" if rest.is_empty() => Ok(Arc::new(lodestar::MemoryBroker::new())),
        "http" if rest.is_empty() || rest == "/" => Ok(Arc::new(HttpBroker::new(registry))),
        #[cfg(feature = "nats")]
        "nats" => match NatsBroker::connect(url).await {
            Ok(broker) => Ok(Arc::new(broker)),
            Err(e) => Err(error(e.to_string())),
        },
        _ => Err(error(expected.to_owned())),
    }
}
