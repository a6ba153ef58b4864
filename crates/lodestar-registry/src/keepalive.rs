//! Heartbeats over one `KeepAlive` stream per [`RemoteRegistry`](crate::RemoteRegistry).
//!
//! A `Heartbeat` call costs the server a whole HTTP/2 stream (headers in,
//! headers and trailers out); a message on an open stream costs a DATA
//! frame each way. Every heartbeat of a registry client goes on one stream,
//! answered in order. When the stream cannot be used the heartbeat goes as
//! a `Heartbeat` call instead, so that no lease is lost to the stream's
//! troubles:
//!
//! * it broke, or the server ended it (shutting down): the heartbeats
//!   waiting for an answer go as calls, and the next one opens a new stream;
//! * it stalled (no answer within [`STALL`]): it is given up the same way;
//! * it could not be opened: heartbeats go as calls for a second, or for
//!   [`RETRY_UNSUPPORTED`] when the server has no `KeepAlive` at all.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodestar::metadata::AsciiMetadataValue;
use lodestar::{Code, Status};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::pb;
use crate::pb::registry_client::RegistryClient;
use lodestar_core::sync::MutexExt;

/// One heartbeat waiting to be sent, and where its answer goes.
type Pending = (pb::InstanceRef, oneshot::Sender<Result<(), Status>>);

/// The heartbeats that can wait for an answer on one stream; callers past
/// that wait for room.
const QUEUE: usize = 1024;

/// A stream whose oldest heartbeat has waited this long for its answer is
/// given up (a hung server, a half-open connection): well inside the
/// shortest useful lease, so the calls that replace it still land in time.
const STALL: Duration = Duration::from_secs(1);

/// After the server said it has no `KeepAlive`, how long heartbeats go as
/// calls before the stream is tried again (servers get upgraded).
const RETRY_UNSUPPORTED: Duration = Duration::from_secs(300);

/// After a stream could not be opened, how long heartbeats go as calls.
const RETRY_FAILED: Duration = Duration::from_secs(1);

/// Why a heartbeat did not get an answer on the stream: send it as a call.
#[derive(Debug)]
pub(crate) struct Unusable;

/// The keep-alive stream of one registry client, opened on first use and
/// again after it breaks.
#[derive(Debug, Default)]
pub(crate) struct KeepAlive {
    queue: Mutex<Option<mpsc::Sender<Pending>>>,
    /// Until when heartbeats go as calls (the stream could not be opened).
    calls_until: Arc<Mutex<Option<Instant>>>,
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
        let calls_until = *self.calls_until.lock_unpoisoned();
        if calls_until.is_some_and(|until| Instant::now() < until) {
            return Err(Unusable);
        }
        let queue = {
            let mut slot = self.queue.lock_unpoisoned();
            match slot.as_ref().filter(|queue| !queue.is_closed()) {
                Some(queue) => queue.clone(),
                None => {
                    let (queue, pending) = mpsc::channel(QUEUE);
                    tokio::spawn(run(
                        client(),
                        authorization.cloned(),
                        pending,
                        self.calls_until.clone(),
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
            Err(_) => {
                // Not this stream again: the next heartbeat opens another.
                let mut slot = self.queue.lock_unpoisoned();
                if slot.as_ref().is_some_and(|q| q.same_channel(&queue)) {
                    *slot = None;
                }
                Ok(Err(Status::unavailable(format!(
                    "the registry did not answer a heartbeat within {timeout:?}"
                ))))
            }
        }
    }
}

/// Runs one stream: sends what is queued, hands each answer to the oldest
/// waiting heartbeat. Ends when the registry client is dropped, or the
/// stream breaks or stalls; the heartbeats still waiting then get no
/// answer, and their callers send them as calls.
async fn run(
    mut client: RegistryClient<lodestar::client::Channel>,
    authorization: Option<AsciiMetadataValue>,
    mut queue: mpsc::Receiver<Pending>,
    calls_until: Arc<Mutex<Option<Instant>>>,
) {
    // Unbounded, but never holding more than QUEUE: a heartbeat is taken
    // from `queue` only while fewer than QUEUE wait for their answer. So
    // sending never waits, and answers are always read (a slow server
    // cannot wedge both directions).
    let (outbound, requests) = mpsc::unbounded_channel::<pb::InstanceRef>();
    let mut request = lodestar::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(
        requests,
    ));
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value);
    }
    let mut answers = match client.keep_alive(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let retry = if status.code() == Code::Unimplemented {
                RETRY_UNSUPPORTED
            } else {
                tracing::debug!(%status, "the registry keep-alive stream cannot be opened");
                RETRY_FAILED
            };
            *calls_until.lock_unpoisoned() = Some(Instant::now() + retry);
            return;
        }
    };
    let mut waiting: VecDeque<(Instant, oneshot::Sender<Result<(), Status>>)> = VecDeque::new();
    loop {
        let stalled_at = waiting.front().map(|(sent, _)| *sent + STALL);
        tokio::select! {
            next = queue.recv(), if waiting.len() < QUEUE => {
                let Some((reference, answer)) = next else { break };
                if outbound.send(reference).is_err() {
                    break;
                }
                waiting.push_back((Instant::now(), answer));
            }
            answer = answers.message() => {
                let Ok(Some(answer)) = answer else { break };
                // More answers than questions: the stream is not ours to trust.
                let Some((_, waiter)) = waiting.pop_front() else { break };
                let result = if answer.code == 0 {
                    Ok(())
                } else {
                    let code = Code::from(i32::try_from(answer.code).unwrap_or(i32::MAX));
                    Err(Status::new(code, answer.message))
                };
                let _ = waiter.send(result);
            }
            () = sleep_until(stalled_at) => {
                tracing::debug!(?STALL, "the registry keep-alive stream stalled; heartbeats go as calls");
                break;
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
