//! A service that misbehaves on demand, and a load client that reports how
//! its calls were spread: the fleet that balancing, routing and outlier
//! detection are tried against.
//!
//! Every reply of [`ChaosService`] names the instance that served it (in
//! the message, and in the [`INSTANCE_HEADER`] metadata of a failure), so a
//! client can count calls per instance whatever the outcome. Each call is
//! first delayed (`delay` plus a uniform `0..=jitter`), then failed with
//! `fail_code` with probability `fail_rate`. `Control` changes that at run
//! time.
//!
//! Two binaries run it as a fleet: `chaos-server` (one instance, its
//! misbehaviour set by flags) and `chaos-client` (calls by name, closed
//! loop or fixed rate, and prints one JSON [`summary::Summary`]). The
//! crate's `README.md` shows a fleet of four.
//!
//! ```
//! use chaos::{Behaviour, ChaosClient, ChaosService, Ping};
//! use lodestar::{Client, Code, MemoryRegistry, Service};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! let failing = Behaviour { fail_rate: 1.0, ..Behaviour::default() };
//! let server = Service::builder("chaos")
//!     .registry(registry.clone())
//!     .add_service(ChaosService::new("chaos-a", failing).into_server())
//!     .start()
//!     .await?;
//!
//! let client = Client::new(registry);
//! let mut chaos = ChaosClient::by_name(&client, "chaos");
//! let status = chaos.unary(Ping::default()).await.unwrap_err();
//! assert_eq!(status.code(), Code::Unavailable);
//! assert_eq!(chaos::instance_of(&status), Some("chaos-a".to_owned()));
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar::client::policy::{code_from_name, code_name};
use lodestar::{Code, Request, Response, Status, Streaming};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

pub mod flags;
pub mod summary;

/// Generated messages, server and client for the `chaos` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    lodestar::include_proto!("chaos");
}

pub use pb::chaos_client::ChaosClient;
pub use pb::chaos_server::{Chaos, ChaosServer};
pub use pb::{ControlRequest, Ping, Pong, StreamRequest};

/// The service name the example registers under by default.
pub const SERVICE_NAME: &str = "chaos";

/// Metadata of a failed call naming the instance that failed it.
pub const INSTANCE_HEADER: &str = "x-chaos-instance";

/// The longest delay (and the widest jitter) an instance accepts: 60 s.
pub const MAX_DELAY_MS: u32 = 60_000;

/// The most replies one `ServerStream` call may ask for.
pub const MAX_STREAM_REPLIES: u32 = 10_000;

/// Replies queued ahead of a slow reader, per stream.
const STREAM_BUFFER: usize = 16;

/// How an instance misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    /// Added to every call. Default: none.
    pub delay: Duration,
    /// A uniform random extra delay up to this. Default: none.
    pub jitter: Duration,
    /// The share of calls (0.0 to 1.0) failed with `fail_code`, after the
    /// delay. Default: 0.
    pub fail_rate: f64,
    /// The code failed calls get. Default: `UNAVAILABLE`.
    pub fail_code: Code,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            fail_rate: 0.0,
            fail_code: Code::Unavailable,
        }
    }
}

/// A behaviour that cannot be put in force: the field, the value, and
/// what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBehaviour(pub String);

impl std::fmt::Display for InvalidBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidBehaviour {}

impl Behaviour {
    /// This behaviour with the fields of `change` that are set, checked.
    pub fn changed(&self, change: &ControlRequest) -> Result<Behaviour, InvalidBehaviour> {
        let mut next = *self;
        if let Some(ms) = change.delay_ms {
            next.delay = delay("delay_ms", ms)?;
        }
        if let Some(ms) = change.delay_jitter_ms {
            next.jitter = delay("delay_jitter_ms", ms)?;
        }
        if let Some(rate) = change.fail_rate {
            next.fail_rate = fail_rate(rate)?;
        }
        if let Some(name) = &change.fail_code {
            next.fail_code = fail_code(name)?;
        }
        Ok(next)
    }

    /// As the `Control` method returns it.
    fn to_pb(self, instance: &str) -> pb::Behaviour {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        pb::Behaviour {
            instance: instance.to_owned(),
            delay_ms: ms(self.delay),
            delay_jitter_ms: ms(self.jitter),
            fail_rate: self.fail_rate,
            fail_code: code_name(self.fail_code).to_owned(),
        }
    }

    /// Waits as long as this behaviour says, then decides whether the call
    /// fails.
    async fn apply(self, instance: &str) -> Result<(), Status> {
        let mut wait = self.delay;
        if !self.jitter.is_zero() {
            let jitter = u64::try_from(self.jitter.as_micros()).unwrap_or(u64::MAX);
            wait += Duration::from_micros(fastrand::u64(0..=jitter));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            let mut status = Status::new(
                self.fail_code,
                format!("chaos: instance {instance} failed this call on purpose"),
            );
            if let Ok(value) = instance.parse() {
                status.metadata_mut().insert(INSTANCE_HEADER, value);
            }
            return Err(status);
        }
        Ok(())
    }
}

/// A delay in milliseconds, at most [`MAX_DELAY_MS`].
pub fn delay(field: &str, ms: u32) -> Result<Duration, InvalidBehaviour> {
    if ms > MAX_DELAY_MS {
        return Err(InvalidBehaviour(format!(
            "{field} = {ms}: expected at most {MAX_DELAY_MS} ms"
        )));
    }
    Ok(Duration::from_millis(u64::from(ms)))
}

