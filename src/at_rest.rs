//! Data at rest (DOMAIN §10): private file modes, key files kept outside the data directory,
//! and the AES-256-GCM cipher of the PANs store-and-forward keeps for queued messages.
//!
//! - Data files are created `0600` in `0700` directories (the journal's [`FsStorage`] does
//!   it); [`check_private_tree`] refuses a data directory, or a file in it, that group or
//!   others may read, write or enter.
//! - Key files ([`load_or_create_key`]) live in their own `0700` directory outside
//!   `journal.dir`, are created `0600` with random bytes only when the caller says the data
//!   they protect is empty, and are refused when their mode is looser.
//!
//! [`FsStorage`]: crate::journal::FsStorage

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

/// Mode of data and key directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of data and key files.
pub const FILE_MODE: u32 = 0o600;
/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;
/// Most entries looked at by [`check_private_tree`] (a journal holds a few dozen files).
const TREE_ENTRIES_MAX: usize = 100_000;

/// Why a data directory or key file cannot be used; one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AtRestError(pub String);

/// Whether `mode` lets group or others in.
fn too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Checks that `dir` (when it exists), every directory below it and every file in them are
/// private to the owner (no group or other bits). The error names the first offender and
/// the `chmod` that fixes it.
pub fn check_private_tree(dir: &Path) -> Result<(), AtRestError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AtRestError(format!("{}: {e}", dir.display()))),
    };
    let mut stack = vec![(dir.to_path_buf(), meta)];
    let mut seen = 0usize;
    while let Some((path, meta)) = stack.pop() {
        seen += 1;
        if seen > TREE_ENTRIES_MAX {
            break;
        }
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            if too_open(mode) {
                return Err(loose(&path, mode, DIR_MODE));
            }
            let entries = std::fs::read_dir(&path)
                .map_err(|e| AtRestError(format!("{}: {e}", path.display())))?;
            for entry in entries {
                let entry = entry.map_err(|e| AtRestError(format!("{}: {e}", path.display())))?;
                let child = entry.path();
                let meta = std::fs::symlink_metadata(&child)
                    .map_err(|e| AtRestError(format!("{}: {e}", child.display())))?;
                stack.push((child, meta));
            }
        } else if meta.is_file() && too_open(mode) {
            return Err(loose(&path, mode, FILE_MODE));
        }
    }
    Ok(())
}

fn loose(path: &Path, mode: u32, want: u32) -> AtRestError {
    AtRestError(format!(
        "{}: mode {mode:04o} lets group/others in (card data at rest must be {want:04o}); \
         fix with: chmod -R go-rwx {}",
        path.display(),
        path.display()
    ))
}

/// Whether `path` lies inside `dir`, compared on absolute, lexically normalised paths.
pub fn is_inside(path: &Path, dir: &Path) -> bool {
    match (std::path::absolute(path), std::path::absolute(dir)) {
        (Ok(p), Ok(d)) => normalise(&p).starts_with(normalise(&d)),
        _ => false,
    }
}

fn normalise(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Reads the `len`-byte key at `path`, or creates it (random, `0600`, in a `0700`
/// directory) when it is missing and `may_create` says the data it protects is empty.
/// `what` names the key in errors (`security.pan_hash_key`).
pub fn load_or_create_key(
    path: &Path,
    len: usize,
    may_create: Result<(), String>,
    what: &str,
) -> Result<Vec<u8>, AtRestError> {
    let err = |m: String| AtRestError(format!("{what} {}: {m}", path.display()));
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if too_open(mode) {
                return Err(err(format!(
                    "mode {mode:04o} lets group/others in; fix with: chmod 600 {}",
                    path.display()
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            if bytes.len() != len {
                return Err(err(format!("expected {len} bytes, found {}", bytes.len())));
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Err(why) = may_create {
                return Err(err(format!(
                    "missing, and {why}: restore the key file (a new key would not match the \
                     data already written)"
                )));
            }
            let mut key = vec![0u8; len];
            rand::fill(&mut key[..]);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(parent)
                    .map_err(|e| err(format!("create directory: {e}")))?;
            }
            write_new_private(path, &key).map_err(|e| err(e.to_string()))?;
            tracing::warn!(key = what, path = %path.display(), "created a new key file; back it up apart from the data");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Creates `path` (it must not exist) with mode `0600` and `bytes`, synced.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// AES-256-GCM over PANs kept by store-and-forward. Sealed form: 12-byte random nonce, then
/// ciphertext and tag; the caller's associated data binds it to its entry.
#[derive(Clone)]
pub struct PanCipher(Aes256Gcm);

impl fmt::Debug for PanCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanCipher(<redacted>)")
    }
}

impl PanCipher {
    /// Bytes of the key.
    pub const KEY_BYTES: usize = 32;

    /// A cipher under a 32-byte key; `None` for another length.
    pub fn new(key: &[u8]) -> Option<PanCipher> {
        Aes256Gcm::new_from_slice(key).ok().map(PanCipher)
    }

    /// Encrypts `pan` bound to `aad`.
    pub fn seal(&self, pan: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let sealed = self
            .0
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: pan, aad })
            .ok()?;
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Decrypts what [`PanCipher::seal`] made with the same `aad`; `None` when it does not
    /// authenticate (another key, another entry, damage).
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sealed_pans_open_only_with_their_key_and_entry() {
        let cipher = PanCipher::new(&[7; 32]).unwrap();
        let sealed = cipher.seal(b"4761739001010119", b"entry 1").unwrap();
        assert!(!sealed.windows(16).any(|w| w == b"4761739001010119"));
        assert_eq!(
            cipher.open(&sealed, b"entry 1").unwrap(),
            b"4761739001010119"
        );
        assert_eq!(cipher.open(&sealed, b"entry 2"), None);
        assert_eq!(
            PanCipher::new(&[8; 32]).unwrap().open(&sealed, b"entry 1"),
            None
        );
        assert!(PanCipher::new(&[7; 16]).is_none());
    }

    #[test]
    fn keys_are_created_private_only_when_allowed_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/pan.key");
        let refused = load_or_create_key(&path, 16, Err("the journal has data".into()), "k");
        assert!(refused.unwrap_err().0.contains("the journal has data"));
        let key = load_or_create_key(&path, 16, Ok(()), "k").unwrap();
        assert_eq!(key.len(), 16);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(
            load_or_create_key(&path, 16, Err("x".into()), "k").unwrap(),
            key
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_key(&path, 16, Ok(()), "k")
            .unwrap_err()
            .0
            .contains("chmod 600"));
    }

    #[test]
    fn a_data_tree_with_a_readable_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .unwrap();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(data.join("saf"))
            .unwrap();
        write_new_private(&data.join("saf/x.seg"), b"x").unwrap();
        assert_eq!(check_private_tree(&data), Ok(()));
        std::fs::set_permissions(
            data.join("saf/x.seg"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = check_private_tree(&data).unwrap_err();
        assert!(e.0.contains("x.seg") && e.0.contains("0644"), "{e}");
        std::fs::set_permissions(
            data.join("saf/x.seg"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private_tree(&data).unwrap_err().0.contains("0755"));
        assert_eq!(check_private_tree(&dir.path().join("absent")), Ok(()));
    }

    #[test]
    fn inside_is_lexical_and_absolute() {
        assert!(is_inside(
            Path::new("data/journal/k"),
            Path::new("data/journal")
        ));
        assert!(is_inside(
            Path::new("data/x/../journal/k"),
            Path::new("./data/journal")
        ));
        assert!(!is_inside(
            Path::new("data/journal-keys/k"),
            Path::new("data/journal")
        ));
    }
}
