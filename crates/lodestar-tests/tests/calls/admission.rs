//! Server admission: rate limits (shared and per caller) and concurrency
//! limits (fixed and adaptive) from the server policy, over real sockets.
//! The exact arithmetic (tokens over time, the estimator's limit under
//! overload) is proven with paused time in the unit tests of
//! `server/admission`; these check the same behaviour end to end, with
//! margins for a loaded machine.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use lodestar::server::observe::{Decision, DecisionKind};
use lodestar::server::policy::Policy;
use lodestar::{Response, Status, Streaming};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;

/// The trailer a refusal says when to try again in.
const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// An Echo whose `Unary` handler counts its runs and has a fixed capacity:
/// `workers` at a time, each taking `service` (a wait, not CPU, so that it
/// holds on a loaded machine). Other methods are the test Echo's.
#[derive(Debug, Clone)]
struct Workers {
    echo: TestEcho,
    workers: Arc<Semaphore>,
    service: Duration,
    runs: Arc<AtomicUsize>,
}

impl Workers {
    fn new(world: &World, workers: usize, service: Duration) -> Self {
        Self {
            echo: world.echo("workers"),
            workers: Arc::new(Semaphore::new(workers)),
            service,
            runs: Arc::default(),
        }
    }
}

#[lodestar::async_trait]
impl Echo for Workers {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let _worker = self
            .workers
            .acquire()
            .await
            .map_err(|_| Status::internal("closed"))?;
        tokio::time::sleep(self.service).await;
        self.echo.unary(request).await
    }

    async fn write(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.echo.write(request).await
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<()>, Status> {
        self.echo.sleep(request).await
    }

    type ServerStreamStream = <TestEcho as Echo>::ServerStreamStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        self.echo.server_stream(request).await
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.echo.client_stream(request).await
    }

    type BidiStream = <TestEcho as Echo>::BidiStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        self.echo.bidi(request).await
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        self.echo.fail(request).await
    }

    async fn report_deadline(
        &self,
        request: Request<()>,
    ) -> Result<Response<DeadlineReport>, Status> {
        self.echo.report_deadline(request).await
    }

    async fn nested(
        &self,
        request: Request<NestedRequest>,
    ) -> Result<Response<DeadlineReport>, Status> {
        self.echo.nested(request).await
    }
}

/// The decisions a server's observer saw.
type Decisions = Arc<Mutex<Vec<(String, DecisionKind)>>>;

/// Starts `echo` with `policy`, its decisions recorded.
async fn serve(
    world: &World,
    echo: impl Echo,
    policy: &str,
) -> (lodestar::RunningService, Decisions) {
    let decisions = Decisions::default();
    let recorded = decisions.clone();
    let builder = world
        .builder("limited", "a")
        .policy(Policy::from_toml(policy).unwrap())
        .unwrap()
        .observe(move |decision: &Decision<'_>| {
            recorded
                .lock()
                .unwrap()
                .push((decision.method.to_owned(), decision.kind.clone()));
        })
        .add_service(EchoServer::new(echo));
    let running = bounded("the server to start", builder.start())
        .await
        .unwrap();
    (running, decisions)
}

/// `n` clients of `running`, each over a connection of its own.
async fn clients(running: &lodestar::RunningService, n: usize) -> Vec<EchoClient<Channel>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let client = direct("limited", running.local_addr()).await;
        clients.push(EchoClient::by_name(&client, "limited"));
    }
    clients
}

fn hello() -> EchoRequest {
    EchoRequest {
        message: "hello".into(),
        payload: vec![],
    }
}

