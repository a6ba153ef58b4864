//! What telemetry is configured to do, read from the environment (the
//! standard `OTEL_*` variables, `RUST_LOG`, `LODESTAR_LOG_FORMAT`) or set by
//! [`Telemetry`](super::Telemetry)'s methods. Pure: parsing reads variables
//! through a lookup function, so it is tested without touching the process
//! environment.

use super::TelemetryError;

/// `RUST_LOG`: which events are logged. Default [`DEFAULT_LOG_FILTER`].
pub const RUST_LOG: &str = "RUST_LOG";
/// `LODESTAR_LOG_FORMAT`: `text` (the default) or `json`.
pub const LODESTAR_LOG_FORMAT: &str = "LODESTAR_LOG_FORMAT";
/// The OTLP endpoint of every signal; for HTTP, `/v1/traces` is appended.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The OTLP endpoint of traces, used verbatim; wins over
/// [`OTEL_EXPORTER_OTLP_ENDPOINT`].
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `grpc` or `http/protobuf` (the default, as the specification says).
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// The protocol of traces; wins over [`OTEL_EXPORTER_OTLP_PROTOCOL`].
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// The `service.name` of exported spans.
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// More resource attributes: `key=value,key=value` (values percent-encoded).
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// The sampler; default `parentbased_always_on`.
pub const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
/// The ratio of the `*traceidratio` samplers; default 1.0.
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

/// The log filter when `RUST_LOG` is not set: `info`.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Reads `text` or `json` (the values of [`LODESTAR_LOG_FORMAT`]).
    pub fn parse(value: &str) -> Result<Self, TelemetryError> {
        match value.trim() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(TelemetryError::setting(
                LODESTAR_LOG_FORMAT,
                other,
                "expected `text` or `json`",
            )),
        }
    }
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OTLP over gRPC (usually port 4317).
    Grpc,
    /// OTLP over HTTP, protobuf bodies, `POST /v1/traces` (usually port
    /// 4318): the specification's default.
    #[default]
    HttpProtobuf,
}

impl Protocol {
    /// Reads `grpc` or `http/protobuf`; `variable` is named in the error.
    fn parse(variable: &'static str, value: &str) -> Result<Self, TelemetryError> {
        match value.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Err(TelemetryError::setting(
                variable,
                value,
                "OTLP/JSON is not supported; use `http/protobuf` or `grpc`",
            )),
            other => Err(TelemetryError::setting(
                variable,
                other,
                "expected `grpc` or `http/protobuf`",
            )),
        }
    }
}

/// Which traces are recorded and exported.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This fraction of traces (0.0 to 1.0), by trace id.
    TraceIdRatio(f64),
    /// As the caller decided (the `traceparent`'s sampled flag); a trace
    /// that starts here is sampled. The default.
    #[default]
    ParentBasedAlwaysOn,
    /// As the caller decided; a trace that starts here is not sampled.
    ParentBasedAlwaysOff,
    /// As the caller decided; this fraction of the traces that start here.
    ParentBasedTraceIdRatio(f64),
}

impl Sampler {
    /// Reads the values of [`OTEL_TRACES_SAMPLER`] and
    /// [`OTEL_TRACES_SAMPLER_ARG`] (the ratio, default 1.0).
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, TelemetryError> {
        let ratio = || -> Result<f64, TelemetryError> {
            let Some(arg) = arg else { return Ok(1.0) };
            match arg.trim().parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(TelemetryError::setting(
                    OTEL_TRACES_SAMPLER_ARG,
                    arg,
                    "expected a ratio from 0.0 to 1.0",
                )),
            }
        };
        match name.trim() {
            "always_on" => Ok(Self::AlwaysOn),
            "always_off" => Ok(Self::AlwaysOff),
            "traceidratio" => Ok(Self::TraceIdRatio(ratio()?)),
            "parentbased_always_on" => Ok(Self::ParentBasedAlwaysOn),
            "parentbased_always_off" => Ok(Self::ParentBasedAlwaysOff),
            "parentbased_traceidratio" => Ok(Self::ParentBasedTraceIdRatio(ratio()?)),
            other => Err(TelemetryError::setting(
                OTEL_TRACES_SAMPLER,
                other,
                "expected always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio",
            )),
        }
    }
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Otlp {
    /// The URL spans are sent to: for HTTP, the full URL of `/v1/traces`;
    /// for gRPC, the collector's address (`http://host:4317`).
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: Protocol,
    /// `service.name`, if set; else the service's own name, else
    /// `unknown_service`.
    pub service_name: Option<String>,
    /// More resource attributes.
    pub resource: Vec<(String, String)>,
    /// Which traces are recorded.
    pub sampler: Sampler,
}

