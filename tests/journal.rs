//! Behaviour of the durable journal: round trips, group commit, recovery, faults, snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use refundgate::journal::record::{self, RECORD_HEADER_BYTES};
use refundgate::journal::segment::{self, SEGMENT_HEADER_BYTES};
use refundgate::journal::storage::DirLock;
use refundgate::journal::{
    verify, Durability, Faults, FaultyStorage, FsStorage, Journal, JournalError, Options, Storage,
    StorageFile, StoreError,
};

const SMALL_SEGMENT_BYTES: u64 = 8192;

fn payload(i: u64) -> Vec<u8> {
    // 40..=120 bytes, like ledger events, varying so batches differ in size.
    let len = 40 + (i * 37 % 81) as usize;
    let mut p = format!("event {i:08} ").into_bytes();
    p.resize(len, b'a' + (i % 26) as u8);
    p
}

fn fixed_payload(i: u64) -> Vec<u8> {
    let mut p = format!("fixed {i:08} ").into_bytes();
    p.resize(50, b'x');
    p
}

fn small() -> Options {
    Options {
        segment_bytes: SMALL_SEGMENT_BYTES,
        ..Options::default()
    }
}

/// Segments of 1 MiB: the tests stay quick, the layout is the production one.
fn medium() -> Options {
    Options {
        segment_bytes: 1024 * 1024,
        ..Options::default()
    }
}

fn faulty(segment_bytes: u64) -> (Options, Arc<Faults>) {
    let (storage, faults) = FaultyStorage::new();
    let options = Options {
        segment_bytes,
        storage: Arc::new(storage),
        ..medium()
    };
    (options, faults)
}

/// Opens, replays everything, closes; returns the snapshot seq and the records.
fn reopen(dir: &Path, options: Options) -> (u64, Vec<(u64, Vec<u8>)>) {
    let (journal, recovered) = Journal::open(dir, options).unwrap();
    let mut records = Vec::new();
    let applied = recovered
        .replay(|seq, payload| records.push((seq, payload.to_vec())))
        .unwrap();
    assert_eq!(applied, records.len() as u64);
    assert_eq!(applied, recovered.records_to_replay());
    drop(journal);
    (recovered.snapshot().map_or(0, |s| s.seq), records)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn dir_state(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Offset of record `n` (1-based) in the first segment when every payload is `fixed_payload`.
fn fixed_offset(n: u64) -> u64 {
    SEGMENT_HEADER_BYTES as u64 + (n - 1) * (RECORD_HEADER_BYTES as u64 + 50)
}

fn write_fixed(dir: &Path, count: u64) {
    let (journal, _) = Journal::open(dir, medium()).unwrap();
    for i in 1..=count {
        assert_eq!(journal.append_blocking(fixed_payload(i)).unwrap(), i);
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut data = fs::read(path).unwrap();
    data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    fs::write(path, data).unwrap();
}

#[test]
fn appends_replay_in_order_across_segment_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    {
        let (journal, recovered) = Journal::open(&dir, small()).unwrap();
        assert_eq!(recovered.last_seq(), 0);
        for i in 1..=1000 {
            assert_eq!(journal.append_blocking(payload(i)).unwrap(), i);
        }
        assert_eq!(journal.durable_seq(), 1000);
    }
    assert!(segment_files(&dir).len() > 5, "rotation happened");
    let (snapshot_seq, records) = reopen(&dir, small());
    assert_eq!(snapshot_seq, 0);
    let expected: Vec<_> = (1..=1000).map(|i| (i, payload(i))).collect();
    assert_eq!(records, expected);

    let (journal, _) = Journal::open(&dir, small()).unwrap();
    assert_eq!(journal.append_blocking(payload(1001)).unwrap(), 1001);
    drop(journal);
    let report = verify(&dir).unwrap();
    assert_eq!(
        (report.records, report.first_seq, report.last_seq),
        (1001, Some(1), Some(1001))
    );
    assert_eq!(report.torn_tail, None);
    let text = refundgate::journal::run_verify(&dir).unwrap();
    assert!(text.contains("records:    1001"), "{text}");
    assert!(text.contains("torn tail:  no"), "{text}");
}

#[test]
fn payloads_outside_the_limits_are_refused_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
    assert!(matches!(
        journal.append_blocking(Vec::new()),
        Err(StoreError::PayloadSize { len: 0, .. })
    ));
    let too_big = vec![1u8; journal.payload_max() + 1];
    assert!(matches!(
        journal.append_blocking(too_big),
        Err(StoreError::PayloadSize { .. })
    ));
    let biggest = vec![1u8; journal.payload_max()];
    assert_eq!(journal.append_blocking(biggest).unwrap(), 1);
    assert_eq!(journal.append_blocking(payload(2)).unwrap(), 2);
}

#[test]
fn concurrent_appenders_share_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(1024 * 1024);
    let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
    let journal = Arc::new(journal);
    let syncs_before = faults.syncs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (tasks, per_task) = (64u64, 40u64);
    let mut seqs: Vec<u64> = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let journal = Arc::clone(&journal);
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..per_task {
                        seqs.push(journal.append(payload(t * 1000 + i)).await.unwrap());
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await.unwrap());
        }
        all
    });
    let appends = tasks * per_task;
    // The background preallocation of the next segment adds at most one sync.
    let syncs = faults.syncs() - syncs_before;
    let batches = journal.batches();
    assert!(syncs <= batches + 1, "syncs {syncs}, batches {batches}");
    assert!(
        syncs * 2 < appends,
        "{syncs} syncs for {appends} appends: group commit did not group"
    );
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=appends).collect::<Vec<_>>());
    drop(journal);
    let (_, records) = reopen(tmp.path(), options);
    assert_eq!(records.len() as u64, appends);
}

