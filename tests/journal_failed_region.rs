//! A failed batch, a failed clean-up of it, then a crash that keeps some of the unsynced
//! writes (the last one possibly torn at any byte): the journal must open again, replay
//! exactly what was acknowledged (plus, at most, a prefix of the batch answered as failed:
//! "outcome unknown"), and keep every record acknowledged after that.
//!
//! Found by `refundgate sim --core` (seed 25369): the clean-up zeroed the failed region in
//! place; torn, it left zeros in front of whole records of the failed batch, and the open
//! refused to start ("zero length word followed by non-zero bytes with valid records after
//! it").
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use refundgate::journal::{Journal, Options, SimDisk};

const DIR: &str = "/sim/journal";

fn payload(tag: &str, i: u64) -> Vec<u8> {
    let mut p = format!("{tag} {i:08} ").into_bytes();
    p.resize(60 + (i * 29 % 70) as usize, b'a' + (i % 26) as u8);
    p
}

fn options(disk: &SimDisk) -> Options {
    Options {
        segment_bytes: 16 * 1024,
        storage: Arc::new(disk.clone()),
        stepped: true,
        ..Options::default()
    }
}

fn open(disk: &SimDisk, seed: u64, what: &str) -> (Journal, Vec<(u64, Vec<u8>)>) {
    let (journal, recovered) = Journal::open(DIR, options(disk))
        .unwrap_or_else(|e| panic!("seed {seed}: open after {what}: {e}"));
    let mut records = Vec::new();
    recovered
        .replay(|seq, p| records.push((seq, p.to_vec())))
        .unwrap();
    (journal, records)
}

/// Appends `payloads` and steps the journal once; true if all became durable.
fn append(journal: &Journal, payloads: &[Vec<u8>]) -> bool {
    let tickets: Vec<_> = payloads
        .iter()
        .map(|p| journal.enqueue(p.clone()).unwrap())
        .collect();
    journal.step();
    tickets.iter().all(|t| journal.is_durable(*t))
}

/// `acked` then a prefix (maybe empty) of `failed`, seqs from 1 without gaps.
fn check(records: &[(u64, Vec<u8>)], acked: &[Vec<u8>], failed: &[Vec<u8>]) -> Result<(), String> {
    let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=records.len() as u64).collect();
    if seqs != expected {
        return Err(format!("seqs {seqs:?}"));
    }
    let got: Vec<&Vec<u8>> = records.iter().map(|(_, p)| p).collect();
    if got.len() < acked.len() {
        return Err(format!(
            "{} records replayed, {} acknowledged",
            got.len(),
            acked.len()
        ));
    }
    if !got[..acked.len()].iter().zip(acked).all(|(g, a)| *g == a) {
        return Err("an acknowledged record changed".into());
    }
    let extra = &got[acked.len()..];
    if extra.len() > failed.len() || !extra.iter().zip(failed).all(|(g, f)| *g == f) {
        return Err(format!(
            "{} records past the acknowledged ones are not a prefix of the failed batch",
            extra.len()
        ));
    }
    Ok(())
}

/// `retry`: after the failure, a new batch (which fails too) instead of a scrub.
fn failed_cleanup_then_crash(seed: u64, retry: bool) {
    let disk = SimDisk::new(Path::new("/sim"), seed);
    let (journal, records) = open(&disk, seed, "creation");
    assert!(records.is_empty());
    let acked: Vec<Vec<u8>> = (1..=3).map(|i| payload("acked", i)).collect();
    assert!(append(&journal, &acked), "seed {seed}: first batch");
    disk.fail_next_syncs(2);
    let failed: Vec<Vec<u8>> = (1..=4).map(|i| payload("failed", i)).collect();
    assert!(!append(&journal, &failed), "seed {seed}: the failing batch");
    let again: Vec<Vec<u8>> = (1..=2).map(|i| payload("again", i)).collect();
    if retry {
        assert!(!append(&journal, &again), "seed {seed}: the failing retry");
    } else {
        assert!(journal.scrub().is_err(), "seed {seed}: the failing scrub");
    }
    drop(journal);
    disk.crash(true);

    let (journal, records) = open(&disk, seed, "the crash");
    // A retry reuses the failed seqs: what may come back is a prefix of either batch.
    let alternative = if retry { &again } else { &failed };
    if let Err(e) = check(&records, &acked, &failed) {
        if let Err(f) = check(&records, &acked, alternative) {
            panic!("seed {seed}: after the crash: {e}; {f}");
        }
    }
    let mut known: Vec<Vec<u8>> = records.iter().map(|(_, p)| p.clone()).collect();
    let later: Vec<Vec<u8>> = (1..=5).map(|i| payload("later", i)).collect();
    assert!(
        append(&journal, &later),
        "seed {seed}: appends after the restart"
    );
    known.extend(later);
    drop(journal);
    disk.crash(true);
    let (_journal, records) = open(&disk, seed, "a second crash");
    if let Err(e) = check(&records, &known, &[]) {
        panic!("seed {seed}: after a second crash: {e}");
    }
}

