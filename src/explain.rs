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
    let (en, zh) = reason.texts();
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