#[test]
fn a_full_queue_makes_appenders_wait_not_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let options = Options {
        queue_capacity: 2,
        batch_records_max: 2,
        ..small()
    };
    let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
    let journal = Arc::new(journal);
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || {
                for i in 0..25 {
                    journal.append_blocking(payload(t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(journal.durable_seq(), 400);
    drop(journal);
    assert_eq!(reopen(tmp.path(), options).1.len(), 400);
}

#[test]
fn a_torn_tail_is_zeroed_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixed(tmp.path(), 10);
    let seg = segment_files(tmp.path()).remove(0);
    // The last record's second half never reached the disk; garbage sits in its payload.
    patch(&seg, fixed_offset(10) + 30, &[0u8; 36]);
    patch(&seg, fixed_offset(10) + 20, b"\xde\xad");
    let before = dir_state(tmp.path());
    let report = verify(tmp.path()).unwrap();
    assert_eq!(dir_state(tmp.path()), before, "verify changes nothing");
    let (path, offset, _) = report.torn_tail.clone().unwrap();
    assert_eq!((path, offset), (seg.clone(), fixed_offset(10)));
    assert_eq!(report.last_seq, Some(9));

    let (journal, recovered) = Journal::open(tmp.path(), medium()).unwrap();
    assert!(recovered.torn_tail());
    let mut seen = Vec::new();
    recovered.replay(|seq, _| seen.push(seq)).unwrap();
    assert_eq!(seen, (1..=9).collect::<Vec<_>>());
    assert_eq!(
        journal.append_blocking(b"after the tear".to_vec()).unwrap(),
        10
    );
    drop(journal);

    let (_, records) = reopen(tmp.path(), medium());
    assert_eq!(records.len(), 10);
    assert_eq!(records[9], (10, b"after the tear".to_vec()));
    assert_eq!(verify(tmp.path()).unwrap().torn_tail, None);
}

#[test]
fn a_record_cut_off_at_the_end_of_the_segment_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixed(tmp.path(), 3);
    let seg = segment_files(tmp.path()).remove(0);
    // A length word pointing past the end of the segment, then zeros.
    patch(&seg, fixed_offset(4), &(60_000u32).to_le_bytes());
    patch(&seg, fixed_offset(4) + 4, b"junk");
    let (_, records) = reopen(tmp.path(), medium());
    assert_eq!(records.len(), 3);
}

#[test]
fn corruption_before_the_tail_is_refused_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixed(tmp.path(), 10);
    let seg = segment_files(tmp.path()).remove(0);
    patch(&seg, fixed_offset(5) + 20, b"X");
    let before = dir_state(tmp.path());

    let error = Journal::open(tmp.path(), medium()).unwrap_err();
    match &error {
        JournalError::Corrupt { path, offset, .. } => {
            assert_eq!((path, *offset), (&seg, fixed_offset(5)));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("00000000000000000000.seg"), "{message}");
    assert!(
        message.contains(&format!("byte {}", fixed_offset(5))),
        "{message}"
    );
    assert!(
        !message.contains("fixed 0000"),
        "no payload bytes in errors: {message}"
    );
    assert_eq!(error.exit_code(), 74);
    assert_eq!(dir_state(tmp.path()), before, "nothing changed");
    assert!(matches!(
        verify(tmp.path()),
        Err(JournalError::Corrupt { .. })
    ));
}

#[test]
fn a_seq_gap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixed(tmp.path(), 4);
    let seg = segment_files(tmp.path()).remove(0);
    let mut skipped = Vec::new();
    record::encode(6, &fixed_payload(6), &mut skipped);
    patch(&seg, fixed_offset(5), &skipped);
    let error = Journal::open(tmp.path(), medium()).unwrap_err();
    assert!(
        matches!(error, JournalError::SeqGap { expected: 5, found: 6, offset, .. } if offset == fixed_offset(5)),
        "{error:?}"
    );
}

