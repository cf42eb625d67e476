//! Snapshots: the durable state of every book in one deterministic byte string, so restart
//! replays only the journal tail written after it.
//!
//! Layout (version [`SNAPSHOT_VERSION`]): magic `RGLS`, version, merchant count, then per
//! merchant its id, funds, counters, terminals, cards, entries, RRN index and stored
//! answers, each map sorted by key so equal states give equal bytes. In-flight reservations
//! are not part of it.

use super::book::{AdminDone, Book, Term};
use super::counters::Bucket;
use super::event::{AdminChange, DecodeError, Reader, Writer};
use super::idempotency::{FullAnswer, RefundAnswer, Stored};
use super::money::{CardType, MaskedPan, PanKey};
use super::originals::{Entries, Entry, Kind, OriginalState, RefKey, NO_LINK};
use super::{Ledger, MerchantSet};
use crate::limits::SNAPSHOT_ITEMS_MAX;

const MAGIC: &[u8; 4] = b"RGLS";

/// Snapshot layout version. 2 added per-terminal settlement epochs, the entries' base index
/// and the reconciliation list; 3 the terminals' refund switches and the operators' changes
/// (admin API, issue 22). Older snapshots still restore.
const SNAPSHOT_VERSION: u8 = 4;

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a snapshot of this version.
    #[error("snapshot: {0}")]
    Decode(#[from] DecodeError),
    /// The snapshot names a merchant the merchant set does not have.
    #[error("snapshot merchant {0:?} is not in the merchant set")]
    UnknownMerchant(String),
    /// A merchant's terminal list differs from the snapshot's (indexes would not match).
    #[error("snapshot merchant {0:?}: terminal list differs from the merchant set")]
    Terminals(String),
    /// An index in the snapshot does not fit it (an answer, RRN or link index past the
    /// entries, a terminal index past the terminal list): refused rather than trusted, since
    /// lookups through it would later find nothing, or the wrong transaction.
    #[error("snapshot merchant {merchant:?}: {what} does not fit the snapshot")]
    Inconsistent {
        /// The merchant whose book is inconsistent.
        merchant: String,
        /// Which index.
        what: &'static str,
    },
}

impl Ledger {
    /// Appends a snapshot of the durable state to `out`.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        self.snapshot_head(out);
        for id in &self.order {
            self.snapshot_book(id, out);
        }
    }

    /// The merchants of a snapshot, in the order [`Ledger::snapshot_book`] must write them.
    pub fn snapshot_order(&self) -> &[super::MerchantId] {
        &self.order
    }

    /// Appends the head of a snapshot (magic, version, merchant count) to `out`: then call
    /// [`Ledger::snapshot_book`] for each merchant of [`Ledger::snapshot_order`], in order.
    /// The bytes are those of [`Ledger::snapshot`]; taken book by book, a caller can hold
    /// each merchant still (the replicated journal's per-merchant lock) only while its book
    /// is written.
    pub fn snapshot_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        let w = &mut Writer(out);
        w.u8(SNAPSHOT_VERSION);
        w.u64(self.order.len() as u64);
    }

    /// Appends the durable state of merchant `id`'s book to `out` (see
    /// [`Ledger::snapshot_head`]).
    pub fn snapshot_book(&self, id: &super::MerchantId, out: &mut Vec<u8>) {
        if let Some(book) = self.books.get(id) {
            write_book(&mut Writer(out), &book);
        }
    }

    /// Replaces every book's durable state with a snapshot's, keeping the reservations in
    /// flight (the replicated journal loads a snapshot into the ledger the gateway already
    /// shares). Nothing changes when the snapshot cannot be restored.
    pub fn restore_in_place(&self, bytes: &[u8]) -> Result<(), RestoreError> {
        let restored = Ledger::restore(&self.merchants, self.pan_key.clone(), bytes)?;
        self.adopt_durable(restored);
        Ok(())
    }

    /// A ledger for `merchants` in the state a snapshot recorded (policies come from
    /// `merchants`; funds, counters, originals and answers from the snapshot).
    pub fn restore(
        merchants: &MerchantSet,
        pan_key: PanKey,
        bytes: &[u8],
    ) -> Result<Ledger, RestoreError> {
        let ledger = Ledger::new(merchants, pan_key);
        let body = bytes
            .strip_prefix(MAGIC)
            .ok_or(DecodeError::Invalid("magic"))?;
        let r = &mut Reader(body);
        let v = r.u8()?;
        if !(1..=SNAPSHOT_VERSION).contains(&v) {
            return Err(DecodeError::Version(v).into());
        }
        let n = count(r)?;
        for _ in 0..n {
            let id: super::MerchantId = r.id()?;
            let mut book = ledger
                .books
                .get_mut(&id)
                .ok_or_else(|| RestoreError::UnknownMerchant(id.as_str().to_string()))?;
            read_book(r, &mut book, v)?;
        }
        r.end()?;
        Ok(ledger)
    }
}