/// Everything telemetry is configured with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// An `EnvFilter` directive string.
    pub(crate) log_filter: String,
    pub(crate) log_format: LogFormat,
    /// `None`: no span is made or exported.
    pub(crate) otlp: Option<Otlp>,
}

impl Settings {
    /// Reads the settings from variables that `var` looks up (an empty
    /// value counts as unset).
    pub(crate) fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let log_format = match var(LODESTAR_LOG_FORMAT) {
            Some(value) => LogFormat::parse(&value)?,
            None => LogFormat::Text,
        };
        Ok(Self {
            log_filter: var(RUST_LOG).unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
            log_format,
            otlp: Otlp::from_lookup(var)?,
        })
    }
}

impl Otlp {
    /// The OTLP settings the variables describe, or `None` if no endpoint
    /// is set.
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        let protocol = match (
            var(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL),
            var(OTEL_EXPORTER_OTLP_PROTOCOL),
        ) {
            (Some(value), _) => Protocol::parse(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, &value)?,
            (None, Some(value)) => Protocol::parse(OTEL_EXPORTER_OTLP_PROTOCOL, &value)?,
            (None, None) => Protocol::default(),
        };
        let endpoint = match (
            var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT),
            var(OTEL_EXPORTER_OTLP_ENDPOINT),
        ) {
            (Some(traces), _) => traces.trim().to_owned(),
            (None, Some(base)) => signal_endpoint(base.trim(), protocol),
            (None, None) => return Ok(None),
        };
        let resource = match var(OTEL_RESOURCE_ATTRIBUTES) {
            Some(value) => parse_resource(&value)?,
            None => Vec::new(),
        };
        let sampler = match var(OTEL_TRACES_SAMPLER) {
            Some(name) => Sampler::parse(&name, var(OTEL_TRACES_SAMPLER_ARG).as_deref())?,
            None => Sampler::default(),
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            service_name: var(OTEL_SERVICE_NAME).map(|s| s.trim().to_owned()),
            resource,
            sampler,
        }))
    }
}

/// The traces endpoint under `base`, the endpoint of every signal: for
/// HTTP, `base` with `/v1/traces` appended; for gRPC, `base` itself.
pub(crate) fn signal_endpoint(base: &str, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => base.to_owned(),
        Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
    }
}

/// Reads `key=value,key=value` (values percent-encoded, as the
/// specification says).
fn parse_resource(value: &str) -> Result<Vec<(String, String)>, TelemetryError> {
    value
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, raw) = pair.split_once('=').ok_or_else(|| {
                TelemetryError::setting(OTEL_RESOURCE_ATTRIBUTES, pair, "expected `key=value`")
            })?;
            let key = key.trim();
            if key.is_empty() {
                return Err(TelemetryError::setting(
                    OTEL_RESOURCE_ATTRIBUTES,
                    pair,
                    "the key is empty",
                ));
            }
            let decoded = percent_decode(raw.trim()).ok_or_else(|| {
                TelemetryError::setting(
                    OTEL_RESOURCE_ATTRIBUTES,
                    pair,
                    "the value's percent-encoding is not valid UTF-8",
                )
            })?;
            Ok((key.to_owned(), decoded))
        })
        .collect()
}

