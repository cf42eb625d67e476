//! What an operator may ask the ledger (issue 22): read-only views of a merchant, a
//! transaction and "what would pass now", and the operators' own changes (top-up,
//! settlement, terminal refund switch) journaled through `log` like every other event.
//!
//! Every view is taken under the merchant's shard, so its figures are one consistent state.
//! PANs appear only masked.

use super::book::{Book, Who};
use super::decision::{BatchTotals, Decision, OriginalRef};
use super::event::{AdminAction, AdminChange, AdminId, EventBody, LedgerEvent, TerminalId};
use super::idempotency::{pack_key, Stored};
use super::merchants::{Policy, SameDayRefund};
use super::money::{CardType, MaskedPan, AMOUNT_MINOR_MAX};
use super::originals::{Entry, Kind, OriginalState};
use super::reason::Reason;
use super::{Funds, Ledger, MerchantId, Refused, Usage};
use crate::clock::UnixSeconds;

const SECONDS_PER_DAY: i64 = 86_400;

/// One terminal as the ledger holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalView {
    /// DE41.
    pub id: TerminalId,
    /// Refunds allowed on this terminal (file value, or an operator's switch).
    pub refund_enabled: bool,
    /// Signed on since start (cup terminals need it; every terminal for a 0500).
    pub signed_on: bool,
    /// Open batch number.
    pub batch: u32,
    /// The gateway's totals of the open batch.
    pub totals: BatchTotals,
}

/// A merchant as the ledger holds it now.
#[derive(Debug, Clone)]
pub struct MerchantView {
    /// The policy in force.
    pub policy: Policy,
    /// Funds equation terms.
    pub funds: Funds,
    /// Committed usage in the current local day and month.
    pub usage: Usage,
    /// Refunds and voids reserved, not yet committed, in the current day: (amount, count).
    pub held_day: (u64, u64),
    /// A cut-over is running (requests get 90).
    pub cutover: bool,
    /// Terminals in file order.
    pub terminals: Vec<TerminalView>,
    /// The operators' changes remembered, oldest first.
    pub admin_changes: Vec<AdminRecord>,
}

/// One card's refunds in the merchant's current local day (committed and in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardUsage {
    /// The card, masked.
    pub pan: MaskedPan,
    /// Refunded today.
    pub day_amount: u64,
    /// Refunds today.
    pub day_count: u64,
    /// The per-card day amount cap, if any.
    pub day_amount_max: Option<u64>,
    /// The per-card day count cap, if any.
    pub day_count_max: Option<u64>,
}

/// A transaction the ledger remembers (no PAN in clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnView {
    /// `sale`, `refund`, `void` or `reversal_tombstone`.
    pub kind: &'static str,
    /// DE41.
    pub terminal: TerminalId,
    /// DE11 (DE61 trace for cup).
    pub stan: u32,
    /// DE7 MMDDhhmmss (ascii), 0 for cup.
    pub transmission: u32,
    /// Amount.
    pub amount: u64,
    /// Sales: approved refunds so far, and their count.
    pub refunded: u64,
    /// Sales: approved refund count.
    pub refund_count: u16,
    /// State.
    pub state: OriginalState,
    /// Masked PAN.
    pub pan: MaskedPan,
    /// Scheme.
    pub card: CardType,
    /// Cup batch (0 for ascii).
    pub batch: u32,
    /// When it was decided.
    pub at: UnixSeconds,
}

/// A transaction and the answer it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Looked {
    /// The remembered transaction, when it is one the ledger keeps (sales, approved
    /// refunds and voids); declines keep only their answer.
    pub txn: Option<TxnView>,
    /// The stored answer (the one a repeat gets).
    pub answer: Option<Decision>,
    /// The merchant's policy version the answer was decided under (none for a sale).
    pub policy_version: Option<u32>,
}

