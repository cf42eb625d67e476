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

# Dialect files beyond the embedded ascii1987, cup_pos and iso87b: NAME.dialect.toml with the
# element spec it names beside it (see specs/). Listeners and upstreams can then name NAME.
dialects = []

[admin]
# /metrics (Prometheus), /healthz, /readyz over plain HTTP/1.1.
addr = "127.0.0.1:9583"
# Longest one admin connection may stay open (a client that pipelines and never reads
# would otherwise hold one of the 16 admin slots for ever).
connection_timeout_ms = 30000
# Bearer tokens of the admin API (/v1/...), one `name:token` per line; the file must be
# 0600. Absent: /metrics, /healthz and /readyz only, every /v1/ call answers 403.
# token_file = "/etc/refundgate/admin.tokens"

[journal]
dir = "data/journal"
# "fdatasync" (an approval is sent only once durable) or "unsafe_no_fsync" (tests, benchmarks).
durability = "fdatasync"
# Write a ledger snapshot after this many journal records (bounds start-up replay). With
# backend = "jetstream": once the stream is this many sequences past the newest snapshot in
# the object store bucket "<stream>_SNAPSHOTS" (any node writes it; starts read the rest).
snapshot_every_records = 1000000
# Size of each journal segment file, preallocated when it is created (4096 ..= 1073741824).
segment_bytes = 67108864
# Group commit under load: while the journal takes more than gather_above_per_s records a
# second, its writer writes at most once per gather_us (it waits until gather_us after its
# previous write began, adding what arrives meanwhile), so one fdatasync covers more answers
# (each sync costs CPU the decisions could use). A sync slower than gather_us is followed
# at once, and so is the moment every connection thread has run out of work (nothing more
# can come). Below that rate a batch waits only for that moment, at most gather_us, so the
# requests of one burst share a sync. gather_us = 0: never wait (0 ..= 5000).
gather_us = 1000
gather_above_per_s = 10000
# "file" (this directory, one node) or "jetstream" (replicated on a NATS JetStream cluster:
# several gateway nodes for the same merchants; see [journal.jetstream] and deploy/cluster/).
backend = "file"

[journal.jetstream]
# NATS servers of the cluster (any subset; the client finds the others).
servers = ["nats://127.0.0.1:4222"]
# Stream of the ledger events; each merchant's events on <subject_prefix>.<hex merchant id>.
stream = "REFUNDGATE"
subject_prefix = "refundgate.events"
# Copies of each event (3 for a three-server cluster: an answer leaves once a quorum has it).
replicas = 1
# Longest wait for the stream's acknowledgement of one event (then 96, outcome unknown).
ack_timeout_ms = 2000
# One writer per merchant: > 0 turns leases on (a key-value bucket "<stream>_LEASES" with this
# TTL names each merchant's owner; other nodes forward its decisions to it); 0: any node
# decides, optimistic appends (see deploy/cluster/README.md). 0 or 300 ..= 60000.
lease_ttl_ms = 0

[log]
# "plain" or "json".
format = "plain"
# tracing-subscriber EnvFilter directives; RUST_LOG overrides them.
filter = "info"

# One table per listening socket. Without any [[listeners]] these two apply.
[[listeners]]
addr = "127.0.0.1:8583"
# A dialect of specs/*.dialect.toml: "ascii1987", "cup_pos" (frames carry a 5-byte TPDU and a
# 6-byte header) or "iso87b" (binary bitmaps, BCD numerics: jPOS ISO87BPackager).
dialect = "ascii1987"
# Length header: "binary2" (2-byte big-endian), "ascii4" (4 ASCII digits, 0000 = keep-alive)
# or "bcd2" (2-byte BCD).
framing = "binary2"
# TLS: without cert/key a self-signed certificate (localhost, 127.0.0.1) is generated at start
# and its SHA-256 fingerprint logged; on a non-loopback address that is refused unless
# `tls = { self_signed = true }` is written out. client_ca set: clients must present a
# certificate it signed.
# tls = { cert = "server.pem", key = "server.key", client_ca = "ca.pem" }
# Optional MAC of this link, interpreted by the message layer (key never logged). On a
# cup_pos link, terminals listed in security.terminal_keys get their own MAK at sign-on and
# this key stays for the others.
# mac = { algorithm = "x919", key = "0123456789ABCDEFFEDCBA9876543210" }
# With client_ca: which merchant and terminal ids each client certificate may use, matched by
# exactly one of subject (as `CN=…, O=…`), san (DNS, URI or e-mail) or sha256 (fingerprint,
# hex). Any other DE41/DE42 on the connection answers 58 TERMINAL_NOT_PERMITTED. Empty: any.
# identities = [{ subject = "CN=terminal 10000001", merchant = "898310048990001", terminals = ["10000001"] }]

[[listeners]]
addr = "127.0.0.1:8584"
dialect = "cup_pos"
framing = "binary2"

