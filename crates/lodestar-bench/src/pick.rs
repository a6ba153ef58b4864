//! The pick scenario: what each balancing strategy costs per call, per
//! change of the endpoint set, and per endpoint, with no socket involved.
//!
//! For each built-in strategy and n = 10, 100, 1,000 and 10,000 endpoints
//! (weights 1 to 10, in turn), one child process (pinned to the client
//! core) measures:
//!
//! - **pick**: nanoseconds per `Selector::select_prepared`, the call every
//!   first attempt makes. A selector cannot be asked outside a client (a
//!   `CallInfo` cannot be built outside the library), so the measurement
//!   runs inside a real one: a [`Probe`] selector wraps the strategy's, the
//!   client prepares the set through it as it would its own, and each call
//!   (with a random `x-key` header, for ring hash) times
//!   [`PICKS_PER_CALL`] picks of the wrapped selector on that set, then
//!   fails the call without a connection. The stats the P2C strategies
//!   read are those of idle endpoints (no call in flight, no latency
//!   sample).
//! - **prepare**: microseconds per `Prepared::new` over the n endpoints
//!   (the cycle, weight table or ring a strategy builds when the set
//!   changes), the median of repeated builds.
//! - **memory per endpoint**: the heap an endpoint takes from nothing (its
//!   `Instance` with a short id and address and no metadata, the
//!   `Endpoint`, its stats and connection records, as
//!   `Arc<Endpoint>`), counted by the allocator ([`crate::alloc`]); and
//!   `strategy::prepared_bytes / n`, what the strategy prepared for it.
//!
//! Nothing here has a peer: the table is one row per strategy and n.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lodestar::Registry as _;
use lodestar::client::selector::{CallInfo, Endpoint, Prepared, Selector};
use lodestar::client::strategy::{self, LeastRequest, PeakEwma, RingHash, WeightedRoundRobin};

use crate::harness::{self, Case, Metric, Proc, Result, Sample, Settings};
use crate::rpc::pb;

/// Nanoseconds per `select_prepared`.
const PICK: Metric = Metric::lower("pick", "ns");
/// Microseconds per `Prepared::new`.
const PREPARE: Metric = Metric::lower("prepare", "µs");
/// Heap bytes of one endpoint with its instance, stats and connection.
const ENDPOINT: Metric = Metric::lower("endpoint", "B");
/// `prepared_bytes / n`.
const PREPARED: Metric = Metric::lower("prepared per endpoint", "B");
/// The two above, summed.
const MEMORY: Metric = Metric::lower("memory per endpoint", "B");

const METRICS: [Metric; 5] = [PICK, PREPARE, ENDPOINT, PREPARED, MEMORY];

/// The endpoint counts measured.
const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

/// Picks timed per call, all for the call's one key: enough to make the
/// two clock reads around them small (about 1 ns a pick), few enough that
/// ring hash sees a new key every few dozen picks.
const PICKS_PER_CALL: usize = 32;

/// The header ring hash hashes on.
const KEY_HEADER: &str = "x-key";

/// The service the probe's client calls.
const SERVICE: &str = "pick";

/// A strategy measured.
struct Kind {
    name: &'static str,
    make: fn() -> Result<Box<dyn Selector>>,
}

/// Every built-in strategy, in the order of `lodestar::client::strategy`'s
/// table; ring hash also with its bounded load (O(n) per pick).
const KINDS: &[Kind] = &[
    Kind {
        name: "round robin",
        make: || Ok(Box::new(lodestar::client::selector::RoundRobin::default())),
    },
    Kind {
        name: "random",
        make: || Ok(Box::new(lodestar::client::selector::Random)),
    },
    Kind {
        name: "weighted round robin",
        make: || Ok(Box::new(WeightedRoundRobin)),
    },
    Kind {
        name: "P2C least-request",
        make: || Ok(Box::new(LeastRequest::new(2))),
    },
    Kind {
        name: "P2C peak-EWMA",
        make: || Ok(Box::new(PeakEwma::default())),
    },
    Kind {
        name: "ring hash",
        make: || Ok(Box::new(RingHash::new(KEY_HEADER)?)),
    },
    Kind {
        name: "ring hash, bounded load 125%",
        make: || Ok(Box::new(RingHash::new(KEY_HEADER)?.bounded_load(Some(125)))),
    },
];

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// Measures every strategy at every size; says `{"result": [...]}`, one
    /// sample per strategy × size, strategies outermost.
    Measure {
        /// The endpoint counts.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// How long to time picks, per case (after a fifth as long of
        /// warm-up).
        #[arg(long)]
        pick_ms: u64,
        /// How long to keep rebuilding the prepared set, per case (at
        /// least `min_prepares` builds).
        #[arg(long)]
        prepare_ms: u64,
        #[arg(long, default_value_t = 3)]
        min_prepares: usize,
    },
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Measure {
            sizes,
            pick_ms,
            prepare_ms,
            min_prepares,
        } => {
            let budget = Budget {
                pick: Duration::from_millis(pick_ms),
                prepare: Duration::from_millis(prepare_ms),
                min_prepares: min_prepares.max(1),
            };
            // Before any client exists: a dropped client's endpoints freed
            // by a runtime thread meanwhile would count against these.
            let mut sets = Vec::new();
            for &n in &sizes {
                sets.push(endpoints(n).map_err(|e| format!("n = {n}: {e}"))?);
            }
            let mut samples = Vec::new();
            for kind in KINDS {
                for set in &sets {
                    let n = set.endpoints.len();
                    let sample = measure(kind, set, &budget)
                        .await
                        .map_err(|e| format!("{}, n = {n}: {e}", kind.name))?;
                    samples.push(sample.to_json());
                }
            }
            harness::say(serde_json::json!({ "result": samples }));
            Ok(())
        }
    }
}

