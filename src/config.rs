//! Configuration: read once into one [`Config`], validated before any port is bound.
//!
//! Unknown keys are rejected and every error names the key it is about ([`ConfigError::key`]),
//! so the binary can print one line and exit 64 (`EX_USAGE`). Without a file the embedded
//! defaults apply; [`Config::documented_defaults`] is every option with its default, as TOML.
//!
//! Relative paths (`merchants`, `journal.dir`, `tls.*`) are relative to the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::frame::Framing;
use crate::limits;

/// Every option with its default, as a TOML file (the README includes it).
const DOCUMENTED_DEFAULTS: &str = r#"# refundgate configuration: every option with its default.
# Unknown keys are errors. Relative paths are relative to the working directory.

# Merchant file (DOMAIN §4). Absent: the embedded sample set.
# merchants = "fixtures/merchants.toml"

[admin]
# /metrics (Prometheus), /healthz, /readyz over plain HTTP/1.1.
addr = "127.0.0.1:9583"

[journal]
dir = "data/journal"
# "fdatasync" (an approval is sent only once durable) or "unsafe_no_fsync" (tests, benchmarks).
durability = "fdatasync"
# Write a ledger snapshot after this many journal records (bounds start-up replay).
snapshot_every_records = 1000000

[log]
# "plain" or "json".
format = "plain"
# tracing-subscriber EnvFilter directives; RUST_LOG overrides them.
filter = "info"

# One table per listening socket. Without any [[listeners]] these two apply.
[[listeners]]
addr = "127.0.0.1:8583"
# "ascii1987" or "cup_pos" (cup_pos frames carry a 5-byte TPDU and a 6-byte header).
dialect = "ascii1987"
# Length header: "binary2" (2-byte big-endian), "ascii4" (4 ASCII digits, 0000 = keep-alive)
# or "bcd2" (2-byte BCD).
framing = "binary2"
# TLS: without cert/key a self-signed certificate (localhost, 127.0.0.1) is generated at start
# and its SHA-256 fingerprint logged. client_ca set: clients must present a certificate it signed.
# tls = { cert = "server.pem", key = "server.key", client_ca = "ca.pem" }
# Optional MAC of this link, interpreted by the message layer (key never logged).
# mac = { algorithm = "x919", key = "0123456789ABCDEFFEDCBA9876543210" }

[[listeners]]
addr = "127.0.0.1:8584"
dialect = "cup_pos"
framing = "binary2"

[limits]
# Connections held at once over all listeners; one more is accepted, closed and counted.
max_connections = 1024
# Largest frame after the length header; never above 65536 (binary2 can say 65535 at most,
# ascii4 and bcd2 9999).
max_frame_bytes = 8192
# Requests of one connection dispatched at once; answers still go out in request order.
max_in_flight_per_connection = 8
handshake_timeout_ms = 5000
# A connection with nothing in flight and no complete frame for this long is closed.
idle_timeout_ms = 60000
# On SIGTERM/SIGINT: stop accepting, answer what is in flight within this, then close.
shutdown_grace_ms = 5000
"#;

/// The whole configuration of one refundgate process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Merchant file; `None` = the embedded sample set.
    #[serde(default)]
    pub merchants: Option<PathBuf>,
    /// Admin HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Journal location and durability.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Listening sockets; at least one.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// Bounds of the server.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server (plain HTTP; keep it on loopback or a private network).
    pub addr: SocketAddr,
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Directory of the journal and its snapshots.
    pub dir: PathBuf,
    /// Whether an approval waits for `fdatasync`.
    pub durability: Durability,
    /// A ledger snapshot is written once this many records were journaled since the last
    /// one, so that start-up replays at most about this many records.
    pub snapshot_every_records: u64,
}

/// `journal.durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// An approval is sent only after its journal record is on stable storage (DOMAIN §7).
    Fdatasync,
    /// No sync at all: for tests and benchmarks only; a crash can lose approved refunds.
    UnsafeNoFsync,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// `EnvFilter` directives (`RUST_LOG` overrides them).
    pub filter: String,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// One `[[listeners]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on (port 0: any free port, for tests).
    pub addr: SocketAddr,
    /// Message dialect spoken on this listener.
    #[serde(default = "default_dialect")]
    pub dialect: Dialect,
    /// Length header.
    #[serde(default = "default_framing")]
    pub framing: Framing,
    /// Certificate, key and optional client CA.
    #[serde(default)]
    pub tls: TlsConfig,
    /// MAC of this link; interpreted by the message layer.
    #[serde(default)]
    pub mac: Option<MacConfig>,
}

/// The ISO 8583 dialect of a listener (DOMAIN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// ASCII ISO 8583:1987.
    #[serde(rename = "ascii1987")]
    Ascii1987,
    /// China UnionPay POS: BCD fields, TPDU + 6-byte header after the length.
    CupPos,
}

