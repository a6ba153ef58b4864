//! h2load (nghttp2's HTTP/2 load generator, Debian's `nghttp2-client`) as a
//! neutral load generator: neither tonic's code nor lodestar's on the
//! client side. It POSTs one request body (for native gRPC, a framed
//! message: the 5-byte frame header and the protobuf bytes, with
//! [`GRPC_HEADERS`]; for the `web` scenario, a Connect or gRPC-Web body
//! with theirs) from a file over one connection with a fixed number of
//! streams in flight, and reports requests per second; its per-request log
//! gives the latencies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{self, Latencies, Proc, Result, Sample, Settings};

/// The environment variable naming the h2load binary; without it, `h2load`
/// on the `PATH`.
const H2LOAD_ENV: &str = "LODESTAR_H2LOAD";

/// How much longer h2load measures than the window its CPU readings
/// bracket: its threads must still be alive (their CPU time readable in
/// `/proc`) at the second reading.
const TAIL: Duration = Duration::from_millis(200);

/// The h2load binary, if there is one.
pub(crate) fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(H2LOAD_ENV) {
        return Some(path.into());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("h2load"))
        .find(|path| path.is_file())
}

/// The request headers of a native gRPC call.
pub(crate) const GRPC_HEADERS: &[&str] = &["content-type: application/grpc", "te: trailers"];

/// A gRPC message as it goes on the wire: a byte saying "not compressed",
/// its length (4 bytes, big endian), and its protobuf bytes.
pub(crate) fn grpc_frame(message: &impl prost::Message) -> Result<Vec<u8>> {
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len())?;
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// One h2load run's load.
#[derive(Debug)]
pub(crate) struct Load<'a> {
    /// The h2load binary.
    pub(crate) h2load: &'a Path,
    /// `http://host:port/package.Service/Method`.
    pub(crate) url: String,
    /// The request body: one framed gRPC message ([`grpc_frame`]), or a
    /// web protocol's body.
    pub(crate) body: Vec<u8>,
    /// The request headers (`name: value`), e.g. [`GRPC_HEADERS`].
    pub(crate) headers: &'a [&'a str],
    /// Streams in flight on the one connection.
    pub(crate) streams: usize,
    /// The fewest response DATA bytes a successful call carries (its
    /// framed reply). A gRPC error comes back as HTTP 200 with trailers
    /// only, so a run whose responses carry less than this failed (and
    /// one with any status but 2xx failed too: a Connect error).
    pub(crate) min_response_bytes: u64,
}

