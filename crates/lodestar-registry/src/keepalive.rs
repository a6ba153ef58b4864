//! Heartbeats over one `KeepAlive` stream per [`RemoteRegistry`](crate::RemoteRegistry).
//!
//! A `Heartbeat` call costs the server a whole HTTP/2 stream (headers in,
//! headers and trailers out); a message on an open stream costs a DATA
//! frame each way. Every heartbeat of a registry client goes on one stream,
//! answered in order. When the stream cannot be used (it broke, or the
//! server predates `KeepAlive`) the heartbeat goes as a `Heartbeat` call
//! instead, so no heartbeat is lost to the stream's troubles.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar::metadata::AsciiMetadataValue;
use lodestar::{Code, Status};
use tokio::sync::{mpsc, oneshot};

use crate::pb;
use crate::pb::registry_client::RegistryClient;

/// One heartbeat waiting to be sent, and where its answer goes.
type Pending = (pb::InstanceRef, oneshot::Sender<Result<(), Status>>);

/// The heartbeats that can be queued before callers wait for room.
const QUEUE: usize = 1024;

/// Why a heartbeat did not get an answer on the stream: send it as a call.
#[derive(Debug)]
pub(crate) struct Unusable;

/// The keep-alive stream of one registry client, opened on first use and
/// again after it breaks.
#[derive(Debug, Default)]
pub(crate) struct KeepAlive {
    queue: Mutex<Option<mpsc::Sender<Pending>>>,
    /// The server answered `UNIMPLEMENTED`: heartbeats go as calls.
    unsupported: Arc<AtomicBool>,
}

impl KeepAlive {
    /// Renews `reference` on the stream, opening it (on `client`, with
    /// `authorization`) if needed. `Ok` holds the server's answer, or
    /// `UNAVAILABLE` after `timeout`; `Err(Unusable)` means: send a
    /// `Heartbeat` call instead.
    pub(crate) async fn heartbeat(
        &self,
        client: impl FnOnce() -> RegistryClient<lodestar::client::Channel>,
        authorization: Option<&AsciiMetadataValue>,
        reference: pb::InstanceRef,
        timeout: Duration,
    ) -> Result<Result<(), Status>, Unusable> {
        if self.unsupported.load(Ordering::Relaxed) {
            return Err(Unusable);
        }
        let queue = {
            let mut slot = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref().filter(|queue| !queue.is_closed()) {
                Some(queue) => queue.clone(),
                None => {
                    let (queue, pending) = mpsc::channel(QUEUE);
                    tokio::spawn(run(
                        client(),
                        authorization.cloned(),
                        pending,
                        self.unsupported.clone(),
                    ));
                    *slot = Some(queue.clone());
                    queue
                }
            }
        };
        let (answer, answered) = oneshot::channel();
        let asked = async {
            queue
                .send((reference, answer))
                .await
                .map_err(|_| Unusable)?;
            answered.await.map_err(|_| Unusable)
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(answer) => answer,
            Err(_) => Ok(Err(Status::unavailable(format!(
                "the registry did not answer a heartbeat within {timeout:?}"
            )))),
        }
    }
}

/// Runs one stream: sends what is queued, hands each answer to the oldest
/// waiting heartbeat. Ends when the registry client is dropped or the
/// stream breaks; the heartbeats still waiting then get no answer, and
/// their callers send them as calls.
async fn run(
    mut client: RegistryClient<lodestar::client::Channel>,
    authorization: Option<AsciiMetadataValue>,
    mut queue: mpsc::Receiver<Pending>,
    unsupported: Arc<AtomicBool>,
) {
    let (outbound, requests) = mpsc::channel::<pb::InstanceRef>(QUEUE);
    let mut request = lodestar::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value);
    }
    let mut answers = match client.keep_alive(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if status.code() == Code::Unimplemented {
                unsupported.store(true, Ordering::Relaxed);
            } else {
                tracing::debug!(%status, "the registry keep-alive stream cannot be opened");
            }
            return;
        }
    };
    let mut waiting: VecDeque<oneshot::Sender<Result<(), Status>>> = VecDeque::new();
    loop {
        tokio::select! {
            next = queue.recv() => {
                let Some((reference, answer)) = next else { break };
                if outbound.send(reference).await.is_err() {
                    break;
                }
                waiting.push_back(answer);
            }
            answer = answers.message() => {
                let Ok(Some(answer)) = answer else { break };
                // More answers than questions: the stream is not ours to trust.
                let Some(waiter) = waiting.pop_front() else { break };
                let result = if answer.code == 0 {
                    Ok(())
                } else {
                    let code = Code::from(i32::try_from(answer.code).unwrap_or(i32::MAX));
                    Err(Status::new(code, answer.message))
                };
                let _ = waiter.send(result);
            }
        }
    }
}
