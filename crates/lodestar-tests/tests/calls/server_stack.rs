//! The server stack: tower layers added with `ServiceBuilder::layer`, the
//! statuses their errors become, the final-status hook (`CallEnd`), and the
//! trace context. Calls go over one plain HTTP/2 connection (hyper's, not
//! lodestar's client), so that the server is seen as any client sees it.

use std::pin::Pin;
use std::task::{Context, Poll};

use lodestar::server::{CallEnd, Next, RequestBody, ResponseBody};
use lodestar::trace::TraceContext;
use lodestar::{Response, Status, Streaming};
use tokio::sync::mpsc;

use super::*;

/// The client side of one HTTP/2 connection, as a tonic transport.
#[derive(Clone)]
pub(super) struct OneConnection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type Answer = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>,
            > + Send,
    >,
>;

impl tower_service::Service<http::Request<tonic::body::Body>> for OneConnection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Answer {
        Box::pin(self.0.send_request(request))
    }
}

/// One connection's socket and the task that drives it (it ends when the
/// connection does).
pub(super) struct Connection {
    socket: std::net::TcpStream,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Whether the connection is still open.
    pub(super) fn is_open(&self) -> bool {
        !self.task.is_finished()
    }

    /// Cuts the connection, as a client that crashed or lost its network.
    fn cut(&self) {
        self.socket.shutdown(std::net::Shutdown::Both).unwrap();
    }
}

/// An Echo client over one new connection to `address`.
pub(super) async fn one_connection(
    address: std::net::SocketAddr,
) -> (EchoClient<OneConnection>, Connection) {
    let stream = bounded("connect", tokio::net::TcpStream::connect(address))
        .await
        .unwrap();
    let socket = stream.into_std().unwrap();
    let handle = socket.try_clone().unwrap();
    let stream = tokio::net::TcpStream::from_std(socket).unwrap();
    let (sender, connection) = bounded(
        "the HTTP/2 handshake",
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let client =
        EchoClient::with_origin(OneConnection(sender), "http://localhost".parse().unwrap());
    (
        client,
        Connection {
            socket: handle,
            task,
        },
    )
}

/// What the recording layer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A call reached the layer (its path).
    Started(String),
    /// A call ended (its path, final code, and message).
    Ended(String, Code, String),
}

/// A layer that reports every call it sees, and its end, via `CallEnd`.
fn recording(
    seen: mpsc::UnboundedSender<Seen>,
) -> tower::util::MapRequestLayer<
    impl Fn(http::Request<RequestBody>) -> http::Request<RequestBody> + Clone,
> {
    tower::util::MapRequestLayer::new(move |request: http::Request<RequestBody>| {
        let path = request.uri().path().to_owned();
        let _ = seen.send(Seen::Started(path.clone()));
        let end = request
            .extensions()
            .get::<CallEnd>()
            .expect("every request carries a CallEnd");
        let seen = seen.clone();
        let registered = end.on_end(move |outcome| {
            let _ = seen.send(Seen::Ended(
                path,
                outcome.code(),
                outcome.message().into_owned(),
            ));
        });
        assert!(registered, "a layer's call runs on the call's task");
        request
    })
}

/// Waits for what the recording layer reports next.
async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    bounded("the recording layer", seen.recv())
        .await
        .expect("the recording layer is alive")
}

/// Starts `service`, within the tests' bound.
async fn started(service: lodestar::ServiceBuilder) -> lodestar::RunningService {
    bounded("the server to start", service.start())
        .await
        .expect("the server starts")
}

/// Waits for the end of a call to `method`, skipping starts; returns its
/// code and message.
async fn ended(seen: &mut mpsc::UnboundedReceiver<Seen>, method: &str) -> (Code, String) {
    loop {
        match next_seen(seen).await {
            Seen::Started(_) => continue,
            Seen::Ended(path, code, message) => {
                assert_eq!(path, format!("/lodestar.test.Echo/{method}"));
                return (code, message);
            }
        }
    }
}

/// An Echo whose handlers wait on what the test does, fail on request,
/// and report the trace context they run in.
#[derive(Debug, Clone, Copy)]
struct Scripted;

type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;

fn reply(message: impl Into<String>) -> EchoReply {
    EchoReply {
        message: message.into(),
        served_by: "scripted".into(),
        payload_len: 0,
    }
}

/// The status a handler fails with when asked to.
fn own_failure() -> Status {
    Status::aborted("the handler's own failure")
}

