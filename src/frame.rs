//! Length headers and the `cup_pos` TPDU + header, as tokio-util codecs (DOMAIN §2).
//!
//! Bytes → [`Frame`]: this layer knows where one message ends and the next begins, and nothing
//! about the ISO 8583 fields inside. Following tokio-util's contract, `Ok(None)` means "need more
//! bytes" and `Err(FrameError)` means the stream is broken and the connection must be closed. A
//! frame that is well delimited but too short to hold the `cup_pos` TPDU and header does not
//! break the stream: it comes out as the item [`Frame::Undersized`] (dropped and counted as a
//! message error, the connection stays open, as `vectors/malformed/c_shorter_than_tpdu_header`
//! requires).
//!
//! Framings (research §5.1), the length never counts itself:
//!
//! | [`Framing`] | header | largest length | zero |
//! |---|---|---|---|
//! | `binary2` | 2 bytes big-endian | 65535 | framing error |
//! | `ascii4` | 4 ASCII decimal digits | 9999 | `0000` = keep-alive, echoed back |
//! | `bcd2` | 2 bytes BCD | 9999 | framing error |
//!
//! The configured maximum ([`FrameCodec::new`]) is checked on the header alone, before anything
//! is reserved, so a peer announcing 65535 bytes costs nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Length of the `cup_pos` TPDU: `60`, destination NII (2 bytes), source NII (2 bytes).
pub const TPDU_BYTES: usize = 5;
/// Length of the `cup_pos` message header that follows the TPDU; opaque to refundgate.
pub const CUP_HEADER_BYTES: usize = 6;

/// How a frame's length is written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// 2-byte big-endian binary length (the default of both dialects).
    #[serde(rename = "binary2")]
    Binary2,
    /// 4 ASCII decimal digits; `0000` is a keep-alive that is echoed back.
    #[serde(rename = "ascii4")]
    Ascii4,
    /// 2 bytes of BCD (4 decimal digits).
    #[serde(rename = "bcd2")]
    Bcd2,
}

/// One delimited unit read from, or written to, a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An ISO 8583 message.
    Message {
        /// The `cup_pos` TPDU (`60 dest src`); `None` on links without the CUP header.
        tpdu: Option<[u8; TPDU_BYTES]>,
        /// The `cup_pos` 6-byte message header; `None` on links without the CUP header.
        header: Option<[u8; CUP_HEADER_BYTES]>,
        /// The message from the MTI onward (a zero-copy slice of the read buffer).
        body: Bytes,
    },
    /// An `ascii4` keep-alive (`0000`); the connection echoes it back.
    KeepAlive,
    /// A well-delimited frame too short for the `cup_pos` TPDU and header: a message error
    /// (drop it, count it, keep the connection), not a broken stream.
    Undersized {
        /// The frame's announced (and received) length in bytes.
        len: usize,
    },
}

/// Why a stream can no longer be read or written as frames. Carries lengths only, never
/// message bytes (DOMAIN §10).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A length of zero where it is not a keep-alive.
    #[error("zero-length frame")]
    ZeroLength,
    /// An `ascii4` or `bcd2` header that is not four decimal digits.
    #[error("length header is not 4 decimal digits")]
    InvalidLength,
    /// The announced length is above the configured maximum.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame (header included) that had arrived.
        buffered: usize,
    },
    /// A frame to send does not fit this framing or the configured maximum.
    #[error("reply of {len} bytes does not fit the {max}-byte limit")]
    ReplyTooLong {
        /// The length the frame would announce.
        len: usize,
        /// The largest length allowed.
        max: usize,
    },
}

/// Decoder and encoder of [`Frame`]s for one listener.
#[derive(Debug)]
pub struct FrameCodec {
    framing: Framing,
    cup_header: bool,
    max_frame_bytes: usize,
    /// Used for `binary2` only. tokio-util's codec reads exactly this header (2-byte big-endian
    /// length, not counting itself), checks the maximum on the header before it reserves, and
    /// keeps its own head/data state, so we configure it rather than rewrite it. It cannot read
    /// the decimal `ascii4`/`bcd2` headers (it only knows binary integers) nor tell a keep-alive
    /// from an empty frame, so those two are the small hand-written parsers below.
    binary2: Option<LengthDelimitedCodec>,
    /// True while the `binary2` codec has consumed a header and waits for the frame's bytes
    /// (it does not expose its state), so that EOF right after a header is a truncated frame.
    binary2_mid_frame: bool,
}

