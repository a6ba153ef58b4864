//! `lodestar.toml`: `lodestar config check` and `lodestar config defaults`
//! as real processes, and services and clients built from a config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use lodestar::config::{Config, ConfigError};
use lodestar::{Client, Code, Registry, ServiceBuilder, ServiceKey};
use lodestar_tests::{EchoClient, EchoServer, World, bounded, sleep_request};

/// A directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("lodestar-config-{}", lodestar_tests::unique_name()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `lodestar config ARGS…` with only the variables given (and `PATH`).
fn lodestar_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lodestar"));
    command.arg("config").args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command.envs(env.iter().copied());
    lodestar_tests::run_bounded(command, Duration::from_secs(20))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const TYPO: &str = "[service]\nname = \"orders\"\nbnd = \"0.0.0.0:50051\"\n";

#[test]
fn a_typo_is_refused_with_the_line_and_the_key_meant() {
    let dir = TempDir::new();
    let path = dir.write("lodestar.toml", TYPO);
    let want = format!(
        "unknown key `service.bnd` at {}:3:1; did you mean `service.bind`?",
        path.display()
    );
    // The library.
    assert_eq!(Config::from_file(&path).unwrap_err().to_string(), want);
    // The command.
    let output = lodestar_config(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        text(&output.stderr).contains(&want),
        "{}",
        text(&output.stderr)
    );
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
}

