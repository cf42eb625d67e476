//! Policy what-if replay (issue 22): the requests of a journal decided again on a ledger whose
//! policies differ, each new outcome applied so that later decisions see the changed state.
//!
//! A journaled request is rebuilt from its event: approved sales, refunds, voids and
//! reversals from their records, declines from the [`RequestSummary`] they carry (event
//! version 3). It is checked by the same [`Book::check`] as a live request, with the PAN hash
//! and the original taken from the journal instead of the wire (the clear PAN and the hash
//! key are never needed). What no policy knob decides is kept as journaled:
//!
//! - an upstream host's answer: a request the what-if policy passes gets the host's journaled
//!   decline again (the host is not asked); one it declines is declined locally;
//! - a settlement's reconciliation (the 0500's totals are not journaled) and declines
//!   written before version 3 (no summary);
//! - sign-ons, top-ups, cut-overs and terminal switches, applied as they happened;
//!   settlements close the same batches, with the payout of this ledger's own state.

use super::book::{Book, Ctx, Refusal, Replayed};
use super::decision::{Decision, Operation, OriginalRef, Request};
use super::event::{
    AdminAction, AdminChange, AnswerKey, EventBody, LedgerEvent, OriginalSummary, TxnKey, TxnRecord,
};
use super::merchants::Policy;
use super::originals::TAG_CUP;
use super::reason::{Dialect, Reason};
use super::{Ledger, MerchantId, Refused};
use crate::clock::UnixSeconds;

/// What replaying one journal event on a what-if ledger gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redone {
    /// A request decided again under the policy in force here: the new answer.
    Decided(Decision),
    /// A request whose journaled answer stands (an upstream host's answer, a settlement's
    /// reconciliation, or a decline journaled without its request): that answer.
    Kept(Decision),
    /// Not a request (sign-on, top-up, settlement, policy, operator change): applied.
    Applied,
}

/// Reasons only an upstream host gives: replay cannot ask it again.
const HOST_REASONS: [Reason; 4] = [
    Reason::HOST_DECLINED,
    Reason::HOST_UNREACHABLE,
    Reason::NO_ROUTE,
    Reason::HOST_TIMEOUT,
];

/// One journaled request, rebuilt.
struct Job<'a> {
    op: Operation,
    cup: bool,
    answer: &'a AnswerKey,
    /// The request's own record (absent for an approved reversal).
    txn: Option<&'a TxnRecord>,
    /// Reversals: the transaction undone.
    target: Option<TxnKey>,
    original: Option<OriginalSummary>,
    amount: u64,
    currency: u16,
    /// The journaled decline to keep if the what-if policy passes the request (host answers).
    keep_if_passed: Option<&'a EventBody>,
}

impl Ledger {
    /// Puts `policy` in force for `merchant` without journaling anything: for a what-if
    /// ledger that is never written back.
    pub fn set_policy_unlogged(&self, merchant: &str, policy: Policy) -> Result<(), Refused> {
        let mut book = self.book_mut(merchant)?;
        book.policy = policy;
        Ok(())
    }

    /// The policy in force for `merchant`.
    pub fn policy(&self, merchant: &str) -> Option<Policy> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        Some(book.policy.clone())
    }

    /// The currency (DE49) of `merchant`'s policy in force.
    pub fn currency(&self, merchant: &MerchantId) -> Option<u16> {
        self.books.get(merchant).map(|b| b.policy.currency)
    }

    /// Replays `event` on this (what-if) ledger: a request is decided again under the policy
    /// in force here and its new outcome applied; anything else is applied as journaled (see
    /// the module documentation). `currency` is the request's DE49, for the approved requests
    /// whose events do not carry it: the currency of the policy they were decided under.
    pub fn redo(&self, event: &LedgerEvent, currency: u16) -> Result<Redone, Refused> {
        let mut book = self
            .books
            .get_mut(&event.merchant)
            .ok_or(Refused(Reason::UNKNOWN_MERCHANT))?;
        let at = event.at;
        let cup = |tag: u32| tag & TAG_CUP != 0;
        let job = match &event.body {
            EventBody::Sale { answer, txn } => Job {
                op: Operation::Sale,
                cup: cup(txn.key.tag),
                answer,
                txn: Some(txn),
                target: None,
                original: None,
                amount: txn.amount,
                currency,
                keep_if_passed: None,
            },
            EventBody::Refund {
                answer,
                txn,
                original,
            }
            | EventBody::Void {
                answer,
                txn,
                original,
            } => Job {
                op: if matches!(event.body, EventBody::Void { .. }) {
                    Operation::Void
                } else {
                    Operation::Refund
                },
                cup: cup(txn.key.tag),
                answer,
                txn: Some(txn),
                target: None,
                original: Some(OriginalSummary::Found(*original)),
                amount: txn.amount,
                currency,
                keep_if_passed: None,
            },
            EventBody::Reversal { answer, target } => Job {
                op: Operation::Reversal,
                cup: cup(target.tag),
                answer,
                txn: None,
                target: Some(*target),
                original: None,
                // Not journaled; any valid amount passes row 6 as the original one did.
                amount: 1,
                currency,
                keep_if_passed: None,
            },
            EventBody::Declined {
                answer,
                decision,
                request: Some(r),
                ..
            } if r.op != Operation::Settlement => Job {
                op: r.op,
                cup: r.cup,
                answer,
                txn: Some(&r.txn),
                target: None,
                original: r.original,
                amount: r.txn.amount,
                currency: r.currency,
                keep_if_passed: HOST_REASONS
                    .contains(&decision.reason)
                    .then_some(&event.body),
            },
            EventBody::Declined { .. } => return Ok(Redone::Kept(book.apply(at, &event.body))),
            other => {
                let body = recomputed(&book, other);
                book.apply(at, body.as_ref().unwrap_or(other));
                return Ok(Redone::Applied);
            }
        };
        Ok(decide(&mut book, &job, at))
    }
}

