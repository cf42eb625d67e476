//! `explain`: a reason and the figures that decided it, as one English and one Chinese
//! sentence (DOMAIN §5), plus what would still pass. PANs never appear: figures hold none.

use serde::Serialize;

use crate::ledger::{response_code, Decision, Dialect, Figures, Reason};

/// A decision in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// DE44 reason.
    pub reason: &'static str,
    /// DE39 in `ascii1987`.
    pub code_iso: &'static str,
    /// DE39 in `cup_pos`.
    pub code_cup: &'static str,
    /// One English sentence.
    pub en: String,
    /// One Chinese sentence.
    pub zh: String,
    /// The figures, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<Figures>,
}

/// `explain` was asked about a reason that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// Not a DE44 reason.
    #[error("unknown reason {0:?}; expected one of the DE44 reasons such as MERCHANT_DAY_AMOUNT")]
    UnknownReason(String),
    /// JSON rendering failed.
    #[error("cannot render JSON: {0}")]
    Json(String),
}

/// Explains a decision with its figures.
pub fn explain(decision: &Decision) -> Explanation {
    explain_reason(decision.reason, Some(&decision.figures))
}

/// Explains `reason`, with figures when given.
pub fn explain_reason(reason: Reason, figures: Option<&Figures>) -> Explanation {
    let (en, zh) = sentence(reason);
    let (mut en, mut zh) = (en.to_string(), zh.to_string());
    if let Some(f) = figures {
        let (de, dz) = details(reason, f);
        if !de.is_empty() {
            en = format!("{} ({de}).", en.trim_end_matches('.'));
            zh = format!("{}（{dz}）。", zh.trim_end_matches('。'));
        }
    }
    Explanation {
        reason: reason.as_str(),
        code_iso: response_code(reason, Dialect::Ascii1987),
        code_cup: response_code(reason, Dialect::CupPos),
        en,
        zh,
        figures: figures.copied(),
    }
}

/// `refundgate explain REASON [--json]`: the generic sentences of a reason, as text or JSON.
pub fn run_explain(reason: &str, json: bool) -> Result<String, ExplainError> {
    run_explain_with(reason, None, json)
}

/// `refundgate explain REASON [figures] [--json]`: the sentences of a reason with the figures
/// that decided it (limit, used, remaining, window, original amount), as text or JSON.
pub fn run_explain_with(
    reason: &str,
    figures: Option<&Figures>,
    json: bool,
) -> Result<String, ExplainError> {
    let r: Reason = reason
        .trim()
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| ExplainError::UnknownReason(reason.chars().take(40).collect()))?;
    let e = explain_reason(r, figures);
    if json {
        serde_json::to_string_pretty(&e).map_err(|err| ExplainError::Json(err.to_string()))
    } else {
        Ok(format!(
            "{} (DE39 {} / CUP {})\n{}\n{}",
            e.reason, e.code_iso, e.code_cup, e.en, e.zh
        ))
    }
}

