//! W3C trace context (`traceparent`, `tracestate`) that travels with a call
//! the way its deadline does.
//!
//! lodestar's server reads the trace context of each inbound call and runs
//! the handler inside it ([`TraceContext::scope`]). Every outbound call the
//! handler makes through a lodestar [`Client`](crate::Client), and every
//! event it publishes, carries the same context, so a trace follows a
//! request from service to service. A call that already has a `traceparent`
//! header keeps its own.
//!
//! Only well-formed contexts travel: a `traceparent` of the W3C form
//! `version-traceid-parentid-flags` (lowercase hex, at most
//! [`MAX_TRACEPARENT`] bytes), and a `tracestate` of at most
//! [`MAX_TRACESTATE`] bytes (a longer one is dropped, as the W3C
//! specification allows).
//!
//! ```
//! use lodestar::trace::TraceContext;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let context = TraceContext::parse(
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//!     Some("vendor=value"),
//! )
//! .unwrap();
//! assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert_eq!(context.parent_id(), "00f067aa0ba902b7");
//! let inside = context.clone().scope(async { TraceContext::current() }).await;
//! assert_eq!(inside, Some(context));
//! assert_eq!(TraceContext::current(), None);
//! # }
//! ```

use std::future::Future;

use http::{HeaderMap, HeaderValue};

/// The `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header.
pub const TRACESTATE: &str = "tracestate";
/// The longest `traceparent` accepted: version `00` takes 55 bytes; later
/// versions may append fields, up to this many bytes in all.
pub const MAX_TRACEPARENT: usize = 128;
/// The longest `tracestate` passed on: 512 bytes, the size the W3C
/// specification asks every system to propagate. A longer one is dropped.
pub const MAX_TRACESTATE: usize = 512;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// One call's W3C trace context. Cheap to clone (the header values are
/// reference counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// The context `traceparent` and `tracestate` describe, or `None` if
    /// `traceparent` is not well formed. A `tracestate` that is too long or
    /// not printable ASCII is dropped.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        if !is_traceparent(traceparent.as_bytes()) {
            return None;
        }
        Some(Self {
            traceparent: HeaderValue::from_str(traceparent).ok()?,
            tracestate: tracestate.and_then(|s| valid_tracestate(s.as_bytes())),
        })
    }

    /// The context carried by `headers`, if they carry a well-formed one.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let traceparent = headers.get(TRACEPARENT)?;
        if !is_traceparent(traceparent.as_bytes()) {
            return None;
        }
        Some(Self {
            traceparent: traceparent.clone(),
            tracestate: headers
                .get(TRACESTATE)
                .and_then(|s| valid_tracestate(s.as_bytes())),
        })
    }

    /// The context of the call the current task is serving, if it has one.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this as the current context.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// Sets this context on `headers`, unless they carry a `traceparent`
    /// already (a caller's own choice wins).
    pub fn inject(&self, headers: &mut HeaderMap) {
        if headers.contains_key(TRACEPARENT) {
            return;
        }
        headers.insert(TRACEPARENT, self.traceparent.clone());
        if let Some(tracestate) = &self.tracestate {
            headers.insert(TRACESTATE, tracestate.clone());
        }
    }

    /// Sets the current task's context, if any, on `headers`; see [`inject`](Self::inject).
    pub fn inject_current(headers: &mut HeaderMap) {
        // Read in place: no clone when there is nothing to forward.
        let _ = CURRENT.try_with(|context| context.inject(headers));
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        // Checked to be ASCII when made.
        self.traceparent.to_str().unwrap_or_default()
    }

    /// The `tracestate` value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_ref().and_then(|s| s.to_str().ok())
    }

    /// The trace id: 32 hex digits.
    pub fn trace_id(&self) -> &str {
        self.traceparent().get(3..35).unwrap_or_default()
    }

    /// The parent id: the span that sent this context (the caller's, or,
    /// with OpenTelemetry on, the span of the call being served), 16 hex
    /// digits.
    pub fn parent_id(&self) -> &str {
        self.traceparent().get(36..52).unwrap_or_default()
    }
}

/// Whether `value` is a W3C `traceparent`: `vv-<32 hex>-<16 hex>-ff`, then,
/// for versions after `00`, optionally `-` and more, lowercase hex only in
/// the fixed fields, version `ff` and all-zero ids refused.
fn is_traceparent(value: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|b| *b != b'0');
    if value.len() < 55 || value.len() > MAX_TRACEPARENT {
        return false;
    }
    let (version, trace_id, parent_id, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let rest = &value[55..];
    let rest_ok = if version == b"00" {
        rest.is_empty()
    } else {
        rest.is_empty() || (rest[0] == b'-' && rest.iter().all(|b| b.is_ascii_graphic()))
    };
    dashes
        && hex(version)
        && version != b"ff"
        && hex(trace_id)
        && nonzero(trace_id)
        && hex(parent_id)
        && nonzero(parent_id)
        && hex(flags)
        && rest_ok
}

fn valid_tracestate(value: &[u8]) -> Option<HeaderValue> {
    let printable = value.iter().all(|b| matches!(b, b' '..=b'~'));
    if value.is_empty() || value.len() > MAX_TRACESTATE || !printable {
        return None;
    }
    HeaderValue::from_bytes(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn accepts_only_well_formed_traceparents() {
        assert!(TraceContext::parse(VALID, None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
        // A later version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(TraceContext::parse(future, None).is_some());
        // A later version's extra fields count towards the 128 bytes.
        let at_limit = format!(
            "{future}-{}",
            "x".repeat(MAX_TRACEPARENT - future.len() - 1)
        );
        assert_eq!(at_limit.len(), MAX_TRACEPARENT);
        assert!(TraceContext::parse(&at_limit, None).is_some());
        let over = format!("{at_limit}x");
        assert_eq!(TraceContext::parse(&over, None), None);
    }

    #[test]
    fn drops_an_oversized_or_unprintable_tracestate() {
        let ok = TraceContext::parse(VALID, Some("a=1,b=2")).unwrap();
        assert_eq!(ok.tracestate(), Some("a=1,b=2"));
        let long = "a=".to_owned() + &"x".repeat(MAX_TRACESTATE);
        assert_eq!(
            TraceContext::parse(VALID, Some(&long))
                .unwrap()
                .tracestate(),
            None
        );
        assert_eq!(
            TraceContext::parse(VALID, Some("a=\u{7}"))
                .unwrap()
                .tracestate(),
            None
        );
    }

    #[test]
    fn inject_keeps_a_callers_own_traceparent() {
        let context = TraceContext::parse(VALID, Some("a=1")).unwrap();
        let mut headers = HeaderMap::new();
        context.inject(&mut headers);
        assert_eq!(headers[TRACEPARENT], VALID);
        assert_eq!(headers[TRACESTATE], "a=1");
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(own));
        context.inject(&mut headers);
        assert_eq!(headers[TRACEPARENT], own);
        assert!(!headers.contains_key(TRACESTATE));
    }

    #[tokio::test]
    async fn the_current_context_is_the_scopes() {
        let context = TraceContext::parse(VALID, None).unwrap();
        let mut headers = HeaderMap::new();
        TraceContext::inject_current(&mut headers);
        assert!(headers.is_empty());
        context
            .clone()
            .scope(async { TraceContext::inject_current(&mut headers) })
            .await;
        assert_eq!(TraceContext::from_headers(&headers), Some(context));
    }
}
