//! Record framing (sans-IO): `len u32 | crc32c u32 | seq u64 | payload`, little endian.
//!
//! `len` is the payload length (1..=[`PAYLOAD_BYTES_MAX`]); a zero length marks the end of
//! the records in a segment (segments are pre-zeroed). The CRC32C covers the length word,
//! the sequence number and the payload, so a damaged length is caught as surely as a
//! damaged payload.
//!
//! Seq 0 is never a ledger record: a record with seq 0 is a *void marker* whose payload is
//! the seq `from` (u64 LE). The writer puts one at the start of the segment it moves to after
//! a failed write: every record with a seq of `from` or above in the segments before it was
//! never acknowledged, and replay skips it (see `recovery`).

/// Bytes in front of every payload: length, CRC32C, sequence number.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest payload one record may carry (ledger events are 40–120 bytes).
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// What the bytes at a position hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record whose checksum matches.
    Record {
        /// Its sequence number.
        seq: u64,
        /// Its payload.
        payload: &'a [u8],
        /// Header plus payload: where the next record starts, relative to this one.
        encoded_len: usize,
    },
    /// A zero length word, or fewer bytes than a header: no record here.
    End,
    /// Bytes that are not a valid record; the reason names the first check that failed.
    Invalid(&'static str),
}

/// Bytes [`encode`] appends for a payload of `payload_len` bytes.
pub const fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len
}

/// Appends the record (`seq`, `payload`) to `out`.
///
/// The caller keeps `payload` within `1..=PAYLOAD_BYTES_MAX`; the journal checks it at append.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!payload.is_empty() && payload.len() <= PAYLOAD_BYTES_MAX);
    let len = (payload.len() as u32).to_le_bytes();
    let seq = seq.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&len), &seq), payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq);
    out.extend_from_slice(payload);
}

/// The seq field of a void marker.
pub const VOID_SEQ: u64 = 0;
/// Bytes of a whole void marker.
pub const VOID_BYTES: usize = encoded_len(8);

/// Appends a void marker: records from seq `from` on, before it, are void.
pub fn encode_void(from: u64, out: &mut Vec<u8>) {
    encode(VOID_SEQ, &from.to_le_bytes(), out);
}

/// The `from` of a void marker's payload (`None`: not one).
pub fn void_from(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = payload.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Decodes the record at the start of `buf` (which runs to the end of the segment).
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some(header) = buf.get(..RECORD_HEADER_BYTES) else {
        return if buf.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Invalid("truncated record header")
        };
    };
    let len = u32_at(header, 0) as usize;
    if len == 0 {
        return Decoded::End;
    }
    if len > PAYLOAD_BYTES_MAX {
        return Decoded::Invalid("record length out of range");
    }
    let Some(body) = buf.get(8..RECORD_HEADER_BYTES + len) else {
        return Decoded::Invalid("record runs past the end of the segment");
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..4]), body);
    if crc != u32_at(header, 4) {
        return Decoded::Invalid("checksum mismatch");
    }
    Decoded::Record {
        seq: u64::from_le_bytes([
            body[0], body[1], body[2], body[3], body[4], body[5], body[6], body[7],
        ]),
        payload: &body[8..],
        encoded_len: RECORD_HEADER_BYTES + len,
    }
}

/// Splits the record at the start of `buf` into (seq, payload) by its length word alone,
/// without checking the checksum: for replaying records the recovery scan already checked.
pub fn frame(buf: &[u8]) -> Option<(u64, &[u8])> {
    let len = u32_at(buf.get(..4)?, 0) as usize;
    if len == 0 || len > PAYLOAD_BYTES_MAX {
        return None;
    }
    let record = buf.get(..RECORD_HEADER_BYTES + len)?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&record[8..16]);
    Some((u64::from_le_bytes(seq), &record[RECORD_HEADER_BYTES..]))
}

/// Whether a valid record with a sequence number above `seq_after` starts anywhere in `buf`.
///
/// Recovery asks this about the bytes after the first bad record: valid records there mean
/// the damage is in the middle of the log, not a torn tail.
pub fn any_valid_record_after(buf: &[u8], seq_after: u64) -> Option<usize> {
    let last_start = buf.len().checked_sub(RECORD_HEADER_BYTES)?;
    (0..=last_start).find(|&at| {
        let len = u32_at(buf, at) as usize;
        if len == 0 || len > PAYLOAD_BYTES_MAX {
            return false;
        }
        matches!(decode(&buf[at..]), Decoded::Record { seq, .. } if seq > seq_after)
    })
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // Folding fixed-size chunks lets the compiler vectorise the check.
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips() {
        let mut out = Vec::new();
        encode(7, b"hello", &mut out);
        assert_eq!(out.len(), encoded_len(5));
        assert_eq!(
            decode(&out),
            Decoded::Record {
                seq: 7,
                payload: b"hello",
                encoded_len: 21
            }
        );
    }

    #[test]
    fn zeros_are_the_end_and_any_flipped_bit_is_invalid() {
        assert_eq!(decode(&[0; 40]), Decoded::End);
        assert_eq!(decode(&[0; 3]), Decoded::End);
        let mut out = Vec::new();
        encode(1, b"payload", &mut out);
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode(&bad), Decoded::Record { seq: 1, payload, .. } if payload == b"payload"),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn a_truncated_record_is_invalid() {
        let mut out = Vec::new();
        encode(1, b"payload", &mut out);
        assert!(matches!(decode(&out[..out.len() - 1]), Decoded::Invalid(_)));
        assert!(matches!(decode(&out[..10]), Decoded::Invalid(_)));
    }

    proptest::proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&bytes);
            let _ = frame(&bytes);
            let _ = any_valid_record_after(&bytes, 0);
        }

        #[test]
        fn any_payload_round_trips(seq in 1u64.., payload in proptest::collection::vec(proptest::num::u8::ANY, 1..300)) {
            let mut out = Vec::new();
            encode(seq, &payload, &mut out);
            out.extend_from_slice(&[0; 8]);
            let decoded = decode(&out);
            let expected = Decoded::Record { seq, payload: &payload, encoded_len: encoded_len(payload.len()) };
            proptest::prop_assert_eq!(decoded, expected);
            proptest::prop_assert_eq!(frame(&out), Some((seq, payload.as_slice())));
        }
    }

    #[test]
    fn a_void_marker_round_trips() {
        let mut out = Vec::new();
        encode_void(42, &mut out);
        assert_eq!(out.len(), VOID_BYTES);
        match decode(&out) {
            Decoded::Record { seq, payload, .. } => {
                assert_eq!(seq, VOID_SEQ);
                assert_eq!(void_from(payload), Some(42));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(void_from(b"short"), None);
    }

    #[test]
    fn valid_records_are_found_after_garbage() {
        let mut out = vec![0xAB; 13];
        encode(9, b"x", &mut out);
        assert_eq!(any_valid_record_after(&out, 8), Some(13));
        assert_eq!(any_valid_record_after(&out, 9), None);
    }
}
