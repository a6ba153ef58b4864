//! What every scenario shares: child processes pinned to a core, CPU and
//! memory readings from `/proc`, latency percentiles, alternating
//! repetitions, and the report (a table and JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Errors of the harness and its scenarios: a benchmark either runs or
/// says why it could not.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;
/// The harness's result.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// How long and how often to measure.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// A few hundred milliseconds per scenario, one repetition: proves the
    /// harness works, measures nothing worth reporting.
    pub smoke: bool,
    /// Repetitions of each case per variant.
    pub reps: usize,
    /// Load before measuring, in every run.
    pub warmup: Duration,
    /// How long each measured run lasts.
    pub duration: Duration,
    /// Pin clients and servers to their own cores (`taskset`).
    pub pin: bool,
}

impl Settings {
    /// The settings of a real run.
    pub(crate) fn full(reps: usize, duration: Duration) -> Self {
        Settings {
            smoke: false,
            reps,
            warmup: Duration::from_secs(1),
            duration,
            pin: pinning_available(),
        }
    }

    /// The settings of a smoke run.
    pub(crate) fn smoke() -> Self {
        Settings {
            smoke: true,
            reps: 1,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
            pin: pinning_available(),
        }
    }

    /// The core for load generators (clients, publishers).
    pub(crate) fn client_cpu(&self) -> Option<usize> {
        self.pin.then_some(0)
    }

    /// The core for the system under test (servers).
    pub(crate) fn server_cpu(&self) -> Option<usize> {
        self.pin.then_some(1)
    }
}

/// Whether there are two cores and `taskset` to pin to them.
fn pinning_available() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores >= 2
        && std::process::Command::new("taskset")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A child process, optionally pinned to one core, that talks to the
