//! One call's HTTP/2 stream on the client: sending the request, and the
//! body of the response, over the `h2` crate directly.
//!
//! hyper's client hands every request through a channel to its connection
//! task, and spawns two tasks per request: one to send the body, one to
//! wait for the response and pass it back through another channel. A
//! unary request's whole body is ready when the call starts, so here it is
//! handed to HTTP/2 from the caller's task, with its end of stream on its
//! one DATA frame, and the response is awaited in the call's own future:
//! no channel, no task. A body that is not ready at once (a client's
//! stream of messages) is sent by a task of its own, which waits for room
//! in the peer's flow-control window before reading more of the body (at
//! most one message is buffered beyond it), and which resets the stream
//! when the caller drops the call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use http::Request;
use http_body::{Body, Frame, SizeHint};

use crate::body::RequestBody;
use crate::client::connection::Sender;
use crate::client::web::Decoder;

/// A request handed to HTTP/2, waiting for its response.
pub(crate) struct Sent {
    pub(crate) response: ResponseFuture,
    /// Dropped with the call: tells the task sending the rest of the body
    /// (if one was needed) to stop.
    pub(crate) cancel: Option<OnDrop>,
}

/// Why a request was not sent.
pub(crate) enum NotSent {
    /// The connection cannot take new calls (closed, or going away);
    /// nothing of the request went out.
    Connection {
        // Boxed: rare, and the result of every call's send is moved.
        request: Box<Request<RequestBody>>,
        error: h2::Error,
    },
    /// The connection failed as the request was handed to it: nothing of
    /// it went out, but only a kept copy can go again.
    Lost(h2::Error),
    /// HTTP/2 refused the request itself (for example a header it does
    /// not allow); the connection is fine.
    Refused(h2::Error),
}

/// Opens a stream for `request` on `sender`'s connection and sends what
/// of its body is ready now (all of a unary request's); the rest, if any,
/// is sent by a task of its own.
pub(crate) fn send(sender: &Sender, request: Request<RequestBody>) -> Result<Sent, NotSent> {
    let mut h2 = sender.h2().clone();
    let mut now = Context::from_waker(Waker::noop());
    // A fresh handle is ready unless the connection is closing.
    if let Poll::Ready(Err(error)) = h2.poll_ready(&mut now) {
        return Err(NotSent::Connection {
            request: Box::new(request),
            error,
        });
    }
    let (parts, body) = request.into_parts();
    let (response, stream) = match h2.send_request(Request::from_parts(parts, ()), false) {
        Ok(sent) => sent,
        // The connection failed between the check above and now (its task
        // runs on another thread): nothing went out, but HTTP/2 kept the
        // request's head.
        Err(error) if error.is_io() || error.is_go_away() => return Err(NotSent::Lost(error)),
        Err(error) => return Err(NotSent::Refused(error)),
    };
    let mut pipe = Pipe {
        body,
        stream,
        held: None,
        needs_room: false,
        cancel: None,
    };
    if Pin::new(&mut pipe).poll(&mut now).is_ready() {
        return Ok(Sent {
            response,
            cancel: None,
        });
    }
    let (cancel, dropped) = drop_signal();
    pipe.cancel = Some(dropped);
    tokio::spawn(pipe);
    Ok(Sent {
        response,
        cancel: Some(cancel),
    })
}

/// A signal that one side gives by dropping its half ([`OnDrop`]) and
/// the other awaits ([`Dropped`]): cheaper to check on every poll than a
/// channel, as it is only a load until it fires.
pub(crate) fn drop_signal() -> (OnDrop, Dropped) {
    let signal = Arc::new(Signal::default());
    (OnDrop(signal.clone()), Dropped(signal))
}

#[derive(Debug, Default)]
struct Signal {
    dropped: AtomicBool,
    waker: AtomicWaker,
}

