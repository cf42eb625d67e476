//! The sans-IO merchant ledger and refund/void policy engine (DOMAIN §3–§6, §9).
//!
//! The codec turns a wire message into a dialect-neutral [`Request`]; the flow layer calls
//! [`Ledger::reserve`], journals [`Reservation::event`], then [`Ledger::commit`]s (or
//! [`Ledger::release`]s on timeout / store failure, [`Ledger::decline`]s on an upstream
//! decline) and renders the [`Decision`]: DE39 via [`Decision::de39`], DE44 via
//! [`Reason::as_str`], DE54 via [`Decision::de54`]. Callers without I/O use [`Ledger::decide`].
//!
//! Nothing here reads a clock or touches I/O: `now` is passed in. State is sharded per
//! merchant in a [`DashMap`]; every check-and-reserve and every commit runs under the
//! merchant's shard lock, so no interleaving of concurrent requests can push a limit, an
//! original's refundable remainder or the funds past their bound.
//!
//! Durability: every committed change is a [`LedgerEvent`]; [`Ledger::apply`] replays it to
//! the same state (stored answers for repeats included); [`Ledger::snapshot`] /
//! [`Ledger::restore`] bound replay time.
//!
//! # Choices where DOMAIN.md is silent
//!
//! - Sign-on and DE60.2 batch checks apply to `cup_pos` terminals; an ascii terminal is known
//!   once it is in the merchant file, except for a 0500, which needs a sign-on in both
//!   dialects (DOMAIN §9a). Sign-on returns the terminal's current batch; a terminal's 0500
//!   moves that terminal (only) to its next batch, so a terminal that keeps the old batch gets
//!   77 and signs on again. An operator's [`Ledger::settle`] moves every terminal.
//! - Originals are looked up on the request's terminal (DE90 STAN + DE7, or DE61 batch +
//!   trace) and then by RRN across the merchant's terminals; a void must come from the sale's
//!   terminal (otherwise `USE_REFUND`).
//! - A void of a partly refunded sale is `VOID_AMOUNT_MISMATCH` (64): the void amount is the
//!   original amount, which is more than is left. Voids need funds (row 13) like refunds but
//!   do not count against refund limits; the terminal `refund_enabled` switch covers refunds
//!   only, the merchant's `void_enabled` covers voids.
//! - `same_day_refund = "use_void"` answers `USE_VOID` only when a void of the same amount
//!   from this terminal would be approved; otherwise the refund is decided on its merits.
//! - `BALANCE_PENDING` when sales still in flight (reserved, not committed) would cover the
//!   refund; `BALANCE_INSUFFICIENT` otherwise.
//! - Settlement pays out `unsettled − refunds_committed` minus what backs debits in flight;
//!   refunds beyond sales come out of the reserve. A reversal of a settled sale takes its
//!   amount from the reserve.
//! - A reversal that arrives before its original (or for one never seen) leaves a tombstone,
//!   so the original can never apply later (22 `ORIGINAL_REVERSED` if it does arrive). A
//!   reversal of a sale that already has an approved refund or void undoes nothing
//!   (`REVERSAL_NOT_APPLIED`).
//! - Declines are journaled (`Declined`) and stored for repeats; transient ones (96, 90,
//!   `BALANCE_PENDING`, 94) are not stored, so a retry is decided anew.
//! - A terminal 0500 settlement (`Operation::Settlement`) is idempotent by key like any request.
//! - Entries older than `refund_window_days` plus the retry horizon are forgotten.

// `Decision` (~130 bytes, `Copy`) is the declined answer itself; boxing it would allocate on
// every decline of the hot path, so the large `Err` is deliberate.
#![allow(clippy::result_large_err)]

mod book;
pub mod counters;
pub mod decision;
pub mod event;
pub mod hash;
pub mod idempotency;
pub mod inspect;
pub mod merchants;
pub mod money;
pub mod originals;
pub mod reason;
pub mod reload;
#[cfg(feature = "sim-mutations")]
pub mod sim_mutation;
mod snapshot;
pub mod whatif;
pub use snapshot::RestoreError;

use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;

use crate::clock::UnixSeconds;
use book::{Book, Ctx, Hold, Refusal};

pub use decision::{format_de54, BatchTotals, Decision, Figures, Operation, OriginalRef, Request};
pub use event::{
    AdminAction, AdminChange, AdminId, AnswerKey, DecodeError, EventBody, LedgerEvent, MerchantId,
    OriginalSummary, PolicyChange, RequestSummary, TerminalId, TxnKey, TxnRecord,
};
pub use inspect::{
    AdminIntent, AdminOutcome, AdminRecord, CardUsage, Looked, MerchantView, TxnView, WouldPass,
};
pub use merchants::{ConfigError, MerchantConfig, MerchantSet, Policy, SameDayRefund};
pub use money::{CardType, MaskedPan, PanKey};
pub use originals::OriginalState;
pub use reason::{response_code, Dialect, Reason, ResponseCode};
pub use reload::ReloadError;

/// The in-memory ledger of every merchant of a [`MerchantSet`].
pub struct Ledger {
    /// Merchant ids in merchant-file order (snapshots follow it).
    order: Vec<MerchantId>,
    books: DashMap<MerchantId, Book, hash::FastState>,
    pan_key: PanKey,
    store_ok: AtomicBool,
    /// The set it was made from: a rebuild from the journal starts from it again.
    merchants: MerchantSet,
}