#[lodestar::async_trait]
impl Echo for Scripted {
    /// "fail": fails; otherwise answers with the trace context it runs in.
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        if request.get_ref().message == "fail" {
            return Err(own_failure());
        }
        let context = TraceContext::current();
        let traced = context.map_or_else(String::new, |c| {
            format!("{} {}", c.traceparent(), c.tracestate().unwrap_or_default())
        });
        Ok(Response::new(reply(traced)))
    }

    async fn write(&self, _: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("write"))
    }

    /// Never answers: ends only by the deadline or the client.
    async fn sleep(&self, _: Request<SleepRequest>) -> Result<Response<()>, Status> {
        std::future::pending().await
    }

    type ServerStreamStream = ReplyStream;

    /// `count` replies (each once the previous is taken), then fails if the
    /// token is "fail"; a count of 0 streams until the deadline or the client.
    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let request = request.into_inner();
        let replies =
            futures_util::stream::iter(0..request.count).map(|n| Ok(reply(format!("#{n}"))));
        let end: ReplyStream = match (request.count, request.token.as_str()) {
            (0, _) => Box::pin(futures_util::stream::pending()),
            (_, "fail") => Box::pin(futures_util::stream::iter([Err(own_failure())])),
            _ => Box::pin(futures_util::stream::empty()),
        };
        Ok(Response::new(Box::pin(replies.chain(end))))
    }

    /// Counts the messages; fails after the end if one said "fail".
    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = request.into_inner();
        let (mut count, mut fail) = (0, false);
        while let Some(message) = stream.next().await {
            fail |= message?.message == "fail";
            count += 1;
        }
        if fail {
            return Err(own_failure());
        }
        Ok(Response::new(reply(format!("{count} messages"))))
    }

    type BidiStream = ReplyStream;

    /// Echoes each message; "fail" ends the stream with the handler's failure.
    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let replies = request.into_inner().map(|message| {
            let message = message?;
            if message.message == "fail" {
                return Err(own_failure());
            }
            Ok(reply(message.message))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn fail(&self, _: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("fail"))
    }

    async fn report_deadline(&self, _: Request<()>) -> Result<Response<DeadlineReport>, Status> {
        Err(Status::unimplemented("report_deadline"))
    }

    async fn nested(&self, _: Request<NestedRequest>) -> Result<Response<DeadlineReport>, Status> {
        Err(Status::unimplemented("nested"))
    }
}

/// Every reply of a streamed response, and how the stream ended.
async fn collect_replies(
    response: Result<Response<Streaming<EchoReply>>, Status>,
) -> (Vec<EchoReply>, Option<Code>) {
    let mut stream = response.unwrap().into_inner();
    let mut replies = Vec::new();
    while let Some(reply) = bounded("the next reply", stream.next()).await {
        match reply {
            Ok(reply) => replies.push(reply),
            Err(status) => return (replies, Some(status.code())),
        }
    }
    (replies, None)
}

fn message(text: &str) -> EchoRequest {
    EchoRequest {
        message: text.into(),
        payload: vec![],
    }
}

/// A request with a `grpc-timeout` the client itself does not enforce.
fn with_timeout<T>(message: T, millis: u32) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("grpc-timeout", format!("{millis}m").parse().unwrap());
    request
}

