//! The interop client and server binaries against each other, as real processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(extra: &[&str]) -> (Server, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lodestar-interop-server"))
        .args(["--port", "0", "--host", "127.0.0.1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start lodestar-interop-server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server announces its address");
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (server, port)
}

fn run_client(port: u16, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lodestar-interop-client"))
        .args([
            "--server_host",
            "127.0.0.1",
            "--server_port",
            &port.to_string(),
            "--test_case",
            "all",
        ])
        .args(extra)
        .output()
        .expect("run lodestar-interop-client");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "interop client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn assert_all_passed(stdout: &str, how: &str) {
    for case in lodestar_interop::CASES {
        assert!(
            stdout.contains(&format!("PASS {case}\n")),
            "{case} did not pass {how}:\n{stdout}"
        );
    }
}

#[test]
fn every_case_passes_between_lodestar_client_and_server_in_plaintext() {
    let (_server, port) = start_server(&[]);
    assert_all_passed(&run_client(port, &[]), "in plaintext");
}

#[test]
fn every_case_passes_between_lodestar_client_and_server_over_tls() {
    let (_server, port) = start_server(&["--use_tls=true"]);
    let stdout = run_client(
        port,
        &[
            "--use_tls=true",
            "--use_test_ca=true",
            "--server_host_override=foo.test.google.fr",
        ],
    );
    assert_all_passed(&stdout, "over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_absurd_response_sizes_before_allocating_them() {
    use lodestar::{Code, MemoryRegistry, Service};
    use lodestar_interop::pb::test_service_client::TestServiceClient;
    use lodestar_interop::pb::{ResponseParameters, SimpleRequest, StreamingOutputCallRequest};
    use lodestar_interop::{InteropServer, SERVICE_NAME, TestServiceServer};

    async fn bounded<F: std::future::Future>(future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("an answer in time")
    }
    let registry = MemoryRegistry::new();
    let running = Service::builder(SERVICE_NAME)
        .registry(registry.clone())
        .add_service(TestServiceServer::new(InteropServer))
        .start()
        .await
        .unwrap();
    let client = lodestar::Client::new(registry);
    let mut test = TestServiceClient::by_name(&client, SERVICE_NAME);
    let unary = |response_size| SimpleRequest {
        response_size,
        ..SimpleRequest::default()
    };
    // 2 GiB asked for in a few bytes.
    let status = bounded(test.unary_call(unary(i32::MAX))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("response size 2147483647 is over this server's limit"),
        "{status:?}"
    );
    let status = bounded(test.unary_call(unary(-1))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Streams too, after the messages before.
    let sizes = [10, 64 * 1024 * 1024];
    let request = StreamingOutputCallRequest {
        response_parameters: sizes
            .iter()
            .map(|&size| ResponseParameters {
                size,
                ..ResponseParameters::default()
            })
            .collect(),
        ..StreamingOutputCallRequest::default()
    };
    let mut stream = bounded(test.streaming_output_call(request))
        .await
        .unwrap()
        .into_inner();
    let first = bounded(stream.message()).await.unwrap().unwrap();
    assert_eq!(first.payload.unwrap().body.len(), 10);
    let status = bounded(stream.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("response size"), "{status:?}");
    // The largest allowed size is served.
    let reply = bounded(test.unary_call(unary(
        i32::try_from(lodestar_interop::MAX_RESPONSE_SIZE - 16).unwrap(),
    )))
    .await
    .unwrap();
    assert_eq!(
        reply.into_inner().payload.unwrap().body.len(),
        lodestar_interop::MAX_RESPONSE_SIZE - 16
    );
    running.shutdown().await.unwrap();
}
