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
//!   acknowledged): the open zeroes it and logs one warning; `verify` reports it. Later
//!   segments holding only garbage are torn tails too (a write that failed after the writer
//!   left a failed segment).
//!
//! A segment that starts with a void marker (seq 0, payload `from`; see [`record`]) was
//! begun after a failed write: every record from seq `from` on in the segments before it was
//! never acknowledged, so the scan cuts them (a segment's `end` moves back to the record
//! `from`) and clears the torn tails found so far, which can only lie in that failed region.
//! `from` must not be past the last record plus one. Replay skips the markers.

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
    /// Where its records start: after the header, and after a void marker if it has one.
    pub records_start: u64,
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
    /// Torn tails, in file order (more than one only across segments left after failures).
    pub torn: Vec<Torn>,
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
            torn_tail: !scan.torn.is_empty(),
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
        let mut applied = 0;
        let mut expected = self.after_seq + 1;
        each_record(
            &self.storage,
            &self.segments,
            self.after_seq,
            |seq, payload| {
                if seq > self.after_seq {
                    if seq != expected {
                        return false;
                    }
                    apply(seq, payload);
                    applied += 1;
                    expected += 1;
                }
                true
            },
        )?;
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

/// A journal directory read without writing, locking or truncating anything (policy what-if
/// replay on a live journal or a copy of one): its newest valid snapshot and every whole
/// record from the first one still in the segments. A torn tail (a write under way, or cut
/// by the copy) is read up to the last whole record; damage in the middle is an error.
pub struct ReadOnly {
    storage: Arc<dyn Storage>,
    /// The newest valid snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The first record's seq still in the segments (`None`: no records).
    pub first_seq: Option<u64>,
    /// The last seq (record or snapshot).
    pub last_seq: u64,
    /// A torn tail was found (and left as it is).
    pub torn_tail: bool,
    segments: Vec<ReplaySegment>,
}

impl ReadOnly {
    /// Scans `dir` (nothing is created: a missing directory is an error).
    pub fn open(dir: &Path) -> Result<ReadOnly, JournalError> {
        let storage: Arc<dyn Storage> = Arc::new(super::FsStorage);
        if !dir.is_dir() {
            return Err(JournalError::io(
                "open",
                dir.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such journal directory"),
            ));
        }
        let scan = scan(&storage, dir)?;
        Ok(ReadOnly {
            first_seq: scan.segments.iter().find_map(|s| s.first_seq),
            last_seq: scan.last_seq,
            torn_tail: !scan.torn.is_empty(),
            snapshot: scan.snapshot,
            segments: scan
                .segments
                .iter()
                .map(|s| ReplaySegment {
                    path: s.path.clone(),
                    end: s.end,
                    last_seq: s.last_seq,
                })
                .collect(),
            storage,
        })
    }

