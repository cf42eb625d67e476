//! The decision trail of an answer: the checks of DOMAIN §5 in order, which one bound, and
//! the figures it bound with. Built from the stored decision (its reason says which check
//! failed; the checks before it passed, the ones after were not reached).

use serde_json::{json, Value};

use crate::explain;
use crate::ledger::{Decision, Policy, Reason};

/// The checks of DOMAIN §5, in order, with the reasons each can give.
const ROWS: [(u8, &str, &[Reason]); 14] = [
    (1, "message well formed", &[Reason::FORMAT_ERROR]),
    (2, "MAC valid", &[Reason::MAC_INVALID]),
    (
        3,
        "merchant and terminal known, signed on, batch matches",
        &[
            Reason::UNKNOWN_MERCHANT,
            Reason::UNKNOWN_TERMINAL,
            Reason::BATCH_MISMATCH,
        ],
    ),
    (4, "not a duplicate", &[Reason::DUPLICATE]),
    (
        5,
        "store available, no cut-over running",
        &[Reason::STORE_UNAVAILABLE, Reason::CUTOVER],
    ),
    (6, "amount valid", &[Reason::INVALID_AMOUNT]),
    (7, "original found", &[Reason::ORIGINAL_NOT_FOUND]),
    (
        8,
        "original consistent",
        &[
            Reason::PAN_MISMATCH,
            Reason::ORIGINAL_NOT_APPROVED,
            Reason::ORIGINAL_VOIDED,
            Reason::ORIGINAL_REVERSED,
            Reason::TYPE_NOT_REFUNDABLE,
        ],
    ),
    (
        9,
        "right operation (void same day, refund window, same-day policy)",
        &[
            Reason::USE_REFUND,
            Reason::USE_VOID,
            Reason::REFUND_WINDOW_EXPIRED,
        ],
    ),
    (
        10,
        "amount against the original",
        &[
            Reason::VOID_AMOUNT_MISMATCH,
            Reason::AMOUNT_EXCEEDS_REMAINING,
        ],
    ),
    (
        11,
        "permissions",
        &[Reason::TERMINAL_NOT_PERMITTED, Reason::CARD_NOT_PERMITTED],
    ),
    (12, "limits", &LIMITS),
    (
        13,
        "merchant funds",
        &[Reason::BALANCE_INSUFFICIENT, Reason::BALANCE_PENDING],
    ),
    (
        14,
        "upstream",
        &[
            Reason::HOST_UNREACHABLE,
            Reason::NO_ROUTE,
            Reason::HOST_TIMEOUT,
            Reason::HOST_DECLINED,
        ],
    ),
];

/// Row 12's checks, in order.
const LIMITS: [Reason; 9] = [
    Reason::SINGLE_REFUND_CAP,
    Reason::REFUNDABLE_SHARE,
    Reason::ORIGINAL_REFUND_COUNT,
    Reason::CARD_DAY_AMOUNT,
    Reason::CARD_DAY_COUNT,
    Reason::MERCHANT_DAY_AMOUNT,
    Reason::MERCHANT_MONTH_AMOUNT,
    Reason::MERCHANT_DAY_COUNT,
    Reason::MERCHANT_MONTH_COUNT,
];

/// The trail of `decision` under `policy` as JSON: `checks` (each row with `passed`,
/// `bound` or `not_reached`), `bound_by`, `de54` and the explanation in English and Chinese.
pub fn trail(decision: &Decision, policy: &Policy) -> Value {
    let bound_row = ROWS
        .iter()
        .find(|(_, _, reasons)| reasons.contains(&decision.reason))
        .map(|(n, _, _)| *n);
    let f = &decision.figures;
    let checks: Vec<Value> = ROWS
        .iter()
        .map(|(n, name, _)| {
            let status = match bound_row {
                Some(b) if *n == b => "bound",
                Some(b) if *n > b => "not_reached",
                _ => "passed",
            };
            let mut row = json!({ "row": n, "check": name, "status": status });
            if *n == 12 {
                row["limits"] = limits(policy, decision, status);
            }
            if status == "bound" {
                row["reason"] = json!(decision.reason.as_str());
                row["figures"] = json!({
                    "amount": f.amount, "limit": f.limit, "used": f.used,
                    "remaining": f.remaining, "window_days": f.window_days,
                });
            }
            row
        })
        .collect();
    let e = explain::explain(decision);
    json!({
        "outcome": if decision.is_approved() { "approved" } else { "declined" },
        "reason": decision.reason.as_str(),
        "code_iso": e.code_iso,
        "code_cup": e.code_cup,
        "bound_by": bound_row,
        "checks": checks,
        "de54": decision.de54(),
        "de54_blocks": {
            "90_original_remaining": f.original_amount.and(f.original_remaining),
            "91_allowance": f.day_allowance_remaining,
            "92_would_pass": f.would_pass,
        },
        "explain": { "en": e.en, "zh": e.zh },
    })
}

/// Row 12's checks with the policy's caps; the one that bound is marked.
fn limits(p: &Policy, d: &Decision, row: &str) -> Value {
    let caps: [Option<u64>; 9] = [
        p.refund_single_max,
        Some(u64::from(p.refundable_share_percent)),
        p.original_refund_count_max.map(u64::from),
        p.card_refund_day_amount_max,
        p.card_refund_day_count_max.map(u64::from),
        p.refund_day_amount_max,
        p.refund_month_amount_max,
        p.refund_day_count_max.map(u64::from),
        p.refund_month_count_max.map(u64::from),
    ];
    let bound = LIMITS.iter().position(|r| *r == d.reason);
    LIMITS
        .iter()
        .zip(caps)
        .enumerate()
        .map(|(i, (r, cap))| {
            let status = match (row, bound) {
                ("bound", Some(b)) if i == b => "bound",
                ("bound", Some(b)) if i > b => "not_reached",
                ("not_reached", _) => "not_reached",
                _ => "passed",
            };
            let mut v = json!({ "check": r.as_str(), "policy": cap, "status": status });
            if status == "bound" {
                v["limit"] = json!(d.figures.limit);
                v["used"] = json!(d.figures.used);
                v["remaining"] = json!(d.figures.remaining);
            }
            v
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ledger::Figures;

    #[test]
    fn a_cap_decline_binds_row_12_at_its_own_check_and_nothing_after_is_reached() {
        let d = Decision::new(
            Reason::MERCHANT_DAY_AMOUNT,
            Figures {
                amount: 700,
                currency: 840,
                limit: Some(1000),
                used: Some(500),
                remaining: Some(500),
                ..Figures::default()
            },
        );
        let t = trail(&d, &Policy::default());
        assert_eq!(t["bound_by"], 12);
        let checks = t["checks"].as_array().unwrap();
        assert_eq!(checks[10]["status"], "passed");
        assert_eq!(checks[11]["status"], "bound");
        assert_eq!(checks[12]["status"], "not_reached");
        let limits = checks[11]["limits"].as_array().unwrap();
        assert_eq!(limits[4]["status"], "passed");
        assert_eq!(limits[5]["status"], "bound");
        assert_eq!(limits[5]["remaining"], 500);
        assert_eq!(limits[6]["status"], "not_reached");
        assert!(t["explain"]["zh"].as_str().unwrap().chars().count() > 3);
    }

    #[test]
    fn an_approval_passes_every_check() {
        let t = trail(&Decision::bare(Reason::APPROVED), &Policy::default());
        assert!(t["bound_by"].is_null());
        assert!(t["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "passed"));
    }
}
