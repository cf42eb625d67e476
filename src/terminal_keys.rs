//! Who a terminal is and which keys it uses (DOMAIN §11, issue 18).
//!
//! - [`TerminalKeys`]: each listed terminal's master key (TMK), read once from
//!   `security.terminal_keys` (a `0600` file outside the data directory), and the working keys
//!   (MAK, PIK) it got at its last sign-on. Working keys are made with the CSPRNG at every
//!   sign-on, leave the process only encrypted under the TMK (DE62), and live in memory only:
//!   after a restart a terminal signs on again (its first MACed message gets A0, the CUP
//!   signal to do so). Every key is zeroised on drop and shows only its check value in `Debug`.
//! - [`Identities`]: which merchant and terminal ids each client certificate of an mTLS
//!   listener may use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use zeroize::Zeroize;

use crate::at_rest::{self, AtRestError};
use crate::config::IdentityConfig;
use crate::limits;
use crate::mac::{self, DesKey, MacKey};
use crate::server::tls::ClientCert;

/// Master keys and current working keys of the terminals listed in `security.terminal_keys`.
pub struct TerminalKeys {
    /// DE42 → DE41 → terminal.
    merchants: HashMap<String, HashMap<String, Terminal>>,
    /// How many terminals are listed (read on every MAC check).
    count: usize,
}

/// The MAC key a message of one terminal is checked and answered with.
#[derive(Debug, Clone)]
pub enum TerminalMac {
    /// The terminal has no TMK: the link's static key (if any) applies.
    Link,
    /// The terminal has a TMK: its MAK from the last sign-on, `None` before any sign-on.
    Own(Option<Arc<MacKey>>),
}

/// Fresh working keys of one sign-on.
pub struct WorkingKeys {
    /// The answer's DE62: PIK and MAK under the TMK, each with its check value.
    pub de62: [u8; mac::SIGNON_DE62_BYTES],
    /// The new MAK, now the terminal's.
    pub mak: Arc<MacKey>,
}

/// Which merchant and terminal ids each client certificate of a listener may use.
#[derive(Debug, Default)]
pub struct Identities {
    /// `subject:…`, `san:…` or `sha256:…` → (merchant, terminal or `None` for any).
    by_match: HashMap<String, Vec<(String, Option<String>)>>,
}

struct Terminal {
    tmk: DesKey,
    working: Mutex<Option<Working>>,
}

struct Working {
    mak: Arc<MacKey>,
    /// Kept for PIN translation; not used by refunds and voids yet.
    #[allow(dead_code)]
    pik: DesKey,
}

/// The `security.terminal_keys` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    terminal: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    merchant: String,
    terminal: String,
    tmk: String,
}

impl Drop for KeyEntry {
    fn drop(&mut self) {
        self.tmk.zeroize();
    }
}

