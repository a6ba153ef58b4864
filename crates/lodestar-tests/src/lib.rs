//! Fixtures for lodestar's behaviour tests: an instrumented `Echo` service
//! with every call kind, and helpers to start instances on loopback.
// Fixtures fail the test that uses them, loudly.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::pin::Pin;
use std::time::Duration;

use lodestar::{
    Client, Code, Deadline, Instance, MemoryRegistry, MessageLimits, Registry, Request, Response,
    RunningService, Service, Status, Streaming,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

pub mod broker_conformance;
pub mod browser;
pub mod conformance;
pub mod etcd;
pub mod nats;
pub mod process;
pub mod prometheus;
pub mod rotel;

/// Generated code for the `lodestar.test` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    lodestar::include_proto!("lodestar.test");
}

/// Generated code for `lodestar.test.badroute`: a service with a REST
/// route no server takes (`**` before the last segment).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod bad_route {
    lodestar::include_proto!("lodestar.test.badroute");
}

pub use pb::echo_client::EchoClient;
pub use pb::echo_server::{Echo, EchoServer};
pub use pb::*;

/// Every wait in the tests is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test if it takes longer than [`TIMEOUT`].
pub async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// The message of the next reply on `replies`, which must come (within
/// [`TIMEOUT`]) and be a reply, not the stream's end or an error.
pub async fn next_message(what: &str, replies: &mut Streaming<EchoReply>) -> String {
    match bounded(what, replies.message()).await {
        Ok(Some(reply)) => reply.message,
        other => panic!("{what}: expected a reply, got {other:?}"),
    }
}

/// Something a handler reports to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `Sleep` handler started.
    SleepStarted(String),
    /// A `Sleep` handler was dropped before it finished.
    SleepCancelled(String),
    /// A `ServerStream` stream ended; `completed` is false when the client went away.
    StreamEnded {
        /// The request's token.
        token: String,
        /// Whether every message was sent.
        completed: bool,
    },
}

/// The instrumented `Echo` implementation.
#[derive(Debug, Clone)]
pub struct TestEcho {
    name: String,
    events: mpsc::UnboundedSender<Event>,
    client: Option<Client>,
    /// Where `Nested` publishes its report, if anywhere.
    publisher: Option<(lodestar::events::EventPublisher, String)>,
}

impl TestEcho {
    /// An instance called `name` that reports to `events` and makes nested
    /// calls through `client`.
    pub fn new(name: &str, events: mpsc::UnboundedSender<Event>, client: Option<Client>) -> Self {
        Self {
            name: name.to_owned(),
            events,
            client,
            publisher: None,
        }
    }

    /// `Nested` then publishes the report it got on `topic`.
    pub fn publishing(mut self, publisher: lodestar::events::EventPublisher, topic: &str) -> Self {
        self.publisher = Some((publisher, topic.to_owned()));
        self
    }

    fn reply(&self, message: String, payload_len: usize) -> EchoReply {
        EchoReply {
            message,
            served_by: self.name.clone(),
            payload_len: payload_len as u64,
        }
    }
}

/// Reports an event when dropped, unless disarmed.
struct OnDrop {
    event: Option<Event>,
    events: mpsc::UnboundedSender<Event>,
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            let _ = self.events.send(event);
        }
    }
}

