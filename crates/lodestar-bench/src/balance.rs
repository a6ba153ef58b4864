//! The balance scenario: a fleet of four instances over real sockets, one
//! of them unlike the others, and what each way of balancing makes of it.
//!
//! Four lodestar services (each its own process, all pinned to the server
//! core, registered in a fresh registry server per run) serve the bench
//! proto's `Unary`, answering with their own index (0 to 3) as the body.
//! One client process (pinned to the client core) keeps [`CONCURRENCY`]
//! calls in flight (closed loop), through lodestar's `Client` by name, or
//! through tonic's `Channel::balance_list` over the four addresses (the
//! same servers: only the client differs).
//!
//! - **One slow instance**: instance 3 sleeps 20 ms in its handler before
//!   answering. Reported: latency percentiles, throughput, client CPU per
//!   call, and the slow instance's share of the calls (from the replies).
//!   lodestar's default policy (P2C peak-EWMA) against round robin, P2C
//!   least-request, and tonic's balancer (P2C over a constant load of 0:
//!   random choice).
//! - **One failing instance**: when the warm-up ends, the client sends
//!   instance 1 `SIGUSR1`, after which it fails every call with
//!   `UNAVAILABLE`. Retries are off (`max_attempts(1)`; tonic has none).
//!   Reported: the share of calls that succeed in the first second after
//!   the failure begins, and after it. lodestar's default policy (outlier
//!   detection on) against round robin with outlier detection on and off,
//!   and tonic's balancer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use lodestar::client::policy::{Policy, Strategy};

use crate::harness::{self, Case, Latencies, Metric, Proc, Result, Sample, Settings};
use crate::rpc::{UnaryOnly, UnaryServer, pb, raw};

/// The name the instances register under.
const SERVICE: &str = "balance";
/// Calls in flight, all the time.
const CONCURRENCY: usize = 16;
/// How many instances.
const INSTANCES: usize = 4;
/// The slow instance, in the first case.
const SLOW: u8 = 3;
/// How much slower it is.
const SLOW_DELAY: Duration = Duration::from_millis(20);
/// The failing instance, in the second case.
const FAILING: u8 = 1;
/// The request body: small, as a typical unary call.
const BODY: usize = 128;

/// The slow instance's share of successful calls.
const SLOW_SHARE: Metric = Metric::lower("slow instance share", "%");
/// Calls that failed in the measured window.
const FAILED: Metric = Metric::lower("failed calls", "calls");
/// Calls started in the first second of the failure that failed.
const FAILED_FIRST: Metric = Metric::lower("failed calls, 1st s of failure", "calls");
/// Calls started after it that failed.
const FAILED_AFTER: Metric = Metric::lower("failed calls after the 1st s", "calls");
/// Success rate of the calls started in the first second of the failure.
const SUCCESS_FIRST: Metric = Metric::higher("success, 1st s of failure", "%");
/// Success rate of the calls started after it.
const SUCCESS_AFTER: Metric = Metric::higher("success after the 1st s", "%");

/// How a client balances.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Balancer {
    /// lodestar's default policy: P2C peak-EWMA, outlier detection on.
    Default,
    /// lodestar, round robin (outlier detection on).
    RoundRobin,
    /// lodestar, P2C least-request (outlier detection on).
    LeastRequest,
    /// lodestar, round robin, outlier detection off.
    RoundRobinNoOutlier,
    /// tonic's `Channel::balance_list`.
    Tonic,
}

impl Balancer {
    /// The variant name in the tables.
    fn name(self) -> &'static str {
        match self {
            Balancer::Default => "lodestar",
            Balancer::RoundRobin => "lodestar round robin",
            Balancer::LeastRequest => "lodestar P2C least-request",
            Balancer::RoundRobinNoOutlier => "lodestar round robin, no outlier detection",
            Balancer::Tonic => "tonic balance_list",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Balancer::Default => "default",
            Balancer::RoundRobin => "round-robin",
            Balancer::LeastRequest => "least-request",
            Balancer::RoundRobinNoOutlier => "round-robin-no-outlier",
            Balancer::Tonic => "tonic",
        }
    }

    fn parse(name: &str) -> Result<Balancer> {
        [
            Balancer::Default,
            Balancer::RoundRobin,
            Balancer::LeastRequest,
            Balancer::RoundRobinNoOutlier,
            Balancer::Tonic,
        ]
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| format!("unknown balancer `{name}`").into())
    }
}

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// One instance; says `{"ready": {"addr": …}}`. Fails every call with
    /// `UNAVAILABLE` once it receives `SIGUSR1`.
    Server {
        #[arg(long)]
        registry: String,
        #[arg(long)]
        id: String,
        /// The index it answers with.
        #[arg(long)]
        index: u8,
        /// How long it sleeps before answering.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// The load; says `{"warm": true}`, then `{"result": {…}}`.
    Client(ClientArgs),
}