[limits]
# Connections held at once over all listeners; one more is accepted, closed and counted.
# A connection takes its slot only once its TLS ClientHello has arrived.
max_connections = 1024
# Established connections from one source address (0 = no limit).
max_connections_per_ip = 256
# Sockets accepted but not yet admitted (waiting for their ClientHello), over all listeners;
# when full the oldest is closed to make room, so silent sockets cannot lock terminals out.
max_handshakes = 256
# The same per source address: its oldest is closed (0 = no limit).
max_handshakes_per_ip = 32
# Loopback peers (a local TLS proxy: every terminal shows as 127.0.0.1) are exempt from the
# two per-address limits.
per_ip_exempt_loopback = true
# Largest frame after the length header; never above 65536 (binary2 can say 65535 at most,
# ascii4 and bcd2 9999).
max_frame_bytes = 8192
# Requests of one connection dispatched at once; answers still go out in request order.
max_in_flight_per_connection = 8
# Threads that serve the TLS connections, each with a single-threaded runtime of its own;
# a connection stays on one of them, handshake included (0 = one per core, at most 256).
connection_threads = 0
# Longest a new socket may take to send its ClientHello, and then to finish the handshake.
handshake_timeout_ms = 5000
# A connection with nothing in flight and no complete frame for this long is closed.
idle_timeout_ms = 60000
# On SIGTERM/SIGINT: stop accepting, answer what is in flight within this, then close.
shutdown_grace_ms = 5000
# Longest a request waits for its decision to be durable (a hung disk); then it is answered 96,
# outcome unknown (the terminal's repeat gets the stored answer). Below the terminal's ~60 s.
# Enforced by the journal's watchdog, which looks every 25 ms: the 96 leaves within ~50 ms of it.
request_deadline_ms = 20000

# Upstream bank hosts (DOMAIN §8). None by default: every merchant is decided locally.
# A routed merchant's sales, refunds and voids are approved only when the host approves them
# (after refundgate's own checks passed); its reversals are queued for the host.
# [[upstreams]]
# name = "bank_a"                       # metric label and route target
# addrs = ["10.0.0.1:9683", "10.0.0.2:9683"]   # priority order; the next on refusal
# dialect = "ascii1987"                 # another dialect than the terminals': translated (README)
# framing = "binary2"
# timeout_ms = 30000                    # switch→host budget; below the terminal's ~60 s
# write_timeout_ms = 5000               # a write batch not done by then: host wedged, link dropped
# read_timeout_ms = 30000               # nothing heard this long while a request is unanswered:
#                                       #   link dropped (default: timeout_ms; an echo probes
#                                       #   half-way, so a merely slow host keeps its link)
# max_pending = 1024                    # requests in flight on the link; beyond it 91
# echo_interval_ms = 30000              # echo (0800/301) after this much quiet
# reconnect_min_ms = 100                # reconnect backoff (doubles, ±25 % jitter)
# reconnect_max_ms = 10000
# server_name = "bank-a.example"        # checked against the host certificate; default: the IP
# TLS: `ca` (PEM) is required unless `insecure_skip_verify = true` (only for the simulator's
# self-signed certificate); cert + key present a client certificate (mTLS).
# tls = { ca = "bank-a-ca.pem", cert = "client.pem", key = "client.key" }
# MAC of this link (key never logged): financial requests and reversals carry DE64/DE128
# under it; an answer whose MAC is wrong, or an approval without one, counts as no answer
# (91/98, reversed). Network management is not MACed.
# mac = { algorithm = "x919", key = "0123456789ABCDEFFEDCBA9876543210" }

[routes]
# Upstream of merchants not listed below; absent: they are decided locally.
# default = "bank_a"
# DE42 → upstream name.
merchants = {}

[security]
# Keys protecting data at rest, kept outside journal.dir (a copy of the data directory alone
# must not reveal card numbers). Created (random, 0600 in a 0700 directory) at first start
# only while the data they protect is empty; refused when missing later, or when group or
# others may read them. Default: a directory beside the journal, <journal.dir>-keys.
# PAN hash key (16 bytes): PAN hashes in the ledger and journal.
# pan_hash_key = "/etc/refundgate/keys/pan-hash.key"
# AES-256-GCM key (32 bytes) of PANs store-and-forward keeps for queued messages (with
# journal.backend = "jetstream": the same file on every node).
# saf_pan_key = "/etc/refundgate/keys/saf-pan.key"
# Terminal master keys (DOMAIN §11), 0600, outside journal.dir; never created. Absent: no
# terminal has its own keys. A TOML file of
#   [[terminal]]
#   merchant = "898310048990001"
#   terminal = "10000001"
#   tmk = "11223344556677888877665544332211"   # 2-key 3DES, hex
# terminal_keys = "/etc/refundgate/keys/terminal-keys.toml"

[saf]
# Store-and-forward of reversals (<journal.dir>/saf; with journal.backend = "jetstream" the
# streams <stream>_SAF and <stream>_SAF_DEAD, shared by every node, where every delivery
# counts as a send): sends without an accepted answer before an entry is dead-lettered, age
# after which it is, and the retry backoff.
max_retries = 20
expiry_s = 86400
retry_min_ms = 1000
retry_max_ms = 60000
"#;

