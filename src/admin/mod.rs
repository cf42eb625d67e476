//! The authenticated admin API (issue 22): JSON over the admin HTTP server.
//!
//! [`AdminApi::handle`] takes a method, a request target, headers and a body and returns a
//! status and a JSON body: no sockets, so it is unit-tested and fuzzed directly; the hyper
//! server in `server/admin.rs` only moves bytes. `/metrics`, `/healthz` and `/readyz` stay
//! open there; every path under `/v1/` needs `Authorization: Bearer <token>`.
//!
//! Without `admin.token_file` nobody can call the API: every `/v1/` request answers 403 and
//! says why (a gateway is never left with an open mutation endpoint by omission). A missing
//! or wrong token answers 401.
//!
//! Mutations (`POST`) need an `Idempotency-Key` header (or `"request_id"` in the body): the
//! change is journaled with that id, who asked (token identity and peer) and when; a repeat
//! of the id returns the stored result (`"repeat": true`) and changes nothing, also after a
//! restart; the same id with another change answers 409.
//!
//! Endpoints (merchant and terminal ids percent-encoded, e.g. `MERCHANT%20000001`):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/merchants` | merchant ids |
//! | GET | `/v1/merchants/{m}[?card_rrn=R]` | policy, funds, usage (and the day usage of the card that paid sale R), terminals, operators' changes |
//! | GET | `/v1/merchants/{m}/transactions?rrn=R` | a sale by RRN, its answer and trail |
//! | GET | `/v1/merchants/{m}/transactions?terminal=T&stan=N&date=MMDD[&class=2]` | a request by key |
//! | GET | `/v1/merchants/{m}/would-pass?terminal=T&(rrn=R \| stan=N&transmission=MMDDhhmmss \| batch=B&trace=N[&date=MMDD])[&asking=T2]` | what would pass now |
//! | POST | `/v1/merchants/{m}/top-up` `{"amount": N}` | add to the reserve |
//! | POST | `/v1/merchants/{m}/settle` `{}` or `{"terminal": "T"}` | settle the merchant, or close one batch |
//! | POST | `/v1/merchants/{m}/terminals/{t}/refunds` `{"enabled": bool}` | refund switch |
//! | GET | `/v1/exceptions` | reversals not applied, SAF dead letters, upstream links |
//! | POST | `/v1/saf/dead-letters/{id}/retry` | a dead letter back in the SAF queue (sent as a repeat) |

pub mod auth;
pub mod trail;

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::clock::UnixSeconds;
use crate::flow::{AdminChangeError, Gateway};
use crate::ledger::{
    AdminAction, AdminId, AdminIntent, AdminRecord, Decision, Looked, OriginalRef, Policy, Reason,
    TxnView, WouldPass,
};
pub use auth::Tokens;

/// Largest request body the admin API reads.
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// Longest request id (`Idempotency-Key`).
pub const REQUEST_ID_LEN_MAX: usize = 64;

/// An answer of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON text.
    pub body: String,
}

/// The admin API over one gateway.
pub struct AdminApi {
    gateway: Arc<Gateway>,
    tokens: Tokens,
    /// The merchant file `POST /v1/reload` reads (`None`: the embedded sample set).
    merchants_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// A parsed request target: path segments (percent-decoded) and query pairs.
struct Target {
    segments: Vec<String>,
    query: Vec<(String, String)>,
}

impl Target {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl AdminApi {
    /// The API of `gateway`, callable with `tokens`.
    pub fn new(gateway: Arc<Gateway>, tokens: Tokens) -> AdminApi {
        AdminApi {
            gateway,
            tokens,
            merchants_file: None,
        }
    }

    /// The same API reloading `path` on `POST /v1/reload`.
    pub fn with_merchants_file(mut self, path: Option<std::path::PathBuf>) -> AdminApi {
        self.merchants_file = path;
        self
    }

