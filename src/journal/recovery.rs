//! Recovery: read-only scan of a journal directory, and replay of the records it found.
//!
//! The scan checks every header first (so a foreign or other-version directory is refused
//! before anything is written), loads the newest valid snapshot, then walks every record of
//! every segment in order. Where the records of a segment stop (a zero length word, or a
//! record that fails its checks) the rest of the segment must be zeros. If it is not:
//! - a valid record with a higher seq anywhere after that point, or any record in a later
//!   segment, means the damage is in the middle of the log: [`JournalError::Corrupt`] names
//!   the file and byte offset, and nothing is changed;
//! - otherwise it is a torn tail (a write that never completed its sync, so never
//!   acknowledged): the open zeroes it and logs one warning; `verify` reports it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::{self, Decoded};
use super::segment::{self, HeaderError, SEGMENT_HEADER_BYTES, SEGMENT_TMP_SUFFIX};
use super::snapshot::{self, Snapshot, SNAPSHOT_TMP_SUFFIX};
use super::storage::Storage;
use super::JournalError;

/// What [`Journal::open`](super::Journal::open) recovered: the snapshot and the records to replay.
pub struct Recovered {
    storage: Arc<dyn Storage>,
    snapshot: Option<Snapshot>,
    segments: Vec<ReplaySegment>,
    after_seq: u64,
    records: u64,
    last_seq: u64,
    torn_tail: bool,
}

/// One segment as the scan found it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentScan {
    pub index: u64,
    pub path: PathBuf,
    pub size: u64,
    pub records: u64,
    pub record_bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Offset just after the last valid record (the header length when there is none).
    pub end: u64,
}

/// A torn tail: bytes `[offset, garbage_end)` of a segment hold no valid record.
#[derive(Debug, Clone)]
pub(crate) struct Torn {
    pub path: PathBuf,
    pub offset: u64,
    pub garbage_end: u64,
    pub reason: &'static str,
}

/// Everything a read-only scan of a journal directory found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub segments: Vec<SegmentScan>,
    pub snapshot: Option<Snapshot>,
    /// Leftover `.tmp` files of interrupted preallocations or snapshot writes.
    pub stale: Vec<PathBuf>,
    pub torn: Option<Torn>,
    /// The last seq recovered: the last record's, or the snapshot's if that is higher.
    pub last_seq: u64,
}

#[derive(Debug, Clone)]
struct ReplaySegment {
    path: PathBuf,
    end: u64,
    last_seq: Option<u64>,
}

impl Recovered {
    pub(crate) fn new(storage: Arc<dyn Storage>, scan: &mut Scan) -> Self {
        let after_seq = scan.snapshot.as_ref().map_or(0, |s| s.seq);
        let records = scan
            .segments
            .iter()
            .filter_map(|s| Some((s.first_seq?, s.last_seq?)))
            .map(|(first, last)| {
                if last <= after_seq {
                    0
                } else {
                    last - first.max(after_seq + 1) + 1
                }
            })
            .sum();
        let segments = scan
            .segments
            .iter()
            .map(|s| ReplaySegment {
                path: s.path.clone(),
                end: s.end,
                last_seq: s.last_seq,
            })
            .collect();
        Self {
            storage,
            snapshot: scan.snapshot.take(),
            segments,
            after_seq,
            records,
            last_seq: scan.last_seq,
            torn_tail: scan.torn.is_some(),
        }
    }

    /// The newest valid snapshot, if any; restore it before [`replay`](Self::replay).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Moves the snapshot out (its bytes can be large).
    pub fn take_snapshot(&mut self) -> Option<Snapshot> {
        self.snapshot.take()
    }

    /// Records [`replay`](Self::replay) will hand out (those after the snapshot).
    pub fn records_to_replay(&self) -> u64 {
        self.records
    }

    /// The last seq recovered (record or snapshot); the next append gets `last_seq + 1`.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether a torn tail was found and zeroed at open.
    pub fn torn_tail(&self) -> bool {
        self.torn_tail
    }

