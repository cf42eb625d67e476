//! Errors: [`JournalError`] for open, recovery, snapshots and verify; [`StoreError`] for appends.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Exit code for errors of the journal's files and directory (`EX_IOERR` in sysexits.h).
pub const EXIT_IOERR: i32 = crate::exit::EXIT_IOERR as i32;
/// Exit code for invalid journal options (`EX_USAGE`, like any bad configuration).
pub const EXIT_USAGE: i32 = crate::exit::EXIT_USAGE as i32;
/// Exit code for a caller's misuse of the API (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: i32 = crate::exit::EXIT_SOFTWARE as i32;

/// Why the journal could not be opened, recovered, verified or snapshotted.
///
/// Messages name files and byte offsets, never payload bytes. [`exit_code`](Self::exit_code)
/// gives the process exit code for each.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal: {op} {path} failed: {source}")]
    Io {
        /// The operation (`open`, `read`, `write`, `sync`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory or a file in it cannot be written (read-only mount or permissions).
    #[error("journal: cannot {op} {path}: {source} (is the journal directory read-only?)")]
    NotWritable {
        /// The operation refused.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another open journal (this process or another) holds the directory's lock.
    #[error("journal: {path} is locked by another running journal; refusing to open it twice")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// A file named like a journal file does not start with the journal's magic.
    #[error("journal: {path} is not a refundgate journal file; nothing was changed")]
    NotJournal {
        /// The foreign file.
        path: PathBuf,
    },
    /// A journal file of another format version.
    #[error(
        "journal: {path} has format version {found}, this build reads version {expected}; nothing was changed"
    )]
    FormatVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The version this build reads and writes.
        expected: u32,
    },
    /// Damage before the end of the log (valid records follow it): refused, not guessed.
    #[error(
        "journal: corrupt record in {path} at byte {offset} ({reason}) with valid records after it; refusing to start, nothing was changed"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the first bad byte range.
        offset: u64,
        /// The first check that failed.
        reason: &'static str,
    },
    /// A valid record with an unexpected seq: records are missing or repeated.
    #[error("journal: seq gap in {path} at byte {offset}: expected seq {expected}, found {found}")]
    SeqGap {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// The seq that should be there.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The oldest record is not the one after the snapshot (or seq 1 without snapshot).
    #[error(
        "journal: records before seq {first_seq} are missing ({path} starts there) and no valid snapshot covers them (snapshot seq {snapshot_seq})"
    )]
    MissingPrefix {
        /// The first segment with records.
        path: PathBuf,
        /// Its first seq.
        first_seq: u64,
        /// The seq of the newest valid snapshot, 0 if none.
        snapshot_seq: u64,
    },
    /// Options out of range.
    #[error("journal: invalid option: {0}")]
    InvalidOptions(&'static str),
    /// A snapshot was offered for a seq that is not durable yet, or older than the current one.
    #[error("journal: snapshot at seq {seq} refused: durable seq {durable_seq}, snapshot seq {snapshot_seq}")]
    SnapshotSeq {
        /// The seq offered.
        seq: u64,
        /// The last durable seq.
        durable_seq: u64,
        /// The current snapshot's seq.
        snapshot_seq: u64,
    },
}

/// Why an append was not acknowledged. The caller answers 96 `STORE_UNAVAILABLE`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The write or the sync of the batch failed; the record is not durable.
    #[error("journal storage unavailable: {0}")]
    Unavailable(#[source] Arc<io::Error>),
    /// The journal's writer is gone (shutting down).
    #[error("journal closed")]
    Closed,
    /// The payload is empty or larger than a record may hold.
    #[error("journal payload of {len} bytes outside 1..={max}")]
    PayloadSize {
        /// The payload's length.
        len: usize,
        /// The largest accepted.
        max: usize,
    },
}

impl JournalError {
    /// The process exit code: 64 for bad options, 70 for API misuse, 74 for everything about
    /// the journal's files (I/O, permissions, foreign or other-version files, corruption).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::InvalidOptions(_) => EXIT_USAGE,
            Self::SnapshotSeq { .. } => EXIT_SOFTWARE,
            _ => EXIT_IOERR,
        }
    }

    /// An I/O error on `path`; permission and read-only errors become [`Self::NotWritable`].
    pub(crate) fn io(op: &'static str, path: PathBuf, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                Self::NotWritable { op, path, source }
            }
            _ => Self::Io { op, path, source },
        }
    }
}