// === impl Framing ===

impl Framing {
    /// Bytes of the length header.
    pub const fn header_bytes(self) -> usize {
        match self {
            Framing::Binary2 | Framing::Bcd2 => 2,
            Framing::Ascii4 => 4,
        }
    }

    /// The largest length the header can express.
    pub const fn length_max(self) -> usize {
        match self {
            Framing::Binary2 => u16::MAX as usize,
            Framing::Ascii4 | Framing::Bcd2 => 9999,
        }
    }

    /// The name used in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Framing::Binary2 => "binary2",
            Framing::Ascii4 => "ascii4",
            Framing::Bcd2 => "bcd2",
        }
    }

    /// Parses a decimal header (`ascii4` or `bcd2`); `None` when it is not 4 decimal digits.
    fn parse_decimal(self, head: &[u8]) -> Option<usize> {
        let mut len = 0usize;
        match self {
            Framing::Ascii4 => {
                for &b in head.get(..4)? {
                    if !b.is_ascii_digit() {
                        return None;
                    }
                    len = len * 10 + usize::from(b - b'0');
                }
            }
            Framing::Bcd2 | Framing::Binary2 => {
                for &b in head.get(..2)? {
                    let (hi, lo) = (b >> 4, b & 0x0f);
                    if hi > 9 || lo > 9 {
                        return None;
                    }
                    len = len * 100 + usize::from(hi) * 10 + usize::from(lo);
                }
            }
        }
        Some(len)
    }

    /// Writes the length header for `len` (already checked against [`Self::length_max`]).
    fn put_header(self, len: usize, dst: &mut BytesMut) {
        match self {
            Framing::Binary2 => dst.put_u16(u16::try_from(len).unwrap_or(u16::MAX)),
            Framing::Ascii4 => {
                let digits = [len / 1000 % 10, len / 100 % 10, len / 10 % 10, len % 10];
                for d in digits {
                    // `d` is a single decimal digit, so the cast is exact.
                    dst.put_u8(b'0' + d as u8);
                }
            }
            Framing::Bcd2 => {
                let (hi, lo) = (len / 100 % 100, len % 100);
                // Each half is below 100, so both nibbles are decimal digits.
                dst.put_u8((((hi / 10) << 4) | (hi % 10)) as u8);
                dst.put_u8((((lo / 10) << 4) | (lo % 10)) as u8);
            }
        }
    }
}

// === impl Frame ===

impl Frame {
    /// The answer to this request carrying `body`: the TPDU with destination and source swapped
    /// and the request's header, as the `cup_pos` convention wants (research §5.2). Frames
    /// without a TPDU (and keep-alives) get a plain message.
    pub fn reply(&self, body: Bytes) -> Frame {
        match self {
            Frame::Message { tpdu, header, .. } => Frame::Message {
                tpdu: tpdu.map(swap_tpdu),
                header: *header,
                body,
            },
            Frame::KeepAlive | Frame::Undersized { .. } => Frame::Message {
                tpdu: None,
                header: None,
                body,
            },
        }
    }
}

/// Swaps the destination and source NII of a TPDU: `60 0003 0000` → `60 0000 0003`.
pub fn swap_tpdu(tpdu: [u8; TPDU_BYTES]) -> [u8; TPDU_BYTES] {
    [tpdu[0], tpdu[3], tpdu[4], tpdu[1], tpdu[2]]
}

// === impl FrameCodec ===

impl FrameCodec {
    /// A codec for `framing`, with the `cup_pos` TPDU + header when `cup_header` is set, that
    /// refuses frames longer than `max_frame_bytes` (also capped by what the header can say).
    pub fn new(framing: Framing, cup_header: bool, max_frame_bytes: usize) -> Self {
        let max_frame_bytes = max_frame_bytes.min(framing.length_max());
        let binary2 = match framing {
            Framing::Binary2 => Some(
                LengthDelimitedCodec::builder()
                    .length_field_length(2)
                    .big_endian()
                    .max_frame_length(max_frame_bytes)
                    .new_codec(),
            ),
            Framing::Ascii4 | Framing::Bcd2 => None,
        };
        Self {
            framing,
            cup_header,
            max_frame_bytes,
            binary2,
            binary2_mid_frame: false,
        }
    }