/// A check that passed and holds its amounts and counts until [`Ledger::commit`] or
/// [`Ledger::release`]. Dropping it without either leaks the hold until restart.
#[must_use = "a reservation holds limits and funds until committed or released"]
#[derive(Debug)]
pub struct Reservation {
    event: LedgerEvent,
    hold: Hold,
}

impl Reservation {
    /// The change [`Ledger::commit`] will apply; journal it before committing.
    pub fn event(&self) -> &LedgerEvent {
        &self.event
    }
}

/// A merchant's funds (DOMAIN §4), minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Funds {
    /// Prefunded reserve.
    pub reserve: u64,
    /// Sales not yet paid out by a settlement.
    pub unsettled_sales: u64,
    /// Refunds committed since the last settlement.
    pub refunds_committed: u64,
    /// Refunds and voids reserved, not yet committed.
    pub refunds_reserved: u64,
    /// Sales reserved, not yet committed ("in transit").
    pub sales_pending: u64,
    /// `reserve + unsettled_sales − refunds_committed − refunds_reserved` (never below 0).
    pub available: u64,
}

/// A merchant's committed refund usage in the periods containing `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Refund amount today (merchant-local).
    pub day_amount: u64,
    /// Refunds today.
    pub day_count: u32,
    /// Refund amount this month.
    pub month_amount: u64,
    /// Refunds this month.
    pub month_count: u32,
    /// Reversals answered 00 with nothing to undo (DOMAIN §9).
    pub reversal_noops: u64,
    /// Reversals of sales that already had an approved refund or void: nothing was undone
    /// (DOMAIN §9, `REVERSAL_NOT_APPLIED`).
    pub reversals_not_applied: u64,
    /// Remembered transactions (sales, refunds, voids, tombstones).
    pub entries: usize,
}

/// What the ledger remembers of a transaction (no PAN in clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalView {
    /// Amount.
    pub amount: u64,
    /// Approved refunds so far.
    pub refunded: u64,
    /// Approved refunds count.
    pub refund_count: u16,
    /// State.
    pub state: OriginalState,
    /// Masked PAN.
    pub pan: MaskedPan,
    /// Card scheme.
    pub card: CardType,
    /// Batch (cup).
    pub batch: u32,
}

/// What a logged decision did.
#[derive(Debug)]
pub enum Logged<E> {
    /// Nothing was journaled or applied: a stored answer, or a refusal that is not
    /// remembered. Send it once the journal is durable up to `after` (0: at once) — a stored
    /// answer may stand for an event not yet synced.
    Unlogged {
        /// The answer.
        decision: Decision,
        /// Journal position the answer depends on.
        after: u64,
    },
    /// The event went to the journal at `seq` and was applied; send once `seq` is durable.
    Applied {
        /// The answer.
        decision: Decision,
        /// The event's journal position.
        seq: u64,
    },
    /// The journal refused the event: nothing was applied (answer 96).
    Failed(E),
}

impl<E> Logged<E> {
    /// The answer, whatever happened to the event (`None` when the journal refused it).
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Logged::Unlogged { decision, .. } | Logged::Applied { decision, .. } => Some(decision),
            Logged::Failed(_) => None,
        }
    }
}

impl<E> Logged<E> {
    /// The same outcome with the journal's error mapped by `f`.
    pub fn map_err<F>(self, f: impl FnOnce(E) -> F) -> Logged<F> {
        match self {
            Logged::Unlogged { decision, after } => Logged::Unlogged { decision, after },
            Logged::Applied { decision, seq } => Logged::Applied { decision, seq },
            Logged::Failed(e) => Logged::Failed(f(e)),
        }
    }
}

impl Logged<std::convert::Infallible> {
    fn widen<E>(self) -> Logged<E> {
        match self {
            Logged::Unlogged { decision, after } => Logged::Unlogged { decision, after },
            Logged::Applied { decision, seq } => Logged::Applied { decision, seq },
            Logged::Failed(never) => match never {},
        }
    }
}

type BookRef<'a> = dashmap::mapref::one::RefMut<'a, MerchantId, Book>;

fn reservation(book: &Book, now: UnixSeconds, body: EventBody, hold: Hold) -> Reservation {
    let hold = Hold {
        generation: book.generation,
        ..hold
    };
    Reservation {
        event: LedgerEvent {
            merchant: book.id,
            at: now,
            body,
        },
        hold,
    }
}

/// The log of callers without a journal.
fn unlogged(_: &LedgerEvent) -> Result<u64, std::convert::Infallible> {
    Ok(0)
}

/// Hands `event` to `log` and applies it if `log` took it (`fresh`: the event of a
/// reservation whose key was held, so no stored answer can exist).
fn apply_logged<E>(
    book: &mut Book,
    event: &LedgerEvent,
    fresh: bool,
    log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
) -> Logged<E> {
    match log(event) {
        Ok(seq) => {
            book.last_logged = seq;
            let decision = if fresh {
                book.commit(event.at, &event.body)
            } else {
                book.apply(event.at, &event.body)
            };
            Logged::Applied { decision, seq }
        }
        Err(e) => Logged::Failed(e),
    }
}