    /// Calls `each(seq, payload)` for every record with a seq above `after_seq`, in order;
    /// returns how many. Records appended since [`ReadOnly::open`] are not read.
    pub fn records(
        &self,
        after_seq: u64,
        mut each: impl FnMut(u64, &[u8]),
    ) -> Result<u64, JournalError> {
        let mut read = 0;
        let mut expected: Option<u64> = None;
        each_record(&self.storage, &self.segments, after_seq, |seq, payload| {
            if expected.is_some_and(|e| e != seq) {
                return false;
            }
            expected = Some(seq + 1);
            if seq > after_seq {
                each(seq, payload);
                read += 1;
            }
            true
        })?;
        Ok(read)
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
    torn: Vec<Torn>,
    segments: Vec<SegmentScan>,
}

impl Walk {
    fn new(snapshot_seq: u64) -> Self {
        Self {
            snapshot_seq,
            expected: None,
            last_good: snapshot_seq,
            torn: Vec::new(),
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
            records_start: SEGMENT_HEADER_BYTES as u64,
        };
        let mut off = SEGMENT_HEADER_BYTES;
        if let Decoded::Record {
            seq: record::VOID_SEQ,
            payload,
            encoded_len,
        } = record::decode(&buf[off..])
        {
            let Some(from) = record::void_from(payload) else {
                return Err(corrupt(path, off as u64, "void marker with a bad payload"));
            };
            self.void(storage, path, off as u64, from)?;
            off += encoded_len;
            scan.records_start = off as u64;
        }
        let reason = loop {
            let (seq, encoded_len) = match record::decode(&buf[off..]) {
                Decoded::Record {
                    seq: record::VOID_SEQ,
                    ..
                } => break "void marker after the start of a segment",
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
            if find_record_after(rest, self.last_good, &mut ScanWork::default()).is_some() {
                return Err(corrupt(path, off as u64, reason));
            }
            let garbage = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            self.torn.push(Torn {
                path: path.to_path_buf(),
                offset: off as u64,
                garbage_end: (off + garbage) as u64,
                reason,
            });
        }
        self.segments.push(scan);
        Ok(())
    }

    /// A void marker at `offset` of `path`: cuts every record from seq `from` on out of the
    /// segments scanned so far.
    fn void(
        &mut self,
        storage: &Arc<dyn Storage>,
        path: &Path,
        offset: u64,
        from: u64,
    ) -> Result<(), JournalError> {
        if from == 0 || from > self.last_good.saturating_add(1) {
            return Err(corrupt(path, offset, "void marker past the last record"));
        }
        let mut buf = Vec::new();
        for scan in self.segments.iter_mut().rev() {
            let (Some(first), Some(last)) = (scan.first_seq, scan.last_seq) else {
                continue;
            };
            if last < from {
                break;
            }
            if first >= from {
                scan.records = 0;
                scan.record_bytes = 0;
                scan.first_seq = None;
                scan.last_seq = None;
                scan.end = scan.records_start;
                continue;
            }
            read_whole(storage, &scan.path, scan.end, &mut buf)?;
            let mut at = scan.records_start as usize;
            let (mut records, mut bytes) = (0u64, 0u64);
            loop {
                let Some((seq, payload)) = buf.get(at..).and_then(record::frame) else {
                    return Err(changed(&scan.path, at));
                };
                if seq >= from {
                    break;
                }
                let len = record::encoded_len(payload.len());
                records += 1;
                bytes += len as u64;
                at += len;
            }
            scan.records = records;
            scan.record_bytes = bytes;
            scan.last_seq = Some(from - 1);
            scan.end = at as u64;
            break;
        }
        self.torn.clear();
        self.expected = Some(from);
        self.last_good = self.snapshot_seq.max(from - 1);
        Ok(())
    }

    fn check_seq(&mut self, path: &Path, offset: u64, seq: u64) -> Result<(), JournalError> {
        if let Some(torn) = self.torn.first() {
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

/// What [`find_record_after`] spent: bytes run through the CRC, and candidate offsets whose
/// checksum was compared. Both stay within the length of the searched bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanWork {
    pub bytes_hashed: u64,
    pub candidates: u64,
}

/// Where the first valid record with a seq above `seq_after` starts in `buf` (the bytes after
/// the first bad record of a segment), in time linear in `buf.len()`.
///
/// Same answer as [`record::any_valid_record_after`], which checksums each candidate offset
/// from scratch: up to 64 KiB per offset, so a torn tail of garbage whose length words look
/// plausible took minutes (issue 17). Here the CRC32C is computed once, as a running prefix:
/// with `R(i)` the raw (zero-init, no final xor) CRC of `buf[base..i]`, the raw CRC of the
/// span `buf[a..b]` is `R(b) ^ R(a)·x^(8(b−a))`. A record's checksum covers its length word
/// `L` and then `D` = seq and payload (skipping the CRC word); with the usual all-ones init
/// (the same as complementing the first four bytes, here `L`) it is
/// `!(((raw(!L) ^ R(start of D))·x^(8|D|)) ^ R(end of D))`: one multiplication per candidate
/// (by tables, see [`Shifts`]), every byte hashed at most once.
pub(crate) fn find_record_after(buf: &[u8], seq_after: u64, work: &mut ScanWork) -> Option<usize> {
    let last_start = buf.len().checked_sub(record::RECORD_HEADER_BYTES)?;
    let mut prefix = PrefixCrc::new();
    let mut shifts = Shifts::default();
    for at in 0..=last_start {
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let len = word(at) as usize;
        if len == 0 || len > record::PAYLOAD_BYTES_MAX {
            continue;
        }
        let end = at + record::RECORD_HEADER_BYTES + len;
        if end > buf.len() {
            continue;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[at + 8..at + 16]);
        if u64::from_le_bytes(seq) <= seq_after {
            continue;
        }
        work.candidates += 1;
        let d_start = at + 8;
        let (r_start, r_end) = prefix.span(buf, d_start, end, work);
        let d_len = end - d_start;
        let len_word = !word(at);
        let raw_len = raw_crc(0, &len_word.to_le_bytes());
        let crc = !(shifts.mul(raw_len ^ r_start, d_len) ^ r_end);
        if crc == word(at + 4) {
            // Found by arithmetic; confirm with the plain decoder before calling it a record.
            if let Decoded::Record { seq, .. } = record::decode(&buf[at..]) {
                if seq > seq_after {
                    return Some(at);
                }
            }
        }
    }
    None
}

/// CRC32C (Castagnoli), reflected polynomial.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// Byte-at-a-time table of the reflected CRC32C.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The raw CRC register after `bytes`, from `reg`.
fn raw_crc(mut reg: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        reg = CRC_TABLE[usize::from(reg as u8 ^ b)] ^ (reg >> 8);
    }
    reg
}

/// `a·b mod P` in the reflected bit order (x^0 is bit 31), as zlib's `multmodp`.
fn gf_mul(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
        m >>= 1;
    }
    p
}

/// Multiplication by `x^(8n)` for any record span `n` (at most 64 KiB + 8): by
/// `x^(8(n mod 256))` and then `x^(8·256·(n div 256))`, each from a table built the first time
/// it is needed, so at most 513 tables are ever built whatever the input.
#[derive(Default)]
struct Shifts {
    low: Vec<Option<MulBy>>,
    high: Vec<Option<MulBy>>,
}

impl Shifts {
    fn mul(&mut self, v: u32, n: usize) -> u32 {
        if self.low.is_empty() {
            self.low.resize(256, None);
            self.high.resize(
                (record::RECORD_HEADER_BYTES + record::PAYLOAD_BYTES_MAX) / 256 + 1,
                None,
            );
        }
        let (lo, hi) = (n % 256, n / 256);
        let v = match self.low.get_mut(lo) {
            Some(slot) => slot.get_or_insert_with(|| MulBy::new(x_pow_8n(lo))).mul(v),
            None => gf_mul(v, x_pow_8n(lo)),
        };
        match self.high.get_mut(hi) {
            Some(slot) => slot
                .get_or_insert_with(|| MulBy::new(x_pow_8n(hi * 256)))
                .mul(v),
            None => gf_mul(v, x_pow_8n(hi * 256)),
        }
    }
}

/// Multiplication by one fixed factor, a nibble at a time: eight lookups instead of the 32
/// steps of [`gf_mul`].
#[derive(Clone)]
struct MulBy([[u32; 16]; 8]);

impl MulBy {
    fn new(factor: u32) -> Self {
        // basis[i] = factor·x^i; bit b of `a` (reflected) stands for x^(31 − b).
        let mut basis = [0u32; 32];
        let mut v = factor;
        for slot in &mut basis {
            *slot = v;
            v = if v & 1 != 0 {
                (v >> 1) ^ CRC32C_POLY
            } else {
                v >> 1
            };
        }
        let mut t = [[0u32; 16]; 8];
        for (k, row) in t.iter_mut().enumerate() {
            for (nibble, out) in row.iter_mut().enumerate() {
                for j in 0..4 {
                    if nibble & (1 << j) != 0 {
                        *out ^= basis[31 - 4 * k - j];
                    }
                }
            }
        }
        MulBy(t)
    }