fn sentence(r: Reason) -> (&'static str, &'static str) {
    match r {
        Reason::APPROVED => ("Approved.", "交易成功。"),
        Reason::FORMAT_ERROR => ("The message is malformed.", "报文格式错误。"),
        Reason::MAC_INVALID => (
            "The message authentication code is wrong; sign on again.",
            "MAC校验错，请重新签到。",
        ),
        Reason::UNKNOWN_MERCHANT => ("The merchant is not registered.", "商户未登记。"),
        Reason::UNKNOWN_TERMINAL => (
            "The terminal is not registered or not signed on.",
            "终端未登记或未签到。",
        ),
        Reason::BATCH_MISMATCH => (
            "The terminal's batch number differs from the host's; sign on again.",
            "批次号与网络中心不一致，请重新签到。",
        ),
        Reason::DUPLICATE => (
            "A different request already used this terminal, trace number and date.",
            "重复交易：该终端流水号和日期已被另一笔交易使用。",
        ),
        Reason::STORE_UNAVAILABLE => (
            "The ledger is unavailable; nothing was looked up or changed, try again later.",
            "账务系统暂不可用，未做任何处理，请稍后重试。",
        ),
        Reason::CUTOVER => (
            "Day-end cut-over is running; try again shortly.",
            "系统日切，请稍后重试。",
        ),
        Reason::INVALID_AMOUNT => (
            "The amount is zero, too large or in the wrong currency.",
            "无效金额：金额为0、过大或币种不符。",
        ),
        Reason::ORIGINAL_NOT_FOUND => (
            "No original transaction matches the reference.",
            "找不到原始交易。",
        ),
        Reason::PAN_MISMATCH => (
            "The card differs from the original transaction's card.",
            "卡号与原交易不符。",
        ),
        Reason::ORIGINAL_NOT_APPROVED => (
            "The original transaction was not approved.",
            "原交易未成功。",
        ),
        Reason::ORIGINAL_VOIDED => (
            "The original transaction was already voided.",
            "原交易已撤销。",
        ),
        Reason::ORIGINAL_REVERSED => ("The original transaction was reversed.", "原交易已冲正。"),
        Reason::TYPE_NOT_REFUNDABLE => (
            "The original transaction is not a sale and cannot be refunded.",
            "原交易类型不支持退货。",
        ),
        Reason::USE_REFUND => (
            "A void must come from the sale's own terminal, on the sale's day, while its batch is open; this one cannot be voided here, so use a refund.",
            "撤销须在原终端、原交易当日且批次未结算时进行，本交易不能在此撤销，请做退货。",
        ),
        Reason::USE_VOID => (
            "This merchant takes same-day refunds of a whole sale as voids, and a void of it from this terminal would be approved: void the sale instead.",
            "本商户当日全额退货须做撤销，且本终端撤销该交易可以成功，请做消费撤销。",
        ),
        Reason::REFUND_WINDOW_EXPIRED => (
            "The sale is older than the refund window.",
            "超出交易允许退货天数。",
        ),
        Reason::VOID_AMOUNT_MISMATCH => (
            "A void must be for the full, unrefunded amount of the sale.",
            "撤销金额必须等于原交易金额且原交易未退货。",
        ),
        Reason::AMOUNT_EXCEEDS_REMAINING => (
            "The refund is larger than what is left to refund on the sale.",
            "退货金额超过原交易剩余可退金额。",
        ),
        Reason::TERMINAL_NOT_PERMITTED => (
            "This merchant or terminal is not enabled for this transaction.",
            "该商户或终端不允许进行此交易。",
        ),
        Reason::CARD_NOT_PERMITTED => (
            "This card type may not receive refunds at this merchant.",
            "该卡种不允许在本商户退货。",
        ),
        Reason::SINGLE_REFUND_CAP => (
            "The refund is above the single-refund cap.",
            "单笔退货金额超限。",
        ),
        Reason::REFUNDABLE_SHARE => (
            "The refund would exceed the refundable share of the sale.",
            "退货累计金额超过原交易可退比例。",
        ),
        Reason::ORIGINAL_REFUND_COUNT => (
            "The sale has already had the maximum number of refunds.",
            "原交易退货次数已达上限。",
        ),
        Reason::CARD_DAY_AMOUNT => (
            "The card's refund amount for today would exceed its limit.",
            "该卡当日退货累计金额超限。",
        ),
        Reason::CARD_DAY_COUNT => (
            "The card has reached today's refund count limit.",
            "该卡当日退货次数超限。",
        ),
        Reason::MERCHANT_DAY_AMOUNT => (
            "The merchant's refund amount for today would exceed its daily limit.",
            "商户当日退货累计金额超限。",
        ),
        Reason::MERCHANT_MONTH_AMOUNT => (
            "The merchant's refund amount for this month would exceed its monthly limit.",
            "商户当月退货累计金额超限。",
        ),
        Reason::MERCHANT_DAY_COUNT => (
            "The merchant has reached today's refund count limit.",
            "商户当日退货次数超限。",
        ),
        Reason::MERCHANT_MONTH_COUNT => (
            "The merchant has reached this month's refund count limit.",
            "商户当月退货次数超限。",
        ),
        Reason::BALANCE_INSUFFICIENT => (
            "The merchant's available balance does not cover the refund.",
            "商户可用余额不足。",
        ),
        Reason::BALANCE_PENDING => (
            "Sales that would cover the refund are still being processed; retry shortly.",
            "可用余额待入账，请稍后重试。",
        ),
        Reason::HOST_UNREACHABLE => (
            "The upstream host cannot be reached.",
            "发卡方状态不正常，请稍后重试。",
        ),
        Reason::NO_ROUTE => (
            "There is no route to an upstream host.",
            "发卡方线路异常，请稍后重试。",
        ),
        Reason::HOST_TIMEOUT => ("The upstream host did not answer in time.", "发卡方超时。"),
        Reason::HOST_DECLINED => (
            "The upstream host declined the request; its response code is passed on.",
            "发卡方拒绝交易，应答码为发卡方返回码。",
        ),
        Reason::INTERNAL_ERROR => (
            "An internal error occurred; nothing was changed.",
            "系统内部错误，未做任何处理。",
        ),
        Reason::FUNCTION_NOT_SUPPORTED => (
            "This transaction type is not supported.",
            "不支持的交易类型。",
        ),
        Reason::REVERSAL_NOTHING_TO_UNDO => (
            "Reversal accepted: there was nothing to undo.",
            "冲正成功：原交易无需冲正。",
        ),
        Reason::REVERSED_BEFORE_COMMIT => (
            "The request was reversed before it completed, so it was not applied.",
            "交易在完成前已被冲正，未生效。",
        ),
        Reason::REVERSAL_APPLIED => (
            "Reversal accepted: the original transaction was undone.",
            "冲正成功：原交易已撤回。",
        ),
        Reason::RECONCILE_ERROR => (
            "The batch totals differ from the gateway's; the batch stays open until they agree or an operator closes it.",
            "对账不平：批结算总额与网关不符，批次保持未结，待总额一致或由运营人员结算。",
        ),
        Reason::REVERSAL_NOT_APPLIED => (
            "Reversal accepted but not applied: the sale already has an approved refund or void, so nothing was undone (listed for reconciliation).",
            "冲正已受理但未生效：原交易已有成功的退货或撤销，未做冲正（已列入对账清单）。",
        ),
        _ => ("Unknown reason.", "未知原因。"),
    }
}