fn count(r: &mut Reader<'_>) -> Result<u64, DecodeError> {
    let n = r.u64()?;
    if n > SNAPSHOT_ITEMS_MAX || n > r.0.len() as u64 {
        return Err(DecodeError::Invalid("count"));
    }
    Ok(n)
}

fn write_bucket(w: &mut Writer<'_>, b: &Bucket) {
    w.i64(i64::from(b.period));
    w.u64(b.amount);
    w.u64(u64::from(b.count));
}

fn read_bucket(r: &mut Reader<'_>) -> Result<Bucket, DecodeError> {
    Ok(Bucket {
        period: i32::try_from(r.i64()?).map_err(|_| DecodeError::Invalid("period"))?,
        amount: r.u64()?,
        count: r.u32()?,
    })
}

fn write_book(w: &mut Writer<'_>, b: &Book) {
    w.id(&b.id);
    w.u64(u64::from(b.epoch));
    w.u8(u8::from(b.cutover));
    w.u64(b.reserve);
    w.u64(b.unsettled);
    w.u64(b.committed);
    write_bucket(w, &b.day);
    write_bucket(w, &b.month);
    w.u64(b.reversal_noops);
    w.u64(b.reversals_not_applied);
    w.i64(i64::from(b.cutover_day));
    w.u64(b.not_applied.len() as u64);
    for i in &b.not_applied {
        w.u64(u64::from(*i));
    }
    w.u64(b.answers_prune_len as u64);
    w.u64(b.terms.len() as u64);
    for t in &b.terms {
        w.id(&t.id);
        w.u64(u64::from(t.batch));
        w.u8(u8::from(t.signed_on));
        w.u64(u64::from(t.epoch));
    }
    let mut cards: Vec<_> = b.cards.iter().collect();
    cards.sort_unstable_by_key(|(k, _)| **k);
    w.u64(cards.len() as u64);
    for (k, v) in cards {
        w.0.extend_from_slice(&k.to_le_bytes());
        write_bucket(w, v);
    }
    w.u64(u64::from(b.entries.base()));
    w.u64(b.entries.len() as u64);
    for e in b.entries.iter() {
        write_entry(w, e);
    }
    // RRNs of pruned entries may linger until a bulk clean-up: never written.
    let base = b.entries.base();
    let mut rrns: Vec<_> = b.by_rrn.iter().filter(|(_, i)| **i >= base).collect();
    rrns.sort_unstable();
    w.u64(rrns.len() as u64);
    for (k, v) in rrns {
        w.u64(*k);
        w.u64(u64::from(*v));
    }
    let mut answers: Vec<_> = b.answers.iter().collect();
    answers.sort_unstable_by_key(|(k, _)| **k);
    w.u64(answers.len() as u64);
    for (k, s) in answers {
        w.u64(*k);
        match s {
            Stored::Sale { fingerprint, idx } => {
                w.u8(0);
                w.0.extend_from_slice(&fingerprint.to_le_bytes());
                w.u64(u64::from(*idx));
            }
            Stored::Refund(a) => {
                w.u8(2);
                w.0.extend_from_slice(&a.fingerprint.to_le_bytes());
                w.u64(u64::from(a.idx));
                w.u64(a.original_remaining);
                w.opt(a.day_allowance);
                w.opt(a.would_pass);
                w.u64(u64::from(a.policy_version));
            }
            Stored::Full(a) => {
                w.u8(1);
                w.0.extend_from_slice(&a.fingerprint.to_le_bytes());
                w.i64(a.at);
                w.decision(&a.decision);
                w.u64(u64::from(a.policy_version));
            }
        }
    }
    // Version 3: what operators changed.
    for t in &b.terms {
        w.u8(u8::from(t.refund_enabled));
    }
    w.u64(b.admin_done.len() as u64);
    for d in &b.admin_done {
        w.admin(&AdminChange {
            request: d.request,
            who: d.who,
            action: d.action,
        });
        w.i64(d.at);
        w.decision(&d.decision);
    }
    w.u64(u64::from(b.policy_version));
    w.policy(&b.policy);
    // Version 4: the earlier policies (the stored answers carry their versions).
    w.u64(b.policy_history.len() as u64);
    for (version, policy) in &b.policy_history {
        w.u64(u64::from(*version));
        w.policy(policy);
    }
}

