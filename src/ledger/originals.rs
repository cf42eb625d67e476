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

/// A merchant's remembered transactions, oldest first, addressed by a logical index that
/// never changes: pruning the oldest ones moves `base` on instead of renumbering the rest.
#[derive(Debug, Default)]
pub(crate) struct Entries {
    base: u32,
    items: VecDeque<Entry>,
}

impl Entries {
    /// An empty list whose first entry will get index `base`.
    pub fn starting_at(base: u32) -> Entries {
        Entries {
            base,
            items: VecDeque::new(),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Index of the oldest entry held.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// The index the next entry gets.
    pub fn next_index(&self) -> u32 {
        let n = u32::try_from(self.items.len()).unwrap_or(u32::MAX);
        self.base.saturating_add(n)
    }

    pub fn get(&self, i: usize) -> Option<&Entry> {
        let off = i.checked_sub(self.base as usize)?;
        self.items.get(off)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Entry> {
        let off = i.checked_sub(self.base as usize)?;
        self.items.get_mut(off)
    }

    pub fn push(&mut self, e: Entry) {
        self.items.push_back(e);
    }

    pub fn reserve(&mut self, n: usize) {
        self.items.reserve(n);
    }

    pub fn front(&self) -> Option<&Entry> {
        self.items.front()
    }

    /// Drops the oldest entry; returns its index and the entry.
    pub fn pop_front(&mut self) -> Option<(u32, Entry)> {
        let e = self.items.pop_front()?;
        let i = self.base;
        self.base = self.base.saturating_add(1);
        Some((i, e))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.items.iter()
    }
}

impl Index<usize> for Entries {
    type Output = Entry;

    fn index(&self, i: usize) -> &Entry {
        &self.items[i.wrapping_sub(self.base as usize)]
    }
}

impl IndexMut<usize> for Entries {
    fn index_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.items[i.wrapping_sub(self.base as usize)]
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

    #[test]
    fn an_entry_stays_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 72,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