/// orchestrator in JSON lines on its stdout. Killed when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl Proc {
    /// Starts this benchmark binary with `args` (a hidden child command).
    pub(crate) fn spawn_self(name: &str, cpu: Option<usize>, args: &[String]) -> Result<Proc> {
        let exe = std::env::current_exe()?;
        Self::spawn(name, cpu, &exe, args)
    }

    /// Starts `program` with `args`, pinned to `cpu` when given.
    pub(crate) fn spawn(
        name: &str,
        cpu: Option<usize>,
        program: impl AsRef<Path>,
        args: &[String],
    ) -> Result<Proc> {
        let mut command = match cpu {
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu.to_string()).arg(program.as_ref());
                command
            }
            None => Command::new(program.as_ref()),
        };
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: prctl(2) is async-signal-safe; it only sets a flag of the
        // child. The child dies with the thread that started it, so killing
        // the orchestrator (a timeout in the smoke test, say) leaves no
        // server behind to hold ports, directories or a pipe open.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", program.as_ref()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name}: no stdout"))?;
        let stdin = child.stdin.take();
        let pid = child
            .id()
            .ok_or_else(|| format!("{name}: exited at once"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
            pid,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The next JSON line the child prints (other lines are skipped), or an
    /// error if it exits or says nothing within `timeout`.
    pub(crate) async fn message(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let read = async {
            while let Some(line) = self.stdout.next_line().await? {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
                        return Err(format!("{}: {error}", self.name).into());
                    }
                    return Ok(value);
                }
            }
            Err(format!("{} exited before reporting", self.name).into())
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| format!("{} said nothing within {timeout:?}", self.name))?
    }

    /// Everything the process prints on stdout until it exits, which it
    /// must do successfully within `timeout` (for tools that print a text
    /// report at the end, as h2load does).
    pub(crate) async fn output(&mut self, timeout: Duration) -> Result<String> {
        let read = async {
            let mut out = String::new();
            while let Some(line) = self.stdout.next_line().await? {
                out.push_str(&line);
                out.push('\n');
            }
            Ok::<_, Error>(out)
        };
        let out = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| format!("{} did not finish within {timeout:?}", self.name))??;
        self.wait(timeout).await?;
        Ok(out)
    }

    /// Waits for a message with field `key` (skipping others) and returns
    /// it whole.
    pub(crate) async fn expect_message(
        &mut self,
        key: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self.message(left).await?;
            if message.get(key).is_some() {
                return Ok(message);
            }
        }
    }

    /// Waits for a message with field `key` (skipping others) and returns
    /// that field.
    pub(crate) async fn expect(
        &mut self,
        key: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let mut message = self.expect_message(key, timeout).await?;
        Ok(message
            .get_mut(key)
            .map(serde_json::Value::take)
            .unwrap_or_default())
    }

    /// Tells a child waiting in [`say_and_wait`] to go on.
    pub(crate) async fn go(&mut self) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: no stdin", self.name))?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    /// CPU time (user + system) the process has used so far.
    pub(crate) fn cpu_time(&self) -> Result<Duration> {
        cpu_time_of(self.pid)
    }

    /// Resident memory now, in bytes.
    pub(crate) fn rss(&self) -> Result<u64> {
        status_kib(self.pid, "VmRSS:").map(|kib| kib * 1024)
    }

    /// Resident anonymous memory now (heap and stacks, not the binary's
    /// pages), in bytes.
    pub(crate) fn anon_rss(&self) -> Result<u64> {
        status_kib(self.pid, "RssAnon:").map(|kib| kib * 1024)
    }

    /// The most resident memory the process has had, in bytes.
    pub(crate) fn peak_rss(&self) -> Result<u64> {
        status_kib(self.pid, "VmHWM:").map(|kib| kib * 1024)
    }

    /// Waits for the process to exit by itself, for at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> Result<()> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| format!("{} did not exit within {timeout:?}", self.name))??;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{} exited with {status}", self.name).into())
        }
    }

    /// SIGTERM, and wait up to 10 s for a graceful exit; SIGKILL after.
    pub(crate) async fn terminate(&mut self) -> Result<()> {
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) with a pid we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.kill().await?;
                Err(format!("{} ignored SIGTERM for 10 s", self.name).into())
            }
        }
    }

    /// SIGKILL, and reap.
    pub(crate) async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// CPU time that process `pid`'s threads have used, to the nanosecond
/// (`/proc/<pid>/task/*/schedstat`); from `/proc/<pid>/stat`, in clock
/// ticks, where that is not available.
pub(crate) fn cpu_time_of(pid: u32) -> Result<Duration> {
    match threads_cpu_time(pid) {
        Ok(total) => Ok(total),
        Err(_) => ticks_cpu_time(pid),
    }
}

fn threads_cpu_time(pid: u32) -> Result<Duration> {
    let mut nanos: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        let on_cpu: u64 = stat
            .split_whitespace()
            .next()
            .ok_or("empty schedstat")?
            .parse()?;
        nanos = nanos.saturating_add(on_cpu);
    }
    Ok(Duration::from_nanos(nanos))
}

