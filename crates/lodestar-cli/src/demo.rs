//! `lodestar demo`: the whole system in one process, in seconds.
//!
//! A registry server on loopback (gRPC and HTTP), an HTTP broker found
//! through it, a greeter and four RouteGuide instances registering over
//! `lodestar://`, and a client calling them by name. One instance is slow
//! and one fails (server-side fault injection); the client's balancer and
//! outlier detection route around them. A RouteGuide handler publishes an
//! event that the greeter handles. Then one instance shuts down gracefully
//! and one crashes while calls go on. The summary says what happened and
//! why; "all went well" is defined in [`Verdict`].

use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use greeter::{GreeterClient, HelloRequest, MyGreeter};
use lodestar::client::Policy as ClientPolicy;
use lodestar::client::observe::{Attempt, Decision, DecisionKind, Observer, Outcome};
use lodestar::events::{self, EventPublisher, SubscribeOptions};
use lodestar::server::policy::Policy as ServerPolicy;
use lodestar::{
    Client, Registry, Request, Response, RunningService, Service, ServiceKey, Status, Streaming,
    WatchEvent,
};
use route_guide::{
    Feature, Point, Rectangle, RouteGuide, RouteGuideClient, RouteGuideServer, RouteGuideService,
    RouteNote, RouteSummary, SERVED_BY, SERVICE_NAME, load_features,
};
use tokio::sync::Notify;
use tokio_stream::StreamExt;

/// Options of `lodestar demo` (what "all went well" means is in the
/// subcommand's doc, in `main.rs`, and [`Verdict`]).
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// GetFeature calls in the phase where route-guide-4 fails (more are
    /// made, up to four times as many, until it is ejected).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=10_000))]
    load: u32,
    /// Rounds of the four RouteGuide call kinds and a greeting.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rounds: u32,
    /// Unary calls made after one instance shut down and one crashed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    after: u32,
    /// After the run, keep the registry, the broker and the services
    /// running, and print their addresses to try, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

/// The topic RouteGuide's RecordRoute publishes a `RouteSummary` on.
const TOPIC: &str = "routeguide.routes";
/// The extra time of each call to the slow instance.
const SLOW: Duration = Duration::from_millis(20);
/// Failures in a row after which the client ejects an instance.
const CONSECUTIVE_FAILURES: u32 = 3;
/// Lease TTL of every instance.
const TTL: Duration = Duration::from_secs(2);
/// How long an instance whose lease ran out stays before eviction.
const EVICTION_GRACE: Duration = Duration::from_secs(1);
/// Calls in flight at once in the load phase.
const WORKERS: usize = 8;
/// The bound of every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// A point with a named feature, for the commands printed by `--keep`.
const POINT_JSON: &str = r#"{"latitude":409146138,"longitude":-746188906}"#;

const FAST_1: &str = "route-guide-1";
const FAST_2: &str = "route-guide-2";
const SLOW_3: &str = "route-guide-3";
const FAILING_4: &str = "route-guide-4";
const GREETER_1: &str = "greeter-1";

/// The phases with calls, whose attempts are counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// GetFeature only, while route-guide-4 fails.
    Load = 0,
    /// Every call kind, and greetings.
    Kinds = 1,
    /// GetFeature after the shutdown and the crash.
    After = 2,
}
const PHASES: usize = 3;

const KINDS: [&str; 5] = [
    "unary            GetFeature",
    "server streaming ListFeatures",
    "client streaming RecordRoute",
    "bidi streaming   RouteChat",
    "unary            greeter SayHello",
];

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// What the client saw: every attempt (the observer) and every call.

/// Attempts of one instance.
#[derive(Debug, Default, Clone)]
struct PerInstance {
    attempts: [u64; PHASES],
    failures: [u64; PHASES],
    /// Failed attempts by outcome (`UNAVAILABLE`, `transport`).
    outcomes: BTreeMap<String, u64>,
    streak: u32,
    longest_streak: u32,
}

/// What the client's observer recorded.
#[derive(Debug)]
struct Traffic {
    phase: Phase,
    instances: BTreeMap<String, PerInstance>,
    retries: u64,
}

/// The client's [`Observer`]: counts attempts by instance and phase, and
/// configured retries.
#[derive(Debug, Clone)]
struct Watcher(Arc<Mutex<Traffic>>);

impl Watcher {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Traffic {
            phase: Phase::Load,
            instances: BTreeMap::new(),
            retries: 0,
        })))
    }

    fn enter(&self, phase: Phase) {
        lock(&self.0).phase = phase;
    }

    fn snapshot(&self) -> (BTreeMap<String, PerInstance>, u64) {
        let traffic = lock(&self.0);
        (traffic.instances.clone(), traffic.retries)
    }

    fn longest_streak(&self, instance: &str) -> u32 {
        lock(&self.0)
            .instances
            .get(instance)
            .map_or(0, |i| i.longest_streak)
    }
}