/// Drops a run's logger, then its shard (see [`Ledger::try_decide_run_logged`]).
fn release<L>(held: Option<(BookRef<'_>, L)>) {
    if let Some((book, log)) = held {
        drop(log);
        drop(book);
    }
}

/// Decides `req` on its merchant's `book` and applies the outcome once `log` took its event.
fn decide_in<E>(
    book: &mut Book,
    req: &Request<'_>,
    ctx: &Ctx,
    log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
) -> Logged<E> {
    match book.check(req, ctx) {
        Ok((body, hold)) => {
            book.release(&hold);
            let event = LedgerEvent {
                merchant: book.id,
                at: ctx.now,
                body,
            };
            apply_logged(book, &event, true, log)
        }
        Err(refusal) => refused(book, refusal, ctx.now, log),
    }
}

/// What a refused check answers; a decline to remember is journaled and applied.
fn refused<E>(
    book: &mut Book,
    refusal: Refusal,
    now: UnixSeconds,
    log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
) -> Logged<E> {
    match refusal {
        Refusal::Stored(decision) => Logged::Unlogged {
            decision,
            after: book.last_logged,
        },
        Refusal::Bare(decision) => Logged::Unlogged { decision, after: 0 },
        Refusal::Decline(decision, answer, request) => {
            let event = LedgerEvent {
                merchant: book.id,
                at: now,
                body: EventBody::Declined {
                    answer,
                    decision,
                    sale: None,
                    request: Some(request),
                },
            };
            apply_logged(book, &event, false, log)
        }
    }
}

/// A library call named a merchant or terminal the set does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub Reason);

impl Ledger {
    /// An empty ledger for `merchants`; PAN hashes use `pan_key`.
    pub fn new(merchants: &MerchantSet, pan_key: PanKey) -> Ledger {
        let books = DashMap::with_hasher(hash::FastState::default());
        let mut order = Vec::with_capacity(merchants.merchants.len());
        for m in &merchants.merchants {
            let Some(book) = Book::new(m) else {
                continue;
            };
            order.push(book.id);
            books.insert(book.id, book);
        }
        Ledger {
            order,
            books,
            pan_key,
            store_ok: AtomicBool::new(true),
            merchants: merchants.clone(),
        }
    }

    /// The merchant set and PAN key this ledger was made with, to rebuild it from a
    /// snapshot and the journal.
    pub fn origin(&self) -> (&MerchantSet, PanKey) {
        (&self.merchants, self.pan_key.clone())
    }

    /// Tells the ledger whether the journal can take writes; while not, requests get 96
    /// (`STORE_UNAVAILABLE`, DOMAIN §5 row 5).
    pub fn set_store_available(&self, ok: bool) {
        self.store_ok.store(ok, Ordering::SeqCst);
    }

    /// Checks `req` in the order of DOMAIN §5 rows 1 (what the ledger can see of it) and
    /// 3–13 and, when it passes, reserves what it needs. A repeat or identical
    /// retransmission gets its stored answer as `Err` (and moves nothing). A decline is
    /// remembered in memory only: callers with a journal use [`Ledger::reserve_logged`].
    pub fn reserve(&self, req: &Request<'_>, now: UnixSeconds) -> Result<Reservation, Decision> {
        let (mut book, ctx) = self.book_for(req, now).map_err(|refused| match refused {
            Logged::Unlogged { decision, .. } | Logged::Applied { decision, .. } => decision,
            Logged::Failed(never) => match never {},
        })?;
        match book.check(req, &ctx) {
            Ok((body, hold)) => Ok(reservation(&book, now, body, hold)),
            Err(Refusal::Stored(d) | Refusal::Bare(d)) => Err(d),
            Err(Refusal::Decline(d, answer, _)) => {
                book.remember_unlogged(&answer, now, &d);
                Err(d)
            }
        }
    }

    /// [`Ledger::reserve`] for callers with a journal: a decline to remember is handed to
    /// `log` and applied (as `Declined`) under the merchant's shard, in journal order.
    pub fn reserve_logged<E>(
        &self,
        req: &Request<'_>,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<Reservation, Logged<E>> {
        let (mut book, ctx) = self.book_for(req, now).map_err(Logged::widen)?;
        match book.check(req, &ctx) {
            Ok((body, hold)) => Ok(reservation(&book, now, body, hold)),
            Err(refusal) => Err(refused(&mut book, refusal, now, log)),
        }
    }

    /// Decides `req` and applies the outcome in one step under the merchant's shard: the
    /// event (an approval, or a decline to remember for repeats) goes to `log` first, and is
    /// applied only if `log` took it. So the ledger changes in exactly the order of the
    /// journal, and replay rebuilds the live state (DOMAIN §7).
    pub fn decide_logged<E>(
        &self,
        req: &Request<'_>,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        self.decide_with(req, None, now, log)
    }

    /// Settles the open batch of the request's terminal (a 0500, DOMAIN §9a) through `log`,
    /// like [`Ledger::decide_logged`]: only a configured terminal that signed on may settle
    /// (03 / CUP 97 otherwise; CUP 77 on a stale batch); when the request carries `totals`
    /// that differ from the gateway's the answer is 95 `RECONCILE_ERROR` and the batch stays
    /// open; a repeat gets the stored answer.
    pub fn settle_batch_logged<E>(
        &self,
        req: &Request<'_>,
        totals: Option<BatchTotals>,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        self.decide_with(req, totals, now, log)
    }

    /// [`Ledger::settle_batch_logged`] for callers without a journal.
    pub fn settle_batch(
        &self,
        req: &Request<'_>,
        totals: Option<BatchTotals>,
        now: UnixSeconds,
    ) -> Decision {
        match self.decide_with(req, totals, now, unlogged) {
            Logged::Unlogged { decision, .. } | Logged::Applied { decision, .. } => decision,
            Logged::Failed(never) => match never {},
        }
    }

    /// The gateway's totals of a terminal's open batch (DOMAIN §9a).
    pub fn batch_totals(&self, merchant: &str, terminal: &str) -> Option<BatchTotals> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        Some(book.batch_totals(book.term_index(terminal)?))
    }

    fn decide_with<E>(
        &self,
        req: &Request<'_>,
        totals: Option<BatchTotals>,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        let (mut book, mut ctx) = match self.book_for(req, now) {
            Ok(b) => b,
            Err(refusal) => return refusal.widen(),
        };
        ctx.totals = totals;
        decide_in(&mut book, req, &ctx, log)
    }

    /// [`Ledger::decide_logged`] for several requests, decided and logged in order; pushes one
    /// answer per request it decides to `out`. A run of consecutive requests to one merchant is
    /// decided under one hold of its shard, with one logger made by `logger` for that run: the
    /// logger may keep a lock across its calls (the journal's queue: see `Journal::appender`),
    /// since it is dropped before the shard is released and before any other shard is taken
    /// (the shard's lock always first). Never holds two shards at once.
    ///
    /// Never waits for a shard either: it stops at a request whose merchant's shard another
    /// thread holds and returns how many of `reqs` it decided (all of them unless a shard was
    /// busy). The caller does other work and calls again with the rest, so the answers keep
    /// the request order. (A connection thread that waited on the lock could serve none of
    /// its other connections meanwhile.)
    pub fn try_decide_run_logged<E, L>(
        &self,
        reqs: &[Request<'_>],
        now: UnixSeconds,
        mut logger: impl FnMut() -> L,
        out: &mut Vec<Logged<E>>,
    ) -> usize
    where
        L: FnMut(&LedgerEvent) -> Result<u64, E>,
    {
        let mut held: Option<(BookRef<'_>, L)> = None;
        for (i, req) in reqs.iter().enumerate() {
            let (id, pan, pan_hash) = match self.prepare(req) {
                Ok(p) => p,
                Err(refusal) => {
                    out.push(refusal.widen());
                    continue;
                }
            };
            if held.as_ref().is_none_or(|(b, _)| *b.key() != id) {
                release(held.take());
                let book = match self.books.try_get_mut(&id) {
                    dashmap::try_result::TryResult::Present(book) => Some(book),
                    dashmap::try_result::TryResult::Absent => None,
                    dashmap::try_result::TryResult::Locked => return i,
                };
                held = book.map(|b| (b, logger()));
            }
            let Some((book, log)) = held.as_mut() else {
                out.push(Logged::Unlogged {
                    decision: Decision::bare(Reason::UNKNOWN_MERCHANT),
                    after: 0,
                });
                continue;
            };
            let ctx = self.ctx(book, pan, pan_hash, now);
            out.push(decide_in(book, req, &ctx, &mut *log));
        }
        release(held);
        reqs.len()
    }

    /// What a request needs before its merchant's shard is taken: its merchant, masked PAN
    /// and PAN hash; the bare refusal of a malformed request or an unknown merchant id.
    fn prepare(
        &self,
        req: &Request<'_>,
    ) -> Result<(MerchantId, MaskedPan, u64), Logged<std::convert::Infallible>> {
        let bare = |r: Reason| Logged::Unlogged {
            decision: Decision::bare(r),
            after: 0,
        };
        let pan = MaskedPan::new(req.pan);
        if !well_formed(req, pan.is_some()) {
            return Err(bare(Reason::FORMAT_ERROR));
        }
        let id = MerchantId::new(req.merchant).ok_or(bare(Reason::UNKNOWN_MERCHANT))?;
        Ok((id, pan.unwrap_or_default(), self.pan_key.hash(req.pan)))
    }

    fn ctx(&self, book: &Book, pan: MaskedPan, pan_hash: u64, now: UnixSeconds) -> Ctx {
        Ctx {
            now,
            today: book.policy.utc_offset.local(now),
            pan,
            pan_hash,
            store_ok: self.store_ok.load(Ordering::Relaxed),
            totals: None,
            replayed: None,
        }
    }

    fn book_for(
        &self,
        req: &Request<'_>,
        now: UnixSeconds,
    ) -> Result<(BookRef<'_>, Ctx), Logged<std::convert::Infallible>> {
        let (id, pan, pan_hash) = self.prepare(req)?;
        let book = self.books.get_mut(&id).ok_or(Logged::Unlogged {
            decision: Decision::bare(Reason::UNKNOWN_MERCHANT),
            after: 0,
        })?;
        let ctx = self.ctx(&book, pan, pan_hash, now);
        Ok((book, ctx))
    }

    /// Applies a reservation's event (after it was journaled) and returns the answer.
    /// The answer is usually an approval; it is a decline when a reversal of this very
    /// request, or a void or reversal of its original, was applied in between.
    pub fn commit(&self, r: Reservation) -> Decision {
        match self.commit_logged(r, unlogged) {
            Logged::Unlogged { decision, .. } | Logged::Applied { decision, .. } => decision,
            Logged::Failed(never) => match never {},
        }
    }

    /// Gives the reservation's holds back, hands its event to `log` and, if `log` took it,
    /// applies it — all under the merchant's shard, so in journal order.
    ///
    /// A refund or void reserved before the ledger was rebuilt from the journal (after a
    /// failed write, [`Ledger::adopt_durable`]) is checked again on the rebuilt state: if a
    /// limit or the funds no longer take it, it is declined with that reason (journaled as
    /// `Declined`), so a give-back lost with the failed write can never push a limit past
    /// its cap. The caller reverses such a request at the host as for any decline at commit.
    pub fn commit_logged<E>(
        &self,
        r: Reservation,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        let Some(mut book) = self.books.get_mut(&r.event.merchant) else {
            return Logged::Unlogged {
                decision: Decision::bare(Reason::INTERNAL_ERROR),
                after: 0,
            };
        };
        if r.hold.generation != book.generation {
            if let Some(reason) = book.recheck(&r.event.body, r.event.at, &r.hold) {
                drop(book);
                return self.decline_with(r, reason, None, log);
            }
        }
        book.release(&r.hold);
        apply_logged(&mut book, &r.event, true, log)
    }

    /// Gives a reservation back without an answer (timeout, store failure): a retry is
    /// decided anew.
    pub fn release(&self, r: Reservation) {
        if let Some(mut book) = self.books.get_mut(&r.event.merchant) {
            book.release(&r.hold);
        }
    }

    /// Gives a reservation back and answers `reason` (e.g. an upstream decline); a declined
    /// sale is remembered so that a refund of it gets 12. Returns the event applied.
    pub fn decline(&self, r: Reservation, reason: Reason) -> (Decision, LedgerEvent) {
        let mut applied = None;
        let logged = self.decline_logged(r, reason, |e| {
            applied = Some(e.clone());
            Ok::<u64, std::convert::Infallible>(0)
        });
        let d = match logged {
            Logged::Unlogged { decision, .. } | Logged::Applied { decision, .. } => decision,
            Logged::Failed(never) => match never {},
        };
        let event = applied.unwrap_or(LedgerEvent {
            merchant: MerchantId::default(),
            at: 0,
            body: EventBody::CutoverBegin,
        });
        (d, event)
    }

    /// [`Ledger::decline`], journaling the decline through `log` before applying it.
    pub fn decline_logged<E>(
        &self,
        r: Reservation,
        reason: Reason,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        self.decline_with(r, reason, None, log)
    }

    /// An upstream host declined the reservation with DE39 `code` (DOMAIN §5 row 14): like
    /// [`Ledger::decline_logged`] with `HOST_DECLINED`, and the host's code is kept with the
    /// stored answer so that a repeat gets it again ([`Decision::host_code`]).
    pub fn decline_by_host_logged<E>(
        &self,
        r: Reservation,
        code: [u8; 2],
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        self.decline_with(
            r,
            Reason::HOST_DECLINED,
            Some(u16::from_be_bytes(code)),
            log,
        )
    }

    fn decline_with<E>(
        &self,
        r: Reservation,
        reason: Reason,
        host_code: Option<u16>,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Logged<E> {
        let (answer, sale, amount) = match &r.event.body {
            EventBody::Sale { answer, txn } => (Some(*answer), Some(*txn), txn.amount),
            EventBody::Refund { answer, txn, .. } | EventBody::Void { answer, txn, .. } => {
                (Some(*answer), None, txn.amount)
            }
            EventBody::Reversal { answer, .. } => (Some(*answer), None, 0),
            _ => (None, None, 0),
        };
        let Some(mut book) = self.books.get_mut(&r.event.merchant) else {
            return Logged::Unlogged {
                decision: Decision::bare(Reason::INTERNAL_ERROR),
                after: 0,
            };
        };
        book.release(&r.hold);
        let base = Figures {
            amount,
            currency: book.policy.currency,
            host_code,
            ..Figures::default()
        };
        // A refund or void declined upstream found its original: DE54 as for any decline.
        let figures = match &r.event.body {
            EventBody::Refund { txn, original, .. } | EventBody::Void { txn, original, .. } => {
                book.de54_for(base, txn, original, r.event.at, true)
            }
            _ => base,
        };
        let decision = Decision::new(reason, figures);
        let Some(answer) = answer else {
            return Logged::Unlogged { decision, after: 0 };
        };
        let request = event::summary_of_reserved(&r.event.body, book.policy.currency);
        let event = LedgerEvent {
            merchant: r.event.merchant,
            at: r.event.at,
            body: EventBody::Declined {
                answer,
                decision,
                sale,
                request,
            },
        };
        apply_logged(&mut book, &event, false, log)
    }

    /// [`Ledger::reserve`] then [`Ledger::commit`], for callers without I/O.
    pub fn decide(&self, req: &Request<'_>, now: UnixSeconds) -> Decision {
        match self.reserve(req, now) {
            Ok(r) => self.commit(r),
            Err(d) => d,
        }
    }

    /// Replays one journaled event (restart). Events must be applied in journal order.
    pub fn apply(&self, event: &LedgerEvent) -> Result<Decision, Refused> {
        let mut book = self
            .books
            .get_mut(&event.merchant)
            .ok_or(Refused(Reason::UNKNOWN_MERCHANT))?;
        Ok(book.apply(event.at, &event.body))
    }

    /// Takes the durable state of every merchant from `rebuilt` (this ledger's merchants
    /// replayed from the journal after a failed write), keeping the reservations in flight.
    /// Call it while nothing is being journaled.
    pub fn adopt_durable(&self, rebuilt: Ledger) {
        for (id, mut fresh) in rebuilt.books {
            if let Some(mut book) = self.books.get_mut(&id) {
                fresh.carry_inflight(&mut book);
                *book = fresh;
            }
        }
    }

    /// Signs a `cup_pos` terminal on and returns its current batch number (DE60.2 of the
    /// 0810) with the event to journal.
    pub fn sign_on(
        &self,
        merchant: &str,
        terminal: &str,
        now: UnixSeconds,
    ) -> Result<(u32, LedgerEvent), Refused> {
        let mut applied = None;
        let (batch, _) = self.sign_on_logged(merchant, terminal, now, |e| {
            applied = Some(e.clone());
            Ok::<u64, Refused>(0)
        })?;
        Ok((batch, applied.ok_or(Refused(Reason::INTERNAL_ERROR))?))
    }

    /// [`Ledger::sign_on`], journaling through `log` before the terminal is marked signed
    /// on. `Err` is the refusal (unknown terminal) or `log`'s error.
    pub fn sign_on_logged<E: From<Refused>>(
        &self,
        merchant: &str,
        terminal: &str,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<(u32, u64), E> {
        let mut book = self.book_mut(merchant)?;
        let t = book
            .term_index(terminal)
            .ok_or(Refused(Reason::UNKNOWN_TERMINAL))?;
        let event = LedgerEvent {
            merchant: book.id,
            at: now,
            body: EventBody::SignOn {
                terminal: book.terms[usize::from(t)].id,
            },
        };
        let seq = log(&event)?;
        book.last_logged = seq;
        book.apply(now, &event.body);
        Ok((book.terms[usize::from(t)].batch, seq))
    }

    /// Starts a cut-over: the merchant's requests get 90 until [`Ledger::settle`].
    pub fn begin_cutover(&self, merchant: &str, now: UnixSeconds) -> Result<LedgerEvent, Refused> {
        self.mutate(merchant, now, |_| EventBody::CutoverBegin)
            .map(|(_, e)| e)
    }

    /// Settles the merchant: pays unsettled sales out (net of refunds, keeping what backs
    /// debits in flight), marks its originals settled, moves every terminal to the next batch
    /// and ends a cut-over. Returns the answer (figures.amount = payout) and the event.
    pub fn settle(
        &self,
        merchant: &str,
        now: UnixSeconds,
    ) -> Result<(Decision, LedgerEvent), Refused> {
        self.mutate(merchant, now, Book::settle_body)
    }

    /// [`Ledger::settle`], journaling through `log` before the settlement takes effect.
    pub fn settle_logged<E: From<Refused>>(
        &self,
        merchant: &str,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<(Decision, u64), E> {
        self.mutate_logged(merchant, now, Book::settle_body, log)
    }

    /// The merchants whose scheduled cut-over (`cutover_at`, merchant-local) is due at `now`.
    pub fn due_cutovers(&self, now: UnixSeconds) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| {
                self.books
                    .get(*id)
                    .is_some_and(|b| b.cutover_due(now).is_some())
            })
            .map(|id| id.as_str().to_string())
            .collect()
    }

    /// Runs `merchant`'s scheduled cut-over if it is due at `now` (DOMAIN §9a): a settlement
    /// of every terminal, as [`Ledger::settle`], journaled through `log` before it takes
    /// effect, once per merchant-local day. `Ok(None)` when it is not due.
    pub fn scheduled_cutover_logged<E: From<Refused>>(
        &self,
        merchant: &str,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<Option<(Decision, u64)>, E> {
        let mut book = self.book_mut(merchant)?;
        let Some(day) = book.cutover_due(now) else {
            return Ok(None);
        };
        let EventBody::Settle {
            payout,
            reserve_used,
        } = book.settle_body()
        else {
            return Err(Refused(Reason::INTERNAL_ERROR).into());
        };
        let event = LedgerEvent {
            merchant: book.id,
            at: now,
            body: EventBody::ScheduledCutover {
                day,
                payout,
                reserve_used,
            },
        };
        let seq = log(&event)?;
        book.last_logged = seq;
        let d = book.apply(now, &event.body);
        Ok(Some((d, seq)))
    }

    /// Adds `amount` to the merchant's prefunded reserve; returns the event to journal.
    pub fn top_up(
        &self,
        merchant: &str,
        amount: u64,
        now: UnixSeconds,
    ) -> Result<LedgerEvent, Refused> {
        if amount == 0 || amount > money::AMOUNT_MINOR_MAX {
            return Err(Refused(Reason::INVALID_AMOUNT));
        }
        self.mutate(merchant, now, |_| EventBody::TopUp { amount })
            .map(|(_, e)| e)
    }

    fn mutate(
        &self,
        merchant: &str,
        now: UnixSeconds,
        body: impl FnOnce(&Book) -> EventBody,
    ) -> Result<(Decision, LedgerEvent), Refused> {
        let mut applied = None;
        let (d, _) = self.mutate_logged(merchant, now, body, |e| {
            applied = Some(e.clone());
            Ok::<u64, Refused>(0)
        })?;
        Ok((d, applied.ok_or(Refused(Reason::INTERNAL_ERROR))?))
    }

    /// An event made from the book's state, handed to `log`, then applied: under the shard.
    fn mutate_logged<E: From<Refused>>(
        &self,
        merchant: &str,
        now: UnixSeconds,
        body: impl FnOnce(&Book) -> EventBody,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<(Decision, u64), E> {
        let mut book = self.book_mut(merchant)?;
        let event = LedgerEvent {
            merchant: book.id,
            at: now,
            body: body(&book),
        };
        let seq = log(&event)?;
        book.last_logged = seq;
        let d = book.apply(now, &event.body);
        Ok((d, seq))
    }

    /// The merchant's funds.
    pub fn funds(&self, merchant: &str) -> Option<Funds> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        Some(Funds {
            reserve: book.reserve,
            unsettled_sales: book.unsettled,
            refunds_committed: book.committed,
            refunds_reserved: book.pending_debits,
            sales_pending: book.pending_sales,
            available: book.available(),
        })
    }

    /// The merchant's committed refund usage for the local day and month of `now`.
    pub fn usage(&self, merchant: &str, now: UnixSeconds) -> Option<Usage> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let local = book.policy.utc_offset.local(now);
        let (day_amount, day_count) = book.day.in_period(local.day);
        let (month_amount, month_count) = book.month.in_period(local.month);
        Some(Usage {
            day_amount,
            day_count,
            month_amount,
            month_count,
            reversal_noops: book.reversal_noops,
            reversals_not_applied: book.reversals_not_applied,
            entries: book.entries.len(),
        })
    }

    /// The transaction `reference` names for `terminal` (as a refund would find it).
    pub fn original(
        &self,
        merchant: &str,
        terminal: &str,
        reference: OriginalRef<'_>,
    ) -> Option<OriginalView> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let idx = book.lookup(reference, book.term_index(terminal)?)?;
        let e = book.entries.get(idx as usize)?;
        Some(OriginalView {
            amount: e.amount,
            refunded: e.refunded,
            refund_count: e.refund_count,
            state: e.state_at(book.term_epoch(e.key.term)),
            pan: e.pan,
            card: e.card,
            batch: e.batch,
        })
    }

    /// Remembered transactions over all merchants.
    pub fn entries(&self) -> usize {
        self.books.iter().map(|b| b.entries.len()).sum()
    }

    /// The sales whose reversal was not applied because they already had an approved refund
    /// or void (DOMAIN §9), newest last: the list for reconciliation.
    pub fn reversals_not_applied(&self, merchant: &str) -> Vec<OriginalView> {
        let Some(book) = MerchantId::new(merchant).and_then(|id| self.books.get(&id)) else {
            return Vec::new();
        };
        book.not_applied
            .iter()
            .filter_map(|&i| book.entries.get(i as usize))
            .map(|e| OriginalView {
                amount: e.amount,
                refunded: e.refunded,
                refund_count: e.refund_count,
                state: e.state_at(book.term_epoch(e.key.term)),
                pan: e.pan,
                card: e.card,
                batch: e.batch,
            })
            .collect()
    }

    /// Reversals answered 00 with nothing to undo, over all merchants (DOMAIN §9).
    pub fn reversal_noops(&self) -> u64 {
        self.books.iter().map(|b| b.reversal_noops).sum()
    }

    fn book_mut(
        &self,
        merchant: &str,
    ) -> Result<dashmap::mapref::one::RefMut<'_, MerchantId, Book>, Refused> {
        let id = MerchantId::new(merchant).ok_or(Refused(Reason::UNKNOWN_MERCHANT))?;
        self.books
            .get_mut(&id)
            .ok_or(Refused(Reason::UNKNOWN_MERCHANT))
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("merchants", &self.order.len())
            .field("store_ok", &self.store_ok.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Row 1 as far as the ledger can see it: digits, lengths and the references each operation
/// needs. The codec has already rejected what it can; this guards the ledger's own keys.
fn well_formed(req: &Request<'_>, pan_ok: bool) -> bool {
    const N6: u32 = 999_999;
    let mmdd_ok = |d: u16| (1..=12).contains(&(d / 100)) && (1..=31).contains(&(d % 100));
    let de7_ok = |t: u64| t <= 1_231_235_959 && mmdd_ok(u16::try_from(t / 1_000_000).unwrap_or(0));
    let rrn_ok = |r: Option<&str>| r.is_none_or(|r| money::rrn_key(r).is_some());
    // 0: no date on the request, the merchant-local date is used.
    let date_ok = req.local_date_mmdd == 0 || mmdd_ok(req.local_date_mmdd);
    if req.stan > N6 || !date_ok || !rrn_ok(req.rrn) {
        return false;
    }
    if req.batch.is_some_and(|b| b > N6) || req.transmission.is_some_and(|t| !de7_ok(t)) {
        return false;
    }
    let own_key = match req.dialect {
        Dialect::Ascii1987 => req.transmission.is_some(),
        Dialect::CupPos => req.batch.is_some(),
    };
    let original_ok = match (req.dialect, req.original) {
        (
            Dialect::Ascii1987,
            Some(OriginalRef::Iso {
                stan,
                transmission,
                rrn,
                ..
            }),
        ) => stan <= N6 && de7_ok(transmission) && rrn_ok(rrn),
        (
            Dialect::CupPos,
            Some(OriginalRef::Cup {
                batch,
                trace,
                date_mmdd,
                rrn,
            }),
        ) => batch <= N6 && trace <= N6 && date_mmdd.is_none_or(mmdd_ok) && rrn_ok(rrn),
        _ => false,
    };
    match req.op {
        Operation::Sale => own_key && pan_ok,
        Operation::Refund | Operation::Void => own_key && pan_ok && original_ok,
        Operation::Reversal => match req.dialect {
            Dialect::Ascii1987 => original_ok,
            // A cup reversal of a sale has no DE61; of a void it has the void's.
            Dialect::CupPos => own_key && (req.original.is_none() || original_ok),
        },
        Operation::Settlement => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod run_tests {
    use super::*;

    fn ledger() -> Ledger {
        let toml = "[profiles.p]\nreserve = 1000000\ncurrency = 840\n\
                    [[merchants]]\nid = \"A\"\nprofile = \"p\"\nterminals = [{ id = \"T1\" }]\n\
                    [[merchants]]\nid = \"B\"\nprofile = \"p\"\nterminals = [{ id = \"T1\" }]\n";
        Ledger::new(
            &MerchantSet::from_toml_str(toml).unwrap(),
            PanKey::new(b"test-pan-key-16b"),
        )
    }

    fn sale(merchant: &'static str, stan: u32) -> Request<'static> {
        Request {
            dialect: Dialect::Ascii1987,
            op: Operation::Sale,
            repeat: false,
            merchant,
            terminal: "T1",
            stan,
            local_date_mmdd: 1121,
            mti_class: 2,
            transmission: Some(1_121_000_000 + u64::from(stan)),
            rrn: None,
            batch: None,
            pan: "4761739001010119",
            amount_minor: 2500,
            currency: 840,
            card_type: CardType::from_pan("4761739001010119"),
            original: None,
            body_fingerprint: u64::from(stan),
        }
    }

    fn approved(out: &[Logged<()>]) -> Vec<bool> {
        out.iter()
            .map(|l| matches!(l, Logged::Applied { decision, .. } if decision.reason == Reason::APPROVED))
            .collect()
    }

    #[test]
    fn a_run_stops_before_a_merchant_whose_shard_is_held_and_goes_on_from_there_later() {
        let l = ledger();
        let (a, b) = (MerchantId::new("A").unwrap(), MerchantId::new("B").unwrap());
        let reqs = [sale("A", 1), sale("A", 2), sale("B", 3), sale("A", 4)];
        let seq = std::cell::Cell::new(0);
        let mut logger = || {
            |_: &LedgerEvent| {
                seq.set(seq.get() + 1);
                Ok::<u64, ()>(seq.get())
            }
        };
        let held = l.books.get_mut(&b).unwrap();
        // A and B may share a dashmap shard; then A's requests wait too.
        let a_free = matches!(
            l.books.try_get(&a),
            dashmap::try_result::TryResult::Present(_)
        );
        let mut out = Vec::new();
        let n = l.try_decide_run_logged(&reqs, 100, &mut logger, &mut out);
        let stopped_at = if a_free { 2 } else { 0 };
        assert_eq!(n, stopped_at, "decided up to the held merchant");
        assert_eq!(
            out.len(),
            n,
            "one answer per decided request, none for the rest"
        );
        // Called again while still held: no progress, nothing pushed.
        assert_eq!(
            l.try_decide_run_logged(&reqs[n..], 100, &mut logger, &mut out),
            0
        );
        assert_eq!(out.len(), n);
        drop(held);
        let m = l.try_decide_run_logged(&reqs[n..], 100, &mut logger, &mut out);
        assert_eq!(n + m, reqs.len());
        assert_eq!(approved(&out), vec![true; 4], "{out:?}");
        // Journaled in request order.
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|l| match l {
                Logged::Applied { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        // Each was remembered: its repeat gets the stored approval, nothing journaled.
        for r in &reqs {
            let mut again = *r;
            again.repeat = true;
            let mut one = Vec::new();
            assert_eq!(
                l.try_decide_run_logged(&[again], 100, &mut logger, &mut one),
                1
            );
            assert!(
                matches!(&one[0], Logged::Unlogged { decision, .. } if decision.reason == Reason::APPROVED),
                "{one:?}"
            );
        }
    }
}
