//! The RPC metrics: every call a server serves and a client makes, by
//! method and status code.
//!
//! Each method has one [`Series`]: calls started and in flight, messages
//! each way, and a duration histogram per status code. A server finds its
//! methods' series once, at start ([`MethodTable`]); a client on a
//! method's first call ([`ClientMethods`]). Per call: a lookup in a
//! sorted table, a clock read at each end, and relaxed atomic additions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lodestar_core::sync::MutexExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use tokio::time::Instant;
use tonic::Code;

use super::bounded::Bounded;
use super::{DurationHistogram, Metrics};
use crate::policy_data::code_name;

/// The `rpc_method` of calls to a method the server does not serve (or a
/// client's beyond [`MAX_CLIENT_METHODS`]), as the OpenTelemetry
/// conventions name them: one series for all, however many there are.
pub(crate) use super::bounded::OTHER;

/// The most methods a client keeps series for per service called; calls
/// to more count as [`OTHER`].
pub(crate) const MAX_CLIENT_METHODS: usize = 256;

/// Every gRPC status code, in number order.
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The kind of a method, as go-grpc-prometheus' `grpc_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Unary,
    ClientStream,
    ServerStream,
    Bidi,
    /// A client's call to a method whose descriptors it does not have.
    Unknown,
}

impl Kind {
    pub(crate) fn of(client_streaming: bool, server_streaming: bool) -> Self {
        match (client_streaming, server_streaming) {
            (false, false) => Kind::Unary,
            (true, false) => Kind::ClientStream,
            (false, true) => Kind::ServerStream,
            (true, true) => Kind::Bidi,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ClientStream => "client_stream",
            Kind::ServerStream => "server_stream",
            Kind::Bidi => "bidi_stream",
            Kind::Unknown => "",
        }
    }
}

/// A series' key in its family: the service called (empty on a server),
/// and the method.
type Key = (Box<str>, Box<str>);

/// One method's counts (a client's: one method of one service): calls
/// started and in flight, messages each way (added when each body goes),
/// and a duration histogram per status code.
#[derive(Debug)]
pub(crate) struct Series {
    /// `pkg.Service/Method`, or [`OTHER`].
    method: Box<str>,
    kind: Kind,
    started: AtomicU64,
    active: AtomicI64,
    received: AtomicU64,
    sent: AtomicU64,
    /// By code, in [`CODES`] order.
    durations: [DurationHistogram; 17],
}

impl Series {
    fn new(method: &str, kind: Kind) -> Self {
        Self {
            method: method.into(),
            kind,
            started: AtomicU64::new(0),
            active: AtomicI64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            durations: Default::default(),
        }
    }

    /// The method's label: `pkg.Service/Method`, or `_OTHER`.
    pub(crate) fn method(&self) -> &str {
        &self.method
    }

    /// Counts `count` messages going `way`.
    pub(crate) fn messages(&self, way: Way, count: u64) {
        let counter = match way {
            Way::Received => &self.received,
            Way::Sent => &self.sent,
        };
        counter.fetch_add(count, Ordering::Relaxed);
    }

    /// The kind of the method.
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// A call of this method starts now.
    #[inline]
    pub(crate) fn start(self: &Arc<Self>) -> Record {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Record(Some((self.clone(), Instant::now())))
    }

    fn durations(&self, code: Code) -> Option<&DurationHistogram> {
        self.durations.get(code as usize)
    }
}

/// Which way messages go, from the side counting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    Received,
    Sent,
}

/// A call in progress: ended with its code by [`end`](Self::end), or
/// `CANCELLED` if dropped first.
#[derive(Debug, Default)]
pub(crate) struct Record(Option<(Arc<Series>, Instant)>);

impl Record {
    /// The series this call counts in, while it runs.
    pub(crate) fn series(&self) -> Option<&Arc<Series>> {
        self.0.as_ref().map(|(series, _)| series)
    }

    /// The call ended with `code`.
    #[inline]
    pub(crate) fn end(&mut self, code: Code) {
        if let Some((series, started)) = self.0.take() {
            series.active.fetch_sub(1, Ordering::Relaxed);
            if let Some(durations) = series.durations(code) {
                durations.observe(started.elapsed());
            }
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.end(Code::Cancelled);
    }
}

/// Which side a family counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// The series of one side in one registry, by (service called, method):
/// a server's have no service (its methods name their own).
#[derive(Debug)]
struct Family {
    side: Side,
    series: Mutex<BTreeMap<Key, Arc<Series>>>,
    grpc_compat: Arc<AtomicBool>,
}

impl Family {
    fn register(metrics: &Metrics, side: Side) -> Arc<Family> {
        let grpc_compat = metrics.shared.grpc_compat.clone();
        #[derive(Clone)]
        struct Registered<const SERVER: bool>(Arc<Family>);
        let make = |registry: &mut prometheus_client::registry::Registry| {
            let family = Arc::new(Family {
                side,
                series: Mutex::default(),
                grpc_compat,
            });
            registry.register_collector(Box::new(family.clone()));
            family
        };
        match side {
            Side::Server => metrics.set(|r| Registered::<true>(make(r))).0,
            Side::Client => metrics.set(|r| Registered::<false>(make(r))).0,
        }
    }