    /// Answers one request. `target` is the path with its query; `headers` are (name,
    /// value) pairs, names in any case; `peer` is who connected (journaled with changes).
    pub async fn handle(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        peer: Option<IpAddr>,
    ) -> Reply {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        // Authentication comes before anything of the request is parsed (fuzz finding: a
        // bad escape under /v1/ answered 400 to a caller without a token).
        let path = target.split('?').next().unwrap_or("");
        if path != "/v1" && !path.starts_with("/v1/") {
            return error(404, "not found");
        }
        if self.tokens.is_empty() {
            return error(
                403,
                "admin API disabled: no admin.token_file is configured (only /metrics, /healthz and /readyz are open)",
            );
        }
        let Some(identity) = self.tokens.identify(header("authorization")) else {
            return error(401, "missing or unknown bearer token");
        };
        let Some(t) = parse_target(target) else {
            return error(400, "bad request target");
        };
        if body.len() > BODY_BYTES_MAX {
            return error(413, "body too large");
        }
        let segs: Vec<&str> = t.segments.iter().skip(1).map(String::as_str).collect();
        match (method, segs.as_slice()) {
            ("GET", ["merchants"]) => self.merchants(),
            ("GET", ["merchants", m]) => self.merchant(m, &t),
            ("GET", ["merchants", m, "transactions"]) => self.transaction(m, &t),
            ("GET", ["merchants", m, "would-pass"]) => self.would_pass(m, &t),
            ("GET", ["exceptions"]) => self.exceptions(),
            ("POST", ["reload"]) => {
                let who = format!(
                    "{identity}@{}",
                    peer.map_or_else(|| "-".to_string(), |p| p.to_string())
                );
                self.reload(&who).await
            }
            ("POST", ["saf", "dead-letters", id, "retry"]) => self.retry_dead(id).await,
            ("POST", ["merchants", m, action @ ..]) => {
                let who = format!(
                    "{identity}@{}",
                    peer.map_or_else(|| "-".to_string(), |p| p.to_string())
                );
                self.mutate(m, action, header("idempotency-key"), body, &who)
                    .await
            }
            (_, ["merchants", ..] | ["exceptions"] | ["reload"] | ["saf", ..]) => {
                error(405, "method not allowed")
            }
            _ => error(404, "not found"),
        }
    }

    fn merchants(&self) -> Reply {
        let ids: Vec<&str> = self.gateway.ledger().merchant_ids().collect();
        ok(json!({ "merchants": ids }))
    }

