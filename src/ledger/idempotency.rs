//! Stored answers for repeats and retransmissions (DOMAIN §6).
//!
//! Key = (terminal, STAN, local date MMDD, MTI class), packed in 64 bits. Answers to approved
//! sales point at the sale entry (16 bytes); every other answer is boxed. Answers are kept at
//! least [`crate::limits::ANSWER_RETENTION_S`] and pruned after that, amortised over inserts.

use super::decision::Decision;

/// Packs an idempotency key: terminal index 16 bits | STAN 24 | MMDD 16 | MTI class 8.
pub(crate) fn pack_key(term: u16, stan: u32, mmdd: u16, class: u8) -> u64 {
    u64::from(term) << 48
        | u64::from(stan & 0xFF_FFFF) << 24
        | u64::from(mmdd) << 8
        | u64::from(class)
}

/// A stored answer, with the fingerprint of the request that got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    /// An approved sale; the decision is rebuilt from the entry at `idx`.
    Sale { fingerprint: u64, idx: u32 },
    /// An approved refund; the decision is rebuilt from the refund entry at `idx`, its sale
    /// and the two figures that changed with later requests.
    Refund(Box<RefundAnswer>),
    /// Any other answer.
    Full(Box<FullAnswer>),
}

/// The part of an approved refund's answer that the entries do not hold (40 bytes boxed
/// instead of ~150 for a full decision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefundAnswer {
    pub fingerprint: u64,
    pub idx: u32,
    pub original_remaining: u64,
    pub day_allowance: Option<u64>,
    pub would_pass: Option<u64>,
    /// The merchant's policy version it was decided under (the decision trail reads it).
    pub policy_version: u32,
}

/// A boxed stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FullAnswer {
    pub fingerprint: u64,
    pub at: i64,
    pub decision: Decision,
    /// The merchant's policy version it was decided under (the decision trail reads it).
    pub policy_version: u32,
}

impl Stored {
    /// The policy version the answer was decided under (`None` for sales: no policy check
    /// of a sale depends on a knob the trail shows).
    pub fn policy_version(&self) -> Option<u32> {
        match self {
            Stored::Sale { .. } => None,
            Stored::Refund(a) => Some(a.policy_version),
            Stored::Full(a) => Some(a.policy_version),
        }
    }
}

impl Stored {
    pub fn fingerprint(&self) -> u64 {
        match self {
            Stored::Sale { fingerprint, .. } => *fingerprint,
            Stored::Refund(a) => a.fingerprint,
            Stored::Full(a) => a.fingerprint,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_pack_without_overlap() {
        let k = pack_key(65_535, 999_999, 1231, 4);
        assert_eq!(k >> 48, 65_535);
        assert_ne!(pack_key(1, 2, 3, 2), pack_key(1, 2, 3, 4));
        assert_ne!(pack_key(1, 2, 1122, 2), pack_key(1, 2, 1121, 2));
        assert_eq!(std::mem::size_of::<Stored>(), 16);
    }
}
