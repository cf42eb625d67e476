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
