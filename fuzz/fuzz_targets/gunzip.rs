//! Decompressing a gzip-compressed message under a size limit, as a
//! receiver does with every message a peer flags compressed.
//!
//! Input: a 3-byte limit, then the compressed message. A message inflates
//! to at most the limit, or is refused; what inflates compresses back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lodestar::Code;
use lodestar::fuzzing::{gunzip, gzip};

fuzz_target!(|input: &[u8]| {
    let [a, b, c, ..] = *input else {
        return;
    };
    let limit = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    let message = &input[3..];
    match gunzip(message, limit) {
        Ok(inflated) => {
            assert!(inflated.len() <= limit, "inflated past the limit");
            let again = gzip(&inflated).expect("compressing never fails");
            assert_eq!(
                gunzip(&again, limit).expect("our own gzip inflates"),
                inflated
            );
        }
        Err(status) => assert!(
            matches!(status.code(), Code::ResourceExhausted | Code::Internal),
            "{status:?}"
        ),
    }
});
