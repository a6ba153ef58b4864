//! The example page in a real browser: headless Chromium (Debian's
//! `chromium`, never a downloaded build) driven by `playwright-core` (npm,
//! installed by `scripts/test` into `target/npm`), with
//! `lodestar_tests::browser`.
//!
//! Without node, Chromium or playwright-core the tests say so and pass,
//! unless `CI` is set: there they must run.

use lodestar_tests::browser::{drive, serve_page, tools};
use serde_json::{Value, json};

use super::start_server;

const CROSS_ORIGIN_PAGE: &str = include_str!("cross_origin.html");

#[test]
fn chromium_loads_the_example_page_from_the_service_and_makes_all_four_calls() {
    let Some(tools) = tools() else { return };
    let (_server, address) = start_server(&[]);
    let page = drive(&tools, "example", &format!("http://{address}/"));
    assert_eq!(page["state"], "done", "every call succeeded: {page:#}");
    // GetFeature (unary, Connect JSON over fetch).
    assert_eq!(
        page["feature"], "Lodestar Trailhead, Kestrel Ridge, NJ, USA",
        "{page:#}"
    );
    // ListFeatures (server streaming, Connect envelopes read as they come).
    assert_eq!(page["listed"], 100, "{page:#}");
    assert_eq!(page["listedShown"], "100", "{page:#}");
    // RecordRoute (client streaming, WebSocket).
    assert_eq!(page["pointCount"], "10", "{page:#}");
    // RouteChat (bidi, WebSocket): each note brings back the earlier ones
    // at its place.
    assert_eq!(
        page["chat"],
        json!(["First message", "Second message", "Third message"]),
        "{page:#}"
    );
}

#[test]
fn chromium_refuses_a_page_from_a_disallowed_origin_and_lets_an_allowed_one_call() {
    let Some(tools) = tools() else { return };
    let allowed = serve_page(CROSS_ORIGIN_PAGE);
    let disallowed = serve_page(CROSS_ORIGIN_PAGE);
    let (_server, address) = start_server(&["--allow-origin", &allowed]);
    let service = format!("http://{address}");
    let feature = "Lodestar Trailhead, Kestrel Ridge, NJ, USA";

    // An allowed origin: CORS lets fetch read the answers, and the socket
    // opens.
    let ok = drive(&tools, "probe", &format!("{allowed}/?service={service}"));
    assert_eq!(ok["state"], "done", "{ok:#}");
    assert_eq!(ok["unary"]["ok"], feature, "{ok:#}");
    assert_eq!(ok["clientStream"]["ok"], 2, "{ok:#}");
    assert_eq!(ok["fetch"]["ok"], format!("200 {feature}"), "{ok:#}");
    assert_eq!(ok["websocket"]["ok"][0], "open lodestar.v1+json", "{ok:#}");

    // A disallowed origin: the preflight is refused (403), so fetch fails
    // with a CORS error; the WebSocket opening gets 403, so the socket
    // errors and closes without opening.
    let no = drive(&tools, "probe", &format!("{disallowed}/?service={service}"));
    assert_eq!(no["state"], "done", "{no:#}");
    assert!(no.get("import").is_none(), "the client loads: {no:#}");
    assert_eq!(no["unary"]["error"]["code"], "unavailable", "{no:#}");
    assert_eq!(no["unary"]["error"]["name"], "LodestarError", "{no:#}");
    assert_eq!(no["clientStream"]["error"]["code"], "unavailable", "{no:#}");
    assert_eq!(no["fetch"]["error"]["name"], "TypeError", "{no:#}");
    assert_eq!(
        no["websocket"]["ok"],
        json!(["error", "close 1006"]),
        "{no:#}"
    );
    let console: Vec<&str> = no["console"]
        .as_array()
        .map(|lines| lines.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        console
            .iter()
            .any(|line| line.contains("blocked by CORS policy")),
        "the browser blames CORS: {console:#?}"
    );
    assert!(
        console
            .iter()
            .any(|line| line.contains("WebSocket") && line.contains("403")),
        "the browser saw the WebSocket opening refused with 403: {console:#?}"
    );
}