fn duration(d: Option<lodestar::codegen::prost_types::Duration>) -> Duration {
    d.and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[lodestar::async_trait]
impl Echo for TestEcho {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let mut echoed = lodestar::metadata::MetadataMap::new();
        for entry in request.metadata().iter() {
            if let lodestar::metadata::KeyAndValueRef::Ascii(key, value) = entry
                && key.as_str().starts_with("x-")
            {
                echoed.insert(key.clone(), value.clone());
            }
        }
        // With inspect_compression on, say whether the request came compressed.
        if let Some(compressed) =
            lodestar::compression::ReceivedFlags::of(&request).and_then(|flags| flags.next())
        {
            echoed.insert(
                "x-received-compressed",
                lodestar::metadata::MetadataValue::from_static(if compressed {
                    "true"
                } else {
                    "false"
                }),
            );
        }
        let message = request.into_inner();
        // A log line of the handler's, for the log tests (DEBUG: the tests
        // that make thousands of calls do not write thousands of lines).
        tracing::debug!(served_by = %self.name, text = %message.message, "echoing");
        let mut response = Response::new(self.reply(message.message, message.payload.len()));
        *response.metadata_mut() = echoed;
        Ok(response)
    }

    async fn write(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.into_inner();
        Ok(Response::new(
            self.reply(message.message, message.payload.len()),
        ))
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        let _ = self.events.send(Event::SleepStarted(request.token.clone()));
        let mut guard = OnDrop {
            event: Some(Event::SleepCancelled(request.token)),
            events: self.events.clone(),
        };
        tokio::time::sleep(duration(request.duration)).await;
        guard.event = None;
        Ok(Response::new(()))
    }

    type ServerStreamStream = BoxStream<EchoReply>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let events = self.events.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let mut guard = OnDrop {
                event: Some(Event::StreamEnded {
                    token: request.token.clone(),
                    completed: false,
                }),
                events,
            };
            let interval = duration(request.interval);
            for n in 0..request.count {
                if n > 0 {
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = tx.closed() => return,
                    }
                }
                let reply = EchoReply {
                    message: format!("{} #{n}", request.token),
                    served_by: name.clone(),
                    payload_len: 0,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            if request.fail_code != 0 {
                let code = Code::from_i32(request.fail_code);
                let _ = tx.send(Err(Status::new(code, request.fail_message))).await;
                guard.event = Some(Event::StreamEnded {
                    token: request.token,
                    completed: true,
                });
                return;
            }
            if !request.trailer.is_empty() {
                // A status with code OK ends the stream successfully, and
                // its metadata travels as trailers.
                let mut trailers = lodestar::metadata::MetadataMap::new();
                if let Ok(value) = request.trailer.parse() {
                    trailers.insert("x-trailer", value);
                }
                let _ = tx
                    .send(Err(Status::with_metadata(Code::Ok, "", trailers)))
                    .await;
            }
            guard.event = Some(Event::StreamEnded {
                token: request.token,
                completed: true,
            });
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = request.into_inner();
        let (mut count, mut bytes) = (0usize, 0usize);
        while let Some(message) = stream.next().await {
            let message = message?;
            count += 1;
            bytes += message.payload.len();
        }
        Ok(Response::new(
            self.reply(format!("{count} messages"), bytes),
        ))
    }

    type BidiStream = BoxStream<EchoReply>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let this = self.clone();
        let replies = request
            .into_inner()
            .map(move |m| m.map(|m| this.reply(m.message, m.payload.len())));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        let mut metadata = lodestar::metadata::MetadataMap::new();
        metadata.insert(
            "x-failed-by",
            self.name.parse().map_err(|_| Status::internal("name"))?,
        );
        Err(Status::with_metadata(
            Code::from_i32(request.code),
            request.message,
            metadata,
        ))
    }

    async fn report_deadline(
        &self,
        request: Request<()>,
    ) -> Result<Response<DeadlineReport>, Status> {
        let deadline = Deadline::from_request(&request);
        let trace = lodestar::trace::TraceContext::current();
        Ok(Response::new(DeadlineReport {
            has_deadline: deadline.is_some(),
            remaining_ms: deadline.map_or(-1, |d| d.remaining().as_millis() as i64),
            served_by: self.name.clone(),
            traceparent: trace
                .as_ref()
                .map(|t| t.traceparent().to_owned())
                .unwrap_or_default(),
            tracestate: trace
                .as_ref()
                .and_then(|t| t.tracestate())
                .map(str::to_owned)
                .unwrap_or_default(),
        }))
    }

    async fn nested(
        &self,
        request: Request<NestedRequest>,
    ) -> Result<Response<DeadlineReport>, Status> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this instance has no client"))?;
        let service = request.into_inner().service;
        let mut next = EchoClient::by_name(client, &service);
        // No deadline is passed here by hand: lodestar carries the inbound one.
        let report = next.report_deadline(()).await?;
        if let Some((publisher, topic)) = &self.publisher {
            publisher
                .publish(topic, report.get_ref())
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(report)
    }
}

