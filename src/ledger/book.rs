//! One merchant's book: its originals, funds, counters and stored answers, and the ordered
//! checks of DOMAIN §5 rows 3–13. Every method runs under the merchant's shard lock.
//!
//! Durable state (changed only by [`Book::apply`]) and reservations in flight (changed by
//! [`Book::check`] and [`Book::release`]) are kept apart, so replaying the journal rebuilds
//! exactly the durable part.

// `Decision` (~130 bytes, `Copy`) is the declined answer itself; boxing it would allocate on
// every decline of the hot path, so the large `Err` is deliberate.
#![allow(clippy::result_large_err)]

use super::counters::{over, Bucket, Held};
use super::decision::{BatchTotals, Decision, Figures, Operation, OriginalRef, Request};
use super::event::{
    AdminAction, AdminChange, AdminId, AnswerKey, EventBody, OriginalSummary, RequestSummary,
    TerminalId, TxnKey, TxnRecord,
};
use super::hash::{FastMap, SplitMap};
use super::idempotency::{pack_key, FullAnswer, RefundAnswer, Stored};
use super::merchants::{MerchantConfig, Policy, SameDayRefund};
use super::money::{rrn_key, CardType, LocalDate, MaskedPan, AMOUNT_MINOR_MAX};
use super::originals::{Entries, Entry, Kind, OriginalState, RefKey, NO_LINK, TAG_CUP};
use super::reason::{Dialect, Reason};
use super::MerchantId;
use crate::clock::UnixSeconds;
use crate::limits::{
    ADMIN_REQUESTS_PER_MERCHANT_MAX, ANSWERS_PER_MERCHANT_MAX, ANSWER_RETENTION_S,
    DECLINES_PER_MERCHANT_MAX, ORIGINALS_PER_MERCHANT_MAX, RECONCILIATION_LIST_MAX,
};

const SECONDS_PER_DAY: i64 = 86_400;

/// Earlier policies a merchant keeps for the decision trails of older answers (reloads are
/// rare; an answer older than this many reloads is read against the oldest kept, and says so).
pub(crate) const POLICY_HISTORY_MAX: usize = 8;

/// A terminal and its sign-on state.
#[derive(Debug, Clone)]
pub(crate) struct Term {
    pub id: TerminalId,
    pub refund_enabled: bool,
    pub batch: u32,
    pub signed_on: bool,
    /// Settlement epoch of the terminal's open batch: an entry of this terminal with an
    /// older epoch is settled.
    pub epoch: u32,
}

/// What a reservation holds, to be given back on commit or release.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hold {
    /// Idempotency key marked in flight (`None` for settlements).
    pub key: Option<u64>,
    pub sale: u64,
    pub debit: u64,
    pub refund: Option<RefundHold>,
    /// Original held in full by a void.
    pub void_of: Option<(u32, u64)>,
    /// The book's generation when it was made (see `Book::generation`).
    pub generation: u32,
}

/// Counters a refund reservation holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefundHold {
    pub day: i32,
    pub month: i32,
    pub card: u64,
    pub original: u32,
    pub amount: u64,
}

/// Who asks for a refund: the terminal, card and scheme that DE54 type 92 is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who {
    pub term: u16,
    pub pan_hash: u64,
    pub card: CardType,
}

/// Context of one check that the book cannot know itself.
pub(crate) struct Ctx {
    pub now: UnixSeconds,
    /// `now` in the merchant's calendar.
    pub today: LocalDate,
    /// The request's PAN, masked (default when the operation carries none).
    pub pan: MaskedPan,
    pub pan_hash: u64,
    pub store_ok: bool,
    /// The batch totals a settlement request carries, if any.
    pub totals: Option<BatchTotals>,
    /// Set when a journaled request is decided again (policy what-if replay): what the
    /// journal knows in place of the request's clear fields.
    pub replayed: Option<Replayed>,
}

/// What a request decided again from the journal carries instead of its wire fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replayed {
    /// The sale's RRN, packed as journaled.
    pub rrn: Option<u64>,
    /// The original, already looked up on this book (`None`: not found).
    pub original: Option<u32>,
}

/// One merchant's state.
#[derive(Debug)]
pub(crate) struct Book {
    pub id: MerchantId,
    pub policy: Policy,
    pub terms: Vec<Term>,
    pub term_ix: FastMap<TerminalId, u16>,
    // Durable.
    pub epoch: u32,
    pub cutover: bool,
    pub reserve: u64,
    pub unsettled: u64,
    pub committed: u64,
    pub day: Bucket,
    pub month: Bucket,
    pub cards: SplitMap<u64, Bucket>,
    pub entries: Entries,
    pub by_ref: SplitMap<RefKey, u32>,
    pub by_rrn: SplitMap<u64, u32>,
    pub answers: SplitMap<u64, Stored>,
    pub answers_prune_len: usize,
    /// At or before the time of every stored answer (as [`Book::prune_answers`] reads it):
    /// while none can have expired, the prune's scan is skipped. Not in snapshots (derived):
    /// a restored book starts at `UnixSeconds::MIN`, which makes the next prune scan.
    pub answers_oldest_at: UnixSeconds,
    pub reversal_noops: u64,
    /// Reversals of sales that already had an approved refund or void (DOMAIN §9): nothing
    /// was undone. The count, and the sales' entries (the newest ones) for reconciliation.
    pub reversals_not_applied: u64,
    pub not_applied: Vec<u32>,
    /// Merchant-local day of the last scheduled cut-over (`i32::MIN`: none yet).
    pub cutover_day: i32,
    /// Entries of kind tombstone (derived; lets the common case skip a lookup).
    pub tombstones: u32,
    /// The operators' changes (issue 22), oldest first, at most
    /// [`ADMIN_REQUESTS_PER_MERCHANT_MAX`]: a repeated request id gets its stored result.
    pub admin_done: std::collections::VecDeque<AdminDone>,
    /// Version of the policy in force (0: the merchant file's at start, never journaled).
    pub policy_version: u32,
    /// The policies in force before it, oldest first, at most [`POLICY_HISTORY_MAX`]: the
    /// decision trail of an earlier answer reads the policy it was decided under.
    pub policy_history: std::collections::VecDeque<(u32, Policy)>,
    // In flight; never journaled.
    pub pending_sales: u64,
    pub pending_debits: u64,
    pub held_day: Held,
    pub held_month: Held,
    pub held_cards: FastMap<u64, Held>,
    pub held_originals: FastMap<u32, (u64, u32)>,
    pub inflight: FastMap<u64, u64>,
    pub declines: FastMap<u64, FullAnswer>,
    /// Journal position of the last event applied here (0 when all of them came from replay):
    /// a stored answer found here is sent only once this position is durable.
    pub last_logged: u64,
    /// Rebuilds from the journal this book's reservations were carried through (in memory
    /// only): a reservation made before the last one is checked again at commit.
    pub generation: u32,
}

type Checked = Result<(EventBody, Hold), Decision>;

/// An operator's change as applied: the stored result of its request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdminDone {
    pub request: AdminId,
    pub who: AdminId,
    pub at: UnixSeconds,
    pub action: AdminAction,
    /// The answer it got (`figures.amount`: the amount moved or paid out).
    pub decision: Decision,
}

/// The time [`Book::prune_answers`] reads for a stored answer: its original's, or 0 (expired)
/// when the original is forgotten.
fn stored_at(entries: &Entries, s: &Stored) -> UnixSeconds {
    match s {
        Stored::Sale { idx, .. } => entries.get(*idx as usize).map_or(0, |e| e.at),
        Stored::Refund(a) => entries.get(a.idx as usize).map_or(0, |e| e.at),
        Stored::Full(a) => a.at,
    }
}

/// Whether, at `now`, an answer stored at `oldest` or later can have expired.
fn now_expires_some(now: UnixSeconds, oldest: UnixSeconds) -> bool {
    now.saturating_sub(oldest) >= ANSWER_RETENTION_S
}

/// Transient refusals are not answers: a retry after the condition clears is decided anew.
const TRANSIENT: [Reason; 5] = [
    Reason::STORE_UNAVAILABLE,
    Reason::CUTOVER,
    Reason::DUPLICATE,
    Reason::INTERNAL_ERROR,
    Reason::BALANCE_PENDING,
];

/// Why [`Book::check`] did not reserve.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The stored answer of a repeat or identical retransmission (moves nothing).
    Stored(Decision),
    /// A refusal that is not remembered (rows 3–5, transient conditions).
    Bare(Decision),
    /// A decline remembered for repeats: journal it as `Declined` (with what the request
    /// asked, for replay), then apply it.
    Decline(Decision, AnswerKey, Box<RequestSummary>),
}

impl Term {
    /// Closes the open batch: the next batch number (999999 wraps to 1) and epoch.
    pub fn next_batch(&mut self) {
        self.batch = if self.batch >= 999_999 {
            1
        } else {
            self.batch + 1
        };
        self.epoch = self.epoch.saturating_add(1);
    }
}