#[test]
fn another_format_version_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let mut header = segment::encode_header(0).to_vec();
    header[8..12].copy_from_slice(&2u32.to_le_bytes());
    header.resize(4096, 0);
    fs::write(tmp.path().join(segment::segment_file_name(0)), &header).unwrap();
    let before = dir_state(tmp.path());

    let error = Journal::open(tmp.path(), medium()).unwrap_err();
    assert!(
        matches!(
            error,
            JournalError::FormatVersion {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.exit_code(), 74);
    assert!(error.to_string().contains("version 2"));
    assert_eq!(
        dir_state(tmp.path()),
        before,
        "nothing overwritten or added"
    );

    fs::write(
        tmp.path().join(segment::segment_file_name(0)),
        b"not a journal at all",
    )
    .unwrap();
    let error = Journal::open(tmp.path(), medium()).unwrap_err();
    assert!(
        matches!(error, JournalError::NotJournal { .. }),
        "{error:?}"
    );
}

#[test]
fn a_read_only_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(SMALL_SEGMENT_BYTES);
    faults.set_read_only(true);
    let error = Journal::open(tmp.path(), options.clone()).unwrap_err();
    assert!(
        matches!(error, JournalError::NotWritable { .. }),
        "{error:?}"
    );
    assert_eq!(error.exit_code(), 74);
    assert!(error.to_string().contains("read-only"), "{error}");
    assert!(dir_state(tmp.path()).is_empty());

    // An existing journal on a storage that turned read-only is not touched either.
    faults.set_read_only(false);
    drop(Journal::open(tmp.path(), options.clone()).unwrap());
    let before = dir_state(tmp.path());
    faults.set_read_only(true);
    let error = Journal::open(tmp.path(), options).unwrap_err();
    assert!(
        matches!(error, JournalError::NotWritable { .. }),
        "{error:?}"
    );
    assert_eq!(dir_state(tmp.path()), before);

    // A directory the process may not write to (EACCES, as with mode 0555 for a non-root
    // user) is the same clear error. CI runs as root, which ignores permission bits, so the
    // refusal comes from the storage seam rather than from chmod.
    let denied = tmp.path().join("denied");
    let options = Options {
        storage: Arc::new(PermissionDenied),
        ..medium()
    };
    let error = Journal::open(&denied, options).unwrap_err();
    assert!(
        matches!(error, JournalError::NotWritable { .. }),
        "{error:?}"
    );
    assert_eq!(error.exit_code(), 74);
    assert!(!denied.exists(), "nothing created");
    // And an existing directory that may not be written to.
    fs::create_dir(&denied).unwrap();
    let options = Options {
        storage: Arc::new(PermissionDenied),
        ..medium()
    };
    let error = Journal::open(&denied, options).unwrap_err();
    assert!(
        matches!(error, JournalError::NotWritable { .. }),
        "{error:?}"
    );
    assert!(dir_state(&denied).is_empty(), "nothing written");
}

/// The real file system, except that every creation and writable open is refused with
/// `PermissionDenied`, as in a directory without write permission.
#[derive(Debug)]
struct PermissionDenied;

fn denied() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::PermissionDenied)
}