    /// The framing this codec reads and writes.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The largest frame accepted (and written), in bytes after the length header.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// The delimited frame bytes (after the length header) or `None` when more are needed.
    fn decode_delimited(&mut self, src: &mut BytesMut) -> Result<Option<Delimited>, FrameError> {
        if let Some(codec) = self.binary2.as_mut() {
            // Peek the header first: on an over-long header the codec errors without consuming
            // it, and we want the announced length in the error.
            let announced = src
                .get(..2)
                .map(|h| usize::from(u16::from_be_bytes([h[0], h[1]])));
            let decoded = codec.decode(src);
            // With two bytes or more and no frame, the codec has consumed a header; with fewer
            // its state is unchanged.
            match &decoded {
                Ok(None) if announced.is_some() => self.binary2_mid_frame = true,
                Ok(None) => {}
                _ => self.binary2_mid_frame = false,
            }
            return match decoded {
                Ok(Some(bytes)) if bytes.is_empty() => Err(FrameError::ZeroLength),
                Ok(Some(bytes)) => Ok(Some(Delimited::Bytes(bytes))),
                Ok(None) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(FrameError::TooLong {
                    len: announced.unwrap_or(usize::MAX),
                    max: self.max_frame_bytes,
                }),
                Err(e) => Err(FrameError::Io(e)),
            };
        }
        let head_bytes = self.framing.header_bytes();
        let Some(head) = src.get(..head_bytes) else {
            return Ok(None);
        };
        let len = self
            .framing
            .parse_decimal(head)
            .ok_or(FrameError::InvalidLength)?;
        if len == 0 {
            if self.framing == Framing::Ascii4 {
                src.advance(head_bytes);
                return Ok(Some(Delimited::KeepAlive));
            }
            return Err(FrameError::ZeroLength);
        }
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLong {
                len,
                max: self.max_frame_bytes,
            });
        }
        let frame_end = head_bytes + len;
        if src.len() < frame_end {
            // Bounded: `len` was checked against the maximum above.
            src.reserve(frame_end - src.len());
            return Ok(None);
        }
        src.advance(head_bytes);
        Ok(Some(Delimited::Bytes(src.split_to(len))))
    }

    /// Splits the `cup_pos` TPDU and header off a delimited frame.
    fn split_cup(&self, mut bytes: BytesMut) -> Frame {
        if !self.cup_header {
            return Frame::Message {
                tpdu: None,
                header: None,
                body: bytes.freeze(),
            };
        }
        let len = bytes.len();
        let mut tpdu = [0u8; TPDU_BYTES];
        let mut header = [0u8; CUP_HEADER_BYTES];
        match (
            bytes.get(..TPDU_BYTES),
            bytes.get(TPDU_BYTES..TPDU_BYTES + CUP_HEADER_BYTES),
        ) {
            (Some(t), Some(h)) => {
                tpdu.copy_from_slice(t);
                header.copy_from_slice(h);
            }
            _ => return Frame::Undersized { len },
        }
        bytes.advance(TPDU_BYTES + CUP_HEADER_BYTES);
        Frame::Message {
            tpdu: Some(tpdu),
            header: Some(header),
            body: bytes.freeze(),
        }
    }
}