impl TerminalKeys {
    /// Reads the key file at `path`: refused when group or others may read it, when it is
    /// larger than [`limits::TERMINAL_KEYS_FILE_BYTES_MAX`], or when an entry is malformed.
    /// Errors name the entry, never a key.
    pub fn load(path: &Path) -> Result<TerminalKeys, AtRestError> {
        let what = "security.terminal_keys";
        let mut bytes =
            at_rest::read_private_file(path, limits::TERMINAL_KEYS_FILE_BYTES_MAX, what)?;
        let err = |m: String| AtRestError(format!("{what} {}: {m}", path.display()));
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|_| err("not UTF-8".into()))
            .and_then(|text| {
                // The TOML error would quote the offending line, which may hold a key.
                toml::from_str::<KeyFile>(text).map_err(|e| {
                    let at = e.span().map_or(0, |s| s.start);
                    err(format!("not a valid key file (error at byte {at})"))
                })
            });
        bytes.zeroize();
        let file = parsed?;
        if file.terminal.len() > limits::TERMINAL_KEYS_MAX {
            return Err(err(format!(
                "at most {} terminals",
                limits::TERMINAL_KEYS_MAX
            )));
        }
        let mut keys = TerminalKeys::empty();
        for (i, entry) in file.terminal.iter().enumerate() {
            let tmk =
                DesKey::from_hex(&entry.tmk).map_err(|e| err(format!("terminal[{i}].tmk: {e}")))?;
            if tmk.len_bytes() == 8 {
                return Err(err(format!(
                    "terminal[{i}].tmk: a TMK must be 16 or 24 bytes (3DES)"
                )));
            }
            if !keys.insert(&entry.merchant, &entry.terminal, tmk) {
                return Err(err(format!(
                    "terminal[{i}]: {} / {} is listed twice",
                    entry.merchant, entry.terminal
                )));
            }
        }
        Ok(keys)
    }

    /// No terminal has its own keys.
    pub fn empty() -> TerminalKeys {
        TerminalKeys {
            merchants: HashMap::new(),
            count: 0,
        }
    }

    /// Gives `terminal` of `merchant` the master key `tmk`; `false` when it already had one.
    pub fn insert(&mut self, merchant: &str, terminal: &str, tmk: DesKey) -> bool {
        let terminals = self.merchants.entry(merchant.to_string()).or_default();
        if terminals.contains_key(terminal) {
            return false;
        }
        let t = Terminal {
            tmk,
            working: Mutex::new(None),
        };
        terminals.insert(terminal.to_string(), t);
        self.count += 1;
        true
    }

    /// How many terminals have a master key.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no terminal has a master key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The MAC key of a message from `terminal` of `merchant`.
    pub fn mac_key(&self, merchant: Option<&str>, terminal: Option<&str>) -> TerminalMac {
        match self.terminal(merchant, terminal) {
            None => TerminalMac::Link,
            Some(t) => TerminalMac::Own(
                t.working
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|w| Arc::clone(&w.mak)),
            ),
        }
    }

    /// Makes and installs fresh working keys for a terminal with a master key (`None`
    /// otherwise); the previous ones stop working at once.
    pub fn sign_on(&self, merchant: &str, terminal: &str) -> Option<WorkingKeys> {
        let t = self.terminal(Some(merchant), Some(terminal))?;
        let pik = DesKey::random_single();
        let mak = DesKey::random_single();
        let de62 = mac::encrypt_cup_signon_keys(&t.tmk, &pik, &mak)?;
        let mak = Arc::new(MacKey::cup_pos(mak));
        *t.working.lock().unwrap_or_else(PoisonError::into_inner) = Some(Working {
            mak: Arc::clone(&mak),
            pik,
        });
        Some(WorkingKeys { de62, mak })
    }

    fn terminal(&self, merchant: Option<&str>, terminal: Option<&str>) -> Option<&Terminal> {
        self.merchants.get(merchant?)?.get(terminal?)
    }
}

impl std::fmt::Debug for TerminalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalKeys")
            .field("terminals", &self.len())
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// The map of a listener's `identities`; `None` when it has none (any id is allowed).
    pub fn from_config(entries: &[IdentityConfig]) -> Option<Identities> {
        if entries.is_empty() {
            return None;
        }
        let mut by_match: HashMap<String, Vec<(String, Option<String>)>> = HashMap::new();
        for e in entries {
            let key = match (&e.subject, &e.san, &e.sha256) {
                (Some(s), _, _) => format!("subject:{s}"),
                (_, Some(s), _) => format!("san:{s}"),
                (_, _, Some(h)) => format!("sha256:{}", fingerprint(h)),
                _ => continue,
            };
            let allowed = by_match.entry(key).or_default();
            for t in &e.terminals {
                let terminal = (t != "*").then(|| t.clone());
                allowed.push((e.merchant.clone(), terminal));
            }
        }
        Some(Identities { by_match })
    }

    /// Whether the holder of `cert` may send as `merchant` / `terminal` (a message without
    /// either id is not restricted). No certificate: nothing is permitted.
    pub fn permits(
        &self,
        cert: Option<&ClientCert>,
        merchant: Option<&str>,
        terminal: Option<&str>,
    ) -> bool {
        if merchant.is_none() && terminal.is_none() {
            return true;
        }
        let Some(cert) = cert else {
            return false;
        };
        let fits = |(m, t): &(String, Option<String>)| {
            merchant.is_none_or(|x| x == m)
                && terminal.is_none_or(|x| t.as_deref().is_none_or(|t| t == x))
        };
        let subject = cert.subject.iter().map(|s| format!("subject:{s}"));
        let sans = cert.sans.iter().map(|s| format!("san:{s}"));
        let fp = std::iter::once(format!("sha256:{}", cert.sha256));
        subject.chain(sans).chain(fp).any(|key| {
            self.by_match
                .get(&key)
                .is_some_and(|allowed| allowed.iter().any(fits))
        })
    }
}