/// A failure rate, from 0.0 to 1.0.
pub fn fail_rate(rate: f64) -> Result<f64, InvalidBehaviour> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(InvalidBehaviour(format!(
            "fail_rate = {rate}: expected a share from 0.0 to 1.0"
        )))
    }
}

/// A failure code by its gRPC name (`UNAVAILABLE`), not `OK`.
pub fn fail_code(name: &str) -> Result<Code, InvalidBehaviour> {
    match code_from_name(name) {
        Some(Code::Ok) | None => Err(InvalidBehaviour(format!(
            "fail_code = {name:?}: expected a gRPC code name other than OK, in upper case, \
             e.g. UNAVAILABLE"
        ))),
        Some(code) => Ok(code),
    }
}

/// The instance a failed call names in its [`INSTANCE_HEADER`], if any.
pub fn instance_of(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The Chaos service of one instance.
#[derive(Debug, Clone)]
pub struct ChaosService {
    instance: Arc<str>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl ChaosService {
    /// The service of instance `instance` (the id it registers under),
    /// behaving as `behaviour` until told otherwise.
    pub fn new(instance: impl Into<String>, behaviour: Behaviour) -> Self {
        Self {
            instance: Arc::from(instance.into()),
            behaviour: Arc::new(Mutex::new(behaviour)),
        }
    }

    /// The generated server around this implementation.
    pub fn into_server(self) -> ChaosServer<Self> {
        ChaosServer::new(self)
    }

    /// The behaviour now in force.
    pub fn behaviour(&self) -> Behaviour {
        *self.behaviour.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pong(&self, body: Vec<u8>, seq: u32) -> Pong {
        Pong {
            instance: self.instance.to_string(),
            body,
            seq,
        }
    }
}

type PongStream = Pin<Box<dyn Stream<Item = Result<Pong, Status>> + Send>>;

#[lodestar::async_trait]
impl Chaos for ChaosService {
    async fn unary(&self, request: Request<Ping>) -> Result<Response<Pong>, Status> {
        self.behaviour().apply(&self.instance).await?;
        Ok(Response::new(self.pong(request.into_inner().body, 0)))
    }

    type ServerStreamStream = PongStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let count = request.into_inner().count;
        if count > MAX_STREAM_REPLIES {
            return Err(Status::invalid_argument(format!(
                "count = {count}: expected at most {MAX_STREAM_REPLIES}"
            )));
        }
        self.behaviour().apply(&self.instance).await?;
        let this = self.clone();
        let replies = tokio_stream::iter(0..count).map(move |seq| Ok(this.pong(Vec::new(), seq)));
        Ok(Response::new(Box::pin(replies)))
    }

    type BidiStream = PongStream;

    async fn bidi(
        &self,
        request: Request<Streaming<Ping>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let mut pings = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            let mut seq = 0u32;
            while let Some(ping) = pings.next().await {
                let reply = match ping {
                    Ok(ping) => match this.behaviour().apply(&this.instance).await {
                        Ok(()) => Ok(this.pong(ping.body, seq)),
                        Err(status) => Err(status),
                    },
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return; // the caller went away, or the stream ends failed
                }
                seq = seq.wrapping_add(1);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn control(
        &self,
        request: Request<ControlRequest>,
    ) -> Result<Response<pb::Behaviour>, Status> {
        let change = request.into_inner();
        let mut behaviour = self.behaviour.lock().unwrap_or_else(|e| e.into_inner());
        let next = behaviour
            .changed(&change)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        *behaviour = next;
        Ok(Response::new(next.to_pb(&self.instance)))
    }
}

/// Labels given as `k=v,k2=v2` (empty: none).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?}: expected key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("label {pair:?}: the key is empty"));
        }
        labels.insert(key.to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_checked_field_by_field_and_names_what_is_wrong() {
        let base = Behaviour::default();
        let change = |f: fn(&mut ControlRequest)| {
            let mut c = ControlRequest::default();
            f(&mut c);
            base.changed(&c)
        };
        let slow = change(|c| c.delay_ms = Some(20)).unwrap();
        assert_eq!(slow.delay, Duration::from_millis(20));
        assert_eq!(slow.fail_rate, 0.0, "unset fields are kept");
        let e = change(|c| c.delay_jitter_ms = Some(MAX_DELAY_MS + 1)).unwrap_err();
        assert!(e.0.contains("delay_jitter_ms = 60001"), "{e}");
        let e = change(|c| c.fail_rate = Some(1.5)).unwrap_err();
        assert!(e.0.contains("fail_rate = 1.5"), "{e}");
        let e = change(|c| c.fail_rate = Some(f64::NAN)).unwrap_err();
        assert!(e.0.contains("fail_rate = NaN"), "{e}");
        let e = change(|c| c.fail_code = Some("OK".into())).unwrap_err();
        assert!(e.0.contains("fail_code = \"OK\""), "{e}");
        let e = change(|c| c.fail_code = Some("unavailable".into())).unwrap_err();
        assert!(e.0.contains("upper case"), "{e}");
        let internal = change(|c| c.fail_code = Some("INTERNAL".into())).unwrap();
        assert_eq!(internal.fail_code, Code::Internal);
    }

    #[test]
    fn labels_read_as_pairs_and_refuse_a_pair_without_a_key() {
        let labels = parse_labels("version=v2, canary=true").unwrap();
        assert_eq!(labels["version"], "v2");
        assert_eq!(labels["canary"], "true");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("version").unwrap_err().contains("key=value"));
        assert!(parse_labels("=v").unwrap_err().contains("key is empty"));
    }
}
