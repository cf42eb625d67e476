//! The journal record reader and the recovery scan behind `journal verify` and every open.
//!
//! Input byte 0 picks the mode. Raw: the rest is a segment body after a valid header. Built:
//! the input describes records (encoded with valid checksums), damage (a byte flipped, a
//! garbage tail), a second segment (maybe opening with a void marker, maybe with garbage)
//! and a snapshot file. The directory lives in memory
//! ([`MemStorage`]) and is scanned read-only; the scan must not panic and must not take time
//! beyond linear in the bytes (libFuzzer's `-timeout` catches a slow one).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use refundgate::journal::record::{self, Decoded};
use refundgate::journal::segment::{encode_header, segment_file_name};
use refundgate::journal::snapshot::snapshot_file_name;
use refundgate::journal::{verify_with, Storage};
use refundgate_fuzz::{snapshot_file, Input, MemStorage};

fuzz_target!(|data: &[u8]| {
    // The record reader on its own.
    match record::decode(data) {
        Decoded::Record {
            payload,
            encoded_len,
            ..
        } => {
            assert_eq!(encoded_len, record::encoded_len(payload.len()));
            assert!(encoded_len <= data.len());
            assert_eq!(record::frame(data).map(|(_, p)| p), Some(payload));
        }
        Decoded::End | Decoded::Invalid(_) => {}
    }
    let _ = record::frame(data);
    let _ = record::is_zero(data);

    let mut input = Input(data);
    let mode = input.u8();
    let mem = MemStorage::default();
    let dir = Path::new("/j");
    let mut seg = encode_header(0).to_vec();
    if mode & 1 == 0 {
        seg.extend_from_slice(input.bytes(usize::MAX));
        mem.put(&dir.join(segment_file_name(0)), seg);
    } else {
        let records = input.u8() % 16;
        let mut seq = u64::from(input.u8() % 4);
        for _ in 0..records {
            let step = input.u8();
            seq = if step < 250 {
                seq + 1
            } else {
                seq + u64::from(step) - 248
            };
            let len = usize::from(input.u8() % 64) + 1;
            let mut payload = input.bytes(len).to_vec();
            payload.resize(len, 0xA5);
            record::encode(seq, &payload, &mut seg);
        }
        let flip = usize::from(input.u16());
        let xor = input.u8();
        if let Some(b) = seg.get_mut(32 + flip) {
            *b ^= xor;
        }
        let tail = usize::from(input.u8());
        seg.extend_from_slice(input.bytes(tail));
        let zeros = usize::from(input.u8()) * 8;
        seg.resize(seg.len() + zeros, 0);
        let flags = input.u8();
        if flags & 1 != 0 {
            // A second segment holding the next record, or (as the writer leaves one after a
            // failed write) a void marker from some seq and the records from there.
            let mut next = encode_header(1).to_vec();
            let first = if flags & 4 != 0 {
                let from = u64::from(input.u8() % 24);
                record::encode_void(from, &mut next);
                from
            } else {
                seq + 1
            };
            record::encode(first, b"next", &mut next);
            if flags & 8 != 0 {
                let garbage = usize::from(input.u8());
                next.extend_from_slice(input.bytes(garbage));
            }
            next.resize(next.len() + 64, 0);
            mem.put(&dir.join(segment_file_name(1)), next);
        }
        if flags & 2 != 0 {
            let snap_seq = u64::from(input.u8() % 24);
            let n = usize::from(input.u8());
            mem.put(
                &dir.join(snapshot_file_name(snap_seq)),
                snapshot_file(snap_seq, input.bytes(n)),
            );
        }
        mem.put(&dir.join(segment_file_name(0)), seg);
    }
    let storage: Arc<dyn Storage> = Arc::new(mem);
    match verify_with(&storage, dir) {
        Ok(report) => {
            let _ = report.to_string();
            if let (Some(first), Some(last)) = (report.first_seq, report.last_seq) {
                assert!(first <= last, "{report:?}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
