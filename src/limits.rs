//! Named limits. Nothing in refundgate is unbounded; every bound lives here with its reason.

/// Default largest frame accepted (DOMAIN §2): 8 KiB.
pub const FRAME_BYTES_DEFAULT_MAX: usize = 8 * 1024;
/// Largest frame any configuration may allow (DOMAIN §2): 64 KiB.
pub const FRAME_BYTES_HARD_MAX: usize = 64 * 1024;
/// ISO 8583 has at most 128 data elements (primary + secondary bitmap).
pub const FIELDS_MAX: usize = 128;
/// Longest reason code carried in DE44 (DOMAIN §5).
pub const REASON_BYTES_MAX: usize = 25;

const _: () = assert!(FRAME_BYTES_DEFAULT_MAX <= FRAME_BYTES_HARD_MAX);
const _: () = assert!(FRAME_BYTES_HARD_MAX <= u16::MAX as usize + 1);

/// How long stored answers for repeats are kept at least (DOMAIN §6: the terminal's retry
/// horizon, 24 h), plus an hour for clock skew between terminal and switch.
pub const ANSWER_RETENTION_S: i64 = 25 * 3600;
/// Stored answers per merchant; beyond it (after pruning expired ones) new requests get 96
/// rather than forgetting an answer younger than the retention.
pub const ANSWERS_PER_MERCHANT_MAX: usize = 8_000_000;
/// Stored declines per merchant (volatile; a forgotten decline is simply decided again).
pub const DECLINES_PER_MERCHANT_MAX: usize = 100_000;
/// Remembered transactions per merchant (indexes are `u32`); beyond it new requests get 96.
pub const ORIGINALS_PER_MERCHANT_MAX: usize = 50_000_000;
/// Reversals not applied (DOMAIN §9) listed per merchant for reconciliation; older ones are
/// only counted.
pub const RECONCILIATION_LIST_MAX: usize = 10_000;
/// Operators' changes (admin API, issue 22) remembered per merchant, so that a repeated
/// request id gets its stored result; older ones are forgotten (a repeat of one of those
/// would apply again, so clients must not reuse request ids).
pub const ADMIN_REQUESTS_PER_MERCHANT_MAX: usize = 4096;
/// Largest snapshot section accepted on restore, as a count of items.
pub const SNAPSHOT_ITEMS_MAX: u64 = 1 << 32;
/// Largest ledger snapshot written to, or read from, the replicated journal's bucket (it is
/// read whole into memory at start).
pub const CLUSTER_SNAPSHOT_BYTES_MAX: u64 = 1 << 32;
/// Ledger snapshots kept in the replicated journal's bucket: the newest, and one older to
/// fall back to when the newest is unreadable.
pub const CLUSTER_SNAPSHOTS_KEPT: usize = 2;

/// How long a decision on a merchant contended by other nodes keeps trying (besides at
/// least [`CLUSTER_CONTENDED_ATTEMPTS_MIN`] attempts) before it is answered 96. Each attempt
/// ends as soon as another node's append is read, so under heavy contention a count alone
/// runs out in milliseconds; the terminal waits tens of seconds.
pub const CLUSTER_CONTENDED_BUDGET_MS: u64 = 5_000;

/// Attempts a contended decision always gets, however fast they fail.
pub const CLUSTER_CONTENDED_ATTEMPTS_MIN: u32 = 64;

const _: () = assert!(ANSWER_RETENTION_S >= 24 * 3600);
const _: () = assert!(CLUSTER_SNAPSHOTS_KEPT >= 1);
const _: () = assert!(ORIGINALS_PER_MERCHANT_MAX < u32::MAX as usize);

