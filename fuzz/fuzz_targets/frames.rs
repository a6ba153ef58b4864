//! gRPC framing as a body is received: the per-message size limit (checked
//! on the length prefix, before anything is buffered), then decompression
//! and JSON transcoding, or compression, as `lodestar` wires them.
//!
//! Input: a mode byte, a 2-byte message size limit, a chunk size byte, then
//! the body. Each result is checked against a plain model of the framing.

#![no_main]

#[path = "common.rs"]
mod common;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lodestar::Code;
use lodestar::fuzzing::{Rewrite, gunzip, receive};

fuzz_target!(|input: &[u8]| {
    let [mode, l0, l1, chunk, ..] = *input else {
        return;
    };
    let body = &input[4..];
    let limit = usize::from(u16::from_be_bytes([l0, l1]));
    let chunk = usize::from(chunk) + 1;
    let plan: Vec<bool> = (0..8)
        .map(|bit| mode & (0x80 >> bit) != 0)
        .take(usize::from(mode >> 5 & 7))
        .collect();
    let rewrite = match mode % 4 {
        0 => Rewrite::None,
        1 => Rewrite::FromJson {
            gzip: mode & 4 != 0,
        },
        _ => Rewrite::Compress {
            default: mode & 4 != 0,
            plan: (mode & 8 != 0).then(|| plan.clone()),
        },
    };
    let chunks = body.chunks(chunk).map(Bytes::copy_from_slice).collect();
    let received = receive(chunks, limit, rewrite.clone(), common::transcoder());
    let out: Vec<u8> = received.data.concat();

    // The model: whole frames in order; the first over the limit ends the call.
    let (frames, rest) = common::split_frames(body);
    let oversized = frames
        .iter()
        .position(|(_, len, _)| *len as usize > limit)
        .or_else(|| {
            // A trailing header announcing too much counts too, before its payload arrives.
            (rest.len() >= 5
                && u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize > limit)
                .then_some(frames.len())
        });
    let within = &frames[..oversized.unwrap_or(frames.len())];
    let code = received.error.as_ref().map(|s| s.code());

    // Compression with nothing to compress rewrites nothing.
    let model = match rewrite {
        Rewrite::Compress {
            default: false,
            plan: None,
        } => Rewrite::None,
        other => other,
    };
    match model {
        Rewrite::None => {
            // Passed through untouched, up to the oversized message's header.
            assert!(body.starts_with(&out), "the data is not the body's prefix");
            let end: usize = within.iter().map(|(_, len, _)| 5 + *len as usize).sum();
            match oversized {
                Some(_) => {
                    assert_eq!(code, Some(Code::ResourceExhausted));
                    // Whole messages before it all pass; of the oversized
                    // message at most the part of its header that came in
                    // earlier chunks (before it could be judged) does.
                    assert!(
                        (end..end + 5).contains(&out.len()),
                        "{} bytes passed, {end} expected: data after the oversized header was passed on",
                        out.len()
                    );
                }
                None => {
                    assert_eq!(code, None);
                    assert_eq!(out, body);
                }
            }
        }
        Rewrite::FromJson { gzip } => {
            let (got, got_rest) = common::split_frames(&out);
            assert!(got_rest.is_empty(), "rewritten data holds a partial frame");
            let mut expected_error = None;
            let mut expected = Vec::new();
            for (flag, _, payload) in within {
                let json = match (flag, gzip) {
                    (0, _) => Ok(payload.to_vec()),
                    (1, true) => gunzip(payload, limit),
                    _ => Err(lodestar::Status::internal("bad flag")),
                };
                match json.and_then(|json| common::transcoder().json_to_proto(&json)) {
                    Ok(proto) => expected.push(proto),
                    Err(status) => {
                        expected_error = Some(status.code());
                        break;
                    }
                }
            }
            assert!(got.len() <= expected.len());
            for ((flag, _, payload), proto) in got.iter().zip(&expected) {
                assert_eq!(*flag, 0, "a transcoded message is flagged compressed");
                assert_eq!(payload, proto);
            }
            let expected_error = expected_error.or_else(|| {
                if oversized.is_some() {
                    Some(Code::ResourceExhausted)
                } else if !rest.is_empty() {
                    Some(Code::Internal) // the body ended inside a message
                } else {
                    None
                }
            });
            assert_eq!(code, expected_error);
            if code.is_none() {
                assert_eq!(got.len(), expected.len());
            }
        }
        Rewrite::Compress { default, plan } => {
            let (got, got_rest) = common::split_frames(&out);
            assert!(got_rest.is_empty(), "rewritten data holds a partial frame");
            assert!(got.len() <= within.len());
            for (i, ((flag, _, payload), (in_flag, _, in_payload))) in
                got.iter().zip(within).enumerate()
            {
                let wanted = plan
                    .as_ref()
                    .and_then(|p| p.get(i).copied())
                    .unwrap_or(default);
                if *in_flag == 0 && wanted {
                    assert_eq!(*flag, 1);
                    let inflated = gunzip(payload, usize::MAX).expect("our own gzip inflates");
                    assert_eq!(&inflated[..], *in_payload);
                } else {
                    assert_eq!((flag, payload), (in_flag, in_payload));
                }
            }
            let expected_error = if oversized.is_some() {
                Some(Code::ResourceExhausted)
            } else if !rest.is_empty() {
                Some(Code::Internal)
            } else {
                None
            };
            assert_eq!(code, expected_error);
            if code.is_none() {
                assert_eq!(got.len(), within.len());
            }
        }
    }
});