fn ticks_cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("malformed /proc/pid/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14, stime 15.
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i - 3)
            .ok_or("short /proc/pid/stat")?
            .parse::<u64>()?)
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU time this process has used, finer than `/proc` ticks.
pub(crate) fn self_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// This process's peak resident memory, in bytes.
pub(crate) fn self_peak_rss() -> u64 {
    status_kib(std::process::id(), "VmHWM:").map_or(0, |kib| kib * 1024)
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .trim_start_matches(field)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

/// Prints one JSON line for the orchestrator, then waits (at most
/// `patience`) until it answers with [`Proc::go`]: for a child whose work
/// starts right after a marker, so that the orchestrator's readings come
/// before the work, not during it.
pub(crate) async fn say_and_wait(value: serde_json::Value, patience: Duration) -> Result<()> {
    say(value);
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    tokio::time::timeout(patience, stdin.read_line(&mut line))
        .await
        .map_err(|_| format!("no go from the orchestrator within {patience:?}"))??;
    if line.trim() == "go" {
        Ok(())
    } else {
        Err(format!("expected `go` from the orchestrator, got {line:?}").into())
    }
}

/// Prints one JSON line for the orchestrator.
pub(crate) fn say(value: serde_json::Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Latencies of individual operations: every one, or, for recorders made
/// with [`Latencies::sampled`], a uniform random sample of bounded size
/// (so that millions of messages do not inflate the load generator's RSS).
#[derive(Debug, Clone)]
pub(crate) struct Latencies {
    nanos: Vec<u64>,
    /// Keep at most this many (reservoir sampling, algorithm R).
    capacity: usize,
    /// Values offered so far.
    seen: u64,
    rng: fastrand::Rng,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl Latencies {
    /// Keeps every sample; room for `capacity` to start with.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Latencies {
            nanos: Vec::with_capacity(capacity),
            capacity: usize::MAX,
            seen: 0,
            rng: fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Keeps a uniform random sample of at most `capacity` latencies.
    pub(crate) fn sampled(capacity: usize) -> Self {
        Latencies {
            capacity,
            ..Self::with_capacity(capacity)
        }
    }

    /// Records one operation.
    pub(crate) fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.seen += 1;
        if self.nanos.len() < self.capacity {
            self.nanos.push(nanos);
            return;
        }
        // Kept with probability capacity / seen, in a random slot.
        let slot = self.rng.u64(..self.seen);
        if let Some(kept) = usize::try_from(slot)
            .ok()
            .and_then(|slot| self.nanos.get_mut(slot))
        {
            *kept = nanos;
        }
    }

    /// Adds another recorder's samples.
    pub(crate) fn merge(&mut self, other: Latencies) {
        self.seen += other.seen;
        self.nanos.extend(other.nanos);
    }

    /// How many operations were recorded (sampled or not).
    pub(crate) fn len(&self) -> usize {
        usize::try_from(self.seen).unwrap_or(usize::MAX)
    }

    /// The slowest, in microseconds.
    pub(crate) fn max_us(&self) -> f64 {
        self.nanos.iter().max().map_or(0.0, |&n| n as f64 / 1000.0)
    }

    /// p50, p99 and p99.9, in microseconds.
    pub(crate) fn percentiles_us(&mut self) -> [f64; 3] {
        self.nanos.sort_unstable();
        [0.50, 0.99, 0.999].map(|q| {
            if self.nanos.is_empty() {
                return 0.0;
            }
            let rank = ((self.nanos.len() as f64 * q).ceil() as usize).clamp(1, self.nanos.len());
            self.nanos[rank - 1] as f64 / 1000.0
        })
    }
}

/// What a load generator counted in its measured window: operations, and
/// their latencies.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Operations that count.
    pub(crate) ops: u64,
    /// Their latencies (or a sample of them).
    pub(crate) latencies: Latencies,
}

impl Tally {
    /// The load generator's numbers: throughput over `window`, latencies,
    /// `cpu` (this process's, over the window) per operation, peak RSS.
    pub(crate) fn sample(&mut self, window: Duration, cpu: Duration) -> Result<Sample> {
        if self.ops == 0 {
            return Err("no operation completed in the measured window".into());
        }
        let ops = self.ops as f64;
        let mut sample = Sample::default();
        sample
            .set(THROUGHPUT, ops / window.as_secs_f64())
            .latencies(&mut self.latencies)
            .set(CLIENT_CPU, cpu.as_secs_f64() * 1e6 / ops)
            .set(CLIENT_RSS, mib(self_peak_rss()));
        Ok(sample)
    }
}

/// One number a scenario reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Metric {
    /// Its key in the JSON.
    pub name: &'static str,
    /// Its unit, for the table.
    pub unit: &'static str,
    /// Whether more is better (throughput) or less is (latency, CPU, RSS).
    pub higher_is_better: bool,
}