/// What the length layer found, before the CUP split.
enum Delimited {
    Bytes(BytesMut),
    KeepAlive,
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        Ok(match self.decode_delimited(src)? {
            None => None,
            Some(Delimited::KeepAlive) => Some(Frame::KeepAlive),
            Some(Delimited::Bytes(bytes)) => Some(self.split_cup(bytes)),
        })
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && !self.binary2_mid_frame => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let (tpdu, header, body) = match frame {
            Frame::KeepAlive => {
                // Only `ascii4` has a keep-alive; on the others an empty frame is illegal.
                if self.framing != Framing::Ascii4 {
                    return Err(FrameError::ZeroLength);
                }
                dst.put_slice(b"0000");
                return Ok(());
            }
            Frame::Undersized { .. } => return Err(FrameError::ZeroLength),
            Frame::Message { tpdu, header, body } => (tpdu, header, body),
        };
        let cup_bytes = if self.cup_header {
            TPDU_BYTES + CUP_HEADER_BYTES
        } else {
            0
        };
        let len = cup_bytes + body.len();
        if len == 0 {
            return Err(FrameError::ZeroLength);
        }
        if len > self.max_frame_bytes {
            return Err(FrameError::ReplyTooLong {
                len,
                max: self.max_frame_bytes,
            });
        }
        // Written by hand rather than through `LengthDelimitedCodec`'s encoder, which wants the
        // whole payload as one buffer: here the TPDU, header and body go out in one pass.
        dst.reserve(self.framing.header_bytes() + len);
        self.framing.put_header(len, dst);
        if self.cup_header {
            dst.put_slice(&tpdu.unwrap_or([0x60, 0, 0, 0, 0]));
            dst.put_slice(&header.unwrap_or([0; CUP_HEADER_BYTES]));
        }
        dst.put_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::limits::FRAME_BYTES_DEFAULT_MAX;

    const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
    const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

    fn message(body: &[u8]) -> Frame {
        Frame::Message {
            tpdu: None,
            header: None,
            body: Bytes::copy_from_slice(body),
        }
    }

    fn cup_message(body: &[u8]) -> Frame {
        Frame::Message {
            tpdu: Some(CUP_TPDU),
            header: Some(CUP_HEADER),
            body: Bytes::copy_from_slice(body),
        }
    }

    fn encode_all(codec: &mut FrameCodec, frames: &[Frame]) -> BytesMut {
        let mut wire = BytesMut::new();
        for f in frames {
            codec.encode(f.clone(), &mut wire).unwrap();
        }
        wire
    }