    fn mul(&self, a: u32) -> u32 {
        let mut p = 0;
        for (k, row) in self.0.iter().enumerate() {
            p ^= row[((a >> (4 * k)) & 0xF) as usize];
        }
        p
    }
}

/// `x^(8n) mod P`: what multiplying a raw CRC by appends `n` zero bytes.
fn x_pow_8n(mut n: usize) -> u32 {
    // x^(8·2^k) for k = 0, 1, …, by squaring; x^8 in reflected order is bit 31 − 8.
    let mut square = 1u32 << (31 - 8);
    let mut p = 1u32 << 31;
    while n != 0 {
        if n & 1 != 0 {
            p = gf_mul(square, p);
        }
        square = gf_mul(square, square);
        n >>= 1;
    }
    p
}

/// Bytes of raw prefix CRCs kept: enough to reach back from a record's end to its seq.
const PREFIX_RING: usize = 1 << 17;
const _: () = assert!(PREFIX_RING > record::RECORD_HEADER_BYTES + record::PAYLOAD_BYTES_MAX);

/// Raw CRCs of `buf[base..i]` for the last [`PREFIX_RING`] positions `i`, extended on demand.
struct PrefixCrc {
    ring: Vec<u32>,
    base: usize,
    /// `ring` holds positions `base..=hi` (the newest [`PREFIX_RING`] of them).
    hi: usize,
    reg: u32,
}

impl PrefixCrc {
    fn new() -> Self {
        Self {
            ring: Vec::new(),
            base: 0,
            hi: 0,
            reg: 0,
        }
    }

