//! Reasons (DE44) and their response codes (DE39), mapped in one place (DOMAIN §5).
//!
//! [`Reason`] is an open newtype with named constants in the h2 `Reason(u32)` style: the
//! constants are ordered like the rows of DOMAIN §5, and [`response_code`] is the only place
//! that turns a reason into the two characters a terminal sees.

use std::fmt;
use std::str::FromStr;

/// The ISO 8583 dialect a terminal speaks; it only changes the DE39 code of a few reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Generic ISO 8583:1987 with ASCII fields (the default).
    Ascii1987,
    /// China UnionPay POS terminal dialect (BCD fields, TPDU, sign-on with batch numbers).
    CupPos,
}

/// Why a request was answered the way it was; carried in DE44 (at most 25 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason(u8);

/// One row of the reason table: name, ISO 8583:1987 code, CUP POS code.
struct Row {
    name: &'static str,
    iso: &'static str,
    cup: &'static str,
}

const fn row(name: &'static str, iso: &'static str, cup: &'static str) -> Row {
    Row { name, iso, cup }
}

/// Indexed by `Reason.0`; the order follows DOMAIN §5 rows 1–14, then the two unnumbered rows.
const TABLE: [Row; 45] = [
    row("APPROVED", "00", "00"),
    row("FORMAT_ERROR", "30", "30"),
    row("MAC_INVALID", "63", "A0"),
    row("UNKNOWN_MERCHANT", "03", "03"),
    row("UNKNOWN_TERMINAL", "03", "97"),
    row("BATCH_MISMATCH", "77", "77"),
    row("DUPLICATE", "94", "94"),
    row("STORE_UNAVAILABLE", "96", "96"),
    row("CUTOVER", "90", "90"),
    row("INVALID_AMOUNT", "13", "13"),
    row("ORIGINAL_NOT_FOUND", "25", "25"),
    row("PAN_MISMATCH", "14", "14"),
    row("ORIGINAL_NOT_APPROVED", "12", "12"),
    row("ORIGINAL_VOIDED", "22", "22"),
    row("ORIGINAL_REVERSED", "22", "22"),
    row("TYPE_NOT_REFUNDABLE", "40", "40"),
    row("USE_REFUND", "12", "12"),
    row("USE_VOID", "12", "12"),
    row("REFUND_WINDOW_EXPIRED", "12", "22"),
    row("VOID_AMOUNT_MISMATCH", "64", "64"),
    row("AMOUNT_EXCEEDS_REMAINING", "64", "64"),
    row("TERMINAL_NOT_PERMITTED", "58", "58"),
    row("CARD_NOT_PERMITTED", "57", "57"),
    row("SINGLE_REFUND_CAP", "61", "61"),
    row("REFUNDABLE_SHARE", "61", "61"),
    row("ORIGINAL_REFUND_COUNT", "65", "65"),
    row("CARD_DAY_AMOUNT", "61", "61"),
    row("CARD_DAY_COUNT", "65", "65"),
    row("MERCHANT_DAY_AMOUNT", "61", "61"),
    row("MERCHANT_MONTH_AMOUNT", "61", "61"),
    row("MERCHANT_DAY_COUNT", "65", "65"),
    row("MERCHANT_MONTH_COUNT", "65", "65"),
    row("BALANCE_INSUFFICIENT", "51", "51"),
    row("BALANCE_PENDING", "51", "51"),
    row("HOST_UNREACHABLE", "91", "91"),
    row("NO_ROUTE", "92", "92"),
    row("HOST_TIMEOUT", "91", "98"),
    row("INTERNAL_ERROR", "96", "96"),
    row("FUNCTION_NOT_SUPPORTED", "40", "40"),
    // Reversal answers: approved, but the reason tells the log what happened.
    row("REVERSAL_NOTHING_TO_UNDO", "00", "00"),
    row("REVERSED_BEFORE_COMMIT", "22", "22"),
    row("REVERSAL_APPLIED", "00", "00"),
    // Row 14, appended so journaled reason numbers stay stable. The host's own DE39 is what the
    // terminal sees (the flow layer passes it through); 05 is the code when it is unknown.
    row("HOST_DECLINED", "05", "05"),
    // DOMAIN §9a and §9, appended for the same reason.
    row("RECONCILE_ERROR", "95", "95"),
    row("REVERSAL_NOT_APPLIED", "00", "00"),
];