    /// Decodes `wire` delivered in the given chunks, then signals EOF.
    fn decode_chunks(codec: &mut FrameCodec, chunks: &[&[u8]]) -> Result<Vec<Frame>, FrameError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf)? {
                out.push(f);
            }
        }
        while let Some(f) = codec.decode_eof(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn all_codecs() -> Vec<(FrameCodec, Vec<Frame>)> {
        let plain = vec![
            message(b"0200ABCDEF"),
            message(&[0x30; 300]),
            message(b"0800"),
        ];
        let cup = vec![
            cup_message(&[0x02, 0x00, 1, 2, 3]),
            cup_message(&[0x08, 0x10]),
        ];
        let mut with_keepalive = plain.clone();
        with_keepalive.insert(1, Frame::KeepAlive);
        vec![
            (
                FrameCodec::new(Framing::Binary2, false, 8192),
                plain.clone(),
            ),
            (
                FrameCodec::new(Framing::Ascii4, false, 8192),
                with_keepalive,
            ),
            (FrameCodec::new(Framing::Bcd2, false, 8192), plain),
            (FrameCodec::new(Framing::Binary2, true, 8192), cup.clone()),
            (FrameCodec::new(Framing::Ascii4, true, 8192), cup.clone()),
            (FrameCodec::new(Framing::Bcd2, true, 8192), cup),
        ]
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        for (mut codec, frames) in all_codecs() {
            let wire = encode_all(&mut codec, &frames);
            for cut in 0..=wire.len() {
                let (a, b) = wire.split_at(cut);
                let got = decode_chunks(&mut codec, &[a, b]).unwrap();
                assert_eq!(got, frames, "{:?} split at {cut}", codec.framing());
            }
            for cut1 in (0..=wire.len()).step_by(7) {
                for cut2 in cut1..=wire.len() {
                    let got = decode_chunks(
                        &mut codec,
                        &[&wire[..cut1], &wire[cut1..cut2], &wire[cut2..]],
                    )
                    .unwrap();
                    assert_eq!(got, frames, "split at {cut1}/{cut2}");
                }
            }
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_frames() {
        for (mut codec, frames) in all_codecs() {
            let wire = encode_all(&mut codec, &frames);
            let chunks: Vec<&[u8]> = wire.chunks(1).collect();
            assert_eq!(decode_chunks(&mut codec, &chunks).unwrap(), frames);
        }
    }

    #[test]
    fn headers_are_written_as_each_framing_says() {
        let mut wire = BytesMut::new();
        FrameCodec::new(Framing::Binary2, false, 8192)
            .encode(message(&[0x41; 127]), &mut wire)
            .unwrap();
        assert_eq!(&wire[..2], &[0x00, 0x7f]);
        let mut wire = BytesMut::new();
        FrameCodec::new(Framing::Ascii4, false, 8192)
            .encode(message(&[0x41; 127]), &mut wire)
            .unwrap();
        assert_eq!(&wire[..4], b"0127");
        let mut wire = BytesMut::new();
        FrameCodec::new(Framing::Bcd2, false, 8192)
            .encode(message(&[0x41; 127]), &mut wire)
            .unwrap();
        assert_eq!(&wire[..2], &[0x01, 0x27]);
    }

    #[test]
    fn ascii_keep_alive_decodes_and_echoes() {
        let mut codec = FrameCodec::new(Framing::Ascii4, false, 8192);
        let frames = decode_chunks(&mut codec, &[b"00000000"]).unwrap();
        assert_eq!(frames, vec![Frame::KeepAlive, Frame::KeepAlive]);
        let mut wire = BytesMut::new();
        codec.encode(Frame::KeepAlive, &mut wire).unwrap();
        assert_eq!(&wire[..], b"0000");
    }

    #[test]
    fn cup_tpdu_is_split_off_and_swapped_in_the_reply() {
        let mut codec = FrameCodec::new(Framing::Binary2, true, 8192);
        let wire = hex::decode("000f600003000060310031000002001234").unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let req = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(req, cup_message(&[0x02, 0x00, 0x12, 0x34]));
        let reply = req.reply(Bytes::from_static(&[0x02, 0x10]));
        let mut out = BytesMut::new();
        codec.encode(reply, &mut out).unwrap();
        assert_eq!(hex::encode(&out), "000d60000000036031003100000210");
    }

    #[test]
    fn cup_frame_shorter_than_tpdu_and_header_is_undersized_not_fatal() {
        // vectors/malformed/c_shorter_than_tpdu_header.json: expected message_error_drop.
        let mut codec = FrameCodec::new(Framing::Binary2, true, 8192);
        let mut buf = BytesMut::from(&hex::decode("00086000030000603100").unwrap()[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Undersized { len: 8 })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_framing_vectors_are_frame_errors() {
        // framed_hex of every vectors/malformed/*.json whose `expected` is framing_error.
        let cases = [
            ("a_zero_length_frame", "0000", false),
            ("c_zero_length_frame", "0000", true),
            ("a_length_8193_over_max", "200130323030373233433034", false),
            ("a_length_65535_short", "ffff30323030373233433034", false),
            ("c_length_65535_short", "ffff60000300006031003100", true),
            (
                "a_truncated_frame_eof",
                "008c30323030373233433034383130304330383030313136343736313733393030313031303131393030",
                false,
            ),
            (
                "c_truncated_frame_eof",
                "008060000300006031003100000200702404c020c09811196222021234567890",
                true,
            ),
        ];
        for (name, framed_hex, cup) in cases {
            let wire = hex::decode(framed_hex).unwrap();
            let mut codec = FrameCodec::new(Framing::Binary2, cup, 8192);
            let err = decode_chunks(&mut codec, &[&wire]).expect_err(name);
            assert!(!matches!(err, FrameError::Io(_)), "{name}: {err}");
        }
    }

    #[test]
    fn eof_right_after_a_header_is_truncated_not_a_clean_close() {
        for framing in [Framing::Binary2, Framing::Ascii4, Framing::Bcd2] {
            let mut codec = FrameCodec::new(framing, false, 8192);
            let mut head = BytesMut::new();
            framing.put_header(10, &mut head);
            let err = decode_chunks(&mut codec, &[&head]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "{framing:?}: {err}"
            );
            // And a clean close between frames is not an error.
            let mut codec = FrameCodec::new(framing, false, 8192);
            let wire = encode_all(&mut codec, &[message(b"0800")]);
            assert_eq!(
                decode_chunks(&mut codec, &[&wire]).unwrap(),
                vec![message(b"0800")]
            );
        }
    }

    /// Every `../shared/vectors/malformed/*.json` through the framing layer: `framing_error`
    /// vectors break the stream, every other one is exactly one well-delimited frame.
    #[test]
    fn shared_malformed_vectors_frame_as_expected() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/malformed");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (tests need ../shared)", dir.display()));
        let mut seen = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let vector: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let name = vector["name"].as_str().unwrap();
            let cup = vector["dialect"].as_str() == Some("cup_bcd");
            let wire = hex::decode(vector["framed_hex"].as_str().unwrap()).unwrap();
            let mut codec = FrameCodec::new(Framing::Binary2, cup, FRAME_BYTES_DEFAULT_MAX);
            let decoded = decode_chunks(&mut codec, &[&wire]);
            if vector["expected"].as_str() == Some("framing_error") {
                let err = decoded.expect_err(name);
                assert!(!matches!(err, FrameError::Io(_)), "{name}: {err}");
            } else {
                let frames = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(frames.len(), 1, "{name}");
                let len = vector["length_prefix"].as_u64().unwrap() as usize;
                match &frames[0] {
                    Frame::Message { body, .. } => {
                        assert_eq!(body.len() + if cup { 11 } else { 0 }, len, "{name}")
                    }
                    Frame::Undersized { len: got } => {
                        assert_eq!(*got, len, "{name}");
                        assert_eq!(vector["expected"], "message_error_drop", "{name}");
                    }
                    Frame::KeepAlive => panic!("{name}: keep-alive"),
                }
            }
            seen += 1;
        }
        assert!(seen >= 30, "only {seen} vectors in {}", dir.display());
    }

    #[test]
    fn over_max_is_rejected_on_the_header_without_reserving() {
        for framing in [Framing::Binary2, Framing::Ascii4, Framing::Bcd2] {
            let mut codec = FrameCodec::new(framing, false, 100);
            let mut head = BytesMut::new();
            framing.put_header(101, &mut head);
            let capacity = head.capacity();
            let err = codec.decode(&mut head).unwrap_err();
            assert!(
                matches!(err, FrameError::TooLong { len: 101, max: 100 }),
                "{err}"
            );
            assert_eq!(head.capacity(), capacity);
        }
    }

    #[test]
    fn zero_and_invalid_decimal_headers_are_frame_errors() {
        let mut bcd = FrameCodec::new(Framing::Bcd2, false, 8192);
        assert!(matches!(
            bcd.decode(&mut BytesMut::from(&[0u8, 0][..])),
            Err(FrameError::ZeroLength)
        ));
        assert!(matches!(
            bcd.decode(&mut BytesMut::from(&[0x0a, 0x00][..])),
            Err(FrameError::InvalidLength)
        ));
        let mut ascii = FrameCodec::new(Framing::Ascii4, false, 8192);
        assert!(matches!(
            ascii.decode(&mut BytesMut::from(&b"01x0"[..])),
            Err(FrameError::InvalidLength)
        ));
    }

    #[test]
    fn partial_frame_reserves_only_the_announced_length() {
        let mut codec = FrameCodec::new(Framing::Ascii4, false, 8192);
        let mut buf = BytesMut::from(&b"0010abc"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() < 64, "capacity {}", buf.capacity());
    }

    #[test]
    fn reply_over_the_limit_is_an_encode_error() {
        let mut codec = FrameCodec::new(Framing::Ascii4, false, 8192);
        let err = codec
            .encode(message(&[0u8; 10_000]), &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, FrameError::ReplyTooLong { .. }));
    }

    proptest::proptest! {
        /// Arbitrary bytes, cut anywhere, never panic and never yield a frame over the limit.
        #[test]
        fn arbitrary_bytes_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            cuts in proptest::collection::vec(0usize..700, 0..6),
            framing in 0usize..3,
            cup in proptest::prelude::any::<bool>(),
        ) {
            let framing = [Framing::Binary2, Framing::Ascii4, Framing::Bcd2][framing];
            let mut codec = FrameCodec::new(framing, cup, 256);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([data.len()]) {
                chunks.push(&data[from..cut]);
                from = cut;
            }
            if let Ok(frames) = decode_chunks(&mut codec, &chunks) {
                for frame in frames {
                    if let Frame::Message { body, .. } = frame {
                        proptest::prop_assert!(body.len() <= 256);
                    }
                }
            }
        }
    }
}
