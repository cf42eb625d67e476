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
