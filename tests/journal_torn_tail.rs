//! Issue 17: a torn tail of garbage whose length words look plausible made the recovery scan
//! checksum up to 64 KiB from every byte offset: minutes on a large tail, at every start and
//! every `journal verify`. The scan is linear now (its unit tests count the work); here the
//! whole open / verify path is driven over an 8 MiB tail of that kind, which the old scan
//! needed ~8.5 GB of checksumming for. No timing is asserted: the bound is the data size.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs;
use std::path::{Path, PathBuf};

use refundgate::journal::record::RECORD_HEADER_BYTES;
use refundgate::journal::segment::SEGMENT_HEADER_BYTES;
use refundgate::journal::{verify, Journal, JournalError, Options};

const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const TAIL_BYTES: usize = 8 * 1024 * 1024;

fn options() -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        ..Options::default()
    }
}

fn segment(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files.remove(0)
}

/// Record-header-shaped garbage: length 65,280, seq 5, checksum wrong, repeated.
fn plausible_garbage(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    let mut x = 0x9E37_79B9u32;
    while out.len() < bytes {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        out.extend_from_slice(&0xFF00u32.to_le_bytes());
        out.extend_from_slice(&x.to_le_bytes());
        out.extend_from_slice(&5u64.to_le_bytes());
    }
    out.truncate(bytes);
    out
}

fn with_tail(tail: &[u8]) -> (tempfile::TempDir, PathBuf, u64) {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(tmp.path(), options()).unwrap();
        for i in 1..=4u64 {
            assert_eq!(journal.append_blocking(vec![i as u8; 50]).unwrap(), i);
        }
    }
    let seg = segment(tmp.path());
    let end = SEGMENT_HEADER_BYTES + 4 * (RECORD_HEADER_BYTES + 50);
    let mut data = fs::read(&seg).unwrap();
    data[end..end + tail.len()].copy_from_slice(tail);
    fs::write(&seg, data).unwrap();
    (tmp, seg, end as u64)
}

#[test]
fn a_large_plausible_garbage_tail_is_a_torn_tail_found_in_one_pass() {
    let tail = plausible_garbage(TAIL_BYTES);
    let garbage = tail.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let (tmp, seg, end) = with_tail(&tail);
    let report = verify(tmp.path()).unwrap();
    assert_eq!(report.last_seq, Some(4));
    assert_eq!(report.torn_tail, Some((seg, end, garbage)));

    let (journal, recovered) = Journal::open(tmp.path(), options()).unwrap();
    assert!(recovered.torn_tail());
    assert_eq!(journal.append_blocking(b"after".to_vec()).unwrap(), 5);
    drop(journal);
    assert_eq!(verify(tmp.path()).unwrap().torn_tail, None);
}

#[test]
fn a_valid_record_after_the_garbage_is_still_corruption() {
    let mut tail = plausible_garbage(TAIL_BYTES);
    // A whole record with seq 6 after the garbage: damage in the middle of the log.
    let mut rec = Vec::new();
    refundgate::journal::record::encode(6, b"acknowledged", &mut rec);
    let at = tail.len() - rec.len() - 100;
    tail[at..at + rec.len()].copy_from_slice(&rec);
    let (tmp, _, _) = with_tail(&tail);
    assert!(matches!(
        verify(tmp.path()),
        Err(JournalError::Corrupt { .. })
    ));
}
