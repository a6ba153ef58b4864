//! Helpers the targets share (included with `#[path]`, not a target).

#![allow(dead_code)]

use std::sync::OnceLock;

use lodestar::fuzzing::Transcoder;

/// The encoded `FileDescriptorSet` of `proto/fuzz.proto`.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fuzz.bin"));

/// The transcoder of `fuzz.Everything`, built once.
pub fn transcoder() -> &'static Transcoder {
    static TRANSCODER: OnceLock<Transcoder> = OnceLock::new();
    TRANSCODER.get_or_init(|| {
        Transcoder::new(DESCRIPTORS, "fuzz.Everything").expect("proto/fuzz.proto has Everything")
    })
}

/// One gRPC frame: the flag, then the big-endian length, then `payload`.
pub fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The frames of `data`, and whatever trails the last whole one.
pub fn split_frames(mut data: &[u8]) -> (Vec<(u8, u32, &[u8])>, &[u8]) {
    let mut frames = Vec::new();
    while data.len() >= 5 {
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
        let Some(payload) = data.get(5..5 + len as usize) else {
            break;
        };
        frames.push((data[0], len, payload));
        data = &data[5 + len as usize..];
    }
    (frames, data)
}

/// A current-thread runtime with paused time, shared by the inputs of one
/// process: whatever waits on a timer is woken as soon as all else is idle.
pub fn paused_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

/// The token the registry targets' servers require for writes.
pub const TOKEN: &str = "s3cret";

/// Reads `body` to the end (or for `patience` of virtual time, or `max`
/// frames): its data and its trailers.
pub async fn collect<B>(
    body: B,
    patience: std::time::Duration,
    max: usize,
) -> (Vec<u8>, Option<http::HeaderMap>)
where
    B: http_body::Body + Unpin,
    B::Data: bytes::Buf,
{
    use bytes::Buf as _;
    use http_body_util::BodyExt as _;
    let mut body = body;
    let (mut data, mut trailers) = (Vec::new(), None);
    let read = async {
        for _ in 0..max {
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut chunk) => {
                        while chunk.has_remaining() {
                            let part = chunk.chunk();
                            data.extend_from_slice(part);
                            let n = part.len();
                            chunk.advance(n);
                        }
                    }
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout(patience, read).await;
    (data, trailers)
}