    fn merchant(&self, merchant: &str, t: &Target) -> Reply {
        let now = self.gateway.now();
        let ledger = self.gateway.ledger();
        let Some(v) = ledger.merchant_view(merchant, now) else {
            return error(404, "unknown merchant");
        };
        let p = &v.policy;
        let left = |cap: Option<u64>, used: u64| cap.map(|c| c.saturating_sub(used));
        // Per card on request: the card is named by one of its sales, never by its PAN.
        let card = match t.param("card_rrn") {
            None => Value::Null,
            Some(rrn) => match ledger.card_usage(merchant, rrn, now) {
                Some(c) => json!({
                    "rrn": rrn, "pan": c.pan.to_string(),
                    "day": {
                        "amount": c.day_amount, "count": c.day_count,
                        "amount_remaining": left(c.day_amount_max, c.day_amount),
                        "count_remaining": left(c.day_count_max, c.day_count),
                    },
                }),
                None => return error(404, "no sale with this rrn remembered"),
            },
        };
        let terminals: Vec<Value> = v
            .terminals
            .iter()
            .map(|t| {
                json!({
                    "id": t.id.as_str(), "refund_enabled": t.refund_enabled,
                    "signed_on": t.signed_on, "batch": t.batch, "open_batch_totals": t.totals,
                })
            })
            .collect();
        let u = &v.usage;
        let f = &v.funds;
        ok(json!({
            "merchant": merchant,
            "now_local": local_time(now, p),
            "policy": policy_json(p),
            "usage": {
                "day": {
                    "amount": u.day_amount, "count": u.day_count,
                    "amount_remaining": left(p.refund_day_amount_max, u.day_amount),
                    "count_remaining": left(p.refund_day_count_max.map(u64::from), u64::from(u.day_count)),
                    "in_flight_amount": v.held_day.0, "in_flight_count": v.held_day.1,
                },
                "month": {
                    "amount": u.month_amount, "count": u.month_count,
                    "amount_remaining": left(p.refund_month_amount_max, u.month_amount),
                    "count_remaining": left(p.refund_month_count_max.map(u64::from), u64::from(u.month_count)),
                },
                "card": card,
            },
            "funds": {
                "equation": "available = reserve + unsettled_sales - refunds_committed - refunds_reserved",
                "reserve": f.reserve, "unsettled_sales": f.unsettled_sales,
                "refunds_committed": f.refunds_committed, "refunds_reserved": f.refunds_reserved,
                "sales_pending": f.sales_pending, "available": f.available,
            },
            "policy_version": ledger_policy_version(&self.gateway, merchant),
            "cutover_running": v.cutover,
            "reversals_not_applied": u.reversals_not_applied,
            "reversal_noops": u.reversal_noops,
            "remembered_transactions": u.entries,
            "terminals": terminals,
            "admin_changes": v.admin_changes.iter().map(|r| record_json(r, p, false)).collect::<Vec<_>>(),
        }))
    }

    fn transaction(&self, merchant: &str, t: &Target) -> Reply {
        let ledger = self.gateway.ledger();
        let Some(view) = ledger.merchant_view(merchant, self.gateway.now()) else {
            return error(404, "unknown merchant");
        };
        let looked = if let Some(rrn) = t.param("rrn") {
            ledger.transaction_by_rrn(merchant, rrn)
        } else {
            let (Some(terminal), Some(stan), Some(date)) = (
                t.param("terminal"),
                t.param("stan").and_then(|s| s.parse::<u32>().ok()),
                t.param("date").and_then(|s| s.parse::<u16>().ok()),
            ) else {
                return error(
                    400,
                    "give rrn=RRN, or terminal=T&stan=N&date=MMDD (class=2 by default)",
                );
            };
            let class = match t.param("class").map(str::parse::<u8>) {
                None => 2,
                Some(Ok(c)) if c <= 9 => c,
                Some(_) => return error(400, "class is the MTI class digit 0-9"),
            };
            ledger.transaction_by_key(merchant, terminal, stan, date, class)
        };
        let Some(Looked {
            txn,
            answer,
            policy_version,
        }) = looked
        else {
            return error(404, "no such transaction remembered");
        };
        // The trail reads the policy the answer was decided under, while it is kept.
        let (then, note) = match policy_version {
            Some(v) => match ledger.policy_at(merchant, v) {
                Some(p) => (
                    p,
                    format!("the trail is read against policy version {v}, in force when it was decided"),
                ),
                None => (
                    view.policy.clone(),
                    format!("policy version {v} is no longer kept: the trail is read against the policy in force now"),
                ),
            },
            None => (
                view.policy.clone(),
                "the trail is read against the policy in force now".to_string(),
            ),
        };
        let p = &then;
        ok(json!({
            "merchant": merchant,
            "transaction": txn.map(|x| txn_json(&x, p)),
            "answer": answer.map(|d| answer_json(&d)),
            "trail": answer.map(|d| trail::trail(&d, p)),
            "policy_version": policy_version,
            "policy_note": note,
        }))
    }