impl Metric {
    /// A metric where more is better.
    pub(crate) const fn higher(name: &'static str, unit: &'static str) -> Self {
        Metric {
            name,
            unit,
            higher_is_better: true,
        }
    }
    /// A metric where less is better.
    pub(crate) const fn lower(name: &'static str, unit: &'static str) -> Self {
        Metric {
            name,
            unit,
            higher_is_better: false,
        }
    }
}

/// Operations per second.
pub(crate) const THROUGHPUT: Metric = Metric::higher("throughput", "ops/s");
/// Median latency.
pub(crate) const P50: Metric = Metric::lower("p50", "µs");
/// 99th percentile latency.
pub(crate) const P99: Metric = Metric::lower("p99", "µs");
/// 99.9th percentile latency.
pub(crate) const P999: Metric = Metric::lower("p99.9", "µs");
/// Client (load generator) CPU time per operation.
pub(crate) const CLIENT_CPU: Metric = Metric::lower("client cpu/op", "µs");
/// Server CPU time per operation.
pub(crate) const SERVER_CPU: Metric = Metric::lower("server cpu/op", "µs");
/// Server peak resident memory.
pub(crate) const SERVER_RSS: Metric = Metric::lower("server peak rss", "MiB");
/// Allocations the client made per operation while measured (any of its
/// threads).
pub(crate) const CLIENT_ALLOCS: Metric = Metric::lower("client allocations/op", "allocs");
/// Client peak resident memory.
pub(crate) const CLIENT_RSS: Metric = Metric::lower("client peak rss", "MiB");

/// The numbers of one run of one variant.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    values: Vec<(Metric, f64)>,
}

impl Sample {
    /// Adds a number.
    pub(crate) fn set(&mut self, metric: Metric, value: f64) -> &mut Self {
        self.values.push((metric, value));
        self
    }

    /// Adds p50, p99 and p99.9 of `latencies`; none when nothing was
    /// recorded (every call failed, say, as under overload without
    /// shedding), rather than a 0 that reads as fast.
    pub(crate) fn latencies(&mut self, latencies: &mut Latencies) -> &mut Self {
        if latencies.len() == 0 {
            return self;
        }
        let [p50, p99, p999] = latencies.percentiles_us();
        self.set(P50, p50).set(P99, p99).set(P999, p999)
    }

    /// The value of `metric`, if set.
    pub(crate) fn get(&self, metric: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(m, _)| m.name == metric)
            .map(|(_, v)| *v)
    }

    /// As a JSON object.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(m, v)| (m.name.to_owned(), serde_json::json!(v)))
                .collect(),
        )
    }

    /// Reads back what a load generator reported with a [`Tally`]'s sample
    /// (`{"result": …, "ops": n}`): the sample, and how many operations
    /// it counted.
    pub(crate) fn from_load(report: &serde_json::Value) -> Result<(Sample, f64)> {
        let ops = report["ops"]
            .as_f64()
            .ok_or_else(|| format!("no operation count in {report}"))?;
        let mut sample = Self::from_json(
            &report["result"],
            &[THROUGHPUT, P50, P99, P999, CLIENT_CPU, CLIENT_RSS],
        )?;
        // Reported by the loads that count their allocations.
        if let Some(allocs) = report["result"]
            .get(CLIENT_ALLOCS.name)
            .and_then(|v| v.as_f64())
        {
            sample.set(CLIENT_ALLOCS, allocs);
        }
        Ok((sample, ops))
    }

    /// Reads the numbers a child reported with [`Sample::to_json`] back,
    /// for the metrics in `metrics`.
    pub(crate) fn from_json(value: &serde_json::Value, metrics: &[Metric]) -> Result<Sample> {
        let mut sample = Sample::default();
        for metric in metrics {
            let v = value.get(metric.name).and_then(|v| v.as_f64());
            match v {
                Some(v) => {
                    sample.set(*metric, v);
                }
                // Percentiles are left out when no call succeeded.
                None if [P50.name, P99.name, P999.name].contains(&metric.name) => {}
                None => return Err(format!("missing `{}` in {value}", metric.name).into()),
            }
        }
        Ok(sample)
    }
}

