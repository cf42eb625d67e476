//! Money, cards and merchant-local calendars: the small value types of the ledger.
//!
//! Money is always `u64` minor units (DE4 is n12, so at most 999 999 999 999); every sum goes
//! through checked arithmetic and an overflow is an internal error, never a wrap.

use std::fmt;

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;

use crate::clock::UnixSeconds;

/// Largest amount DE4 (n12) can carry, in minor units.
pub const AMOUNT_MINOR_MAX: u64 = 999_999_999_999;

const SECONDS_PER_DAY: i64 = 86_400;

/// Card scheme, derived from the PAN's leading digits (its BIN prefix).
///
/// Derivation ([`CardType::from_pan`]): `4` Visa; `51`–`55` and `2221`–`2720` Mastercard;
/// `62` UnionPay; `34`, `37` Amex; `3528`–`3589` JCB; `6011`, `644`–`649`, `65` Discover;
/// anything else Other. Scheme is what a refund policy can know from the PAN alone; in the
/// merchant file it is written in lower case (`denied_card_types = ["amex"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardType {
    /// Visa (BIN prefix 4).
    Visa,
    /// Mastercard (51–55, 2221–2720).
    Mastercard,
    /// China UnionPay (62).
    Unionpay,
    /// American Express (34, 37).
    Amex,
    /// JCB (3528–3589).
    Jcb,
    /// Discover (6011, 644–649, 65).
    Discover,
    /// Any other prefix.
    Other,
}

impl CardType {
    /// The scheme of a PAN from its first digits (see the type's documentation).
    pub fn from_pan(pan: &str) -> CardType {
        let prefix = |n: usize| {
            pan.get(..n)
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0)
        };
        let (p2, p3, p4) = (prefix(2), prefix(3), prefix(4));
        if pan.starts_with('4') {
            CardType::Visa
        } else if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) {
            CardType::Mastercard
        } else if p2 == 62 {
            CardType::Unionpay
        } else if p2 == 34 || p2 == 37 {
            CardType::Amex
        } else if (3528..=3589).contains(&p4) {
            CardType::Jcb
        } else if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 {
            CardType::Discover
        } else {
            CardType::Other
        }
    }

    /// Compact code for the journal.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// Inverse of [`CardType::to_u8`].
    pub fn from_u8(v: u8) -> Option<CardType> {
        [
            CardType::Visa,
            CardType::Mastercard,
            CardType::Unionpay,
            CardType::Amex,
            CardType::Jcb,
            CardType::Discover,
            CardType::Other,
        ]
        .get(usize::from(v))
        .copied()
    }
}

/// A PAN reduced to what may be kept: first 6 and last 4 digits and the length, packed in 8 bytes.
/// `Debug` and `Display` print `476173******0119`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MaskedPan {
    first6: u32,
    last4: u16,
    len: u8,
}

impl MaskedPan {
    /// Masks a PAN of 12–19 digits; `None` when it is not one.
    pub fn new(pan: &str) -> Option<MaskedPan> {
        let b = pan.as_bytes();
        if !(12..=19).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let num = |d: &[u8]| d.iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
        Some(MaskedPan {
            first6: num(&b[..6]),
            last4: u16::try_from(num(&b[b.len() - 4..])).ok()?,
            len: b.len() as u8,
        })
    }

    /// Packs into a `u64` for the journal: first6 (20 bits) | last4 (14 bits) | len (5 bits).
    pub fn to_u64(self) -> u64 {
        u64::from(self.first6) << 19 | u64::from(self.last4) << 5 | u64::from(self.len)
    }

    /// Inverse of [`MaskedPan::to_u64`].
    pub fn from_u64(v: u64) -> MaskedPan {
        MaskedPan {
            first6: ((v >> 19) & 0xF_FFFF) as u32,
            last4: ((v >> 5) & 0x3FFF) as u16,
            len: (v & 0x1F) as u8,
        }
    }
}

impl fmt::Display for MaskedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stars = usize::from(self.len).saturating_sub(10);
        write!(
            f,
            "{:06}{}{:04}",
            self.first6,
            "*".repeat(stars),
            self.last4
        )
    }
}

impl fmt::Debug for MaskedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The secret key of the PAN hash (SipHash-1-3 with a 128-bit key); `Debug` is redacted.
#[derive(Clone)]
pub struct PanKey(SipHasher13);

impl PanKey {
    /// A key from 16 secret bytes.
    pub fn new(key: &[u8; 16]) -> PanKey {
        PanKey(SipHasher13::new_with_key(key))
    }

    /// The 64-bit keyed hash of a PAN: equal PANs give equal hashes, and without the key the
    /// hash tells nothing about the PAN.
    pub fn hash(&self, pan: &str) -> u64 {
        self.0.hash(pan.as_bytes())
    }
}

impl fmt::Debug for PanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanKey(<redacted>)")
    }
}