    fn would_pass(&self, merchant: &str, t: &Target) -> Reply {
        let Some(terminal) = t.param("terminal") else {
            return error(400, "terminal=T (the sale's terminal) is required");
        };
        let num = |k: &str| t.param(k).and_then(|v| v.parse::<u64>().ok());
        let small = |k: &str| num(k).and_then(|v| u32::try_from(v).ok());
        let reference = if let (Some(stan), Some(tx)) = (small("stan"), small("transmission")) {
            OriginalRef::Iso {
                mti: 200,
                stan,
                transmission: u64::from(tx),
                rrn: t.param("rrn"),
            }
        } else if let (Some(batch), Some(trace)) = (small("batch"), small("trace")) {
            OriginalRef::Cup {
                batch,
                trace,
                date_mmdd: num("date").and_then(|d| u16::try_from(d).ok()),
                rrn: t.param("rrn"),
            }
        } else if let Some(rrn) = t.param("rrn") {
            // No key: a key that matches nothing, so the lookup goes by RRN.
            OriginalRef::Iso {
                mti: 200,
                stan: u32::MAX,
                transmission: 0,
                rrn: Some(rrn),
            }
        } else {
            return error(
                400,
                "name the original: rrn=R, or stan=N&transmission=MMDDhhmmss, or batch=B&trace=N",
            );
        };
        let now = self.gateway.now();
        let ledger = self.gateway.ledger();
        let Some(view) = ledger.merchant_view(merchant, now) else {
            return error(404, "unknown merchant");
        };
        let Some(w) = ledger.would_pass(merchant, terminal, reference, t.param("asking"), now)
        else {
            return error(404, "no such original (or unknown terminal)");
        };
        ok(would_pass_json(merchant, &w, &view.policy, now))
    }

    fn exceptions(&self) -> Reply {
        let ledger = self.gateway.ledger();
        let not_applied: Vec<Value> = ledger
            .merchant_ids()
            .flat_map(|m| {
                ledger.reversals_not_applied(m).into_iter().map(move |o| {
                    json!({
                        "merchant": m, "amount": o.amount, "refunded": o.refunded,
                        "refund_count": o.refund_count, "state": format!("{:?}", o.state),
                        "pan": o.pan.to_string(), "batch": o.batch,
                    })
                })
            })
            .collect();
        let (links, dead) = match self.gateway.upstreams() {
            Some(u) => {
                let links: Vec<Value> = u
                    .links()
                    .map(|l| {
                        json!({
                            "name": l.name(), "up": l.is_up(), "pending": l.pending(),
                            "connects": l.connects(), "late_answers": l.late_answers(),
                        })
                    })
                    .collect();
                let dead: Vec<Value> = u
                    .saf()
                    .dead_letters()
                    .iter()
                    .map(|d| {
                        json!({
                            "id": d.entry.id, "upstream": d.entry.upstream, "mti": d.entry.key.mti,
                            "stan": d.entry.key.stan,
                            "terminal": String::from_utf8_lossy(&d.entry.key.terminal).trim_end(),
                            "reason": format!("{:?}", d.reason), "at": d.at_s, "attempts": d.attempts,
                        })
                    })
                    .collect();
                (Value::Array(links), Value::Array(dead))
            }
            None => (Value::Null, Value::Array(Vec::new())),
        };
        ok(json!({
            "reversals_not_applied": not_applied,
            "saf_dead_letters": dead,
            "upstream_links": links,
            "upstream_note": if links.is_null() { Some("no [[upstreams]] configured") } else { None },
        }))
    }

    /// Puts a store-and-forward dead letter back in the queue (journaled in the SAF journal,
    /// sent as a repeat). Naturally idempotent: a second call finds no such dead letter (404).
    async fn retry_dead(&self, id: &str) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return error(
                400,
                "dead letter id: want a number (GET /v1/exceptions lists them)",
            );
        };
        let Some(u) = self.gateway.upstreams() else {
            return error(404, "no [[upstreams]] configured");
        };
        match u.saf().retry_dead(id).await {
            Ok(true) => ok(json!({ "retried": id })),
            Ok(false) => error(
                404,
                "no such dead letter (never one, already retried or delivered)",
            ),
            Err(e) => error(503, &format!("store-and-forward journal unavailable: {e}")),
        }
    }