/// "What would pass now" for a refund of one original (DOMAIN §5, DE54 type 92).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WouldPass {
    /// The original.
    pub original: TxnView,
    /// The terminal asked about.
    pub terminal: TerminalId,
    /// The largest refund that would be approved now (DE54 type 92).
    pub amount: u64,
    /// Still refundable on the original (DE54 type 90).
    pub original_remaining: u64,
    /// The merchant's allowance left (DE54 type 91).
    pub allowance: u64,
    /// The rule that sets `amount`: a refund of `amount + 1` is declined with it (0 when a
    /// rule that no smaller amount can satisfy binds).
    pub binding: Reason,
    /// When that rule's period ends (unix seconds; merchant-local midnight or month start);
    /// `None` when time alone does not lift it.
    pub resets_at: Option<UnixSeconds>,
    /// A void of the full amount from the sale's terminal would be approved now.
    pub void_would_pass: bool,
    /// The policy sends a full same-day refund to a void (`same_day_refund = "use_void"`).
    pub use_void: bool,
}

/// An operator's change (issue 22), as applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminRecord {
    /// The request id.
    pub request: AdminId,
    /// Who asked.
    pub who: AdminId,
    /// When it was applied.
    pub at: UnixSeconds,
    /// What changed.
    pub action: AdminAction,
    /// The answer (`figures.amount`: amount moved or paid out).
    pub decision: Decision,
}

/// What an operator asks to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminIntent<'a> {
    /// Add to the reserve.
    TopUp {
        /// Minor units.
        amount: u64,
    },
    /// Settle the whole merchant.
    Settle,
    /// Close one terminal's open batch.
    SettleTerminal {
        /// DE41.
        terminal: &'a str,
    },
    /// Switch refunds on one terminal.
    TerminalRefunds {
        /// DE41.
        terminal: &'a str,
        /// Allowed.
        enabled: bool,
    },
}

/// What [`Ledger::admin_logged`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminOutcome {
    /// The change and its result.
    pub record: AdminRecord,
    /// A repeat of an applied request id: nothing changed now.
    pub repeat: bool,
}

impl Ledger {
    /// The merchant's policy, funds, usage and terminals at `now`.
    pub fn merchant_view(&self, merchant: &str, now: UnixSeconds) -> Option<MerchantView> {
        let usage = self.usage(merchant, now)?;
        let funds = self.funds(merchant)?;
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let today = book.policy.utc_offset.local(now);
        let terminals = (0..book.terms.len())
            .filter_map(|i| {
                let t = book.terms.get(i)?;
                Some(TerminalView {
                    id: t.id,
                    refund_enabled: t.refund_enabled,
                    signed_on: t.signed_on,
                    batch: t.batch,
                    totals: book.batch_totals(u16::try_from(i).ok()?),
                })
            })
            .collect();
        Some(MerchantView {
            policy: book.policy.clone(),
            funds,
            usage,
            held_day: book.held_day.in_period(today.day).into_pair(),
            cutover: book.cutover,
            terminals,
            admin_changes: book.admin_done.iter().map(record).collect(),
        })
    }