impl Observer for Watcher {
    fn attempt(&self, attempt: &Attempt<'_>) {
        if attempt.by_caller {
            return;
        }
        let mut traffic = lock(&self.0);
        let phase = traffic.phase as usize;
        // Instance ids are ours (the demo named them); bounded by the demo's
        // own instances.
        let entry = traffic
            .instances
            .entry(attempt.endpoint.instance().id.clone())
            .or_default();
        entry.attempts[phase] += 1;
        if attempt.outcome.is_failure() {
            entry.failures[phase] += 1;
            let outcome = match attempt.outcome {
                Outcome::Status(code) => lodestar::client::policy::code_name(*code).to_owned(),
                _ => "transport error".to_owned(),
            };
            *entry.outcomes.entry(outcome).or_default() += 1;
            entry.streak += 1;
            entry.longest_streak = entry.longest_streak.max(entry.streak);
        } else {
            entry.streak = 0;
        }
    }

    fn decided(&self, decision: &Decision<'_>) {
        if matches!(decision.kind, DecisionKind::Retry { .. }) {
            lock(&self.0).retries += 1;
        }
    }
}

/// Calls by kind, as the caller saw them.
#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, usize>,
    failed: BTreeMap<&'static str, usize>,
    /// Calls per kind per instance (from the answer's `x-served-by`).
    served: BTreeMap<&'static str, BTreeMap<String, usize>>,
    errors: Vec<String>,
}

impl Tally {
    fn record<T>(&mut self, kind: &'static str, result: Result<(Option<String>, T), Status>) {
        match result {
            Ok((by, _)) => {
                *self.ok.entry(kind).or_default() += 1;
                let by = by.unwrap_or_else(|| "?".to_owned());
                *self.served.entry(kind).or_default().entry(by).or_default() += 1;
            }
            Err(status) => {
                *self.failed.entry(kind).or_default() += 1;
                // At most a few lines: the demo expects none.
                if self.errors.len() < 10 {
                    self.errors.push(format!(
                        "{}: {}",
                        kind.split_whitespace().last().unwrap_or(kind),
                        status
                    ));
                }
            }
        }
    }

    fn total(&self) -> (usize, usize) {
        (self.ok.values().sum(), self.failed.values().sum())
    }
}

// ---------------------------------------------------------------------------
// The services.

/// RouteGuide, publishing a `RouteSummary` event for each route recorded.
#[derive(Clone)]
struct Publishing {
    inner: RouteGuideService,
    events: EventPublisher,
    counts: Arc<EventCounts>,
}

/// Events published by RouteGuide and handled by the greeter.
#[derive(Debug, Default)]
struct EventCounts {
    published: AtomicUsize,
    publish_failed: AtomicUsize,
    handled: AtomicUsize,
    handled_changed: Notify,
}

#[lodestar::async_trait]
impl RouteGuide for Publishing {
    async fn get_feature(&self, request: Request<Point>) -> Result<Response<Feature>, Status> {
        self.inner.get_feature(request).await
    }

    type ListFeaturesStream = <RouteGuideService as RouteGuide>::ListFeaturesStream;

    async fn list_features(
        &self,
        request: Request<Rectangle>,
    ) -> Result<Response<Self::ListFeaturesStream>, Status> {
        self.inner.list_features(request).await
    }