/// How the client loads the fleet.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    #[arg(long, value_enum)]
    balancer: Balancer,
    /// The registry URL (lodestar) or the instances' addresses (tonic).
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// Send this pid `SIGUSR1` when the warm-up ends (the failing case).
    #[arg(long)]
    victim: Option<i32>,
    /// The failing case: the first part of the window, reported apart.
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
    #[arg(long)]
    warmup_ms: u64,
    #[arg(long)]
    duration_ms: u64,
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Server {
            registry,
            id,
            index,
            delay_ms,
        } => serve(&registry, id, index, Duration::from_millis(delay_ms)).await,
        Child::Client(args) => load(args).await,
    }
}

// ---- the instances ----

/// One instance of the fleet.
#[derive(Debug, Clone)]
struct Instance {
    index: u8,
    delay: Duration,
    failing: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl UnaryOnly for Instance {
    const SCENARIO: &'static str = "balance";

    async fn unary(&self, _request: Request<pb::Payload>) -> Result<Response<pb::Payload>, Status> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this instance fails every call"));
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(Response::new(pb::Payload {
            body: vec![self.index],
        }))
    }
}

async fn serve(registry: &str, id: String, index: u8, delay: Duration) -> Result<()> {
    let failing = Arc::new(AtomicBool::new(false));
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let flag = failing.clone();
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    let instance = Instance {
        index,
        delay,
        failing,
    };
    let running = lodestar::Service::builder(SERVICE)
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .registry(lodestar_registry::from_url(registry)?)
        .add_service(pb::bench_server::BenchServer::new(UnaryServer(instance)))
        .id(id)
        .start()
        .await?;
    harness::say(serde_json::json!({ "ready": { "addr": running.local_addr().to_string() } }));
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}

// ---- the load ----

/// One client, by balancer.
#[derive(Clone)]
enum Caller {
    Lodestar(pb::bench_client::BenchClient<lodestar::client::Channel>),
    Raw(raw::bench_client::BenchClient<tonic::transport::Channel>),
}

impl Caller {
    fn new(balancer: Balancer, target: &[String], retries: bool) -> Result<Caller> {
        let lodestar = |policy: Policy| -> Result<Caller> {
            let url = target.first().ok_or("no registry URL")?;
            let mut builder =
                lodestar::Client::builder(lodestar_registry::from_url(url)?).policy(policy)?;
            if !retries {
                builder = builder.max_attempts(1);
            }
            Ok(Caller::Lodestar(pb::bench_client::BenchClient::by_name(
                &builder.build(),
                SERVICE,
            )))
        };
        let with = |strategy: Strategy| {
            let mut policy = Policy::default();
            policy.strategy = strategy;
            policy
        };
        match balancer {
            Balancer::Default => lodestar(Policy::default()),
            Balancer::RoundRobin => lodestar(with(Strategy::RoundRobin)),
            Balancer::LeastRequest => lodestar(with(Strategy::LeastRequest { choices: 2 })),
            Balancer::RoundRobinNoOutlier => {
                let mut policy = with(Strategy::RoundRobin);
                policy.outlier.enabled = false;
                lodestar(policy)
            }
            Balancer::Tonic => Ok(Caller::Raw(raw::bench_client::BenchClient::new(
                crate::rpc::tonic_balance_list(target)?,
            ))),
        }
    }

    /// One call: the index of the instance that answered, or `None` if
    /// it failed.
    async fn call(&mut self) -> Option<u8> {
        let body = vec![0x5Au8; BODY];
        match self {
            Caller::Lodestar(c) => c
                .unary(pb::Payload { body })
                .await
                .ok()
                .and_then(|r| r.into_inner().body.first().copied()),
            Caller::Raw(c) => c
                .unary(raw::Payload { body })
                .await
                .ok()
                .and_then(|r| r.into_inner().body.first().copied()),
        }
    }
}

/// One call a worker made.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// When it started.
    started: Instant,
    latency: Duration,
    /// Who answered; `None` if it failed.
    answered: Option<u8>,
}