fn write_entry(w: &mut Writer<'_>, e: &Entry) {
    w.u64(e.amount);
    w.u64(e.refunded);
    w.0.extend_from_slice(&e.pan_hash.to_le_bytes());
    w.i64(e.at);
    w.u64(e.pan.to_u64());
    w.u64(u64::from(e.key.term));
    w.u64(u64::from(e.key.stan));
    w.u64(u64::from(e.key.tag));
    w.u64(u64::from(e.link));
    w.u64(u64::from(e.epoch));
    w.u64(u64::from(e.batch));
    w.u64(u64::from(e.refund_count));
    w.u8(e.kind as u8);
    w.u8(e.state as u8);
    w.u8(e.card.to_u8());
}

fn read_entry(r: &mut Reader<'_>) -> Result<Entry, DecodeError> {
    let small = |v: u64, what| u16::try_from(v).map_err(|_| DecodeError::Invalid(what));
    Ok(Entry {
        amount: r.u64()?,
        refunded: r.u64()?,
        pan_hash: r.fixed_u64()?,
        at: r.i64()?,
        pan: MaskedPan::from_u64(r.u64()?),
        key: RefKey {
            term: small(r.u64()?, "terminal index")?,
            stan: r.u32()?,
            tag: r.u32()?,
        },
        link: r.u32()?,
        epoch: r.u32()?,
        batch: r.u32()?,
        refund_count: small(r.u64()?, "refund count")?,
        kind: Kind::from_u8(r.u8()?).ok_or(DecodeError::Invalid("kind"))?,
        state: OriginalState::from_u8(r.u8()?).ok_or(DecodeError::Invalid("state"))?,
        card: CardType::from_u8(r.u8()?).ok_or(DecodeError::Invalid("card type"))?,
    })
}

