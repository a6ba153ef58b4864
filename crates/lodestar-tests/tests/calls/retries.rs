//! Configured retries, the retry budget, server pushback and hedging, over
//! real sockets to in-process instances that fail, push back or stall on
//! demand, and count what reaches them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Frame;
use lodestar::client::observe::{Attempt, Decision, DecisionKind, Observer};
use lodestar::client::{Policy, Protocol};
use lodestar::server::{Next, RequestBody, ResponseBody};
use lodestar::{RunningService, Status};
use prost::Message as _;

use super::*;

/// What reached an instance: one entry per attempt.
#[derive(Debug, Clone)]
struct Seen {
    instance: String,
    /// The method's name.
    method: String,
    /// The call's `x-token`.
    token: String,
    /// Its `grpc-previous-rpc-attempts`, if any.
    previous: Option<String>,
    at: Instant,
}

/// How an instance answers, changed while it runs, and what reached it.
#[derive(Default)]
struct Script {
    /// Fail every call with this code.
    always: Mutex<Option<Code>>,
    /// Fail this many calls first with `UNAVAILABLE`.
    fail_next: AtomicUsize,
    /// The `grpc-retry-pushback-ms` of each failure, if any.
    pushback: Mutex<Option<&'static str>>,
    /// Answer a server stream with one message, then `UNAVAILABLE`.
    partial: Mutex<bool>,
    /// Hold each call this long first.
    stall: Mutex<Duration>,
    /// Every attempt that reached the instance, across all instances.
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The calls whose handling was cancelled (the handler dropped), by
    /// token, and when.
    cancelled: Arc<Cancellations>,
}

/// Calls whose handling was cancelled, by token, and when; and how many.
#[derive(Default)]
struct Cancellations {
    calls: Mutex<Vec<(String, Instant)>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Script {
    /// The code to fail the next call with, if any.
    fn failure(&self) -> Option<Code> {
        if let Some(code) = *self.always.lock().unwrap() {
            return Some(code);
        }
        self.fail_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| Code::Unavailable)
    }
}

/// Records its call as cancelled when dropped, unless disarmed.
struct Cancelled(Option<(String, Arc<Cancellations>)>);

impl Drop for Cancelled {
    fn drop(&mut self) {
        if let Some((token, cancelled)) = self.0.take() {
            cancelled
                .calls
                .lock()
                .unwrap()
                .push((token, Instant::now()));
            cancelled.count.send_modify(|n| *n += 1);
        }
    }
}

impl Script {
    /// Answers a call to instance `name` as the script says.
    fn answer(
        self: &Arc<Self>,
        name: &str,
        request: http::Request<RequestBody>,
        next: &mut Next,
    ) -> Answer {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let seen = Seen {
            instance: name.to_owned(),
            method: request.uri().path().rsplit('/').next().unwrap().to_owned(),
            token: header("x-token").unwrap_or_default(),
            previous: header("grpc-previous-rpc-attempts"),
            at: Instant::now(),
        };
        let script = self.clone();
        script.seen.lock().unwrap().push(seen.clone());
        let failure = script.failure();
        let pushback = *script.pushback.lock().unwrap();
        let partial = *script.partial.lock().unwrap() && seen.method == "ServerStream";
        let stall = *script.stall.lock().unwrap();
        let answer = tower_service::Service::call(next, request);
        Box::pin(async move {
            if let Some(code) = failure {
                let mut metadata = lodestar::metadata::MetadataMap::new();
                if let Some(pushback) = pushback {
                    metadata.insert("grpc-retry-pushback-ms", pushback.parse().unwrap());
                }
                let status = Status::with_metadata(code, "failing on purpose", metadata);
                return Err(Box::new(status) as tower::BoxError);
            }
            if partial {
                return Ok(one_message_then_unavailable());
            }
            if !stall.is_zero() {
                let mut guard = Cancelled(Some((seen.token, script.cancelled.clone())));
                tokio::time::sleep(stall).await;
                guard.0 = None;
            }
            answer.await
        })
    }
}

