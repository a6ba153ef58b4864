//! Finding a header among the few a gRPC call carries.
//!
//! A call's headers and trailers are a handful, mostly standard names:
//! comparing names one by one is cheaper than hashing a custom name such
//! as `grpc-timeout` or `grpc-status`, so a small map is scanned, and a
//! larger one looked up by hash.

use http::{HeaderMap, HeaderName, HeaderValue};

/// How many header values a map may hold for [`find_header`] and
/// [`has_header`] to scan it rather than look names up by hash.
const SCAN_HEADERS: usize = 16;

/// Whether `headers` hold `name`: see [`find_header`].
pub(crate) fn has_header(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.len() > SCAN_HEADERS {
        return headers.contains_key(name);
    }
    headers.keys().any(|candidate| candidate == name)
}

/// The (first) value of `name` in `headers`, as [`HeaderMap::get`] gives it.
pub(crate) fn find_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<&'a HeaderValue> {
    if headers.len() > SCAN_HEADERS {
        return headers.get(name);
    }
    headers
        .iter()
        .find_map(|(candidate, value)| (candidate == name).then_some(value))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::{SCAN_HEADERS, find_header, has_header};

    #[test]
    fn headers_are_found_the_same_scanned_or_hashed() {
        let timeout = HeaderName::from_static("grpc-timeout");
        for count in [0, 3, SCAN_HEADERS, SCAN_HEADERS + 1, 40] {
            let mut headers = HeaderMap::new();
            for i in 0..count {
                let name = HeaderName::try_from(format!("x-{i}")).unwrap();
                headers.append(name, HeaderValue::from(i));
            }
            assert!(!has_header(&headers, &timeout), "{count}");
            assert_eq!(find_header(&headers, &timeout), None, "{count}");
            // The first of several values, as `HeaderMap::get` gives.
            headers.append(&timeout, HeaderValue::from_static("1S"));
            headers.append(&timeout, HeaderValue::from_static("2S"));
            headers.append(http::header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
            assert!(has_header(&headers, &timeout), "{count}");
            assert_eq!(find_header(&headers, &timeout), headers.get(&timeout));
            assert_eq!(
                find_header(&headers, &http::header::CONTENT_TYPE),
                headers.get(http::header::CONTENT_TYPE)
            );
        }
    }
}