impl Storage for PermissionDenied {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        Err(denied())
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        FsStorage.list(dir)
    }
    fn create(&self, _: &Path) -> std::io::Result<Box<dyn StorageFile>> {
        Err(denied())
    }
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<Box<dyn StorageFile>> {
        if writable {
            return Err(denied());
        }
        FsStorage.open(path, false)
    }
    fn rename(&self, _: &Path, _: &Path) -> std::io::Result<()> {
        Err(denied())
    }
    fn remove(&self, _: &Path) -> std::io::Result<()> {
        Err(denied())
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        FsStorage.sync_dir(dir)
    }
    fn lock_dir(&self, _: &Path) -> std::io::Result<DirLock> {
        Err(denied())
    }
}

#[test]
fn a_missing_directory_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a").join("b");
    let (journal, _) = Journal::open(&dir, small()).unwrap();
    assert_eq!(journal.append_blocking(payload(1)).unwrap(), 1);
    assert!(dir.is_dir());
    assert!(
        verify(&tmp.path().join("absent")).is_err(),
        "verify creates nothing"
    );
    assert!(!tmp.path().join("absent").exists());
}

/// Appends from `threads` threads at once; returns the outcomes.
fn burst(
    journal: &Arc<Journal>,
    threads: u64,
    base: u64,
) -> Vec<(Vec<u8>, Result<u64, StoreError>)> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let journal = Arc::clone(journal);
            std::thread::spawn(move || {
                let p = payload(base + t);
                (p.clone(), journal.append_blocking(p))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_failed_write_or_sync_fails_every_waiter_and_replay_is_exact_after_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(1024 * 1024);
    let mut acknowledged = Vec::new();
    {
        let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
        let journal = Arc::new(journal);
        for i in 1..=5 {
            acknowledged.push((journal.append_blocking(payload(i)).unwrap(), payload(i)));
        }
        for (fault, base) in [("write", 100), ("sync", 200)] {
            match fault {
                "write" => faults.set_fail_writes(true),
                _ => faults.set_fail_syncs(true),
            }
            for (_, outcome) in burst(&journal, 16, base) {
                assert!(
                    matches!(outcome, Err(StoreError::Unavailable(_))),
                    "{outcome:?}"
                );
            }
            assert!(journal.failed_batches() >= 1);
            faults.set_fail_writes(false);
            faults.set_fail_syncs(false);
            // A short record after a long failed region: the rest of the region must be
            // wiped, or the failed records would come back at replay.
            let p = b"short".to_vec();
            acknowledged.push((journal.append_blocking(p.clone()).unwrap(), p));
            for (p, outcome) in burst(&journal, 4, base + 50) {
                acknowledged.push((outcome.unwrap(), p));
            }
        }
        assert!(faults.injected() >= 2);
    }
    acknowledged.sort();
    let expected: Vec<u64> = (1..=acknowledged.len() as u64).collect();
    assert_eq!(
        acknowledged.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        expected,
        "no seq gaps"
    );
    let (_, records) = reopen(tmp.path(), options);
    assert_eq!(
        records, acknowledged,
        "replay is exactly what was acknowledged"
    );
}

#[test]
fn faults_across_rotations_never_lose_or_resurrect_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(SMALL_SEGMENT_BYTES);
    let mut acknowledged = Vec::new();
    {
        let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
        for i in 1..=600u64 {
            faults.set_fail_writes(i % 7 == 3);
            faults.set_fail_syncs(i % 11 == 5 || i % 13 == 0);
            // Failures come with long payloads, successes often with short ones.
            let p = if i % 2 == 0 {
                payload(i)
            } else {
                vec![b's'; 1 + (i % 5) as usize]
            };
            match journal.append_blocking(p.clone()) {
                Ok(seq) => acknowledged.push((seq, p)),
                Err(StoreError::Unavailable(_)) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        faults.set_fail_writes(false);
        faults.set_fail_syncs(false);
        let p = payload(9999);
        acknowledged.push((journal.append_blocking(p.clone()).unwrap(), p));
    }
    assert!(segment_files(tmp.path()).len() > 2, "rotation happened");
    assert!(acknowledged.len() > 300);
    let (_, records) = reopen(tmp.path(), options);
    assert_eq!(records, acknowledged);
}

#[test]
fn a_snapshot_removes_covered_segments_and_replay_starts_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
        for i in 1..=500 {
            journal.append_blocking(payload(i)).unwrap();
        }
        let segments_before = segment_files(tmp.path());
        let report = journal.snapshot(400, b"ledger state at 400").unwrap();
        assert!(report.segments_removed > 0);
        // The background preallocation may add a segment meanwhile: compare sets.
        let after = segment_files(tmp.path());
        let removed: Vec<_> = segments_before
            .iter()
            .filter(|s| !after.contains(s))
            .cloned()
            .collect();
        assert_eq!(removed, segments_before[..report.segments_removed]);
        assert_eq!(journal.snapshot_seq(), 400);
        for i in 501..=510 {
            journal.append_blocking(payload(i)).unwrap();
        }
        assert!(matches!(
            journal.snapshot(511, b"ahead"),
            Err(JournalError::SnapshotSeq { .. })
        ));
        assert!(matches!(
            journal.snapshot(399, b"behind"),
            Err(JournalError::SnapshotSeq { .. })
        ));
    }
    let (journal, mut recovered) = Journal::open(tmp.path(), small()).unwrap();
    let snapshot = recovered.take_snapshot().unwrap();
    assert_eq!(
        (snapshot.seq, snapshot.bytes.as_slice()),
        (400, &b"ledger state at 400"[..])
    );
    let mut seen = Vec::new();
    recovered
        .replay(|seq, p| seen.push((seq, p.to_vec())))
        .unwrap();
    assert_eq!(
        seen,
        (401..=510).map(|i| (i, payload(i))).collect::<Vec<_>>()
    );

    // A second snapshot replaces the first.
    let report = journal.snapshot(510, b"ledger state at 510").unwrap();
    assert_eq!(report.snapshots_removed, 1);
    drop(journal);
    let report = verify(tmp.path()).unwrap();
    assert_eq!(report.snapshot_seq, Some(510));
    let (snapshot_seq, records) = reopen(tmp.path(), small());
    assert_eq!((snapshot_seq, records.len()), (510, 0));
    let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
    assert_eq!(journal.append_blocking(payload(511)).unwrap(), 511);
}