    /// Reloads the merchant file: validated whole, refused with its one-line error (the
    /// policies in force stay), else swapped between two decisions. Naturally idempotent: a
    /// repeat finds nothing changed, so no request id is needed.
    async fn reload(&self, who: &str) -> Reply {
        let set = match crate::serve::load_merchants(self.merchants_file.as_deref()) {
            Ok(set) => set,
            Err(why) => return error(422, &why),
        };
        match self.gateway.reload(&set, who).await {
            Ok(changed) => {
                let changed: Vec<Value> = changed
                    .iter()
                    .map(|(m, v)| json!({ "merchant": m, "policy_version": v }))
                    .collect();
                ok(json!({ "reloaded": true, "changed": changed }))
            }
            Err(crate::flow::ReloadFailure::Invalid(why)) => error(422, &why),
            Err(crate::flow::ReloadFailure::Store) => {
                error(503, "journal unavailable: the policies in force stay")
            }
        }
    }

    async fn mutate(
        &self,
        merchant: &str,
        action: &[&str],
        key: Option<&str>,
        body: &[u8],
        who: &str,
    ) -> Reply {
        let doc: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(body) {
                Ok(v @ Value::Object(_)) => v,
                _ => return error(400, "the body is a JSON object"),
            }
        };
        let id = key.or_else(|| doc["request_id"].as_str());
        let Some(request) = id.and_then(request_id) else {
            return error(
                400,
                "an Idempotency-Key header (or \"request_id\") of 1-64 printable characters is required",
            );
        };
        let who = AdminId::new(&who[..who.len().min(REQUEST_ID_LEN_MAX)]).unwrap_or_default();
        let terminal_arg = doc["terminal"].as_str();
        let intent = match action {
            ["top-up"] => match doc["amount"].as_u64() {
                Some(amount) => AdminIntent::TopUp { amount },
                None => return error(400, "amount (minor units, a positive integer) is required"),
            },
            ["settle"] => match terminal_arg {
                Some(terminal) => AdminIntent::SettleTerminal { terminal },
                None if doc.get("terminal").is_some_and(|t| !t.is_null()) => {
                    return error(400, "terminal is a string")
                }
                None => AdminIntent::Settle,
            },
            ["terminals", terminal, "refunds"] => match doc["enabled"].as_bool() {
                Some(enabled) => AdminIntent::TerminalRefunds { terminal, enabled },
                None => return error(400, "enabled (true or false) is required"),
            },
            _ => return error(404, "not found"),
        };
        let policy = match self
            .gateway
            .ledger()
            .merchant_view(merchant, self.gateway.now())
        {
            Some(v) => v.policy,
            None => return error(404, "unknown merchant"),
        };
        match self
            .gateway
            .admin_change(merchant, request, who, intent)
            .await
        {
            Ok(outcome) => {
                let status = if outcome.repeat { 200 } else { 201 };
                reply(
                    status,
                    record_json(&outcome.record, &policy, outcome.repeat),
                )
            }
            Err(AdminChangeError::Refused(r)) => match r {
                Reason::DUPLICATE => error(409, "this request id was used for another change"),
                Reason::UNKNOWN_MERCHANT => error(404, "unknown merchant"),
                Reason::UNKNOWN_TERMINAL => error(404, "unknown terminal"),
                Reason::INVALID_AMOUNT => error(422, "amount must be 1..=999999999999 minor units"),
                other => error(422, other.as_str()),
            },
            Err(AdminChangeError::Store) => error(503, "journal unavailable: nothing was changed"),
        }
    }
}

fn ledger_policy_version(gateway: &Gateway, merchant: &str) -> Option<u32> {
    gateway.ledger().policy_version(merchant).ok()
}

