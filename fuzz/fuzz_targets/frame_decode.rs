//! The frame decoders (binary2, ascii4, bcd2; with and without the CUP TPDU + header) fed an
//! arbitrary byte stream split at arbitrary points.
//!
//! Input: byte 0 picks framing, CUP header and maximum; byte 1 the number of cuts; then the
//! cut positions; the rest is the stream. Properties: no panic; the frames (and the error that
//! ends the stream) do not depend on where the stream was split; no body over the maximum;
//! no allocation beyond the announced-and-allowed frame; every frame re-encodes to bytes that
//! decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate_fuzz::{largest_alloc, split};
use tokio_util::codec::{Decoder, Encoder};

const MAXIMA: [usize; 5] = [16, 64, 256, 8192, 65535];

/// Decodes `chunks` as they arrive, then EOF: the frames, the error that ended the stream, and
/// the largest single allocation made inside the codec's `decode` / `decode_eof` calls.
fn run(codec: &mut FrameCodec, chunks: &[&[u8]]) -> ((Vec<Frame>, Option<String>), usize) {
    let mut largest = 0;
    let r = run_inner(codec, chunks, &mut largest);
    (r, largest)
}

fn run_inner(
    codec: &mut FrameCodec,
    chunks: &[&[u8]],
    largest: &mut usize,
) -> (Vec<Frame>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let (r, size) = largest_alloc(|| codec.decode(&mut buf));
            *largest = (*largest).max(size);
            match r {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    loop {
        let (r, size) = largest_alloc(|| codec.decode_eof(&mut buf));
        *largest = (*largest).max(size);
        match r {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&ncuts, rest)) = rest.split_first() else {
        return;
    };
    let framing = [Framing::Binary2, Framing::Ascii4, Framing::Bcd2][usize::from(mode % 3)];
    let cup = mode & 0x04 != 0;
    let max = MAXIMA[usize::from(mode >> 3) % MAXIMA.len()];
    let ncuts = usize::from(ncuts % 8).min(rest.len());
    let (cuts, stream) = rest.split_at(ncuts);

    let (whole, _) = run(&mut FrameCodec::new(framing, cup, max), &[stream]);
    let mut codec = FrameCodec::new(framing, cup, max);
    let chunks = split(stream, cuts);
    let (pieces, largest) = run(&mut codec, &chunks);
    assert_eq!(
        whole, pieces,
        "{framing:?} cup={cup}: result depends on the split"
    );
    let allowed = codec.max_frame_bytes();
    // Our own buffer holds at most the stream; the codec may reserve one allowed frame more.
    assert!(
        largest <= 2 * (stream.len() + allowed + 16) + 64,
        "allocation of {largest} bytes for a {}-byte stream (max frame {allowed})",
        stream.len()
    );
    for frame in &whole.0 {
        match frame {
            Frame::Message { body, tpdu, header } => {
                assert!(
                    body.len() <= allowed,
                    "body of {} over {allowed}",
                    body.len()
                );
                assert_eq!(tpdu.is_some(), cup);
                assert_eq!(header.is_some(), cup);
                let mut wire = BytesMut::new();
                codec
                    .encode(frame.clone(), &mut wire)
                    .expect("a decoded frame re-encodes");
                let (again, _) = run(&mut FrameCodec::new(framing, cup, max), &[&wire]);
                assert_eq!(
                    again,
                    (vec![frame.clone()], None),
                    "frame re-encode round trip"
                );
            }
            Frame::KeepAlive => assert_eq!(framing, Framing::Ascii4),
            Frame::Undersized { len } => {
                assert!(cup);
                assert!(*len < 11);
            }
        }
        let _ = frame.reply(bytes::Bytes::from_static(b"0810"));
    }
});