/// The whole configuration of one refundgate process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Merchant file; `None` = the embedded sample set.
    #[serde(default)]
    pub merchants: Option<PathBuf>,
    /// Dialect files (`NAME.dialect.toml`, its spec beside it) loaded before the rest of the
    /// file is read, so listeners and upstreams can name them ([`Config::load`]).
    #[serde(default)]
    pub dialects: Vec<PathBuf>,
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
    /// Upstream bank hosts.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Which upstream each merchant's requests go to.
    #[serde(default)]
    pub routes: RoutesConfig,
    /// Store-and-forward of reversals.
    #[serde(default)]
    pub saf: SafConfig,
    /// Key files and data-at-rest settings.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// `[security]`: where the keys protecting data at rest live (outside `journal.dir`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Key of the PAN hashes (16 bytes); default `<journal.dir>-keys/pan-hash.key`.
    #[serde(default)]
    pub pan_hash_key: Option<PathBuf>,
    /// AES-256-GCM key (32 bytes) of the PANs store-and-forward keeps for queued messages;
    /// default `<journal.dir>-keys/saf-pan.key`.
    #[serde(default)]
    pub saf_pan_key: Option<PathBuf>,
    /// File of terminal master keys (merchant + terminal id → TMK hex); none by default.
    #[serde(default)]
    pub terminal_keys: Option<PathBuf>,
}

/// One `[[upstreams]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name: route target and metric label.
    pub name: String,
    /// Addresses in priority order.
    pub addrs: Vec<SocketAddr>,
    /// Message dialect of the host.
    #[serde(
        default = "default_dialect",
        deserialize_with = "crate::dialect::Dialect::deserialize"
    )]
    pub dialect: Dialect,
    /// Length header.
    #[serde(default = "default_framing")]
    pub framing: Framing,
    /// TLS client settings.
    #[serde(default)]
    pub tls: UpstreamTlsConfig,
    /// Name checked against the host's certificate; default: the address's IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// How long a forwarded request waits for its answer.
    #[serde(default = "default_upstream_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest one batch of writes to the host may take before the link is dropped.
    #[serde(default = "default_upstream_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Longest the link may hear nothing while something sent is unanswered; absent: the
    /// same as `timeout_ms`.
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    /// Requests in flight on the link at once.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Quiet time after which an echo is sent.
    #[serde(default = "default_echo_interval_ms")]
    pub echo_interval_ms: u64,
    /// First reconnect delay.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// MAC key of this link: requests carry a MAC under it, answers are checked with it.
    #[serde(default)]
    pub mac: Option<MacConfig>,
}

/// `tls = { ... }` of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM CA certificates the host's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (mTLS).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM client private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Accept any host certificate (the simulator's self-signed one). Dangerous: a
    /// man-in-the-middle can read and answer everything.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// `[routes]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Upstream of merchants not listed.
    #[serde(default)]
    pub default: Option<String>,
    /// DE42 → upstream name.
    #[serde(default)]
    pub merchants: std::collections::BTreeMap<String, String>,
}

/// `[saf]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafConfig {
    /// Sends without an accepted answer before an entry is dead-lettered.
    pub max_retries: u32,
    /// Age in seconds after which an entry is dead-lettered.
    pub expiry_s: u64,
    /// First retry delay.
    pub retry_min_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server (plain HTTP; keep it on loopback or a private network).
    pub addr: SocketAddr,
    /// Longest one admin connection may stay open, whatever it does.
    #[serde(default = "default_admin_connection_timeout_ms")]
    pub connection_timeout_ms: u64,
    /// Bearer tokens of the admin API (`name:token` per line, mode 0600); `None`: the API
    /// answers 403 to every call but `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
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
    /// one, so that start-up replays at most about this many records (with the replicated
    /// journal: stream sequences past the newest snapshot in its bucket).
    pub snapshot_every_records: u64,
    /// Bytes of each segment file, preallocated at creation (tests use small ones).
    pub segment_bytes: u64,
    /// While the intake is above `gather_above_per_s`, the journal writer writes at most
    /// once per this many microseconds, gathering records meanwhile; 0: never waits.
    pub gather_us: u64,
    /// Records per second above which the writer waits `gather_us` (file backend).
    pub gather_above_per_s: u64,
    /// Where the ledger's events are journaled.
    pub backend: JournalBackend,
    /// `[journal.jetstream]`: the replicated journal (`backend = "jetstream"`).
    pub jetstream: JetStreamConfig,
}

/// `journal.gather_us` by default. On a 2-core machine under closed-loop load (256
/// connections, one request each) it cut the syncs to a quarter (12 -> 62 records each) and
/// raised the answers per second by 20-40 %; 500 µs gained less, 2,000 µs no more.
pub const GATHER_US_DEFAULT: u64 = 1_000;
/// Longest `journal.gather_us`: every answer under load waits this much more.
pub const GATHER_US_MAX: u64 = 5_000;
/// `journal.gather_above_per_s` by default: well above one node's light load, so a quiet
/// gateway answers without the wait.
pub const GATHER_ABOVE_PER_S_DEFAULT: u64 = 10_000;

/// `journal.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalBackend {
    /// Segment files in `journal.dir` on this node.
    File,
    /// A NATS JetStream stream replicated over a cluster (several gateway nodes).
    Jetstream,
}