/// How long a case may take.
struct Budget {
    pick: Duration,
    prepare: Duration,
    min_prepares: usize,
}

/// Instance `i` of `n`: weights 1 to 10 in turn.
fn instance(i: usize) -> lodestar::Instance {
    lodestar::Instance::new(SERVICE, format!("127.0.0.1:{}", 20_000 + i))
        .with_id(format!("pick-{i:05}"))
        .with_weight((i % 10) as u32 + 1)
}

/// `n` endpoints, and the heap bytes each took.
struct Set {
    endpoints: Arc<[Arc<Endpoint>]>,
    bytes_each: f64,
}

/// `n` endpoints built from nothing, into room made beforehand, counting
/// the heap they keep.
fn endpoints(n: usize) -> Result<Set> {
    let mut endpoints: Vec<Arc<Endpoint>> = Vec::with_capacity(n);
    let (built, bytes) = crate::alloc::kept_by(|| -> Result<()> {
        for i in 0..n {
            endpoints.push(Arc::new(Endpoint::new(instance(i))?));
        }
        Ok(())
    });
    built?;
    if bytes <= 0 {
        return Err(format!("{n} endpoints took {bytes} bytes: not counted").into());
    }
    Ok(Set {
        endpoints: endpoints.into(),
        bytes_each: bytes as f64 / n.max(1) as f64,
    })
}

async fn measure(kind: &Kind, set: &Set, budget: &Budget) -> Result<Sample> {
    let (endpoints, n) = (&set.endpoints, set.endpoints.len());
    // Prepare: the median of repeated builds.
    let selector = (kind.make)()?;
    let mut times = Vec::new();
    let started = Instant::now();
    let prepared = loop {
        let at = Instant::now();
        let prepared = Prepared::new(&*selector, endpoints.clone());
        times.push(at.elapsed().as_secs_f64() * 1e6);
        if times.len() >= 10_000
            || (times.len() >= budget.min_prepares && started.elapsed() >= budget.prepare)
        {
            break prepared;
        }
    };
    let prepare_us = harness::Spread::of(&times)
        .ok_or("no prepare timed")?
        .median;
    let prepared_bytes = strategy::prepared_bytes(&prepared) as f64 / n as f64;
    drop(prepared);

    let pick_ns = time_picks(kind, n, budget.pick).await?;
    let endpoint_bytes = set.bytes_each;
    let mut sample = Sample::default();
    sample
        .set(PICK, pick_ns)
        .set(PREPARE, prepare_us)
        .set(ENDPOINT, endpoint_bytes)
        .set(PREPARED, prepared_bytes)
        .set(MEMORY, endpoint_bytes + prepared_bytes);
    Ok(sample)
}

