//! Remembered transactions: sales (the originals), refunds and voids (so they can be
//! reversed) and reversal tombstones. One [`Entry`] is 72 bytes; the indexes add ~40.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};

use super::money::{CardType, MaskedPan};

/// Tag bit that marks a `cup_pos` batch in [`RefKey::tag`] (ascii tags are DE7 values < 2^31).
pub(crate) const TAG_CUP: u32 = 1 << 31;

/// How a transaction is found again: terminal (index in the merchant's terminal list), STAN,
/// and DE7 MMDDhhmmss (ascii) or DE60.2 batch | [`TAG_CUP`] (cup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RefKey {
    pub term: u16,
    pub stan: u32,
    pub tag: u32,
}

/// What kind of transaction an entry remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Sale = 0,
    Refund = 1,
    Void = 2,
    /// A reversal arrived before (or instead of) its original: nothing may apply later.
    Tombstone = 3,
}

/// The state of an original (DOMAIN §4). `settled` is not stored: an approved sale from an
/// earlier settlement epoch is settled (see [`Entry::state_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OriginalState {
    /// Approved and in the open batch.
    Approved = 0,
    /// Declined upstream; kept so a refund of it gets 12 rather than 25.
    NotApproved = 1,
    /// Voided.
    Voided = 2,
    /// Reversed.
    Reversed = 3,
    /// Approved and paid out by a settlement.
    Settled = 4,
}

/// One remembered transaction. Money in minor units; `link` is the sale of a refund or void.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub amount: u64,
    /// Sales: approved refunds so far (reversed refunds given back).
    pub refunded: u64,
    pub pan_hash: u64,
    pub at: i64,
    pub pan: MaskedPan,
    pub key: RefKey,
    pub link: u32,
    /// Settlement epoch the money moved in.
    pub epoch: u32,
    pub batch: u32,
    /// Sales: approved refunds so far.
    pub refund_count: u16,
    pub kind: Kind,
    pub state: OriginalState,
    pub card: CardType,
}

/// Entries per chunk of [`Entries`] (72 kB of entries at most).
const CHUNK: usize = 1024;

/// A merchant's remembered transactions, oldest first, addressed by a logical index that
/// never changes: pruning the oldest ones moves `base` on instead of renumbering the rest.
///
/// Held in chunks of [`CHUNK`] entries, not one ring buffer: a ring doubles by copying every
/// entry within one push, under the merchant's lock (40 ms at 1M originals in the ledger
/// bench, and twice the memory meanwhile). A chunk grows like a `Vec` up to [`CHUNK`]; every
/// chunk but the last is full.
#[derive(Debug, Default)]
pub(crate) struct Entries {
    base: u32,
    /// Entries dropped from the front of `chunks[0]`.
    head: usize,
    len: usize,
    chunks: VecDeque<Vec<Entry>>,
}

