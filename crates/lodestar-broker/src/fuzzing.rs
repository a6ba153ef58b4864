//! Entry points for the fuzz targets in `fuzz/` (not part of the API).

use std::sync::Arc;
use std::time::Duration;

use lodestar::broker::Message;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::http::{Endpoints, serve_io};

/// The subscription id [`serve_http`] serves.
pub const SUBSCRIPTION: &str = "fuzz-1";

/// What one HTTP broker connection did with the bytes a peer sent.
#[derive(Debug, Default)]
pub struct Served {
    /// The bytes written back (the responses).
    pub response: Vec<u8>,
    /// The messages delivered to the subscription.
    pub delivered: Vec<Message>,
}

/// Serves `request` (raw bytes, as a peer sends them on one connection) with
/// the HTTP broker's subscriber endpoint, which has one subscription,
/// [`SUBSCRIPTION`], to `topic`, and refuses bodies over `max_body`.
///
/// Call it on a current-thread runtime with paused time: a connection that
/// waits for more is given up after `patience` of (virtual) time.
pub async fn serve_http(
    request: &[u8],
    topic: &str,
    max_body: usize,
    patience: Duration,
) -> Served {
    let endpoints = Arc::new(Endpoints::new(max_body));
    let (tx, mut rx) = mpsc::channel(4);
    endpoints.subscribe(SUBSCRIPTION.to_owned(), topic.to_owned(), tx);
    let (mut peer, server) = tokio::io::duplex(64 * 1024);
    let serving = tokio::spawn(serve_io(server, endpoints));
    let (mut response, mut delivered) = (Vec::new(), Vec::new());
    let exchange = async {
        let (mut reading, mut writing) = tokio::io::split(&mut peer);
        let write = async {
            let _ = writing.write_all(request).await;
            let _ = writing.shutdown().await;
        };
        let read = async {
            let _ = reading.read_to_end(&mut response).await;
        };
        let drain = async {
            while let Some(delivery) = rx.recv().await {
                delivered.push(delivery.message);
            }
        };
        // The drain ends only when the time is up: the endpoint keeps a sender.
        tokio::join!(write, read, drain);
    };
    let _ = tokio::time::timeout(patience, exchange).await;
    serving.abort();
    Served {
        response,
        delivered,
    }
}

/// The servers of a `nats://` URL as [`NatsBroker::connect`](crate::NatsBroker::connect)
/// parses them, without connecting: their number, and the hosts shown in
/// errors and `Debug`.
#[cfg(feature = "nats")]
pub fn nats_servers(url: &str) -> Result<(usize, String), lodestar::broker::BrokerError> {
    crate::nats::servers(url).map(|(servers, shown)| (servers.len(), shown))
}