    /// The merchant's policy of version `version`: the one in force, or one of the last
    /// [`POLICY_HISTORY_MAX`](super::book::POLICY_HISTORY_MAX) it replaced.
    pub fn policy_at(&self, merchant: &str, version: u32) -> Option<Policy> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        if book.policy_version == version {
            return Some(book.policy.clone());
        }
        book.policy_history
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, p)| p.clone())
    }

    /// The sale with retrieval reference `rrn` and its answer.
    pub fn transaction_by_rrn(&self, merchant: &str, rrn: &str) -> Option<Looked> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let idx = *book.by_rrn.get(&super::money::rrn_key(rrn)?)?;
        let e = book.entries.get(idx as usize)?;
        Some(Looked {
            txn: Some(txn_view(&book, e)),
            answer: (e.kind == Kind::Sale && e.state != OriginalState::NotApproved)
                .then(|| book.sale_decision(idx)),
            policy_version: None,
        })
    }

    /// The request with idempotency key (terminal, STAN, local date MMDD, MTI class — 2 for
    /// sales, refunds and voids, 4 for reversals, 5 for settlements) and its stored answer.
    pub fn transaction_by_key(
        &self,
        merchant: &str,
        terminal: &str,
        stan: u32,
        mmdd: u16,
        class: u8,
    ) -> Option<Looked> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let term = book.term_index(terminal)?;
        let key = pack_key(term, stan, mmdd, class);
        let (_, answer) = book.stored(key)?;
        let txn = match book.answers.get(&key) {
            Some(Stored::Sale { idx, .. }) => book.entries.get(*idx as usize),
            Some(Stored::Refund(a)) => book.entries.get(a.idx as usize),
            _ => None,
        };
        let policy_version = match book.answers.get(&key) {
            Some(s) => s.policy_version(),
            None => book.declines.get(&key).map(|a| a.policy_version),
        };
        Some(Looked {
            txn: txn.map(|e| txn_view(&book, e)),
            answer: Some(answer),
            policy_version,
        })
    }

    /// What a refund of the original `reference` names on `terminal` (default: the sale's)
    /// would get now: the DE54 figures and the rule that binds (DOMAIN §5).
    pub fn would_pass(
        &self,
        merchant: &str,
        terminal: &str,
        reference: OriginalRef<'_>,
        asking: Option<&str>,
        now: UnixSeconds,
    ) -> Option<WouldPass> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let idx = book.lookup(reference, book.term_index(terminal)?)?;
        let sale = *book.entries.get(idx as usize)?;
        let term = match asking {
            Some(t) => book.term_index(t)?,
            None => sale.key.term,
        };
        let who = Who {
            term,
            pan_hash: sale.pan_hash,
            card: sale.card,
        };
        let figs = book.with_de54(
            Decision::bare(Reason::APPROVED).figures,
            idx,
            who,
            now,
            true,
        );
        let (binding, resets_at) = binding(&book, &sale, idx, who, now);
        let p = &book.policy;
        let void_would_pass = book.void_would_pass(idx, sale.key.term, now, true);
        Some(WouldPass {
            original: txn_view(&book, &sale),
            terminal: book.terms.get(usize::from(term))?.id,
            amount: figs.would_pass.unwrap_or(0),
            original_remaining: figs.original_remaining.unwrap_or(0),
            allowance: figs.day_allowance_remaining.unwrap_or(0),
            binding,
            resets_at,
            void_would_pass,
            use_void: p.same_day_refund == SameDayRefund::UseVoid && void_would_pass,
        })
    }

    /// The refunds today (merchant-local day) of the card that paid for the sale with
    /// retrieval reference `rrn`, committed and in flight, against the per-card caps: the
    /// operator names the card by a transaction, so no PAN travels in the request.
    pub fn card_usage(&self, merchant: &str, rrn: &str, now: UnixSeconds) -> Option<CardUsage> {
        let book = self.books.get(&MerchantId::new(merchant)?)?;
        let idx = *book.by_rrn.get(&super::money::rrn_key(rrn)?)?;
        let sale = *book.entries.get(idx as usize)?;
        let who = Who {
            term: sale.key.term,
            pan_hash: sale.pan_hash,
            card: sale.card,
        };
        let (amount, count) = card_used(&book, who, &Period::at(&book.policy, now));
        let p = &book.policy;
        Some(CardUsage {
            pan: txn_view(&book, &sale).pan,
            day_amount: amount,
            day_count: count,
            day_amount_max: p.card_refund_day_amount_max,
            day_count_max: p.card_refund_day_count_max.map(u64::from),
        })
    }

    /// An operator's change of `merchant` (issue 22), handed to `log` and then applied under
    /// the merchant's shard, so it takes its place in journal order. A request id already
    /// applied gets its stored result and changes nothing; the same id with another change
    /// is refused `DUPLICATE`. Invalid changes are refused with their reason
    /// (`INVALID_AMOUNT`, `UNKNOWN_TERMINAL`).
    pub fn admin_logged<E: From<Refused>>(
        &self,
        merchant: &str,
        request: AdminId,
        who: AdminId,
        intent: AdminIntent<'_>,
        now: UnixSeconds,
        log: impl FnOnce(&LedgerEvent) -> Result<u64, E>,
    ) -> Result<AdminOutcome, E> {
        let mut book = self.book_mut(merchant)?;
        if let Some(done) = book.admin_result(&request) {
            if !same_change(&book, done.action, intent) {
                return Err(Refused(Reason::DUPLICATE).into());
            }
            return Ok(AdminOutcome {
                record: record(&done),
                repeat: true,
            });
        }
        let action = admin_action(&book, intent)?;
        let change = AdminChange {
            request,
            who,
            action,
        };
        let event = LedgerEvent {
            merchant: book.id,
            at: now,
            body: EventBody::Admin(Box::new(change)),
        };
        let seq = log(&event)?;
        book.last_logged = seq;
        let decision = book.apply(now, &event.body);
        Ok(AdminOutcome {
            record: AdminRecord {
                request,
                who,
                at: now,
                action,
                decision,
            },
            repeat: false,
        })
    }

    /// The merchants' ids, in merchant-file order.
    pub fn merchant_ids(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|id| id.as_str())
    }
}