#[test]
fn config_check_says_ok_and_reads_the_environment_over_the_file() {
    let dir = TempDir::new();
    let path = dir.write(
        "lodestar.toml",
        "[service]\nname = \"orders\"\nttl = \"6s\"\n[registry]\nurl = \"memory://\"\n",
    );
    let file = path.to_str().unwrap();
    let output = lodestar_config(&["check", file], &[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(text(&output.stdout), format!("{file}: ok\n"));

    // A bad variable is named; --no-env leaves it out.
    let bad = [("LODESTAR_SERVICE_HEARTBEAT_INTERVAL", "soon")];
    let output = lodestar_config(&["check", file], &bad);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(
            "LODESTAR_SERVICE_HEARTBEAT_INTERVAL (key `service.heartbeat_interval`) is \"soon\""
        ),
        "{stderr}"
    );
    let output = lodestar_config(&["check", "--no-env", file], &bad);
    assert_eq!(output.status.code(), Some(0), "{output:?}");

    // The environment wins over the file: a heartbeat as long as the
    // file's TTL is refused, whatever the file says.
    let output = lodestar_config(&["check", file], &[("LODESTAR_SERVICE_TTL", "1s")]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let output = lodestar_config(
        &["check", file],
        &[
            ("LODESTAR_SERVICE_TTL", "1s"),
            ("LODESTAR_SERVICE_HEARTBEAT_INTERVAL", "2s"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("shorter than service.ttl (\"1s\")"));

    // A variable with a typo is read by nothing, and said so.
    let output = lodestar_config(&["check", file], &[("LODESTAR_SERVICE_BND", "0.0.0.0:1")]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        text(&output.stderr).contains(
            "warning: no key reads LODESTAR_SERVICE_BND; did you mean LODESTAR_SERVICE_BIND?"
        ),
        "{}",
        text(&output.stderr)
    );

    // No such file.
    let output = lodestar_config(&["check", "no-such-file.toml"], &[]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("no-such-file.toml"));
}

#[test]
fn config_defaults_prints_every_key_at_its_default() {
    let output = lodestar_config(&["defaults"], &[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let printed = text(&output.stdout);
    assert_eq!(printed, lodestar::config::default_toml());
    assert_eq!(Config::from_toml(&printed).unwrap(), Config::default());
    for key in lodestar::config::KEYS {
        if let Some(env) = key.env() {
            assert!(printed.contains(&env), "{} has no {env}", key.path);
        }
    }
    // And it checks.
    let dir = TempDir::new();
    let path = dir.write("lodestar.toml", &printed);
    let output = lodestar_config(&["check", "--no-env", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

#[test]
fn bad_values_name_the_key_the_value_and_the_expectation() {
    for (text, key, value, expected) in [
        (
            "[service]\nttl = \"5 parsecs\"",
            "service.ttl",
            "\"5 parsecs\"",
            "a duration",
        ),
        (
            "[service]\nweight = -1",
            "service.weight",
            "-1",
            "from 0 to 10000",
        ),
        (
            "[service]\nbind = \"nowhere\"",
            "service.bind",
            "\"nowhere\"",
            "ip:port",
        ),
    ] {
        match Config::from_toml(text).unwrap_err() {
            ConfigError::Invalid {
                key: k,
                value: v,
                expected: e,
                origin: Some(_),
            } => {
                assert_eq!((k.as_str(), v.as_str()), (key, value));
                assert!(e.contains(expected), "{e}");
            }
            other => panic!("{text}: {other}"),
        }
    }
}

fn config(text: &str) -> Config {
    Config::from_toml(text).unwrap()
}

#[tokio::test]
async fn a_service_from_config_registers_what_the_file_says() {
    let world = World::new();
    let name = lodestar_tests::unique_name();
    let config = config(&format!(
        "[service]\nname = \"{name}\"\nversion = \"2.1.0\"\nbind = \"127.0.0.1:0\"\n\
         weight = 7\nzone = \"eu-1\"\nid = \"{name}-a\"\nadmin = \"off\"\nttl = \"3s\"\n\
         [service.metadata]\nteam = \"payments\"\ncanary = \"true\"\n\
         [telemetry]\ninstall = false\n"
    ));
    let running = bounded(
        "a service from its config to start",
        ServiceBuilder::from_config(&config)
            .unwrap()
            .registry(world.registry.clone())
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap();
    let instances = world
        .registry
        .instances(&ServiceKey::new(name.as_str()))
        .await
        .unwrap();
    assert_eq!(instances.len(), 1, "{instances:?}");
    let instance = &instances[0];
    assert_eq!(instance.version, "2.1.0");
    assert_eq!(instance.weight, 7);
    assert_eq!(instance.zone, "eu-1");
    assert_eq!(instance.id, format!("{name}-a"));
    assert_eq!(
        instance.metadata.get("team").map(String::as_str),
        Some("payments")
    );
    assert_eq!(
        instance.metadata.get("canary").map(String::as_str),
        Some("true")
    );
    let port = running.local_addr().port();
    assert_ne!(port, 0);
    assert_eq!(instance.address, format!("127.0.0.1:{port}"));
    assert_eq!(running.admin_addr(), None, "admin = \"off\"");
    bounded("shutdown", running.shutdown()).await.unwrap();
}

#[tokio::test]
async fn a_client_from_config_times_out_as_configured() {
    let world = World::new();
    let name = lodestar_tests::unique_name();
    let running = world.start(&name, "slow").await;
    let config = config("[client]\ntimeout = \"200ms\"\n");
    let client = Client::from_config(world.registry.clone(), &config)
        .unwrap()
        .build();
    let mut echo = EchoClient::by_name(&client, &name);
    let started = std::time::Instant::now();
    let status = bounded(
        "a call to time out",
        echo.sleep(sleep_request("t", Duration::from_secs(5))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The default: no deadline, so the same call (shorter) succeeds.
    let client = Client::from_config(world.registry.clone(), &Config::default())
        .unwrap()
        .build();
    let mut echo = EchoClient::by_name(&client, &name);
    bounded(
        "a call without a deadline",
        echo.sleep(sleep_request("u", Duration::from_millis(300))),
    )
    .await
    .unwrap();
    bounded("shutdown", running.shutdown()).await.unwrap();
}

#[test]
fn the_environment_overrides_the_file_when_loading() {
    let dir = TempDir::new();
    let path = dir.write(
        "lodestar.toml",
        "[service]\nname = \"orders\"\nbind = \"127.0.0.1:1\"\n[client]\ntimeout = \"1s\"\n",
    );
    let env = |vars: &[(&str, &str)]| -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let config = Config::load_from(
        &path,
        env(&[
            ("LODESTAR_SERVICE_BIND", "127.0.0.1:2"),
            ("LODESTAR_CLIENT_TIMEOUT", "3s"),
            ("LODESTAR_REGISTRY", "lodestar://127.0.0.1:7070"),
        ]),
    )
    .unwrap();
    assert_eq!(config.service.name, "orders");
    assert_eq!(config.service.bind.port(), 2);
    assert_eq!(config.client.timeout, Some(Duration::from_secs(3)));
    assert_eq!(config.registry.url, "lodestar://127.0.0.1:7070");
    assert!(Path::new(&path).exists());
}

#[tokio::test]
async fn tls_from_config_serves_and_calls_with_mutual_tls() {
    let dir = TempDir::new();
    let pki = lodestar::tls::DevPki::generate(&["localhost", "127.0.0.1"], 1).unwrap();
    pki.write_to(&dir.0).unwrap();
    let file = |name: &str| dir.0.join(name).display().to_string();
    let world = World::new();
    let name = lodestar_tests::unique_name();
    let config = config(&format!(
        "[service]\nname = \"{name}\"\nadmin = \"off\"\n\
         [service.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [client.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [telemetry]\ninstall = false\n",
        file("server.pem"),
        file("server.key"),
        file("ca.pem"),
        file("ca.pem"),
        file("client.pem"),
        file("client.key"),
    ));
    let running = bounded(
        "a TLS service from its config to start",
        ServiceBuilder::from_config(&config)
            .unwrap()
            .registry(world.registry.clone())
            .add_service(EchoServer::new(world.echo("tls")))
            .start(),
    )
    .await
    .unwrap();
    let client = Client::from_config(world.registry.clone(), &config)
        .unwrap()
        .build();
    let mut echo = EchoClient::by_name(&client, &name);
    let request = lodestar_tests::EchoRequest {
        message: "over TLS".to_owned(),
        ..Default::default()
    };
    let reply = bounded("a call over mutual TLS", echo.unary(request.clone()))
        .await
        .unwrap();
    assert!(reply.into_inner().message.contains("over TLS"));

    // Without its certificate, the client is refused.
    let mut anonymous = config.clone();
    anonymous.client.tls.cert = PathBuf::new();
    anonymous.client.tls.key = PathBuf::new();
    let client = Client::from_config(world.registry.clone(), &anonymous)
        .unwrap()
        .max_attempts(1)
        .build();
    let mut echo = EchoClient::by_name(&client, &name);
    let status = bounded("a call without a client certificate", echo.unary(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    bounded("shutdown", running.shutdown()).await.unwrap();

    // A file that cannot be read names its key and path.
    let mut missing = config.clone();
    missing.service.tls.cert = dir.0.join("nope.pem");
    let error = ServiceBuilder::from_config(&missing)
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("key `service.tls.cert` is \""), "{error}");
    assert!(error.contains("nope.pem"), "{error}");
}