/// Runs `load` (pinned to the client core) for the settings' warm-up and
/// measured window, and returns h2load's throughput and latencies, and
/// h2load's and `server`'s CPU time per call over the window.
pub(crate) async fn run(settings: &Settings, load: &Load<'_>, server: &Proc) -> Result<Sample> {
    let dir = std::env::temp_dir().join(format!(
        "lodestar-bench-h2load-{}",
        lodestar_tests::unique_name()
    ));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(settings, load, server, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(settings: &Settings, load: &Load<'_>, server: &Proc, dir: &Path) -> Result<Sample> {
    let body = dir.join("request.body");
    std::fs::write(&body, &load.body)?;
    let log = dir.join("requests.tsv");
    let mut args = vec![
        "--clients=1".to_owned(),
        "--threads=1".to_owned(),
        format!("--max-concurrent-streams={}", load.streams),
        format!("--warm-up-time={}ms", settings.warmup.as_millis()),
        format!("--duration={}ms", (settings.duration + TAIL).as_millis()),
        format!("--data={}", body.display()),
        format!("--log-file={}", log.display()),
    ];
    args.extend(load.headers.iter().map(|h| format!("--header={h}")));
    args.push(load.url.clone());
    let mut h2load = Proc::spawn("h2load", settings.client_cpu(), load.h2load, &args)?;
    // h2load connects (a millisecond on loopback), warms up, then measures
    // for the window and the tail: the CPU readings bracket the window.
    tokio::time::sleep(settings.warmup).await;
    let server_from = server.cpu_time()?;
    let client_from = h2load.cpu_time()?;
    tokio::time::sleep(settings.duration).await;
    let server_to = server.cpu_time()?;
    let client_to = h2load.cpu_time()?;
    let client_rss = h2load.peak_rss()?;
    let patience = TAIL + Duration::from_secs(20);
    let summary = Summary::parse(&h2load.output(patience).await?)?;
    summary.check(load)?;
    // The log holds the measured window's requests only.
    let mut latencies = read_log(&std::fs::read_to_string(&log)?)?;
    if latencies.len() == 0 {
        return Err("h2load logged no successful request".into());
    }
    // Calls in the window the CPU readings bracket, at h2load's rate.
    let calls = summary.per_second * settings.duration.as_secs_f64();
    let per_call = |from: Duration, to: Duration| (to - from).as_secs_f64() * 1e6 / calls;
    let mut sample = Sample::default();
    sample
        .set(harness::THROUGHPUT, summary.per_second)
        .latencies(&mut latencies)
        .set(harness::CLIENT_CPU, per_call(client_from, client_to))
        .set(harness::CLIENT_RSS, harness::mib(client_rss))
        .set(harness::SERVER_CPU, per_call(server_from, server_to))
        .set(harness::SERVER_RSS, harness::mib(server.peak_rss()?));
    Ok(sample)
}

/// What h2load's report says about the measured window.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    /// Requests per second.
    per_second: f64,
    /// Requests that got a 2xx answer.
    succeeded: u64,
    /// Requests that failed, errored or timed out.
    failed: u64,
    /// Response DATA bytes.
    data_bytes: u64,
    /// Responses with an HTTP status other than 2xx.
    not_2xx: u64,
}

impl Summary {
    /// Reads h2load's text report (`finished in …, N req/s, …`,
    /// `requests: …`, `traffic: …`).
    fn parse(report: &str) -> Result<Summary> {
        let line = |prefix: &str| {
            report
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .ok_or_else(|| format!("no `{prefix}` line in h2load's report:\n{report}"))
        };
        // `finished in 3.00s, 81312.00 req/s, 2.79MB/s`
        let per_second = line("finished in")?
            .split(", ")
            .find_map(|item| item.strip_suffix(" req/s"))
            .ok_or("h2load: no req/s")?
            .parse::<f64>()?;
        // `requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, 0 timeout`
        let requests = line("requests:")?;
        let count = |word: &str| -> Result<u64> {
            requests
                .split(',')
                .find_map(|item| item.trim().strip_suffix(word))
                .ok_or_else(|| format!("h2load: no `{word}` count in `{requests}`"))?
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("h2load: `{word}` count in `{requests}`: {e}").into())
        };
        let succeeded = count(" succeeded")?;
        let failed = count(" failed")? + count(" errored")? + count(" timeout")?;
        // `traffic: 5.58MB (5854536) total, 748.10KB (766058) headers (…), 1.22MB (1276590) data`
        let traffic = line("traffic:")?;
        let data_bytes = traffic
            .split(", ")
            .find_map(|item| item.strip_suffix(" data"))
            .and_then(|item| item.split_once('(')?.1.split_once(')'))
            .map(|(bytes, _)| bytes)
            .ok_or_else(|| format!("h2load: no data bytes in `{traffic}`"))?
            .parse::<u64>()?;
        // `status codes: 162624 2xx, 0 3xx, 0 4xx, 0 5xx`
        let statuses = line("status codes:")?;
        let mut not_2xx = 0;
        for item in statuses.split(',') {
            let (count, class) = item
                .trim()
                .split_once(' ')
                .ok_or_else(|| format!("h2load: unexpected status counts `{statuses}`"))?;
            if class != "2xx" {
                not_2xx += count.parse::<u64>()?;
            }
        }
        Ok(Summary {
            per_second,
            succeeded,
            failed,
            data_bytes,
            not_2xx,
        })
    }

    /// Every request succeeded, and with a real answer, not a gRPC error.
    fn check(&self, load: &Load<'_>) -> Result<()> {
        if self.not_2xx > 0 {
            return Err(format!(
                "h2load: {} responses with a status other than 2xx (of {})",
                self.not_2xx, self.succeeded
            )
            .into());
        }
        if self.failed > 0 || self.succeeded == 0 {
            return Err(format!(
                "h2load: {} requests failed, {} succeeded",
                self.failed, self.succeeded
            )
            .into());
        }
        let expected = self.succeeded * load.min_response_bytes;
        if self.data_bytes < expected {
            return Err(format!(
                "h2load: {} response bytes for {} calls, expected at least {expected}: the server answered with gRPC errors",
                self.data_bytes, self.succeeded
            )
            .into());
        }
        Ok(())
    }
}

