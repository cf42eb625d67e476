//! Reasons (DE44), their response codes (DE39) and their explanations, declared once
//! (DOMAIN §5).
//!
//! [`Reason`] is an open newtype with named constants in the h2 `Reason(u32)` style. Each
//! reason is one entry of [`reasons!`] below: its number (journaled, so stable: entries are
//! only ever appended, never renumbered), its DE44 name, its DE39 code in every code column
//! ([`CodeColumn`]: ISO 8583:1987 and CUP POS) and its English and Chinese explanation.
//! [`response_code`] is the only place that turns a reason into the two characters a terminal
//! sees. The order follows DOMAIN §5 rows 1–14, then the unnumbered rows, then later additions.

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

impl Dialect {
    /// The response-code column this dialect answers with.
    pub fn code_column(self) -> CodeColumn {
        match self {
            Dialect::Ascii1987 => CodeColumn::Iso,
            Dialect::CupPos => CodeColumn::Cup,
        }
    }
}

/// A column of DE39 codes in the reason table. A dialect names the column it answers with
/// (DOMAIN §5: "ISO = ascii1987 code, CUP = cup_pos code where it differs").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeColumn {
    /// ISO 8583:1987 codes (ascii1987, iso87b).
    Iso,
    /// China UnionPay POS codes (cup_pos).
    Cup,
}

impl CodeColumn {
    /// Every column, in table order.
    pub const ALL: [CodeColumn; 2] = [CodeColumn::Iso, CodeColumn::Cup];