    async fn record_route(
        &self,
        request: Request<Streaming<Point>>,
    ) -> Result<Response<RouteSummary>, Status> {
        let response = self.inner.record_route(request).await?;
        // The route is recorded either way; an event that could not be
        // published is counted, and fails the demo.
        match self.events.publish(TOPIC, response.get_ref()).await {
            Ok(()) => self.counts.published.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(%error, topic = TOPIC, "could not publish a route summary");
                self.counts.publish_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok(response)
    }

    type RouteChatStream = <RouteGuideService as RouteGuide>::RouteChatStream;

    async fn route_chat(
        &self,
        request: Request<Streaming<RouteNote>>,
    ) -> Result<Response<Self::RouteChatStream>, Status> {
        self.inner.route_chat(request).await
    }
}

/// The server policy that makes route-guide-3 slow: every call delayed.
fn slow_policy() -> Result<ServerPolicy, Box<dyn Error>> {
    Ok(ServerPolicy::from_toml(&format!(
        "[[methods]]\nnames = [\"routeguide.RouteGuide/*\"]\n\
         fault = {{ delay_percent = 100.0, delay_ms = {} }}",
        SLOW.as_millis()
    ))?)
}

/// The server policy that makes route-guide-4 fail: every GetFeature is
/// aborted with UNAVAILABLE before it reaches the handler.
fn failing_policy() -> Result<ServerPolicy, Box<dyn Error>> {
    Ok(ServerPolicy::from_toml(
        "[[methods]]\nnames = [\"routeguide.RouteGuide/GetFeature\"]\n\
         fault = { abort_percent = 100.0, abort_code = \"UNAVAILABLE\" }",
    )?)
}

/// The client's policy for route-guide: least-request (the less loaded of
/// two instances picked at random, by calls in flight), ejection after a
/// few failures in a row, no panic threshold (so that an
/// ejected instance stays out even when few are left), and GetFeature
/// (idempotent in its `.proto`) retried on UNAVAILABLE.
fn client_policy() -> Result<ClientPolicy, Box<dyn Error>> {
    Ok(ClientPolicy::from_toml(&format!(
        "[strategy]\nkind = \"least_request\"\n\
         [outlier]\nconsecutive_failures = {CONSECUTIVE_FAILURES}\npanic_threshold_percent = 0\n\
         [[methods]]\nnames = [\"GetFeature\"]\n\
         retry = {{ max_attempts = 3, codes = [\"UNAVAILABLE\"] }}"
    ))?)
}

/// A started instance, with what the demo tells about it.
struct Instance {
    name: &'static str,
    role: &'static str,
    running: RunningService,
}

impl Instance {
    fn describe(&self) -> String {
        let metrics = self
            .running
            .admin_addr()
            .map(|admin| format!(", metrics http://{admin}/metrics"))
            .unwrap_or_default();
        format!(
            "{:<14} {}{metrics}{}",
            self.name,
            self.running.local_addr(),
            self.role
        )
    }
}

fn step(number: usize, text: &str) {
    println!("[{number}/8] {text}");
}

// ---------------------------------------------------------------------------
// The run.

pub(crate) async fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let started = Instant::now();
    println!(
        "lodestar demo: a registry server, a broker, a greeter and four RouteGuide instances, \
         in one process on loopback\n"
    );

    step(
        1,
        "registry: starting the registry server (gRPC and HTTP APIs)",
    );
    let registry_server = lodestar_registry_server::start(lodestar_registry_server::Config {
        http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        eviction_grace: EVICTION_GRACE,
        ..lodestar_registry_server::Config::ephemeral()
    })
    .await?;
    let registry_url = format!("lodestar://{}", registry_server.local_addr());
    let registry_http = registry_server
        .http_addr()
        .ok_or("the registry server started without its HTTP API")?;
    println!("  gRPC {registry_url}, HTTP http://{registry_http}/v1/services");
    let registry = lodestar_registry::from_url(&registry_url)?;

    step(
        2,
        "broker: the HTTP broker, finding subscribers through the registry",
    );
    let broker = lodestar_broker::from_url("http://", registry.clone()).await?;
    println!("  subscribers serve HTTP on loopback and register as `broker.{{topic}}`");