/// The latencies of the successful requests in h2load's log (one line per
/// request: start time in µs since the epoch, HTTP status, µs until the
/// end of the response).
fn read_log(log: &str) -> Result<Latencies> {
    let mut latencies = Latencies::default();
    for line in log.lines().filter(|l| !l.is_empty()) {
        let mut columns = line.split('\t').skip(1);
        let (Some(status), Some(micros)) = (columns.next(), columns.next()) else {
            return Err(format!("h2load log: unexpected line `{line}`").into());
        };
        if status.starts_with('2') {
            latencies.record(Duration::from_micros(micros.trim().parse()?));
        }
    }
    Ok(latencies)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    const REPORT: &str = "starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 1s of warm-up time and 2s of main duration for measurements.
Application protocol: h2c

finished in 3.00s, 81312.00 req/s, 2.79MB/s
requests: 162624 total, 162624 started, 162624 done, 162620 succeeded, 3 failed, 1 errored, 0 timeout
status codes: 162624 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 5.58MB (5854536) total, 748.10KB (766058) headers (space savings 95.77%), 1.22MB (1276590) data
                     min         max         mean         sd        +/- sd
time for request:       43us      5.06ms       360us       145us    87.35%
";

    fn load(min_response_bytes: u64) -> Load<'static> {
        Load {
            h2load: Path::new("h2load"),
            url: String::new(),
            body: Vec::new(),
            headers: GRPC_HEADERS,
            streams: 32,
            min_response_bytes,
        }
    }

    #[test]
    fn the_report_is_read() {
        let summary = Summary::parse(REPORT).expect("a report");
        assert_eq!(
            summary,
            Summary {
                per_second: 81312.0,
                succeeded: 162620,
                failed: 4,
                data_bytes: 1276590,
                not_2xx: 0,
            }
        );
        assert!(Summary::parse("finished in 3.00s, 10.00 req/s\n").is_err());
    }

    #[test]
    fn failures_and_grpc_errors_fail_the_run() {
        let failed = Summary::parse(REPORT).expect("a report");
        assert!(failed.check(&load(5)).is_err());
        let ok = Summary {
            failed: 0,
            ..failed
        };
        assert!(ok.check(&load(5)).is_ok());
        // Trailers-only answers carry no DATA: fewer bytes than replies.
        assert!(ok.check(&load(1029)).is_err());
        // A Connect error is a 4xx or 5xx with a body.
        let refused = Summary { not_2xx: 1, ..ok };
        assert!(refused.check(&load(5)).is_err());
    }

    #[test]
    fn the_log_gives_latencies_of_successes() {
        let mut latencies =
            read_log("1796418174047754\t200\t304\n1796418174047748\t200\t353\n1\t503\t9000\n")
                .expect("a log");
        assert_eq!(latencies.len(), 2);
        assert_eq!(latencies.max_us(), 353.0);
        assert_eq!(latencies.percentiles_us()[0], 304.0);
        assert!(read_log("garbage\n").is_err());
    }

    #[test]
    fn a_grpc_frame_is_header_then_message() {
        let frame = grpc_frame(&crate::rpc::raw::Payload { body: vec![7; 3] }).expect("frame");
        assert_eq!(frame, [0, 0, 0, 0, 5, 0x0a, 3, 7, 7, 7]);
    }
}