/// A server-streaming response: one message, then `UNAVAILABLE`.
fn one_message_then_unavailable() -> http::Response<ResponseBody> {
    let reply = EchoReply {
        message: "the only one".into(),
        ..EchoReply::default()
    }
    .encode_to_vec();
    let mut message = vec![0];
    message.extend_from_slice(&u32::try_from(reply.len()).unwrap().to_be_bytes());
    message.extend_from_slice(&reply);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "14".parse().unwrap());
    trailers.insert("grpc-message", "gone".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
        Ok(Frame::data(Bytes::from(message))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(ResponseBody::from(tonic::body::Body::new(body)))
        .unwrap()
}

/// Instances of `echo`, each with its script, all recording into one list.
struct Fleet {
    _running: Vec<RunningService>,
    scripts: BTreeMap<String, Arc<Script>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    cancelled: Arc<Cancellations>,
}

impl Fleet {
    async fn start(world: &World, names: &[&str]) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(Cancellations::default());
        let mut running = Vec::new();
        let mut scripts = BTreeMap::new();
        for &name in names {
            let script = Arc::new(Script {
                seen: seen.clone(),
                cancelled: cancelled.clone(),
                ..Script::default()
            });
            scripts.insert(name.to_owned(), script.clone());
            let name_owned = name.to_owned();
            let builder = world
                .builder("echo", name)
                .layer(intercept(move |request, next| {
                    script.answer(&name_owned, request, next)
                }))
                .add_service(EchoServer::new(world.echo(name)));
            running.push(
                bounded("an instance to start", builder.start())
                    .await
                    .expect("instance starts"),
            );
        }
        Self {
            _running: running,
            scripts,
            seen,
            cancelled,
        }
    }

    fn script(&self, name: &str) -> &Script {
        &self.scripts[name]
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

/// The decisions observers were told of.
#[derive(Clone, Default)]
struct Decisions(Arc<Mutex<Vec<DecisionKind>>>);

impl Observer for Decisions {
    fn attempt(&self, _attempt: &Attempt<'_>) {}

    fn decided(&self, decision: &Decision<'_>) {
        self.0.lock().unwrap().push(decision.kind.clone());
    }
}

impl Decisions {
    fn count(&self, matches: impl Fn(&DecisionKind) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|d| matches(d)).count()
    }
}

/// A round-robin policy without outlier detection, with `methods`.
fn policy(methods: &str) -> Policy {
    Policy::from_toml(&format!(
        "[strategy]\nkind = \"round_robin\"\n[outlier]\nenabled = false\n{methods}"
    ))
    .unwrap()
}

fn client(world: &World, policy: Policy, decisions: &Decisions) -> Client {
    Client::builder(world.registry.clone())
        .policy(policy)
        .unwrap()
        .observe(decisions.clone())
        .build()
}

fn tokened<T>(message: T, token: &str, timeout: Option<Duration>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-token", token.parse().unwrap());
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_not_marked_idempotent_is_never_retried_once_sent() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["a", "b"]).await;
    for script in fleet.scripts.values() {
        *script.always.lock().unwrap() = Some(Code::Unavailable);
    }
    let decisions = Decisions::default();
    let mut policy = policy("[[methods]]\nnames = [\"*\"]\nretry = { initial_backoff_ms = 1 }\n");
    // Every retry is made (the budget is tested on its own).
    policy.retry_budget.enabled = false;
    let mut echo = EchoClient::by_name(&client(&world, policy, &decisions), "echo");
    for n in 0..20 {
        let call = echo.write(tokened(EchoRequest::default(), &n.to_string(), None));
        let status = bounded("a write", call).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    // Write is not idempotent: each call reached a server once.
    let seen = fleet.seen();
    assert_eq!(seen.len(), 20, "{seen:?}");
    assert!(seen.iter().all(|s| s.previous.is_none()));
    assert_eq!(decisions.count(|_| true), 0);

    // Unary is (its .proto says so): three attempts each, the first two
    // on both instances, each retry saying how many went before.
    fleet.clear();
    for n in 0..10 {
        let call = echo.unary(tokened(EchoRequest::default(), &n.to_string(), None));
        let status = bounded("a unary call", call).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "failing on purpose",
            "the last attempt's own error"
        );
        let attempts: Vec<Seen> = fleet
            .seen()
            .into_iter()
            .filter(|s| s.token == n.to_string())
            .collect();
        assert_eq!(attempts.len(), 3, "{attempts:?}");
        assert_ne!(attempts[0].instance, attempts[1].instance, "{attempts:?}");
        let previous: Vec<Option<&str>> = attempts.iter().map(|s| s.previous.as_deref()).collect();
        assert_eq!(previous, [None, Some("1"), Some("2")]);
    }
    assert_eq!(
        decisions.count(|d| matches!(d, DecisionKind::Retry { .. })),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_is_retried_on_another_instance_within_its_deadline() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["bad", "good"]).await;
    *fleet.script("bad").always.lock().unwrap() = Some(Code::Unavailable);
    // Over every protocol: a status in a gRPC-Web trailers frame or a
    // Connect error body is read before the retry layer looks, as a
    // trailers-only answer's is.
    for protocol in [
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::GrpcWebText,
        Protocol::Connect,
    ] {
        fleet.clear();
        retried_elsewhere(&world, &fleet, protocol).await;
    }
}

async fn retried_elsewhere(world: &World, fleet: &Fleet, protocol: Protocol) {
    let decisions = Decisions::default();
    let policy = policy("[[methods]]\nnames = [\"Unary\"]\nretry = { max_attempts = 2 }\n");
    let client = Client::builder(world.registry.clone())
        .policy(policy)
        .unwrap()
        .observe(decisions.clone())
        .protocol(protocol)
        .build();
    let mut echo = EchoClient::by_name(&client, "echo");
    let deadline = Duration::from_secs(2);
    for n in 0..20 {
        let started = Instant::now();
        let call = echo.unary(tokened(
            EchoRequest::default(),
            &n.to_string(),
            Some(deadline),
        ));
        let reply = bounded("a unary call", call)
            .await
            .unwrap_or_else(|status| panic!("over {protocol}: {status:?}"))
            .into_inner();
        assert_eq!(reply.served_by, "good", "over {protocol}");
        assert!(started.elapsed() < deadline);
    }
    let seen = fleet.seen();
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.instance == "bad").collect();
    assert!(
        !failed.is_empty(),
        "round robin sends some calls to `bad` ({protocol})"
    );
    for bad in &failed {
        assert_eq!(bad.previous, None, "{bad:?}");
        let retried: Vec<&Seen> = seen.iter().filter(|s| s.token == bad.token).collect();
        assert_eq!(retried.len(), 2, "{retried:?}");
        assert_eq!(
            (retried[1].instance.as_str(), retried[1].previous.as_deref()),
            ("good", Some("1"))
        );
        // Within the backoff's ceiling (25 ms), give or take a loaded machine.
        assert!(retried[1].at - retried[0].at < Duration::from_secs(1));
    }
    assert_eq!(
        decisions.count(|d| matches!(d, DecisionKind::Retry { attempt: 2, .. })),
        failed.len(),
        "over {protocol}"
    );
}