async fn load(args: ClientArgs) -> Result<()> {
    let failing = args.victim.is_some();
    let caller = Caller::new(args.balancer, &args.target, !failing)?;
    // Connected and discovered before the clock starts.
    for _ in 0..INSTANCES * 4 {
        caller.clone().call().await;
    }
    let warmup = Duration::from_millis(args.warmup_ms);
    let settle = Duration::from_millis(args.settle_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let start = Instant::now();
    let measure_from = start + warmup;
    let settled = measure_from + settle;
    let measure_to = settled + duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let mut caller = caller.clone();
        workers.spawn(async move {
            let mut calls = Vec::new();
            loop {
                let started = Instant::now();
                if started >= measure_to {
                    break;
                }
                let answered = caller.call().await;
                let done = Instant::now();
                // Calls that start and end in the window.
                if started >= measure_from && done <= measure_to {
                    calls.push(Call {
                        started,
                        latency: done - started,
                        answered,
                    });
                }
            }
            calls
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    if let Some(victim) = args.victim {
        // SAFETY: kill(2) on the pid the orchestrator gave us.
        if unsafe { libc::kill(victim, libc::SIGUSR1) } != 0 {
            return Err(format!(
                "cannot signal {victim}: {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
    }
    let cpu_from = harness::self_cpu_time();
    harness::say(serde_json::json!({ "warm": true }));
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu = harness::self_cpu_time() - cpu_from;
    let mut calls = Vec::new();
    while let Some(done) = workers.join_next().await {
        calls.extend(done?);
    }
    let sample = if failing {
        failing_sample(&calls, settled)?
    } else {
        slow_sample(&calls, duration, cpu)?
    };
    harness::say(serde_json::json!({ "result": sample.to_json() }));
    Ok(())
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn slow_sample(calls: &[Call], window: Duration, cpu: Duration) -> Result<Sample> {
    let answered: Vec<u8> = calls.iter().filter_map(|c| c.answered).collect();
    if answered.is_empty() {
        return Err("no call succeeded in the measured window".into());
    }
    let slow = answered.iter().filter(|&&i| i == SLOW).count();
    let mut latencies = Latencies::with_capacity(calls.len());
    for call in calls {
        latencies.record(call.latency);
    }
    let mut sample = Sample::default();
    sample
        .set(
            harness::THROUGHPUT,
            answered.len() as f64 / window.as_secs_f64(),
        )
        .latencies(&mut latencies)
        .set(SLOW_SHARE, percent(slow, answered.len()))
        .set(FAILED, (calls.len() - answered.len()) as f64)
        .set(
            harness::CLIENT_CPU,
            cpu.as_secs_f64() * 1e6 / calls.len() as f64,
        );
    Ok(sample)
}

fn failing_sample(calls: &[Call], settled: Instant) -> Result<Sample> {
    let (first, after): (Vec<&Call>, Vec<&Call>) = calls.iter().partition(|c| c.started < settled);
    let ok = |calls: &[&Call]| calls.iter().filter(|c| c.answered.is_some()).count();
    if after.is_empty() {
        return Err("no call after the first second of the failure".into());
    }
    let mut sample = Sample::default();
    sample
        .set(SUCCESS_FIRST, percent(ok(&first), first.len()))
        .set(SUCCESS_AFTER, percent(ok(&after), after.len()))
        .set(FAILED_FIRST, (first.len() - ok(&first)) as f64)
        .set(FAILED_AFTER, (after.len() - ok(&after)) as f64);
    Ok(sample)
}

// ---- the orchestration ----

/// The two cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fleet {
    /// Instance [`SLOW`] answers [`SLOW_DELAY`] late.
    OneSlow,
    /// Instance [`FAILING`] fails every call from the end of the warm-up.
    OneFailing,
}

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("balance: four instances, one slow or failing; lodestar's strategies vs tonic's");
    let mut cases = Vec::new();
    let slow = [
        Balancer::Default,
        Balancer::RoundRobin,
        Balancer::LeastRequest,
        Balancer::Tonic,
    ]
    .map(Balancer::name);
    cases.push(
        harness::alternate(
            settings,
            "balance",
            format!(
                "4 instances, 1 of them +20 ms, {CONCURRENCY} in flight; lodestar: default policy (P2C peak-EWMA)"
            ),
            &slow,
            |variant| async move { one_run(settings, Fleet::OneSlow, Balancer::parse(&variant)?).await },
        )
        .await?,
    );
    // Round robin with outlier detection on (the default's detection, not
    // its strategy) tells which of the two keeps the calls from failing.
    let failing = [
        Balancer::Default,
        Balancer::RoundRobin,
        Balancer::RoundRobinNoOutlier,
        Balancer::Tonic,
    ]
    .map(Balancer::name);
    cases.push(
        harness::alternate(
            settings,
            "balance",
            format!(
                "4 instances, 1 of them failing every call (UNAVAILABLE), retries off, {CONCURRENCY} in flight; lodestar: default policy (outlier detection on)"
            ),
            &failing,
            |variant| async move {
                one_run(settings, Fleet::OneFailing, Balancer::parse(&variant)?).await
            },
        )
        .await?,
    );
    Ok(cases)
}

/// A run's warm-up, measured window, and (the failing case) the part of
/// the window reported apart after the failure begins: the settings', and
/// the first second. A smoke run halves the first two and takes 50 ms for
/// the last, to stay within about two seconds for its eight runs.
fn windows(settings: &Settings, fleet: Fleet) -> (Duration, Duration, Duration) {
    let settle = match (fleet, settings.smoke) {
        (Fleet::OneSlow, _) => Duration::ZERO,
        (Fleet::OneFailing, false) => Duration::from_secs(1),
        (Fleet::OneFailing, true) => Duration::from_millis(50),
    };
    if settings.smoke {
        (settings.warmup / 2, settings.duration / 2, settle)
    } else {
        (settings.warmup, settings.duration, settle)
    }
}

async fn one_run(settings: &Settings, fleet: Fleet, balancer: Balancer) -> Result<Sample> {
    // A registry and instances of their own: nothing learnt about one run's
    // instances carries over to the next.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let run = lodestar_tests::unique_name();
    let mut servers = Vec::new();
    for index in 0..INSTANCES as u8 {
        let delay = if fleet == Fleet::OneSlow && index == SLOW {
            SLOW_DELAY
        } else {
            Duration::ZERO
        };
        let args = vec![
            "balance".to_owned(),
            "server".to_owned(),
            "--registry".to_owned(),
            registry_url.clone(),
            "--id".to_owned(),
            format!("balance-{run}-{index}"),
            "--index".to_owned(),
            index.to_string(),
            "--delay-ms".to_owned(),
            delay.as_millis().to_string(),
        ];
        servers.push(Proc::spawn_self(
            "balance server",
            settings.server_cpu(),
            &args,
        )?);
    }
    let mut addresses = Vec::new();
    for server in &mut servers {
        let ready = server.expect("ready", Duration::from_secs(10)).await?;
        addresses.push(
            ready["addr"]
                .as_str()
                .ok_or("balance server: no address")?
                .to_owned(),
        );
    }
    let target = match balancer {
        Balancer::Tonic => addresses.join(","),
        _ => registry_url.clone(),
    };
    let (warmup, duration, settle) = windows(settings, fleet);
    let mut args = vec![
        "balance".to_owned(),
        "client".to_owned(),
        "--balancer".to_owned(),
        balancer.arg().to_owned(),
        "--target".to_owned(),
        target,
        "--settle-ms".to_owned(),
        settle.as_millis().to_string(),
        "--warmup-ms".to_owned(),
        warmup.as_millis().to_string(),
        "--duration-ms".to_owned(),
        duration.as_millis().to_string(),
    ];
    if fleet == Fleet::OneFailing {
        args.extend([
            "--victim".to_owned(),
            servers[usize::from(FAILING)].pid().to_string(),
        ]);
    }
    let mut client = Proc::spawn_self("balance client", settings.client_cpu(), &args)?;
    let patience = warmup + settle + duration + Duration::from_secs(30);
    client.expect("warm", patience).await?;
    let result = client.expect("result", patience).await?;
    client.wait(Duration::from_secs(10)).await?;
    let metrics: &[Metric] = match fleet {
        Fleet::OneSlow => &[
            harness::THROUGHPUT,
            harness::P50,
            harness::P99,
            harness::P999,
            SLOW_SHARE,
            FAILED,
            harness::CLIENT_CPU,
        ],
        Fleet::OneFailing => &[SUCCESS_FIRST, SUCCESS_AFTER, FAILED_FIRST, FAILED_AFTER],
    };
    let sample = Sample::from_json(&result, metrics)?;
    for mut server in servers {
        server.terminate().await?;
    }
    Ok(sample)
}