    /// Calls `apply(seq, payload)` for every record after the snapshot, in seq order, and
    /// returns how many it applied.
    ///
    /// Call it once, right after open and before appending or snapshotting. The records
    /// were validated (checksums included) at open; here their framing and seq order are
    /// checked again as they are read.
    pub fn replay(&self, mut apply: impl FnMut(u64, &[u8])) -> Result<u64, JournalError> {
        let mut buf = Vec::new();
        let mut applied = 0;
        let mut expected = self.after_seq + 1;
        for segment in &self.segments {
            if segment.last_seq.is_none_or(|last| last <= self.after_seq) {
                continue;
            }
            read_whole(&self.storage, &segment.path, segment.end, &mut buf)?;
            let mut off = SEGMENT_HEADER_BYTES;
            while off < buf.len() {
                // Checksums were verified by the scan at open; here only the framing and the
                // seq order are rechecked, so a file changed since then is still caught.
                let Some((seq, payload)) = record::frame(&buf[off..]) else {
                    return Err(changed(&segment.path, off));
                };
                if seq > self.after_seq {
                    if seq != expected {
                        return Err(changed(&segment.path, off));
                    }
                    apply(seq, payload);
                    applied += 1;
                    expected += 1;
                }
                off += record::encoded_len(payload.len());
            }
        }
        Ok(applied)
    }
}

impl std::fmt::Debug for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovered")
            .field("snapshot", &self.snapshot)
            .field("records", &self.records)
            .field("last_seq", &self.last_seq)
            .field("torn_tail", &self.torn_tail)
            .finish_non_exhaustive()
    }
}

/// Checks that every journal-named file in `dir` is ours and of this format version,
/// reading headers only.
pub(crate) fn check_format(storage: &Arc<dyn Storage>, dir: &Path) -> Result<(), JournalError> {
    let files = list(storage, dir)?;
    check_segment_headers(storage, &files.segments)?;
    for (_, path) in &files.snapshots {
        // Only foreign or other-version files fail here; damaged ones are skipped later.
        let _ = snapshot::read(storage, path, true)?;
    }
    Ok(())
}

/// The journal files of a directory, sorted.
struct Files {
    segments: Vec<(u64, PathBuf)>,
    snapshots: Vec<(u64, PathBuf)>,
    stale: Vec<PathBuf>,
}

fn list(storage: &Arc<dyn Storage>, dir: &Path) -> Result<Files, JournalError> {
    let names = storage
        .list(dir)
        .map_err(|e| JournalError::io("list", dir.to_path_buf(), e))?;
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    let mut stale = Vec::new();
    for name in names {
        if let Some(index) = segment::parse_segment_file_name(&name) {
            segments.push((index, dir.join(name)));
        } else if let Some(seq) = snapshot::parse_snapshot_file_name(&name) {
            snapshots.push((seq, dir.join(name)));
        } else if name.ends_with(SEGMENT_TMP_SUFFIX) || name.ends_with(SNAPSHOT_TMP_SUFFIX) {
            stale.push(dir.join(name));
        }
    }
    segments.sort();
    snapshots.sort();
    Ok(Files {
        segments,
        snapshots,
        stale,
    })
}

/// Scans `dir` without writing anything.
pub(crate) fn scan(storage: &Arc<dyn Storage>, dir: &Path) -> Result<Scan, JournalError> {
    check_format(storage, dir)?;
    let Files {
        segments,
        snapshots,
        stale,
    } = list(storage, dir)?;
    let snapshot = newest_valid_snapshot(storage, &snapshots)?;
    let mut walk = Walk::new(snapshot.as_ref().map_or(0, |s| s.seq));
    let mut buf = Vec::new();
    for (index, path) in &segments {
        walk.segment(storage, *index, path, &mut buf)?;
    }
    let last_seq = walk.last_good;
    Ok(Scan {
        segments: walk.segments,
        snapshot,
        stale,
        torn: walk.torn,
        last_seq,
    })
}

fn check_segment_headers(
    storage: &Arc<dyn Storage>,
    segments: &[(u64, PathBuf)],
) -> Result<(), JournalError> {
    for (index, path) in segments {
        let file = storage
            .open(path, false)
            .map_err(|e| JournalError::io("open", path.clone(), e))?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        let n = file
            .read_at(&mut header, 0)
            .map_err(|e| JournalError::io("read", path.clone(), e))?;
        match segment::decode_header(&header[..n]) {
            Ok(found) if found == *index => {}
            Ok(_) => {
                return Err(corrupt(
                    path,
                    0,
                    "segment index does not match its file name",
                ))
            }
            Err(HeaderError::NotJournal) => {
                return Err(JournalError::NotJournal { path: path.clone() })
            }
            Err(HeaderError::Version(found)) => {
                return Err(JournalError::FormatVersion {
                    path: path.clone(),
                    found,
                    expected: segment::FORMAT_VERSION,
                })
            }
            Err(HeaderError::Corrupt(reason)) => return Err(corrupt(path, 0, reason)),
        }
    }
    Ok(())
}