trait IntoPair {
    fn into_pair(self) -> (u64, u64);
}

impl IntoPair for (u64, u32) {
    fn into_pair(self) -> (u64, u64) {
        (self.0, u64::from(self.1))
    }
}

fn record(d: &super::book::AdminDone) -> AdminRecord {
    AdminRecord {
        request: d.request,
        who: d.who,
        at: d.at,
        action: d.action,
        decision: d.decision,
    }
}

fn txn_view(book: &Book, e: &Entry) -> TxnView {
    let cup = e.key.tag & super::originals::TAG_CUP != 0;
    TxnView {
        kind: match e.kind {
            Kind::Sale => "sale",
            Kind::Refund => "refund",
            Kind::Void => "void",
            Kind::Tombstone => "reversal_tombstone",
        },
        terminal: book
            .terms
            .get(usize::from(e.key.term))
            .map(|t| t.id)
            .unwrap_or_default(),
        stan: e.key.stan,
        transmission: if cup { 0 } else { e.key.tag },
        amount: e.amount,
        refunded: e.refunded,
        refund_count: e.refund_count,
        state: e.state_at(book.term_epoch(e.key.term)),
        pan: e.pan,
        card: e.card,
        batch: e.batch,
        at: e.at,
    }
}

/// The operator's intent as the event to journal, from the book's state.
fn admin_action(book: &Book, intent: AdminIntent<'_>) -> Result<AdminAction, Refused> {
    let term = |t: &str| {
        book.term_index(t)
            .and_then(|i| book.terms.get(usize::from(i)).map(|x| (i, x.id)))
            .ok_or(Refused(Reason::UNKNOWN_TERMINAL))
    };
    Ok(match intent {
        AdminIntent::TopUp { amount } => {
            if amount == 0 || amount > AMOUNT_MINOR_MAX {
                return Err(Refused(Reason::INVALID_AMOUNT));
            }
            AdminAction::TopUp { amount }
        }
        AdminIntent::Settle => match book.settle_body() {
            EventBody::Settle {
                payout,
                reserve_used,
            } => AdminAction::Settle {
                payout,
                reserve_used,
            },
            _ => return Err(Refused(Reason::INTERNAL_ERROR)),
        },
        AdminIntent::SettleTerminal { terminal } => {
            let (i, id) = term(terminal)?;
            let (payout, reserve_used) = book.terminal_payout(i);
            AdminAction::SettleTerminal {
                terminal: id,
                payout,
                reserve_used,
            }
        }
        AdminIntent::TerminalRefunds { terminal, enabled } => AdminAction::TerminalRefunds {
            terminal: term(terminal)?.1,
            enabled,
        },
    })
}