/// Most connections one process may be configured to hold open (file descriptors, memory).
pub const CONNECTIONS_HARD_MAX: usize = 65_536;
/// Default `limits.max_connections`.
pub const CONNECTIONS_DEFAULT_MAX: usize = 1024;
/// Most requests of one connection that may be dispatched at once (pipelining depth).
pub const IN_FLIGHT_PER_CONNECTION_HARD_MAX: usize = 1024;
/// Default `limits.max_in_flight_per_connection`.
pub const IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX: usize = 8;
/// Most connection threads (`limits.connection_threads`).
pub const CONNECTION_THREADS_MAX: usize = 256;
/// Smallest `limits.max_frame_bytes`: a `cup_pos` TPDU + header + MTI + bitmap must fit.
pub const FRAME_BYTES_MIN: usize = 64;
/// Default `limits.max_handshakes`: sockets accepted but not yet admitted to a connection
/// slot; when full, the oldest is evicted.
pub const HANDSHAKES_DEFAULT_MAX: usize = 256;
/// Default `limits.max_handshakes_per_ip`: beyond it, that address's oldest is evicted.
pub const HANDSHAKES_PER_IP_DEFAULT_MAX: usize = 32;
/// Default `limits.max_connections_per_ip`: a site with many terminals behind one NAT address
/// still fits, one address cannot take every slot.
pub const CONNECTIONS_PER_IP_DEFAULT_MAX: usize = 256;
/// TLS record content type of a handshake (the ClientHello's record).
pub const TLS_HANDSHAKE_RECORD_TYPE: u8 = 0x16;
/// Largest TLS record payload a ClientHello may arrive in (RFC 8446 §5.1: 2^14).
pub const TLS_RECORD_PAYLOAD_MAX: usize = 16_384;
/// Pause between two looks at a ClientHello that has arrived only in part.
pub const CLIENT_HELLO_PEEK_INTERVAL_MS: u64 = 10;
/// Default `limits.handshake_timeout_ms`.
pub const HANDSHAKE_TIMEOUT_DEFAULT_MS: u64 = 5_000;
/// Default `limits.idle_timeout_ms`: terminals send echoes more often than this.
pub const IDLE_TIMEOUT_DEFAULT_MS: u64 = 60_000;
/// Default `limits.shutdown_grace_ms`.
pub const SHUTDOWN_GRACE_DEFAULT_MS: u64 = 5_000;
/// Default longest wait of a request for its decision to be durable (below a terminal's 60 s).
pub const REQUEST_DEADLINE_DEFAULT_MS: u64 = 20_000;
/// Largest request deadline: a terminal gives up after about 60 s.
pub const REQUEST_DEADLINE_MAX_MS: u64 = 59_000;
/// Longest any configured timeout may be (one hour); also bounds the shutdown grace.
pub const TIMEOUT_HARD_MAX_MS: u64 = 3_600_000;
/// Longest a TLS close_notify or a last flush may take once a connection is being closed.
pub const CLOSE_FLUSH_TIMEOUT_MS: u64 = 1_000;
/// Most listeners one configuration may declare.
pub const LISTENERS_MAX: usize = 64;
/// Most admin HTTP connections served at once (operators and one Prometheus).
pub const ADMIN_CONNECTIONS_MAX: usize = 16;
/// Default `admin.connection_timeout_ms`: longest one admin connection may stay open.
pub const ADMIN_CONNECTION_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// How long an admin HTTP client may take to send its request headers.
pub const ADMIN_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Longest pause between retries of a failing `accept` (out of file descriptors and the like).
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;
/// Read buffer a connection starts with; grows up to one frame when a bigger one arrives.
pub const CONNECTION_READ_BUFFER_BYTES: usize = 8 * 1024;

const _: () = assert!(CONNECTIONS_DEFAULT_MAX <= CONNECTIONS_HARD_MAX);
const _: () = assert!(HANDSHAKES_DEFAULT_MAX <= CONNECTIONS_HARD_MAX);
const _: () = assert!(CONNECTIONS_PER_IP_DEFAULT_MAX <= CONNECTIONS_DEFAULT_MAX);
const _: () = assert!(IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX <= IN_FLIGHT_PER_CONNECTION_HARD_MAX);
const _: () = assert!(FRAME_BYTES_MIN <= FRAME_BYTES_DEFAULT_MAX);
const _: () = assert!(SHUTDOWN_GRACE_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);
const _: () = assert!(IDLE_TIMEOUT_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);
const _: () = assert!(HANDSHAKE_TIMEOUT_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);

/// Default `upstreams[].timeout_ms` (DOMAIN §8): well below a terminal's ~60 s, so the terminal
/// gets 91/98 before it gives up.
pub const UPSTREAM_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// A terminal's own timeout (about 60 s, DOMAIN §1); the upstream budget must stay below it.
pub const TERMINAL_TIMEOUT_MS: u64 = 60_000;
/// Default `upstreams[].max_pending`: requests in flight on one link.
pub const UPSTREAM_PENDING_DEFAULT_MAX: usize = 1024;
/// Largest `upstreams[].max_pending`.
pub const UPSTREAM_PENDING_HARD_MAX: usize = 65_536;
/// Default `upstreams[].write_timeout_ms`: a host whose receive window stays shut this long
/// is not reading.
pub const UPSTREAM_WRITE_TIMEOUT_DEFAULT_MS: u64 = 5_000;
/// Default `upstreams[].echo_interval_ms`.
pub const UPSTREAM_ECHO_INTERVAL_DEFAULT_MS: u64 = 30_000;
/// Most `[[upstreams]]`.
pub const UPSTREAMS_MAX: usize = 32;
/// Most addresses of one upstream.
pub const UPSTREAM_ADDRS_MAX: usize = 8;
/// Largest `saf.max_retries`.
pub const SAF_RETRIES_HARD_MAX: u32 = 10_000;
/// Largest `saf.expiry_s` (30 days).
pub const SAF_EXPIRY_HARD_MAX_S: u64 = 30 * 86_400;