/// A fingerprint as written in the configuration, normalised to lower-case hex.
fn fingerprint(text: &str) -> String {
    text.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TMK: &str = "11223344556677888877665544332211";

    fn keys() -> TerminalKeys {
        let mut k = TerminalKeys::empty();
        assert!(k.insert("M1", "T1", DesKey::from_hex(TMK).unwrap()));
        assert!(!k.insert("M1", "T1", DesKey::from_hex(TMK).unwrap()));
        k
    }

    #[test]
    fn sign_on_rotates_the_mak_and_delivers_it_under_the_tmk() {
        let k = keys();
        assert!(matches!(
            k.mac_key(Some("M1"), Some("T2")),
            TerminalMac::Link
        ));
        assert!(matches!(
            k.mac_key(Some("M1"), Some("T1")),
            TerminalMac::Own(None)
        ));
        let first = k.sign_on("M1", "T1").unwrap();
        let tmk = DesKey::from_hex(TMK).unwrap();
        let (_, mak) = mac::decrypt_cup_signon_keys(&tmk, &first.de62).unwrap();
        assert_eq!(mak.check_value(), first.mak.check_value());
        let second = k.sign_on("M1", "T1").unwrap();
        assert_ne!(first.mak.check_value(), second.mak.check_value());
        let TerminalMac::Own(Some(now)) = k.mac_key(Some("M1"), Some("T1")) else {
            panic!("signed on");
        };
        assert_eq!(now.check_value(), second.mak.check_value());
        assert!(k.sign_on("M1", "T2").is_none());
    }

    #[test]
    fn the_key_file_must_be_private_and_errors_never_show_a_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("terminal-keys.toml");
        let text = format!("[[terminal]]\nmerchant = \"M1\"\nterminal = \"T1\"\ntmk = \"{TMK}\"\n");
        at_rest::write_new_private(&path, text.as_bytes()).unwrap();
        let k = TerminalKeys::load(&path).unwrap();
        assert_eq!(k.len(), 1);
        assert!(!format!("{k:?}").contains(TMK));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = TerminalKeys::load(&path).unwrap_err();
        assert!(e.0.contains("chmod 600"), "{e}");

        let bad = path.with_file_name("bad.toml");
        let text = format!(
            "[[terminal]]\nmerchant = \"M1\"\nterminal = \"T1\"\ntmk = \"{TMK}\"\nx = \"{TMK}\"\n"
        );
        at_rest::write_new_private(&bad, text.as_bytes()).unwrap();
        let e = TerminalKeys::load(&bad).unwrap_err();
        assert!(!e.0.contains(TMK), "{e}");
        let short = path.with_file_name("short.toml");
        let text =
            "[[terminal]]\nmerchant = \"M1\"\nterminal = \"T1\"\ntmk = \"0123456789ABCDEF\"\n";
        at_rest::write_new_private(&short, text.as_bytes()).unwrap();
        let e = TerminalKeys::load(&short).unwrap_err();
        assert!(e.0.contains("16 or 24"), "{e}");
        assert!(!e.0.contains("0123456789ABCDEF"), "{e}");
    }

    #[test]
    fn a_certificate_may_use_only_its_ids() {
        let config: Vec<IdentityConfig> = toml::from_str::<toml::Table>(
            r#"ids = [
                { subject = "CN=terminal A", merchant = "M1", terminals = ["TA"] },
                { sha256 = "AB:CD", merchant = "M2", terminals = ["*"] },
            ]"#,
        )
        .unwrap()["ids"]
            .clone()
            .try_into()
            .unwrap();
        let ids = Identities::from_config(&config).unwrap();
        let a = ClientCert {
            subject: Some("CN=terminal A".into()),
            sans: vec![],
            sha256: "00".into(),
        };
        assert!(ids.permits(Some(&a), Some("M1"), Some("TA")));
        assert!(!ids.permits(Some(&a), Some("M1"), Some("TB")));
        assert!(!ids.permits(Some(&a), Some("M2"), Some("TA")));
        assert!(ids.permits(Some(&a), None, None), "an echo carries no id");
        assert!(!ids.permits(None, Some("M1"), Some("TA")));
        let b = ClientCert {
            subject: None,
            sans: vec![],
            sha256: "abcd".into(),
        };
        assert!(ids.permits(Some(&b), Some("M2"), Some("ANY")));
        assert!(!ids.permits(Some(&b), Some("M1"), Some("TA")));
    }
}