/// Whether a stored change is what `intent` asks (payouts are computed, not asked).
fn same_change(book: &Book, done: AdminAction, intent: AdminIntent<'_>) -> bool {
    let same_term = |a: TerminalId, b: &str| {
        book.term_index(b)
            .is_some_and(|i| book.terms.get(usize::from(i)).is_some_and(|t| t.id == a))
    };
    match (done, intent) {
        (AdminAction::TopUp { amount: a }, AdminIntent::TopUp { amount: b }) => a == b,
        (AdminAction::Settle { .. }, AdminIntent::Settle) => true,
        (
            AdminAction::SettleTerminal { terminal, .. },
            AdminIntent::SettleTerminal { terminal: t },
        ) => same_term(terminal, t),
        (
            AdminAction::TerminalRefunds { terminal, enabled },
            AdminIntent::TerminalRefunds {
                terminal: t,
                enabled: e,
            },
        ) => enabled == e && same_term(terminal, t),
        _ => false,
    }
}

/// When the merchant-local day and month containing `now` end.
struct Period {
    today: super::money::LocalDate,
    midnight: UnixSeconds,
    month_start: UnixSeconds,
}

impl Period {
    fn at(p: &Policy, now: UnixSeconds) -> Period {
        let today = p.utc_offset.local(now);
        let offset = i64::from(p.utc_offset.seconds());
        Period {
            today,
            midnight: (i64::from(today.day) + 1) * SECONDS_PER_DAY - offset,
            month_start: days_from_month(today.month.saturating_add(1)) * SECONDS_PER_DAY - offset,
        }
    }
}

/// What binds, and when it lifts (`None`: time alone does not lift it).
type Binding = (Reason, Option<UnixSeconds>);

/// The rule that sets DE54 type 92 for a refund of the sale at `idx` by `who` at `now`, and
/// when it lifts: the same terms as `Book::with_de54`, in the order of DOMAIN §5 rows 9–13,
/// so a refund of one unit more is declined with exactly this reason (`BALANCE_PENDING`
/// instead of `BALANCE_INSUFFICIENT` while sales in transit would cover it).
fn binding(book: &Book, sale: &Entry, idx: u32, who: Who, now: UnixSeconds) -> Binding {
    let period = Period::at(&book.policy, now);
    if let Some(b) = blocked(book, sale, idx, who, now, &period) {
        return b;
    }
    let (smallest, reason, resets) = smallest_cap(book, sale, idx, who, &period);
    if book.policy.same_day_refund == SameDayRefund::UseVoid
        && smallest >= sale.amount
        && book.void_would_pass(idx, who.term, now, true)
    {
        return (Reason::USE_VOID, Some(period.midnight));
    }
    (reason, resets)
}