#[test]
fn a_damaged_snapshot_falls_back_and_missing_records_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
        for i in 1..=300 {
            journal.append_blocking(payload(i)).unwrap();
        }
        journal.snapshot(300, b"state").unwrap();
    }
    let snap = tmp
        .path()
        .join(refundgate::journal::snapshot::snapshot_file_name(300));
    let mut bytes = fs::read(&snap).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    fs::write(&snap, bytes).unwrap();
    let error = Journal::open(tmp.path(), small()).unwrap_err();
    assert!(
        matches!(error, JournalError::MissingPrefix { .. }),
        "{error:?}"
    );
}

#[test]
fn unsafe_no_fsync_still_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::UnsafeNoFsync,
        ..small()
    };
    {
        let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
        for i in 1..=50 {
            journal.append_blocking(payload(i)).unwrap();
        }
    }
    assert_eq!(reopen(tmp.path(), options).1.len(), 50);
}

#[test]
fn a_failed_batch_is_wiped_at_shutdown_when_storage_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(1024 * 1024);
    {
        let (journal, _) = Journal::open(tmp.path(), options.clone()).unwrap();
        assert_eq!(journal.append_blocking(payload(1)).unwrap(), 1);
        faults.set_fail_syncs(true);
        assert!(journal.append_blocking(payload(2)).is_err());
        faults.set_fail_syncs(false);
    }
    let (_, records) = reopen(tmp.path(), options);
    assert_eq!(records, vec![(1, payload(1))]);
}

#[test]
fn a_directory_is_opened_by_one_journal_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
    let error = Journal::open(tmp.path(), small()).unwrap_err();
    assert!(matches!(error, JournalError::Locked { .. }), "{error:?}");
    assert_eq!(error.exit_code(), 74);
    assert_eq!(journal.append_blocking(payload(1)).unwrap(), 1);
    drop(journal);
    let (journal, _) = Journal::open(tmp.path(), small()).unwrap();
    assert_eq!(journal.append_blocking(payload(2)).unwrap(), 2);
}

