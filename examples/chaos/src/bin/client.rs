//! `chaos-client`: calls the Chaos service by name, in a closed loop (a
//! number of calls in flight) or at a fixed rate, and prints one JSON
//! summary of how the calls went and where they went.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chaos::flags::{BreakerFlags, FaultFlags, client_entry, every_method};
use chaos::summary::{Decisions, Summary, Tally};
use chaos::{ChaosClient, Ping, Pong, SERVICE_NAME};
use clap::Parser;
use lodestar::client::policy::{HedgeSettings, MethodPolicy, RetrySettings};
use lodestar::client::{Channel, Policy};
use lodestar::{Client, Status};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Calls `chaos.Chaos/Unary` by name and prints one JSON object on stdout:
/// `calls`, `ok`, `failures` (by gRPC code name), `per_instance`,
/// `latency_ms` (`p50`, `p99`, `p99_9`), `elapsed_ms`, the `policy` in
/// force and the resilience layers' `decisions` by kind.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Registry to find the service in: a `lodestar registry` server
    /// (lodestar://host:port), or any URL `lodestar services` takes.
    #[arg(long, env = "LODESTAR_REGISTRY")]
    registry: String,
    /// Service name to call.
    #[arg(long, default_value = SERVICE_NAME)]
    service: String,
    /// Client policy file (`.toml` or `.json`): strategy, routes, split,
    /// zone affinity, outlier detection. Default: the default policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// How many calls to make. Default: 1000, unless --duration.
    #[arg(long, conflicts_with = "duration")]
    calls: Option<u64>,
    /// Call for this many seconds instead of a number of calls (at most a
    /// week).
    #[arg(long)]
    duration: Option<f64>,
    /// Calls in flight at once, each started when one ends (closed loop).
    /// Default: 8, unless --rate.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Start this many calls per second, each on schedule whatever the
    /// others do (open loop). Latency counts from when a call was due.
    #[arg(long)]
    rate: Option<f64>,
    /// At a fixed rate, the most calls in flight; calls due past it wait
    /// (and the wait counts in their latency).
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Deadline of each call, in milliseconds (at most a week).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Bytes in each ping's body.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// The caller's zone, for zone affinity. Default: LODESTAR_ZONE, if set.
    #[arg(long)]
    zone: Option<String>,
    #[command(flatten)]
    breaker: BreakerFlags,
    #[command(flatten)]
    faults: FaultFlags,
    /// Retry `Unary` (a ping: safe to send again), up to this many attempts
    /// in all (2 to 5), on the codes of --retry-codes. Default: no
    /// configured retries (those of the policy file, if any).
    #[arg(long, conflicts_with_all = ["hedge_delay_ms", "hedge_percentile"])]
    retry_attempts: Option<u32>,
    /// The codes a retry follows, by name, comma-separated. Default:
    /// UNAVAILABLE.
    #[arg(long, requires = "retry_attempts", value_delimiter = ',')]
    retry_codes: Vec<String>,
    /// The longest wait before the first retry, in milliseconds (each
    /// further one up to twice as long, at most ten times this). Default: 25.
    #[arg(long, requires = "retry_attempts")]
    retry_backoff_ms: Option<u64>,
    /// Hedge `Unary`: one more attempt, to another instance, after this
    /// many milliseconds without an answer.
    #[arg(long, conflicts_with = "hedge_percentile")]
    hedge_delay_ms: Option<u64>,
    /// Hedge `Unary` after this percentile (1 to 99) of its recent
    /// latencies (at least 10 ms).
    #[arg(long)]
    hedge_percentile: Option<u32>,
    /// The most hedges per call (1 to 4). Default: 1.
    #[arg(long)]
    hedges: Option<u32>,
    /// Retries and hedges may add at most this percentage of the calls...
    /// Default: 20 (or the policy file's).
    #[arg(long)]
    budget_percent: Option<u32>,
    /// ... plus this many a second. Default: 10 (or the policy file's).
    #[arg(long)]
    budget_per_second: Option<u32>,
    /// No retry budget: every retry and hedge the policy allows is made.
    #[arg(long, conflicts_with_all = ["budget_percent", "budget_per_second"])]
    no_budget: bool,
}

/// The method the resilience flags configure.
const METHOD: &str = "Unary";