/// `%XX` escapes decoded; `None` if the result is not UTF-8. A `%` not
/// followed by two hex digits stays as it is.
pub(crate) fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    fn otlp(vars: &[(&str, &str)]) -> Otlp {
        settings(vars).unwrap().otlp.unwrap()
    }

    #[test]
    fn nothing_set_means_info_text_logs_and_no_spans() {
        let settings = settings(&[]).unwrap();
        assert_eq!(settings.log_filter, "info");
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings.otlp, None);
        // Empty values count as unset.
        let settings = self::settings(&[(OTEL_EXPORTER_OTLP_ENDPOINT, " "), (RUST_LOG, "")]);
        assert_eq!(settings.unwrap().otlp, None);
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        let json = settings(&[(LODESTAR_LOG_FORMAT, "json"), (RUST_LOG, "debug")]).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        assert_eq!(json.log_filter, "debug");
        let error = settings(&[(LODESTAR_LOG_FORMAT, "yaml")]).unwrap_err();
        assert!(error.to_string().contains("LODESTAR_LOG_FORMAT"), "{error}");
        assert!(error.to_string().contains("yaml"), "{error}");
    }

    #[test]
    fn the_protocol_defaults_to_http_protobuf() {
        let http = otlp(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318")]);
        assert_eq!(http.protocol, Protocol::HttpProtobuf);
        let grpc = otlp(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
        ]);
        assert_eq!(grpc.protocol, Protocol::Grpc);
        // The traces' own protocol wins.
        let traces = otlp(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf"),
            (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "grpc"),
        ]);
        assert_eq!(traces.protocol, Protocol::Grpc);
        for bad in ["http/json", "thrift"] {
            let error = settings(&[
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
                (OTEL_EXPORTER_OTLP_PROTOCOL, bad),
            ])
            .unwrap_err();
            assert!(error.to_string().contains(bad), "{error}");
            assert!(error.to_string().contains(OTEL_EXPORTER_OTLP_PROTOCOL));
        }
    }

    #[test]
    fn http_appends_the_traces_path_to_the_base_endpoint_only() {
        let base = otlp(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318")]);
        assert_eq!(base.endpoint, "http://c:4318/v1/traces");
        let slash = otlp(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318/otlp/")]);
        assert_eq!(slash.endpoint, "http://c:4318/otlp/v1/traces");
        // The traces endpoint is used verbatim, and wins.
        let verbatim = otlp(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://t:9999/custom"),
        ]);
        assert_eq!(verbatim.endpoint, "http://t:9999/custom");
        // gRPC has no path to append.
        let grpc = otlp(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
        ]);
        assert_eq!(grpc.endpoint, "http://c:4317");
    }

    #[test]
    fn the_sampler_defaults_to_parent_based_always_on() {
        let endpoint = (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318");
        assert_eq!(otlp(&[endpoint]).sampler, Sampler::ParentBasedAlwaysOn);
        let ratio = otlp(&[
            endpoint,
            (OTEL_TRACES_SAMPLER, "parentbased_traceidratio"),
            (OTEL_TRACES_SAMPLER_ARG, "0.25"),
        ]);
        assert_eq!(ratio.sampler, Sampler::ParentBasedTraceIdRatio(0.25));
        let no_arg = otlp(&[endpoint, (OTEL_TRACES_SAMPLER, "traceidratio")]);
        assert_eq!(no_arg.sampler, Sampler::TraceIdRatio(1.0));
        let off = otlp(&[endpoint, (OTEL_TRACES_SAMPLER, "always_off")]);
        assert_eq!(off.sampler, Sampler::AlwaysOff);
        for (name, arg, named) in [
            ("sometimes", "1", OTEL_TRACES_SAMPLER),
            ("traceidratio", "1.5", OTEL_TRACES_SAMPLER_ARG),
            ("traceidratio", "half", OTEL_TRACES_SAMPLER_ARG),
        ] {
            let error = settings(&[
                endpoint,
                (OTEL_TRACES_SAMPLER, name),
                (OTEL_TRACES_SAMPLER_ARG, arg),
            ])
            .unwrap_err();
            assert!(error.to_string().contains(named), "{error}");
        }
    }

    #[test]
    fn service_name_and_resource_attributes() {
        let otlp = otlp(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_SERVICE_NAME, "orders"),
            (
                OTEL_RESOURCE_ATTRIBUTES,
                "deployment.environment=prod, team=a%2Cb,",
            ),
        ]);
        assert_eq!(otlp.service_name.as_deref(), Some("orders"));
        assert_eq!(
            otlp.resource,
            [
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "a,b".to_owned())
            ]
        );
        let error = settings(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_RESOURCE_ATTRIBUTES, "novalue"),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("novalue"), "{error}");
    }
}
