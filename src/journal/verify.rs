//! Offline verification: the recovery scan, read-only, summarised for an operator.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::recovery;
use super::storage::{FsStorage, Storage};
use super::JournalError;

/// What [`verify`] found in a journal directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The directory checked.
    pub dir: PathBuf,
    /// Segment files.
    pub segments: u64,
    /// Bytes of segment files on disk (preallocated, so mostly zeros at the end).
    pub segment_bytes: u64,
    /// Valid records in the segments (including those a snapshot covers).
    pub records: u64,
    /// Bytes of those records (headers and payloads).
    pub record_bytes: u64,
    /// Seq of the oldest record still in a segment.
    pub first_seq: Option<u64>,
    /// Seq of the newest record.
    pub last_seq: Option<u64>,
    /// Seq of the newest valid snapshot.
    pub snapshot_seq: Option<u64>,
    /// A torn tail (never acknowledged) that the next open will zero: file, offset, bytes.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

/// Checks the journal in `dir` without changing anything.
///
/// Errors are those of [`Journal::open`](super::Journal::open): corruption before the tail,
/// seq gaps, foreign or other-version files, I/O. A missing directory is an error here.
pub fn verify(dir: &Path) -> Result<VerifyReport, JournalError> {
    verify_with(&(Arc::new(FsStorage) as Arc<dyn Storage>), dir)
}

/// [`verify`] through a given storage.
pub fn verify_with(storage: &Arc<dyn Storage>, dir: &Path) -> Result<VerifyReport, JournalError> {
    let scan = recovery::scan(storage, dir)?;
    let with_records = || scan.segments.iter().filter(|s| s.records > 0);
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        segments: scan.segments.len() as u64,
        segment_bytes: scan.segments.iter().map(|s| s.size).sum(),
        records: scan.segments.iter().map(|s| s.records).sum(),
        record_bytes: scan.segments.iter().map(|s| s.record_bytes).sum(),
        first_seq: with_records().find_map(|s| s.first_seq),
        last_seq: with_records().rev().find_map(|s| s.last_seq),
        snapshot_seq: scan.snapshot.as_ref().map(|s| s.seq),
        torn_tail: scan
            .torn
            .first()
            .map(|t| (t.path.clone(), t.offset, t.garbage_end - t.offset)),
    })
}

/// Runs [`verify`] and returns the text `refundgate journal verify DIR` prints.
pub fn run_verify(dir: &Path) -> Result<String, JournalError> {
    verify(dir).map(|report| report.to_string())
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "journal {}: ok", self.dir.display())?;
        writeln!(
            f,
            "segments:   {} ({} bytes on disk)",
            self.segments, self.segment_bytes
        )?;
        writeln!(
            f,
            "records:    {} ({} bytes)",
            self.records, self.record_bytes
        )?;
        match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => writeln!(f, "seq:        {first}..={last}")?,
            _ => writeln!(f, "seq:        none")?,
        }
        match self.snapshot_seq {
            Some(seq) => writeln!(f, "snapshot:   seq {seq}")?,
            None => writeln!(f, "snapshot:   none")?,
        }
        match &self.torn_tail {
            Some((path, offset, bytes)) => write!(
                f,
                "torn tail:  yes ({} at byte {offset}, {bytes} bytes; zeroed at next open)",
                path.display()
            ),
            None => write!(f, "torn tail:  no"),
        }
    }
}