impl Reason {
    /// 00: approved.
    pub const APPROVED: Reason = Reason(0);
    /// Row 1, 30: the message is malformed (also a malformed original reference).
    pub const FORMAT_ERROR: Reason = Reason(1);
    /// Row 2, 63 / CUP A0: MAC wrong or unverifiable.
    pub const MAC_INVALID: Reason = Reason(2);
    /// Row 3, 03: DE42 names no known merchant.
    pub const UNKNOWN_MERCHANT: Reason = Reason(3);
    /// Row 3, 03 / CUP 97: DE41 is not a terminal of the merchant, or a CUP terminal is not signed on.
    pub const UNKNOWN_TERMINAL: Reason = Reason(4);
    /// Row 3, 77: the CUP batch (DE60.2) is not the terminal's current batch.
    pub const BATCH_MISMATCH: Reason = Reason(5);
    /// Row 4, 94: a different request reuses an idempotency key (DOMAIN §6).
    pub const DUPLICATE: Reason = Reason(6);
    /// Row 5, 96: the journal / ledger cannot be used.
    pub const STORE_UNAVAILABLE: Reason = Reason(7);
    /// Row 5, 90: a cut-over (settlement) is running for the merchant.
    pub const CUTOVER: Reason = Reason(8);
    /// Row 6, 13: zero amount or wrong currency.
    pub const INVALID_AMOUNT: Reason = Reason(9);
    /// Row 7, 25: no original matches the reference.
    pub const ORIGINAL_NOT_FOUND: Reason = Reason(10);
    /// Row 8, 14: the card differs from the original's.
    pub const PAN_MISMATCH: Reason = Reason(11);
    /// Row 8, 12: the original was declined.
    pub const ORIGINAL_NOT_APPROVED: Reason = Reason(12);
    /// Row 8, 22: the original was voided.
    pub const ORIGINAL_VOIDED: Reason = Reason(13);
    /// Row 8, 22: the original was reversed.
    pub const ORIGINAL_REVERSED: Reason = Reason(14);
    /// Row 8, 40: the original is not a sale (e.g. a refund of a refund).
    pub const TYPE_NOT_REFUNDABLE: Reason = Reason(15);
    /// Row 9, 12: a void after the day or batch closed; refund instead.
    pub const USE_REFUND: Reason = Reason(16);
    /// Row 9, 12: policy `same_day_refund = "use_void"`; void instead.
    pub const USE_VOID: Reason = Reason(17);
    /// Row 9, 12 / CUP 22: the original is older than `refund_window_days`.
    pub const REFUND_WINDOW_EXPIRED: Reason = Reason(18);
    /// Row 10, 64: a void amount differs from the original (or the original was partly refunded).
    pub const VOID_AMOUNT_MISMATCH: Reason = Reason(19);
    /// Row 10, 64: the refund is larger than what is left on the original.
    pub const AMOUNT_EXCEEDS_REMAINING: Reason = Reason(20);
    /// Row 11, 58: the merchant or terminal may not refund / void.
    pub const TERMINAL_NOT_PERMITTED: Reason = Reason(21);
    /// Row 11, 57: the card type may not receive refunds.
    pub const CARD_NOT_PERMITTED: Reason = Reason(22);
    /// Row 12, 61: above `refund_single_max`.
    pub const SINGLE_REFUND_CAP: Reason = Reason(23);
    /// Row 12, 61: above `refundable_share_percent` of the original.
    pub const REFUNDABLE_SHARE: Reason = Reason(24);
    /// Row 12, 65: `original_refund_count_max` reached.
    pub const ORIGINAL_REFUND_COUNT: Reason = Reason(25);
    /// Row 12, 61: `card_refund_day_amount_max` would be exceeded.
    pub const CARD_DAY_AMOUNT: Reason = Reason(26);
    /// Row 12, 65: `card_refund_day_count_max` reached.
    pub const CARD_DAY_COUNT: Reason = Reason(27);
    /// Row 12, 61: `refund_day_amount_max` would be exceeded.
    pub const MERCHANT_DAY_AMOUNT: Reason = Reason(28);
    /// Row 12, 61: `refund_month_amount_max` would be exceeded.
    pub const MERCHANT_MONTH_AMOUNT: Reason = Reason(29);
    /// Row 12, 65: `refund_day_count_max` reached.
    pub const MERCHANT_DAY_COUNT: Reason = Reason(30);
    /// Row 12, 65: `refund_month_count_max` reached.
    pub const MERCHANT_MONTH_COUNT: Reason = Reason(31);
    /// Row 13, 51: the merchant's available funds do not cover the refund.
    pub const BALANCE_INSUFFICIENT: Reason = Reason(32);
    /// Row 13, 51: they would once sales still in flight are committed; retry shortly.
    pub const BALANCE_PENDING: Reason = Reason(33);
    /// Row 14, 91: the upstream host is down.
    pub const HOST_UNREACHABLE: Reason = Reason(34);
    /// Row 14, 92: no upstream route.
    pub const NO_ROUTE: Reason = Reason(35);
    /// Row 14, 91 / CUP 98: the upstream host did not answer in time.
    pub const HOST_TIMEOUT: Reason = Reason(36);
    /// 96: an internal fault; never 25 or 51 when we could not look.
    pub const INTERNAL_ERROR: Reason = Reason(37);
    /// 40: unsupported MTI or processing code.
    pub const FUNCTION_NOT_SUPPORTED: Reason = Reason(38);
    /// 00: a reversal found nothing to undo (unknown, never applied, already reversed or voided).
    pub const REVERSAL_NOTHING_TO_UNDO: Reason = Reason(39);
    /// 22: the request was reversed while it was in flight, so it was never applied.
    pub const REVERSED_BEFORE_COMMIT: Reason = Reason(40);
    /// 00: a reversal undid its original.
    pub const REVERSAL_APPLIED: Reason = Reason(41);
    /// Row 14: the upstream host declined; DE39 carries the host's code (05 when unknown).
    pub const HOST_DECLINED: Reason = Reason(42);
    /// 95: a settlement's batch totals differ from the gateway's; the batch stays open.
    pub const RECONCILE_ERROR: Reason = Reason(43);
    /// 00: a reversal of a sale that already has an approved refund or void undid nothing
    /// (money is never returned twice); counted and listed for reconciliation.
    pub const REVERSAL_NOT_APPLIED: Reason = Reason(44);