/// A retrieval reference number (DE37, an12) packed into 64 bits: 12 digits exactly, anything
/// else hashed (with the top bit set so the two spaces never meet).
pub fn rrn_key(rrn: &str) -> Option<u64> {
    let b = rrn.trim_end().as_bytes();
    if b.is_empty() || b.len() > 12 {
        return None;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return rrn.trim_end().parse().ok();
    }
    Some(SipHasher13::new_with_keys(0x0052_524e, 0).hash(b) | 1 << 63)
}

/// A merchant's offset from UTC, e.g. `+08:00`; days and months are merchant-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UtcOffset(i32);

impl UtcOffset {
    /// Parses `+HH:MM` / `-HH:MM` (at most ±14:00); `None` otherwise.
    pub fn parse(s: &str) -> Option<UtcOffset> {
        let b = s.as_bytes();
        if b.len() != 6 || b[3] != b':' {
            return None;
        }
        let sign = match b[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let hh: i32 = s.get(1..3)?.parse().ok()?;
        let mm: i32 = s.get(4..6)?.parse().ok()?;
        let secs = sign * (hh * 3600 + mm * 60);
        (mm < 60 && secs.abs() <= 14 * 3600).then_some(UtcOffset(secs))
    }

    /// Offset in seconds (east positive).
    pub fn seconds(self) -> i32 {
        self.0
    }

    /// From seconds, as stored in a snapshot.
    pub fn from_seconds(s: i32) -> UtcOffset {
        UtcOffset(s)
    }

    /// The merchant-local day number of `t` (cheaper than [`UtcOffset::local`]).
    pub fn day(self, t: UnixSeconds) -> i32 {
        let d = t
            .saturating_add(i64::from(self.0))
            .div_euclid(SECONDS_PER_DAY);
        i32::try_from(d).unwrap_or(i32::MAX)
    }

    /// The merchant-local calendar position of `now`.
    pub fn local(self, now: UnixSeconds) -> LocalDate {
        let local = now.saturating_add(i64::from(self.0));
        let day = local.div_euclid(SECONDS_PER_DAY);
        let date = crate::date::Civil::from_days(day);
        LocalDate {
            day: i32::try_from(day).unwrap_or(i32::MAX),
            month: i32::try_from(date.month_number()).unwrap_or(i32::MAX),
            mmdd: date.mmdd(),
        }
    }
}

/// A merchant-local day and month, as counters and windows use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalDate {
    /// Days since 1970-01-01 in merchant-local time.
    pub day: i32,
    /// `year * 12 + month - 1` in merchant-local time.
    pub month: i32,
    /// Month and day as the number MMDD (e.g. 1121), as DE13 and DE61.3 carry it.
    pub mmdd: u16,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn masked_pan_keeps_first6_last4_and_round_trips() {
        let m = MaskedPan::new("6222021234567890123").unwrap();
        assert_eq!(m.to_string(), "622202*********0123");
        assert_eq!(MaskedPan::from_u64(m.to_u64()), m);
        assert_eq!(format!("{m:?}"), "622202*********0123");
        assert!(MaskedPan::new("12345").is_none());
        assert!(MaskedPan::new("47617390010101x9").is_none());
    }

    #[test]
    fn card_type_comes_from_the_bin_prefix() {
        assert_eq!(CardType::from_pan("4761739001010119"), CardType::Visa);
        assert_eq!(
            CardType::from_pan("6222021234567890123"),
            CardType::Unionpay
        );
        assert_eq!(CardType::from_pan("5500000000000004"), CardType::Mastercard);
        assert_eq!(CardType::from_pan("2221000000000009"), CardType::Mastercard);
        assert_eq!(CardType::from_pan("371449635398431"), CardType::Amex);
        assert_eq!(CardType::from_pan("3530111333300000"), CardType::Jcb);
        assert_eq!(CardType::from_pan("6011000990139424"), CardType::Discover);
        assert_eq!(CardType::from_pan("9999000000000000"), CardType::Other);
    }

    #[test]
    fn local_dates_follow_the_offset() {
        let plus8 = UtcOffset::parse("+08:00").unwrap();
        // 2026-01-31T16:00:00Z is 2026-02-01 00:00 in +08:00.
        let t = 1_769_875_200;
        assert_eq!(UtcOffset::default().local(t).mmdd, 131);
        assert_eq!(plus8.local(t).mmdd, 201);
        assert_eq!(plus8.local(t - 1).mmdd, 131);
        assert_eq!(plus8.local(t).month, 2026 * 12 + 1);
        assert_eq!(plus8.day(t), plus8.local(t).day);
        assert_eq!(plus8.day(t - 1), plus8.local(t - 1).day);
        assert!(UtcOffset::parse("+15:00").is_none());
        assert!(UtcOffset::parse("08:00").is_none());
        assert_eq!(UtcOffset::parse("-05:30").unwrap().seconds(), -19_800);
    }

    #[test]
    fn rrn_keys_are_exact_for_digits() {
        assert_eq!(rrn_key("633209000123"), Some(633_209_000_123));
        assert!(rrn_key("ABC").unwrap() >= 1 << 63);
        assert_eq!(rrn_key("1234567890123"), None);
    }
}