impl Args {
    /// The retry, hedge and budget flags, applied to `policy` (checked
    /// when the client takes it).
    fn apply_resilience(&self, policy: &mut Policy) {
        let retry = self.retry_attempts.map(|attempts| {
            let mut retry = RetrySettings::default();
            retry.max_attempts = attempts;
            retry.idempotent = true;
            if !self.retry_codes.is_empty() {
                retry.codes = self.retry_codes.clone();
            }
            if let Some(ms) = self.retry_backoff_ms {
                retry.initial_backoff_ms = ms;
                retry.max_backoff_ms = ms.saturating_mul(10);
            }
            retry
        });
        let hedged = self.hedge_delay_ms.is_some()
            || self.hedge_percentile.is_some()
            || self.hedges.is_some();
        let hedge = hedged.then(|| {
            let mut hedge = HedgeSettings::default();
            hedge.idempotent = true;
            hedge.delay_ms = self.hedge_delay_ms;
            hedge.percentile = self.hedge_percentile;
            if let Some(hedges) = self.hedges {
                hedge.max_hedges = hedges;
            }
            hedge
        });
        if retry.is_some() || hedge.is_some() {
            let index = match policy
                .methods
                .iter()
                .position(|m| m.names.iter().any(|n| n == METHOD))
            {
                Some(index) => index,
                None => {
                    let mut entry = MethodPolicy::default();
                    entry.names = vec![METHOD.to_owned()];
                    policy.methods.insert(0, entry);
                    0
                }
            };
            let entry = &mut policy.methods[index];
            entry.retry = retry;
            entry.hedge = hedge;
        }
        let budget = &mut policy.retry_budget;
        if self.no_budget {
            budget.enabled = false;
        }
        if let Some(percent) = self.budget_percent {
            budget.percent = percent;
        }
        if let Some(per_second) = self.budget_per_second {
            budget.min_per_second = per_second;
        }
    }
}

/// The longest `--duration`: a week.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most calls in flight at once, in either mode: a million.
const MAX_IN_FLIGHT: usize = 1_000_000;

/// The largest `--body-bytes`: 1 MiB, well within the message limit.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long a run is, as asked.
#[derive(Debug, Clone, Copy)]
enum Length {
    /// This many calls.
    Calls(u64),
    /// This long.
    For(Duration),
}

/// When a run ends.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// After this many calls.
    Calls(u64),
    /// No call starts at or after this.
    At(Instant),
}