fn read_book(r: &mut Reader<'_>, b: &mut Book, version: u8) -> Result<(), RestoreError> {
    b.epoch = r.u32()?;
    b.cutover = r.u8()? != 0;
    b.reserve = r.u64()?;
    b.unsettled = r.u64()?;
    b.committed = r.u64()?;
    b.day = read_bucket(r)?;
    b.month = read_bucket(r)?;
    b.reversal_noops = r.u64()?;
    if version >= 2 {
        b.reversals_not_applied = r.u64()?;
        b.cutover_day = i32::try_from(r.i64()?).map_err(|_| DecodeError::Invalid("day"))?;
        for _ in 0..count(r)? {
            b.not_applied.push(r.u32()?);
        }
    }
    b.answers_prune_len =
        usize::try_from(r.u64()?).map_err(|_| DecodeError::Invalid("prune length"))?;
    // Not in the snapshot: unknown, so the next prune scans (and finds the oldest).
    b.answers_oldest_at = crate::clock::UnixSeconds::MIN;
    let nt = count(r)?;
    let mut terms: Vec<Term> = Vec::new();
    for _ in 0..nt {
        let id = r.id()?;
        let batch = r.u32()?;
        let signed_on = r.u8()? != 0;
        // Version 1 had one epoch for the whole merchant.
        let epoch = if version >= 2 { r.u32()? } else { b.epoch };
        let refund_enabled = b
            .term_index(id.as_str())
            .is_some_and(|i| b.terms[usize::from(i)].refund_enabled);
        terms.push(Term {
            id,
            refund_enabled,
            batch,
            signed_on,
            epoch,
        });
    }
    let same =
        terms.len() == b.terms.len() && terms.iter().zip(&b.terms).all(|(a, c)| a.id == c.id);
    if !same {
        return Err(RestoreError::Terminals(b.id.as_str().to_string()));
    }
    b.terms = terms;
    for _ in 0..count(r)? {
        let k = r.fixed_u64()?;
        b.cards.insert(k, read_bucket(r)?);
    }
    let base = if version >= 2 { r.u32()? } else { 0 };
    let ne = count(r)?;
    b.entries = Entries::starting_at(base);
    b.entries.reserve(usize::try_from(ne).unwrap_or(0));
    for i in 0..ne {
        let e = read_entry(r)?;
        if e.kind == Kind::Tombstone {
            b.tombstones = b.tombstones.saturating_add(1);
        }
        let idx = u32::try_from(i)
            .ok()
            .and_then(|i| i.checked_add(base))
            .ok_or(DecodeError::Invalid("index"))?;
        b.by_ref.insert(e.key, idx);
        b.entries.push(e);
    }
    for _ in 0..count(r)? {
        let k = r.u64()?;
        b.by_rrn.insert(k, r.u32()?);
    }
    for _ in 0..count(r)? {
        let k = r.u64()?;
        let s = match r.u8()? {
            0 => Stored::Sale {
                fingerprint: r.fixed_u64()?,
                idx: r.u32()?,
            },
            1 => Stored::Full(Box::new(FullAnswer {
                fingerprint: r.fixed_u64()?,
                at: r.i64()?,
                decision: r.decision_v(version)?,
                policy_version: if version >= 4 { r.u32()? } else { 0 },
            })),
            2 => Stored::Refund(Box::new(RefundAnswer {
                fingerprint: r.fixed_u64()?,
                idx: r.u32()?,
                original_remaining: r.u64()?,
                day_allowance: r.opt()?,
                would_pass: if version >= 2 { r.opt()? } else { None },
                policy_version: if version >= 4 { r.u32()? } else { 0 },
            })),
            _ => return Err(DecodeError::Invalid("answer tag").into()),
        };
        b.answers.insert(k, s);
    }
    if version >= 3 {
        for t in &mut b.terms {
            t.refund_enabled = r.u8()? != 0;
        }
        for _ in 0..count(r)? {
            let change = r.admin()?;
            b.admin_done.push_back(AdminDone {
                request: change.request,
                who: change.who,
                at: r.i64()?,
                action: change.action,
                decision: r.decision_v(version)?,
            });
        }
        b.policy_version = r.u32()?;
        b.policy = r.policy()?;
    }
    if version >= 4 {
        for _ in 0..count(r)? {
            let v = r.u32()?;
            let policy = r.policy()?;
            if b.policy_history.len() >= super::book::POLICY_HISTORY_MAX {
                return Err(DecodeError::Invalid("policy history").into());
            }
            b.policy_history.push_back((v, policy));
        }
    }
    check_indexes(b)
}