/// A request stream that sends `first` and then stays open until `close`
/// is dropped.
fn open_stream(
    first: Vec<EchoRequest>,
) -> (
    impl tokio_stream::Stream<Item = EchoRequest> + Send + 'static,
    mpsc::Sender<EchoRequest>,
) {
    let (tx, rx) = mpsc::channel(4);
    let stream = tokio_stream::iter(first).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
    (stream, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_sheds_a_second_call_and_the_connection_serves_on() {
    let world = World::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let running = started(
        world
            .builder("echo", "a")
            .layer(recording(seen_tx))
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::ConcurrencyLimitLayer::new(1))
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (mut echo, connection) = one_connection(running.local_addr()).await;

    // A call that holds the only slot until the test closes its stream.
    let (stream, close) = open_stream(vec![message("first")]);
    let mut holder = echo.clone();
    let held = tokio::spawn(async move { holder.client_stream(stream).await });
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Started("/lodestar.test.Echo/ClientStream".into())
    );

    let status = bounded("the shed call", echo.unary(message("second")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("overloaded"), "{status:?}");
    let (code, text) = ended(&mut seen, "Unary").await;
    assert_eq!(
        (code, text.as_str()),
        (Code::ResourceExhausted, status.message())
    );

    // The held call finishes, and the same connection serves the next one.
    drop(close);
    let reply = bounded("the held call", held).await.unwrap().unwrap();
    assert_eq!(reply.into_inner().message, "1 messages");
    assert_eq!(ended(&mut seen, "ClientStream").await.0, Code::Ok);
    bounded("a call after the shed one", echo.unary(message("third")))
        .await
        .unwrap();
    assert!(
        connection.is_open(),
        "every call went over the one connection, which is still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_counts_the_time_a_call_waits_in_the_users_layers() {
    let world = World::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let running = started(
        world
            .builder("echo", "a")
            .layer(recording(seen_tx))
            .layer(tower::limit::ConcurrencyLimitLayer::new(1))
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (echo, _connection) = one_connection(running.local_addr()).await;

    // One call holds the only slot; a second, with a 50 ms deadline, queues.
    let (stream, close) = open_stream(vec![message("first")]);
    let mut holder = echo.clone();
    let held = tokio::spawn(async move { holder.client_stream(stream).await });
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Started("/lodestar.test.Echo/ClientStream".into())
    );
    let mut waiter = echo.clone();
    let queued =
        tokio::spawn(async move { waiter.unary(with_timeout(message("queued"), 50)).await });
    // It waits for the slot below the recording layer, which does not see
    // it yet. Its deadline passes while it queues: time passing is the
    // point here, so this waits for time.
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(close);
    bounded("the held call", held).await.unwrap().unwrap();
    // Let in at last, it is past its deadline: not given a fresh 50 ms
    // (the handler would answer at once).
    let status = bounded("the queued call", queued)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

/// A layer's own error, with a source.
#[derive(Debug)]
struct GateClosed(std::io::Error);

impl std::fmt::Display for GateClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the gate is closed")
    }
}

impl std::error::Error for GateClosed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Fails every call with [`GateClosed`].
#[derive(Clone)]
struct Gate;

impl tower_service::Service<http::Request<RequestBody>> for Gate {
    type Response = http::Response<ResponseBody>;
    type Error = GateClosed;
    type Future = std::future::Ready<Result<http::Response<ResponseBody>, GateClosed>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GateClosed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<RequestBody>) -> Self::Future {
        std::future::ready(Err(GateClosed(std::io::Error::other("maintenance window"))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_errors_become_statuses() {
    let world = World::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let gated = started(
        world
            .builder("echo", "gated")
            .layer(recording(seen_tx))
            .layer(tower::layer::layer_fn(|_: Next| Gate))
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (mut echo, _connection) = one_connection(gated.local_addr()).await;
    let status = bounded("a gated call", echo.unary(message("hi")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the gate is closed: maintenance window");
    assert_eq!(
        ended(&mut seen, "Unary").await,
        (Code::Unavailable, status.message().to_owned())
    );

    let timed = started(
        world
            .builder("echo", "timed")
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                100,
            )))
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (mut echo, _connection) = one_connection(timed.local_addr()).await;
    let status = bounded(
        "a call that never answers",
        echo.sleep(sleep_request("t", Duration::ZERO)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_learns_the_final_status_of_every_call_kind() {
    let world = World::new();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let running = started(
        world
            .builder("echo", "a")
            .layer(recording(seen_tx))
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (echo, connection) = one_connection(running.local_addr()).await;
    let own = own_failure();
    let own = (Code::Aborted, own.message().to_owned());

    // OK, and the handler's own failure.
    let mut e = echo.clone();
    bounded("ok", e.unary(message("ok"))).await.unwrap();
    assert_eq!(ended(&mut seen, "Unary").await.0, Code::Ok);
    bounded("fail", e.unary(message("fail"))).await.unwrap_err();
    assert_eq!(ended(&mut seen, "Unary").await, own);

    let stream = stream_request("s", 2, Duration::ZERO);
    let (replies, end) = collect_replies(bounded("a stream", e.server_stream(stream)).await).await;
    assert_eq!((replies.len(), end), (2, None));
    assert_eq!(ended(&mut seen, "ServerStream").await.0, Code::Ok);
    let stream = StreamRequest {
        token: "fail".into(),
        ..stream_request("s", 2, Duration::ZERO)
    };
    let (replies, end) = collect_replies(bounded("a stream", e.server_stream(stream)).await).await;
    assert_eq!(end, Some(Code::Aborted), "{replies:?}");
    assert_eq!(ended(&mut seen, "ServerStream").await, own);

    bounded(
        "a client stream",
        e.client_stream(tokio_stream::iter([message("a"), message("b")])),
    )
    .await
    .unwrap();
    assert_eq!(ended(&mut seen, "ClientStream").await.0, Code::Ok);
    bounded(
        "a failing client stream",
        e.client_stream(tokio_stream::iter([message("fail")])),
    )
    .await
    .unwrap_err();
    assert_eq!(ended(&mut seen, "ClientStream").await, own);

    let (replies, end) =
        collect_replies(bounded("a bidi", e.bidi(tokio_stream::iter([message("a")]))).await).await;
    assert_eq!((replies.len(), end), (1, None));
    assert_eq!(ended(&mut seen, "Bidi").await.0, Code::Ok);
    let (replies, end) = collect_replies(
        bounded(
            "a failing bidi",
            e.bidi(tokio_stream::iter([message("a"), message("fail")])),
        )
        .await,
    )
    .await;
    assert_eq!(end, Some(Code::Aborted), "{replies:?}");
    assert_eq!(ended(&mut seen, "Bidi").await, own);

    // DEADLINE_EXCEEDED: before the handler answers (unary, client stream)
    // and while the response streams (server stream, bidi).
    let status = bounded(
        "a call past its deadline",
        e.sleep(with_timeout(sleep_request("d", Duration::ZERO), 100)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(ended(&mut seen, "Sleep").await.0, Code::DeadlineExceeded);

    let mut stream = bounded(
        "a stream with a deadline",
        e.server_stream(with_timeout(stream_request("d", 0, Duration::ZERO), 100)),
    )
    .await
    .unwrap()
    .into_inner();
    let status = bounded("the stream's end", stream.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(
        ended(&mut seen, "ServerStream").await.0,
        Code::DeadlineExceeded
    );

    let (requests, close) = open_stream(vec![message("a")]);
    let status = bounded(
        "a client stream past its deadline",
        e.client_stream(with_timeout(requests, 100)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(
        ended(&mut seen, "ClientStream").await.0,
        Code::DeadlineExceeded
    );
    drop(close);

    let (requests, close) = open_stream(vec![message("a")]);
    let mut replies = bounded(
        "a bidi with a deadline",
        e.bidi(with_timeout(requests, 200)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(next_message("the first reply", &mut replies).await, "a");
    let status = bounded("the stream's end", replies.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(ended(&mut seen, "Bidi").await.0, Code::DeadlineExceeded);
    drop(close);

    // CANCELLED: the client goes away before the status, whether the handler
    // has answered (server stream, bidi) or not (unary, client stream): it
    // resets the stream, or (bidi, last) closes the connection.
    let mut unary = e.clone();
    let call = tokio::spawn(async move { unary.sleep(sleep_request("c", Duration::ZERO)).await });
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Started("/lodestar.test.Echo/Sleep".into())
    );
    call.abort();
    assert_eq!(ended(&mut seen, "Sleep").await.0, Code::Cancelled);

    let stream = bounded(
        "a stream to drop",
        e.server_stream(stream_request("c", 0, Duration::ZERO)),
    )
    .await
    .unwrap()
    .into_inner();
    drop(stream);
    assert_eq!(ended(&mut seen, "ServerStream").await.0, Code::Cancelled);

    let (requests, close) = open_stream(vec![message("a")]);
    let mut client = e.clone();
    let call = tokio::spawn(async move { client.client_stream(requests).await });
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Started("/lodestar.test.Echo/ClientStream".into())
    );
    call.abort();
    assert_eq!(ended(&mut seen, "ClientStream").await.0, Code::Cancelled);
    drop(close);

    let (requests, _open) = open_stream(vec![message("a")]);
    let mut replies = bounded("a bidi to cut", e.bidi(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_message("the first reply", &mut replies).await, "a");
    connection.cut();
    assert_eq!(ended(&mut seen, "Bidi").await.0, Code::Cancelled);

    // Exactly once each: once the server is gone (and its layers with it),
    // nothing else was reported.
    drop((e, echo));
    bounded("the server to stop", running.abort()).await;
    let mut rest = Vec::new();
    while let Some(event) = bounded("the recording layer to go", seen.recv()).await {
        rest.push(event);
    }
    assert!(
        rest.iter().all(|s| matches!(s, Seen::Started(_))),
        "each of the 16 calls is reported once: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_runs_in_the_callers_trace_context() {
    let world = World::new();
    let running = started(
        world
            .builder("echo", "a")
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    let (mut echo, _connection) = one_connection(running.local_addr()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = Request::new(message("trace"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "vendor=1".parse().unwrap());
    let reply = bounded("a traced call", echo.unary(request)).await.unwrap();
    assert_eq!(
        reply.into_inner().message,
        format!("{traceparent} vendor=1")
    );
    let reply = bounded("an untraced call", echo.unary(message("plain")))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "");
}

#[tokio::test]
async fn a_running_service_takes_a_valid_policy_and_keeps_its_own_on_a_bad_one() {
    use lodestar::server::policy::Policy;

    let world = World::new();
    let first = Policy::from_toml("[[methods]]\nnames = [\"lodestar.test.Echo/*\"]").unwrap();
    let running = started(
        world
            .builder("echo", "a")
            .policy(first.clone())
            .unwrap()
            .add_service(EchoServer::new(Scripted)),
    )
    .await;
    assert_eq!(running.policy(), first);

    let mut bad = Policy::default();
    bad.methods = first.methods.clone();
    bad.methods[0].names = vec!["Echo".into()];
    let error = running.set_policy(bad).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("policy field `methods[0].names[0]` is `Echo`"),
        "{error}"
    );
    assert_eq!(running.policy(), first, "the old policy stays");

    running.set_policy(Policy::default()).unwrap();
    assert_eq!(running.policy(), Policy::default());
    running.shutdown().await.unwrap();
}