/// A test world: one in-memory registry, events from every instance.
#[derive(Debug)]
pub struct World {
    /// The registry every instance registers in.
    pub registry: MemoryRegistry,
    /// What handlers report.
    pub events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// An empty world.
    pub fn new() -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            registry: MemoryRegistry::new(),
            events,
            events_tx,
        }
    }

    /// A builder for an Echo instance named `name` of `service`, on loopback
    /// port 0, registering in this world's registry with a short TTL.
    pub fn builder(&self, service: &str, name: &str) -> lodestar::ServiceBuilder {
        Service::builder(service)
            .id(name)
            .registry(self.registry.clone())
            .ttl(Duration::from_millis(900))
            .grace_period(Duration::from_secs(5))
    }

    /// The Echo implementation for an instance named `name`.
    pub fn echo(&self, name: &str) -> TestEcho {
        TestEcho::new(name, self.events_tx.clone(), Some(self.client()))
    }

    /// Starts an Echo instance named `name` of `service`.
    pub async fn start(&self, service: &str, name: &str) -> RunningService {
        self.start_with_limits(service, name, MessageLimits::default())
            .await
    }

    /// Starts an Echo instance with the given message limits.
    pub async fn start_with_limits(
        &self,
        service: &str,
        name: &str,
        limits: MessageLimits,
    ) -> RunningService {
        bounded(
            "an instance to start",
            self.builder(service, name)
                .message_limits(limits)
                .add_service(EchoServer::new(self.echo(name)))
                .start(),
        )
        .await
        .expect("instance starts")
    }

    /// A client over this world's registry.
    pub fn client(&self) -> Client {
        Client::new(self.registry.clone())
    }

    /// Waits for the next event from a handler.
    pub async fn next_event(&mut self) -> Event {
        bounded("a handler event", self.events.recv())
            .await
            .expect("event channel open")
    }

    /// Asserts that the `Sleep` handler for `token` started and was cancelled.
    pub async fn expect_sleep_cancelled(&mut self, token: &str) {
        assert_eq!(self.next_event().await, Event::SleepStarted(token.into()));
        assert_eq!(self.next_event().await, Event::SleepCancelled(token.into()));
    }
}

/// A `Sleep` request for `duration`, tagged `token`.
pub fn sleep_request(token: &str, duration: Duration) -> SleepRequest {
    SleepRequest {
        duration: duration.try_into().ok(),
        token: token.to_owned(),
    }
}

/// A `ServerStream` request for `count` replies, one every `interval`.
pub fn stream_request(token: &str, count: u32, interval: Duration) -> StreamRequest {
    StreamRequest {
        count,
        interval: interval.try_into().ok(),
        token: token.to_owned(),
        trailer: String::new(),
        ..Default::default()
    }
}

/// An address where TCP connections hang: a listener whose accept queue is
/// full, so the kernel drops new connection attempts until they time out.
#[derive(Debug)]
pub struct Blackhole {
    /// Where connecting hangs.
    pub address: std::net::SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    /// Opens one; panics if the kernel does not behave as described.
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let address = listener.local_addr().expect("address");
        let mut queued = Vec::new();
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(stream) => queued.push(stream),
                Err(_) => {
                    return Self {
                        address,
                        _listener: listener,
                        _queued: queued,
                    };
                }
            }
        }
        panic!("the accept queue of {address} never filled up");
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Self::new()
    }
}

/// A client that reaches exactly `address`, as the one instance of `service`.
pub async fn direct(service: &str, address: std::net::SocketAddr) -> Client {
    let registry = MemoryRegistry::new();
    registry
        .register(
            Instance::new(service, address.to_string()),
            Duration::from_secs(3600),
        )
        .await
        .expect("register");
    Client::new(registry)
}

/// Runs `command` to its end and returns what it printed, killing it and
/// failing the test if it takes longer than `timeout`. Its output is read
/// as it comes, so a chatty process cannot block on a full pipe.
pub fn run_bounded(mut command: std::process::Command, timeout: Duration) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let read_all = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {timeout:?}; it printed:\n{}\n{}",
                String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A free loopback port (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A name no other test process or call uses, for temporary directories.
pub fn unique_name() -> String {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // The time too: a crashed earlier run may have left a directory under
    // a process id that is now ours.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A program the tests start: the path in the environment variable `env`
/// if set (it must run), else the first of `candidates` that runs
/// (`--version` succeeds). Fails the test with `hint` (what needs it and
/// how to install it) if none does.
pub fn find_binary(env: &str, candidates: &[&str], hint: &str) -> String {
    let runs = |binary: &str| {
        std::process::Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Ok(binary) = std::env::var(env) {
        assert!(runs(&binary), "{env}=`{binary}` cannot be run");
        return binary;
    }
    match candidates.iter().find(|binary| runs(binary)) {
        Some(binary) => (*binary).to_owned(),
        None => panic!(
            "{} cannot be run: {hint}. ./scripts/test installs it; or set {env}.",
            candidates.first().copied().unwrap_or_default()
        ),
    }
}

/// The status of an HTTP/1.1 `GET` of `path` from `address`, or `None` if
/// nothing answers there (yet).
pub async fn http_get_status(address: std::net::SocketAddr, path: &str) -> Option<u16> {
    if tokio::net::TcpStream::connect(address).await.is_err() {
        return None;
    }
    Some(http_get(address, path).await.0)
}

/// An HTTP/1.1 `GET` of `path` from `address`, as Prometheus or `curl`
/// makes it: the status code, the content type and the body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = bounded(&format!("GET {path} from {address}"), exchange)
        .await
        .expect("the HTTP exchange");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The value of the sample whose name and labels are `series` (exactly as
/// the exposition writes them, e.g. `x_total{a="b"}`) in `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}