/// Fires its [`Dropped`] when dropped.
#[derive(Debug)]
pub(crate) struct OnDrop(Arc<Signal>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// Resolves when its [`OnDrop`] is dropped.
#[derive(Debug)]
pub(crate) struct Dropped(Arc<Signal>);

impl Dropped {
    /// Whether it has fired (no waker is registered).
    fn fired(&self) -> bool {
        self.0.dropped.load(Ordering::Acquire)
    }
}

impl Future for Dropped {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired() {
            return Poll::Ready(());
        }
        self.0.waker.register(cx.waker());
        // Fired between the check and the registration: seen now.
        if self.fired() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Sends a request's body on its stream.
struct Pipe {
    body: RequestBody,
    stream: SendStream<Bytes>,
    /// A message read but not sent yet: if the body ends next, it carries
    /// the end of stream.
    held: Option<Bytes>,
    /// Whether data went out since the window last had room: the next
    /// read of the body waits for room first.
    needs_room: bool,
    /// Says when the call is dropped (once the pipe is a task of its own).
    cancel: Option<Dropped>,
}

impl Pipe {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(Dropped::fired)
    }

    /// Waits for what is awaited (body, room), and also for the server to
    /// reset the stream or the call to be dropped.
    fn park(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // The server ended the call (it needs no more of the body).
        if self.stream.poll_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(cancel) = self.cancel.as_mut()
            && Pin::new(cancel).poll(cx).is_ready()
        {
            self.stream.send_reset(Reason::CANCEL);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if this.cancelled() {
                this.stream.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
            if this.needs_room {
                this.stream.reserve_capacity(1);
                match this.stream.poll_capacity(cx) {
                    Poll::Pending => return this.park(cx),
                    Poll::Ready(Some(Ok(_))) => this.needs_room = false,
                    // The stream is closed.
                    Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
                }
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => {
                    // The body wakes this when it has more; room is
                    // awaited then, before it is read.
                    if let Some(data) = this.held.take() {
                        if this.stream.send_data(data, false).is_err() {
                            return Poll::Ready(());
                        }
                        this.needs_room = true;
                    }
                    return this.park(cx);
                }
                Poll::Ready(None) => {
                    let data = this.held.take().unwrap_or_default();
                    let _ = this.stream.send_data(data, true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(_))) => {
                    // The body keeps its error for the response's side
                    // (`RequestBody::error`), which reports it.
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(earlier) = this.held.replace(data) {
                            if this.stream.send_data(earlier, false).is_err() {
                                return Poll::Ready(());
                            }
                            this.needs_room = true;
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            if let Some(earlier) = this.held.take() {
                                let _ = this.stream.send_data(earlier, false);
                            }
                            let _ = this.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
            }
        }
    }
}

/// A response's body, as HTTP/2 delivers it: its data, released from the
/// flow-control window as it is read, then its trailers.
#[derive(Debug)]
pub(crate) struct Received {
    stream: RecvStream,
    data_done: bool,
    /// Held for as long as the response is: see [`Sent::cancel`].
    _cancel: Option<OnDrop>,
    /// Reads a gRPC-Web or Connect body back as native gRPC's.
    web: Option<Box<Decoder>>,
}

impl Received {
    pub(crate) fn new(stream: RecvStream, cancel: Option<OnDrop>) -> Self {
        Self {
            stream,
            data_done: false,
            _cancel: cancel,
            web: None,
        }
    }

    /// The body of a gRPC-Web or Connect response, read by `web`.
    pub(crate) fn web(stream: RecvStream, cancel: Option<OnDrop>, web: Box<Decoder>) -> Self {
        Self {
            stream,
            data_done: false,
            _cancel: cancel,
            web: Some(web),
        }
    }
}

impl Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if let Some(web) = this.web.as_deref_mut() {
            return web.poll(&mut this.stream, cx);
        }
        if !this.data_done {
            match this.stream.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Read: the peer may send as much again.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM with NO_ERROR ends the body early but
                // cleanly (RFC 9113, section 8.1), as hyper reads it.
                Poll::Ready(Some(Err(error))) if error.reason() == Some(Reason::NO_ERROR) => {
                    this.data_done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.stream.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.web {
            // Its status is yet to come, even when the stream has ended.
            Some(web) => web.done,
            None => self.stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