/// A request id: 1–64 printable ASCII characters.
fn request_id(s: &str) -> Option<AdminId> {
    let ok =
        !s.is_empty() && s.len() <= REQUEST_ID_LEN_MAX && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        AdminId::new(s)
    } else {
        None
    }
}

fn parse_target(target: &str) -> Option<Target> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return None;
    }
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect::<Option<Vec<_>>>()?;
    let query = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Target { segments, query })
}

/// `%XX` and `+` (space) decoding; `None` on a bad escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn reply(status: u16, v: Value) -> Reply {
    let mut body = v.to_string();
    body.push('\n');
    Reply { status, body }
}

fn ok(v: Value) -> Reply {
    reply(200, v)
}

fn error(status: u16, message: &str) -> Reply {
    reply(status, json!({ "error": message }))
}

fn policy_json(p: &Policy) -> Value {
    json!({
        "refund_enabled": p.refund_enabled,
        "void_enabled": p.void_enabled,
        "refund_window_days": p.refund_window_days,
        "refund_single_max": p.refund_single_max,
        "refund_day_amount_max": p.refund_day_amount_max,
        "refund_month_amount_max": p.refund_month_amount_max,
        "refund_day_count_max": p.refund_day_count_max,
        "refund_month_count_max": p.refund_month_count_max,
        "card_refund_day_amount_max": p.card_refund_day_amount_max,
        "card_refund_day_count_max": p.card_refund_day_count_max,
        "original_refund_count_max": p.original_refund_count_max,
        "refundable_share_percent": p.refundable_share_percent,
        "same_day_refund": match p.same_day_refund {
            crate::ledger::SameDayRefund::Allow => "allow",
            crate::ledger::SameDayRefund::UseVoid => "use_void",
        },
        "denied_card_types": p.denied_card_types,
        "reserve_configured": p.reserve,
        "utc_offset": offset_text(p.utc_offset.seconds()),
        "currency": p.currency,
        "cutover_at_s": p.cutover_at,
    })
}

fn txn_json(t: &TxnView, p: &Policy) -> Value {
    json!({
        "kind": t.kind, "terminal": t.terminal.as_str(), "stan": t.stan,
        "transmission": (t.transmission != 0).then_some(t.transmission),
        "amount": t.amount, "refunded": t.refunded, "refund_count": t.refund_count,
        "state": format!("{:?}", t.state).to_lowercase(), "pan": t.pan.to_string(),
        "card": t.card, "batch": t.batch, "at": t.at, "at_local": local_time(t.at, p),
    })
}

fn answer_json(d: &Decision) -> Value {
    json!({
        "code_iso": d.de39(crate::ledger::Dialect::Ascii1987),
        "code_cup": d.de39(crate::ledger::Dialect::CupPos),
        "reason": d.de44(),
        "de54": d.de54(),
        "figures": d.figures,
    })
}

fn record_json(r: &AdminRecord, p: &Policy, repeat: bool) -> Value {
    let action = match r.action {
        AdminAction::TopUp { amount } => json!({ "top_up": { "amount": amount } }),
        AdminAction::Settle {
            payout,
            reserve_used,
        } => json!({ "settle": { "payout": payout, "reserve_used": reserve_used } }),
        AdminAction::SettleTerminal {
            terminal,
            payout,
            reserve_used,
        } => json!({ "settle_terminal": {
            "terminal": terminal.as_str(), "payout": payout, "reserve_used": reserve_used } }),
        AdminAction::TerminalRefunds { terminal, enabled } => {
            json!({ "terminal_refunds": { "terminal": terminal.as_str(), "enabled": enabled } })
        }
    };
    json!({
        "request_id": r.request.as_str(),
        "who": r.who.as_str(),
        "at": r.at,
        "at_local": local_time(r.at, p),
        "action": action,
        "result": r.decision.reason.as_str(),
        "repeat": repeat,
    })
}