    /// Every known reason, in table order.
    pub fn all() -> impl Iterator<Item = Reason> {
        (0..TABLE.len()).filter_map(|i| u8::try_from(i).ok().map(Reason))
    }

    /// The DE44 text, e.g. `"MERCHANT_DAY_AMOUNT"`.
    pub fn as_str(self) -> &'static str {
        self.row().map_or("INTERNAL_ERROR", |r| r.name)
    }

    /// True when the answer is an approval (DE39 `00`).
    pub fn is_approval(self) -> bool {
        self.row().is_some_and(|r| r.iso == "00")
    }

    /// The numeric value, used by the journal encoding.
    pub fn to_u8(self) -> u8 {
        self.0
    }

    /// The reason with this numeric value, if it is known.
    pub fn from_u8(v: u8) -> Option<Reason> {
        (usize::from(v) < TABLE.len()).then_some(Reason(v))
    }

    fn row(self) -> Option<&'static Row> {
        TABLE.get(usize::from(self.0))
    }
}

/// Error for a DE44 text that names no reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TABLE
            .iter()
            .position(|r| r.name == s)
            .and_then(|i| u8::try_from(i).ok())
            .map(Reason)
            .ok_or_else(|| UnknownReason(s.chars().take(32).collect()))
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A DE39 response code, dialect-neutral: it stands for the outcome of a reason, shown as
/// the ISO 8583:1987 code by [`ResponseCode::as_str`]; the wire code for a given dialect
/// comes from [`ResponseCode::for_dialect`] (i.e. [`response_code`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseCode(Reason);

impl ResponseCode {
    /// The code of `reason`.
    pub fn of(reason: Reason) -> ResponseCode {
        ResponseCode(reason)
    }

    /// The ISO 8583:1987 code, e.g. `"61"`.
    pub fn as_str(self) -> &'static str {
        response_code(self.0, Dialect::Ascii1987)
    }

    /// The code in `dialect`.
    pub fn for_dialect(self, dialect: Dialect) -> &'static str {
        response_code(self.0, dialect)
    }

    /// True for `00`.
    pub fn is_approved(self) -> bool {
        self.as_str() == "00"
    }
}

impl fmt::Debug for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two-character DE39 for `reason` in `dialect` (DOMAIN §5: ISO vs CUP columns).
pub fn response_code(reason: Reason, dialect: Dialect) -> &'static str {
    match (reason.row(), dialect) {
        (Some(r), Dialect::Ascii1987) => r.iso,
        (Some(r), Dialect::CupPos) => r.cup,
        (None, _) => "96",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_name_and_fits_de44() {
        for r in Reason::all() {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert!(r.as_str().len() <= crate::limits::REASON_BYTES_MAX);
        }
        assert!("NOPE".parse::<Reason>().is_err());
    }

    #[test]
    fn dialect_columns_differ_where_domain_says() {
        let cases = [
            (Reason::MAC_INVALID, "63", "A0"),
            (Reason::UNKNOWN_TERMINAL, "03", "97"),
            (Reason::BATCH_MISMATCH, "77", "77"),
            (Reason::REFUND_WINDOW_EXPIRED, "12", "22"),
            (Reason::HOST_TIMEOUT, "91", "98"),
            (Reason::MERCHANT_DAY_AMOUNT, "61", "61"),
            (Reason::BALANCE_PENDING, "51", "51"),
        ];
        for (r, iso, cup) in cases {
            assert_eq!(response_code(r, Dialect::Ascii1987), iso, "{r}");
            assert_eq!(response_code(r, Dialect::CupPos), cup, "{r}");
        }
    }
}