/// Nanoseconds per pick of `kind` over `n` endpoints, timed inside a
/// client for `window` (see the module docs).
async fn time_picks(kind: &Kind, n: usize, window: Duration) -> Result<f64> {
    let registry = lodestar::StaticRegistry::new();
    for i in 0..n {
        registry
            .register(instance(i), Duration::from_secs(3600))
            .await?;
    }
    let probe = Probe(Arc::new(ProbeState {
        inner: (kind.make)()?,
        nanos: AtomicU64::new(0),
        picks: AtomicU64::new(0),
        set_len: AtomicUsize::new(0),
    }));
    let client = lodestar::Client::builder(registry)
        .selector(probe.clone())
        .max_attempts(1)
        .build();
    let mut bench = pb::bench_client::BenchClient::by_name(&client, SERVICE);
    let mut call = async || -> Result<()> {
        let key = format!("{:016x}", fastrand::u64(..));
        let mut request = tonic::Request::new(pb::Payload::default());
        request.metadata_mut().insert(KEY_HEADER, key.parse()?);
        match bench.unary(request).await {
            // The probe chooses no endpoint: the call fails, unsent.
            Err(status) if status.code() == tonic::Code::Unavailable => Ok(()),
            Err(status) => Err(format!("the call failed with {status}").into()),
            Ok(_) => Err("the call succeeded: the probe did not choose".into()),
        }
    };
    // Warm-up: discovery, the first prepare, caches.
    let warm_until = Instant::now() + window / 5;
    call().await?;
    while Instant::now() < warm_until {
        call().await?;
    }
    let set_len = probe.0.set_len.load(Ordering::Relaxed);
    if set_len != n {
        return Err(format!("the client prepared {set_len} endpoints, not {n}").into());
    }
    let (nanos_from, picks_from) = probe.0.totals();
    let until = Instant::now() + window;
    call().await?;
    while Instant::now() < until {
        call().await?;
    }
    let (nanos_to, picks_to) = probe.0.totals();
    let picks = picks_to - picks_from;
    if picks == 0 {
        return Err("no pick timed".into());
    }
    Ok((nanos_to - nanos_from) as f64 / picks as f64)
}

/// A selector that times [`PICKS_PER_CALL`] picks of the one it wraps on
/// the client's prepared set, then chooses nothing (the call fails at once,
/// unsent).
#[derive(Debug, Clone)]
struct Probe(Arc<ProbeState>);

#[derive(Debug)]
struct ProbeState {
    inner: Box<dyn Selector>,
    /// Nanoseconds spent picking.
    nanos: AtomicU64,
    /// Picks timed.
    picks: AtomicU64,
    /// The size of the last set picked from.
    set_len: AtomicUsize,
}

impl ProbeState {
    fn totals(&self) -> (u64, u64) {
        (
            self.nanos.load(Ordering::Relaxed),
            self.picks.load(Ordering::Relaxed),
        )
    }
}

impl Selector for Probe {
    fn select(&self, endpoints: &[Arc<Endpoint>], call: &CallInfo<'_>) -> Option<usize> {
        // Only for retries, which `max_attempts(1)` rules out.
        let _ = (endpoints, call);
        None
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        self.0.inner.prepare(endpoints)
    }

    fn select_prepared(&self, set: &Prepared, call: &CallInfo<'_>) -> Option<usize> {
        let inner = &*self.0.inner;
        let started = Instant::now();
        for _ in 0..PICKS_PER_CALL {
            black_box(inner.select_prepared(black_box(set), call));
        }
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.nanos.fetch_add(nanos, Ordering::Relaxed);
        self.0
            .picks
            .fetch_add(PICKS_PER_CALL as u64, Ordering::Relaxed);
        self.0
            .set_len
            .store(set.endpoints().len(), Ordering::Relaxed);
        None
    }
}

/// `n` with thousands separated: 10, 1,000.
fn count(n: usize) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        harness::fmt_num(n as f64)
    }
}

/// Runs the scenario: one child process per repetition measures every case.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("pick: each strategy's cost per pick, per prepare and per endpoint");
    let names: Vec<String> = KINDS
        .iter()
        .flat_map(|kind| {
            SIZES
                .iter()
                .map(move |&n| format!("{}, n = {}", kind.name, count(n)))
        })
        .collect();
    let (pick, prepare, min_prepares) = if settings.smoke {
        (Duration::from_millis(5), Duration::ZERO, 1)
    } else {
        (settings.duration / 10, Duration::from_millis(100), 3)
    };
    let args: Vec<String> = vec![
        "pick".to_owned(),
        "measure".to_owned(),
        "--sizes".to_owned(),
        SIZES.map(|n| n.to_string()).join(","),
        "--pick-ms".to_owned(),
        pick.as_millis().to_string(),
        "--prepare-ms".to_owned(),
        prepare.as_millis().to_string(),
        "--min-prepares".to_owned(),
        min_prepares.to_string(),
    ];
    harness::alternate_steps(settings, "pick", &names, &["lodestar"], |_| {
        let args = args.clone();
        let cases = names.len();
        async move {
            let mut child = Proc::spawn_self("pick", settings.client_cpu(), &args)?;
            let result = child.expect("result", Duration::from_secs(600)).await?;
            child.wait(Duration::from_secs(10)).await?;
            let samples = result.as_array().ok_or("pick: no samples")?;
            if samples.len() != cases {
                return Err(format!("pick: {} samples for {cases} cases", samples.len()).into());
            }
            samples
                .iter()
                .map(|s| Sample::from_json(s, &METRICS))
                .collect()
        }
    })
    .await
}