/// The runs of one variant (lodestar, or a peer) of one case.
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    /// "lodestar", "tonic", "etcd", "async-nats"...
    pub name: String,
    /// One per repetition.
    pub samples: Vec<Sample>,
}

/// One case of a scenario, e.g. "unary 1 KiB": lodestar first, then its
/// peers.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    /// The scenario: "rpc", "registry", "broker", "failover", "footprint".
    pub scenario: &'static str,
    /// What this case does, with its parameters.
    pub name: String,
    /// lodestar first.
    pub variants: Vec<Variant>,
}

/// Runs `variants` `settings.reps` times each, alternating (ABAB, then BA
/// BA...), so drift on the machine hits each the same.
pub(crate) async fn alternate<F, Fut>(
    settings: &Settings,
    scenario: &'static str,
    name: impl Into<String>,
    variants: &[&str],
    mut run: F,
) -> Result<Case>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Sample>>,
{
    let name = name.into();
    let mut results: Vec<Variant> = variants
        .iter()
        .map(|v| Variant {
            name: (*v).to_owned(),
            samples: Vec::new(),
        })
        .collect();
    for rep in 0..settings.reps.max(1) {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            eprintln!(
                "  {scenario} / {name} / {} (run {} of {})",
                variants[i],
                rep + 1,
                settings.reps
            );
            let sample = run(variants[i].to_owned())
                .await
                .map_err(|e| format!("{scenario} / {name} / {}: {e}", variants[i]))?;
            results[i].samples.push(sample);
        }
    }
    Ok(Case {
        scenario,
        name,
        variants: results,
    })
}

/// [`alternate`] for runs that measure several cases at once
/// (one sample per name in `names`): the variants still alternate run by
/// run, and each case gets its own samples.
pub(crate) async fn alternate_steps<F, Fut>(
    settings: &Settings,
    scenario: &'static str,
    names: &[String],
    variants: &[&str],
    mut run: F,
) -> Result<Vec<Case>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Sample>>>,
{
    let first = names.first().ok_or("no case to measure")?;
    // The samples of the cases after the first, per variant.
    let rest: Mutex<Vec<(String, Vec<Sample>)>> = Mutex::new(Vec::new());
    let case = alternate(settings, scenario, first.clone(), variants, |variant| {
        let run = run(variant.clone());
        let rest = &rest;
        async move {
            let mut samples = run.await?;
            if samples.len() != names.len() {
                return Err(format!("{} samples for {} cases", samples.len(), names.len()).into());
            }
            let first = samples.remove(0);
            rest.lock()
                .map_err(|_| "samples lock poisoned")?
                .push((variant, samples));
            Ok(first)
        }
    })
    .await?;
    let rest = rest.into_inner().map_err(|_| "samples lock poisoned")?;
    let mut cases = vec![case];
    for (i, name) in names.iter().enumerate().skip(1) {
        let variants = variants
            .iter()
            .map(|variant| Variant {
                name: (*variant).to_owned(),
                samples: rest
                    .iter()
                    .filter(|(v, _)| v == variant)
                    .filter_map(|(_, samples)| samples.get(i - 1).cloned())
                    .collect(),
            })
            .collect();
        cases.push(Case {
            scenario,
            name: name.clone(),
            variants,
        });
    }
    Ok(cases)
}

/// Median, minimum and maximum.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// Of `values`; `None` when empty.
    pub(crate) fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

impl Case {
    /// The metrics any variant reported, in first-seen order.
    fn metrics(&self) -> Vec<Metric> {
        let mut out: Vec<Metric> = Vec::new();
        for variant in &self.variants {
            for sample in &variant.samples {
                for (metric, _) in &sample.values {
                    if !out.iter().any(|m| m.name == metric.name) {
                        out.push(*metric);
                    }
                }
            }
        }
        out
    }