#[test]
fn a_torn_cleanup_of_a_failed_batch_never_stops_the_next_start() {
    for seed in 0..400 {
        failed_cleanup_then_crash(seed, false);
    }
}

#[test]
fn a_torn_retry_of_a_failed_batch_never_stops_the_next_start() {
    for seed in 0..400 {
        failed_cleanup_then_crash(seed, true);
    }
}

#[test]
fn a_scrubbed_failed_batch_is_never_replayed() {
    for seed in 0..100 {
        let disk = SimDisk::new(Path::new("/sim"), seed);
        let (journal, _) = open(&disk, seed, "creation");
        let acked: Vec<Vec<u8>> = (1..=3).map(|i| payload("acked", i)).collect();
        assert!(append(&journal, &acked));
        disk.fail_next_syncs(1);
        let failed: Vec<Vec<u8>> = (1..=4).map(|i| payload("failed", i)).collect();
        assert!(!append(&journal, &failed));
        journal.scrub().unwrap();
        drop(journal);
        disk.crash(true);
        let (_journal, records) = open(&disk, seed, "a scrub and a crash");
        if let Err(e) = check(&records, &acked, &[]) {
            panic!("seed {seed}: a failed record came back after a scrub: {e}");
        }
    }
}

/// (seq, payload) records.
type Records = Vec<(u64, Vec<u8>)>;

/// Segment files written by hand: `segments[i]` holds (void marker from, records).
fn hand_written(dir: &std::path::Path, segments: &[(Option<u64>, Records)]) {
    use refundgate::journal::record;
    use refundgate::journal::segment::{encode_header, segment_file_name};
    std::fs::create_dir_all(dir).unwrap();
    for (i, (void, records)) in segments.iter().enumerate() {
        let mut bytes = encode_header(i as u64).to_vec();
        if let Some(from) = void {
            record::encode_void(*from, &mut bytes);
        }
        for (seq, p) in records {
            record::encode(*seq, p, &mut bytes);
        }
        bytes.resize(64 * 1024, 0);
        std::fs::write(dir.join(segment_file_name(i as u64)), bytes).unwrap();
    }
}

fn fs_options() -> Options {
    Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    }
}

#[test]
fn a_void_marker_cuts_the_records_it_voids_and_appends_go_on_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let old: Records = (1..=5).map(|s| (s, payload("old", s))).collect();
    let new: Records = (3..=4).map(|s| (s, payload("new", s))).collect();
    hand_written(tmp.path(), &[(None, old.clone()), (Some(3), new.clone())]);
    let report = refundgate::journal::verify(tmp.path()).unwrap();
    assert_eq!(
        (report.records, report.last_seq),
        (4, Some(4)),
        "{report:?}"
    );
    let (journal, recovered) = Journal::open(tmp.path(), fs_options()).unwrap();
    let mut records = Vec::new();
    recovered
        .replay(|seq, p| records.push((seq, p.to_vec())))
        .unwrap();
    let expected: Records = old[..2].iter().chain(&new).cloned().collect();
    assert_eq!(
        records, expected,
        "records 3..5 of the first segment are void"
    );
    assert_eq!(recovered.records_to_replay(), 4);
    assert_eq!(journal.append_blocking(payload("after", 5)).unwrap(), 5);
    drop(journal);
    let view = refundgate::journal::ReadOnly::open(tmp.path()).unwrap();
    let mut seen = Vec::new();
    view.records(0, |seq, p| seen.push((seq, p.to_vec())))
        .unwrap();
    let mut expected = expected;
    expected.push((5, payload("after", 5)));
    assert_eq!(seen, expected, "the read-only view skips the marker too");
}

#[test]
fn a_void_marker_past_the_last_record_refuses_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let old: Records = (1..=3).map(|s| (s, payload("old", s))).collect();
    hand_written(
        tmp.path(),
        &[(None, old), (Some(6), vec![(6, payload("new", 6))])],
    );
    let error = Journal::open(tmp.path(), fs_options()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("void marker past the last record"),
        "{error}"
    );
}

#[test]
fn a_torn_tail_followed_by_a_plain_record_in_the_next_segment_is_still_refused() {
    // Only a void marker explains records after garbage; a plain record there is damage in
    // the middle of the log, as before.
    let tmp = tempfile::tempdir().unwrap();
    let old: Records = (1..=3).map(|s| (s, payload("old", s))).collect();
    hand_written(
        tmp.path(),
        &[(None, old), (None, vec![(4, payload("new", 4))])],
    );
    let seg0 = tmp
        .path()
        .join(refundgate::journal::segment::segment_file_name(0));
    let mut bytes = std::fs::read(&seg0).unwrap();
    let end = bytes.len() - bytes.iter().rev().position(|&b| b != 0).unwrap();
    bytes[end + 8..end + 40].fill(0xAB);
    std::fs::write(&seg0, bytes).unwrap();
    let error = Journal::open(tmp.path(), fs_options()).unwrap_err();
    assert!(error.to_string().contains("refusing to start"), "{error}");
}