/// The pushback a refusal carries, in ms.
fn pushback(status: &Status) -> u64 {
    status
        .metadata()
        .get(PUSHBACK)
        .unwrap_or_else(|| panic!("no pushback in {status:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// What one offered call came to.
#[derive(Debug)]
struct Offered {
    /// When it was sent.
    sent: Instant,
    /// Its latency, if it succeeded.
    latency: Option<Duration>,
    /// Its latency, however it ended.
    elapsed: Duration,
    /// Its status, if it failed.
    status: Option<Status>,
}

/// Offers `per_second` unary calls a second for `length`, open loop (each
/// call sent on schedule, whatever the others do), spread over `clients`,
/// with `metadata` on each; every call's deadline is 5 s.
async fn offer(
    clients: &[EchoClient<Channel>],
    per_second: u32,
    length: Duration,
    metadata: impl Fn(usize) -> Option<String>,
) -> Vec<Offered> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0;
    while start.elapsed() < length {
        tick.tick().await;
        let mut client = clients[n % clients.len()].clone();
        let mut request = Request::new(hello());
        request.set_timeout(Duration::from_secs(5));
        if let Some(key) = metadata(n) {
            request
                .metadata_mut()
                .insert("x-caller", key.parse().unwrap());
        }
        n += 1;
        calls.spawn(async move {
            let sent = Instant::now();
            let answer = client.unary(request).await;
            Offered {
                sent,
                latency: answer.is_ok().then(|| sent.elapsed()),
                elapsed: sent.elapsed(),
                status: answer.err(),
            }
        });
    }
    bounded("the offered calls to end", calls.join_all()).await
}

/// The `q` quantile of the admitted calls' latencies.
fn quantile(offered: &[Offered], q: f64) -> Duration {
    let mut latencies: Vec<_> = offered.iter().filter_map(|o| o.latency).collect();
    latencies.sort();
    let index = ((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
    latencies[index.min(latencies.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_admits_its_burst_and_rate_across_eight_connections() {
    let world = World::new();
    let echo = Workers::new(&world, 64, Duration::ZERO);
    let runs = echo.runs.clone();
    let policy = r#"
        [[methods]]
        names = ["lodestar.test.Echo/Unary"]
        rate_limit = { per_second = 100, burst = 10 }
    "#;
    let (running, decisions) = serve(&world, echo, policy).await;
    let clients = clients(&running, 8).await;

    // 500/s for 2 s (the unit test proves 5 s to the call, in paused time).
    let offered = offer(&clients, 500, Duration::from_secs(2), |_| None).await;
    let admitted = offered.iter().filter(|o| o.latency.is_some()).count();
    let refused: Vec<_> = offered.iter().filter_map(|o| o.status.as_ref()).collect();
    // Expected: the burst, plus the rate over the time the calls were sent
    // (measured, as a loaded machine may stretch it), ± 2%.
    let first = offered.iter().map(|o| o.sent).min().unwrap();
    let last = offered.iter().map(|o| o.sent).max().unwrap();
    let expected = 10.0 + 100.0 * last.duration_since(first).as_secs_f64();
    assert!(
        (admitted as f64 - expected).abs() <= expected * 0.02 + 1.0,
        "admitted {admitted}, expected {expected:.0} ± 2%"
    );
    // Refusals never ran the handler, and say when to try again.
    assert_eq!(runs.load(Ordering::Relaxed), admitted);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().starts_with(
                "/lodestar.test.Echo/Unary is over the rate limit of \
                 `lodestar.test.Echo/Unary`: 100/s in bursts of up to 10"
            ),
            "{status:?}"
        );
        assert!((1..=10).contains(&pushback(status)), "{status:?}");
    }
    let decisions = decisions.lock().unwrap();
    assert_eq!(decisions.len(), refused.len());
    assert!(decisions.iter().all(|(method, kind)| {
        method == "/lodestar.test.Echo/Unary"
            && matches!(kind, DecisionKind::RateLimited { key: None, .. })
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_has_its_own_bucket_and_random_keys_are_capped() {
    let world = World::new();
    let echo = Workers::new(&world, 64, Duration::ZERO);
    let policy = r#"
        [[methods]]
        names = ["lodestar.test.Echo/*"]
        rate_limit = { per_second = 1, burst = 5, key = "x-caller", max_keys = 64 }
    "#;
    let (running, decisions) = serve(&world, echo, policy).await;
    let mut client = clients(&running, 1).await.remove(0);
    let call = |key: String| {
        let mut client = client.clone();
        async move {
            let mut request = Request::new(hello());
            request
                .metadata_mut()
                .insert("x-caller", key.parse().unwrap());
            bounded("a call", client.unary(request)).await
        }
    };
    let emptied = std::time::Instant::now();
    for caller in ["alice", "bob"] {
        let answers = [(); 7].map(|_| call(caller.to_owned()));
        let mut passed = 0;
        for answer in answers {
            match answer.await {
                Ok(_) => passed += 1,
                Err(status) => assert!(
                    status.message().contains("for each `x-caller`"),
                    "{status:?}"
                ),
            }
        }
        // Each caller its own 5 (a second's refill at most on a slow machine).
        assert!((5..=6).contains(&passed), "{caller}: {passed} passed");
    }
    // A flood of random keys: at most 64 of them get buckets of their own,
    // the rest share one.
    let mut passed = 0;
    for n in 0..400 {
        passed += usize::from(call(format!("random-{n}")).await.is_ok());
    }
    assert!(
        (64..=64 + 5 + 3).contains(&passed),
        "{passed} random keys passed"
    );
    // The callers who had buckets still have them: once the tokens refilled
    // since (one a second) are spent, alice is refused again, where a new
    // bucket would let her burst of 5 through.
    let refilled = emptied.elapsed().as_secs() as usize + 1;
    let mut again = 0;
    let status = loop {
        match call("alice".to_owned()).await {
            Ok(_) => {
                again += 1;
                assert!(
                    again <= refilled,
                    "alice passed {again} times: a new bucket?"
                );
            }
            Err(status) => break status,
        }
    };
    assert!(
        status.message().contains("for each `x-caller`"),
        "{status:?}"
    );
    let _ = client.unary(hello()).await; // without a key: the shared bucket
    let decisions = decisions.lock().unwrap();
    assert!(decisions.iter().any(|(_, kind)| matches!(
        kind,
        DecisionKind::RateLimited { key: Some(key), .. } if key == "bob"
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_shedding_keeps_goodput_and_latency_at_four_times_the_capacity() {
    let world = World::new();
    // Capacity: 4 workers × 20 ms = 200 calls/s.
    let service = Duration::from_millis(20);
    let echo = Workers::new(&world, 4, service);
    let policy = r#"
        [[methods]]
        names = ["lodestar.test.Echo/Unary"]
        concurrency = { adaptive = {} }
    "#;
    let (running, decisions) = serve(&world, echo, policy).await;
    let clients = clients(&running, 8).await;
    // Connected (the first call of each client connects).
    for mut client in clients.iter().cloned() {
        bounded("a call", client.unary(hello())).await.unwrap();
    }

    let unloaded = offer(&clients, 40, Duration::from_secs(1), |_| None).await;
    let unloaded_p99 = quantile(&unloaded, 0.99);
    let half = offer(&clients, 100, Duration::from_secs(2), |_| None).await;
    let shed_at_half = half.iter().filter(|o| o.status.is_some()).count();
    assert_eq!(shed_at_half, 0, "calls shed at half the capacity");

    let length = Duration::from_secs(3);
    let overload = offer(&clients, 800, length, |_| None).await;
    let ok = overload.iter().filter(|o| o.latency.is_some()).count();
    let goodput = ok as f64 / length.as_secs_f64();
    let p99 = quantile(&overload, 0.99);
    for status in overload.iter().filter_map(|o| o.status.as_ref()) {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("adaptive concurrency limit"),
            "{status:?}"
        );
        assert!(pushback(status) >= 1);
    }
    assert!(goodput >= 0.8 * 200.0, "goodput {goodput:.0}/s of 200/s");
    // Refused at once: the round trip (client included, on a loaded
    // machine) is far below the handler's time.
    let mut refusals: Vec<_> = overload
        .iter()
        .filter(|o| o.status.is_some())
        .map(|o| o.elapsed)
        .collect();
    refusals.sort();
    let median = refusals[refusals.len() / 2];
    assert!(
        median < service / 4,
        "refusals' median round trip {median:?}"
    );
    assert!(
        p99 <= unloaded_p99 * 3,
        "admitted p99 {p99:?}, unloaded p99 {unloaded_p99:?}"
    );
    let decisions = decisions.lock().unwrap();
    assert!(
        decisions
            .iter()
            .any(|(_, kind)| matches!(kind, DecisionKind::Shed { adaptive: true, .. }))
    );
}

/// Calls `Unary` until one is admitted: a slot given back on another task
/// (the client's cancellation, as the server sees it) may take a moment.
async fn admitted_again(client: &mut EchoClient<Channel>) {
    bounded("a slot to free up", async {
        while let Err(status) = client.unary(hello()).await {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_limit_refuses_at_once_and_frees_slots_however_calls_end() {
    let mut world = World::new();
    let echo = Workers::new(&world, 64, Duration::ZERO);
    let runs = echo.runs.clone();
    let policy = r#"
        [[methods]]
        names = ["lodestar.test.Echo/*"]
        concurrency = { fixed = 1 }
    "#;
    let (running, _) = serve(&world, echo, policy).await;
    let mut client = clients(&running, 1).await.remove(0);

    // One call in flight: the next is refused at once, its handler not run.
    let mut holder = client.clone();
    let held = tokio::spawn(async move {
        holder
            .sleep(sleep_request("held", Duration::from_secs(60)))
            .await
    });
    assert_eq!(world.next_event().await, Event::SleepStarted("held".into()));
    let started = Instant::now();
    let shed = bounded("a refusal", client.unary(hello()))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert_eq!(
        shed.message(),
        "/lodestar.test.Echo/Unary is overloaded: 1 calls in flight, at the fixed \
         concurrency limit of `lodestar.test.Echo/*` (1); try again later or elsewhere"
    );
    assert!(pushback(&shed) >= 1);
    let refused_sleep = bounded(
        "a refusal",
        client.sleep(sleep_request("refused", Duration::ZERO)),
    )
    .await
    .unwrap_err();
    assert_eq!(refused_sleep.code(), Code::ResourceExhausted);
    assert_eq!(runs.load(Ordering::Relaxed), 0);

    // The client cancels: the slot is free again.
    held.abort();
    assert_eq!(
        world.next_event().await,
        Event::SleepCancelled("held".into())
    );
    admitted_again(&mut client).await;

    // Completion and errors free it at once (before the client hears).
    for _ in 0..3 {
        bounded("a call", client.unary(hello())).await.unwrap();
        let failed = bounded(
            "a failing call",
            client.fail(FailRequest {
                code: Code::NotFound as i32,
                message: "no".into(),
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(failed.code(), Code::NotFound);
    }

    // So does the deadline.
    let mut request = Request::new(sleep_request("late", Duration::from_secs(60)));
    request.set_timeout(Duration::from_millis(100));
    let late = bounded("a call past its deadline", client.sleep(request))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded);
    world.expect_sleep_cancelled("late").await;
    bounded("a call", client.unary(hello())).await.unwrap();
    assert!(
        world.events.try_recv().is_err(),
        "the refused sleep never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_follow_the_policy_set_live_and_a_bad_one_is_refused() {
    let world = World::new();
    let echo = Workers::new(&world, 64, Duration::ZERO);
    let (running, _) = serve(&world, echo, "").await;
    let mut client = clients(&running, 1).await.remove(0);
    for _ in 0..5 {
        bounded("a call", client.unary(hello())).await.unwrap();
    }
    let limited = Policy::from_toml(
        "[[methods]]\nnames = [\"*\"]\nrate_limit = { per_second = 0.1, burst = 2 }",
    )
    .unwrap();
    running.set_policy(limited.clone()).unwrap();
    let answers = [(); 3].map(|_| client.clone());
    let mut passed = 0;
    for mut c in answers {
        passed += usize::from(bounded("a call", c.unary(hello())).await.is_ok());
    }
    assert_eq!(passed, 2);
    let bad = Policy::from_toml("[[methods]]\nnames = [\"*\"]").unwrap();
    let mut bad = bad;
    bad.methods[0].concurrency = Some(lodestar::server::policy::Concurrency::Fixed(0));
    let error = running.set_policy(bad).unwrap_err();
    assert_eq!(
        error.to_string(),
        "policy field `methods[0].concurrency.fixed` is 0: expected 1 to 1000000"
    );
    // The old one stays, and its bucket too (still empty).
    assert_eq!(running.policy(), limited);
    assert_eq!(
        bounded("a call", client.unary(hello()))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_refusals_keep_the_connection() {
    let world = World::new();
    let echo = Workers::new(&world, 64, Duration::ZERO);
    let policy = r#"
        [[methods]]
        names = ["lodestar.test.Echo/Unary"]
        rate_limit = { per_second = 0.001, burst = 1 }
    "#;
    let (running, _) = serve(&world, echo, policy).await;
    // hyper's client, which sends a request's message apart from its
    // headers (lodestar's sends both at once); and hyper's h2 closes a
    // connection after 1,024 streams it had to reset: refusals must not
    // count as such (see the admission layer).
    let (client, connection) = super::server_stack::one_connection(running.local_addr()).await;
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let mut client = client.clone();
        calls.spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..100 {
                let mut request = Request::new(EchoRequest {
                    message: format!("worker {worker}"),
                    payload: vec![0; 1024],
                });
                request.set_timeout(Duration::from_secs(5));
                codes.push(match client.unary(request).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                });
            }
            codes
        });
    }
    let codes: Vec<Code> = bounded("3,200 calls", calls.join_all())
        .await
        .into_iter()
        .flatten()
        .collect();
    let refused = codes
        .iter()
        .filter(|&&c| c == Code::ResourceExhausted)
        .count();
    assert_eq!(
        refused + codes.iter().filter(|&&c| c == Code::Ok).count(),
        codes.len(),
        "{:?}",
        codes
            .iter()
            .filter(|&&c| c != Code::ResourceExhausted)
            .collect::<Vec<_>>()
    );
    assert!(refused >= 3_190, "{refused} refused");
    assert!(connection.is_open());
}
