//! Snapshot files: `snapshot-NNNNNNNNNNNNNNNNNNNN.snap` (20-digit seq), written atomically.
//!
//! Header (40 bytes, little endian): magic `RGJRNSNP` (8) | format version u32 | header length
//! u32 (40) | seq u64 | length u64 | CRC32C u32 over header bytes 0..32 and the snapshot
//! bytes | reserved u32 (0). The bytes are the caller's (the ledger's state) and opaque here.
//!
//! Writing: `.snap.tmp`, write, `fsync`, rename, directory `fsync`. A reader therefore sees
//! either no snapshot or a whole one; a damaged one is skipped in favour of an older one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::segment::FORMAT_VERSION;
use super::storage::Storage;
use super::JournalError;

/// Magic bytes opening every snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"RGJRNSNP";
/// Bytes of the snapshot header.
pub const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Suffix of snapshot files.
pub const SNAPSHOT_SUFFIX: &str = ".snap";
/// Suffix of snapshots being written (removed at open).
pub const SNAPSHOT_TMP_SUFFIX: &str = ".snap.tmp";
const SNAPSHOT_PREFIX: &str = "snapshot-";

/// A snapshot: the caller's state as of (and including) record `seq`.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last record folded into `bytes`; replay resumes after it.
    pub seq: u64,
    /// The caller's opaque state.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Snapshot {
    // The bytes are ledger state; show their size only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("seq", &self.seq)
            .field("bytes_len", &self.bytes.len())
            .finish()
    }
}

/// The file name of the snapshot at `seq`.
pub fn snapshot_file_name(seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{seq:020}{SNAPSHOT_SUFFIX}")
}

/// The seq in a snapshot file name, if `name` is one.
pub fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SNAPSHOT_PREFIX)?
        .strip_suffix(SNAPSHOT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes the snapshot file for (`seq`, `bytes`) durably and returns its path.
pub(crate) fn write(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    seq: u64,
    bytes: &[u8],
) -> Result<PathBuf, JournalError> {
    let path = dir.join(snapshot_file_name(seq));
    let tmp = dir.join(format!("{SNAPSHOT_PREFIX}{seq:020}{SNAPSHOT_TMP_SUFFIX}"));
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| JournalError::io(op, path, source)
    };
    match storage.remove(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io("remove", &tmp)(e)),
        _ => {}
    }
    let header = header(seq, bytes);
    let file = storage.create(&tmp).map_err(io("create", &tmp))?;
    file.write_at(&header, 0).map_err(io("write", &tmp))?;
    file.write_at(bytes, SNAPSHOT_HEADER_BYTES as u64)
        .map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    drop(file);
    storage.rename(&tmp, &path).map_err(io("rename", &tmp))?;
    storage.sync_dir(dir).map_err(io("sync", dir))?;
    Ok(path)
}

/// The header of the snapshot (`seq`, `bytes`), checksum included.
fn header(seq: u64, bytes: &[u8]) -> [u8; SNAPSHOT_HEADER_BYTES] {
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[..8].copy_from_slice(&SNAPSHOT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(SNAPSHOT_HEADER_BYTES as u32).to_le_bytes());
    header[16..24].copy_from_slice(&seq.to_le_bytes());
    header[24..32].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..32]), bytes);
    header[32..36].copy_from_slice(&crc.to_le_bytes());
    header
}

/// A snapshot as one byte string in the layout of a snapshot file (header, then `bytes`): the
/// replicated journal stores it as an object.
pub fn frame(seq: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + bytes.len());
    out.extend_from_slice(&header(seq, bytes));
    out.extend_from_slice(bytes);
    out
}

/// The snapshot in `framed` (made by [`frame`]), or why it cannot be used: a foreign, other
/// version, cut or damaged one (checksum) is refused.
pub fn unframe(framed: &[u8]) -> Result<Snapshot, &'static str> {
    let (head, bytes) = framed
        .split_first_chunk::<SNAPSHOT_HEADER_BYTES>()
        .ok_or("snapshot shorter than its header")?;
    if head[..8] != SNAPSHOT_MAGIC {
        return Err("not a snapshot");
    }
    if head[8..12] != FORMAT_VERSION.to_le_bytes() {
        return Err("snapshot of another format version");
    }
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (seq, len) = (field(16), field(24));
    if len != bytes.len() as u64 {
        return Err("snapshot length does not match its size");
    }
    if header(seq, bytes) != *head {
        return Err("snapshot checksum mismatch");
    }
    Ok(Snapshot {
        seq,
        bytes: bytes.to_vec(),
    })
}

/// Reads the snapshot at `path`.
///
/// A foreign or other-version file is an error (the directory is not ours to touch); a
/// damaged one of our version is `Ok(Err(reason))`, so the caller can fall back to an older.
pub(crate) fn read(
    storage: &Arc<dyn Storage>,
    path: &Path,
    header_only: bool,
) -> Result<Result<Snapshot, &'static str>, JournalError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| JournalError::io(op, path, source)
    };
    let file = storage.open(path, false).map_err(io("open"))?;
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    let n = file.read_at(&mut header, 0).map_err(io("read"))?;
    if n < 12 || header[..8] != SNAPSHOT_MAGIC {
        return Err(JournalError::NotJournal {
            path: path.to_path_buf(),
        });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(JournalError::FormatVersion {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    if n < SNAPSHOT_HEADER_BYTES {
        return Ok(Err("snapshot shorter than its header"));
    }
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (seq, len) = (field(16), field(24));
    let size = file.size().map_err(io("stat"))?;
    if size != SNAPSHOT_HEADER_BYTES as u64 + len {
        return Ok(Err("snapshot length does not match its file size"));
    }
    if header_only {
        return Ok(Ok(Snapshot {
            seq,
            bytes: Vec::new(),
        }));
    }
    let mut bytes = vec![0u8; len as usize];
    let read = file
        .read_at(&mut bytes, SNAPSHOT_HEADER_BYTES as u64)
        .map_err(io("read"))?;
    let crc = u32::from_le_bytes([header[32], header[33], header[34], header[35]]);
    if read != bytes.len() || crc32c::crc32c_append(crc32c::crc32c(&header[..32]), &bytes) != crc {
        return Ok(Err("snapshot checksum mismatch"));
    }
    Ok(Ok(Snapshot { seq, bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_snapshot_unframes_and_any_flipped_byte_is_refused() {
        let framed = frame(42, b"ledger state");
        let snap = unframe(&framed).unwrap();
        assert_eq!(
            (snap.seq, snap.bytes.as_slice()),
            (42, &b"ledger state"[..])
        );
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x01;
            assert!(unframe(&bad).is_err(), "byte {i} flipped");
        }
        assert!(unframe(&framed[..framed.len() - 1]).is_err());
        assert!(unframe(&framed[..10]).is_err());
    }

    #[test]
    fn snapshot_names_parse() {
        assert_eq!(parse_snapshot_file_name(&snapshot_file_name(9)), Some(9));
        assert_eq!(parse_snapshot_file_name("snapshot-9.snap"), None);
        assert_eq!(
            parse_snapshot_file_name("snapshot-00000000000000000009.snap.tmp"),
            None
        );
    }
}