/// A rule that no smaller amount satisfies (state, window, permission, a count): DE54 92 is 0.
fn blocked(
    book: &Book,
    sale: &Entry,
    idx: u32,
    who: Who,
    now: UnixSeconds,
    period: &Period,
) -> Option<Binding> {
    let p = &book.policy;
    if sale.kind != Kind::Sale {
        return Some((Reason::TYPE_NOT_REFUNDABLE, None));
    }
    match sale.state {
        OriginalState::NotApproved => return Some((Reason::ORIGINAL_NOT_APPROVED, None)),
        OriginalState::Voided => return Some((Reason::ORIGINAL_VOIDED, None)),
        OriginalState::Reversed => return Some((Reason::ORIGINAL_REVERSED, None)),
        OriginalState::Approved | OriginalState::Settled => {}
    }
    if now.saturating_sub(sale.at) > i64::from(p.refund_window_days) * SECONDS_PER_DAY {
        return Some((Reason::REFUND_WINDOW_EXPIRED, None));
    }
    let term_ok = book
        .terms
        .get(usize::from(who.term))
        .is_some_and(|t| t.refund_enabled);
    if !p.refund_enabled || !term_ok {
        return Some((Reason::TERMINAL_NOT_PERMITTED, None));
    }
    if p.denied_card_types.contains(&who.card) {
        return Some((Reason::CARD_NOT_PERMITTED, None));
    }
    let held = book.held_of(idx);
    let (_, card_count) = card_used(book, who, period);
    let counts = [
        (
            p.original_refund_count_max,
            u64::from(sale.refund_count) + u64::from(held.1),
            Reason::ORIGINAL_REFUND_COUNT,
            None,
        ),
        (
            p.card_refund_day_count_max,
            card_count,
            Reason::CARD_DAY_COUNT,
            Some(period.midnight),
        ),
        (
            p.refund_day_count_max,
            book.day_used(period.today.day).1,
            Reason::MERCHANT_DAY_COUNT,
            Some(period.midnight),
        ),
        (
            p.refund_month_count_max,
            book.month_used(period.today.month).1,
            Reason::MERCHANT_MONTH_COUNT,
            Some(period.month_start),
        ),
    ];
    counts
        .into_iter()
        .find(|(max, used, _, _)| max.is_some_and(|m| *used >= u64::from(m)))
        .map(|(_, _, r, at)| (r, at))
}

/// The smallest amount cap (row 10, row 12 in its order, then row 13; the first smallest
/// binds), its reason and when it lifts.
fn smallest_cap(
    book: &Book,
    sale: &Entry,
    idx: u32,
    who: Who,
    period: &Period,
) -> (u64, Reason, Option<UnixSeconds>) {
    let p = &book.policy;
    let held = book.held_of(idx);
    let (card_amount, _) = card_used(book, who, period);
    let day_amount = book.day_used(period.today.day).0;
    let month_amount = book.month_used(period.today.month).0;
    let left = |m: Option<u64>, used: u64| m.map_or(u64::MAX, |m| m.saturating_sub(used));
    let candidates = [
        (
            sale.remaining().saturating_sub(held.0),
            Reason::AMOUNT_EXCEEDS_REMAINING,
            None,
        ),
        (AMOUNT_MINOR_MAX, Reason::INVALID_AMOUNT, None),
        (
            p.refund_single_max.unwrap_or(u64::MAX),
            Reason::SINGLE_REFUND_CAP,
            None,
        ),
        (
            book.share_left(sale, held.0),
            Reason::REFUNDABLE_SHARE,
            None,
        ),
        (
            left(p.card_refund_day_amount_max, card_amount),
            Reason::CARD_DAY_AMOUNT,
            Some(period.midnight),
        ),
        (
            left(p.refund_day_amount_max, day_amount),
            Reason::MERCHANT_DAY_AMOUNT,
            Some(period.midnight),
        ),
        (
            left(p.refund_month_amount_max, month_amount),
            Reason::MERCHANT_MONTH_AMOUNT,
            Some(period.month_start),
        ),
        (book.funds(true), Reason::BALANCE_INSUFFICIENT, None),
    ];
    let mut best = candidates[0];
    for c in candidates {
        if c.0 < best.0 {
            best = c;
        }
    }
    best
}

/// The card's refunds today, committed and in flight: (amount, count).
fn card_used(book: &Book, who: Who, period: &Period) -> (u64, u64) {
    let day = period.today.day;
    let card = book
        .cards
        .get(&who.pan_hash)
        .map_or((0, 0), |b| b.in_period(day));
    let held = book
        .held_cards
        .get(&who.pan_hash)
        .map_or((0, 0), |h| h.in_period(day));
    (
        card.0.saturating_add(held.0),
        u64::from(card.1) + u64::from(held.1),
    )
}