/// Makes `rate` calls a second of `Unary` for `duration`, each in its own
/// task, alternating between `client` and a clone of it (which share the
/// service's budget), and waits for them all; returns how many were made
/// and how long that took.
async fn steady_load(client: &Client, rate: u32, duration: Duration) -> (usize, Duration) {
    let clones = [
        EchoClient::by_name(client, "echo"),
        EchoClient::by_name(&client.clone(), "echo"),
    ];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let mut echo = clones[calls.len() % 2].clone();
        calls.spawn(async move { echo.unary(EchoRequest::default()).await });
    }
    let made = calls.len();
    let results = bounded("every call", calls.join_all()).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|s| s.code() == Code::Unavailable))
    );
    (made, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_retries_to_its_share_of_a_steady_failing_load() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["failing"]).await;
    *fleet.script("failing").always.lock().unwrap() = Some(Code::Unavailable);
    let methods = "[[methods]]\nnames = [\"Unary\"]\n\
                   retry = { max_attempts = 3, initial_backoff_ms = 1, max_backoff_ms = 2 }\n";
    // Without a budget: every call is attempted three times.
    let mut unbudgeted = policy(methods);
    unbudgeted.retry_budget.enabled = false;
    let decisions = Decisions::default();
    let (made, _) = steady_load(
        &client(&world, unbudgeted, &decisions),
        500,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(fleet.seen().len(), 3 * made);

    // With the default budget (20% + 10/s over 10 s): at most 1.2 × the
    // calls, plus 10 a second (+5% for the window's slots).
    fleet.clear();
    let decisions = Decisions::default();
    let rate = 500;
    let (made, took) = steady_load(
        &client(&world, policy(methods), &decisions),
        rate,
        Duration::from_secs(2),
    )
    .await;
    let seen = fleet.seen().len();
    eprintln!("budget: {made} calls in {took:?} reached the backend {seen} times");
    let seconds = took.as_secs_f64().ceil();
    let bound = (made as f64 * 1.2 + 10.0 * seconds) * 1.05;
    assert!(
        seen as f64 <= bound,
        "{seen} attempts for {made} calls in {took:?}: bound {bound}"
    );
    assert!(seen > made, "some retries were granted");
    let per_second = seen as f64 / took.as_secs_f64();
    let offered = made as f64 / took.as_secs_f64();
    assert!(
        per_second <= (1.2 * offered + 10.0) * 1.05 + 10.0,
        "{per_second}/s reached the backend for {offered} calls/s"
    );
    // Each call wanted two retries: what was denied was said.
    let denied = decisions.count(|d| matches!(d, DecisionKind::BudgetDenied { hedge: false, .. }));
    let retried = decisions.count(|d| matches!(d, DecisionKind::Retry { .. }));
    assert_eq!(retried, seen - made);
    assert!(denied > 0 && denied <= made, "{denied} denials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_pushback_delays_the_retry_or_stops_it() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["pushing"]).await;
    let script = fleet.script("pushing");
    *script.pushback.lock().unwrap() = Some("200");
    script.fail_next.store(1, Ordering::Relaxed);
    let decisions = Decisions::default();
    let policy = policy("[[methods]]\nnames = [\"Unary\"]\nretry = { initial_backoff_ms = 1 }\n");
    let mut echo = EchoClient::by_name(&client(&world, policy, &decisions), "echo");
    let call = echo.unary(tokened(EchoRequest::default(), "wait", None));
    bounded("a call pushed back", call).await.unwrap();
    let seen = fleet.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let waited = seen[1].at - seen[0].at;
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(
        decisions.count(|d| *d
            == DecisionKind::PushbackWait {
                wait: Duration::from_millis(200)
            }),
        1
    );

    // A pushback past the call's deadline: no retry either, and at once.
    fleet.clear();
    *script.pushback.lock().unwrap() = Some("5000");
    script.fail_next.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let call = echo.unary(tokened(
        EchoRequest::default(),
        "late",
        Some(Duration::from_secs(2)),
    ));
    let status = bounded("a call pushed past its deadline", call)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "the server's own answer");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(fleet.seen().len(), 1);
    assert_eq!(decisions.count(|d| *d == DecisionKind::PushbackStop), 1);

    // A negative pushback: no retry, the call ends with the server's error.
    fleet.clear();
    *script.pushback.lock().unwrap() = Some("-1");
    script.fail_next.store(1, Ordering::Relaxed);
    let call = echo.unary(tokened(EchoRequest::default(), "stop", None));
    let status = bounded("a call told to stop", call).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(fleet.seen().len(), 1);
    assert_eq!(decisions.count(|d| *d == DecisionKind::PushbackStop), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_is_not_retried_once_a_message_reached_the_caller() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["a", "b"]).await;
    let decisions = Decisions::default();
    // The .proto does not mark ServerStream idempotent: the policy does.
    let policy = policy(
        "[[methods]]\nnames = [\"ServerStream\"]\nretry = { idempotent = true, initial_backoff_ms = 1 }\n",
    );
    let mut echo = EchoClient::by_name(&client(&world, policy, &decisions), "echo");
    // A status-only failure commits nothing: retried.
    fleet.script("a").fail_next.store(1, Ordering::Relaxed);
    fleet.script("b").fail_next.store(1, Ordering::Relaxed);
    let call = echo.server_stream(tokened(stream_request("s", 2, Duration::ZERO), "s", None));
    let mut replies = bounded("a stream", call).await.unwrap().into_inner();
    assert_eq!(next_message("first", &mut replies).await, "s #0");
    assert_eq!(fleet.seen().len(), 3);
    // A message, then a failure: the caller has the message, so no retry.
    fleet.clear();
    for script in fleet.scripts.values() {
        *script.partial.lock().unwrap() = true;
    }
    let call = echo.server_stream(tokened(stream_request("p", 2, Duration::ZERO), "p", None));
    let mut replies = bounded("a stream", call).await.unwrap().into_inner();
    assert_eq!(
        next_message("the one message", &mut replies).await,
        "the only one"
    );
    let status = bounded("the end", replies.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(fleet.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_tail_and_cancels_the_losing_attempt() {
    let world = World::new();
    let fleet = Fleet::start(&world, &["a", "b", "slow"]).await;
    let stall = Duration::from_millis(500);
    *fleet.script("slow").stall.lock().unwrap() = stall;
    let decisions = Decisions::default();
    // A third of the calls go to the stalling instance first: a budget of
    // 50% (+10/s) has room for their hedges.
    let mut policy = policy("[[methods]]\nnames = [\"Unary\"]\nhedge = { delay_ms = 20 }\n");
    policy.retry_budget.percent = 50;
    let mut echo = EchoClient::by_name(&client(&world, policy, &decisions), "echo");
    let calls = 100;
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut ended = BTreeMap::new();
    for n in 0..calls {
        let call_started = Instant::now();
        let call = echo.unary(tokened(EchoRequest::default(), &n.to_string(), None));
        let reply = bounded("a hedged call", call).await.unwrap().into_inner();
        latencies.push(call_started.elapsed());
        ended.insert(n.to_string(), Instant::now());
        assert_ne!(reply.served_by, "slow");
    }
    let took = started.elapsed();
    latencies.sort();
    let p99 = latencies[calls * 99 / 100 - 1];
    eprintln!(
        "hedging: p50 {:?}, p99 {p99:?}, max {:?}",
        latencies[calls / 2],
        latencies[calls - 1]
    );
    assert!(p99 < stall / 2, "p99 {p99:?}");
    // Each attempt the stalling instance held was cancelled when the
    // hedge won: its handler saw that within 50 ms.
    let slow: Vec<Seen> = fleet
        .seen()
        .into_iter()
        .filter(|s| s.instance == "slow")
        .collect();
    assert!(slow.len() >= calls / 4, "{} calls held", slow.len());
    let mut count = fleet.cancelled.count.subscribe();
    bounded("every cancellation", count.wait_for(|n| *n >= slow.len()))
        .await
        .unwrap();
    for (token, at) in fleet.cancelled.calls.lock().unwrap().iter() {
        let delay = at.saturating_duration_since(ended[token]);
        assert!(
            delay < Duration::from_millis(50),
            "call {token}: cancelled {delay:?} after"
        );
    }
    // Every call held was hedged (and, on a loaded machine, a slow fast
    // answer may be too), within the budget.
    let hedges = decisions.count(|d| matches!(d, DecisionKind::Hedge { .. }));
    assert!(
        hedges >= slow.len(),
        "{hedges} hedges, {} calls held",
        slow.len()
    );
    assert!(
        hedges as f64 <= calls as f64 * 0.5 + 10.0 * took.as_secs_f64().ceil(),
        "{hedges} hedges"
    );
    assert_eq!(fleet.seen().len(), calls + hedges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_retry_and_hedge_policies_are_refused_naming_the_field() {
    let cases = [
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { max_attempts = 6 }",
            "policy field `methods[0].retry.max_attempts` is 6: expected 2 to 5",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { max_attempts = -1 }",
            "TOML policy field `methods[0].retry.max_attempts`",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { initial_backoff_ms = 0 }",
            "policy field `methods[0].retry.initial_backoff_ms` is 0: expected 1 to 3600000",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { initial_backoff_ms = 50, max_backoff_ms = 10 }",
            "policy field `methods[0].retry.max_backoff_ms` is 10: expected 50 to 3600000",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { backoff_multiplier = 0.5 }",
            "policy field `methods[0].retry.backoff_multiplier` is 0.5: expected 1 to 10",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { codes = [\"UNAVAILABEL\"] }",
            "policy field `methods[0].retry.codes[0]` is `UNAVAILABEL`: expected a gRPC code",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = { codes = [] }",
            "policy field `methods[0].retry.codes` is []: expected at least one gRPC code",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nretry = {}\nhedge = {}",
            "policy field `methods[0].hedge` is set with `retry`: expected one of `retry` and \
             `hedge` per method (gRPC A6)",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nhedge = { max_hedges = 5 }",
            "policy field `methods[0].hedge.max_hedges` is 5: expected 1 to 4",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nhedge = { max_hedges = 0 }",
            "policy field `methods[0].hedge.max_hedges` is 0: expected 1 to 4",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nhedge = { delay_ms = 5, percentile = 90 }",
            "policy field `methods[0].hedge.percentile` is set with `delay_ms`",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nhedge = { percentile = 100 }",
            "policy field `methods[0].hedge.percentile` is 100: expected 1 to 99",
        ),
        (
            "[retry_budget]\nwindow_ms = 0",
            "policy field `retry_budget.window_ms` is 0: expected 100 to 3600000",
        ),
        (
            "[retry_budget]\npercent = -20",
            "TOML policy field `retry_budget.percent`",
        ),
    ];
    for (toml, expected) in cases {
        let error = Policy::from_toml(toml).unwrap_err().to_string();
        assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
    }
    // Refused on a running client too, the policy in force staying.
    let world = World::new();
    let client = world.client();
    let good = policy("[[methods]]\nnames = [\"Unary\"]\nretry = {}\n");
    client.set_policy("echo", good.clone()).unwrap();
    let mut bad = good.clone();
    bad.methods[0].hedge = Some(Default::default());
    let error = client.set_policy("echo", bad).unwrap_err().to_string();
    assert!(
        error.starts_with("policy field `methods[0].hedge`"),
        "{error}"
    );
    assert_eq!(client.policy("echo"), good);
}