fn would_pass_json(merchant: &str, w: &WouldPass, p: &Policy, now: UnixSeconds) -> Value {
    let advice = if w.use_void {
        Some("use void instead: a same-day refund of the full amount is answered USE_VOID")
    } else if w.void_would_pass {
        Some("a void of the full amount would also pass now (same day, open batch)")
    } else {
        None
    };
    json!({
        "merchant": merchant,
        "original": txn_json(&w.original, p),
        "terminal": w.terminal.as_str(),
        "now_local": local_time(now, p),
        "would_pass": w.amount,
        "de54_92_would_pass": w.amount,
        "de54_90_original_remaining": w.original_remaining,
        "de54_91_allowance": w.allowance,
        "binding": w.binding.as_str(),
        "binding_explain": {
            "en": crate::explain::explain_reason(w.binding, None).en,
            "zh": crate::explain::explain_reason(w.binding, None).zh,
        },
        "resets_at": w.resets_at,
        "resets_at_local": w.resets_at.map(|t| local_time(t, p)),
        "void_would_pass": w.void_would_pass,
        "use_void_instead": w.use_void,
        "advice": advice,
    })
}

fn offset_text(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let s = seconds.unsigned_abs();
    format!("{sign}{:02}:{:02}", s / 3600, s % 3600 / 60)
}

/// `unix` in the merchant's local time, ISO 8601 with its offset.
fn local_time(unix: UnixSeconds, p: &Policy) -> String {
    let offset = p.utc_offset.seconds();
    let local = unix.saturating_add(i64::from(offset));
    let crate::date::Civil {
        year: y,
        month: m,
        day: d,
    } = crate::date::Civil::from_unix(local);
    let s = local.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{}",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        offset_text(offset)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_percent_decoded_and_bad_escapes_refused() {
        let t = parse_target("/v1/merchants/MERCHANT%20000001/x?rrn=1+2&a").unwrap();
        assert_eq!(t.segments, ["v1", "merchants", "MERCHANT 000001", "x"]);
        assert_eq!(t.param("rrn"), Some("1 2"));
        assert_eq!(t.param("a"), Some(""));
        assert!(parse_target("/v1/%zz").is_none());
        assert!(parse_target("/v1/%ff").is_none());
        assert!(parse_target("v1").is_none());
    }

    /// Fuzz finding (`admin_http`): `/v1/merchanps/MERCHANT%` without a token answered 400
    /// (bad escape) instead of 401: the request was parsed before the caller was known.
    #[test]
    fn a_bad_target_without_a_token_is_401_not_400() {
        let set = crate::ledger::MerchantSet::embedded().unwrap();
        let ledger = crate::ledger::Ledger::new(&set, crate::ledger::PanKey::new(&[7; 16]));
        let gateway = Gateway::new(
            Arc::new(ledger),
            None,
            Arc::new(crate::clock::ManualClock::new(1_769_871_600)),
            Vec::new(),
        );
        let api = AdminApi::new(
            Arc::new(gateway),
            Tokens::parse("ops:0123456789abcdef").unwrap(),
        );
        let run = |target: &str, auth: &[(&str, &str)]| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(api.handle("GET", target, auth, b"", None))
                .status
        };
        assert_eq!(run("/v1/merchanps/MERCHANT%", &[]), 401);
        let auth = [("Authorization", "Bearer 0123456789abcdef")];
        assert_eq!(run("/v1/merchanps/MERCHANT%", &auth), 400);
        assert_eq!(run("/v1/merchants", &auth), 200);
        assert_eq!(run("/v2/merchants", &auth), 404);
    }

    #[test]
    fn local_times_carry_the_merchant_offset() {
        let p = Policy {
            utc_offset: crate::ledger::money::UtcOffset::parse("+08:00").unwrap(),
            ..Policy::default()
        };
        // 2024-02-29T20:00:00Z is 2024-03-01T04:00:00+08:00.
        assert_eq!(local_time(1_709_236_800, &p), "2024-03-01T04:00:00+08:00");
    }
}
