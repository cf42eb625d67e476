//! The store-and-forward reader: `StoreForward::open` rebuilding its queue from a SAF journal
//! whose record payloads (and optional snapshot) come from the input, then `pending` and
//! `dead_letters` as `refundgate saf list` shows them.
//!
//! The SAF reader's record and snapshot decoders are private to `src/upstream/` (not ours to
//! change here), so the target goes through the public `open` on a real directory (under
//! `/dev/shm` when it exists): input byte 0 = flags, then records as (u16 big-endian length,
//! payload), each framed as a journal record with a valid checksum; with flag 1 the bytes
//! after the records are a SAF snapshot (with a valid journal snapshot header).
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use refundgate::clock::SystemClock;
use refundgate::journal::segment::{encode_header, segment_file_name, SEGMENT_BYTES_MIN};
use refundgate::journal::snapshot::snapshot_file_name;
use refundgate::journal::{record, Durability};
use refundgate::upstream::store_forward::{SafOptions, StoreForward};
use refundgate_fuzz::{snapshot_file, Input};

static RUN: AtomicU64 = AtomicU64::new(0);

fn base() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let root = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    root.join(format!("refundgate-fuzz-saf-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let mut seg = encode_header(0).to_vec();
    let mut seq = 0u64;
    let records = input.u8() % 16;
    for _ in 0..records {
        let len = usize::from(input.u16() % 1024);
        let payload = input.bytes(len);
        if payload.is_empty() {
            break;
        }
        seq += 1;
        record::encode(seq, payload, &mut seg);
    }
    let snapshot = (flags & 1 != 0).then(|| input.bytes(usize::MAX).to_vec());
    let size = (seg.len() as u64)
        .next_multiple_of(4096)
        .max(SEGMENT_BYTES_MIN);
    seg.resize(size as usize, 0);

    let dir = base().join(RUN.fetch_add(1, Ordering::Relaxed).to_string());
    std::fs::create_dir_all(&dir).expect("fuzz directory");
    std::fs::write(dir.join(segment_file_name(0)), &seg).expect("write segment");
    if let Some(bytes) = snapshot {
        // The snapshot covers records up to its seq; the records after it are replayed.
        let at = seq / 2;
        std::fs::write(dir.join(snapshot_file_name(at)), snapshot_file(at, &bytes))
            .expect("write snapshot");
    }
    let options = SafOptions {
        max_retries: 3,
        expiry_s: 3600,
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(100),
        durability: Durability::UnsafeNoFsync,
    };
    match StoreForward::open(&dir, options, Arc::new(SystemClock)) {
        Ok(saf) => {
            for e in saf.pending() {
                let _ = format!("{e:?}");
            }
            let _ = saf.dead_letters();
            let _ = saf.dead_total();
            drop(saf);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});