/// `tls = { ... }` of a listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Absent (with `key`): a self-signed certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM CA certificates; when set, every client must present a certificate they signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `mac = { algorithm, key }` of a listener, kept opaque here: the message layer interprets
/// both. `Debug` never shows the key (DOMAIN §10).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacConfig {
    /// Algorithm name, e.g. `x919`, `cup_ecb`, `aes_cmac`.
    pub algorithm: String,
    /// The key, as written in the file (usually hex).
    pub key: String,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections held at once over all listeners.
    pub max_connections: usize,
    /// Largest frame after its length header.
    pub max_frame_bytes: usize,
    /// Requests of one connection dispatched at once.
    pub max_in_flight_per_connection: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout_ms: u64,
    /// Longest a connection may stay without a complete frame while nothing is in flight.
    pub idle_timeout_ms: u64,
    /// Longest the drain after a shutdown signal may take.
    pub shutdown_grace_ms: u64,
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {key}: {message}")]
pub struct ConfigError {
    /// Dotted key path (`limits.max_frame_bytes`, `listeners[1].tls.cert`), or `file`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

// === impl Config ===

impl Default for Config {
    fn default() -> Self {
        Self {
            merchants: None,
            admin: AdminConfig::default(),
            journal: JournalConfig::default(),
            log: LogConfig::default(),
            listeners: default_listeners(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Config {
    /// Every option with its default, as a commented TOML file.
    pub fn documented_defaults() -> &'static str {
        DOCUMENTED_DEFAULTS
    }

    /// Reads and validates `path`, or returns the validated defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            key: "file".to_string(),
            message: format!("{}: {e}", path.display()),
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            key: toml_error_key(text, &e),
            message: e.message().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every relation serde cannot; the first failure names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        if self.listeners.is_empty() {
            return Err(error("listeners", "at least one listener is needed"));
        }
        if self.listeners.len() > limits::LISTENERS_MAX {
            return Err(error(
                "listeners",
                format!("at most {} listeners", limits::LISTENERS_MAX),
            ));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            listener.validate(i)?;
            let clash = self.listeners[..i]
                .iter()
                .any(|other| other.addr == listener.addr && listener.addr.port() != 0);
            if clash || (listener.addr == self.admin.addr && listener.addr.port() != 0) {
                return Err(error(
                    format!("listeners[{i}].addr"),
                    format!("{} is used twice", listener.addr),
                ));
            }
        }
        if let Some(merchants) = &self.merchants {
            if !merchants.is_file() {
                return Err(error(
                    "merchants",
                    format!("{} is not a readable file", merchants.display()),
                ));
            }
        }
        if self.journal.dir.as_os_str().is_empty() {
            return Err(error("journal.dir", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(error("log.filter", e.to_string()));
        }
        Ok(())
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![
        ListenerConfig::new(loopback(8583), Dialect::Ascii1987, Framing::Binary2),
        ListenerConfig::new(loopback(8584), Dialect::CupPos, Framing::Binary2),
    ]
}

fn default_dialect() -> Dialect {
    Dialect::Ascii1987
}

fn default_framing() -> Framing {
    Framing::Binary2
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// The dotted key a TOML/serde error is about: the unknown field it names, or the key on the
/// line its span points at, or `file` when neither can be told.
fn toml_error_key(text: &str, e: &toml::de::Error) -> String {
    let message = e.message();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(field) = rest.split('`').next() {
            return match section_at(text, e.span().map(|s| s.start)) {
                Some(section) => format!("{section}.{field}"),
                None => field.to_string(),
            };
        }
    }
    let Some(start) = e.span().map(|s| s.start) else {
        return "file".to_string();
    };
    let line_start = text
        .get(..start)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |p| p + 1);
    let line = text
        .get(line_start..)
        .and_then(|t| t.lines().next())
        .unwrap_or("");
    let key = line
        .split('=')
        .next()
        .map(|k| k.trim().trim_start_matches('[').trim_end_matches(']'))
        .filter(|k| !k.is_empty() && !line.trim_start().starts_with('['))
        .map(str::to_string);
    match (section_at(text, Some(start)), key) {
        (Some(section), Some(key)) => format!("{section}.{key}"),
        (None, Some(key)) => key,
        (Some(section), None) => section,
        (None, None) => "file".to_string(),
    }
}

/// The `[section]` or `[[section]]` in force at byte `at`.
fn section_at(text: &str, at: Option<usize>) -> Option<String> {
    let before = text.get(..at?)?;
    before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
}

// === impl sections ===

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: loopback(9583),
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/journal"),
            durability: Durability::Fdatasync,
            snapshot_every_records: 1_000_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            filter: "info".to_string(),
        }
    }
}

impl ListenerConfig {
    /// A listener with self-signed TLS and no MAC.
    pub fn new(addr: SocketAddr, dialect: Dialect, framing: Framing) -> Self {
        Self {
            addr,
            dialect,
            framing,
            tls: TlsConfig::default(),
            mac: None,
        }
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listeners[{index}].{k}");
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return Err(error(key("tls.key"), "cert is set but key is not")),
            (None, Some(_)) => return Err(error(key("tls.cert"), "key is set but cert is not")),
            _ => {}
        }
        for (name, path) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(error(
                        key(name),
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        if let Some(mac) = &self.mac {
            if mac.algorithm.trim().is_empty() {
                return Err(error(key("mac.algorithm"), "must not be empty"));
            }
            if mac.key.trim().is_empty() {
                return Err(error(key("mac.key"), "must not be empty"));
            }
        }
        Ok(())
    }
}

impl Dialect {
    /// The name used in configuration files and as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dialect::Ascii1987 => "ascii1987",
            Dialect::CupPos => "cup_pos",
        }
    }