fn newest_valid_snapshot(
    storage: &Arc<dyn Storage>,
    snapshots: &[(u64, PathBuf)],
) -> Result<Option<Snapshot>, JournalError> {
    for (seq, path) in snapshots.iter().rev() {
        match snapshot::read(storage, path, false)? {
            Ok(snapshot) if snapshot.seq == *seq => return Ok(Some(snapshot)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "skipping snapshot: seq does not match its file name")
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason, "skipping damaged snapshot")
            }
        }
    }
    Ok(None)
}

/// The state of the record walk across segments.
struct Walk {
    snapshot_seq: u64,
    expected: Option<u64>,
    last_good: u64,
    torn: Option<Torn>,
    segments: Vec<SegmentScan>,
}

impl Walk {
    fn new(snapshot_seq: u64) -> Self {
        Self {
            snapshot_seq,
            expected: None,
            last_good: snapshot_seq,
            torn: None,
            segments: Vec::new(),
        }
    }

    fn segment(
        &mut self,
        storage: &Arc<dyn Storage>,
        index: u64,
        path: &Path,
        buf: &mut Vec<u8>,
    ) -> Result<(), JournalError> {
        let size = read_whole(storage, path, u64::MAX, buf)?;
        let mut scan = SegmentScan {
            index,
            path: path.to_path_buf(),
            size,
            records: 0,
            record_bytes: 0,
            first_seq: None,
            last_seq: None,
            end: SEGMENT_HEADER_BYTES as u64,
        };
        let mut off = SEGMENT_HEADER_BYTES;
        let reason = loop {
            let (seq, encoded_len) = match record::decode(&buf[off..]) {
                Decoded::Record {
                    seq, encoded_len, ..
                } => (seq, encoded_len),
                Decoded::End => break "zero length word followed by non-zero bytes",
                Decoded::Invalid(reason) => break reason,
            };
            self.check_seq(path, off as u64, seq)?;
            scan.records += 1;
            scan.record_bytes += encoded_len as u64;
            scan.first_seq.get_or_insert(seq);
            scan.last_seq = Some(seq);
            off += encoded_len;
        };
        scan.end = off as u64;
        let rest = &buf[off..];
        if !record::is_zero(rest) {
            if let Some(torn) = &self.torn {
                return Err(corrupt(&torn.path, torn.offset, torn.reason));
            }
            if record::any_valid_record_after(rest, self.last_good).is_some() {
                return Err(corrupt(path, off as u64, reason));
            }
            let garbage = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            self.torn = Some(Torn {
                path: path.to_path_buf(),
                offset: off as u64,
                garbage_end: (off + garbage) as u64,
                reason,
            });
        }
        self.segments.push(scan);
        Ok(())
    }

    fn check_seq(&mut self, path: &Path, offset: u64, seq: u64) -> Result<(), JournalError> {
        if let Some(torn) = &self.torn {
            return Err(corrupt(&torn.path, torn.offset, torn.reason));
        }
        match self.expected {
            Some(expected) if seq != expected => {
                return Err(JournalError::SeqGap {
                    path: path.to_path_buf(),
                    offset,
                    expected,
                    found: seq,
                })
            }
            None if seq == 0 || seq > self.snapshot_seq + 1 => {
                return Err(JournalError::MissingPrefix {
                    path: path.to_path_buf(),
                    first_seq: seq,
                    snapshot_seq: self.snapshot_seq,
                })
            }
            _ => {}
        }
        self.expected = Some(seq + 1);
        self.last_good = self.last_good.max(seq);
        Ok(())
    }
}

/// Reads `path` from its start up to `limit` bytes (or its size) into `buf`; returns the size.
fn read_whole(
    storage: &Arc<dyn Storage>,
    path: &Path,
    limit: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, JournalError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |e| JournalError::io(op, path, e)
    };
    let file = storage.open(path, false).map_err(io("open"))?;
    let size = file.size().map_err(io("stat"))?;
    if size > segment::SEGMENT_BYTES_MAX {
        return Err(corrupt(
            path,
            0,
            "segment larger than the largest segment size",
        ));
    }
    let len = size.min(limit) as usize;
    // Resizing a reused buffer zeroes only what it grows by; the read overwrites the rest.
    buf.resize(len, 0);
    let n = file.read_at(buf, 0).map_err(io("read"))?;
    if n != len {
        return Err(corrupt(path, n as u64, "segment shorter than expected"));
    }
    Ok(size)
}

fn changed(path: &Path, offset: usize) -> JournalError {
    corrupt(
        path,
        offset as u64,
        "record changed after it was validated at open",
    )
}

fn corrupt(path: &Path, offset: u64, reason: &'static str) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    }
}