    /// The raw prefix CRCs at `from` and `to` (`from <= to`, `to - from` below the ring),
    /// hashing only bytes not hashed before. Calls come with non-decreasing `from`.
    fn span(&mut self, buf: &[u8], from: usize, to: usize, work: &mut ScanWork) -> (u32, u32) {
        if self.ring.is_empty() {
            self.ring = vec![0; PREFIX_RING];
        }
        if from > self.hi || from < self.base {
            // Nothing hashed reaches `from`: start a new prefix there.
            self.base = from;
            self.hi = from;
            self.reg = 0;
            self.ring[from % PREFIX_RING] = 0;
        }
        if self.hi < to {
            let mut reg = self.reg;
            for (i, &b) in buf[self.hi..to].iter().enumerate() {
                reg = CRC_TABLE[usize::from(reg as u8 ^ b)] ^ (reg >> 8);
                self.ring[(self.hi + 1 + i) % PREFIX_RING] = reg;
            }
            work.bytes_hashed += (to - self.hi) as u64;
            self.reg = reg;
            self.hi = to;
        }
        (self.ring[from % PREFIX_RING], self.ring[to % PREFIX_RING])
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

/// Reads the records of every segment that holds one past `after_seq`, in file order, and
/// hands each `(seq, payload)` to `take` (void markers skipped); `take` returns false when the
/// seq is out of order. Checksums were verified by the scan at open: here only the framing
/// and (through `take`) the seq order are rechecked, so a file changed since is still caught.
fn each_record(
    storage: &Arc<dyn Storage>,
    segments: &[ReplaySegment],
    after_seq: u64,
    mut take: impl FnMut(u64, &[u8]) -> bool,
) -> Result<(), JournalError> {
    let mut buf = Vec::new();
    for segment in segments {
        if segment.last_seq.is_none_or(|last| last <= after_seq) {
            continue;
        }
        read_whole(storage, &segment.path, segment.end, &mut buf)?;
        let mut off = SEGMENT_HEADER_BYTES;
        while off < buf.len() {
            let Some((seq, payload)) = record::frame(&buf[off..]) else {
                return Err(changed(&segment.path, off));
            };
            if seq != record::VOID_SEQ && !take(seq, payload) {
                return Err(changed(&segment.path, off));
            }
            off += record::encoded_len(payload.len());
        }
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 16-byte header-like blocks whose length words all say 65,280 bytes and whose seqs are
    /// all above the last good one, but whose checksums are wrong: the worst torn tail for a
    /// scan that checksums every candidate from scratch.
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

    #[test]
    fn a_large_plausible_garbage_tail_is_scanned_in_linear_work() {
        let buf = plausible_garbage(2 << 20);
        let mut work = ScanWork::default();
        assert_eq!(find_record_after(&buf, 4, &mut work), None);
        // What checksumming each candidate from scratch (the old scan) would have hashed.
        let from_scratch: u64 = (0..=buf.len() - record::RECORD_HEADER_BYTES)
            .filter_map(|at| {
                let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let seq = u64::from_le_bytes(buf[at + 8..at + 16].try_into().unwrap());
                let fits = at + record::RECORD_HEADER_BYTES + len <= buf.len();
                (len != 0 && len <= record::PAYLOAD_BYTES_MAX && fits && seq > 4)
                    .then_some(len as u64 + 12)
            })
            .sum();
        assert!(work.candidates > 100_000, "{work:?}");
        assert!(work.bytes_hashed <= buf.len() as u64, "{work:?}");
        // 2 MiB hashed once instead of ~8.5 GB: the old scan took minutes on this tail.
        assert!(from_scratch > 1_000 * buf.len() as u64, "{from_scratch}");
    }

    #[test]
    fn a_valid_record_is_found_after_plausible_garbage() {
        let mut buf = plausible_garbage(300_000);
        let at = buf.len();
        record::encode(7, b"still here", &mut buf);
        buf.extend_from_slice(&[0xAB; 40]);
        let mut work = ScanWork::default();
        assert_eq!(find_record_after(&buf, 6, &mut work), Some(at));
        assert_eq!(find_record_after(&buf, 7, &mut work), None);
    }

    #[test]
    fn the_prefix_arithmetic_matches_crc32c() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        assert_eq!(!raw_crc(!0, &data), crc32c::crc32c(&data));
        for (a, b) in [(0, 0), (0, 1), (3, 17), (100, 4999), (4096, 5000)] {
            let mut p = PrefixCrc::new();
            let mut w = ScanWork::default();
            let (ra, rb) = p.span(&data, 0, a, &mut w);
            assert_eq!(ra, 0);
            let (ra2, rb2) = p.span(&data, a, b, &mut w);
            assert_eq!(ra2, rb);
            assert_eq!(rb2 ^ gf_mul(ra2, x_pow_8n(b - a)), raw_crc(0, &data[a..b]));
            let by = MulBy::new(x_pow_8n(b - a));
            for v in [0, 1, ra2, rb2, u32::MAX, 0x8000_0000] {
                assert_eq!(by.mul(v), gf_mul(v, x_pow_8n(b - a)));
            }
        }
    }

    proptest! {
        /// Same answer as the plain scan of `record::any_valid_record_after`, on garbage with
        /// valid records (some damaged) planted in it.
        #[test]
        fn agrees_with_the_plain_scan(
            garbage in proptest::collection::vec(any::<u8>(), 0..400),
            plants in proptest::collection::vec((0usize..400, 1u64..20, 1usize..80, any::<bool>()), 0..4),
            seq_after in 0u64..20,
        ) {
            let mut buf = garbage;
            for (at, seq, len, damage) in plants {
                let mut rec = Vec::new();
                record::encode(seq, &vec![seq as u8; len], &mut rec);
                if damage {
                    let i = len % rec.len();
                    rec[i] ^= 0x10;
                }
                let at = at.min(buf.len());
                buf.splice(at..at, rec);
            }
            let mut work = ScanWork::default();
            prop_assert_eq!(
                find_record_after(&buf, seq_after, &mut work),
                record::any_valid_record_after(&buf, seq_after)
            );
            prop_assert!(work.bytes_hashed <= buf.len() as u64);
        }
    }
}