/// `[journal.jetstream]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URLs.
    pub servers: Vec<String>,
    /// Stream name.
    pub stream: String,
    /// Subject prefix of the events.
    pub subject_prefix: String,
    /// Copies of each event.
    pub replicas: usize,
    /// Longest wait for one append's acknowledgement.
    pub ack_timeout_ms: u64,
    /// TTL of a merchant's lease (one writer per merchant); 0: leases off.
    pub lease_ttl_ms: u64,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".to_string()],
            stream: "REFUNDGATE".to_string(),
            subject_prefix: "refundgate.events".to_string(),
            replicas: 1,
            ack_timeout_ms: 2000,
            lease_ttl_ms: 0,
        }
    }
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
    #[serde(
        default = "default_dialect",
        deserialize_with = "crate::dialect::Dialect::deserialize"
    )]
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
    /// Which merchant and terminal ids each client certificate may use (needs `client_ca`);
    /// empty: any.
    #[serde(default)]
    pub identities: Vec<IdentityConfig>,
}

/// One entry of a listener's `identities`: a client certificate, matched by exactly one of
/// `subject`, `san` or `sha256`, and the ids it may use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The certificate subject as rendered in logs: `CN=…, O=…`.
    #[serde(default)]
    pub subject: Option<String>,
    /// A DNS name, URI or e-mail subject alternative name.
    #[serde(default)]
    pub san: Option<String>,
    /// SHA-256 fingerprint of the certificate (hex, either case, `:` allowed).
    #[serde(default)]
    pub sha256: Option<String>,
    /// DE42 the certificate may send.
    pub merchant: String,
    /// DE41 values it may send; `["*"]`: any terminal of the merchant.
    pub terminals: Vec<String>,
}