/// ISO 4217 alphabetic code and minor-unit exponent of a numeric currency code (2 for one
/// not listed, the most common exponent).
pub fn currency(code: u16) -> (Option<&'static str>, u32) {
    match code {
        840 => (Some("USD"), 2),
        156 => (Some("CNY"), 2),
        978 => (Some("EUR"), 2),
        826 => (Some("GBP"), 2),
        344 => (Some("HKD"), 2),
        446 => (Some("MOP"), 2),
        901 => (Some("TWD"), 2),
        702 => (Some("SGD"), 2),
        36 => (Some("AUD"), 2),
        124 => (Some("CAD"), 2),
        756 => (Some("CHF"), 2),
        392 => (Some("JPY"), 0),
        410 => (Some("KRW"), 0),
        704 => (Some("VND"), 0),
        152 => (Some("CLP"), 0),
        352 => (Some("ISK"), 0),
        600 => (Some("PYG"), 0),
        800 => (Some("UGX"), 0),
        950 => (Some("XAF"), 0),
        952 => (Some("XOF"), 0),
        953 => (Some("XPF"), 0),
        414 => (Some("KWD"), 3),
        48 => (Some("BHD"), 3),
        512 => (Some("OMR"), 3),
        400 => (Some("JOD"), 3),
        368 => (Some("IQD"), 3),
        434 => (Some("LYD"), 3),
        788 => (Some("TND"), 3),
        _ => (None, 2),
    }
}

/// Minor units as major units with the currency's ISO 4217 exponent, e.g. `USD 15.00`,
/// `JPY 1500`, `KWD 1.500`.
pub fn money(v: u64, code: u16) -> String {
    let (alpha, exp) = currency(code);
    let cur = alpha.map_or_else(|| format!("{code:03}"), str::to_string);
    if exp == 0 {
        return format!("{cur} {v}");
    }
    let unit = 10u64.pow(exp);
    format!(
        "{cur} {}.{:0width$}",
        v / unit,
        v % unit,
        width = exp as usize
    )
}

fn is_count(r: Reason) -> bool {
    matches!(
        r,
        Reason::ORIGINAL_REFUND_COUNT
            | Reason::CARD_DAY_COUNT
            | Reason::MERCHANT_DAY_COUNT
            | Reason::MERCHANT_MONTH_COUNT
    )
}