    fn series(&self, service: &str, method: &str, kind: Kind) -> Arc<Series> {
        let mut all = self.series.lock_unpoisoned();
        if let Some(series) = all.get(&(service.into(), method.into())) {
            return series.clone();
        }
        let series = Arc::new(Series::new(method, kind));
        all.insert((service.into(), method.into()), series.clone());
        series
    }
}

/// A server's methods, found by path (`/pkg.Service/Method`) with a binary
/// search; every other path counts as [`OTHER`].
#[derive(Debug, Clone)]
pub(crate) struct MethodTable {
    /// Sorted by path.
    methods: Arc<[(Box<str>, Arc<Series>)]>,
    other: Arc<Series>,
}

impl MethodTable {
    /// The series of a server's `methods` (`(path, kind)`), registered in
    /// `metrics` (so they are scraped from now on, at zero).
    pub(crate) fn server(
        metrics: &Metrics,
        methods: impl IntoIterator<Item = (String, Kind)>,
    ) -> Self {
        let family = Family::register(metrics, Side::Server);
        let mut methods: Vec<(Box<str>, Arc<Series>)> = methods
            .into_iter()
            .map(|(path, kind)| {
                let name = path.strip_prefix('/').unwrap_or(&path);
                let series = family.series("", name, kind);
                (path.into_boxed_str(), series)
            })
            .collect();
        methods.sort_by(|a, b| a.0.cmp(&b.0));
        methods.dedup_by(|a, b| a.0 == b.0);
        Self {
            methods: methods.into(),
            other: family.series("", OTHER, Kind::Unknown),
        }
    }

    /// The series of calls to `path`.
    #[inline]
    pub(crate) fn find(&self, path: &str) -> &Arc<Series> {
        match self
            .methods
            .binary_search_by(|(candidate, _)| (**candidate).cmp(path))
        {
            Ok(index) => self.methods.get(index).map_or(&self.other, |(_, s)| s),
            Err(_) => &self.other,
        }
    }
}

/// A client's series for one service called, found by path; each method
/// gets its series on its first call (at most [`MAX_CLIENT_METHODS`]).
#[derive(Debug)]
pub(crate) struct ClientMethods {
    service: Box<str>,
    family: Arc<Family>,
    /// By path.
    known: Bounded<Arc<Series>>,
}

impl ClientMethods {
    /// The series of calls to `service`, in `metrics`.
    pub(crate) fn new(metrics: &Metrics, service: &str) -> Self {
        Self {
            service: service.into(),
            family: Family::register(metrics, Side::Client),
            known: Bounded::new(MAX_CLIENT_METHODS),
        }
    }

