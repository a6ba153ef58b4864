//! `/_lodestar/client.js` in a real browser (headless Chromium, see
//! `lodestar_tests::browser`) against the Echo service, which serves the
//! test page (`browser/client_api.html`) as an asset: every call kind,
//! headers, errors with their metadata, deadlines over `fetch` and the
//! WebSocket, aborts and cancels.

use lodestar::server::WebProtocols;
use lodestar_tests::browser::{drive, tools};
use lodestar_tests::*;
use serde_json::{Value, json};

const PAGE: &[u8] = include_bytes!("../../browser/client_api.html");

/// The error a check ended with.
fn error<'a>(results: &'a Value, check: &str) -> &'a Value {
    let error = &results[check]["error"];
    assert!(error.is_object(), "{check} must fail: {results:#}");
    assert_eq!(
        error["isLodestarError"], true,
        "{check} fails with a LodestarError: {results:#}"
    );
    error
}

/// The value a check succeeded with.
fn ok<'a>(results: &'a Value, check: &str) -> &'a Value {
    let ok = &results[check];
    assert!(ok.get("ok").is_some(), "{check} must succeed: {results:#}");
    &ok["ok"]
}

/// A deadline the handler saw: set, and no more than the 5 s asked.
fn saw_deadline(report: &Value) {
    assert_eq!(report["hasDeadline"], true, "{report}");
    let remaining = report["remainingMs"].as_i64().unwrap();
    assert!((1..=5000).contains(&remaining), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_makes_every_call_kind_with_headers_errors_deadlines_and_aborts() {
    let Some(tools) = tools() else { return };
    let world = World::new();
    let web = WebProtocols::default()
        .asset("/", "text/html; charset=utf-8", PAGE)
        .unwrap();
    let running = bounded(
        "an instance to start",
        world
            .builder("echo", "a")
            .web(web)
            .add_service(EchoServer::new(world.echo("a")))
            .start(),
    )
    .await
    .unwrap();
    let url = format!("http://{}/", running.local_addr());
    let page = tokio::task::spawn_blocking(move || drive(&tools, "probe", &url))
        .await
        .unwrap();
    assert_eq!(page["state"], "done", "{page:#}");

    // Connect over fetch.
    assert_eq!(
        ok(&page, "unaryHeaders"),
        &json!({"message": "hi", "servedBy": "a", "note": "kept"}),
        "a header goes out as metadata and comes back as a header"
    );
    let failed = error(&page, "unaryError");
    assert_eq!(failed["code"], "not_found");
    assert_eq!(failed["message"], "no such thing");
    assert_eq!(failed["failedBy"], "a", "the error's metadata");
    assert_eq!(error(&page, "unaryUnknownMethod")["code"], "unimplemented");
    saw_deadline(ok(&page, "unaryDeadlineSeen"));
    assert_eq!(
        error(&page, "unaryDeadlineExceeded")["code"],
        "deadline_exceeded"
    );
    assert_eq!(
        ok(&page, "serverStreamTrailer"),
        &json!({"messages": ["t #0", "t #1", "t #2"], "trailer": "done"})
    );
    let aborted = ok(&page, "serverStreamAborted");
    assert_eq!(aborted["messages"], json!(["a #0", "a #1"]), "{aborted}");
    assert_eq!(aborted["code"], "canceled", "{aborted}");
    assert_eq!(aborted["isLodestarError"], true, "{aborted}");
    assert_eq!(
        error(&page, "serverStreamDeadline")["code"],
        "deadline_exceeded"
    );

    // The WebSocket.
    assert_eq!(ok(&page, "clientStream"), "3 messages");
    assert_eq!(
        ok(&page, "bidiInterleaved"),
        &json!({"seen": ["one", "two", "three"], "ended": true, "buffered": "number"}),
        "each bidi reply is read before the next request is sent"
    );
    saw_deadline(ok(&page, "socketDeadlineSeen"));
    assert_eq!(
        error(&page, "socketDeadlineExceeded")["code"],
        "deadline_exceeded"
    );
    let failed = error(&page, "socketError");
    assert_eq!(failed["code"], "permission_denied");
    assert_eq!(failed["message"], "not you");
    assert_eq!(failed["failedBy"], "a", "the end envelope's metadata");
    assert_eq!(error(&page, "socketCancelled")["code"], "canceled");
    assert_eq!(error(&page, "socketAborted")["code"], "canceled");

    assert_eq!(error(&page, "badTimeout")["code"], "invalid_argument");
    running.shutdown().await.unwrap();
}