/// The figures as an English and a Chinese clause.
fn details(r: Reason, f: &Figures) -> (String, String) {
    let m = |v: u64| money(v, f.currency);
    let (mut en, mut zh) = (Vec::new(), Vec::new());
    if f.amount > 0 {
        en.push(format!("requested {}", m(f.amount)));
        zh.push(format!("申请金额{}", m(f.amount)));
    }
    if r == Reason::RECONCILE_ERROR {
        if let (Some(d), Some(c)) = (f.limit, f.used) {
            en.push(format!(
                "the gateway's batch: debits {}, credits {}",
                m(d),
                m(c)
            ));
            zh.push(format!("网关批次：借记{}，贷记{}", m(d), m(c)));
        }
    } else if let (Some(l), Some(u), Some(rem)) = (f.limit, f.used, f.remaining) {
        if is_count(r) {
            en.push(format!("limit {l} refunds, used {u}, remaining {rem}"));
            zh.push(format!("限额{l}笔，已用{u}笔，剩余{rem}笔"));
        } else {
            en.push(format!(
                "limit {}, used {}, remaining {}",
                m(l),
                m(u),
                m(rem)
            ));
            zh.push(format!("限额{}，已用{}，剩余{}", m(l), m(u), m(rem)));
        }
    } else if let Some(rem) = f.remaining {
        en.push(format!("available {}", m(rem)));
        zh.push(format!("可用{}", m(rem)));
    }
    if let Some(w) = f.window_days {
        en.push(format!("refund window {w} days"));
        zh.push(format!("退货期限{w}天"));
    }
    if let Some(o) = f.original_amount {
        en.push(format!("original amount {}", m(o)));
        zh.push(format!("原交易金额{}", m(o)));
    }
    if let Some(o) = f.original_remaining {
        en.push(format!("still refundable on the original {}", m(o)));
        zh.push(format!("原交易剩余可退{}", m(o)));
    }
    if let Some(d) = f.day_allowance_remaining {
        en.push(format!("merchant refund allowance left {}", m(d)));
        zh.push(format!("商户剩余可退额度{}", m(d)));
    }
    // DE54 type 92, or (figures without it) what the binding limit leaves.
    match (
        f.would_pass,
        f.remaining.filter(|_| f.limit.is_some() && !is_count(r)),
    ) {
        (Some(0), _) => {
            en.push("no refund of this sale would pass now".to_string());
            zh.push("目前该交易的任何退货都不能通过".to_string());
        }
        (Some(w), _) | (None, Some(w)) => {
            en.push(format!("a refund of at most {} would pass", m(w)));
            zh.push(format!("不超过{}的退货可以通过", m(w)));
        }
        (None, None) => {}
    }
    if let Some(c) = f.host_code.map(u16::to_be_bytes) {
        let c = String::from_utf8_lossy(&c).into_owned();
        en.push(format!("host response code {c}"));
        zh.push(format!("发卡方应答码{c}"));
    }
    (en.join(", "), zh.join("，"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_two_sentences() {
        for r in Reason::all() {
            let e = explain_reason(r, None);
            assert_ne!(e.en, "Unknown reason.", "{r}");
            assert!(!e.zh.is_empty());
        }
    }

    #[test]
    fn figures_appear_in_both_languages() {
        let d = Decision::new(
            Reason::MERCHANT_DAY_AMOUNT,
            Figures {
                amount: 1500,
                currency: 840,
                limit: Some(5000),
                used: Some(4000),
                remaining: Some(1000),
                ..Figures::default()
            },
        );
        let e = explain(&d);
        assert!(
            e.en.contains("limit USD 50.00, used USD 40.00, remaining USD 10.00"),
            "{}",
            e.en
        );
        assert!(e.en.contains("at most USD 10.00 would pass"));
        assert!(e.zh.contains("剩余USD 10.00"), "{}", e.zh);
    }

    #[test]
    fn amounts_follow_the_iso_4217_exponent_of_the_currency() {
        assert_eq!(money(1500, 840), "USD 15.00");
        assert_eq!(money(1500, 392), "JPY 1500");
        assert_eq!(money(1500, 414), "KWD 1.500");
        assert_eq!(money(7, 48), "BHD 0.007");
        assert_eq!(money(1234, 999), "999 12.34");
        let d = Decision::new(
            Reason::MERCHANT_DAY_AMOUNT,
            Figures {
                amount: 1500,
                currency: 392,
                limit: Some(5000),
                used: Some(4000),
                remaining: Some(1000),
                would_pass: Some(900),
                ..Figures::default()
            },
        );
        let e = explain(&d);
        assert!(e.en.contains("limit JPY 5000, used JPY 4000"), "{}", e.en);
        assert!(e.en.contains("at most JPY 900 would pass"), "{}", e.en);
    }

    #[test]
    fn use_refund_and_use_void_say_the_rule_that_bound() {
        let e = explain_reason(Reason::USE_REFUND, None);
        assert!(e.en.contains("sale's own terminal"), "{}", e.en);
        let e = explain_reason(Reason::USE_VOID, None);
        assert!(e.en.contains("would be approved"), "{}", e.en);
    }

    #[test]
    fn run_explain_renders_text_and_json() {
        let t = run_explain("refund_window_expired", false).unwrap();
        assert!(t.starts_with("REFUND_WINDOW_EXPIRED (DE39 12 / CUP 22)"));
        let j = run_explain("MAC_INVALID", true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["code_cup"], "A0");
        assert!(run_explain("NOPE", false).is_err());
    }
}
