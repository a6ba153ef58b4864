//! Rewriting the messages of a gRPC body, frame by frame: decompressing,
//! transcoding between protobuf and JSON, compressing.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::Transcode;
use crate::compression::{Encoding, PerMessage, gunzip, gzip};

/// Collects whole gRPC frames from a body's chunks and rewrites each one:
/// decompress (if asked and the frame is compressed), transcode, then
/// compress (as the call's default and per-message plan say).
#[derive(Debug, Default)]
pub(crate) struct Reframer {
    pending: BytesMut,
    /// Decompress compressed frames, refusing any over this many bytes;
    /// `gzip` says whether the body's `grpc-encoding` is gzip (compressed
    /// frames are an error otherwise).
    decompress: Option<Decompress>,
    transcode: Option<Transcode>,
    compress: Option<Compress>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Decompress {
    pub(crate) limit: usize,
    pub(crate) gzip: bool,
}

#[derive(Debug)]
struct Compress {
    encoding: Encoding,
    default: bool,
    plan: Option<PerMessage>,
}

impl Reframer {
    /// Compresses messages with `encoding`: all by `default`, or as `plan` says.
    pub(crate) fn compressing(encoding: Encoding, default: bool, plan: Option<PerMessage>) -> Self {
        Self {
            compress: Some(Compress {
                encoding,
                default,
                plan,
            }),
            ..Self::default()
        }
    }

    /// Decompresses every compressed message, as `decompress` allows.
    pub(crate) fn decompressing(decompress: Decompress) -> Self {
        Self {
            decompress: Some(decompress),
            ..Self::default()
        }
    }

    /// Transcodes every message, decompressing first as `decompress` allows.
    pub(crate) fn transcoding(transcode: Transcode, decompress: Decompress) -> Self {
        Self {
            decompress: Some(decompress),
            transcode: Some(transcode),
            ..Self::default()
        }
    }

    /// Also transcodes every message (before any compression).
    pub(crate) fn with_transcode(mut self, transcode: Option<Transcode>) -> Self {
        self.transcode = transcode;
        self
    }

    /// Whether this rewrites anything at all.
    pub(crate) fn is_active(&self) -> bool {
        self.decompress.is_some()
            || self.transcode.is_some()
            || self
                .compress
                .as_ref()
                .is_some_and(|c| c.default || c.plan.is_some())
    }

    /// Takes the next chunk of the body; returns the frames it completed,
    /// rewritten (possibly empty, while a frame is incomplete).
    pub(crate) fn feed(&mut self, data: &Bytes) -> Result<Bytes, tonic::Status> {
        if self.pending.is_empty() && !self.is_active() {
            return Ok(data.clone());
        }
        self.pending.extend_from_slice(data);
        let mut out = BytesMut::new();
        while self.pending.len() >= 5 {
            let len = u32::from_be_bytes([
                self.pending[1],
                self.pending[2],
                self.pending[3],
                self.pending[4],
            ]) as usize;
            if self.pending.len() < 5 + len {
                break;
            }
            let frame = self.pending.split_to(5 + len);
            self.rewrite(frame[0], &frame[5..], &mut out)?;
        }
        Ok(out.freeze())
    }

    fn rewrite(
        &mut self,
        flag: u8,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), tonic::Status> {
        let mut flag = flag;
        let mut message: std::borrow::Cow<'_, [u8]> = payload.into();
        if let Some(decompress) = self.decompress {
            match flag {
                0 => {}
                1 if decompress.gzip => {
                    message = heavy(message.len(), || gunzip(&message, decompress.limit))?.into();
                    flag = 0;
                }
                1 => {
                    return Err(tonic::Status::internal(
                        "a message is flagged compressed, but the call has no grpc-encoding",
                    ));
                }
                other => {
                    return Err(tonic::Status::internal(format!(
                        "a message has the invalid compression flag {other} (valid: 0 and 1)"
                    )));
                }
            }
        }
        if let Some(transcode) = &self.transcode {
            if flag != 0 {
                return Err(tonic::Status::internal(
                    "cannot transcode a compressed message",
                ));
            }
            message = heavy(message.len(), || transcode.apply(&message))?.into();
        }
        if let Some(compress) = &self.compress {
            let wanted = compress
                .plan
                .as_ref()
                .and_then(PerMessage::next_choice)
                .unwrap_or(compress.default);
            if flag == 0 && wanted {
                message = match compress.encoding {
                    Encoding::Gzip => heavy(message.len(), || gzip(&message))?.into(),
                };
                flag = 1;
            }
        }
        let len = u32::try_from(message.len())
            .map_err(|_| tonic::Status::resource_exhausted("a message is too large to frame"))?;
        out.put_u8(flag);
        out.put_u32(len);
        out.extend_from_slice(&message);
        Ok(())
    }

    /// Whether a partial frame is still waiting for the rest of its bytes.
    pub(crate) fn has_partial_frame(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Runs CPU-heavy work (compressing or transcoding a large message) so that
/// it does not stall the other tasks of its worker thread.
fn heavy<R>(len: usize, work: impl FnOnce() -> R) -> R {
    const LARGE: usize = 256 * 1024;
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if len >= LARGE && multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn frames(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            out.push((data[0], data[5..5 + len].to_vec()));
            data = &data[5 + len..];
        }
        out
    }

    #[test]
    fn compresses_as_planned_across_chunk_boundaries() {
        let plan = PerMessage::new();
        plan.push(true);
        plan.push(false);
        let mut reframer = Reframer::compressing(Encoding::Gzip, true, Some(plan));
        let first = vec![0u8; 1000];
        let mut body = frame(&first);
        body.extend(frame(b"plain"));
        body.extend(frame(b"default"));
        let mut out = Vec::new();
        for chunk in body.chunks(7) {
            out.extend_from_slice(&reframer.feed(&Bytes::copy_from_slice(chunk)).unwrap());
        }
        assert!(!reframer.has_partial_frame());
        let out = frames(&out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0, 1);
        assert!(out[0].1.len() < 100, "1000 zeros compress well");
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&out[0].1[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, first);
        assert_eq!(out[1], (0, b"plain".to_vec()));
        assert_eq!(out[2].0, 1, "messages without a choice follow the default");
    }

    #[test]
    fn decompression_is_bounded() {
        let big = gzip(&vec![0u8; 10_000]).unwrap();
        let status = gunzip(&big, 1000).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(gunzip(&big, 10_000).unwrap().len(), 10_000);
    }
}