/// Days since 1970-01-01 of the first day of month number `m` (`year * 12 + month - 1`).
fn days_from_month(m: i32) -> i64 {
    crate::date::Civil::first_of_month(i64::from(m)).to_days()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::days_from_month;
    use crate::ledger::{Ledger, MerchantSet, Operation, OriginalRef, PanKey, Reason, Request};

    /// 2026-01-31T16:00:00Z, which is 2026-02-01T00:00 in +08:00.
    const T0: i64 = 1_769_875_200;

    fn ledger(knobs: &str) -> Ledger {
        let set = MerchantSet::from_toml_str(&format!(
            "[profiles.p]\nreserve = 1000000\nutc_offset = \"+08:00\"\ncurrency = 840\n{knobs}\n\
             [[merchants]]\nid = \"M\"\nprofile = \"p\"\nterminals = [{{ id = \"T1\" }}]\n"
        ))
        .unwrap();
        Ledger::new(&set, PanKey::new(&[3; 16]))
    }

    fn req(op: Operation, stan: u32, amount: u64, original: Option<u32>) -> Request<'static> {
        Request::test_ascii(op, stan, amount, original, 201)
    }

    fn sale_ref() -> OriginalRef<'static> {
        OriginalRef::Iso {
            mti: 200,
            stan: 1,
            transmission: 201_000_001,
            rrn: None,
        }
    }

    #[test]
    fn a_day_cap_binds_until_local_midnight_and_one_unit_more_is_declined_by_it() {
        let l = ledger("refund_day_amount_max = 5000");
        assert_eq!(
            l.decide(&req(Operation::Sale, 1, 9_000, None), T0).reason,
            Reason::APPROVED
        );
        let now = T0 + 3600;
        assert_eq!(
            l.decide(&req(Operation::Refund, 2, 2_000, Some(1)), now)
                .reason,
            Reason::APPROVED
        );
        let w = l.would_pass("M", "T1", sale_ref(), None, now).unwrap();
        assert_eq!((w.amount, w.binding), (3_000, Reason::MERCHANT_DAY_AMOUNT));
        // Local midnight after 2026-02-01T01:00+08:00 is 2026-02-01T16:00Z.
        assert_eq!(w.resets_at, Some(T0 + 86_400));
        let over = l.decide(&req(Operation::Refund, 3, 3_001, Some(1)), now);
        assert_eq!(over.reason, w.binding);
        assert_eq!(over.figures.would_pass, Some(w.amount));
        assert_eq!(
            l.decide(&req(Operation::Refund, 4, 3_000, Some(1)), now)
                .reason,
            Reason::APPROVED
        );
    }

    #[test]
    fn a_reached_count_makes_nothing_pass_until_the_month_ends() {
        let l = ledger("refund_month_count_max = 1");
        assert_eq!(
            l.decide(&req(Operation::Sale, 1, 9_000, None), T0).reason,
            Reason::APPROVED
        );
        assert_eq!(
            l.decide(&req(Operation::Refund, 2, 100, Some(1)), T0)
                .reason,
            Reason::APPROVED
        );
        let w = l.would_pass("M", "T1", sale_ref(), None, T0).unwrap();
        assert_eq!((w.amount, w.binding), (0, Reason::MERCHANT_MONTH_COUNT));
        // 2026-03-01T00:00+08:00.
        assert_eq!(w.resets_at, Some(1_772_294_400));
        assert_eq!(
            l.decide(&req(Operation::Refund, 3, 1, Some(1)), T0).reason,
            Reason::MERCHANT_MONTH_COUNT
        );
    }

    #[test]
    fn month_starts_are_the_first_days_of_their_months() {
        // 1970-01-01 is day 0; 2024-03-01 is day 19783 (2024 is a leap year).
        assert_eq!(days_from_month(1970 * 12), 0);
        assert_eq!(days_from_month(2024 * 12 + 2), 19_783);
        assert_eq!(days_from_month(2025 * 12), 20_089);
    }
}