    /// Whether frames of this dialect carry the CUP TPDU and 6-byte header after the length.
    pub const fn has_cup_header(self) -> bool {
        matches!(self, Dialect::CupPos)
    }
}

impl std::fmt::Debug for MacConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacConfig")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: limits::CONNECTIONS_DEFAULT_MAX,
            max_frame_bytes: limits::FRAME_BYTES_DEFAULT_MAX,
            max_in_flight_per_connection: limits::IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX,
            handshake_timeout_ms: limits::HANDSHAKE_TIMEOUT_DEFAULT_MS,
            idle_timeout_ms: limits::IDLE_TIMEOUT_DEFAULT_MS,
            shutdown_grace_ms: limits::SHUTDOWN_GRACE_DEFAULT_MS,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let range = |key: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(error(
                    format!("limits.{key}"),
                    format!("{value} is outside {min}..={max}"),
                ))
            }
        };
        let wide = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        range(
            "max_connections",
            wide(self.max_connections),
            1,
            wide(limits::CONNECTIONS_HARD_MAX),
        )?;
        range(
            "max_frame_bytes",
            wide(self.max_frame_bytes),
            wide(limits::FRAME_BYTES_MIN),
            wide(limits::FRAME_BYTES_HARD_MAX),
        )?;
        range(
            "max_in_flight_per_connection",
            wide(self.max_in_flight_per_connection),
            1,
            wide(limits::IN_FLIGHT_PER_CONNECTION_HARD_MAX),
        )?;
        let max_ms = limits::TIMEOUT_HARD_MAX_MS;
        range("handshake_timeout_ms", self.handshake_timeout_ms, 1, max_ms)?;
        range("idle_timeout_ms", self.idle_timeout_ms, 1, max_ms)?;
        range("shutdown_grace_ms", self.shutdown_grace_ms, 0, max_ms)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn documented_defaults_are_the_defaults() {
        let parsed = Config::from_toml(Config::documented_defaults()).unwrap();
        assert_eq!(parsed, Config::default());
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        assert_eq!(Config::load(None).unwrap(), Config::default());
    }

    #[test]
    fn the_full_shape_parses() {
        let config = Config::from_toml(
            r#"
merchants = "Cargo.toml"
[admin]
addr = "127.0.0.1:19583"
[journal]
dir = "x"
durability = "unsafe_no_fsync"
[[listeners]]
addr = "127.0.0.1:0"
dialect = "cup_pos"
framing = "bcd2"
mac = { algorithm = "x919", key = "0123456789ABCDEF" }
[limits]
max_frame_bytes = 65536
"#,
        )
        .unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].framing, Framing::Bcd2);
        assert_eq!(config.journal.durability, Durability::UnsafeNoFsync);
        let debug = format!("{config:?}");
        assert!(!debug.contains("0123456789ABCDEF"), "{debug}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[limits]\nmax_frame_bytes = 70000\n", "limits.max_frame_bytes"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nbogus = 1\n", "limits.bogus"),
            ("[limits]\nidle_timeout_ms = \"x\"\n", "limits.idle_timeout_ms"),
            ("[[listeners]]\naddr = \"nope\"\n", "listeners.addr"),
            (
                "[[listeners]]\naddr = \"127.0.0.1:1\"\nframing = \"ascii5\"\n",
                "listeners.framing",
            ),
            (
                "[[listeners]]\naddr = \"127.0.0.1:1\"\ntls = { cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }\n",
                "listeners[0].tls.cert",
            ),
            ("listeners = []\n", "listeners"),
            ("merchants = \"/nonexistent/m.toml\"\n", "merchants"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).unwrap_err();
            assert_eq!(err.key, key, "{text:?} gave {err}");
            assert!(err.to_string().contains(key));
        }
    }
}