/// How calls are started.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// This many callers, each making one call after another.
    Closed(usize),
    /// One call every so often, on schedule.
    Rate(f64),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(summary) => match serde_json::to_string(&summary) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chaos-client: cannot write the summary: {e}");
                ExitCode::FAILURE
            }
        },
        Err(message) => {
            eprintln!("chaos-client: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Summary, String> {
    let length = match (args.calls, args.duration) {
        (Some(0), _) => return Err("--calls must be at least 1".to_owned()),
        (Some(n), _) => Length::Calls(n),
        (None, Some(seconds)) => Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
            .map(Length::For)
            .ok_or_else(|| {
                format!(
                    "--duration {seconds}: expected seconds above 0, at most {}",
                    MAX_DURATION.as_secs()
                )
            })?,
        (None, None) => Length::Calls(1_000),
    };
    let pace = match (args.concurrency, args.rate) {
        (Some(c), _) if c == 0 || c > MAX_IN_FLIGHT => {
            return Err(format!(
                "--concurrency {c}: expected 1 to {MAX_IN_FLIGHT} calls in flight"
            ));
        }
        (Some(c), _) => Pace::Closed(c),
        (None, Some(rate)) if rate.is_finite() && rate > 0.0 => Pace::Rate(rate),
        (None, Some(rate)) => {
            return Err(format!("--rate {rate}: expected calls per second above 0"));
        }
        (None, None) => Pace::Closed(8),
    };
    if args.max_in_flight == 0 || args.max_in_flight > MAX_IN_FLIGHT {
        return Err(format!(
            "--max-in-flight {}: expected 1 to {MAX_IN_FLIGHT}",
            args.max_in_flight
        ));
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    if timeout.is_zero() || timeout > MAX_DURATION {
        return Err(format!(
            "--timeout-ms {}: expected 1 to {}",
            args.timeout_ms,
            MAX_DURATION.as_millis()
        ));
    }
    if args.body_bytes > MAX_BODY_BYTES {
        return Err(format!(
            "--body-bytes {}: expected at most {MAX_BODY_BYTES}",
            args.body_bytes
        ));
    }

    let registry =
        lodestar_registry::from_url(&args.registry).map_err(|e| format!("--registry: {e}"))?;
    let decisions = Decisions::default();
    let mut builder = Client::builder(registry)
        .timeout(timeout)
        .observe(decisions.clone());
    let mut policy = match &args.policy {
        Some(path) => Policy::from_file(path).map_err(|e| e.to_string())?,
        None => Policy::default(),
    };
    // The resilience flags go on top of the file, for every method.
    if let Some(bulkhead) = args.breaker.bulkhead() {
        policy.bulkhead = Some(bulkhead);
    }
    let breaker = args.breaker.settings();
    let fault = args.faults.settings();
    if breaker.is_some() || fault.is_some() {
        let entry = every_method(&mut policy.methods, |m| &m.names, client_entry);
        if breaker.is_some() {
            entry.breaker = breaker;
        }
        if fault.is_some() {
            entry.fault = fault;
        }
    }
    args.apply_resilience(&mut policy);
    builder = builder.policy(policy).map_err(|e| e.to_string())?;
    if let Some(zone) = args.zone {
        builder = builder.zone(zone);
    }
    let client = builder.build();
    let policy = client.policy(&args.service);

    let caller = Caller {
        chaos: ChaosClient::by_name(&client, &args.service),
        body: vec![0; args.body_bytes],
        tally: Arc::new(Mutex::new(Tally::default())),
    };
    let start = Instant::now();
    let stop = match length {
        Length::Calls(calls) => Stop::Calls(calls),
        Length::For(duration) => Stop::At(start + duration),
    };
    match pace {
        Pace::Closed(callers) => closed_loop(&caller, callers, stop).await?,
        Pace::Rate(rate) => fixed_rate(&caller, rate, args.max_in_flight, start, stop).await?,
    }
    let elapsed = start.elapsed();
    let tally = std::mem::take(&mut *caller.tally.lock().unwrap_or_else(|e| e.into_inner()));
    let mut summary = tally.summary(policy, elapsed);
    summary.decisions = decisions.counts();
    summary.metrics =
        chaos::summary::governance_totals(&lodestar::metrics::Metrics::global().encode());
    Ok(summary)
}

/// Makes calls and counts them.
#[derive(Clone)]
struct Caller {
    chaos: ChaosClient<Channel>,
    body: Vec<u8>,
    tally: Arc<Mutex<Tally>>,
}

impl Caller {
    /// One call, counted with its latency from `due`.
    async fn call(&mut self, due: Instant) {
        let ping = Ping {
            body: self.body.clone(),
        };
        let outcome: Result<Pong, Status> = self.chaos.unary(ping).await.map(|r| r.into_inner());
        let latency = due.elapsed();
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&outcome, latency);
    }
}

/// `callers` callers, each making its next call as its last one ends.
async fn closed_loop(caller: &Caller, callers: usize, stop: Stop) -> Result<(), String> {
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let mut caller = caller.clone();
        let started = started.clone();
        tasks.spawn(async move {
            loop {
                match stop {
                    Stop::Calls(n) if started.fetch_add(1, Ordering::Relaxed) >= n => return,
                    Stop::At(end) if Instant::now() >= end => return,
                    _ => {}
                }
                caller.call(Instant::now()).await;
            }
        });
    }
    join_all(tasks).await
}

/// Call `i` is due at `start + i / rate`, and starts then (or as soon as
/// fewer than `max_in_flight` are in flight), however long earlier calls
/// take: a slow server does not slow the schedule down, and the latency of
/// a call that started late counts from when it was due.
async fn fixed_rate(
    caller: &Caller,
    rate: f64,
    max_in_flight: usize,
    start: Instant,
    stop: Stop,
) -> Result<(), String> {
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut tasks = JoinSet::new();
    for i in 0u64.. {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        match stop {
            Stop::Calls(n) if i >= n => break,
            Stop::At(end) if due >= end => break,
            _ => {}
        }
        tokio::time::sleep_until(due).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| format!("in-flight limit: {e}"))?;
        let mut caller = caller.clone();
        tasks.spawn(async move {
            caller.call(due).await;
            drop(permit);
        });
        // Reap what finished, so the set holds only calls in flight.
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| format!("a call task failed: {e}"))?;
        }
    }
    join_all(tasks).await
}

async fn join_all(mut tasks: JoinSet<()>) -> Result<(), String> {
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| format!("a call task failed: {e}"))?;
    }
    Ok(())
}