    /// The column named `iso` or `cup` (as dialect files write it).
    pub fn from_name(name: &str) -> Option<CodeColumn> {
        match name {
            "iso" => Some(CodeColumn::Iso),
            "cup" => Some(CodeColumn::Cup),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a request was answered the way it was; carried in DE44 (at most 25 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason(u8);

/// One reason as declared: number, name, a code per [`CodeColumn`], explanation texts.
struct Row {
    number: u8,
    name: &'static str,
    codes: [&'static str; 2],
    en: &'static str,
    zh: &'static str,
}

/// Declares every reason once: the `Reason` constants and the table rows come from here.
macro_rules! reasons {
    ($(
        $(#[doc = $doc:literal])*
        $number:literal $name:ident iso $iso:literal cup $cup:literal
            en $en:literal
            zh $zh:literal;
    )*) => {
        impl Reason {
            $(
                $(#[doc = $doc])*
                pub const $name: Reason = Reason($number);
            )*
        }

        const TABLE: &[Row] = &[
            $(Row {
                number: $number,
                name: stringify!($name),
                codes: [$iso, $cup],
                en: $en,
                zh: $zh,
            },)*
        ];
    };
}

reasons! {
    /// 00: approved.
    0 APPROVED iso "00" cup "00"
        en "Approved."
        zh "交易成功。";
    /// Row 1, 30: the message is malformed (also a malformed original reference).
    1 FORMAT_ERROR iso "30" cup "30"
        en "The message is malformed."
        zh "报文格式错误。";
    /// Row 2, 63 / CUP A0: MAC wrong or unverifiable.
    2 MAC_INVALID iso "63" cup "A0"
        en "The message authentication code is wrong; sign on again."
        zh "MAC校验错，请重新签到。";
    /// Row 3, 03: DE42 names no known merchant.
    3 UNKNOWN_MERCHANT iso "03" cup "03"
        en "The merchant is not registered."
        zh "商户未登记。";
    /// Row 3, 03 / CUP 97: DE41 is not a terminal of the merchant, or a CUP terminal is not signed on.
    4 UNKNOWN_TERMINAL iso "03" cup "97"
        en "The terminal is not registered or not signed on."
        zh "终端未登记或未签到。";
    /// Row 3, 77: the CUP batch (DE60.2) is not the terminal's current batch.
    5 BATCH_MISMATCH iso "77" cup "77"
        en "The terminal's batch number differs from the host's; sign on again."
        zh "批次号与网络中心不一致，请重新签到。";
    /// Row 4, 94: a different request reuses an idempotency key (DOMAIN §6).
    6 DUPLICATE iso "94" cup "94"
        en "A different request already used this terminal, trace number and date."
        zh "重复交易：该终端流水号和日期已被另一笔交易使用。";
    /// Row 5, 96: the journal / ledger cannot be used.
    7 STORE_UNAVAILABLE iso "96" cup "96"
        en "The ledger is unavailable; nothing was looked up or changed, try again later."
        zh "账务系统暂不可用，未做任何处理，请稍后重试。";
    /// Row 5, 90: a cut-over (settlement) is running for the merchant.
    8 CUTOVER iso "90" cup "90"
        en "Day-end cut-over is running; try again shortly."
        zh "系统日切，请稍后重试。";
    /// Row 6, 13: zero amount or wrong currency.
    9 INVALID_AMOUNT iso "13" cup "13"
        en "The amount is zero, too large or in the wrong currency."
        zh "无效金额：金额为0、过大或币种不符。";
    /// Row 7, 25: no original matches the reference.
    10 ORIGINAL_NOT_FOUND iso "25" cup "25"
        en "No original transaction matches the reference."
        zh "找不到原始交易。";
    /// Row 8, 14: the card differs from the original's.
    11 PAN_MISMATCH iso "14" cup "14"
        en "The card differs from the original transaction's card."
        zh "卡号与原交易不符。";
    /// Row 8, 12: the original was declined.
    12 ORIGINAL_NOT_APPROVED iso "12" cup "12"
        en "The original transaction was not approved."
        zh "原交易未成功。";
    /// Row 8, 22: the original was voided.
    13 ORIGINAL_VOIDED iso "22" cup "22"
        en "The original transaction was already voided."
        zh "原交易已撤销。";
    /// Row 8, 22: the original was reversed.
    14 ORIGINAL_REVERSED iso "22" cup "22"
        en "The original transaction was reversed."
        zh "原交易已冲正。";
    /// Row 8, 40: the original is not a sale (e.g. a refund of a refund).
    15 TYPE_NOT_REFUNDABLE iso "40" cup "40"
        en "The original transaction is not a sale and cannot be refunded."
        zh "原交易类型不支持退货。";
    /// Row 9, 12: a void after the day or batch closed; refund instead.
    16 USE_REFUND iso "12" cup "12"
        en "A void must come from the sale's own terminal, on the sale's day, while its batch is open; this one cannot be voided here, so use a refund."
        zh "撤销须在原终端、原交易当日且批次未结算时进行，本交易不能在此撤销，请做退货。";
    /// Row 9, 12: policy `same_day_refund = "use_void"`; void instead.
    17 USE_VOID iso "12" cup "12"
        en "This merchant takes same-day refunds of a whole sale as voids, and a void of it from this terminal would be approved: void the sale instead."
        zh "本商户当日全额退货须做撤销，且本终端撤销该交易可以成功，请做消费撤销。";
    /// Row 9, 12 / CUP 22: the original is older than `refund_window_days`.
    18 REFUND_WINDOW_EXPIRED iso "12" cup "22"
        en "The sale is older than the refund window."
        zh "超出交易允许退货天数。";
    /// Row 10, 64: a void amount differs from the original (or the original was partly refunded).
    19 VOID_AMOUNT_MISMATCH iso "64" cup "64"
        en "A void must be for the full, unrefunded amount of the sale."
        zh "撤销金额必须等于原交易金额且原交易未退货。";
    /// Row 10, 64: the refund is larger than what is left on the original.
    20 AMOUNT_EXCEEDS_REMAINING iso "64" cup "64"
        en "The refund is larger than what is left to refund on the sale."
        zh "退货金额超过原交易剩余可退金额。";
    /// Row 11, 58: the merchant or terminal may not refund / void.
    21 TERMINAL_NOT_PERMITTED iso "58" cup "58"
        en "This merchant or terminal is not enabled for this transaction."
        zh "该商户或终端不允许进行此交易。";
    /// Row 11, 57: the card type may not receive refunds.
    22 CARD_NOT_PERMITTED iso "57" cup "57"
        en "This card type may not receive refunds at this merchant."
        zh "该卡种不允许在本商户退货。";
    /// Row 12, 61: above `refund_single_max`.
    23 SINGLE_REFUND_CAP iso "61" cup "61"
        en "The refund is above the single-refund cap."
        zh "单笔退货金额超限。";
    /// Row 12, 61: above `refundable_share_percent` of the original.
    24 REFUNDABLE_SHARE iso "61" cup "61"
        en "The refund would exceed the refundable share of the sale."
        zh "退货累计金额超过原交易可退比例。";
    /// Row 12, 65: `original_refund_count_max` reached.
    25 ORIGINAL_REFUND_COUNT iso "65" cup "65"
        en "The sale has already had the maximum number of refunds."
        zh "原交易退货次数已达上限。";
    /// Row 12, 61: `card_refund_day_amount_max` would be exceeded.
    26 CARD_DAY_AMOUNT iso "61" cup "61"
        en "The card's refund amount for today would exceed its limit."
        zh "该卡当日退货累计金额超限。";
    /// Row 12, 65: `card_refund_day_count_max` reached.
    27 CARD_DAY_COUNT iso "65" cup "65"
        en "The card has reached today's refund count limit."
        zh "该卡当日退货次数超限。";
    /// Row 12, 61: `refund_day_amount_max` would be exceeded.
    28 MERCHANT_DAY_AMOUNT iso "61" cup "61"
        en "The merchant's refund amount for today would exceed its daily limit."
        zh "商户当日退货累计金额超限。";
    /// Row 12, 61: `refund_month_amount_max` would be exceeded.
    29 MERCHANT_MONTH_AMOUNT iso "61" cup "61"
        en "The merchant's refund amount for this month would exceed its monthly limit."
        zh "商户当月退货累计金额超限。";
    /// Row 12, 65: `refund_day_count_max` reached.
    30 MERCHANT_DAY_COUNT iso "65" cup "65"
        en "The merchant has reached today's refund count limit."
        zh "商户当日退货次数超限。";
    /// Row 12, 65: `refund_month_count_max` reached.
    31 MERCHANT_MONTH_COUNT iso "65" cup "65"
        en "The merchant has reached this month's refund count limit."
        zh "商户当月退货次数超限。";
    /// Row 13, 51: the merchant's available funds do not cover the refund.
    32 BALANCE_INSUFFICIENT iso "51" cup "51"
        en "The merchant's available balance does not cover the refund."
        zh "商户可用余额不足。";
    /// Row 13, 51: they would once sales still in flight are committed; retry shortly.
    33 BALANCE_PENDING iso "51" cup "51"
        en "Sales that would cover the refund are still being processed; retry shortly."
        zh "可用余额待入账，请稍后重试。";
    /// Row 14, 91: the upstream host is down.
    34 HOST_UNREACHABLE iso "91" cup "91"
        en "The upstream host cannot be reached."
        zh "发卡方状态不正常，请稍后重试。";
    /// Row 14, 92: no upstream route.
    35 NO_ROUTE iso "92" cup "92"
        en "There is no route to an upstream host."
        zh "发卡方线路异常，请稍后重试。";
    /// Row 14, 91 / CUP 98: the upstream host did not answer in time.
    36 HOST_TIMEOUT iso "91" cup "98"
        en "The upstream host did not answer in time."
        zh "发卡方超时。";
    /// 96: an internal fault; never 25 or 51 when we could not look.
    37 INTERNAL_ERROR iso "96" cup "96"
        en "An internal error occurred; nothing was changed."
        zh "系统内部错误，未做任何处理。";
    /// 40: unsupported MTI or processing code.
    38 FUNCTION_NOT_SUPPORTED iso "40" cup "40"
        en "This transaction type is not supported."
        zh "不支持的交易类型。";
    /// 00: a reversal found nothing to undo (unknown, never applied, already reversed or voided).
    39 REVERSAL_NOTHING_TO_UNDO iso "00" cup "00"
        en "Reversal accepted: there was nothing to undo."
        zh "冲正成功：原交易无需冲正。";
    /// 22: the request was reversed while it was in flight, so it was never applied.
    40 REVERSED_BEFORE_COMMIT iso "22" cup "22"
        en "The request was reversed before it completed, so it was not applied."
        zh "交易在完成前已被冲正，未生效。";
    /// 00: a reversal undid its original.
    41 REVERSAL_APPLIED iso "00" cup "00"
        en "Reversal accepted: the original transaction was undone."
        zh "冲正成功：原交易已撤回。";
    /// Row 14: the upstream host declined; DE39 carries the host's code (05 when unknown).
    42 HOST_DECLINED iso "05" cup "05"
        en "The upstream host declined the request; its response code is passed on."
        zh "发卡方拒绝交易，应答码为发卡方返回码。";
    /// 95: a settlement's batch totals differ from the gateway's; the batch stays open.
    43 RECONCILE_ERROR iso "95" cup "95"
        en "The batch totals differ from the gateway's; the batch stays open until they agree or an operator closes it."
        zh "对账不平：批结算总额与网关不符，批次保持未结，待总额一致或由运营人员结算。";
    /// 00: a reversal of a sale that already has an approved refund or void undid nothing
    /// (money is never returned twice); counted and listed for reconciliation.
    44 REVERSAL_NOT_APPLIED iso "00" cup "00"
        en "Reversal accepted but not applied: the sale already has an approved refund or void, so nothing was undone (listed for reconciliation)."
        zh "冲正已受理但未生效：原交易已有成功的退货或撤销，未做冲正（已列入对账清单）。";
}

// A reason's number is its index in the table: checked when the crate is built, so a renumbered
// or reordered entry cannot reach a journal.
const _: () = {
    let mut i = 0;
    while i < TABLE.len() {
        assert!(
            TABLE[i].number as usize == i,
            "reason numbers must run 0, 1, 2, ..."
        );
        i += 1;
    }
    assert!(TABLE.len() <= u8::MAX as usize);
};

impl Reason {
    /// Every known reason, in table order.
    pub fn all() -> impl Iterator<Item = Reason> {
        TABLE.iter().map(|r| Reason(r.number))
    }

    /// The DE44 text, e.g. `"MERCHANT_DAY_AMOUNT"`.
    pub fn as_str(self) -> &'static str {
        self.row().map_or("INTERNAL_ERROR", |r| r.name)
    }

    /// True when the answer is an approval (DE39 `00`).
    pub fn is_approval(self) -> bool {
        self.row()
            .is_some_and(|r| r.codes[CodeColumn::Iso.index()] == "00")
    }

    /// The DE39 code in `column`.
    pub fn code(self, column: CodeColumn) -> &'static str {
        self.row().map_or("96", |r| r.codes[column.index()])
    }

    /// The generic explanation, in English and in Chinese.
    pub fn texts(self) -> (&'static str, &'static str) {
        self.row()
            .map_or(("Unknown reason.", "未知原因。"), |r| (r.en, r.zh))
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
            .find(|r| r.name == s)
            .map(|r| Reason(r.number))
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
    reason.code(dialect.code_column())
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

    /// Every reason has a name that fits DE44, a two-character code in every column and both
    /// explanation texts; names are unique.
    #[test]
    fn every_reason_has_its_name_codes_and_texts() {
        let mut names = std::collections::HashSet::new();
        for r in Reason::all() {
            assert!(names.insert(r.as_str()), "{r} declared twice");
            for column in CodeColumn::ALL {
                let code = r.code(column);
                assert_eq!(code.len(), 2, "{r} {column:?}");
                assert!(code.bytes().all(|b| b.is_ascii_alphanumeric()), "{r}");
            }
            let (en, zh) = r.texts();
            assert!(en.len() > 8 && en.ends_with('.'), "{r}: {en}");
            assert!(
                zh.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)) && zh.ends_with('。'),
                "{r}: {zh}"
            );
        }
        assert_eq!(names.len(), 45);
    }

    /// Numbers are journaled: they, the names and the codes stay what earlier journals hold.
    #[test]
    fn numbers_names_and_codes_are_those_journals_hold() {
        let now: String = Reason::all()
            .map(|r| {
                format!(
                    "{} {} {} {}\n",
                    r.to_u8(),
                    r,
                    r.code(CodeColumn::Iso),
                    r.code(CodeColumn::Cup)
                )
            })
            .collect();
        assert_eq!(now, JOURNALED);
        assert_eq!(Reason::from_u8(45), None);
        assert_eq!(Reason::from_u8(44), Some(Reason::REVERSAL_NOT_APPLIED));
    }

    /// The table as it stood when reasons were first declared in one place (append only).
    const JOURNALED: &str = "0 APPROVED 00 00\n\
1 FORMAT_ERROR 30 30\n\
2 MAC_INVALID 63 A0\n\
3 UNKNOWN_MERCHANT 03 03\n\
4 UNKNOWN_TERMINAL 03 97\n\
5 BATCH_MISMATCH 77 77\n\
6 DUPLICATE 94 94\n\
7 STORE_UNAVAILABLE 96 96\n\
8 CUTOVER 90 90\n\
9 INVALID_AMOUNT 13 13\n\
10 ORIGINAL_NOT_FOUND 25 25\n\
11 PAN_MISMATCH 14 14\n\
12 ORIGINAL_NOT_APPROVED 12 12\n\
13 ORIGINAL_VOIDED 22 22\n\
14 ORIGINAL_REVERSED 22 22\n\
15 TYPE_NOT_REFUNDABLE 40 40\n\
16 USE_REFUND 12 12\n\
17 USE_VOID 12 12\n\
18 REFUND_WINDOW_EXPIRED 12 22\n\
19 VOID_AMOUNT_MISMATCH 64 64\n\
20 AMOUNT_EXCEEDS_REMAINING 64 64\n\
21 TERMINAL_NOT_PERMITTED 58 58\n\
22 CARD_NOT_PERMITTED 57 57\n\
23 SINGLE_REFUND_CAP 61 61\n\
24 REFUNDABLE_SHARE 61 61\n\
25 ORIGINAL_REFUND_COUNT 65 65\n\
26 CARD_DAY_AMOUNT 61 61\n\
27 CARD_DAY_COUNT 65 65\n\
28 MERCHANT_DAY_AMOUNT 61 61\n\
29 MERCHANT_MONTH_AMOUNT 61 61\n\
30 MERCHANT_DAY_COUNT 65 65\n\
31 MERCHANT_MONTH_COUNT 65 65\n\
32 BALANCE_INSUFFICIENT 51 51\n\
33 BALANCE_PENDING 51 51\n\
34 HOST_UNREACHABLE 91 91\n\
35 NO_ROUTE 92 92\n\
36 HOST_TIMEOUT 91 98\n\
37 INTERNAL_ERROR 96 96\n\
38 FUNCTION_NOT_SUPPORTED 40 40\n\
39 REVERSAL_NOTHING_TO_UNDO 00 00\n\
40 REVERSED_BEFORE_COMMIT 22 22\n\
41 REVERSAL_APPLIED 00 00\n\
42 HOST_DECLINED 05 05\n\
43 RECONCILE_ERROR 95 95\n\
44 REVERSAL_NOT_APPLIED 00 00\n\
";

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