/// The dialect of a listener or upstream: one of the registry's (`src/dialect.rs`), named
/// in the file by its name.
pub type Dialect = &'static crate::dialect::Dialect;

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
    /// Accept the certificate generated at start on a non-loopback address (terminals cannot
    /// verify it); without it such a listener needs `cert` and `key`.
    #[serde(default)]
    pub self_signed: bool,
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
    /// Established connections from one source address; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// Sockets waiting for their ClientHello; when full the oldest is evicted.
    pub max_handshakes: usize,
    /// Sockets of one source address waiting for their ClientHello; 0 = no limit.
    pub max_handshakes_per_ip: usize,
    /// Whether loopback peers are exempt from the per-address limits.
    pub per_ip_exempt_loopback: bool,
    /// Largest frame after its length header.
    pub max_frame_bytes: usize,
    /// Requests of one connection dispatched at once.
    pub max_in_flight_per_connection: usize,
    /// Threads serving the connections (a single-threaded runtime each); 0 = one per core.
    pub connection_threads: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout_ms: u64,
    /// Longest a connection may stay without a complete frame while nothing is in flight.
    pub idle_timeout_ms: u64,
    /// Longest the drain after a shutdown signal may take.
    pub shutdown_grace_ms: u64,
    /// Longest a request waits for its decision to be durable before it is answered 96.
    pub request_deadline_ms: u64,
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
            dialects: Vec::new(),
            admin: AdminConfig::default(),
            journal: JournalConfig::default(),
            log: LogConfig::default(),
            listeners: default_listeners(),
            limits: LimitsConfig::default(),
            upstreams: Vec::new(),
            routes: RoutesConfig::default(),
            saf: SafConfig::default(),
            security: SecurityConfig::default(),
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
        load_dialect_files(&text)?;
        Config::from_toml(&text)
    }

    /// Parses and validates a TOML document. Its `dialects` files are not loaded here (only
    /// by [`Config::load`]): a dialect it names must already be in the registry.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            key: toml_error_key(text, &e),
            message: e.message().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The directory of the default key files: `<journal.dir>-keys`, beside (never inside)
    /// the data directory.
    pub fn default_key_dir(&self) -> PathBuf {
        let dir: PathBuf = self.journal.dir.components().collect();
        let mut name = dir.into_os_string();
        name.push("-keys");
        PathBuf::from(name)
    }

    /// Where the PAN hash key lives (`security.pan_hash_key` or its default).
    pub fn pan_hash_key_path(&self) -> PathBuf {
        self.security
            .pan_hash_key
            .clone()
            .unwrap_or_else(|| self.default_key_dir().join("pan-hash.key"))
    }

    /// Where the store-and-forward PAN key lives (`security.saf_pan_key` or its default).
    pub fn saf_pan_key_path(&self) -> PathBuf {
        self.security
            .saf_pan_key
            .clone()
            .unwrap_or_else(|| self.default_key_dir().join("saf-pan.key"))
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
        let admin_ms = self.admin.connection_timeout_ms;
        if admin_ms == 0 || admin_ms > limits::TIMEOUT_HARD_MAX_MS {
            return Err(error(
                "admin.connection_timeout_ms",
                format!("{admin_ms} is outside 1..={}", limits::TIMEOUT_HARD_MAX_MS),
            ));
        }
        if self.journal.dir.as_os_str().is_empty() {
            return Err(error("journal.dir", "must not be empty"));
        }
        let terminal_keys = self.security.terminal_keys.clone().into_iter();
        for (key, path) in [
            ("security.pan_hash_key", self.pan_hash_key_path()),
            ("security.saf_pan_key", self.saf_pan_key_path()),
        ]
        .into_iter()
        .chain(terminal_keys.map(|p| ("security.terminal_keys", p)))
        {
            if crate::at_rest::is_inside(&path, &self.journal.dir) {
                return Err(error(
                    key,
                    format!(
                        "{} is inside journal.dir: keys must live apart from the data they protect",
                        path.display()
                    ),
                ));
            }
        }
        let segment =
            crate::journal::segment::SEGMENT_BYTES_MIN..=crate::journal::segment::SEGMENT_BYTES_MAX;
        if !segment.contains(&self.journal.segment_bytes) {
            return Err(error(
                "journal.segment_bytes",
                format!("want {} ..= {}", segment.start(), segment.end()),
            ));
        }
        if self.journal.gather_us > GATHER_US_MAX {
            return Err(error(
                "journal.gather_us",
                format!("want 0 ..= {GATHER_US_MAX}"),
            ));
        }
        if self.journal.backend == JournalBackend::Jetstream {
            let js = &self.journal.jetstream;
            if js.servers.is_empty() {
                return Err(error(
                    "journal.jetstream.servers",
                    "must list at least one server",
                ));
            }
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            };
            if !token(&js.stream) {
                return Err(error(
                    "journal.jetstream.stream",
                    "want letters, digits, '_' or '-'",
                ));
            }
            if !js.subject_prefix.split('.').all(token) {
                return Err(error(
                    "journal.jetstream.subject_prefix",
                    "want dot-separated tokens of letters, digits, '_' or '-'",
                ));
            }
            if !(1..=5).contains(&js.replicas) {
                return Err(error("journal.jetstream.replicas", "want 1 ..= 5"));
            }
            if js.ack_timeout_ms == 0 || js.ack_timeout_ms > limits::TIMEOUT_HARD_MAX_MS {
                return Err(error(
                    "journal.jetstream.ack_timeout_ms",
                    format!("outside 1..={}", limits::TIMEOUT_HARD_MAX_MS),
                ));
            }
            if js.lease_ttl_ms != 0 && !(300..=60_000).contains(&js.lease_ttl_ms) {
                return Err(error(
                    "journal.jetstream.lease_ttl_ms",
                    "want 0 (leases off) or 300 ..= 60000",
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(error("log.filter", e.to_string()));
        }
        self.validate_upstreams()
    }

    /// `[[upstreams]]`, `[routes]` and `[saf]`: unique names, addresses, bounds, TLS files,
    /// routes naming configured upstreams (a typo would otherwise answer 92 for a merchant).
    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        if self.upstreams.len() > limits::UPSTREAMS_MAX {
            return Err(error(
                "upstreams",
                format!("at most {} upstreams", limits::UPSTREAMS_MAX),
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            u.validate(i)?;
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(error(
                    format!("upstreams[{i}].name"),
                    format!("{:?} is used twice", u.name),
                ));
            }
        }
        let known = |name: &str| self.upstreams.iter().any(|u| u.name == name);
        if let Some(d) = self.routes.default.as_deref().filter(|d| !known(d)) {
            return Err(error(
                "routes.default",
                format!("{d:?} names no [[upstreams]]"),
            ));
        }
        for (merchant, name) in &self.routes.merchants {
            if !known(name) {
                return Err(error(
                    format!("routes.merchants.{merchant}"),
                    format!("{name:?} names no [[upstreams]]"),
                ));
            }
        }
        let s = &self.saf;
        let max_ms = limits::TIMEOUT_HARD_MAX_MS;
        if s.max_retries == 0 || s.max_retries > limits::SAF_RETRIES_HARD_MAX {
            return Err(error(
                "saf.max_retries",
                format!(
                    "{} is outside 1..={}",
                    s.max_retries,
                    limits::SAF_RETRIES_HARD_MAX
                ),
            ));
        }
        if s.expiry_s == 0 || s.expiry_s > limits::SAF_EXPIRY_HARD_MAX_S {
            return Err(error(
                "saf.expiry_s",
                format!(
                    "{} is outside 1..={}",
                    s.expiry_s,
                    limits::SAF_EXPIRY_HARD_MAX_S
                ),
            ));
        }
        if s.retry_min_ms == 0 || s.retry_min_ms > s.retry_max_ms || s.retry_max_ms > max_ms {
            return Err(error(
                "saf.retry_min_ms",
                format!("need 1 <= retry_min_ms <= retry_max_ms <= {max_ms}"),
            ));
        }
        Ok(())
    }
}

fn default_upstream_timeout_ms() -> u64 {
    limits::UPSTREAM_TIMEOUT_DEFAULT_MS
}

fn default_admin_connection_timeout_ms() -> u64 {
    limits::ADMIN_CONNECTION_TIMEOUT_DEFAULT_MS
}

fn default_upstream_write_timeout_ms() -> u64 {
    limits::UPSTREAM_WRITE_TIMEOUT_DEFAULT_MS
}

fn default_max_pending() -> usize {
    limits::UPSTREAM_PENDING_DEFAULT_MAX
}

fn default_echo_interval_ms() -> u64 {
    limits::UPSTREAM_ECHO_INTERVAL_DEFAULT_MS
}

fn default_reconnect_min_ms() -> u64 {
    100
}

fn default_reconnect_max_ms() -> u64 {
    10_000
}

impl UpstreamConfig {
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("upstreams[{index}].{k}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(error(key("name"), "1-64 characters of [A-Za-z0-9_-]"));
        }
        if self.addrs.is_empty() || self.addrs.len() > limits::UPSTREAM_ADDRS_MAX {
            return Err(error(
                key("addrs"),
                format!("1 to {} addresses", limits::UPSTREAM_ADDRS_MAX),
            ));
        }
        let max_ms = limits::TIMEOUT_HARD_MAX_MS;
        for (k, v) in [
            ("timeout_ms", self.timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            (
                "read_timeout_ms",
                self.read_timeout_ms.unwrap_or(self.timeout_ms),
            ),
            ("echo_interval_ms", self.echo_interval_ms),
            ("reconnect_min_ms", self.reconnect_min_ms),
            ("reconnect_max_ms", self.reconnect_max_ms),
        ] {
            if v == 0 || v > max_ms {
                return Err(error(key(k), format!("{v} is outside 1..={max_ms}")));
            }
        }
        if self.timeout_ms >= limits::TERMINAL_TIMEOUT_MS {
            return Err(error(
                key("timeout_ms"),
                format!(
                    "{} must stay below the terminal's {} ms (DOMAIN §8)",
                    self.timeout_ms,
                    limits::TERMINAL_TIMEOUT_MS
                ),
            ));
        }
        if self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(error(key("reconnect_min_ms"), "above reconnect_max_ms"));
        }
        if self.max_pending == 0 || self.max_pending > limits::UPSTREAM_PENDING_HARD_MAX {
            return Err(error(
                key("max_pending"),
                format!(
                    "{} is outside 1..={}",
                    self.max_pending,
                    limits::UPSTREAM_PENDING_HARD_MAX
                ),
            ));
        }
        let tls = &self.tls;
        match (&tls.ca, tls.insecure_skip_verify) {
            (None, false) => {
                return Err(error(
                    key("tls.ca"),
                    "set a CA, or insecure_skip_verify = true for a simulator",
                ))
            }
            (Some(_), true) => {
                return Err(error(
                    key("tls.insecure_skip_verify"),
                    "set either ca or insecure_skip_verify",
                ))
            }
            _ => {}
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(error(key("tls.cert"), "cert and key go together"));
        }
        for (name, path) in [
            ("tls.ca", &tls.ca),
            ("tls.cert", &tls.cert),
            ("tls.key", &tls.key),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(error(
                    key(name),
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        Ok(())
    }
}

impl Default for SafConfig {
    fn default() -> Self {
        Self {
            max_retries: 20,
            expiry_s: 86_400,
            retry_min_ms: 1_000,
            retry_max_ms: 60_000,
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![
        ListenerConfig::new(loopback(8583), &crate::dialect::ASCII1987, Framing::Binary2),
        ListenerConfig::new(loopback(8584), &crate::dialect::CUP_POS, Framing::Binary2),
    ]
}

/// Loads the `dialects` files a configuration lists into the registry (before the rest of it
/// is parsed, since listeners and upstreams name them). A document that does not parse is
/// left to [`Config::from_toml`], which names its error.
fn load_dialect_files(text: &str) -> Result<(), ConfigError> {
    #[derive(Deserialize)]
    struct Listed {
        #[serde(default)]
        dialects: Vec<PathBuf>,
    }
    let Ok(listed) = toml::from_str::<Listed>(text) else {
        return Ok(());
    };
    for (i, path) in listed.dialects.iter().enumerate() {
        crate::dialect::Dialect::load_file(path).map_err(|e| ConfigError {
            key: format!("dialects[{i}]"),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn default_dialect() -> Dialect {
    crate::dialect::Dialect::default_dialect()
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
            connection_timeout_ms: limits::ADMIN_CONNECTION_TIMEOUT_DEFAULT_MS,
            token_file: None,
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/journal"),
            durability: Durability::Fdatasync,
            snapshot_every_records: 1_000_000,
            segment_bytes: crate::journal::segment::SEGMENT_BYTES_DEFAULT,
            gather_us: GATHER_US_DEFAULT,
            gather_above_per_s: GATHER_ABOVE_PER_S_DEFAULT,
            backend: JournalBackend::File,
            jetstream: JetStreamConfig::default(),
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
            identities: Vec::new(),
        }
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listeners[{index}].{k}");
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return Err(error(key("tls.key"), "cert is set but key is not")),
            (None, Some(_)) => return Err(error(key("tls.cert"), "key is set but cert is not")),
            _ => {}
        }
        match (&self.tls.cert, self.tls.self_signed) {
            (Some(_), true) => {
                return Err(error(
                    key("tls.self_signed"),
                    "set either cert and key, or self_signed = true",
                ))
            }
            (None, false) if !self.addr.ip().is_loopback() => {
                return Err(error(
                    key("tls"),
                    format!(
                        "no certificate for the non-loopback address {}: set cert and key, or \
                         write tls = {{ self_signed = true }} to accept a generated certificate \
                         terminals cannot verify",
                        self.addr
                    ),
                ))
            }
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
        self.validate_identities(index)?;
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

impl ListenerConfig {
    /// `identities`: each names one certificate and at least one terminal, and only where
    /// clients present certificates.
    fn validate_identities(&self, index: usize) -> Result<(), ConfigError> {
        if self.identities.len() > limits::IDENTITIES_MAX {
            return Err(error(
                format!("listeners[{index}].identities"),
                format!("at most {} entries", limits::IDENTITIES_MAX),
            ));
        }
        if !self.identities.is_empty() && self.tls.client_ca.is_none() {
            return Err(error(
                format!("listeners[{index}].identities"),
                "needs tls.client_ca (identities are client certificates)",
            ));
        }
        for (i, id) in self.identities.iter().enumerate() {
            let key = |k: &str| format!("listeners[{index}].identities[{i}].{k}");
            let matchers = [&id.subject, &id.san, &id.sha256]
                .iter()
                .filter(|m| m.is_some())
                .count();
            if matchers != 1 {
                return Err(error(
                    key("subject"),
                    "set exactly one of subject, san or sha256",
                ));
            }
            if let Some(fp) = &id.sha256 {
                let digits = fp.chars().filter(|c| *c != ':').collect::<String>();
                if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(error(key("sha256"), "must be 64 hex digits"));
                }
            }
            if id.merchant.trim().is_empty() {
                return Err(error(key("merchant"), "must not be empty"));
            }
            if id.terminals.is_empty() || id.terminals.iter().any(|t| t.trim().is_empty()) {
                return Err(error(
                    key("terminals"),
                    "name at least one terminal (\"*\": any), none empty",
                ));
            }
        }
        Ok(())
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
            max_connections_per_ip: limits::CONNECTIONS_PER_IP_DEFAULT_MAX,
            max_handshakes: limits::HANDSHAKES_DEFAULT_MAX,
            max_handshakes_per_ip: limits::HANDSHAKES_PER_IP_DEFAULT_MAX,
            per_ip_exempt_loopback: true,
            max_frame_bytes: limits::FRAME_BYTES_DEFAULT_MAX,
            max_in_flight_per_connection: limits::IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX,
            connection_threads: 0,
            handshake_timeout_ms: limits::HANDSHAKE_TIMEOUT_DEFAULT_MS,
            idle_timeout_ms: limits::IDLE_TIMEOUT_DEFAULT_MS,
            shutdown_grace_ms: limits::SHUTDOWN_GRACE_DEFAULT_MS,
            request_deadline_ms: limits::REQUEST_DEADLINE_DEFAULT_MS,
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
        let hard = wide(limits::CONNECTIONS_HARD_MAX);
        range(
            "max_connections_per_ip",
            wide(self.max_connections_per_ip),
            0,
            hard,
        )?;
        range("max_handshakes", wide(self.max_handshakes), 1, hard)?;
        range(
            "max_handshakes_per_ip",
            wide(self.max_handshakes_per_ip),
            0,
            hard,
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
        range(
            "connection_threads",
            wide(self.connection_threads),
            0,
            wide(limits::CONNECTION_THREADS_MAX),
        )?;
        let max_ms = limits::TIMEOUT_HARD_MAX_MS;
        range("handshake_timeout_ms", self.handshake_timeout_ms, 1, max_ms)?;
        range("idle_timeout_ms", self.idle_timeout_ms, 1, max_ms)?;
        range("shutdown_grace_ms", self.shutdown_grace_ms, 0, max_ms)?;
        range(
            "request_deadline_ms",
            self.request_deadline_ms,
            1,
            limits::REQUEST_DEADLINE_MAX_MS,
        )?;
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
        let small = Config::from_toml("[journal]\nsegment_bytes = 65536\n").unwrap();
        assert_eq!(small.journal.segment_bytes, 65536);
        let err = Config::from_toml("[journal]\nsegment_bytes = 100\n").unwrap_err();
        assert_eq!(err.key, "journal.segment_bytes");
        let debug = format!("{config:?}");
        assert!(!debug.contains("0123456789ABCDEF"), "{debug}");
    }

    #[test]
    fn a_dialect_file_listed_in_the_configuration_can_be_named_by_its_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
        let spec = std::fs::read_to_string(specs.join("iso87b.toml"))
            .unwrap()
            .replace("name = \"iso87b\"", "name = \"iso87x\"");
        std::fs::write(dir.path().join("iso87x.toml"), spec).unwrap();
        let dialect = std::fs::read_to_string(specs.join("iso87b.dialect.toml"))
            .unwrap()
            .replace("name = \"iso87b\"", "name = \"iso87x\"")
            .replace("spec = \"iso87b.toml\"", "spec = \"iso87x.toml\"");
        let file = dir.path().join("iso87x.dialect.toml");
        std::fs::write(&file, dialect).unwrap();
        let config_path = dir.path().join("refundgate.toml");
        let text = format!(
            "dialects = [{:?}]\n[[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"iso87x\"\n",
            file.display().to_string()
        );
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::load(Some(&config_path)).unwrap();
        let d = config.listeners[0].dialect;
        assert_eq!((d.name(), d.spec().name()), ("iso87x", "iso87x"));
        assert_eq!(crate::dialect::Dialect::by_name("iso87x"), Some(d));

        let missing = dir.path().join("missing.toml");
        std::fs::write(&missing, "dialects = [\"/nonexistent/x.dialect.toml\"]\n").unwrap();
        let err = Config::load(Some(&missing)).unwrap_err();
        assert_eq!(err.key, "dialects[0]");
        let embedded = dir.path().join("embedded.toml");
        std::fs::write(
            &embedded,
            format!(
                "dialects = [{:?}]\n",
                specs.join("cup_pos.dialect.toml").display().to_string()
            ),
        )
        .unwrap();
        let err = Config::load(Some(&embedded)).unwrap_err().to_string();
        assert!(err.contains("is an embedded dialect"), "{err}");
    }

    #[test]
    fn a_dialect_is_named_by_its_dialect_file_and_an_unknown_one_is_refused() {
        let config = Config::from_toml(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"iso87b\"\n\
             [[upstreams]]\nname = \"b\"\naddrs = [\"127.0.0.1:1\"]\ndialect = \"iso87b\"\n\
             tls = { insecure_skip_verify = true }\n",
        )
        .unwrap();
        assert_eq!(config.listeners[0].dialect.name(), "iso87b");
        assert_eq!(config.upstreams[0].dialect.spec().name(), "iso87b");
        let err = Config::from_toml("[[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"iso93\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listeners") && err.contains("unknown dialect \"iso93\""),
            "{err}"
        );
    }

    #[test]
    fn upstreams_routes_and_saf_parse_and_routes_must_name_an_upstream() {
        let text = r#"
[[upstreams]]
name = "bank_a"
addrs = ["127.0.0.1:9683", "127.0.0.1:9685"]
dialect = "cup_pos"
timeout_ms = 300
max_pending = 16
tls = { insecure_skip_verify = true }
[routes]
default = "bank_a"
merchants = { "MERCHANT 000001" = "bank_a" }
[saf]
max_retries = 3
"#;
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.upstreams[0].addrs.len(), 2);
        assert_eq!(config.upstreams[0].echo_interval_ms, 30_000);
        assert_eq!(config.routes.default.as_deref(), Some("bank_a"));
        assert_eq!(config.saf.max_retries, 3);
        assert_eq!(config.saf.expiry_s, 86_400);
        let cases = [
            (
                text.replace("default = \"bank_a\"", "default = \"nope\""),
                "routes.default",
            ),
            (
                text.replace("= \"bank_a\" }", "= \"nope\" }"),
                "routes.merchants.MERCHANT 000001",
            ),
            (
                text.replace(
                    "insecure_skip_verify = true",
                    "insecure_skip_verify = false",
                ),
                "upstreams[0].tls.ca",
            ),
            (
                text.replace("max_pending = 16", "max_pending = 0"),
                "upstreams[0].max_pending",
            ),
            (
                text.replace("addrs = [", "addrs = [] #"),
                "upstreams[0].addrs",
            ),
            (
                text.replace("max_retries = 3", "max_retries = 0"),
                "saf.max_retries",
            ),
            (
                text.replace("timeout_ms = 300", "timeout_ms = 60000"),
                "upstreams[0].timeout_ms",
            ),
        ];
        for (bad, key) in cases {
            let err = Config::from_toml(&bad).unwrap_err();
            assert_eq!(err.key, key, "{bad} gave {err}");
        }
        // With the replicated journal too: the SAF queue is then in the cluster (it was
        // refused at start before).
        let replicated = format!("{text}\n[journal]\nbackend = \"jetstream\"\n");
        let config = Config::from_toml(&replicated).unwrap();
        assert_eq!(config.journal.backend, JournalBackend::Jetstream);
        assert_eq!(config.upstreams.len(), 1);
    }

    #[test]
    fn identities_name_exactly_one_certificate_and_some_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let listener = |ids: &str| {
            format!(
                "[[listeners]]\naddr = \"127.0.0.1:1\"\ntls = {{ client_ca = {:?} }}\nidentities = [{ids}]\n",
                ca.display()
            )
        };
        let ok = listener(
            r#"{ sha256 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89", merchant = "M", terminals = ["*"] }"#,
        );
        let config = Config::from_toml(&ok).unwrap();
        assert_eq!(config.listeners[0].identities.len(), 1);
        for (ids, key) in [
            (
                r#"{ subject = "CN=a", san = "a", merchant = "M", terminals = ["T"] }"#,
                "listeners[0].identities[0].subject",
            ),
            (
                r#"{ merchant = "M", terminals = ["T"] }"#,
                "listeners[0].identities[0].subject",
            ),
            (
                r#"{ sha256 = "abc", merchant = "M", terminals = ["T"] }"#,
                "listeners[0].identities[0].sha256",
            ),
            (
                r#"{ san = "a", merchant = "M", terminals = [] }"#,
                "listeners[0].identities[0].terminals",
            ),
            (
                r#"{ san = "a", merchant = " ", terminals = ["T"] }"#,
                "listeners[0].identities[0].merchant",
            ),
        ] {
            let err = Config::from_toml(&listener(ids)).unwrap_err();
            assert_eq!(err.key, key, "{ids} gave {err}");
        }
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
            (
                "[security]\nterminal_keys = \"data/journal/tk.toml\"\n",
                "security.terminal_keys",
            ),
            (
                "[[listeners]]\naddr = \"127.0.0.1:1\"\nidentities = [{ subject = \"CN=a\", merchant = \"M\", terminals = [\"T\"] }]\n",
                "listeners[0].identities",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).unwrap_err();
            assert_eq!(err.key, key, "{text:?} gave {err}");
            assert!(err.to_string().contains(key));
        }
    }
}