    step(3, "services: starting them; they register over lodestar://");
    let counts = Arc::new(EventCounts::default());
    let greeter = start_greeter(registry.clone(), broker.clone(), counts.clone()).await?;
    println!("  {}", greeter.describe());
    let mut guides = Vec::new();
    for (name, role, policy) in [
        (FAST_1, "", None),
        (FAST_2, "", None),
        (
            SLOW_3,
            " (slow: +20 ms a call, server fault injection)",
            Some(slow_policy()?),
        ),
        (
            FAILING_4,
            " (failing: GetFeature aborted UNAVAILABLE, server fault injection)",
            Some(failing_policy()?),
        ),
    ] {
        let service = Publishing {
            inner: RouteGuideService::new(name),
            events: EventPublisher::from_arc(broker.clone()),
            counts: counts.clone(),
        };
        let mut builder = Service::builder(SERVICE_NAME)
            .id(name)
            .version("1.0.0")
            .registry(registry.clone())
            .ttl(TTL)
            .grace_period(Duration::from_secs(5))
            .add_service(RouteGuideServer::new(service));
        if let Some(policy) = policy {
            builder = builder.policy(policy)?;
        }
        let instance = Instance {
            name,
            role,
            running: builder.start().await?,
        };
        println!("  {}", instance.describe());
        guides.push(instance);
    }
    let key = ServiceKey::new(SERVICE_NAME);
    let subscribers = ServiceKey::new(lodestar_broker::http::service_name(TOPIC));
    wait_for("the instances and the subscriber in the registry", async {
        loop {
            let guides = registry.instances(&key).await.map_or(0, |i| i.len());
            let subscribed = registry
                .instances(&subscribers)
                .await
                .map_or(0, |i| i.len());
            if guides == 4 && subscribed == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    println!(
        "  registered: 4 instances of `{SERVICE_NAME}`, 1 of `greeter`, greeter subscribed to `{TOPIC}`"
    );

    let watcher = Watcher::new();
    let client = Client::builder(registry.clone())
        .timeout(Duration::from_secs(5))
        .observe(watcher.clone())
        .build();
    client.set_policy(SERVICE_NAME, client_policy()?)?;
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    let mut hello = GreeterClient::by_name(&client, greeter::SERVICE_NAME);
    let features = Arc::new(load_features());
    let ejections_before = ejections(SERVICE_NAME);

    step(
        4,
        &format!(
            "load: {} GetFeature calls by name, {WORKERS} at a time; route-guide-4 fails them, \
             route-guide-3 is slow",
            args.load
        ),
    );
    let mut load = Tally::default();
    let most = usize::try_from(args.load)?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let mut guide = guide.clone();
        let features = features.clone();
        let next = next.clone();
        let watcher = watcher.clone();
        workers.spawn(async move {
            let mut results = Vec::new();
            loop {
                // More calls, up to four times as many, until route-guide-4
                // has failed often enough in a row to be ejected.
                let n = next.fetch_add(1, Ordering::Relaxed);
                let failed_enough = watcher.longest_streak(FAILING_4) >= CONSECUTIVE_FAILURES;
                if n >= most * 4 || (n >= most && failed_enough) {
                    return results;
                }
                results.push(unary(&mut guide, &features, n).await);
            }
        });
    }
    let mut made = 0;
    while let Some(results) = workers.join_next().await {
        for result in results? {
            made += 1;
            load.record(KINDS[0], result);
        }
    }
    let ejected = ejections(SERVICE_NAME) - ejections_before;
    println!(
        "  {made} calls, {} failed as the client saw them; ejections by outlier detection: {ejected}",
        load.total().1
    );

    step(
        5,
        &format!(
            "calls: {} rounds of every call kind, and greetings; RecordRoute publishes `{TOPIC}`",
            args.rounds
        ),
    );
    watcher.enter(Phase::Kinds);
    let mut kinds = Tally::default();
    for round in 0..usize::try_from(args.rounds)? {
        kinds.record(KINDS[0], unary(&mut guide, &features, round).await);
        kinds.record(KINDS[1], list(&mut guide).await);
        kinds.record(KINDS[2], record(&mut guide, &features, round).await);
        kinds.record(KINDS[3], chat(&mut guide, round).await);
        kinds.record(KINDS[4], greet(&mut hello, round).await);
    }
    print_table(&kinds);

    step(
        6,
        "events: waiting for the greeter to handle every route summary",
    );
    let events_done = tokio::time::timeout(WAIT, async {
        loop {
            let changed = counts.handled_changed.notified();
            if counts.handled.load(Ordering::Relaxed) >= counts.published.load(Ordering::Relaxed) {
                return;
            }
            changed.await;
        }
    })
    .await
    .is_ok();
    let (published, handled) = (
        counts.published.load(Ordering::Relaxed),
        counts.handled.load(Ordering::Relaxed),
    );
    println!("  {published} published by route-guide, {handled} handled by greeter");

    step(
        7,
        &format!(
            "shutdown and crash: {FAST_2} shuts down gracefully, {FAST_1} is killed; {} calls go on",
            args.after
        ),
    );
    let mut watch = registry.watch(&key, None).await?;
    let shutdown_began = Instant::now();
    let graceful = take(&mut guides, FAST_2)?;
    graceful.running.shutdown().await?;
    println!("  {FAST_2}: shut down (NOT_SERVING, deregistered, drained)");
    let crashed = take(&mut guides, FAST_1)?;
    crashed.running.abort().await;
    let crashed_at = Instant::now();
    println!("  {FAST_1}: killed without deregistering (its lease of {TTL:?} runs out on its own)");
    watcher.enter(Phase::After);
    let mut after = Tally::default();
    for round in 0..usize::try_from(args.after)? {
        after.record(KINDS[0], unary(&mut guide, &features, round).await);
    }
    let served_after: Vec<String> = after
        .served
        .values()
        .flat_map(|m| m.iter().map(|(by, n)| format!("{by} {n}")))
        .collect();
    println!(
        "  {} calls, {} failed as the client saw them; served by: {}",
        args.after,
        after.total().1,
        served_after.join(", ")
    );

    step(
        8,
        &format!("registry: waiting for {FAST_1}'s lease to run out"),
    );
    let mut left = Departures::default();
    // The lease runs out within its TTL of the last heartbeat; eviction
    // follows after the grace.
    let eviction_bound = TTL * 3 + EVICTION_GRACE + WAIT;
    let _ = tokio::time::timeout(eviction_bound, async {
        while let Some(event) = watch.next().await {
            match event {
                Ok(WatchEvent::Put { instance, .. })
                    if instance.id == FAST_1 && !instance.healthy =>
                {
                    left.expired.get_or_insert(crashed_at.elapsed());
                }
                Ok(WatchEvent::Delete { id, .. }) if id == FAST_1 => {
                    left.evicted = Some(crashed_at.elapsed());
                }
                Ok(WatchEvent::Delete { id, .. }) if id == FAST_2 => {
                    left.deregistered = Some(shutdown_began.elapsed());
                }
                Ok(WatchEvent::Snapshot { instances, .. }) => {
                    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
                    if !ids.contains(&FAST_2) && left.deregistered.is_none() {
                        left.deregistered = Some(shutdown_began.elapsed());
                    }
                }
                _ => {}
            }
            if left.evicted.is_some() && left.deregistered.is_some() {
                return;
            }
        }
    })
    .await;
    // A watch holds a stream open on the registry server until dropped.
    drop(watch);
    match (left.expired, left.evicted) {
        (expired, Some(evicted)) => println!(
            "  {FAST_1}: {}evicted from the registry {evicted:.1?} after the kill",
            expired
                .map(|e| format!("lease ran out {e:.1?} after the kill (unhealthy), "))
                .unwrap_or_default()
        ),
        _ => {
            println!(
                "  {FAST_1}: still registered {eviction_bound:?} after the kill (expected its lease to run out)"
            )
        }
    }

    let (traffic, retries) = watcher.snapshot();
    let verdict = Verdict {
        calls: [&load, &kinds, &after].map(Tally::total),
        traffic: &traffic,
        ejected,
        events: (
            published,
            handled,
            counts.publish_failed.load(Ordering::Relaxed),
        ),
        events_done,
        departures: &left,
    };
    print_summary(
        &[&load, &kinds, &after],
        &traffic,
        retries,
        &verdict,
        published,
        handled,
    );
    print_metrics();
    let (ok, problems) = verdict.judge();
    println!();
    if ok {
        println!(
            "All went well, in {:.1?}: every call succeeded as the client saw it; every failed \
             attempt was on {FAILING_4} (injected) or {FAST_1} after its crash, and sent again \
             elsewhere; {FAILING_4} was ejected; every event was handled; {FAST_2} deregistered \
             and {FAST_1} was evicted.",
            started.elapsed()
        );
    } else {
        println!("Not all went well, in {:.1?}:", started.elapsed());
        for problem in &problems {
            println!("  - {problem}");
        }
    }

    let mut remaining: Vec<Instance> = guides;
    remaining.push(greeter);
    if args.keep {
        keep(&remaining, &registry_url, registry_http)?;
        lodestar::server::shutdown_signal().await;
        println!("\nstopping");
    } else {
        println!(
            "\nTip: `lodestar demo --keep` leaves it all running and prints what to try \
             (lodestar call, curl /metrics, the registry's HTTP API)."
        );
    }
    // Whatever holds a stream open on the registry server goes before it,
    // so that its shutdown has nothing to wait for: the client's watches
    // end with the deregistrations it no longer needs to hear of.
    drop((client, guide, hello));
    for instance in remaining {
        instance.running.shutdown().await?;
    }
    drop((broker, registry));
    registry_server.shutdown().await?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The greeter, subscribed to the route summaries (queue group `greeter`).
async fn start_greeter(
    registry: Arc<dyn Registry>,
    broker: Arc<dyn lodestar::Broker>,
    counts: Arc<EventCounts>,
) -> Result<Instance, Box<dyn Error>> {
    let handler = events::proto_handler(move |_summary: RouteSummary, _message| {
        let counts = counts.clone();
        async move {
            counts.handled.fetch_add(1, Ordering::Relaxed);
            counts.handled_changed.notify_one();
            Ok(())
        }
    });
    let running = Service::builder(greeter::SERVICE_NAME)
        .id(GREETER_1)
        .version("1.0.0")
        .registry(registry)
        .ttl(TTL)
        .broker(broker)
        .subscribe(TOPIC, SubscribeOptions::queue("greeter"), handler)
        .add_service(MyGreeter.into_server())
        .start()
        .await?;
    Ok(Instance {
        name: GREETER_1,
        role: " (handles the route summaries RouteGuide publishes)",
        running,
    })
}

/// Removes the instance called `name` from `instances`.
fn take(instances: &mut Vec<Instance>, name: &str) -> Result<Instance, Box<dyn Error>> {
    let at = instances
        .iter()
        .position(|i| i.name == name)
        .ok_or_else(|| format!("no instance {name} is running"))?;
    Ok(instances.remove(at))
}

/// Waits for `future`, at most [`WAIT`].
async fn wait_for<F: Future>(what: &str, future: F) -> Result<F::Output, Box<dyn Error>> {
    tokio::time::timeout(WAIT, future)
        .await
        .map_err(|_| format!("gave up after {WAIT:?} waiting for {what}").into())
}

/// When the two instances stopped in phase 7 left the registry.
#[derive(Debug, Default)]
struct Departures {
    /// The graceful one, after its shutdown began.
    deregistered: Option<Duration>,
    /// The crashed one's lease ran out, after the kill.
    expired: Option<Duration>,
    /// The crashed one was evicted, after the kill.
    evicted: Option<Duration>,
}

/// Whether all went well: the definition `lodestar demo --help` states.
struct Verdict<'a> {
    /// (succeeded, failed) calls of the load, kinds and after phases.
    calls: [(usize, usize); 3],
    traffic: &'a BTreeMap<String, PerInstance>,
    /// Ejections for consecutive failures during the load phase.
    ejected: u64,
    /// Events published, handled, and not published.
    events: (usize, usize, usize),
    events_done: bool,
    departures: &'a Departures,
}

impl Verdict<'_> {
    /// Whether all went well, and if not, every reason why not.
    fn judge(&self) -> (bool, Vec<String>) {
        let mut problems = Vec::new();
        let failed: usize = self.calls.iter().map(|(_, failed)| failed).sum();
        if failed > 0 {
            problems.push(format!("{failed} call(s) failed as the client saw them"));
        }
        for (name, instance) in self.traffic {
            for (phase, failures) in instance.failures.iter().enumerate() {
                let expected =
                    name == FAILING_4 || (name == FAST_1 && phase == Phase::After as usize);
                if *failures > 0 && !expected {
                    problems.push(format!(
                        "{name} failed {failures} attempt(s) in phase {phase}, where it should not fail"
                    ));
                }
            }
        }
        let failing = self.traffic.get(FAILING_4).cloned().unwrap_or_default();
        if self.ejected == 0 || failing.longest_streak < CONSECUTIVE_FAILURES {
            problems.push(format!(
                "{FAILING_4} was not ejected by outlier detection (longest run of failures: {})",
                failing.longest_streak
            ));
        }
        if failing.attempts[Phase::Kinds as usize] + failing.attempts[Phase::After as usize] > 0 {
            problems.push(format!("{FAILING_4} got calls after it was ejected"));
        }
        let (published, handled, unpublished) = self.events;
        if published == 0 || unpublished > 0 || !self.events_done || handled != published {
            problems.push(format!(
                "events: {published} published, {unpublished} not published, {handled} handled"
            ));
        }
        if self.departures.deregistered.is_none() {
            problems.push(format!("{FAST_2} was not seen leaving the registry"));
        }
        if self.departures.evicted.is_none() {
            problems.push(format!("{FAST_1} was not evicted from the registry"));
        }
        (problems.is_empty(), problems)
    }
}

/// The client's ejections of `service`'s instances for consecutive
/// failures, as its metrics count them.
fn ejections(service: &str) -> u64 {
    const EJECTIONS: &str = "lodestar_client_ejections_total{";
    let text = lodestar::metrics::Metrics::global().encode();
    text.lines()
        .filter_map(|line| line.strip_prefix(EJECTIONS))
        .filter_map(|line| line.rsplit_once("} "))
        .filter(|(labels, _)| {
            labels.contains(&format!("server_address=\"{service}\""))
                && labels.contains("reason=\"consecutive_failures\"")
        })
        .filter_map(|(_, count)| count.trim().parse::<f64>().ok())
        .map(|count| count as u64)
        .sum()
}

fn print_table(tally: &Tally) {
    let mut names: Vec<&String> = tally.served.values().flat_map(|m| m.keys()).collect();
    names.sort();
    names.dedup();
    print!("  {:<34}", "calls by kind, served by");
    for name in &names {
        print!(" {name:>14}");
    }
    println!(" {:>7}", "failed");
    for kind in KINDS {
        print!("  {kind:<34}");
        for name in &names {
            let n = tally
                .served
                .get(kind)
                .and_then(|m| m.get(*name))
                .copied()
                .unwrap_or(0);
            print!(" {n:>14}");
        }
        println!(" {:>7}", tally.failed.get(kind).copied().unwrap_or(0));
    }
}

fn print_summary(
    tallies: &[&Tally],
    traffic: &BTreeMap<String, PerInstance>,
    retries: u64,
    verdict: &Verdict<'_>,
    published: usize,
    handled: usize,
) {
    println!("\nSummary");
    println!("  calls, as the client saw them:");
    for kind in KINDS {
        let ok: usize = tallies
            .iter()
            .map(|t| t.ok.get(kind).copied().unwrap_or(0))
            .sum();
        let failed: usize = tallies
            .iter()
            .map(|t| t.failed.get(kind).copied().unwrap_or(0))
            .sum();
        println!("    {kind:<34} {:>5} calls, {failed} failed", ok + failed);
    }
    for error in tallies.iter().flat_map(|t| &t.errors) {
        println!("    error: {error}");
    }
    println!("  where traffic went (attempts, by instance), and why:");
    let route_guide = || {
        traffic
            .iter()
            .filter(|(name, _)| name.starts_with("route-guide"))
    };
    let total = |phases: &[Phase]| -> u64 {
        route_guide()
            .map(|(_, i)| phases.iter().map(|p| i.attempts[*p as usize]).sum::<u64>())
            .sum()
    };
    let share = |i: &PerInstance, phases: &[Phase]| -> u64 {
        let mine: u64 = phases.iter().map(|p| i.attempts[*p as usize]).sum();
        (mine * 100).checked_div(total(phases)).unwrap_or(0)
    };
    let before_crash = [Phase::Load, Phase::Kinds];
    for (name, instance) in traffic {
        let attempts: u64 = instance.attempts.iter().sum();
        let failures: u64 = instance.failures.iter().sum();
        let outcomes: Vec<String> = instance
            .outcomes
            .iter()
            .map(|(outcome, n)| format!("{n} {outcome}"))
            .collect();
        let failed = if failures == 0 {
            "0 failed".to_owned()
        } else {
            format!("{failures} failed ({})", outcomes.join(", "))
        };
        let why = match name.as_str() {
            FAILING_4 if verdict.ejected > 0 => format!(
                "ejected by outlier detection ({CONSECUTIVE_FAILURES} consecutive failures), \
                 none of its failures reached the caller: each GetFeature was retried elsewhere"
            ),
            FAILING_4 => "not ejected".to_owned(),
            SLOW_3 => format!(
                "slow (+{} ms a call): {}% of the load phase's calls under least-request \
                 (fewest calls in flight; an even share of three: 33%); took the calls after the crash, as {FAILING_4} \
                 was still ejected",
                SLOW.as_millis(),
                share(instance, &[Phase::Load])
            ),
            FAST_1 => format!(
                "{}% of traffic until it crashed; {}",
                share(instance, &before_crash),
                match instance.failures[Phase::After as usize] {
                    0 => "no call was caught by the crash".to_owned(),
                    n => format!("{n} attempt(s) caught by the crash, sent again elsewhere"),
                }
            ),
            FAST_2 => format!(
                "{}% of traffic until it shut down gracefully (drained, no call lost)",
                share(instance, &before_crash)
            ),
            _ => "the greeter".to_owned(),
        };
        println!("    {name}: {attempts} attempts, {failed} → {why}");
    }
    println!("  configured retries (GetFeature on UNAVAILABLE): {retries}");
    println!(
        "  events: {published} route summaries published on `{TOPIC}` by route-guide (RecordRoute), \
         {handled} handled by greeter (HTTP broker)"
    );
    if let Some(deregistered) = verdict.departures.deregistered {
        println!(
            "  graceful shutdown: {FAST_2} left the registry {deregistered:.1?} after it began"
        );
    }
    if let Some(evicted) = verdict.departures.evicted {
        println!("  crash: {FAST_1}'s lease ran out; evicted {evicted:.1?} after the kill");
    }
    let (ok, failed) = tallies
        .iter()
        .map(|t| t.total())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    println!("  {} calls, {failed} failed", ok + failed);
}

/// Prints what to try against what is still running.
fn keep(
    instances: &[Instance],
    registry_url: &str,
    registry_http: SocketAddr,
) -> Result<(), Box<dyn Error>> {
    // By name, calls may reach route-guide-4: its faults are turned off.
    if let Some(failing) = instances.iter().find(|i| i.name == FAILING_4) {
        failing.running.set_policy(ServerPolicy::default())?;
    }
    println!("\nStill running, until Ctrl-C:");
    println!("  registry        {registry_url}   (export LODESTAR_REGISTRY={registry_url})");
    println!("    curl http://{registry_http}/v1/services");
    println!("    curl http://{registry_http}/v1/services/{SERVICE_NAME}/instances");
    println!("    curl http://{registry_http}/metrics");
    println!("  by name, through the registry:");
    println!(
        "    lodestar call {SERVICE_NAME} routeguide.RouteGuide/GetFeature --registry {registry_url} -d '{POINT_JSON}'"
    );
    println!(
        "    lodestar call {} helloworld.Greeter/SayHello --registry {registry_url} -d '{{\"name\":\"Ada\"}}'",
        greeter::SERVICE_NAME
    );
    println!("    lodestar watch {SERVICE_NAME} --registry {registry_url}");
    println!("    lodestar subscribe {TOPIC} --broker http:// --registry {registry_url}");
    println!("  each instance:");
    for instance in instances {
        let address = instance.running.local_addr();
        let role = if instance.name == FAILING_4 {
            " (its faults are off now)"
        } else {
            instance.role
        };
        println!("  {}{role}", instance.name);
        if instance.name == GREETER_1 {
            println!(
                "    lodestar call {address} helloworld.Greeter/SayHello -d '{{\"name\":\"Ada\"}}'"
            );
        } else {
            println!(
                "    lodestar call {address} routeguide.RouteGuide/GetFeature -d '{POINT_JSON}'"
            );
        }
        if let Some(admin) = instance.running.admin_addr() {
            println!("    curl http://{admin}/metrics");
        }
    }
    println!("Ready: press Ctrl-C to stop.");
    Ok(())
}

/// The servers' call counts as `/metrics` serves them, by method and code
/// (the process's metrics keep the counts of instances that are gone).
fn print_metrics() {
    const COUNT: &str = "rpc_server_call_duration_seconds_count{";
    println!("\nMetrics (rpc_server_call_duration_seconds_count, as Prometheus scrapes them)");
    let text = lodestar::metrics::Metrics::global().encode();
    for line in text.lines().filter_map(|line| line.strip_prefix(COUNT)) {
        let Some((labels, count)) = line.rsplit_once("} ") else {
            continue;
        };
        if count == "0" {
            continue;
        }
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        println!(
            "  {:<44} {:<12} {count:>6}",
            label("rpc_method"),
            label("rpc_status_code")
        );
    }
}

// ---------------------------------------------------------------------------
// The calls: each answers who served it.

type Guide = RouteGuideClient<lodestar::client::Channel>;

fn served_by<T>(response: &Response<T>) -> Option<String> {
    served_by_metadata(response.metadata())
}

fn served_by_metadata(metadata: &lodestar::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(SERVED_BY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn unary(
    guide: &mut Guide,
    features: &[Feature],
    round: usize,
) -> Result<(Option<String>, ()), Status> {
    let point = features
        .get(round % features.len().max(1))
        .and_then(|f| f.location)
        .unwrap_or_default();
    let response = guide.get_feature(point).await?;
    Ok((served_by(&response), ()))
}

async fn list(guide: &mut Guide) -> Result<(Option<String>, usize), Status> {
    let rect = Rectangle {
        lo: Some(Point {
            latitude: 400_000_000,
            longitude: -750_000_000,
        }),
        hi: Some(Point {
            latitude: 410_000_000,
            longitude: -740_000_000,
        }),
    };
    let response = guide.list_features(rect).await?;
    let (metadata, mut stream, _) = response.into_parts();
    let mut count = 0;
    while let Some(feature) = stream.next().await {
        feature?;
        count += 1;
    }
    Ok((served_by_metadata(&metadata), count))
}

async fn record(
    guide: &mut Guide,
    features: &[Feature],
    round: usize,
) -> Result<(Option<String>, i32), Status> {
    let points: Vec<Point> = (0..8)
        .filter_map(|i| {
            features
                .get((round * 7 + i * 13) % features.len().max(1))
                .and_then(|f| f.location)
        })
        .collect();
    let response = guide.record_route(tokio_stream::iter(points)).await?;
    Ok((served_by(&response), response.get_ref().point_count))
}

async fn chat(guide: &mut Guide, round: usize) -> Result<(Option<String>, usize), Status> {
    let latitude = i32::try_from(round).unwrap_or(0);
    let notes: Vec<RouteNote> = (0..4)
        .map(|i| RouteNote {
            location: Some(Point {
                latitude,
                longitude: i % 2,
            }),
            message: format!("note {i} of round {round}"),
        })
        .collect();
    let response = guide.route_chat(tokio_stream::iter(notes)).await?;
    let (metadata, mut stream, _) = response.into_parts();
    let mut count = 0;
    while let Some(note) = stream.next().await {
        note?;
        count += 1;
    }
    Ok((served_by_metadata(&metadata), count))
}

async fn greet(
    hello: &mut GreeterClient<lodestar::client::Channel>,
    round: usize,
) -> Result<(Option<String>, String), Status> {
    let reply = hello
        .say_hello(HelloRequest {
            name: format!("round {round}"),
        })
        .await?;
    // The greeter does not say who it is; there is one.
    Ok((Some(GREETER_1.to_owned()), reply.into_inner().message))
}