impl Entries {
    /// An empty list whose first entry will get index `base`.
    pub fn starting_at(base: u32) -> Entries {
        Entries {
            base,
            ..Entries::default()
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Index of the oldest entry held.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// The index the next entry gets.
    pub fn next_index(&self) -> u32 {
        let n = u32::try_from(self.len).unwrap_or(u32::MAX);
        self.base.saturating_add(n)
    }

    /// Chunk and position of the entry `off` places after the oldest.
    fn locate(&self, off: usize) -> Option<(usize, usize)> {
        if off >= self.len {
            return None;
        }
        let p = self.head + off;
        Some((p / CHUNK, p % CHUNK))
    }

    pub fn get(&self, i: usize) -> Option<&Entry> {
        let (c, k) = self.locate(i.checked_sub(self.base as usize)?)?;
        self.chunks.get(c)?.get(k)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Entry> {
        let (c, k) = self.locate(i.checked_sub(self.base as usize)?)?;
        self.chunks.get_mut(c)?.get_mut(k)
    }

    pub fn push(&mut self, e: Entry) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push(e),
            _ => {
                let mut chunk = Vec::with_capacity(if self.chunks.is_empty() { 4 } else { CHUNK });
                chunk.push(e);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    /// Makes room for `n` more entries' chunk pointers (the chunks come as they fill).
    pub fn reserve(&mut self, n: usize) {
        self.chunks.reserve(n / CHUNK + 1);
    }

    pub fn front(&self) -> Option<&Entry> {
        self.get(self.base as usize)
    }

    /// Drops the oldest entry; returns its index and the entry.
    pub fn pop_front(&mut self) -> Option<(u32, Entry)> {
        let e = *self.front()?;
        let i = self.base;
        self.base = self.base.saturating_add(1);
        self.len -= 1;
        self.head += 1;
        if self.head == CHUNK || self.len == 0 {
            // The first chunk is used up (or everything is): drop it, so memory follows the
            // entries held.
            self.chunks.pop_front();
            self.head = 0;
            if self.len == 0 {
                self.chunks.clear();
            }
        }
        Some((i, e))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.chunks.iter().flatten().skip(self.head)
    }
}

impl Index<usize> for Entries {
    type Output = Entry;

    fn index(&self, i: usize) -> &Entry {
        match self.get(i) {
            Some(e) => e,
            None => panic!("no entry {i} (base {}, {} held)", self.base, self.len),
        }
    }
}

impl IndexMut<usize> for Entries {
    fn index_mut(&mut self, i: usize) -> &mut Entry {
        let (base, len) = (self.base, self.len);
        match self.get_mut(i) {
            Some(e) => e,
            None => panic!("no entry {i} (base {base}, {len} held)"),
        }
    }
}

/// `link` of an entry that refers to nothing.
pub(crate) const NO_LINK: u32 = u32::MAX;

impl Entry {
    /// The externally visible state, given the merchant's current settlement epoch.
    pub fn state_at(&self, epoch: u32) -> OriginalState {
        if self.state == OriginalState::Approved && self.epoch < epoch {
            OriginalState::Settled
        } else {
            self.state
        }
    }

    /// Still refundable, before any in-flight refunds.
    pub fn remaining(&self) -> u64 {
        self.amount.saturating_sub(self.refunded)
    }
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        [Kind::Sale, Kind::Refund, Kind::Void, Kind::Tombstone]
            .get(usize::from(v))
            .copied()
    }
}

impl OriginalState {
    /// Inverse of `as u8`.
    pub fn from_u8(v: u8) -> Option<OriginalState> {
        [
            OriginalState::Approved,
            OriginalState::NotApproved,
            OriginalState::Voided,
            OriginalState::Reversed,
            OriginalState::Settled,
        ]
        .get(usize::from(v))
        .copied()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn entry(amount: u64) -> Entry {
        Entry {
            amount,
            refunded: 0,
            pan_hash: 0,
            at: 0,
            pan: MaskedPan::default(),
            key: RefKey {
                term: 0,
                stan: 0,
                tag: 0,
            },
            link: NO_LINK,
            epoch: 0,
            batch: 0,
            refund_count: 0,
            kind: Kind::Sale,
            state: OriginalState::Approved,
            card: CardType::Visa,
        }
    }

    #[test]
    fn entries_keep_their_index_across_chunks_while_the_oldest_are_dropped() {
        let mut list = Entries::starting_at(10);
        let n = CHUNK * 3 + 17;
        for i in 0..n {
            list.push(entry(i as u64));
        }
        assert_eq!(
            (list.len(), list.base(), list.next_index()),
            (n, 10, 10 + n as u32)
        );
        assert_eq!(list.get(9).map(|e| e.amount), None);
        assert_eq!(list.get(10 + n).map(|e| e.amount), None);
        for i in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, n - 1] {
            assert_eq!(list[10 + i].amount, i as u64);
        }
        list[10 + CHUNK].refunded = 5;
        assert_eq!(list.get(10 + CHUNK).map(|e| e.refunded), Some(5));
        // Drop past the first chunk boundary: indexes stay, memory follows.
        for want in 0..(CHUNK + 3) {
            let (i, e) = list.pop_front().unwrap();
            assert_eq!((i as usize, e.amount), (10 + want, want as u64));
        }
        assert_eq!(list.chunks.len(), 3);
        assert_eq!(list.front().map(|e| e.amount), Some(CHUNK as u64 + 3));
        assert_eq!(list.get(10 + CHUNK + 2).map(|e| e.amount), None);
        assert_eq!(list[10 + 2 * CHUNK].amount, 2 * CHUNK as u64);
        let amounts: Vec<u64> = list.iter().map(|e| e.amount).collect();
        assert_eq!(amounts, ((CHUNK + 3) as u64..n as u64).collect::<Vec<_>>());
        // Drop everything, then go on: the next entry gets the next index.
        while list.pop_front().is_some() {}
        assert_eq!(
            (list.len(), list.base(), list.iter().count()),
            (0, 10 + n as u32, 0)
        );
        list.push(entry(7));
        assert_eq!(list[10 + n].amount, 7);
        assert_eq!(list.next_index(), 11 + n as u32);
    }

    #[test]
    fn an_entry_stays_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 72,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