    /// The series of calls to `path`; `kind` says what kind of method it
    /// is, if it must be added.
    #[inline]
    pub(crate) fn find(&self, path: &str, kind: impl FnOnce() -> Kind) -> Arc<Series> {
        self.known.find(
            path,
            |path| method(path).is_some(),
            |label| match method(label) {
                Some(method) => self.family.series(&self.service, method, kind()),
                None => self.family.series(&self.service, OTHER, Kind::Unknown),
            },
        )
    }
}

/// The method a client's call path names (`/pkg.Service/Method` without
/// its slash), if it looks like one.
fn method(path: &str) -> Option<&str> {
    path.strip_prefix('/').filter(|m| is_method_name(m))
}

/// Whether `method` looks like `pkg.Service/Method`: printable, one slash,
/// not too long (a label is not a place for arbitrary bytes).
fn is_method_name(method: &str) -> bool {
    method.len() <= 256
        && method.split('/').count() == 2
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
}

/// go-grpc-prometheus' name of `code` (Go's `codes.Code` strings).
fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Prometheus' default buckets, a subset of ours: for the compatibility
/// family's histogram.
const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Collector for Family {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let all: Vec<(Key, Arc<Series>)> = self
            .series
            .lock_unpoisoned()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let side = self.side.name();
        let client = self.side == Side::Client;
        // (label, value) pairs: a server's, then a client's extra one.
        let labels = |service: &str, method: &str| {
            let mut labels = vec![
                ("rpc_system_name", "grpc".to_owned()),
                ("rpc_method", method.to_owned()),
            ];
            if client {
                labels.push(("server_address", service.to_owned()));
            }
            labels
        };

        let name = format!("rpc_{side}_call_duration");
        let help = format!(
            "Duration of {side} calls, from the call's start to its final status, by method and status code"
        );
        let mut family =
            encoder.encode_descriptor(&name, &help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for ((service, _), series) in &all {
            for code in CODES {
                let Some(durations) = series.durations(code) else {
                    continue;
                };
                // Every method's OK series exists from the start (a
                // server's methods are registered then); others once used.
                if code != Code::Ok && durations.count() == 0 {
                    continue;
                }
                let mut set = labels(service, &series.method);
                let code_name = code_name(code);
                set.push(("rpc_status_code", code_name.to_owned()));
                set.push((
                    "error_type",
                    if code == Code::Ok {
                        String::new()
                    } else {
                        code_name.to_owned()
                    },
                ));
                durations.encode(family.encode_family(&set)?)?;
            }
        }

        let counter = |encoder: &mut DescriptorEncoder<'_>,
                       name: &str,
                       help: &str,
                       value: &dyn Fn(&Series) -> u64|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((service, _), series) in &all {
                let set = labels(service, &series.method);
                family
                    .encode_family(&set)?
                    .encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(
                        &value(series),
                        None,
                    )?;
            }
            Ok(())
        };
        counter(
            &mut encoder,
            &format!("rpc_{side}_calls_started"),
            &format!("Calls started ({side})"),
            &|s| s.started.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            &format!("rpc_{side}_messages_received"),
            &format!("Messages received ({side}): requests on a server, responses on a client"),
            &|s| s.received.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            &format!("rpc_{side}_messages_sent"),
            &format!("Messages sent ({side}): responses on a server, requests on a client"),
            &|s| s.sent.load(Ordering::Relaxed),
        )?;
        let name = format!("rpc_{side}_calls_active");
        let mut family = encoder.encode_descriptor(
            &name,
            &format!("Calls in progress ({side})"),
            None,
            MetricType::Gauge,
        )?;
        for ((service, _), series) in &all {
            let set = labels(service, &series.method);
            family
                .encode_family(&set)?
                .encode_gauge(&series.active.load(Ordering::Relaxed))?;
        }

        if self.grpc_compat.load(Ordering::Relaxed) {
            self.encode_compat(&mut encoder, &all)?;
        }
        Ok(())
    }
}

