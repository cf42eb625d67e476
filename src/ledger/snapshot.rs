//! Snapshots: the durable state of every book in one deterministic byte string, so restart
//! replays only the journal tail written after it.
//!
//! Layout (version [`SNAPSHOT_VERSION`]): magic `RGLS`, version, merchant count, then per
//! merchant its id, funds, counters, terminals, cards, entries, RRN index and stored
//! answers, each map sorted by key so equal states give equal bytes. In-flight reservations
//! are not part of it.

use super::book::{Book, Term};
use super::counters::Bucket;
use super::event::{DecodeError, Reader, Writer};
use super::idempotency::{FullAnswer, RefundAnswer, Stored};
use super::money::{CardType, MaskedPan, PanKey};
use super::originals::{Entries, Entry, Kind, OriginalState, RefKey};
use super::{Ledger, MerchantSet};
use crate::limits::SNAPSHOT_ITEMS_MAX;

const MAGIC: &[u8; 4] = b"RGLS";

/// Snapshot layout version. 2 added per-terminal settlement epochs, the entries' base index
/// and the reconciliation list; version 1 snapshots (written before) still restore.
const SNAPSHOT_VERSION: u8 = 2;

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
}

impl Ledger {
    /// Appends a snapshot of the durable state to `out`.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        let w = &mut Writer(out);
        w.u8(SNAPSHOT_VERSION);
        w.u64(self.order.len() as u64);
        for id in &self.order {
            if let Some(book) = self.books.get(id) {
                write_book(w, &book);
            }
        }
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
            }
            Stored::Full(a) => {
                w.u8(1);
                w.0.extend_from_slice(&a.fingerprint.to_le_bytes());
                w.i64(a.at);
                w.decision(&a.decision);
            }
        }
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
            })),
            2 => Stored::Refund(Box::new(RefundAnswer {
                fingerprint: r.fixed_u64()?,
                idx: r.u32()?,
                original_remaining: r.u64()?,
                day_allowance: r.opt()?,
                would_pass: if version >= 2 { r.opt()? } else { None },
            })),
            _ => return Err(DecodeError::Invalid("answer tag").into()),
        };
        b.answers.insert(k, s);
    }
    Ok(())
}
