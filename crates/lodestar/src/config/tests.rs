#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A key's default, as a TOML value.
fn default_value(key: &Key) -> toml::Value {
    let table: toml::Table = toml::from_str(&format!("v = {}", key.default)).unwrap();
    table["v"].clone()
}

/// Every leaf of a serialized config, by path; tables that are keys
/// themselves (labels, policies) are leaves.
fn leaves(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) if key(&path).is_none() => leaves(inner, &path, out),
            _ => out.push((path, value.clone())),
        }
    }
}

#[test]
fn every_field_of_config_has_a_key_with_its_default() {
    let serialized = toml::Table::try_from(Config::default()).unwrap();
    let mut found = Vec::new();
    leaves(&serialized, "", &mut found);
    let paths: BTreeSet<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    let table: BTreeSet<&str> = KEYS.iter().map(|k| k.path).collect();
    assert_eq!(paths, table, "Config's fields and the key table differ");
    for (path, value) in &found {
        let key = key(path).unwrap();
        if key.kind == Kind::Policy {
            // The policy's defaults are its type's; the table says "{}".
            continue;
        }
        assert_eq!(&default_value(key), value, "default of `{path}`");
    }
}

#[test]
fn every_key_parses_at_its_default_in_a_document() {
    for key in KEYS {
        let (section, name) = key.split();
        let document = if key.is_table() {
            format!("[{}]\n", key.path)
        } else {
            format!("[{section}]\n{name} = {}\n", key.default)
        };
        let config = Config::from_toml(&document)
            .unwrap_or_else(|e| panic!("`{}` at its default: {e}", key.path));
        assert_eq!(config, Config::default(), "{}", key.path);
        key.kind.check(&default_value(key)).unwrap();
    }
}

#[test]
fn the_generated_file_reads_back_as_the_defaults() {
    let text = default_toml();
    assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
    for key in KEYS {
        assert!(
            text.contains(&format!("{} = ", key.split().1)) || key.is_table(),
            "{}",
            key.path
        );
    }
}

#[test]
fn variable_names_are_unambiguous() {
    let mut seen = BTreeSet::new();
    for key in KEYS {
        for name in key
            .env()
            .into_iter()
            .chain(key.aliases.iter().map(|a| (*a).to_owned()))
        {
            assert!(seen.insert(name.clone()), "{name} sets two keys");
        }
    }
    // Variables that mean something else are never a key's.
    for other in ["LODESTAR_REGISTRY_TOKEN", "LODESTAR_BLESS"] {
        assert!(!seen.contains(other), "{other}");
    }
}

#[test]
fn docs_configuration_md_is_generated_from_the_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let generated = reference_markdown();
    if std::env::var_os("LODESTAR_BLESS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md differs from what lodestar::config::reference_markdown() \
         generates; rewrite it with `LODESTAR_BLESS=1 cargo test -p lodestar --lib config`"
    );
}