#[test]
fn journal_files_are_created_0600_in_0700_directories() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data/journal");
    {
        let (journal, _) = Journal::open(&dir, small()).unwrap();
        for i in 1..=300 {
            journal.append_blocking(payload(i)).unwrap();
        }
        journal.snapshot(300, b"snapshot bytes").unwrap();
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "journal directory");
    assert_eq!(mode(dir.parent().unwrap()), 0o700, "created parent");
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "segments, snapshot and lock checked");
}

/// Records are validated at open. A segment changed between the open and the replay (record
/// 3's seq rewritten to 9) is refused by the replay and by the read-only view: nothing from the
/// changed record on is handed out.
#[test]
fn a_record_changed_after_the_open_is_refused_by_replay_and_by_the_read_only_view() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixed(tmp.path(), 5);
    let (journal, recovered) = Journal::open(tmp.path(), medium()).unwrap();
    let view = refundgate::journal::ReadOnly::open(tmp.path()).unwrap();
    let first = segment_files(tmp.path())[0].clone();
    patch(&first, fixed_offset(3) + 8, &9u64.to_le_bytes());
    let mut applied = Vec::new();
    let err = recovered.replay(|seq, _| applied.push(seq)).unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    assert_eq!(applied, vec![1, 2]);
    let mut read = Vec::new();
    let err = view.records(0, |seq, _| read.push(seq)).unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    assert_eq!(read, vec![1, 2]);
    drop(journal);
}

#[test]
fn records_enqueued_under_one_appender_take_consecutive_seqs_and_replay_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(dir.path(), medium()).unwrap();
        let first = journal.enqueue(payload(0)).unwrap();
        let tickets: Vec<_> = {
            let mut appender = journal.appender();
            let t = (1..=5)
                .map(|i| appender.enqueue(payload(i)).unwrap())
                .collect();
            // Refused like `enqueue` refuses it, and the appender goes on.
            assert!(matches!(
                appender.enqueue(Vec::new()),
                Err(StoreError::PayloadSize { .. })
            ));
            t
        };
        let seqs: Vec<u64> = tickets.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, (first.seq + 1..=first.seq + 5).collect::<Vec<_>>());
        // The writer was woken once the appender let go: every record becomes durable.
        let last = *tickets.last().unwrap();
        assert_eq!(
            futures::executor::block_on(journal.durable(last)).unwrap(),
            last.seq
        );
        drop(journal);
    }
    let (_, records) = reopen(dir.path(), medium());
    let payloads: Vec<Vec<u8>> = records.into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, (0..=5).map(payload).collect::<Vec<_>>());
}

#[test]
fn a_bounded_wait_on_a_hung_disk_ends_at_its_deadline_and_the_record_is_durable_after_all() {
    let dir = tempfile::tempdir().unwrap();
    let (options, faults) = faulty(1024 * 1024);
    let (journal, _) = Journal::open(dir.path(), options).unwrap();
    // A healthy disk: the bounded wait ends with the outcome, well before its deadline.
    let t = journal.enqueue(b"before".to_vec()).unwrap();
    let far = refundgate::clock::monotonic() + std::time::Duration::from_secs(60);
    assert!(matches!(
        futures::executor::block_on(journal.durable_until(t, far)),
        Ok(Ok(_))
    ));
    faults.set_hang_syncs(true);
    let t = journal.enqueue(b"hung".to_vec()).unwrap();
    let deadline = std::time::Duration::from_millis(300);
    let started = refundgate::clock::monotonic();
    let waited = futures::executor::block_on(journal.durable_until(t, started + deadline));
    let took = refundgate::clock::monotonic() - started;
    assert!(matches!(waited, Err(refundgate::journal::DeadlinePassed)));
    // Woken by the watchdog, not by any outcome: at most about two ticks late.
    let tick = refundgate::journal::WATCHDOG_TICK;
    assert!(
        took >= deadline && took <= deadline + 4 * tick + std::time::Duration::from_millis(200),
        "the wait ended after {took:?} with a deadline of {deadline:?}"
    );
    // The disk comes back: the record the deadline left open is durable.
    faults.set_hang_syncs(false);
    let far = refundgate::clock::monotonic() + std::time::Duration::from_secs(60);
    assert!(matches!(
        futures::executor::block_on(journal.durable_until(t, far)),
        Ok(Ok(_))
    ));
}