    fn spread(&self, variant: &Variant, metric: &Metric) -> Option<Spread> {
        let values: Vec<f64> = variant
            .samples
            .iter()
            .filter_map(|s| s.get(metric.name))
            .collect();
        Spread::of(&values)
    }

    /// lodestar's advantage over `peer` on `metric`: above 1.0 lodestar is
    /// better (more throughput, or less latency/CPU/memory).
    fn advantage(&self, peer: &Variant, metric: &Metric) -> Option<f64> {
        let ours = self.spread(self.variants.first()?, metric)?.median;
        let theirs = self.spread(peer, metric)?.median;
        if ours == theirs {
            // Both zero (no failed call on either side) included.
            return Some(1.0);
        }
        let ratio = if metric.higher_is_better {
            ours / theirs
        } else {
            theirs / ours
        };
        // Infinite when lodestar's is zero and the peer's is not (failed
        // calls, say): shown as ∞, kept in JSON as "inf".
        (!ratio.is_nan()).then_some(ratio)
    }
}

/// Everything one `run` measured.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// In the order they ran.
    pub cases: Vec<Case>,
}

impl Report {
    /// The report as JSON: machine, settings, and for each case and variant
    /// every sample, the spreads and the ratios against lodestar.
    pub(crate) fn to_json(&self, settings: &Settings) -> serde_json::Value {
        let cases: Vec<serde_json::Value> = self
            .cases
            .iter()
            .map(|case| {
                let metrics = case.metrics();
                let variants: Vec<serde_json::Value> = case
                    .variants
                    .iter()
                    .enumerate()
                    .map(|(i, variant)| {
                        let spreads: serde_json::Map<String, serde_json::Value> = metrics
                            .iter()
                            .filter_map(|m| {
                                case.spread(variant, m)
                                    .map(|s| (m.name.to_owned(), serde_json::json!(s)))
                            })
                            .collect();
                        let advantage: serde_json::Map<String, serde_json::Value> = if i == 0 {
                            serde_json::Map::new()
                        } else {
                            metrics
                                .iter()
                                .filter_map(|m| {
                                    case.advantage(variant, m)
                                        .map(|r| (m.name.to_owned(), ratio_json(r)))
                                })
                                .collect()
                        };
                        serde_json::json!({
                            "name": variant.name,
                            "samples": variant.samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
                            "spread": spreads,
                            "lodestar_advantage": advantage,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "scenario": case.scenario,
                    "case": case.name,
                    "units": metrics.iter().map(|m| (m.name.to_owned(), serde_json::json!(m.unit))).collect::<serde_json::Map<_, _>>(),
                    "variants": variants,
                })
            })
            .collect();
        serde_json::json!({
            "machine": machine(),
            "settings": {
                "smoke": settings.smoke,
                "reps": settings.reps,
                "warmup_ms": settings.warmup.as_millis() as u64,
                "duration_ms": settings.duration.as_millis() as u64,
                "pinned": settings.pin,
            },
            "cases": cases,
        })
    }

    /// The report as Markdown tables, one per scenario: for each case and
    /// metric, each variant's median with its min–max, and lodestar's
    /// advantage over each peer. A scenario without peers (every case has
    /// one variant) gets one row per case and a column per metric instead.
    pub(crate) fn to_markdown(&self) -> String {
        let mut out = String::new();
        let mut start = 0;
        while let Some(first) = self.cases.get(start) {
            let end = self.cases[start..]
                .iter()
                .position(|c| c.scenario != first.scenario)
                .map_or(self.cases.len(), |len| start + len);
            let cases = &self.cases[start..end];
            let _ = write!(out, "\n### {}\n\n", first.scenario);
            if cases.iter().all(|c| c.variants.len() == 1) {
                wide_table(&mut out, cases);
            } else {
                long_table(&mut out, cases);
            }
            start = end;
        }
        out
    }
}

/// A cell: the median, with the min–max when there are several samples.
fn cell(spread: Option<Spread>, samples: usize) -> String {
    match spread {
        Some(s) if samples > 1 => format!(
            "{} [{}–{}]",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        Some(s) => fmt_num(s.median),
        None => "–".to_owned(),
    }
}

/// One row per case and metric; a column per variant, and lodestar's
/// advantage over each peer.
fn long_table(out: &mut String, cases: &[Case]) {
    let peers = cases.iter().map(|c| c.variants.len()).max().unwrap_or(1);
    out.push_str("| case | metric | lodestar |");
    for _ in 1..peers {
        out.push_str(" peer | lodestar advantage |");
    }
    out.push('\n');
    out.push_str("|---|---|---:|");
    for _ in 1..peers {
        out.push_str("---:|---:|");
    }
    out.push('\n');
    for case in cases {
        for metric in case.metrics() {
            let _ = write!(out, "| {} | {} ({}) |", case.name, metric.name, metric.unit);
            for (i, variant) in case.variants.iter().enumerate() {
                let value = cell(case.spread(variant, &metric), variant.samples.len());
                if i == 0 || value == "–" {
                    let _ = write!(out, " {value} |");
                } else {
                    let _ = write!(out, " {}: {value} |", variant.name);
                }
                if i > 0 {
                    let ratio = case
                        .advantage(variant, &metric)
                        .map_or_else(|| "–".to_owned(), fmt_ratio);
                    let _ = write!(out, " {ratio} |");
                }
            }
            out.push('\n');
        }
    }
}

/// One row per case (of one variant each), a column per metric.
fn wide_table(out: &mut String, cases: &[Case]) {
    let mut metrics: Vec<Metric> = Vec::new();
    for case in cases {
        for metric in case.metrics() {
            if !metrics.iter().any(|m| m.name == metric.name) {
                metrics.push(metric);
            }
        }
    }
    out.push_str("| case |");
    for metric in &metrics {
        let _ = write!(out, " {} ({}) |", metric.name, metric.unit);
    }
    out.push_str("\n|---|");
    for _ in &metrics {
        out.push_str("---:|");
    }
    out.push('\n');
    for case in cases {
        let _ = write!(out, "| {} |", case.name);
        for metric in &metrics {
            let value = match case.variants.first() {
                Some(variant) => cell(case.spread(variant, metric), variant.samples.len()),
                None => "–".to_owned(),
            };
            let _ = write!(out, " {value} |");
        }
        out.push('\n');
    }
}

/// A ratio for the JSON report (JSON has no infinity).
fn ratio_json(ratio: f64) -> serde_json::Value {
    if ratio.is_finite() {
        serde_json::json!(ratio)
    } else {
        serde_json::json!(if ratio > 0.0 { "inf" } else { "-inf" })
    }
}

/// A ratio for a table.
fn fmt_ratio(ratio: f64) -> String {
    if ratio.is_infinite() {
        "∞".to_owned()
    } else if ratio == 0.0 {
        "0×".to_owned()
    } else {
        format!("{ratio:.2}×")
    }
}

/// A number for a table: thousands separated, at most three significant
/// decimals for small values.
pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x.abs() >= 1000.0 {
        let rounded = x.round() as i64;
        let digits = rounded.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(ch);
        }
        if rounded < 0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The machine the numbers come from.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut map = BTreeMap::new();
    map.insert("cpu", serde_json::json!(cpu));
    map.insert("cores", serde_json::json!(cores));
    map.insert("kernel", serde_json::json!(kernel));
    serde_json::json!(map)
}

/// Bytes to MiB.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn case(metric: Metric, ours: &[f64], theirs: &[f64]) -> Case {
        let variant = |name: &str, values: &[f64]| Variant {
            name: name.to_owned(),
            samples: values
                .iter()
                .map(|v| {
                    let mut sample = Sample::default();
                    sample.set(metric, *v);
                    sample
                })
                .collect(),
        };
        Case {
            scenario: "test",
            name: "case".to_owned(),
            variants: vec![variant("lodestar", ours), variant("peer", theirs)],
        }
    }