#[test]
fn a_typo_is_refused_with_its_line_and_the_key_meant() {
    let cases = [
        (
            "[service]\nname = \"a\"\nbnd = \"0.0.0.0:1\"\n",
            "unknown key `service.bnd` at line 3, column 1; did you mean `service.bind`?",
        ),
        (
            "\n\nservce.bind = \"0.0.0.0:1\"\n",
            "unknown key `servce.bind` at line 3, column 1; did you mean `service.bind`?",
        ),
        (
            "[client]\ntimeot = \"1s\"\n",
            "unknown key `client.timeot` at line 2, column 1; did you mean `client.timeout`?",
        ),
        (
            "[service.limts]\nmax_connections = 1\n",
            "unknown key `service.limts.max_connections` at line 2, column 1; did you mean \
             `service.limits.max_connections`?",
        ),
        (
            "[nothing_like_it]\nat_all = 1\n",
            "unknown key `nothing_like_it.at_all` at line 2, column 1",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(Config::from_toml(text).unwrap_err().to_string(), want);
    }
}

#[test]
fn a_file_error_names_the_file() {
    let dir = std::env::temp_dir().join(format!("lodestar-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lodestar.toml");
    std::fs::write(&path, "[service]\nname = \"a\"\nbidn = 1\n").unwrap();
    let error = Config::from_file(&path).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "unknown key `service.bidn` at {}:3:1; did you mean `service.bind`?",
            path.display()
        )
    );
    std::fs::write(&path, "x".repeat(MAX_CONFIG_FILE as usize + 1)).unwrap();
    let error = Config::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("larger than"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_values_name_the_key_the_value_and_what_was_expected() {
    let cases = [
        (
            "[service]\nttl = \"5 parsecs\"",
            "key `service.ttl` at line 2, column 7 is \"5 parsecs\": expected a duration such \
             as \"500ms\", \"2s\", \"1m\" (unknown unit (expected ns, us, ms, s, m, h or d))",
        ),
        (
            "[service]\nweight = -1",
            "key `service.weight` at line 2, column 10 is -1: expected a whole number from 0 \
             to 10000",
        ),
        (
            "[service]\nbind = \"nowhere\"",
            "key `service.bind` at line 2, column 8 is \"nowhere\": expected an address such \
             as \"127.0.0.1:50051\" (ip:port)",
        ),
        (
            "[client]\ncodec = \"xml\"",
            "key `client.codec` at line 2, column 9 is \"xml\": expected one of \"protobuf\" \
             or \"json\"",
        ),
        (
            "[client]\nprotocol = \"grpcweb\"",
            "key `client.protocol` at line 2, column 12 is \"grpcweb\": expected one of \"grpc\", \
             \"grpc-web\", \"grpc-web-text\" or \"connect\"",
        ),
        (
            "[registry]\nurl = \"consul://x\"",
            "key `registry.url` at line 2, column 7 is \"consul://x\": expected a URL \
             starting with memory://, lodestar://, lodestars://, etcd://",
        ),
        (
            "service = 3",
            "key `service` at line 1, column 11 is 3: expected a table (the section [service])",
        ),
        (
            "[metrics]\nenabled = \"yes\"",
            "key `metrics.enabled` at line 2, column 11 is \"yes\": expected true or false \
             (found string)",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(Config::from_toml(text).unwrap_err().to_string(), want);
    }
    let error = Config::from_toml("[service]\nname = \"a\"\n[service\n").unwrap_err();
    assert!(matches!(error, ConfigError::Syntax { .. }), "{error}");
    assert!(error.to_string().starts_with("line 3, column"), "{error}");
}

#[test]
fn settings_across_keys_are_checked() {
    let error = Config::from_toml("[service]\nttl = \"3s\"\nheartbeat_interval = \"3s\"")
        .unwrap_err()
        .to_string();
    assert!(error.contains("service.heartbeat_interval"), "{error}");
    assert!(error.contains("shorter than service.ttl"), "{error}");
    let error = Config::from_env(env(&[("RUST_LOG", "lodestar=loud")]))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(
            "RUST_LOG (key `telemetry.log_filter`) is \"lodestar=loud\": expected filter directives"
        ),
        "{error}"
    );
    let error = Config::from_toml("[service.tls]\ncert = \"a.pem\"")
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("key `service.tls.key` is \"\""),
        "{error}"
    );
}

#[test]
fn policies_are_checked_by_their_own_rules_with_the_field_named() {
    let error =
        Config::from_toml("[client.policy]\nstratgy = { kind = \"round_robin\" }").unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            error,
            ConfigError::Policy {
                key: "client.policy",
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.starts_with("key `client.policy` at line 1, column 9"),
        "{text}"
    );
    assert!(text.contains("stratgy"), "{text}");
    let error = Config::from_toml("[[service.policy.methods]]\nnames = [\"Greeter.SayHello\"]")
        .unwrap_err()
        .to_string();
    assert!(error.contains("methods[0].names[0]"), "{error}");
    let config = Config::from_toml(
        "[client.policy]\nstrategy = { kind = \"round_robin\" }\n\
         [[service.policy.methods]]\nnames = [\"helloworld.Greeter/*\"]",
    )
    .unwrap();
    assert_eq!(
        config.client.policy.strategy,
        crate::client::Strategy::RoundRobin
    );
    assert_eq!(config.service.policy.methods.len(), 1);
}

#[test]
fn the_environment_wins_over_the_file_and_aliases_over_nothing() {
    let dir = std::env::temp_dir().join(format!("lodestar-config-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lodestar.toml");
    std::fs::write(
        &path,
        "[service]\nname = \"file\"\nbind = \"127.0.0.1:1\"\nweight = 5\n\
         [registry]\nurl = \"lodestar://10.0.0.1:7070\"\n[client]\ntimeout = \"1s\"\n",
    )
    .unwrap();
    let config = Config::load_from(
        &path,
        env(&[
            ("LODESTAR_SERVICE_BIND", "0.0.0.0:50051"),
            ("LODESTAR_CLIENT_TIMEOUT", "250ms"),
            ("LODESTAR_REGISTRY", "memory://"),
            ("LODESTAR_SERVICE_METADATA", "team=a,note=b%20c"),
            ("LODESTAR_SERVICE_WEIGHT", ""),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(config.service.name, "file");
    assert_eq!(config.service.bind, "0.0.0.0:50051".parse().unwrap());
    assert_eq!(config.service.weight, 5, "an empty variable is unset");
    assert_eq!(config.client.timeout, Some(Duration::from_millis(250)));
    assert_eq!(config.registry.url, "memory://");
    assert_eq!(config.service.metadata["note"], "b c");
    // The key's own variable wins over its alias.
    let config = Config::load_from(
        &path,
        env(&[
            ("LODESTAR_REGISTRY", "memory://"),
            ("LODESTAR_REGISTRY_URL", "etcd://127.0.0.1:2379"),
        ]),
    )
    .unwrap();
    assert_eq!(config.registry.url, "etcd://127.0.0.1:2379");
    // No file: the defaults, then the environment.
    let config = Config::load_from(
        dir.join("absent.toml"),
        env(&[("LODESTAR_SERVICE_NAME", "x")]),
    )
    .unwrap();
    assert_eq!(config.service.name, "x");
    assert_eq!(config.service.bind, Config::default().service.bind);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_variable_is_named() {
    let cases = [
        (
            ("LODESTAR_SERVICE_TTL", "5 parsecs"),
            "LODESTAR_SERVICE_TTL (key `service.ttl`) is \"5 parsecs\": expected a duration",
        ),
        (
            ("LODESTAR_SERVICE_BIND", "nowhere"),
            "LODESTAR_SERVICE_BIND (key `service.bind`) is \"nowhere\": expected an address",
        ),
        (
            ("LODESTAR_LOG_FORMAT", "yaml"),
            "LODESTAR_LOG_FORMAT (key `telemetry.log_format`) is \"yaml\": expected one of",
        ),
        (
            ("LODESTAR_METRICS_ENABLED", "perhaps"),
            "LODESTAR_METRICS_ENABLED (key `metrics.enabled`) is \"perhaps\": expected true or false",
        ),
    ];
    for ((name, value), want) in cases {
        let error = Config::from_env(env(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(want), "{error}");
    }
}

#[test]
fn opentelemetry_variables_keep_their_meaning() {
    let config = Config::from_env(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=a"),
        ("RUST_LOG", "debug"),
    ]))
    .unwrap();
    let t = &config.telemetry;
    assert_eq!(t.otlp_endpoint, "http://collector:4318/v1/traces");
    assert_eq!(t.sampler, SamplerName::ParentbasedTraceidratio);
    assert_eq!(t.sampler_ratio, 0.25);
    assert_eq!(t.resource_attributes["team"], "a");
    assert_eq!(t.log_filter, "debug");
    let otlp = config.telemetry().unwrap().otlp_settings().unwrap();
    assert_eq!(
        otlp.sampler,
        crate::telemetry::Sampler::ParentBasedTraceIdRatio(0.25)
    );

    // gRPC: the base endpoint as it is; the traces endpoint wins.
    let config = Config::from_env(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ]))
    .unwrap();
    assert_eq!(config.telemetry.otlp_endpoint, "http://collector:4317");
    let config = Config::from_env(env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4318/traces"),
    ]))
    .unwrap();
    assert_eq!(config.telemetry.otlp_endpoint, "http://b:4318/traces");
    assert!(
        Config::default()
            .telemetry()
            .unwrap()
            .otlp_settings()
            .is_none()
    );
}

#[test]
fn suggestions_need_a_close_key() {
    assert_eq!(keys::closest("service.bnd"), Some("service.bind"));
    assert_eq!(keys::closest("servce"), Some("service"));
    assert_eq!(keys::closest("completely.different"), None);
    assert_eq!(keys::edit_distance("kitten", "sitting"), 3);
    assert_eq!(keys::edit_distance("bidn", "bind"), 1);
    assert_eq!(keys::edit_distance("", "abc"), 3);
}

#[test]
fn the_web_section_maps_onto_web_protocols_and_checks_origins() {
    let config = Config::from_toml(
        "[service]\nname = \"w\"\n[service.web]\ngrpc_web = false\n\
         websocket = false\nrest = false\nwebsocket_ping_interval = \"5s\"\nwebsocket_ping_timeout = \"2s\"\n\
         client_js = false\n\
         [service.web.cors]\nallow_origins = \"https://app.example, http://localhost:5173\"\n\
         allow_headers = \"x-tenant\"\nmax_age = \"10m\"",
    )
    .unwrap();
    assert!(!config.service.web.grpc_web);
    crate::ServiceBuilder::from_config(&config).unwrap();
    let web = super::builders::web_for_tests(&config.service.web).unwrap();
    assert!(web.connect && !web.grpc_web);
    assert_eq!(
        web.cors.allow_origins,
        ["https://app.example", "http://localhost:5173"]
    );
    assert_eq!(web.cors.allow_headers, ["x-tenant"]);
    assert_eq!(web.cors.max_age, Duration::from_secs(600));
    assert!(!web.websocket);
    assert!(!web.rest);
    assert!(crate::server::WebProtocols::default().rest);
    assert_eq!(web.websocket_ping_interval, Duration::from_secs(5));
    assert_eq!(web.websocket_ping_timeout, Duration::from_secs(2));
    assert!(crate::server::WebProtocols::default().websocket);
    assert!(!web.client_js);
    assert!(crate::server::WebProtocols::default().client_js);
    let bad = Config::from_toml(
        "[service]\nname = \"w\"\n[service.web.cors]\nallow_origins = \"app.example/path\"",
    )
    .unwrap();
    let error = crate::ServiceBuilder::from_config(&bad)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("key `service.web.cors.allow_origins` is \"app.example/path\""),
        "{error}"
    );
    let env_set = Config::from_env(env(&[("LODESTAR_SERVICE_WEB_CONNECT", "false")])).unwrap();
    assert!(!env_set.service.web.connect);
}

#[test]
fn the_client_protocol_is_read_by_name_and_reaches_the_builder() {
    let dir = std::env::temp_dir().join(format!("lodestar-config-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lodestar.toml");
    std::fs::write(&path, "[client]\nprotocol = \"connect\"\n").unwrap();
    let config = Config::load_from(&path, env(&[])).unwrap();
    assert_eq!(config.client.protocol, ClientProtocolName::Connect);
    let builder =
        crate::Client::from_config(lodestar_core::MemoryRegistry::new(), &config).unwrap();
    assert_eq!(builder.config.protocol, crate::client::Protocol::Connect);
    let config =
        Config::load_from(&path, env(&[("LODESTAR_CLIENT_PROTOCOL", "grpc-web")])).unwrap();
    assert_eq!(config.client.protocol, ClientProtocolName::GrpcWeb);
    std::fs::write(&path, "[client]\nprotocol = \"grpc-web-text\"\n").unwrap();
    let config = Config::load_from(&path, env(&[])).unwrap();
    let builder =
        crate::Client::from_config(lodestar_core::MemoryRegistry::new(), &config).unwrap();
    assert_eq!(
        builder.config.protocol,
        crate::client::Protocol::GrpcWebText
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