/// Every index a book keeps must name something the snapshot has: the terminal of an entry,
/// the sale a refund or void links to, the entry of an RRN and of a stored answer. The
/// checksum only proves the bytes are the ones written; this proves they fit together, so
/// a lookup after restore can never point past the entries (or at the wrong kind of one).
fn check_indexes(b: &Book) -> Result<(), RestoreError> {
    let bad = |what| {
        Err(RestoreError::Inconsistent {
            merchant: b.id.as_str().to_string(),
            what,
        })
    };
    let entry = |i: u32| b.entries.get(i as usize);
    for e in b.entries.iter() {
        if usize::from(e.key.term) >= b.terms.len() {
            return bad("the terminal index of an entry");
        }
        match (e.kind, e.link) {
            // A sale older than the entries held was pruned before its refunds (oldest first).
            (Kind::Refund | Kind::Void, link) if link < b.entries.base() => {}
            (Kind::Refund | Kind::Void, link) => {
                if !entry(link).is_some_and(|s| s.kind == Kind::Sale) {
                    return bad("the sale a refund or void links to");
                }
            }
            (Kind::Sale | Kind::Tombstone, NO_LINK) => {}
            (Kind::Sale | Kind::Tombstone, _) => return bad("the link of a sale or tombstone"),
        }
    }
    if b.by_rrn
        .values()
        .any(|&i| i >= b.entries.base() && entry(i).is_none())
    {
        return bad("an RRN index");
    }
    for s in b.answers.values() {
        let idx = match s {
            Stored::Sale { idx, .. } => *idx,
            Stored::Refund(a) => a.idx,
            Stored::Full(_) => continue,
        };
        // Below the base: its entry was pruned and the answer is pruned later (a lookup
        // finds nothing); past the entries held it is corrupt.
        if idx >= b.entries.base() && entry(idx).is_none() {
            return bad("the entry of a stored answer");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ledger::{MerchantId, Operation, Reason, Refused, Request};

    const T0: i64 = 1_769_871_600;
    const DAY: i64 = 86_400;
    const KEY: &[u8; 16] = b"test-pan-key-16b";

    fn set() -> MerchantSet {
        MerchantSet::from_toml_str(
            "[profiles.p]\nreserve = 1000000\nutc_offset = \"+08:00\"\ncurrency = 840\n\
             [[merchants]]\nid = \"M\"\nprofile = \"p\"\n\
             terminals = [{ id = \"T1\" }, { id = \"T2\" }]\n",
        )
        .unwrap()
    }

    /// An ascii request of terminal T1; `original` is the STAN of the sale it refers to.
    fn req(op: Operation, stan: u32, amount: u64, original: Option<u32>) -> Request<'static> {
        Request::test_ascii(op, stan, amount, original, 131)
    }

    /// Two sales, one refunded: entries 0 (sale 1), 1 (sale 2), 2 (refund of sale 1).
    fn ledger() -> Ledger {
        let l = Ledger::new(&set(), PanKey::new(KEY));
        for stan in [1, 2] {
            let d = l.decide(&req(Operation::Sale, stan, 10_000, None), T0);
            assert_eq!(d.reason, Reason::APPROVED);
        }
        let d = l.decide(&req(Operation::Refund, 3, 1_000, Some(1)), T0 + DAY);
        assert_eq!(d.reason, Reason::APPROVED);
        l
    }

    /// The snapshot of `l` after `damage` changed its book: what a writer with a bug (or a
    /// damaged file whose checksum still matched) would leave.
    fn damaged(l: &Ledger, damage: impl FnOnce(&mut Book)) -> Vec<u8> {
        damage(&mut l.books.get_mut(&MerchantId::new("M").unwrap()).unwrap());
        let mut snap = Vec::new();
        l.snapshot(&mut snap);
        snap
    }

    fn restore(snap: &[u8]) -> Result<Ledger, RestoreError> {
        Ledger::restore(&set(), PanKey::new(KEY), snap)
    }

    /// The scan that drops stored answers past their retention is skipped while none can
    /// have expired (it would keep them all), and still drops them once they have: live, and
    /// on a book restored from a snapshot.
    #[test]
    fn expired_stored_answers_are_dropped_as_the_book_grows_on_live_and_after_a_restore() {
        let answers = |l: &Ledger| {
            l.books
                .get(&MerchantId::new("M").unwrap())
                .unwrap()
                .answers
                .len()
        };
        for restored in [false, true] {
            let mut l = Ledger::new(&set(), PanKey::new(KEY));
            // Past the first prune threshold (1,024 answers): none has expired, none is dropped.
            for stan in 1..=1100 {
                let d = l.decide(&req(Operation::Sale, stan, 100, None), T0);
                assert_eq!(d.reason, Reason::APPROVED);
            }
            assert_eq!(answers(&l), 1100);
            if restored {
                let mut snap = Vec::new();
                l.snapshot(&mut snap);
                l = restore(&snap).unwrap();
            }
            // 26 h later the book grows past the next threshold (2,048): the first day's
            // answers are dropped, the new ones kept.
            for stan in 2001..=3100 {
                let d = l.decide(&req(Operation::Sale, stan, 100, None), T0 + 26 * 3600);
                assert_eq!(d.reason, Reason::APPROVED);
            }
            assert_eq!(answers(&l), 1100, "restored: {restored}");
        }
    }

    #[test]
    fn a_consistent_snapshot_restores_to_the_same_bytes() {
        let mut snap = Vec::new();
        ledger().snapshot(&mut snap);
        let mut again = Vec::new();
        restore(&snap).unwrap().snapshot(&mut again);
        assert_eq!(snap, again);
    }

    /// Operators' changes (issue 22) live in the snapshot: a terminal switched off stays off
    /// and a repeated request id still gets its stored result after a restore.
    #[test]
    fn operators_changes_survive_a_snapshot_and_their_repeats_change_nothing() {
        use crate::ledger::{AdminId, AdminIntent};
        let l = ledger();
        let id = |s: &str| AdminId::new(s).unwrap();
        let apply = |l: &Ledger, request: &str, intent| {
            l.admin_logged::<Refused>("M", id(request), id("ops@::1"), intent, T0, |_| Ok(1))
                .unwrap()
        };
        apply(
            &l,
            "off",
            AdminIntent::TerminalRefunds {
                terminal: "T1",
                enabled: false,
            },
        );
        apply(&l, "top", AdminIntent::TopUp { amount: 500 });
        let mut snap = Vec::new();
        l.snapshot(&mut snap);
        let r = restore(&snap).unwrap();
        let refused = r.decide(&req(Operation::Refund, 9, 100, Some(2)), T0 + DAY);
        assert_eq!(refused.reason, Reason::TERMINAL_NOT_PERMITTED);
        let again = apply(&r, "top", AdminIntent::TopUp { amount: 500 });
        assert!(again.repeat);
        assert_eq!(again.record.who.as_str(), "ops@::1");
        assert_eq!(r.funds("M").unwrap().reserve, l.funds("M").unwrap().reserve);
        let other = r.admin_logged::<Refused>(
            "M",
            id("top"),
            id("x"),
            AdminIntent::TopUp { amount: 1 },
            T0,
            |_| Ok(1),
        );
        assert_eq!(other.unwrap_err(), Refused(Reason::DUPLICATE));
    }

    /// Review finding (issue 17): restore took every index of a snapshot on trust. A snapshot
    /// whose stored refund answer points past the entries restored fine; the repeat of that
    /// acknowledged refund was then answered 00 for 0.00 instead of its stored answer.
    #[test]
    fn a_stored_answer_pointing_past_the_entries_is_refused() {
        let l = ledger();
        let repeat = req(Operation::Refund, 3, 1_000, Some(1));
        let before = l.decide(&repeat, T0 + DAY);
        assert_eq!(before.figures.amount, 1_000);
        let snap = damaged(&l, |b| {
            for s in b.answers.values_mut() {
                match s {
                    Stored::Sale { idx, .. } => *idx = 1_000,
                    Stored::Refund(a) => a.idx = 1_000,
                    Stored::Full(_) => {}
                }
            }
        });
        assert!(
            matches!(restore(&snap), Err(RestoreError::Inconsistent { .. })),
            "restored an answer index past the entries"
        );
    }

    #[test]
    fn an_rrn_index_past_the_entries_is_refused() {
        let snap = damaged(&ledger(), |b| {
            b.by_rrn.insert(42, 3);
        });
        assert!(matches!(
            restore(&snap),
            Err(RestoreError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_link_past_the_entries_is_refused() {
        let snap = damaged(&ledger(), |b| b.entries[2].link = 3);
        assert!(matches!(
            restore(&snap),
            Err(RestoreError::Inconsistent { .. })
        ));
    }

    /// An entry of a terminal the merchant does not have: the refund of that sale was
    /// answered 25 (original not found) although the sale is in the snapshot.
    #[test]
    fn a_terminal_index_past_the_terminal_list_is_refused() {
        let snap = damaged(&ledger(), |b| b.entries[1].key.term = 2);
        assert!(matches!(
            restore(&snap),
            Err(RestoreError::Inconsistent { .. })
        ));
    }

    /// Whatever restores is consistent: every refund, void, reversal and repeat after it is
    /// decided without a panic (the fuzz target `snapshot_restore` drives the same).
    #[test]
    fn traffic_after_a_restore_never_panics() {
        let mut snap = Vec::new();
        ledger().snapshot(&mut snap);
        let l = restore(&snap).unwrap();
        let now = T0 + 2 * DAY;
        for (i, r) in [
            req(Operation::Refund, 3, 1_000, Some(1)),
            req(Operation::Refund, 10, 500, Some(1)),
            req(Operation::Refund, 11, 500, Some(2)),
            req(Operation::Void, 12, 10_000, Some(2)),
            req(Operation::Reversal, 13, 1_000, Some(3)),
            req(Operation::Reversal, 14, 10_000, Some(1)),
            req(Operation::Refund, 15, 500, Some(1)),
        ]
        .iter()
        .enumerate()
        {
            let d = l.decide(r, now);
            assert!(!d.reason.as_str().is_empty(), "{i}");
        }
    }
}