impl Book {
    pub fn new(cfg: &MerchantConfig) -> Option<Book> {
        let terms = cfg
            .terminals
            .iter()
            .map(|t| {
                Some(Term {
                    id: TerminalId::new(&t.id)?,
                    refund_enabled: t.refund_enabled,
                    batch: t.batch,
                    signed_on: false,
                    epoch: 0,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let mut term_ix = FastMap::default();
        for (i, t) in terms.iter().enumerate() {
            term_ix.insert(t.id, u16::try_from(i).ok()?);
        }
        Some(Book {
            term_ix,
            id: MerchantId::new(&cfg.id)?,
            reserve: cfg.policy.reserve,
            policy: cfg.policy.clone(),
            terms,
            epoch: 0,
            cutover: false,
            unsettled: 0,
            committed: 0,
            day: Bucket::default(),
            month: Bucket::default(),
            cards: SplitMap::default(),
            entries: Entries::default(),
            by_ref: SplitMap::default(),
            by_rrn: SplitMap::default(),
            answers: SplitMap::default(),
            answers_prune_len: 1024,
            answers_oldest_at: UnixSeconds::MAX,
            reversal_noops: 0,
            reversals_not_applied: 0,
            not_applied: Vec::new(),
            cutover_day: i32::MIN,
            tombstones: 0,
            admin_done: std::collections::VecDeque::new(),
            policy_version: 0,
            policy_history: std::collections::VecDeque::new(),
            pending_sales: 0,
            pending_debits: 0,
            held_day: Held::default(),
            held_month: Held::default(),
            held_cards: FastMap::default(),
            held_originals: FastMap::default(),
            inflight: FastMap::default(),
            declines: FastMap::default(),
            last_logged: 0,
            generation: 0,
        })
    }

    pub fn term_index(&self, id: &str) -> Option<u16> {
        let id = TerminalId::new(id)?;
        // A scan of a few inline ids stays in one or two cache lines; the map is for big fleets.
        if self.terms.len() <= 8 {
            let i = self.terms.iter().position(|t| t.id == id)?;
            return u16::try_from(i).ok();
        }
        self.term_ix.get(&id).copied()
    }

    /// The settlement epoch of terminal `term`'s open batch.
    pub fn term_epoch(&self, term: u16) -> u32 {
        self.terms.get(usize::from(term)).map_or(0, |t| t.epoch)
    }

    /// True while `e` is in its terminal's open (unsettled) batch.
    pub fn in_open_batch(&self, e: &Entry) -> bool {
        e.epoch == self.term_epoch(e.key.term)
    }

    /// `reserve + unsettled − committed − pending debits`, never below zero.
    pub fn available(&self) -> u64 {
        let a = i128::from(self.reserve) + i128::from(self.unsettled)
            - i128::from(self.committed)
            - i128::from(self.pending_debits);
        u64::try_from(a.max(0)).unwrap_or(u64::MAX)
    }

    /// Rows 3–13 of DOMAIN §5, in order. On success the reservation is already held.
    pub fn check(&mut self, req: &Request<'_>, ctx: &Ctx) -> Result<(EventBody, Hold), Refusal> {
        // No date on the request (a cup sale carries neither DE13 nor DE7): the merchant's
        // local date keys it (DOMAIN §6), not the UTC one.
        let dated;
        let req = if req.local_date_mmdd == 0 {
            dated = Request {
                local_date_mmdd: ctx.today.mmdd,
                ..*req
            };
            &dated
        } else {
            req
        };
        let bare = |r: Reason| Refusal::Bare(Decision::bare(r));
        // Row 3: terminal known, signed on, batch.
        let term = self
            .term_index(req.terminal)
            .ok_or(bare(Reason::UNKNOWN_TERMINAL))?;
        let t = &self.terms[usize::from(term)];
        // A settlement closes a batch (DOMAIN §9a): only a terminal that signed on may ask,
        // whatever its dialect; cup terminals sign on before anything else.
        let settlement = req.op == Operation::Settlement;
        if req.dialect == Dialect::CupPos || settlement {
            if !t.signed_on {
                return Err(bare(Reason::UNKNOWN_TERMINAL));
            }
            if req.dialect == Dialect::CupPos && req.batch != Some(t.batch) {
                return Err(bare(Reason::BATCH_MISMATCH));
            }
        }
        // Row 4: duplicates and repeats.
        let key = pack_key(term, req.stan, req.local_date_mmdd, req.mti_class);
        if let Some(stored) = self.stored(key) {
            return Err(if stored.0 == req.body_fingerprint {
                Refusal::Stored(stored.1)
            } else {
                bare(Reason::DUPLICATE)
            });
        }
        if !self.inflight.is_empty() && self.inflight.contains_key(&key) {
            return Err(bare(Reason::DUPLICATE));
        }
        // Row 5: store and cut-over.
        if !ctx.store_ok {
            return Err(bare(Reason::STORE_UNAVAILABLE));
        }
        if self.cutover {
            return Err(bare(Reason::CUTOVER));
        }
        if self.entries.len() >= ORIGINALS_PER_MERCHANT_MAX || self.entries.next_index() == NO_LINK
        {
            return Err(bare(Reason::STORE_UNAVAILABLE));
        }
        if self.answers.len() >= ANSWERS_PER_MERCHANT_MAX {
            self.prune_answers(ctx.now);
            if self.entries.len() >= ORIGINALS_PER_MERCHANT_MAX {
                return Err(bare(Reason::STORE_UNAVAILABLE));
            }
            if self.answers.len() >= ANSWERS_PER_MERCHANT_MAX {
                return Err(bare(Reason::STORE_UNAVAILABLE));
            }
        }
        let answer = AnswerKey {
            terminal: self.terms[usize::from(term)].id,
            stan: req.stan,
            mmdd: req.local_date_mmdd,
            class: req.mti_class,
            fingerprint: req.body_fingerprint,
        };
        match self.check_operation(req, ctx, term, answer) {
            Ok((body, mut hold)) => {
                self.inflight.insert(key, req.body_fingerprint);
                hold.key = Some(key);
                Ok((body, hold))
            }
            Err(d) if TRANSIENT.contains(&d.reason) => Err(Refusal::Bare(d)),
            Err(d) => Err(Refusal::Decline(
                d,
                answer,
                Box::new(self.summary(req, ctx, term)),
            )),
        }
    }

    /// For callers without a journal: remembers a decline in memory only (a repeat gets it
    /// until a restart).
    pub fn remember_unlogged(&mut self, answer: &AnswerKey, now: UnixSeconds, d: &Decision) {
        if let Some(key) = self.answer_key(answer) {
            self.remember_decline(key, answer.fingerprint, now, d);
        }
    }

    /// Moves the reservations in flight of `old` (the same merchant's book before a rebuild
    /// from the journal) into this one.
    pub fn carry_inflight(&mut self, old: &mut Book) {
        self.pending_sales = old.pending_sales;
        self.pending_debits = old.pending_debits;
        self.held_day = std::mem::take(&mut old.held_day);
        self.held_month = std::mem::take(&mut old.held_month);
        self.held_cards = std::mem::take(&mut old.held_cards);
        self.held_originals = std::mem::take(&mut old.held_originals);
        self.inflight = std::mem::take(&mut old.inflight);
        self.declines = std::mem::take(&mut old.declines);
        self.generation = old.generation.wrapping_add(1);
    }

    /// Rows 10, 12 and 13 again, on the committed state alone, for a refund or void reserved
    /// before the book was rebuilt from the journal: the check counted on the state before the
    /// failed write, and the rebuild may have dropped a give-back it relied on (a reversal
    /// whose record was lost), so committing it could push a limit past its cap. `Some`: the
    /// reason to decline it with at commit instead.
    pub fn recheck(&self, body: &EventBody, at: UnixSeconds, hold: &Hold) -> Option<Reason> {
        let available = self.available().saturating_add(hold.debit);
        let (txn, original) = match body {
            EventBody::Refund { txn, original, .. } => (txn, original),
            EventBody::Void { txn, .. } => {
                return (txn.amount > available).then_some(Reason::BALANCE_INSUFFICIENT);
            }
            _ => return None,
        };
        let p = &self.policy;
        let amount = txn.amount;
        // An original no longer there is for the apply to answer.
        let idx = *self.by_ref.get(&self.ref_key(original)?)?;
        let sale = self.entries.get(idx as usize)?;
        let local = p.utc_offset.local(at);
        let count_max = |m: Option<u32>| m.map(u64::from);
        let share_cap =
            u64::try_from(u128::from(sale.amount) * u128::from(p.refundable_share_percent) / 100)
                .unwrap_or(u64::MAX);
        let card = self
            .cards
            .get(&txn.pan_hash)
            .map_or((0, 0), |b| b.in_period(local.day));
        let day = self.day.in_period(local.day);
        let month = self.month.in_period(local.month);
        let checks = [
            (
                Some(sale.amount),
                sale.refunded,
                amount,
                Reason::AMOUNT_EXCEEDS_REMAINING,
            ),
            (
                Some(share_cap),
                sale.refunded,
                amount,
                Reason::REFUNDABLE_SHARE,
            ),
            (
                count_max(p.original_refund_count_max),
                u64::from(sale.refund_count),
                1,
                Reason::ORIGINAL_REFUND_COUNT,
            ),
            (
                p.card_refund_day_amount_max,
                card.0,
                amount,
                Reason::CARD_DAY_AMOUNT,
            ),
            (
                count_max(p.card_refund_day_count_max),
                u64::from(card.1),
                1,
                Reason::CARD_DAY_COUNT,
            ),
            (
                p.refund_day_amount_max,
                day.0,
                amount,
                Reason::MERCHANT_DAY_AMOUNT,
            ),
            (
                p.refund_month_amount_max,
                month.0,
                amount,
                Reason::MERCHANT_MONTH_AMOUNT,
            ),
            (
                count_max(p.refund_day_count_max),
                u64::from(day.1),
                1,
                Reason::MERCHANT_DAY_COUNT,
            ),
            (
                count_max(p.refund_month_count_max),
                u64::from(month.1),
                1,
                Reason::MERCHANT_MONTH_COUNT,
            ),
            (Some(available), 0, amount, Reason::BALANCE_INSUFFICIENT),
        ];
        checks
            .into_iter()
            .find(|&(max, used, asked, _)| over(max, used, asked).is_some())
            .map(|(_, _, _, reason)| reason)
    }

    /// Rows 6–13 for one operation.
    fn check_operation(
        &mut self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        answer: AnswerKey,
    ) -> Checked {
        let base = Figures {
            amount: req.amount_minor,
            currency: self.policy.currency,
            ..Figures::default()
        };
        if req.op == Operation::Settlement {
            return self.check_settlement(ctx, term, answer);
        }
        // Row 6: amount.
        if req.amount_minor == 0
            || req.amount_minor > AMOUNT_MINOR_MAX
            || req.currency != self.policy.currency
        {
            // A refund or void whose original is found carries DE54 even here (DOMAIN §5).
            let figs = match req.op {
                Operation::Refund | Operation::Void => self
                    .original_for(req, ctx, term, base)
                    .map_or_else(|d| d.figures, |(_, f)| f),
                _ => base,
            };
            return Err(Decision::new(Reason::INVALID_AMOUNT, figs));
        }
        match req.op {
            Operation::Sale => self.check_sale(req, ctx, term, answer, base),
            Operation::Refund => self.check_refund(req, ctx, term, answer, base),
            Operation::Void => self.check_void(req, ctx, term, answer, base),
            Operation::Reversal => Ok((
                EventBody::Reversal {
                    answer,
                    target: self.txn_key(reversal_target(req, term)),
                },
                Hold::default(),
            )),
            Operation::Settlement => Err(Decision::bare(Reason::INTERNAL_ERROR)),
        }
    }

    /// A sale whose reversal came first is declined 22 (DOMAIN §9); otherwise it is held.
    fn check_sale(
        &mut self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        answer: AnswerKey,
        base: Figures,
    ) -> Checked {
        if self.tombstones > 0 {
            let own = self.txn_key(own_key(req, term));
            if self.tombstoned(&own) {
                return Err(Decision::new(Reason::ORIGINAL_REVERSED, base));
            }
        }
        Ok(self.hold_sale(req, ctx, term, answer))
    }

    fn hold_sale(
        &mut self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        answer: AnswerKey,
    ) -> (EventBody, Hold) {
        self.pending_sales = self.pending_sales.saturating_add(req.amount_minor);
        let txn = self.record(req, ctx, term);
        let hold = Hold {
            sale: req.amount_minor,
            ..Hold::default()
        };
        (EventBody::Sale { answer, txn }, hold)
    }

    /// What a declined request asked, for the journal (policy what-if replay).
    fn summary(&self, req: &Request<'_>, ctx: &Ctx, term: u16) -> RequestSummary {
        let original = req.original.map(|o| match o {
            OriginalRef::Iso {
                mti,
                stan,
                transmission,
                rrn,
            } => OriginalSummary::Iso {
                mti,
                stan,
                transmission,
                rrn: rrn.and_then(rrn_key),
            },
            OriginalRef::Cup {
                batch,
                trace,
                date_mmdd,
                rrn,
            } => OriginalSummary::Cup {
                batch,
                trace,
                date_mmdd,
                rrn: rrn.and_then(rrn_key),
            },
        });
        RequestSummary {
            op: req.op,
            cup: req.dialect == Dialect::CupPos,
            txn: self.record(req, ctx, term),
            currency: req.currency,
            original,
        }
    }

    fn record(&self, req: &Request<'_>, ctx: &Ctx, term: u16) -> TxnRecord {
        TxnRecord {
            key: self.txn_key(own_key(req, term)),
            rrn: match &ctx.replayed {
                Some(r) => r.rrn.filter(|_| req.op == Operation::Sale),
                None => req
                    .rrn
                    .filter(|_| req.op == Operation::Sale)
                    .and_then(rrn_key),
            },
            pan: ctx.pan,
            pan_hash: ctx.pan_hash,
            card: req.card_type,
            amount: req.amount_minor,
            batch: req.batch.unwrap_or(0),
        }
    }

    /// Rows 7–8, shared by refunds and voids: the original's index and the figures around it.
    fn original_for(
        &self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        base: Figures,
    ) -> Result<(u32, Figures), Decision> {
        let found = match &ctx.replayed {
            Some(r) => r.original,
            None => self.find_original(req, term),
        };
        let Some(idx) = found else {
            return Err(Decision::new(Reason::ORIGINAL_NOT_FOUND, base));
        };
        let e = self.entries[idx as usize];
        // Only a reversal ever named it (DOMAIN §9): reversed, whoever asks.
        if e.kind == Kind::Tombstone {
            return Err(Decision::new(Reason::ORIGINAL_REVERSED, base));
        }
        // Another card's amounts are never disclosed: no DE54 on a PAN mismatch.
        if e.pan_hash != ctx.pan_hash {
            return Err(Decision::new(Reason::PAN_MISMATCH, base));
        }
        let who = Who {
            term,
            pan_hash: ctx.pan_hash,
            card: req.card_type,
        };
        let figs = self.with_de54(base, idx, who, ctx.now, true);
        let reason = match e.state {
            OriginalState::NotApproved => Some(Reason::ORIGINAL_NOT_APPROVED),
            OriginalState::Voided => Some(Reason::ORIGINAL_VOIDED),
            OriginalState::Reversed => Some(Reason::ORIGINAL_REVERSED),
            OriginalState::Approved | OriginalState::Settled => None,
        };
        if let Some(r) = reason {
            return Err(Decision::new(r, figs));
        }
        if e.kind != Kind::Sale {
            return Err(Decision::new(Reason::TYPE_NOT_REFUNDABLE, figs));
        }
        Ok((idx, figs))
    }

    fn check_refund(
        &mut self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        answer: AnswerKey,
        base: Figures,
    ) -> Checked {
        let (idx, figs) = self.original_for(req, ctx, term, base)?;
        let sale = self.entries[idx as usize];
        let p = &self.policy;
        let amount = req.amount_minor;
        let fail = |r: Reason, f: Figures| Err(Decision::new(r, f));
        // Row 9: window and same-day policy.
        let window_s = i64::from(p.refund_window_days) * SECONDS_PER_DAY;
        if ctx.now.saturating_sub(sale.at) > window_s {
            return fail(
                Reason::REFUND_WINDOW_EXPIRED,
                Figures {
                    window_days: Some(p.refund_window_days),
                    ..figs
                },
            );
        }
        let today = ctx.today;
        // USE_VOID only when that void would pass; otherwise the refund is decided on its merits.
        if p.same_day_refund == SameDayRefund::UseVoid
            && amount == sale.amount
            && self.void_would_pass(idx, term, ctx.now, true)
        {
            return fail(Reason::USE_VOID, figs);
        }
        // Row 10: amount against the original.
        let held = self.held_of(idx);
        let refundable = sale.remaining().saturating_sub(held.0);
        if amount > refundable {
            return fail(Reason::AMOUNT_EXCEEDS_REMAINING, figs);
        }
        // Row 11: permissions.
        if !p.refund_enabled || !self.terms[usize::from(term)].refund_enabled {
            return fail(Reason::TERMINAL_NOT_PERMITTED, figs);
        }
        if p.denied_card_types.contains(&req.card_type) {
            return fail(Reason::CARD_NOT_PERMITTED, figs);
        }
        // Row 12: limits.
        self.check_limits(req, ctx, idx, figs)?;
        // Row 13: funds.
        self.check_funds(amount, figs)?;
        let rh = RefundHold {
            day: today.day,
            month: today.month,
            card: ctx.pan_hash,
            original: idx,
            amount,
        };
        self.hold_refund(&rh);
        let txn = self.record(req, ctx, term);
        let hold = Hold {
            debit: amount,
            refund: Some(rh),
            ..Hold::default()
        };
        let original = self.txn_key(sale.key);
        Ok((
            EventBody::Refund {
                answer,
                txn,
                original,
            },
            hold,
        ))
    }

    /// Row 12 for a refund of the original at `idx`.
    fn check_limits(
        &self,
        req: &Request<'_>,
        ctx: &Ctx,
        idx: u32,
        figs: Figures,
    ) -> Result<(), Decision> {
        let p = &self.policy;
        let sale = &self.entries[idx as usize];
        let amount = req.amount_minor;
        let today = ctx.today;
        let held = self.held_of(idx);
        let limit = |r: Reason, (limit, used, remaining): (u64, u64, u64)| {
            Decision::new(
                r,
                Figures {
                    limit: Some(limit),
                    used: Some(used),
                    remaining: Some(remaining),
                    ..figs
                },
            )
        };
        let count_max = |m: Option<u32>| m.map(u64::from);
        if let Some(x) = over(p.refund_single_max, 0, amount) {
            return Err(limit(Reason::SINGLE_REFUND_CAP, x));
        }
        let share_cap =
            u64::try_from(u128::from(sale.amount) * u128::from(p.refundable_share_percent) / 100)
                .unwrap_or(u64::MAX);
        if let Some(x) = over(
            Some(share_cap),
            sale.refunded.saturating_add(held.0),
            amount,
        ) {
            return Err(limit(Reason::REFUNDABLE_SHARE, x));
        }
        let orig_count = u64::from(sale.refund_count) + u64::from(held.1);
        if let Some(x) = over(count_max(p.original_refund_count_max), orig_count, 1) {
            return Err(limit(Reason::ORIGINAL_REFUND_COUNT, x));
        }
        let card = self
            .cards
            .get(&ctx.pan_hash)
            .map_or((0, 0), |b| b.in_period(today.day));
        let card_held = self
            .held_cards
            .get(&ctx.pan_hash)
            .map_or((0, 0), |h| h.in_period(today.day));
        if let Some(x) = over(
            p.card_refund_day_amount_max,
            card.0.saturating_add(card_held.0),
            amount,
        ) {
            return Err(limit(Reason::CARD_DAY_AMOUNT, x));
        }
        if let Some(x) = over(
            count_max(p.card_refund_day_count_max),
            u64::from(card.1) + u64::from(card_held.1),
            1,
        ) {
            return Err(limit(Reason::CARD_DAY_COUNT, x));
        }
        let (day_amt, day_cnt) = self.day_used(today.day);
        let (month_amt, month_cnt) = self.month_used(today.month);
        if let Some(x) = over(p.refund_day_amount_max, day_amt, amount) {
            return Err(limit(Reason::MERCHANT_DAY_AMOUNT, x));
        }
        if let Some(x) = over(p.refund_month_amount_max, month_amt, amount) {
            return Err(limit(Reason::MERCHANT_MONTH_AMOUNT, x));
        }
        if let Some(x) = over(count_max(p.refund_day_count_max), day_cnt, 1) {
            return Err(limit(Reason::MERCHANT_DAY_COUNT, x));
        }
        if let Some(x) = over(count_max(p.refund_month_count_max), month_cnt, 1) {
            return Err(limit(Reason::MERCHANT_MONTH_COUNT, x));
        }
        Ok(())
    }

    /// Row 13: funds for a debit of `amount`.
    fn check_funds(&self, amount: u64, figs: Figures) -> Result<(), Decision> {
        let available = self.available();
        if amount <= available {
            return Ok(());
        }
        let reason = if amount <= available.saturating_add(self.pending_sales) {
            Reason::BALANCE_PENDING
        } else {
            Reason::BALANCE_INSUFFICIENT
        };
        Err(Decision::new(
            reason,
            Figures {
                limit: Some(available),
                used: None,
                remaining: Some(available),
                ..figs
            },
        ))
    }

    fn check_void(
        &mut self,
        req: &Request<'_>,
        ctx: &Ctx,
        term: u16,
        answer: AnswerKey,
        base: Figures,
    ) -> Checked {
        let (idx, figs) = self.original_for(req, ctx, term, base)?;
        let sale = self.entries[idx as usize];
        let p = &self.policy;
        // Row 9: same day, open batch, same terminal.
        let same_day = p.utc_offset.day(sale.at) == ctx.today.day;
        let t = &self.terms[usize::from(term)];
        let open_batch =
            self.in_open_batch(&sale) && (req.dialect != Dialect::CupPos || sale.batch == t.batch);
        if !same_day || !open_batch || sale.key.term != term {
            return Err(Decision::new(Reason::USE_REFUND, figs));
        }
        // Row 10: the full, untouched amount.
        let held = self.held_of(idx);
        if req.amount_minor != sale.amount || sale.refunded > 0 || held.1 > 0 {
            return Err(Decision::new(Reason::VOID_AMOUNT_MISMATCH, figs));
        }
        // Row 11.
        if !p.void_enabled {
            return Err(Decision::new(Reason::TERMINAL_NOT_PERMITTED, figs));
        }
        // Row 13.
        self.check_funds(req.amount_minor, figs)?;
        self.pending_debits = self.pending_debits.saturating_add(sale.amount);
        self.held_originals.insert(idx, (sale.amount, 1));
        let txn = self.record(req, ctx, term);
        let hold = Hold {
            debit: sale.amount,
            void_of: Some((idx, sale.amount)),
            ..Hold::default()
        };
        let original = self.txn_key(sale.key);
        Ok((
            EventBody::Void {
                answer,
                txn,
                original,
            },
            hold,
        ))
    }

    /// DOMAIN §9a: the terminal's open batch, its totals compared with the request's.
    fn check_settlement(&mut self, ctx: &Ctx, term: u16, answer: AnswerKey) -> Checked {
        let ours = self.batch_totals(term);
        let figures = Figures {
            amount: ours.debit_amount,
            currency: self.policy.currency,
            limit: Some(ours.debit_amount),
            used: Some(ours.credit_amount),
            ..Figures::default()
        };
        if ctx.totals.is_some_and(|theirs| theirs != ours) {
            return Err(Decision::new(Reason::RECONCILE_ERROR, figures));
        }
        let (payout, reserve_used) = self.terminal_payout(term);
        Ok((
            EventBody::SettleBatch {
                answer,
                payout,
                reserve_used,
            },
            Hold::default(),
        ))
    }

    /// What closing terminal `term`'s open batch now moves: `(payout, reserve_used)`.
    pub fn terminal_payout(&self, term: u16) -> (u64, u64) {
        let ours = self.batch_totals(term);
        let net = i128::from(ours.debit_amount) - i128::from(ours.credit_amount);
        if net >= 0 {
            // Keep back what backs debits in flight: never pay out below them.
            let merchant_net = i128::from(self.unsettled)
                - i128::from(self.committed)
                - i128::from(self.pending_debits);
            let payout = net.min(merchant_net.max(0));
            (u64::try_from(payout).unwrap_or(0), 0)
        } else {
            (0, u64::try_from(-net).unwrap_or(u64::MAX))
        }
    }

    /// The gateway's totals of terminal `term`'s open batch: approved sales (debits) and
    /// approved refunds (credits) still standing; voided and reversed ones are out.
    pub fn batch_totals(&self, term: u16) -> BatchTotals {
        let epoch = self.term_epoch(term);
        let mut t = BatchTotals::default();
        for e in self.entries.iter() {
            if e.key.term != term || e.epoch != epoch || e.state != OriginalState::Approved {
                continue;
            }
            match e.kind {
                Kind::Sale => {
                    t.debit_count += 1;
                    t.debit_amount = t.debit_amount.saturating_add(e.amount);
                }
                Kind::Refund => {
                    t.credit_count += 1;
                    t.credit_amount = t.credit_amount.saturating_add(e.amount);
                }
                Kind::Void | Kind::Tombstone => {}
            }
        }
        t
    }

    /// Applies a terminal's settlement: its batch's sales less its refunds leave the funds
    /// (`payout` paid out, or `reserve_used` taken from the reserve when refunds exceeded
    /// sales), its originals become settled and the terminal moves to the next batch.
    fn apply_settle_batch(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        payout: u64,
        reserve_used: u64,
    ) -> Decision {
        let Some(term) = self.term_index(answer.terminal.as_str()) else {
            return Decision::bare(Reason::INTERNAL_ERROR);
        };
        let decision = self.close_batch(term, payout, reserve_used);
        self.finish(at, answer, decision)
    }

    /// Takes terminal `term`'s open batch out of the funds and moves it to the next batch.
    fn close_batch(&mut self, term: u16, payout: u64, reserve_used: u64) -> Decision {
        let totals = self.batch_totals(term);
        let (sales, refunds) = (totals.debit_amount, totals.credit_amount);
        let removed = if sales >= refunds {
            refunds.saturating_add(payout.min(sales - refunds))
        } else {
            self.reserve = self.reserve.saturating_sub(reserve_used);
            sales
        };
        self.unsettled = self.unsettled.saturating_sub(removed);
        self.committed = self.committed.saturating_sub(refunds);
        self.terms[usize::from(term)].next_batch();
        let figures = Figures {
            amount: payout,
            currency: self.policy.currency,
            limit: Some(totals.debit_amount),
            used: Some(totals.credit_amount),
            ..Figures::default()
        };
        Decision::new(Reason::APPROVED, figures)
    }

    /// The stored result of the operator's request `request`, if it was applied.
    pub fn admin_result(&self, request: &AdminId) -> Option<AdminDone> {
        self.admin_done
            .iter()
            .rev()
            .find(|d| d.request == *request)
            .copied()
    }

    /// Applies an operator's change (issue 22) and remembers its result for repeats.
    fn apply_admin(&mut self, at: UnixSeconds, change: &AdminChange) -> Decision {
        if let Some(done) = self.admin_result(&change.request) {
            return done.decision;
        }
        let currency = self.policy.currency;
        let moved = |amount: u64| {
            Decision::new(
                Reason::APPROVED,
                Figures {
                    amount,
                    currency,
                    ..Figures::default()
                },
            )
        };
        let decision = match change.action {
            AdminAction::TopUp { amount } => {
                self.reserve = self.reserve.saturating_add(amount);
                moved(amount)
            }
            AdminAction::Settle {
                payout,
                reserve_used,
            } => self.apply_settle(payout, reserve_used),
            AdminAction::SettleTerminal {
                terminal,
                payout,
                reserve_used,
            } => match self.term_index(terminal.as_str()) {
                Some(t) => self.close_batch(t, payout, reserve_used),
                None => Decision::bare(Reason::UNKNOWN_TERMINAL),
            },
            AdminAction::TerminalRefunds { terminal, enabled } => {
                match self.term_index(terminal.as_str()) {
                    Some(t) => {
                        self.terms[usize::from(t)].refund_enabled = enabled;
                        moved(0)
                    }
                    None => Decision::bare(Reason::UNKNOWN_TERMINAL),
                }
            }
        };
        if self.admin_done.len() >= ADMIN_REQUESTS_PER_MERCHANT_MAX {
            self.admin_done.pop_front();
        }
        self.admin_done.push_back(AdminDone {
            request: change.request,
            who: change.who,
            at,
            action: change.action,
            decision,
        });
        decision
    }

    /// The merchant-local day whose scheduled cut-over is due at `now`, if any: the local
    /// time of day has reached `cutover_at` and that day's cut-over has not run yet.
    pub fn cutover_due(&self, now: UnixSeconds) -> Option<i32> {
        let at = i64::from(self.policy.cutover_at?);
        let local = now.saturating_add(i64::from(self.policy.utc_offset.seconds()));
        let day = i32::try_from(local.div_euclid(SECONDS_PER_DAY)).ok()?;
        (local.rem_euclid(SECONDS_PER_DAY) >= at && self.cutover_day < day).then_some(day)
    }

    /// The settlement to journal now: net unsettled sales are paid out, except what backs
    /// debits in flight; refunds beyond sales come out of the reserve.
    pub fn settle_body(&self) -> EventBody {
        let net = i128::from(self.unsettled) - i128::from(self.committed);
        if net >= 0 {
            let net = u64::try_from(net).unwrap_or(0);
            EventBody::Settle {
                payout: net.saturating_sub(self.pending_debits),
                reserve_used: 0,
            }
        } else {
            EventBody::Settle {
                payout: 0,
                reserve_used: u64::try_from(-net).unwrap_or(u64::MAX),
            }
        }
    }

    fn hold_refund(&mut self, rh: &RefundHold) {
        self.pending_debits = self.pending_debits.saturating_add(rh.amount);
        self.held_day.add(rh.day, rh.amount);
        self.held_month.add(rh.month, rh.amount);
        self.held_cards
            .entry(rh.card)
            .or_default()
            .add(rh.day, rh.amount);
        let h = self.held_originals.entry(rh.original).or_insert((0, 0));
        h.0 = h.0.saturating_add(rh.amount);
        h.1 = h.1.saturating_add(1);
    }

    /// Gives back everything `hold` reserved.
    pub fn release(&mut self, hold: &Hold) {
        if let Some(k) = hold.key {
            self.inflight.remove(&k);
        }
        self.pending_sales = self.pending_sales.saturating_sub(hold.sale);
        self.pending_debits = self.pending_debits.saturating_sub(hold.debit);
        if let Some(rh) = hold.refund {
            self.held_day.remove(rh.day, rh.amount);
            self.held_month.remove(rh.month, rh.amount);
            if let Some(h) = self.held_cards.get_mut(&rh.card) {
                h.remove(rh.day, rh.amount);
                if h.count == 0 {
                    self.held_cards.remove(&rh.card);
                }
            }
            self.unhold_original(rh.original, rh.amount);
        }
        if let Some((idx, amount)) = hold.void_of {
            self.unhold_original(idx, amount);
        }
    }

    fn unhold_original(&mut self, idx: u32, amount: u64) {
        if let Some(h) = self.held_originals.get_mut(&idx) {
            h.0 = h.0.saturating_sub(amount);
            h.1 = h.1.saturating_sub(1);
            if h.1 == 0 {
                self.held_originals.remove(&idx);
            }
        }
    }

    /// Refund amount and count in flight against the original at `idx`.
    pub(super) fn held_of(&self, idx: u32) -> (u64, u32) {
        if self.held_originals.is_empty() {
            return (0, 0);
        }
        self.held_originals.get(&idx).copied().unwrap_or((0, 0))
    }

    /// `base` with DE54 for a refund of `original` by the card and terminal of `txn`; `live`:
    /// counting reservations in flight (an upstream decline, after its own hold was given
    /// back), else from the durable state alone (an event being applied).
    pub fn de54_for(
        &self,
        base: Figures,
        txn: &TxnRecord,
        original: &TxnKey,
        now: UnixSeconds,
        live: bool,
    ) -> Figures {
        let idx = self
            .ref_key(original)
            .and_then(|k| self.by_ref.get(&k).copied());
        let term = self.term_index(txn.key.terminal.as_str());
        match (idx, term) {
            (Some(idx), Some(term)) => {
                let who = Who {
                    term,
                    pan_hash: txn.pan_hash,
                    card: txn.card,
                };
                self.with_de54(base, idx, who, now, live)
            }
            _ => base,
        }
    }

    /// Funds for a debit: live (less debits in flight) or durable.
    pub(super) fn funds(&self, live: bool) -> u64 {
        if live {
            return self.available();
        }
        let a = i128::from(self.reserve) + i128::from(self.unsettled) - i128::from(self.committed);
        u64::try_from(a.max(0)).unwrap_or(u64::MAX)
    }

    /// The refundable share of the sale `e` less refunds approved (and, `live`, in flight).
    pub(super) fn share_left(&self, e: &Entry, held: u64) -> u64 {
        let cap = u128::from(e.amount) * u128::from(self.policy.refundable_share_percent) / 100;
        let cap = u64::try_from(cap).unwrap_or(u64::MAX);
        cap.saturating_sub(e.refunded.saturating_add(held))
    }

    /// The merchant's refund allowance left now: the smallest of the day and month amount
    /// caps' remainders and the funds (DE54 type 91).
    pub(super) fn allowance(&self, today: LocalDate, live: bool) -> u64 {
        let p = &self.policy;
        let (day, month) = if live {
            (self.day_used(today.day).0, self.month_used(today.month).0)
        } else {
            (
                self.day.in_period(today.day).0,
                self.month.in_period(today.month).0,
            )
        };
        let mut a = self.funds(live);
        if let Some(m) = p.refund_day_amount_max {
            a = a.min(m.saturating_sub(day));
        }
        if let Some(m) = p.refund_month_amount_max {
            a = a.min(m.saturating_sub(month));
        }
        a
    }

    /// True when a void of the sale at `idx` from terminal `term` would be approved now
    /// (DOMAIN §5 rows 9–13 for a void of the full amount).
    pub(super) fn void_would_pass(
        &self,
        idx: u32,
        term: u16,
        now: UnixSeconds,
        live: bool,
    ) -> bool {
        let Some(sale) = self.entries.get(idx as usize) else {
            return false;
        };
        let Some(t) = self.terms.get(usize::from(term)) else {
            return false;
        };
        let p = &self.policy;
        let cup = sale.key.tag & TAG_CUP != 0;
        let held = if live { self.held_of(idx) } else { (0, 0) };
        p.void_enabled
            && sale.kind == Kind::Sale
            && sale.state == OriginalState::Approved
            && sale.key.term == term
            && p.utc_offset.day(sale.at) == p.utc_offset.day(now)
            && self.in_open_batch(sale)
            && (!cup || sale.batch == t.batch)
            && sale.refunded == 0
            && held.1 == 0
            && sale.amount <= self.funds(live)
    }

    /// `base` with DE54 for a refund of the sale at `idx` by `who` at `now` (DOMAIN §5):
    /// 90 still refundable, 91 the merchant's allowance, 92 the largest refund that would be
    /// approved. `live`: count reservations in flight (a check); without, the durable state
    /// alone (an approval being applied, so that replay gives the same answer).
    pub(super) fn with_de54(
        &self,
        base: Figures,
        idx: u32,
        who: Who,
        now: UnixSeconds,
        live: bool,
    ) -> Figures {
        let Some(sale) = self.entries.get(idx as usize).copied() else {
            return base;
        };
        let p = &self.policy;
        let held = if live { self.held_of(idx) } else { (0, 0) };
        let standing = sale.kind == Kind::Sale && sale.state == OriginalState::Approved;
        let share = if standing {
            self.share_left(&sale, held.0)
        } else {
            0
        };
        let today = p.utc_offset.local(now);
        let allowance = self.allowance(today, live);
        let card = self
            .cards
            .get(&who.pan_hash)
            .map_or((0, 0), |b| b.in_period(today.day));
        let card_held = if live {
            self.held_cards
                .get(&who.pan_hash)
                .map_or((0, 0), |h| h.in_period(today.day))
        } else {
            (0, 0)
        };
        let (card_amount, card_count) = (
            card.0.saturating_add(card_held.0),
            u64::from(card.1) + u64::from(card_held.1),
        );
        let (day_count, month_count) = if live {
            (self.day_used(today.day).1, self.month_used(today.month).1)
        } else {
            (
                u64::from(self.day.in_period(today.day).1),
                u64::from(self.month.in_period(today.month).1),
            )
        };
        let reached = |max: Option<u32>, used: u64| max.is_some_and(|m| used >= u64::from(m));
        let window_s = i64::from(p.refund_window_days) * SECONDS_PER_DAY;
        let refund_enabled = self
            .terms
            .get(usize::from(who.term))
            .is_some_and(|t| t.refund_enabled);
        let blocked = !standing
            || now.saturating_sub(sale.at) > window_s
            || !p.refund_enabled
            || !refund_enabled
            || p.denied_card_types.contains(&who.card)
            || reached(
                p.original_refund_count_max,
                u64::from(sale.refund_count) + u64::from(held.1),
            )
            || reached(p.card_refund_day_count_max, card_count)
            || reached(p.refund_day_count_max, day_count)
            || reached(p.refund_month_count_max, month_count);
        let would_pass = if blocked {
            0
        } else {
            let mut x = share
                .min(sale.remaining().saturating_sub(held.0))
                .min(allowance)
                .min(AMOUNT_MINOR_MAX);
            if let Some(m) = p.refund_single_max {
                x = x.min(m);
            }
            if let Some(m) = p.card_refund_day_amount_max {
                x = x.min(m.saturating_sub(card_amount));
            }
            // The full amount would be told to void instead (row 9): one unit less passes.
            if p.same_day_refund == SameDayRefund::UseVoid
                && x >= sale.amount
                && self.void_would_pass(idx, who.term, now, live)
            {
                x = sale.amount.saturating_sub(1);
            }
            x
        };
        Figures {
            original_amount: Some(sale.amount),
            original_remaining: Some(share),
            day_allowance_remaining: Some(allowance),
            would_pass: Some(would_pass),
            ..base
        }
    }

    pub(super) fn day_used(&self, day: i32) -> (u64, u64) {
        let (a, c) = self.day.in_period(day);
        let (ha, hc) = self.held_day.in_period(day);
        (a.saturating_add(ha), u64::from(c) + u64::from(hc))
    }

    pub(super) fn month_used(&self, month: i32) -> (u64, u64) {
        let (a, c) = self.month.in_period(month);
        let (ha, hc) = self.held_month.in_period(month);
        (a.saturating_add(ha), u64::from(c) + u64::from(hc))
    }

    fn find_original(&self, req: &Request<'_>, term: u16) -> Option<u32> {
        self.lookup(req.original?, term)
    }

    /// The entry a journaled request summary names, as [`Book::lookup`] found it live.
    pub fn resolve(&self, original: &OriginalSummary, term: u16) -> Option<u32> {
        let (key, rrn, date) = match *original {
            OriginalSummary::Iso {
                mti,
                stan,
                transmission,
                rrn,
            } => (iso_ref_key(term, mti, stan, transmission)?, rrn, None),
            OriginalSummary::Cup {
                batch,
                trace,
                date_mmdd,
                rrn,
            } => (cup_ref_key(term, batch, trace), rrn, date_mmdd),
            OriginalSummary::Found(key) => return self.by_ref.get(&self.ref_key(&key)?).copied(),
        };
        self.lookup_packed(key, rrn, date)
    }

    /// The entry a reference names: by key on this terminal, else by RRN; DE61.3 must match.
    pub fn lookup(&self, original: OriginalRef<'_>, term: u16) -> Option<u32> {
        let (key, rrn, date) = match original {
            OriginalRef::Iso {
                mti,
                stan,
                transmission,
                rrn,
            } => (iso_ref_key(term, mti, stan, transmission)?, rrn, None),
            OriginalRef::Cup {
                batch,
                trace,
                date_mmdd,
                rrn,
            } => (cup_ref_key(term, batch, trace), rrn, date_mmdd),
        };
        self.lookup_packed(key, rrn.and_then(rrn_key), date)
    }

    fn lookup_packed(&self, key: RefKey, rrn: Option<u64>, date: Option<u16>) -> Option<u32> {
        let idx = self
            .by_ref
            .get(&key)
            .or_else(|| rrn.and_then(|k| self.by_rrn.get(&k)))
            .copied()?;
        let e = self.entries.get(idx as usize)?;
        if let Some(d) = date {
            if self.policy.utc_offset.local(e.at).mmdd != d {
                return None;
            }
        }
        Some(idx)
    }

    /// The stored answer for `key`, with its fingerprint.
    pub fn stored(&self, key: u64) -> Option<(u64, Decision)> {
        if let Some(s) = self.answers.get(&key) {
            return Some(match s {
                Stored::Sale { fingerprint, idx } => (*fingerprint, self.sale_decision(*idx)),
                Stored::Refund(a) => (a.fingerprint, self.refund_decision(a)),
                Stored::Full(a) => (a.fingerprint, a.decision),
            });
        }
        if self.declines.is_empty() {
            return None;
        }
        self.declines.get(&key).map(|a| (a.fingerprint, a.decision))
    }

    fn remember_decline(&mut self, key: u64, fingerprint: u64, now: UnixSeconds, d: &Decision) {
        if self.declines.len() >= DECLINES_PER_MERCHANT_MAX {
            self.declines
                .retain(|_, a| now.saturating_sub(a.at) < ANSWER_RETENTION_S);
            if self.declines.len() >= DECLINES_PER_MERCHANT_MAX {
                // Declines moved nothing; forgetting one only means a repeat is decided again.
                self.declines.clear();
            }
        }
        self.declines.insert(
            key,
            FullAnswer {
                fingerprint,
                at: now,
                decision: *d,
                policy_version: self.policy_version,
            },
        );
    }

    fn refund_decision(&self, a: &RefundAnswer) -> Decision {
        let refund = self.entries.get(a.idx as usize);
        let sale = refund.and_then(|r| self.entries.get(r.link as usize));
        Decision::new(
            Reason::APPROVED,
            Figures {
                amount: refund.map_or(0, |e| e.amount),
                currency: self.policy.currency,
                original_amount: sale.map(|e| e.amount),
                original_remaining: Some(a.original_remaining),
                day_allowance_remaining: a.day_allowance,
                would_pass: a.would_pass,
                ..Figures::default()
            },
        )
    }

    pub(super) fn sale_decision(&self, idx: u32) -> Decision {
        let amount = self.entries.get(idx as usize).map_or(0, |e| e.amount);
        Decision::new(
            Reason::APPROVED,
            Figures {
                amount,
                currency: self.policy.currency,
                original_amount: Some(amount),
                original_remaining: Some(amount),
                ..Figures::default()
            },
        )
    }

    fn txn_key(&self, k: RefKey) -> TxnKey {
        TxnKey {
            terminal: self
                .terms
                .get(usize::from(k.term))
                .map(|t| t.id)
                .unwrap_or_default(),
            stan: k.stan,
            tag: k.tag,
        }
    }

    fn ref_key(&self, k: &TxnKey) -> Option<RefKey> {
        Some(RefKey {
            term: self.term_index(k.terminal.as_str())?,
            stan: k.stan,
            tag: k.tag,
        })
    }

    fn answer_key(&self, a: &AnswerKey) -> Option<u64> {
        Some(pack_key(
            self.term_index(a.terminal.as_str())?,
            a.stan,
            a.mmdd,
            a.class,
        ))
    }

    /// Drops the stored answers past their retention. While none can have expired the scan
    /// is skipped: it would keep them all (O(n) under the merchant's lock, 48 ms at 1M
    /// answers), and the threshold ends the same either way.
    fn prune_answers(&mut self, now: UnixSeconds) {
        if now_expires_some(now, self.answers_oldest_at) {
            let entries = &self.entries;
            let mut oldest = UnixSeconds::MAX;
            self.answers.retain(|_, s| {
                let at = stored_at(entries, s);
                let keep = now.saturating_sub(at) < ANSWER_RETENTION_S;
                if keep {
                    oldest = oldest.min(at);
                }
                keep
            });
            self.answers_oldest_at = oldest;
        }
        self.answers_prune_len = (self.answers.len() * 2).max(1024);
    }

    fn store_answer(&mut self, key: u64, stored: Stored, at: UnixSeconds) {
        if self.answers.len() >= self.answers_prune_len {
            self.prune_answers(at);
        }
        self.answers_oldest_at = self
            .answers_oldest_at
            .min(stored_at(&self.entries, &stored));
        self.answers.insert(key, stored);
    }

    /// Applies one committed change; returns the answer it stands for. Deterministic: the same
    /// events in the same order give the same state, whether live or replayed.
    pub fn apply(&mut self, at: UnixSeconds, body: &EventBody) -> Decision {
        self.apply_event(at, body, false)
    }

    /// [`Book::apply`] for the event of a reservation that is being committed: its key was
    /// held in flight since the check, so no stored answer can exist and the lookup is skipped.
    pub fn commit(&mut self, at: UnixSeconds, body: &EventBody) -> Decision {
        self.apply_event(at, body, true)
    }

    fn apply_event(&mut self, at: UnixSeconds, body: &EventBody, fresh: bool) -> Decision {
        // Before anything is looked up: an entry pruned while this event is applied could be
        // the very original it names (a journaled time past the original's retention).
        self.prune_originals(at);
        if !fresh {
            let answer = match body {
                EventBody::Sale { answer, .. }
                | EventBody::Refund { answer, .. }
                | EventBody::Void { answer, .. }
                | EventBody::Reversal { answer, .. }
                | EventBody::SettleBatch { answer, .. } => Some(answer),
                _ => None,
            };
            // The same event applied twice (a replayed journal overlapping a snapshot).
            if let Some(d) = answer.and_then(|a| self.already(a)) {
                return d;
            }
        }
        match body {
            EventBody::Sale { answer, txn } => self.apply_sale(at, answer, txn),
            EventBody::Refund {
                answer,
                txn,
                original,
            } => self.apply_refund(at, answer, txn, original),
            EventBody::Void {
                answer,
                txn,
                original,
            } => self.apply_void(at, answer, txn, original),
            EventBody::Reversal { answer, target } => self.apply_reversal(at, answer, target),
            EventBody::Declined {
                answer,
                decision,
                sale,
                ..
            } => self.apply_declined(at, answer, *decision, sale.as_ref()),
            EventBody::SignOn { terminal } => {
                if let Some(i) = self.term_index(terminal.as_str()) {
                    self.terms[usize::from(i)].signed_on = true;
                }
                Decision::bare(Reason::APPROVED)
            }
            EventBody::CutoverBegin => {
                self.cutover = true;
                Decision::bare(Reason::APPROVED)
            }
            EventBody::TopUp { amount } => {
                self.reserve = self.reserve.saturating_add(*amount);
                Decision::bare(Reason::APPROVED)
            }
            EventBody::Settle {
                payout,
                reserve_used,
            } => self.apply_settle(*payout, *reserve_used),
            EventBody::SettleBatch {
                answer,
                payout,
                reserve_used,
            } => self.apply_settle_batch(at, answer, *payout, *reserve_used),
            EventBody::ScheduledCutover {
                day,
                payout,
                reserve_used,
            } => {
                self.cutover_day = self.cutover_day.max(*day);
                self.apply_settle(*payout, *reserve_used)
            }
            EventBody::Admin(change) => self.apply_admin(at, change),
            EventBody::PolicySet(change) => {
                // Counters, originals and funds stay; the next check reads the new policy.
                // The one it replaces is kept for the decision trails of earlier answers
                // (version 0, the merchant file before anything was journaled, is not: a
                // replay would read today's file for it).
                if self.policy_version > 0 && self.policy_version != change.version {
                    let old = std::mem::replace(&mut self.policy, change.policy.clone());
                    if self.policy_history.len() >= POLICY_HISTORY_MAX {
                        self.policy_history.pop_front();
                    }
                    self.policy_history.push_back((self.policy_version, old));
                } else {
                    self.policy = change.policy.clone();
                }
                self.policy_version = change.version;
                Decision::bare(Reason::APPROVED)
            }
        }
    }

    fn apply_declined(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        decision: Decision,
        sale: Option<&TxnRecord>,
    ) -> Decision {
        if let Some(txn) = sale {
            if let Some(k) = self.ref_key(&txn.key) {
                if !self.by_ref.contains_key(&k) {
                    self.push_entry(at, txn, k, Kind::Sale, OriginalState::NotApproved, NO_LINK);
                }
            }
        }
        self.finish(at, answer, decision)
    }

    /// Pays out, closes the epoch (originals become settled), ends a cut-over, moves batches.
    fn apply_settle(&mut self, payout: u64, reserve_used: u64) -> Decision {
        self.unsettled = self
            .unsettled
            .saturating_sub(self.committed)
            .saturating_sub(payout);
        self.committed = 0;
        self.reserve = self.reserve.saturating_sub(reserve_used);
        self.epoch = self.epoch.saturating_add(1);
        self.cutover = false;
        for t in &mut self.terms {
            t.next_batch();
        }
        let figures = Figures {
            amount: payout,
            currency: self.policy.currency,
            ..Figures::default()
        };
        Decision::new(Reason::APPROVED, figures)
    }

    /// Stores `decision` as the answer to `answer` and returns it.
    fn finish(&mut self, at: UnixSeconds, answer: &AnswerKey, decision: Decision) -> Decision {
        if let Some(k) = self.answer_key(answer) {
            self.store_answer(
                k,
                Stored::Full(Box::new(FullAnswer {
                    fingerprint: answer.fingerprint,
                    at,
                    decision,
                    policy_version: self.policy_version,
                })),
                at,
            );
        }
        decision
    }

    /// An earlier answer to the same request (the event was applied twice), if any.
    fn already(&self, answer: &AnswerKey) -> Option<Decision> {
        let k = self.answer_key(answer)?;
        let s = self.answers.get(&k)?;
        if s.fingerprint() != answer.fingerprint {
            return None;
        }
        self.stored(k).map(|(_, d)| d)
    }

    /// The entry with `key` if a reversal got there first.
    fn tombstoned(&self, key: &TxnKey) -> bool {
        if self.tombstones == 0 {
            return false;
        }
        self.ref_key(key)
            .and_then(|k| self.by_ref.get(&k))
            .and_then(|&i| self.entries.get(i as usize))
            .is_some_and(|e| e.kind == Kind::Tombstone)
    }

    fn push_entry(
        &mut self,
        at: UnixSeconds,
        txn: &TxnRecord,
        key: RefKey,
        kind: Kind,
        state: OriginalState,
        link: u32,
    ) -> u32 {
        let idx = self.entries.next_index();
        if kind == Kind::Tombstone {
            self.tombstones = self.tombstones.saturating_add(1);
        }
        self.entries.push(Entry {
            amount: txn.amount,
            refunded: 0,
            pan_hash: txn.pan_hash,
            at,
            pan: txn.pan,
            key,
            link,
            epoch: self.term_epoch(key.term),
            batch: txn.batch,
            refund_count: 0,
            kind,
            state,
            card: txn.card,
        });
        self.by_ref.insert(key, idx);
        if let Some(r) = txn.rrn {
            self.by_rrn.insert(r, idx);
        }
        idx
    }

    /// Forgets the oldest transactions once they are past `refund_window_days` plus the
    /// terminal's retry horizon (DOMAIN §6): nothing can refer to them any more (a refund is
    /// out of its window, a repeat past its horizon), so memory stays bounded under steady
    /// traffic. Runs as an entry is added, from the durable state alone (replay prunes alike).
    fn prune_originals(&mut self, at: UnixSeconds) {
        let keep = i64::from(self.policy.refund_window_days) * SECONDS_PER_DAY + ANSWER_RETENTION_S;
        let horizon = at.saturating_sub(keep);
        let mut pruned = false;
        while self.entries.front().is_some_and(|e| e.at < horizon) {
            let Some((idx, e)) = self.entries.pop_front() else {
                break;
            };
            if self.by_ref.get(&e.key) == Some(&idx) {
                self.by_ref.remove(&e.key);
            }
            if e.kind == Kind::Tombstone {
                self.tombstones = self.tombstones.saturating_sub(1);
            }
            pruned = true;
        }
        if pruned {
            // Answers of forgotten entries read as time 0 (expired): let the next prune scan.
            self.answers_oldest_at = UnixSeconds::MIN;
        }
        // RRNs of forgotten entries (lookups skip them already): drop them in bulk.
        if pruned && self.by_rrn.len() > 2 * self.entries.len() + 1024 {
            let base = self.entries.base();
            self.by_rrn.retain(|_, i| *i >= base);
        }
    }

    fn apply_sale(&mut self, at: UnixSeconds, answer: &AnswerKey, txn: &TxnRecord) -> Decision {
        let Some(key) = self.ref_key(&txn.key) else {
            return Decision::bare(Reason::INTERNAL_ERROR);
        };
        if self.tombstoned(&txn.key) {
            return self.finish(at, answer, Decision::bare(Reason::REVERSED_BEFORE_COMMIT));
        }
        let idx = self.push_entry(at, txn, key, Kind::Sale, OriginalState::Approved, NO_LINK);
        self.unsettled = self.unsettled.saturating_add(txn.amount);
        if let Some(k) = self.answer_key(answer) {
            self.store_answer(
                k,
                Stored::Sale {
                    fingerprint: answer.fingerprint,
                    idx,
                },
                at,
            );
        }
        self.sale_decision(idx)
    }

    /// The sale a refund or void refers to, if it can still take one.
    fn live_sale(&self, original: &TxnKey) -> Result<u32, Reason> {
        let idx = self
            .ref_key(original)
            .and_then(|k| self.by_ref.get(&k).copied())
            .ok_or(Reason::ORIGINAL_NOT_FOUND)?;
        match self.entries.get(idx as usize).map(|e| (e.kind, e.state)) {
            Some((Kind::Sale, OriginalState::Approved)) => Ok(idx),
            Some((_, OriginalState::Voided)) => Err(Reason::ORIGINAL_VOIDED),
            Some((_, OriginalState::Reversed)) => Err(Reason::ORIGINAL_REVERSED),
            _ => Err(Reason::ORIGINAL_NOT_APPROVED),
        }
    }

    fn apply_refund(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        txn: &TxnRecord,
        original: &TxnKey,
    ) -> Decision {
        let (base, key, sale_idx) = match self.related_to_live_sale(at, answer, txn, original) {
            Ok(found) => found,
            Err(decided) => return decided,
        };
        let local = self.policy.utc_offset.local(at);
        let idx = self.push_entry(
            at,
            txn,
            key,
            Kind::Refund,
            OriginalState::Approved,
            sale_idx,
        );
        let sale = &mut self.entries[sale_idx as usize];
        sale.refunded = sale.refunded.saturating_add(txn.amount);
        sale.refund_count = sale.refund_count.saturating_add(1);
        self.committed = self.committed.saturating_add(txn.amount);
        self.day.add(local.day, txn.amount);
        self.month.add(local.month, txn.amount);
        self.cards
            .entry(txn.pan_hash)
            .or_default()
            .add(local.day, txn.amount);
        // Past days' card counters are history; drop them each time the map doubles past 4096
        // (a function of the state alone, so replay prunes at the same moments).
        if self.cards.len() >= 4096 && self.cards.len().is_power_of_two() {
            self.cards.retain(|_, b| b.period >= local.day);
        }
        // The figures after this refund, from the durable state alone (replay gives the same).
        let who = Who {
            term: key.term,
            pan_hash: txn.pan_hash,
            card: txn.card,
        };
        let figs = self.with_de54(base, sale_idx, who, at, false);
        if let Some(k) = self.answer_key(answer) {
            let stored = RefundAnswer {
                fingerprint: answer.fingerprint,
                idx,
                original_remaining: figs.original_remaining.unwrap_or(0),
                day_allowance: figs.day_allowance_remaining,
                would_pass: figs.would_pass,
                policy_version: self.policy_version,
            };
            self.store_answer(k, Stored::Refund(Box::new(stored)), at);
        }
        Decision::new(Reason::APPROVED, figs)
    }

    /// What a refund and a void of `original` check first when applied: the request was not
    /// reversed before it committed, and its original is a live sale. `Err` is the finished
    /// answer; `Ok` gives the base figures, the request's key and the sale's index.
    fn related_to_live_sale(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        txn: &TxnRecord,
        original: &TxnKey,
    ) -> Result<(Figures, RefKey, u32), Decision> {
        let base = Figures {
            amount: txn.amount,
            currency: self.policy.currency,
            ..Figures::default()
        };
        if self.tombstoned(&txn.key) {
            return Err(self.finish(
                at,
                answer,
                Decision::new(Reason::REVERSED_BEFORE_COMMIT, base),
            ));
        }
        match (self.ref_key(&txn.key), self.live_sale(original)) {
            (Some(key), Ok(sale_idx)) => Ok((base, key, sale_idx)),
            (_, found) => {
                let r = found.err().unwrap_or(Reason::INTERNAL_ERROR);
                // The original was found (voided or reversed meanwhile): DE54 as ever, from
                // the durable state.
                let figs = self.de54_for(base, txn, original, at, false);
                Err(self.finish(at, answer, Decision::new(r, figs)))
            }
        }
    }

    fn apply_void(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        txn: &TxnRecord,
        original: &TxnKey,
    ) -> Decision {
        let (base, key, sale_idx) = match self.related_to_live_sale(at, answer, txn, original) {
            Ok(found) => found,
            Err(decided) => return decided,
        };
        if self.entries[sale_idx as usize].refunded > 0 {
            return self.finish(
                at,
                answer,
                Decision::new(Reason::VOID_AMOUNT_MISMATCH, base),
            );
        }
        // The sale's batch was settled between the check and now (a void held while the
        // upstream host decided it): the batch closed first, in journal order, so this is a
        // void after settlement (row 9). Taking the sale back now would take money the
        // settlement already paid out.
        if !self.in_open_batch(&self.entries[sale_idx as usize]) {
            return self.finish(at, answer, Decision::new(Reason::USE_REFUND, base));
        }
        self.push_entry(at, txn, key, Kind::Void, OriginalState::Approved, sale_idx);
        let sale = &mut self.entries[sale_idx as usize];
        sale.state = OriginalState::Voided;
        let sale = *sale;
        self.take_back_sale(&sale);
        // DE54 after the void (90 and 92 are 0 now), from the durable state alone.
        let who = Who {
            term: key.term,
            pan_hash: txn.pan_hash,
            card: txn.card,
        };
        let figs = self.with_de54(base, sale_idx, who, at, false);
        self.finish(at, answer, Decision::new(Reason::APPROVED, figs))
    }

    /// Removes a sale's money from the funds (void or reversal of a sale).
    fn take_back_sale(&mut self, sale: &Entry) {
        let amount = sale.amount;
        if self.in_open_batch(sale) {
            let short = amount.saturating_sub(self.unsettled);
            self.unsettled = self.unsettled.saturating_sub(amount);
            self.reserve = self.reserve.saturating_sub(short);
        } else {
            self.reserve = self.reserve.saturating_sub(amount);
        }
    }

    fn apply_reversal(&mut self, at: UnixSeconds, answer: &AnswerKey, target: &TxnKey) -> Decision {
        let Some(key) = self.ref_key(target) else {
            return self.finish(at, answer, Decision::bare(Reason::INTERNAL_ERROR));
        };
        let Some(&idx) = self.by_ref.get(&key) else {
            // Never seen: remember it so the original can never apply later.
            let ghost = TxnRecord {
                key: *target,
                rrn: None,
                pan: MaskedPan::default(),
                pan_hash: 0,
                card: super::money::CardType::Other,
                amount: 0,
                batch: 0,
            };
            self.push_entry(
                at,
                &ghost,
                key,
                Kind::Tombstone,
                OriginalState::Reversed,
                NO_LINK,
            );
            return self.noop(at, answer);
        };
        let e = self.entries[idx as usize];
        // Never return money twice: a sale the card already got money back on (an approved
        // refund, or a void) stays as it is, and the reversal is listed for reconciliation.
        let refunded_or_voided = e.kind == Kind::Sale
            && ((e.state == OriginalState::Approved && e.refund_count > 0)
                || e.state == OriginalState::Voided);
        if refunded_or_voided {
            return self.not_applied(at, answer, idx, &e);
        }
        if e.state != OriginalState::Approved && !undo_again(&e) {
            return self.noop(at, answer);
        }
        self.entries[idx as usize].state = OriginalState::Reversed;
        match e.kind {
            Kind::Sale => self.take_back_sale(&e),
            Kind::Refund => self.give_back_refund(&e),
            Kind::Void => {
                let epoch = self
                    .entries
                    .get(e.link as usize)
                    .map_or(0, |s| self.term_epoch(s.key.term));
                if let Some(sale) = self.entries.get_mut(e.link as usize) {
                    sale.state = OriginalState::Approved;
                    sale.epoch = epoch;
                    self.unsettled = self.unsettled.saturating_add(e.amount);
                }
            }
            Kind::Tombstone => {}
        }
        let figs = Figures {
            amount: e.amount,
            currency: self.policy.currency,
            original_amount: Some(e.amount),
            ..Figures::default()
        };
        self.finish(at, answer, Decision::new(Reason::REVERSAL_APPLIED, figs))
    }

    fn not_applied(
        &mut self,
        at: UnixSeconds,
        answer: &AnswerKey,
        idx: u32,
        e: &Entry,
    ) -> Decision {
        self.reversals_not_applied = self.reversals_not_applied.saturating_add(1);
        if self.not_applied.len() >= RECONCILIATION_LIST_MAX {
            self.not_applied.remove(0);
        }
        self.not_applied.push(idx);
        let figs = Figures {
            amount: e.amount,
            currency: self.policy.currency,
            original_amount: Some(e.amount),
            ..Figures::default()
        };
        self.finish(
            at,
            answer,
            Decision::new(Reason::REVERSAL_NOT_APPLIED, figs),
        )
    }

    fn noop(&mut self, at: UnixSeconds, answer: &AnswerKey) -> Decision {
        self.reversal_noops = self.reversal_noops.saturating_add(1);
        self.finish(at, answer, Decision::bare(Reason::REVERSAL_NOTHING_TO_UNDO))
    }

    fn give_back_refund(&mut self, refund: &Entry) {
        let local = self.policy.utc_offset.local(refund.at);
        if let Some(sale) = self.entries.get_mut(refund.link as usize) {
            sale.refunded = sale.refunded.saturating_sub(refund.amount);
            sale.refund_count = sale.refund_count.saturating_sub(1);
        }
        if self.in_open_batch(refund) {
            self.committed = self.committed.saturating_sub(refund.amount);
        } else {
            self.reserve = self.reserve.saturating_add(refund.amount);
        }
        self.day.remove(local.day, refund.amount);
        self.month.remove(local.month, refund.amount);
        if let Some(b) = self.cards.get_mut(&refund.pan_hash) {
            b.remove(local.day, refund.amount);
        }
    }
}

/// The simulator's `reversal-applied-twice` mutation: a reversed sale, refund or void is
/// undone again (test builds only; see `ledger::sim_mutation`).
#[cfg(feature = "sim-mutations")]
fn undo_again(e: &Entry) -> bool {
    e.state == OriginalState::Reversed
        && e.kind != Kind::Tombstone
        && super::sim_mutation::reversal_applied_twice()
}

/// Without the `sim-mutations` feature a reversed transaction is never undone again.
#[cfg(not(feature = "sim-mutations"))]
fn undo_again(_: &Entry) -> bool {
    false
}

/// The key a request is remembered by: DE7 for ascii, batch for cup.
fn own_key(req: &Request<'_>, term: u16) -> RefKey {
    let tag = match (req.dialect, req.batch, req.transmission) {
        (Dialect::CupPos, Some(b), _) => b | TAG_CUP,
        (_, _, Some(t)) => u32::try_from(t).unwrap_or(u32::MAX),
        (_, Some(b), None) => b | TAG_CUP,
        (_, None, None) => u32::from(req.local_date_mmdd),
    };
    RefKey {
        term,
        stan: req.stan,
        tag,
    }
}

/// The key of the transaction a reversal undoes: ascii DE90, cup terminal + own STAN + batch.
fn reversal_target(req: &Request<'_>, term: u16) -> RefKey {
    match (req.dialect, req.original) {
        (
            Dialect::Ascii1987,
            Some(OriginalRef::Iso {
                stan, transmission, ..
            }),
        ) => RefKey {
            term,
            stan,
            tag: u32::try_from(transmission).unwrap_or(u32::MAX),
        },
        _ => own_key(req, term),
    }
}

/// The key of an ascii original (DE90: a 02xx request's STAN and DE7); `None` for another MTI
/// class or a DE7 out of range.
fn iso_ref_key(term: u16, mti: u16, stan: u32, transmission: u64) -> Option<RefKey> {
    if mti / 100 != 2 {
        return None;
    }
    let tag = u32::try_from(transmission).ok()?;
    Some(RefKey { term, stan, tag })
}

/// The key of a cup original (DE61: batch and trace).
fn cup_ref_key(term: u16, batch: u32, trace: u32) -> RefKey {
    RefKey {
        term,
        stan: trace,
        tag: batch | TAG_CUP,
    }
}