const _: () = assert!(UPSTREAM_TIMEOUT_DEFAULT_MS < TERMINAL_TIMEOUT_MS);
const _: () = assert!(UPSTREAM_PENDING_DEFAULT_MAX <= UPSTREAM_PENDING_HARD_MAX);

/// Entries waiting at once; beyond it an enqueue fails (and is logged as an error).
pub const SAF_PENDING_MAX: usize = 100_000;
/// Dead letters kept in memory for `saf list` and the admin; older ones are only counted.
pub const SAF_DEAD_LETTERS_KEPT_MAX: usize = 10_000;
/// Keys of delivered store-and-forward entries remembered (oldest dropped first, kept in
/// snapshots): an entry queued again under one of them is sent marked as a repeat (0401),
/// since the host has already seen a reversal of that key.
pub const SAF_DELIVERED_KEYS_KEPT: usize = 16_384;
/// Entries sent at once by the worker.
pub const SAF_IN_FLIGHT_MAX: usize = 64;
/// Largest stored message.
pub const SAF_BODY_BYTES_MAX: usize = 4096;
/// Size of the SAF journal's segment files (it holds only reversals and advices).
pub const SAF_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Records appended between two snapshots of the queue.
pub const SAF_SNAPSHOT_RECORDS: u64 = 4096;
/// Largest frame read from or written to an upstream host.
pub const UPSTREAM_FRAME_BYTES_MAX: usize = 8192;
/// Longest a TCP connect plus TLS handshake to a host may take (also bounded by its timeout).
pub const UPSTREAM_CONNECT_TIMEOUT_MAX_MS: u64 = 5_000;
/// How many request timeouts a timed-out key stays quarantined on its link.
pub const UPSTREAM_QUARANTINE_TIMEOUTS: u32 = 4;

const _: () = assert!(SAF_IN_FLIGHT_MAX <= SAF_PENDING_MAX);
const _: () = assert!(SAF_BODY_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(UPSTREAM_FRAME_BYTES_MAX <= FRAME_BYTES_HARD_MAX);

/// Entries of one listener's `identities` (client certificate → ids).
pub const IDENTITIES_MAX: usize = 100_000;
/// Terminals in `security.terminal_keys`.
pub const TERMINAL_KEYS_MAX: usize = 100_000;
/// Largest `security.terminal_keys` file read.
pub const TERMINAL_KEYS_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Sign-ons one terminal may make per [`SIGN_ON_INTERVAL_S`] on a MAC link; more answer 58.
pub const SIGN_ONS_PER_TERMINAL_MAX: u32 = 5;
/// Window of [`SIGN_ONS_PER_TERMINAL_MAX`].
pub const SIGN_ON_INTERVAL_S: u64 = 60;
/// Terminals whose sign-ons are counted at once; only configured terminals are counted, so
/// a fleet up to this size never resets its limits.
pub const SIGN_ON_TERMINALS_TRACKED_MAX: usize = 200_000;

/// Connections the host simulator (`refundgate host`) serves at once over all its listeners.
pub const HOST_CONNECTIONS_MAX: usize = 256;
/// Requests of one host simulator connection answered at once; requests beyond it wait to be
/// read. Above the gateway's [`IN_FLIGHT_PER_CONNECTION_HARD_MAX`]: the host stands in for a
/// bank host that takes a whole switch's traffic over one multiplexed link
/// ([`UPSTREAM_PENDING_DEFAULT_MAX`] requests pending per link).
pub const HOST_IN_FLIGHT_PER_CONNECTION_MAX: usize = 4096;
/// (DE41, DE11) keys whose reversals the host simulator tracks in its stats; more are only
/// counted.
pub const HOST_REVERSAL_KEYS_MAX: usize = 100_000;
/// Largest host simulator admin request body (a fault set is a few dozen bytes).
pub const HOST_ADMIN_BODY_BYTES_MAX: usize = 4096;
/// Longest latency a host simulator fault set may ask for (one hour).
pub const HOST_LATENCY_MAX_MS: u64 = 3_600_000;
/// How long a host simulator connection may stay idle: a bank host keeps a quiet link open
/// (the switch's echoes are what test it), and fault drills leave links silent for long.
pub const HOST_IDLE_TIMEOUT_MS: u64 = TIMEOUT_HARD_MAX_MS;
/// How often a connection whose dispatch paused its reading (the host simulator's
/// `stop_reading`) asks again whether to read.
pub const READING_PAUSED_RECHECK_MS: u64 = 50;

const _: () = assert!(HOST_IN_FLIGHT_PER_CONNECTION_MAX >= UPSTREAM_PENDING_DEFAULT_MAX);
const _: () = assert!(HOST_CONNECTIONS_MAX <= CONNECTIONS_HARD_MAX);
const _: () = assert!(HOST_LATENCY_MAX_MS <= TIMEOUT_HARD_MAX_MS);
