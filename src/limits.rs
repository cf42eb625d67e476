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
/// Largest snapshot section accepted on restore, as a count of items.
pub const SNAPSHOT_ITEMS_MAX: u64 = 1 << 32;

const _: () = assert!(ANSWER_RETENTION_S >= 24 * 3600);
const _: () = assert!(ORIGINALS_PER_MERCHANT_MAX < u32::MAX as usize);
