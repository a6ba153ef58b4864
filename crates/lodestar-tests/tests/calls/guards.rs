//! Circuit breakers, the bulkhead and fault injection (client and server),
//! over real sockets to an instance that counts and fails calls by method
//! on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lodestar::client::Policy;
use lodestar::client::observe::{Attempt, Decision, DecisionKind, Observer};
use lodestar::client::policy::{BreakerKind, BreakerSettings, BulkheadSettings, MethodPolicy};
use lodestar::fault::{ABORT_HEADER, DELAY_HEADER, FaultSettings};
use lodestar::server::{Next, RequestBody};
use lodestar::{RunningService, Status};

use super::*;

/// What the instance does and saw: calls by method name, and the methods
/// it fails (with `UNAVAILABLE`) or holds.
#[derive(Clone, Default)]
struct Backend {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    failing: Arc<Mutex<Vec<&'static str>>>,
    hold: Arc<Mutex<Duration>>,
}

impl Backend {
    fn calls(&self, method: &str) -> usize {
        self.calls.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    fn fail(&self, methods: &[&'static str]) {
        *self.failing.lock().unwrap() = methods.to_vec();
    }

    fn hold(&self, delay: Duration) {
        *self.hold.lock().unwrap() = delay;
    }
}

impl Backend {
    /// Counts each call by method, and fails or holds it as set.
    fn answer(&self, request: http::Request<RequestBody>, next: &mut Next) -> Answer {
        let method = request.uri().path().rsplit('/').next().unwrap().to_owned();
        *self
            .calls
            .lock()
            .unwrap()
            .entry(method.clone())
            .or_insert(0) += 1;
        let fail = self.failing.lock().unwrap().contains(&method.as_str());
        let hold = *self.hold.lock().unwrap();
        let answer = tower_service::Service::call(next, request);
        Box::pin(async move {
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            if fail {
                return Err(Box::new(Status::unavailable("failing on purpose")) as tower::BoxError);
            }
            answer.await
        })
    }
}

/// Starts an Echo instance with a [`Backend`] and the server `policy`,
/// telling `observer` of its decisions.
async fn backend_with(
    world: &World,
    service: &str,
    policy: lodestar::server::policy::Policy,
    observer: impl lodestar::server::observe::Observer,
) -> (RunningService, Backend) {
    let backend = Backend::default();
    let layered = backend.clone();
    let running = bounded(
        "an instance to start",
        world
            .builder(service, "a")
            .policy(policy)
            .unwrap()
            .observe(observer)
            .layer(intercept(move |request, next| {
                layered.answer(request, next)
            }))
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .expect("instance starts");
    (running, backend)
}

async fn backend(world: &World, service: &str) -> (RunningService, Backend) {
    backend_with(
        world,
        service,
        Default::default(),
        |_: &lodestar::server::observe::Decision<'_>| {},
    )
    .await
}

/// The decisions a client's observer saw.
#[derive(Clone, Default)]
struct Decisions(Arc<Mutex<Vec<(String, DecisionKind)>>>);

impl Observer for Decisions {
    fn attempt(&self, _: &Attempt<'_>) {}

    fn decided(&self, decision: &Decision<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((decision.method.to_owned(), decision.kind.clone()));
    }
}

impl Decisions {
    fn count(&self, wanted: impl Fn(&DecisionKind) -> bool) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, k)| wanted(k))
            .count()
    }
}

fn client_with(world: &World, service: &str, policy: Policy) -> (Client, Decisions) {
    let decisions = Decisions::default();
    let client = Client::builder(world.registry.clone())
        .observe(decisions.clone())
        .build();
    client.set_policy(service, policy).expect("a valid policy");
    (client, decisions)
}

fn method(names: &[&str]) -> MethodPolicy {
    let mut entry = MethodPolicy::default();
    entry.names = names.iter().map(|n| n.to_string()).collect();
    entry
}

fn breaker(names: &[&str], change: impl FnOnce(&mut BreakerSettings)) -> Policy {
    let mut settings = BreakerSettings::default();
    settings.min_calls = 5;
    settings.open_ms = 400;
    settings.probes = 2;
    change(&mut settings);
    let mut entry = method(names);
    entry.breaker = Some(settings);
    let mut policy = Policy::default();
    policy.methods = vec![entry];
    policy
}

async fn unary(echo: &mut EchoClient<lodestar::client::Channel>) -> Result<(), Status> {
    bounded("a unary call", echo.unary(EchoRequest::default()))
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_fails_fast_probes_then_closes_or_reopens() {
    let world = World::new();
    let (_running, backend) = backend(&world, "broken").await;
    let (client, decisions) = client_with(&world, "broken", breaker(&["Unary", "Write"], |_| {}));
    let mut echo = EchoClient::by_name(&client, "broken");
    backend.fail(&["Unary"]);
    // Opens after the minimum calls, all failed.
    for _ in 0..5 {
        let status = unary(&mut echo).await.unwrap_err();
        assert_eq!(status.message(), "failing on purpose");
    }
    assert_eq!(backend.calls("Unary"), 5);
    // Open: nothing reaches the backend, and callers fail at once.
    let mut took = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let status = unary(&mut echo).await.unwrap_err();
        took.push(started.elapsed());
        assert_eq!(status.code(), Code::Unavailable);
        let message = status.message();
        assert!(
            message.contains("broken")
                && message.contains("circuit breaker of /lodestar.test.Echo/Unary is open")
                && message.contains("lets probes through in"),
            "{message}"
        );
    }
    took.sort();
    assert!(took[25] < Duration::from_millis(1), "median {:?}", took[25]);
    assert_eq!(backend.calls("Unary"), 5);
    // Every clone of the client shares the breaker.
    let status = unary(&mut EchoClient::by_name(&client.clone(), "broken"))
        .await
        .unwrap_err();
    assert!(status.message().contains("is open"), "{status:?}");
    // Another method of the same service, with a breaker of its own, is
    // not affected.
    for _ in 0..20 {
        bounded("write", echo.write(EchoRequest::default()))
            .await
            .unwrap();
    }
    // After the open interval, exactly the configured 2 probes go out; 2
    // healthy ones close it.
    backend.fail(&[]);
    backend.hold(Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut echo = echo.clone();
            tokio::spawn(async move { unary(&mut echo).await })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        match bounded("a call", call).await.unwrap() {
            Ok(()) => ok += 1,
            Err(status) => assert!(status.message().contains("half-open"), "{status:?}"),
        }
    }
    assert_eq!((ok, backend.calls("Unary")), (2, 7));
    backend.hold(Duration::ZERO);
    for _ in 0..3 {
        unary(&mut echo).await.unwrap();
    }
    // Failing again: opens at half of 6 calls; after the interval, one
    // failing probe reopens it.
    backend.fail(&["Unary"]);
    for _ in 0..3 {
        unary(&mut echo).await.unwrap_err();
    }
    let status = unary(&mut echo).await.unwrap_err();
    assert!(status.message().contains("is open"), "{status:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = unary(&mut echo).await.unwrap_err();
    assert_eq!(status.message(), "failing on purpose", "the probe");
    let status = unary(&mut echo).await.unwrap_err();
    assert!(status.message().contains("is open"), "{status:?}");
    assert_eq!(backend.calls("Unary"), 7 + 3 + 3 + 1);
    let opened = decisions.count(|k| matches!(k, DecisionKind::BreakerOpened { .. }));
    let closed = decisions.count(|k| *k == DecisionKind::BreakerClosed);
    let rejected = decisions.count(|k| *k == DecisionKind::BreakerRejected);
    assert_eq!((opened, closed, rejected), (3, 1, 50 + 1 + 4 + 1 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_expired_probe_still_resolves_half_open() {
    let mut world = World::new();
    let (_running, backend) = backend(&world, "probed").await;
    let (client, _) = client_with(&world, "probed", breaker(&["Sleep"], |s| s.probes = 1));
    let mut echo = EchoClient::by_name(&client, "probed");
    backend.fail(&["Sleep"]);
    for _ in 0..5 {
        bounded("sleep", echo.sleep(sleep_request("x", Duration::ZERO)))
            .await
            .unwrap_err();
    }
    backend.fail(&[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The one probe is cancelled by its caller...
    let mut held = echo.clone();
    let probe = tokio::spawn(async move {
        held.sleep(sleep_request("cancelled", Duration::from_secs(60)))
            .await
    });
    assert_eq!(
        world.next_event().await,
        Event::SleepStarted("cancelled".into())
    );
    probe.abort();
    assert_eq!(
        world.next_event().await,
        Event::SleepCancelled("cancelled".into())
    );
    // ... the next is cut by its deadline...
    let mut request = Request::new(sleep_request("expired", Duration::from_secs(60)));
    request.set_timeout(Duration::from_millis(200));
    let status = bounded("the expiring probe", echo.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // ... and neither left the breaker stuck: the next probe goes, and closes it.
    bounded("sleep", echo.sleep(sleep_request("ok", Duration::ZERO)))
        .await
        .unwrap();
    for _ in 0..5 {
        bounded("sleep", echo.sleep(sleep_request("ok", Duration::ZERO)))
            .await
            .unwrap();
    }
    assert_eq!(backend.calls("Sleep"), 5 + 3 + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sre_throttle_refuses_calls_locally_while_the_backend_fails() {
    let world = World::new();
    let (_running, backend) = backend(&world, "throttled").await;
    let policy = breaker(&["*"], |s| {
        s.kind = BreakerKind::Sre;
        s.min_calls = 10;
    });
    let (client, decisions) = client_with(&world, "throttled", policy);
    let mut echo = EchoClient::by_name(&client, "throttled");
    backend.fail(&["Unary"]);
    let mut local = 0;
    for _ in 0..200 {
        let status = unary(&mut echo).await.unwrap_err();
        if status.message().contains("adaptive throttle") {
            local += 1;
        }
    }
    // With every call failing, at most ~1/(requests+1) go out, plus the
    // first 10 and a forced probe a second.
    assert!(backend.calls("Unary") < 40, "{}", backend.calls("Unary"));
    assert_eq!(local + backend.calls("Unary"), 200);
    assert_eq!(
        decisions.count(|k| *k == DecisionKind::BreakerRejected),
        local
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_fails_at_once_without_a_retry_and_a_dropped_call_frees_a_place() {
    let mut world = World::new();
    let (_running, backend) = backend(&world, "crowded").await;
    let mut policy = Policy::default();
    policy.bulkhead = Some(BulkheadSettings::new(3));
    let (client, decisions) = client_with(&world, "crowded", policy);
    let echo = EchoClient::by_name(&client, "crowded");
    let mut held = Vec::new();
    for n in 0..3 {
        let mut echo = echo.clone();
        let token = format!("held-{n}");
        let request = sleep_request(&token, Duration::from_secs(60));
        held.push(tokio::spawn(async move { echo.sleep(request).await }));
        assert_eq!(world.next_event().await, Event::SleepStarted(token));
    }
    // Shared by every clone of the client.
    let mut echo = EchoClient::by_name(&client.clone(), "crowded");
    let started = Instant::now();
    let status = bounded("the fourth call", echo.unary(EchoRequest::default()))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("crowded") && status.message().contains("3 calls are in flight"),
        "{status:?}"
    );
    assert_eq!(backend.calls("Unary"), 0, "never sent, never retried");
    assert_eq!(
        decisions.count(|k| *k == DecisionKind::BulkheadFull { max_calls: 3 }),
        1
    );
    // A held call dropped frees its place.
    held.remove(0).abort();
    assert_eq!(
        world.next_event().await,
        Event::SleepCancelled("held-0".into())
    );
    unary(&mut echo).await.unwrap();
    assert_eq!(backend.calls("Unary"), 1);
    // A streaming call holds its place until its stream ends.
    let mut stream = bounded(
        "a stream",
        echo.server_stream(stream_request("s", 1_000, Duration::from_millis(10))),
    )
    .await
    .unwrap()
    .into_inner();
    bounded("an item", tokio_stream::StreamExt::next(&mut stream))
        .await
        .unwrap()
        .unwrap();
    let status = unary(&mut echo).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    drop(stream);
    unary(&mut echo).await.unwrap();
}

fn faults(change: impl FnOnce(&mut FaultSettings)) -> MethodPolicy {
    let mut settings = FaultSettings::default();
    change(&mut settings);
    let mut entry = method(&["Unary"]);
    entry.fault = Some(settings);
    entry
}

/// Makes `calls` unary calls, 16 at a time, each with `headers`; returns
/// the codes of those that failed.
async fn many(
    client: &Client,
    service: &str,
    calls: usize,
    headers: &[(&'static str, &str)],
) -> Vec<Code> {
    let echo = EchoClient::by_name(client, service);
    let calls = futures_util::stream::iter((0..calls).map(|_| {
        let mut echo = echo.clone();
        let mut request = Request::new(EchoRequest::default());
        for (name, value) in headers {
            request.metadata_mut().insert(*name, value.parse().unwrap());
        }
        async move { echo.unary(request).await.err().map(|s| s.code()) }
    }));
    let results: Vec<Option<Code>> = bounded(
        "a run of calls",
        futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(calls, 16)),
    )
    .await;
    results.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_abort_their_share_delay_and_stay_under_their_cap() {
    let world = World::new();
    let (_running, backend) = backend(&world, "faulty").await;
    let mut policy = Policy::default();
    policy.methods = vec![faults(|f| {
        f.abort_percent = 10.0;
        f.abort_code = "DATA_LOSS".into();
    })];
    let (client, decisions) = client_with(&world, "faulty", policy.clone());
    // 2,000 calls: 10% ± 2% (3σ = 1.3%).
    let failed = many(&client, "faulty", 2_000, &[]).await;
    assert!((160..=240).contains(&failed.len()), "{}", failed.len());
    assert!(failed.iter().all(|&c| c == Code::DataLoss));
    assert_eq!(
        backend.calls("Unary"),
        2_000 - failed.len(),
        "aborts are never sent"
    );
    let injected = decisions.count(|k| matches!(k, DecisionKind::FaultInjected { .. }));
    assert_eq!(injected, failed.len());
    // Every call delayed 300 ms, at most 2 at once: of 8 calls at once, 2
    // are delayed and 6 go through untouched.
    policy.methods = vec![faults(|f| {
        f.delay_percent = 100.0;
        f.delay_ms = 300;
        f.max_active = 2;
    })];
    client.set_policy("faulty", policy).unwrap();
    let echo = EchoClient::by_name(&client, "faulty");
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut echo = echo.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                echo.unary(EchoRequest::default()).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut delayed = 0;
    for call in calls {
        if bounded("a call", call).await.unwrap() >= Duration::from_millis(300) {
            delayed += 1;
        }
    }
    assert_eq!(delayed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_headers_are_ignored_unless_allowed_then_obeyed_once() {
    let world = World::new();
    let server_decisions = Arc::new(AtomicUsize::new(0));
    let counted = server_decisions.clone();
    let (running, backend) = backend_with(
        &world,
        "asked",
        Default::default(),
        move |_: &lodestar::server::observe::Decision<'_>| {
            counted.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await;
    let mut policy = Policy::default();
    policy.methods = vec![faults(|_| {})];
    let (client, _) = client_with(&world, "asked", policy.clone());
    let abort = [(ABORT_HEADER, "UNAVAILABLE")];
    // Allowed nowhere: ignored on both sides.
    assert!(many(&client, "asked", 20, &abort).await.is_empty());
    assert_eq!(backend.calls("Unary"), 20);
    // Allowed by the server only: the server aborts them.
    let mut server_policy = lodestar::server::policy::Policy::default();
    let mut entry = lodestar::server::policy::MethodPolicy::default();
    entry.names = vec!["lodestar.test.Echo/Unary".into()];
    let mut settings = FaultSettings::default();
    settings.allow_headers = true;
    entry.fault = Some(settings);
    server_policy.methods = vec![entry];
    running.set_policy(server_policy).unwrap();
    let failed = many(&client, "asked", 20, &abort).await;
    assert_eq!(failed, vec![Code::Unavailable; 20]);
    assert_eq!(backend.calls("Unary"), 40, "the server's layers saw them");
    assert_eq!(server_decisions.load(Ordering::Relaxed), 20);
    // Allowed by the client: it aborts them first, and the server never
    // sees them (nor the header).
    policy.methods = vec![faults(|f| f.allow_headers = true)];
    client.set_policy("asked", policy).unwrap();
    let mut echo = EchoClient::by_name(&client, "asked");
    let mut request = Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert(ABORT_HEADER, "RESOURCE_EXHAUSTED".parse().unwrap());
    let status = bounded("an aborted call", echo.unary(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "fault injected by the client policy of /lodestar.test.Echo/Unary"
    );
    assert_eq!(backend.calls("Unary"), 40);
    // A delay asked for.
    let started = Instant::now();
    assert!(
        many(&client, "asked", 1, &[(DELAY_HEADER, "200")])
            .await
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_faults_abort_their_share_and_delays_end_at_the_deadline() {
    let world = World::new();
    let mut policy = lodestar::server::policy::Policy::default();
    let mut entry = lodestar::server::policy::MethodPolicy::default();
    entry.names = vec!["lodestar.test.Echo/*".into()];
    let mut settings = FaultSettings::default();
    settings.abort_percent = 10.0;
    entry.fault = Some(settings.clone());
    policy.methods = vec![entry.clone()];
    let (running, backend) = backend_with(
        &world,
        "shaky",
        policy.clone(),
        |_: &lodestar::server::observe::Decision<'_>| {},
    )
    .await;
    let client = world.client();
    let failed = many(&client, "shaky", 2_000, &[]).await;
    assert!((160..=240).contains(&failed.len()), "{}", failed.len());
    assert!(failed.iter().all(|&c| c == Code::Unavailable));
    // Injected below the user's layers, before the handler.
    assert_eq!(backend.calls("Unary"), 2_000);
    // Delays apply.
    settings.abort_percent = 0.0;
    settings.delay_percent = 100.0;
    settings.delay_ms = 200;
    entry.fault = Some(settings.clone());
    policy.methods = vec![entry.clone()];
    running.set_policy(policy.clone()).unwrap();
    let started = Instant::now();
    assert!(many(&client, "shaky", 1, &[]).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(200));
    // A 5 s delay ends at the call's 300 ms deadline.
    settings.delay_percent = 100.0;
    settings.delay_ms = 5_000;
    entry.fault = Some(settings);
    policy.methods = vec![entry];
    running.set_policy(policy).unwrap();
    let mut echo = EchoClient::by_name(&client, "shaky");
    let mut request = Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = bounded("a delayed call", echo.unary(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_breaker_bulkhead_and_fault_settings_are_refused_naming_the_field() {
    let world = World::new();
    let client = world.client();
    for (text, expected) in [
        (
            "[[methods]]\nnames = [\"Get\"]\nbreaker = { probes = 0 }",
            "policy field `methods[0].breaker.probes` is 0: expected 1 to 1000",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nbreaker = { window_ms = 0 }",
            "policy field `methods[0].breaker.window_ms` is 0: expected 100 to 3600000",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nbreaker = { kind = \"sre\", k = -1.0 }",
            "policy field `methods[0].breaker.k` is -1: expected 1 to 100",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nbreaker = { failure_codes = [\"BAD\"] }",
            "policy field `methods[0].breaker.failure_codes[0]` is `BAD`",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nbreaker = { failure_percent = 150 }",
            "policy field `methods[0].breaker.failure_percent` is 150: expected 1 to 100",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nfault = { abort_percent = 100.1 }",
            "policy field `methods[0].fault.abort_percent` is 100.1",
        ),
        (
            "[[methods]]\nnames = [\"Get\"]\nfault = { delay_percent = -3.0 }",
            "policy field `methods[0].fault.delay_percent` is -3",
        ),
        (
            "[bulkhead]\nmax_calls = 0",
            "policy field `bulkhead.max_calls` is 0",
        ),
    ] {
        let error = Policy::from_toml(text).unwrap_err().to_string();
        assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
    }
    let error = Policy::from_toml("[[methods]]\nnames = [\"Get\"]\nbreaker = { min_calls = -1 }")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`methods[0].breaker.min_calls`") && error.contains("-1"),
        "{error}"
    );
    // Through `set_policy`: refused, and the old policy stays.
    let mut bad = breaker(&["Get"], |s| s.probes = 0);
    bad.bulkhead = Some(BulkheadSettings::new(10));
    let error = client.set_policy("guarded", bad).unwrap_err().to_string();
    assert!(error.contains("methods[0].breaker.probes"), "{error}");
    assert_eq!(client.policy("guarded"), Policy::default());
    let error = lodestar::server::policy::Policy::from_toml(
        "[[methods]]\nnames = [\"a.S/*\"]\nfault = { abort_code = \"NOPE\" }",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.starts_with("policy field `methods[0].fault.abort_code` is `NOPE`"),
        "{error}"
    );
}