impl Family {
    /// go-grpc-prometheus' families, from the same counts.
    fn encode_compat(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        all: &[(Key, Arc<Series>)],
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        let side = self.side.name();
        let labels = |series: &Series| {
            let (service, method) = series
                .method
                .split_once('/')
                .unwrap_or((&series.method, ""));
            vec![
                ("grpc_type", series.kind.name().to_owned()),
                ("grpc_service", service.to_owned()),
                ("grpc_method", method.to_owned()),
            ]
        };
        type Count = fn(&Series) -> u64;
        let counters: [(&str, &str, Count); 3] = [
            ("started", "RPCs started", |s| {
                s.started.load(Ordering::Relaxed)
            }),
            ("msg_received", "Stream messages received", |s| {
                s.received.load(Ordering::Relaxed)
            }),
            ("msg_sent", "Stream messages sent", |s| {
                s.sent.load(Ordering::Relaxed)
            }),
        ];
        for (name, help, value) in counters {
            let name = format!("grpc_{side}_{name}");
            let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (_, series) in all {
                family
                    .encode_family(&labels(series))?
                    .encode_counter::<NoLabelSet, u64, u64>(&value(series), None)?;
            }
        }
        let name = format!("grpc_{side}_handled");
        let mut family = encoder.encode_descriptor(
            &name,
            "RPCs completed, by gRPC code",
            None,
            MetricType::Counter,
        )?;
        for (_, series) in all {
            for code in CODES {
                let mut set = labels(series);
                set.push(("grpc_code", go_code_name(code).to_owned()));
                let count = series.durations(code).map_or(0, DurationHistogram::count);
                family
                    .encode_family(&set)?
                    .encode_counter::<NoLabelSet, u64, u64>(&count, None)?;
            }
        }
        let name = format!("grpc_{side}_handling");
        let mut family = encoder.encode_descriptor(
            &name,
            "Duration of RPCs until completion, whatever the code",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (_, series) in all {
            let mut merged = DurationHistogram::default().buckets();
            let mut sum = 0.0;
            for histogram in &series.durations {
                histogram.add_to(&mut merged);
                sum += histogram.sum_seconds();
            }
            // Fold our buckets into Prometheus' default ones.
            let mut buckets: Vec<(f64, u64)> = DEFAULT_BUCKETS
                .iter()
                .map(|b| (*b, 0))
                .chain([(f64::INFINITY, 0)])
                .collect();
            for (bound, count) in merged {
                let into = buckets.iter_mut().find(|(b, _)| *b >= bound);
                if let Some((_, n)) = into {
                    *n += count;
                }
            }
            let count = buckets.iter().map(|(_, n)| n).sum();
            DurationHistogram::encode_buckets(
                &mut family.encode_family(&labels(series))?,
                sum,
                count,
                &buckets,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(metrics: &Metrics) -> MethodTable {
        MethodTable::server(
            metrics,
            [
                ("/demo.Echo/Say".to_owned(), Kind::Unary),
                ("/demo.Echo/Chat".to_owned(), Kind::Bidi),
            ],
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_methods_are_scraped_from_the_start_and_count_by_code() {
        let metrics = Metrics::new();
        let table = server(&metrics);
        let text = metrics.encode();
        assert!(
            text.contains(r#"rpc_server_call_duration_seconds_count{rpc_system_name="grpc",rpc_method="demo.Echo/Say",rpc_status_code="OK",error_type=""} 0"#),
            "{text}"
        );
        let mut call = table.find("/demo.Echo/Say").start();
        tokio::time::advance(Duration::from_millis(30)).await;
        call.end(Code::NotFound);
        let text = metrics.encode();
        assert!(text.contains(r#"rpc_server_call_duration_seconds_bucket{le="0.025",rpc_system_name="grpc",rpc_method="demo.Echo/Say",rpc_status_code="NOT_FOUND",error_type="NOT_FOUND"} 0"#), "{text}");
        assert!(text.contains(r#"rpc_server_call_duration_seconds_bucket{le="0.05",rpc_system_name="grpc",rpc_method="demo.Echo/Say",rpc_status_code="NOT_FOUND",error_type="NOT_FOUND"} 1"#), "{text}");
        assert!(text.contains(r#"rpc_server_calls_started_total{rpc_system_name="grpc",rpc_method="demo.Echo/Say"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"rpc_server_calls_active{rpc_system_name="grpc",rpc_method="demo.Echo/Say"} 0"#
            ),
            "{text}"
        );
        assert!(
            !text.contains("grpc_server_handled_total"),
            "compat is off by default"
        );
    }

    #[test]
    fn unknown_paths_share_one_series_and_a_dropped_call_is_cancelled() {
        let metrics = Metrics::new();
        let table = server(&metrics);
        for i in 0..1000 {
            drop(table.find(&format!("/demo.Echo/Nope{i}")).start());
        }
        let text = metrics.encode();
        assert_eq!(
            text.matches("rpc_server_calls_started_total{").count(),
            3,
            "{text}"
        );
        assert!(
            text.contains(
                r#"rpc_server_calls_started_total{rpc_system_name="grpc",rpc_method="_OTHER"} 1000"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"rpc_server_call_duration_seconds_count{rpc_system_name="grpc",rpc_method="_OTHER",rpc_status_code="CANCELLED",error_type="CANCELLED"} 1000"#), "{text}");
    }

    #[test]
    fn a_clients_methods_are_bounded_and_labelled_by_the_service_called() {
        let metrics = Metrics::new();
        let client = ClientMethods::new(&metrics, "greeter");
        for i in 0..MAX_CLIENT_METHODS + 10 {
            client
                .find(&format!("/demo.Echo/M{i}"), || Kind::Unary)
                .start()
                .end(Code::Ok);
        }
        client
            .find("not a path", || Kind::Unary)
            .start()
            .end(Code::Ok);
        let text = metrics.encode();
        assert!(text.contains(r#"rpc_client_calls_started_total{rpc_system_name="grpc",rpc_method="_OTHER",server_address="greeter"} 11"#), "{text}");
        assert_eq!(
            text.matches("rpc_client_calls_started_total{").count(),
            MAX_CLIENT_METHODS + 1
        );
    }

    #[test]
    fn the_compat_family_uses_go_names_and_every_code() {
        let metrics = Metrics::new().with_grpc_compat(true);
        let table = server(&metrics);
        table.find("/demo.Echo/Chat").start().end(Code::Unavailable);
        let text = metrics.encode();
        assert!(text.contains(r#"grpc_server_handled_total{grpc_type="bidi_stream",grpc_service="demo.Echo",grpc_method="Chat",grpc_code="Unavailable"} 1"#), "{text}");
        assert!(text.contains(r#"grpc_server_handled_total{grpc_type="unary",grpc_service="demo.Echo",grpc_method="Say",grpc_code="Canceled"} 0"#), "{text}");
        assert!(text.contains(r#"grpc_server_handling_seconds_bucket{le="0.005",grpc_type="bidi_stream",grpc_service="demo.Echo",grpc_method="Chat"} 1"#), "{text}");
        assert!(text.contains(r#"grpc_server_started_total{grpc_type="unary",grpc_service="demo.Echo",grpc_method="Say"} 0"#), "{text}");
    }
}