    #[test]
    fn spread_is_median_min_max() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn percentiles_take_the_rank_at_or_above() {
        let mut latencies = Latencies::default();
        for micros in 1..=1000 {
            latencies.record(Duration::from_micros(micros));
        }
        assert_eq!(latencies.percentiles_us(), [500.0, 990.0, 999.0]);
        assert_eq!(latencies.max_us(), 1000.0);
        assert_eq!(latencies.len(), 1000);
    }

    #[test]
    fn a_sampled_recorder_stays_bounded_and_counts_everything() {
        let mut latencies = Latencies::sampled(100);
        for micros in 0..10_000 {
            latencies.record(Duration::from_micros(micros));
        }
        assert_eq!(latencies.len(), 10_000);
        assert_eq!(latencies.nanos.len(), 100);
        // A uniform sample: its median is near the true one (5,000 µs).
        let [p50, _, _] = latencies.percentiles_us();
        assert!((3000.0..7000.0).contains(&p50), "{p50}");
    }

    #[test]
    fn advantage_is_above_one_when_lodestar_is_better() {
        let more = case(THROUGHPUT, &[200.0, 220.0, 180.0], &[100.0, 100.0, 100.0]);
        assert_eq!(more.advantage(&more.variants[1], &THROUGHPUT), Some(2.0));
        let less = case(P99, &[50.0], &[100.0]);
        assert_eq!(less.advantage(&less.variants[1], &P99), Some(2.0));
        let worse = case(P99, &[200.0], &[100.0]);
        assert_eq!(worse.advantage(&worse.variants[1], &P99), Some(0.5));
        // No failure against some: infinitely better, shown as such.
        let failed = Metric::lower("failed calls", "calls");
        let none = case(failed, &[0.0], &[12.0]);
        assert_eq!(
            none.advantage(&none.variants[1], &failed),
            Some(f64::INFINITY)
        );
        assert_eq!(fmt_ratio(f64::INFINITY), "∞");
        let both = case(failed, &[0.0], &[0.0]);
        assert_eq!(both.advantage(&both.variants[1], &failed), Some(1.0));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(1_234_567.4), "1,234,567");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
    }

    #[test]
    fn the_table_names_each_peer_and_its_ratio() {
        let mut report = Report::default();
        report
            .cases
            .push(case(THROUGHPUT, &[200.0, 200.0], &[100.0, 100.0]));
        let table = report.to_markdown();
        assert!(table.contains("| case | metric | lodestar | peer | lodestar advantage |"));
        assert!(
            table.contains(
                "| case | throughput (ops/s) | 200 [200–200] | peer: 100 [100–100] | 2.00× |"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_scenario_without_peers_gets_a_row_per_case() {
        let mut report = Report::default();
        let mut one = case(P99, &[3.0, 1.0, 2.0], &[]);
        one.variants.truncate(1);
        one.scenario = "alone";
        let mut two = one.clone();
        two.name = "other case".to_owned();
        two.variants[0].samples[0].set(THROUGHPUT, 5.0);
        report.cases.extend([one, two]);
        let table = report.to_markdown();
        assert!(
            table.contains("| case | p99 (µs) | throughput (ops/s) |\n|---|---:|---:|\n"),
            "{table}"
        );
        assert!(
            table.contains("| case | 2.00 [1.00–3.00] | – |\n"),
            "{table}"
        );
        assert!(
            table.contains("| other case | 2.00 [1.00–3.00] | 5.00 [5.00–5.00] |\n"),
            "{table}"
        );
    }
}