/// A settlement's event with the payout of this book's own state (what-if decisions change
/// what a batch holds); `None` for every other event.
fn recomputed(book: &Book, body: &EventBody) -> Option<EventBody> {
    match body {
        EventBody::Settle { .. } => Some(book.settle_body()),
        EventBody::ScheduledCutover { day, .. } => match book.settle_body() {
            EventBody::Settle {
                payout,
                reserve_used,
            } => Some(EventBody::ScheduledCutover {
                day: *day,
                payout,
                reserve_used,
            }),
            _ => None,
        },
        EventBody::SettleBatch { answer, .. } => {
            let (payout, reserve_used) =
                book.terminal_payout(book.term_index(answer.terminal.as_str())?);
            Some(EventBody::SettleBatch {
                answer: *answer,
                payout,
                reserve_used,
            })
        }
        EventBody::Admin(change) => {
            let action = match change.action {
                AdminAction::Settle { .. } => match book.settle_body() {
                    EventBody::Settle {
                        payout,
                        reserve_used,
                    } => AdminAction::Settle {
                        payout,
                        reserve_used,
                    },
                    _ => return None,
                },
                AdminAction::SettleTerminal { terminal, .. } => {
                    let (payout, reserve_used) =
                        book.terminal_payout(book.term_index(terminal.as_str())?);
                    AdminAction::SettleTerminal {
                        terminal,
                        payout,
                        reserve_used,
                    }
                }
                _ => return None,
            };
            Some(EventBody::Admin(Box::new(AdminChange {
                action,
                ..**change
            })))
        }
        _ => None,
    }
}

/// Checks `job` as a live request would be checked and applies the outcome.
fn decide(book: &mut Book, job: &Job<'_>, at: UnixSeconds) -> Redone {
    let merchant = book.id;
    let terminal = job.answer.terminal;
    let term = book.term_index(terminal.as_str());
    let own = job.txn.map(|t| t.key).or(job.target);
    let tag = own.map_or(0, |k| k.tag);
    let original = match (job.op, job.target, job.original) {
        // An ascii reversal names what it undoes by DE90: stan and DE7 are what count.
        (Operation::Reversal, Some(t), _) => Some(OriginalRef::Iso {
            mti: 200,
            stan: t.stan,
            transmission: u64::from(t.tag),
            rrn: None,
        }),
        (
            _,
            _,
            Some(OriginalSummary::Iso {
                mti,
                stan,
                transmission,
                ..
            }),
        ) => Some(OriginalRef::Iso {
            mti,
            stan,
            transmission,
            rrn: None,
        }),
        (
            _,
            _,
            Some(OriginalSummary::Cup {
                batch,
                trace,
                date_mmdd,
                ..
            }),
        ) => Some(OriginalRef::Cup {
            batch,
            trace,
            date_mmdd,
            rrn: None,
        }),
        _ => None,
    };
    let req = Request {
        dialect: if job.cup {
            Dialect::CupPos
        } else {
            Dialect::Ascii1987
        },
        op: job.op,
        repeat: false,
        merchant: merchant.as_str(),
        terminal: terminal.as_str(),
        stan: job.answer.stan,
        local_date_mmdd: job.answer.mmdd,
        mti_class: job.answer.class,
        transmission: (!job.cup && own.is_some()).then_some(u64::from(tag)),
        rrn: None,
        batch: (job.cup && own.is_some()).then_some(tag & !TAG_CUP),
        pan: "",
        amount_minor: job.amount,
        currency: job.currency,
        card_type: job.txn.map_or(super::money::CardType::Other, |t| t.card),
        original,
        body_fingerprint: job.answer.fingerprint,
    };
    let ctx = Ctx {
        now: at,
        today: book.policy.utc_offset.local(at),
        pan: job.txn.map(|t| t.pan).unwrap_or_default(),
        pan_hash: job.txn.map_or(0, |t| t.pan_hash),
        store_ok: true,
        totals: None,
        replayed: Some(Replayed {
            rrn: job.txn.and_then(|t| t.rrn),
            original: match (term, &job.original) {
                (Some(term), Some(o)) => book.resolve(o, term),
                _ => None,
            },
        }),
    };
    match book.check(&req, &ctx) {
        Ok((body, hold)) => {
            book.release(&hold);
            match job.keep_if_passed {
                Some(journaled) => Redone::Kept(book.apply(at, journaled)),
                None => Redone::Decided(book.commit(at, &body)),
            }
        }
        Err(Refusal::Decline(decision, answer, request)) => {
            let body = EventBody::Declined {
                answer,
                decision,
                sale: None,
                request: Some(request),
            };
            book.apply(at, &body);
            Redone::Decided(decision)
        }
        Err(Refusal::Stored(d) | Refusal::Bare(d)) => Redone::Decided(d),
    }
}
