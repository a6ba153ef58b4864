//! The resilience flags both binaries share: fault injection (client and
//! server), and the client's breaker and bulkhead. Each flag sets one
//! field of the policy; the policy's own checks then name a bad value
//! (`methods[0].fault.abort_percent`).

use lodestar::client::policy::{BreakerKind, BreakerSettings, BulkheadSettings, MethodPolicy};
use lodestar::fault::FaultSettings;

/// Faults injected into every method's calls (`--fault-*`); off unless a
/// percentage is set or `--fault-allow-headers` is given.
#[derive(clap::Args, Debug, Clone)]
pub struct FaultFlags {
    /// Share of calls failed with --fault-abort-code, in percent (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub fault_abort_percent: f64,
    /// The code of injected aborts, by name.
    #[arg(long, default_value = "UNAVAILABLE")]
    pub fault_abort_code: String,
    /// Share of calls delayed by --fault-delay-ms, in percent (0-100),
    /// drawn independently of the aborts.
    #[arg(long, default_value_t = 0.0)]
    pub fault_delay_percent: f64,
    /// The injected delay, in milliseconds (at most 60000).
    #[arg(long, default_value_t = 0)]
    pub fault_delay_ms: u64,
    /// The most faults in progress at once.
    #[arg(long, default_value_t = 100)]
    pub fault_max_active: u32,
    /// Obey `x-lodestar-fault-delay-ms` and `x-lodestar-fault-abort` in a
    /// call's metadata.
    #[arg(long)]
    pub fault_allow_headers: bool,
}

impl FaultFlags {
    /// The settings these flags ask for, if any.
    pub fn settings(&self) -> Option<FaultSettings> {
        let off = self.fault_abort_percent == 0.0
            && self.fault_delay_percent == 0.0
            && !self.fault_allow_headers;
        if off {
            return None;
        }
        let mut settings = FaultSettings::default();
        settings.abort_percent = self.fault_abort_percent;
        settings.abort_code = self.fault_abort_code.clone();
        settings.delay_percent = self.fault_delay_percent;
        settings.delay_ms = self.fault_delay_ms;
        settings.max_active = self.fault_max_active;
        settings.allow_headers = self.fault_allow_headers;
        Some(settings)
    }
}

/// Which breaker `--breaker` names.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Failure and slow-call ratios: closed, open, half-open.
    Ratio,
    /// Google SRE's adaptive throttling.
    Sre,
}

/// The client's circuit breaker (for every method) and bulkhead.
#[derive(clap::Args, Debug, Clone)]
pub struct BreakerFlags {
    /// A circuit breaker on every method. Default: none (or the policy
    /// file's).
    #[arg(long, value_enum)]
    pub breaker: Option<Breaker>,
    /// Sliding window of the breaker, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub breaker_window_ms: u64,
    /// Calls in the window before the breaker may act.
    #[arg(long, default_value_t = 20)]
    pub breaker_min_calls: u32,
    /// `ratio`: opens at this percentage of failed calls (1-100).
    #[arg(long, default_value_t = 50)]
    pub breaker_failure_percent: u32,
    /// `ratio`: a call this slow or slower counts as slow (milliseconds).
    #[arg(long)]
    pub breaker_slow_ms: Option<u64>,
    /// `ratio`: opens at this percentage of slow calls (1-100).
    #[arg(long, default_value_t = 100)]
    pub breaker_slow_percent: u32,
    /// `ratio`: how long it stays open, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub breaker_open_ms: u64,
    /// `ratio`: probes a half-open breaker lets through.
    #[arg(long, default_value_t = 3)]
    pub breaker_probes: u32,
    /// `sre`: the multiplier K of accepted calls.
    #[arg(long, default_value_t = 2.0)]
    pub breaker_k: f64,
    /// At most this many calls in flight to the service. Default: none.
    #[arg(long)]
    pub bulkhead: Option<u32>,
}

impl BreakerFlags {
    /// The breaker these flags ask for, if any.
    pub fn settings(&self) -> Option<BreakerSettings> {
        let kind = match self.breaker? {
            Breaker::Ratio => BreakerKind::Ratio,
            Breaker::Sre => BreakerKind::Sre,
        };
        let mut settings = BreakerSettings::default();
        settings.kind = kind;
        settings.window_ms = self.breaker_window_ms;
        settings.min_calls = self.breaker_min_calls;
        settings.failure_percent = self.breaker_failure_percent;
        settings.slow_call_ms = self.breaker_slow_ms;
        settings.slow_call_percent = self.breaker_slow_percent;
        settings.open_ms = self.breaker_open_ms;
        settings.probes = self.breaker_probes;
        settings.k = self.breaker_k;
        Some(settings)
    }

    /// The bulkhead these flags ask for, if any.
    pub fn bulkhead(&self) -> Option<BulkheadSettings> {
        self.bulkhead.map(BulkheadSettings::new)
    }
}

/// The `"*"` entry of a policy's `methods` (added last if missing), for
/// flags that apply to every method.
pub fn every_method<M>(
    methods: &mut Vec<M>,
    names: impl Fn(&M) -> &[String],
    new: impl FnOnce() -> M,
) -> &mut M {
    let index = match methods
        .iter()
        .position(|m| names(m).iter().any(|n| n == "*"))
    {
        Some(index) => index,
        None => {
            methods.push(new());
            methods.len() - 1
        }
    };
    &mut methods[index]
}

/// A client `"*"` entry with no settings.
pub fn client_entry() -> MethodPolicy {
    let mut entry = MethodPolicy::default();
    entry.names = vec!["*".to_owned()];
    entry
}

/// A server `"*"` entry with no settings.
pub fn server_entry() -> lodestar::server::policy::MethodPolicy {
    let mut entry = lodestar::server::policy::MethodPolicy::default();
    entry.names = vec!["*".to_owned()];
    entry
}
