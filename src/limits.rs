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

/// Most connections one process may be configured to hold open (file descriptors, memory).
pub const CONNECTIONS_HARD_MAX: usize = 65_536;
/// Default `limits.max_connections`.
pub const CONNECTIONS_DEFAULT_MAX: usize = 1024;
/// Most requests of one connection that may be dispatched at once (pipelining depth).
pub const IN_FLIGHT_PER_CONNECTION_HARD_MAX: usize = 1024;
/// Default `limits.max_in_flight_per_connection`.
pub const IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX: usize = 8;
/// Smallest `limits.max_frame_bytes`: a `cup_pos` TPDU + header + MTI + bitmap must fit.
pub const FRAME_BYTES_MIN: usize = 64;
/// Default `limits.handshake_timeout_ms`.
pub const HANDSHAKE_TIMEOUT_DEFAULT_MS: u64 = 5_000;
/// Default `limits.idle_timeout_ms`: terminals send echoes more often than this.
pub const IDLE_TIMEOUT_DEFAULT_MS: u64 = 60_000;
/// Default `limits.shutdown_grace_ms`.
pub const SHUTDOWN_GRACE_DEFAULT_MS: u64 = 5_000;
/// Longest any configured timeout may be (one hour); also bounds the shutdown grace.
pub const TIMEOUT_HARD_MAX_MS: u64 = 3_600_000;
/// Longest a TLS close_notify or a last flush may take once a connection is being closed.
pub const CLOSE_FLUSH_TIMEOUT_MS: u64 = 1_000;
/// Most listeners one configuration may declare.
pub const LISTENERS_MAX: usize = 64;
/// Most admin HTTP connections served at once (operators and one Prometheus).
pub const ADMIN_CONNECTIONS_MAX: usize = 16;
/// How long an admin HTTP client may take to send its request headers.
pub const ADMIN_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Longest pause between retries of a failing `accept` (out of file descriptors and the like).
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;
/// Read buffer a connection starts with; grows up to one frame when a bigger one arrives.
pub const CONNECTION_READ_BUFFER_BYTES: usize = 8 * 1024;

const _: () = assert!(CONNECTIONS_DEFAULT_MAX <= CONNECTIONS_HARD_MAX);
const _: () = assert!(IN_FLIGHT_PER_CONNECTION_DEFAULT_MAX <= IN_FLIGHT_PER_CONNECTION_HARD_MAX);
const _: () = assert!(FRAME_BYTES_MIN <= FRAME_BYTES_DEFAULT_MAX);
const _: () = assert!(SHUTDOWN_GRACE_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);
const _: () = assert!(IDLE_TIMEOUT_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);
const _: () = assert!(HANDSHAKE_TIMEOUT_DEFAULT_MS <= TIMEOUT_HARD_MAX_MS);
