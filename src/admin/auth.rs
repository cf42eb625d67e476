//! Bearer tokens of the admin API, read once from `admin.token_file`.
//!
//! The file holds one token per line, either `name:token` (the name is the identity journaled
//! with each change) or a bare token (identity `admin`); blank lines and `#` comments are
//! skipped. It must not be readable by group or others (like the PAN hash key, DOMAIN §10):
//! a readable file is refused at start-up, so the gateway never runs with a leaked secret.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Shortest token accepted: a guessable token is no authentication.
pub const TOKEN_LEN_MIN: usize = 16;
/// Most tokens one file may hold.
pub const TOKENS_MAX: usize = 64;

/// The tokens that may call the admin API.
#[derive(Clone, Default)]
pub struct Tokens {
    /// (identity, token); empty: every protected endpoint answers 403.
    entries: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Identities only: tokens never reach logs or `Debug` output.
        f.debug_struct("Tokens")
            .field(
                "identities",
                &self.entries.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Tokens {
    /// No token: the admin API answers 403 to everything but the open endpoints.
    pub fn none() -> Tokens {
        Tokens::default()
    }

    /// Whether any token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads `path`; refuses a file readable by group or others, an empty one, a short
    /// token or a bad identity, with one line naming the file.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let at = |why: String| format!("admin.token_file {}: {why}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| at(e.to_string()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(at(format!(
                "mode {:o} lets group or others read it; chmod 600",
                mode & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        Tokens::parse(&text).map_err(at)
    }

    /// Parses the file's text (see the module documentation).
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = match line.split_once(':') {
                Some((name, token)) => (name.trim(), token.trim()),
                None => ("admin", line),
            };
            let name_ok = !name.is_empty()
                && name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                return Err(format!(
                    "line {}: identity must be 1-32 of A-Z a-z 0-9 - _ .",
                    n + 1
                ));
            }
            if token.len() < TOKEN_LEN_MIN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a token is at least {TOKEN_LEN_MIN} printable characters",
                    n + 1
                ));
            }
            if entries.len() >= TOKENS_MAX {
                return Err(format!("more than {TOKENS_MAX} tokens"));
            }
            entries.push((name.to_string(), token.as_bytes().to_vec()));
        }
        if entries.is_empty() {
            return Err("no token in the file".to_string());
        }
        Ok(Tokens { entries })
    }

    /// The identity of an `Authorization: Bearer …` header value, if its token is known.
    /// Every token is compared in full, in time independent of where they differ.
    pub fn identify(&self, authorization: Option<&str>) -> Option<&str> {
        let presented = authorization?.strip_prefix("Bearer ")?.trim().as_bytes();
        let mut found = None;
        for (name, token) in &self.entries {
            if constant_time_eq(token, presented) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_named_token_identifies_its_holder_and_others_do_not() {
        let t = Tokens::parse("# ops\nops:0123456789abcdef\n0123456789ABCDEF\n").unwrap();
        assert_eq!(t.identify(Some("Bearer 0123456789abcdef")), Some("ops"));
        assert_eq!(t.identify(Some("Bearer 0123456789ABCDEF")), Some("admin"));
        assert_eq!(t.identify(Some("Bearer 0123456789abcdeF")), None);
        assert_eq!(t.identify(Some("0123456789abcdef")), None);
        assert_eq!(t.identify(None), None);
    }

    #[test]
    fn short_tokens_and_empty_files_are_refused() {
        assert!(Tokens::parse("ops:short").is_err());
        assert!(Tokens::parse("# nothing\n").is_err());
        assert!(Tokens::parse("bad name:0123456789abcdef").is_err());
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "ops:0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Tokens::load(&path).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Tokens::load(&path).is_ok());
    }
}
