//! Percent-decoding of URLs' paths and queries, strict: a bad escape is
//! an error (the request's `400`), not text passed on.

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set, as in
/// queries); with `keep_slash`, `%2F` stays escaped (a path variable
/// that spans segments). `None` for a bad escape: a `%` not followed by
/// two hex digits.
pub(super) fn decode(text: &str, plus: bool, keep_slash: bool) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if keep_slash && byte == b'/' {
                    out.extend_from_slice(&bytes[i..i + 3]);
                } else {
                    out.push(byte);
                }
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// [`decode`]d text; `None` also for bytes that are not UTF-8.
pub(super) fn decode_utf8(text: &str, plus: bool, keep_slash: bool) -> Option<String> {
    String::from_utf8(decode(text, plus, keep_slash)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_plus_and_slashes_decode_as_asked_and_bad_escapes_are_refused() {
        assert_eq!(decode("a%20b+c", false, false).unwrap(), b"a b+c");
        assert_eq!(decode("a%20b+c", true, false).unwrap(), b"a b c");
        assert_eq!(decode("a%2Fb%2fc", false, false).unwrap(), b"a/b/c");
        assert_eq!(decode("a%2Fb", false, true).unwrap(), b"a%2Fb");
        assert_eq!(decode("%ff%00", false, false).unwrap(), [0xff, 0]);
        for bad in ["%", "%4", "%zz", "a%g0"] {
            assert_eq!(decode(bad, true, false), None, "{bad}");
        }
        assert_eq!(decode_utf8("%ff", false, false), None);
        assert_eq!(decode_utf8("%C3%A9", false, false).unwrap(), "é");
    }
}
