//! A fast, seeded hasher for the ledger's internal maps.
//!
//! SipHash costs ~20 ns per lookup and a decision does a dozen lookups. Keys here are small
//! integers (packed keys, PAN hashes, indexes) and short ids, so a multiply-rotate mix with a
//! murmur3 finaliser is enough; the per-map random seed keeps terminals from steering
//! entries into one bucket without knowing it.

use std::borrow::Borrow;
use std::collections::hash_map::{self, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

/// A `HashMap` with [`FastState`].
pub(crate) type FastMap<K, V> = HashMap<K, V, FastState>;

/// Builds [`FastHasher`]s that start from a random seed.
#[derive(Debug, Clone, Copy)]
pub struct FastState {
    seed: u64,
}

impl Default for FastState {
    fn default() -> Self {
        FastState {
            seed: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.seed)
    }
}

/// The hasher of [`FastState`].
#[derive(Debug, Clone, Copy)]
pub struct FastHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Entries past which a [`SplitMap`] splits into parts.
const SPLIT_AT: usize = 1 << 13;
/// Parts of a split [`SplitMap`] (a power of two).
const SPLIT_PARTS: usize = 64;

/// A [`FastMap`] for the tables that grow with a merchant's traffic (originals by key and by
/// RRN, stored answers, cards). One map while small; past [`SPLIT_AT`] entries it becomes
/// [`SPLIT_PARTS`] maps chosen by hash, each growing on its own. A map doubles by moving every
/// entry within one insert, under the merchant's lock: with one plain map per table, the
/// decision that took a merchant past 1.8M originals waited 86 ms while three tables grew at
/// once (the ledger bench's growth figures). Split, one insert moves at most one part's entries.
#[derive(Debug)]
pub(crate) struct SplitMap<K, V> {
    /// The map while not split (empty once split).
    one: FastMap<K, V>,
    /// The parts once split (empty before).
    parts: Vec<FastMap<K, V>>,
}

impl<K, V> Default for SplitMap<K, V> {
    fn default() -> Self {
        Self {
            one: HashMap::default(),
            parts: Vec::new(),
        }
    }
}

impl<K: Hash + Eq, V> SplitMap<K, V> {
    fn index<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        // Middle bits: hashbrown takes the bucket from the low bits and its tag from the top
        // seven, so neither is the same within a part.
        (self.one.hasher().hash_one(k) >> 40) as usize & (SPLIT_PARTS - 1)
    }

    fn part<Q: Hash + ?Sized>(&self, k: &Q) -> &FastMap<K, V> {
        if self.parts.is_empty() {
            &self.one
        } else {
            &self.parts[self.index(k)]
        }
    }

    fn part_mut<Q: Hash + ?Sized>(&mut self, k: &Q) -> &mut FastMap<K, V> {
        if self.parts.is_empty() {
            &mut self.one
        } else {
            let i = self.index(k);
            &mut self.parts[i]
        }
    }

    /// Splits the single map once it is large enough (before an insert).
    fn split_if_due(&mut self) {
        if !self.parts.is_empty() || self.one.len() < SPLIT_AT {
            return;
        }
        let state = *self.one.hasher();
        // As many buckets in all as the single map had: no more memory for the split.
        let each = self.one.len() / SPLIT_PARTS + 1;
        self.parts = (0..SPLIT_PARTS)
            .map(|_| HashMap::with_capacity_and_hasher(each, state))
            .collect();
        // `one` keeps its hasher (and so the part index) but no entries.
        for (k, v) in std::mem::replace(&mut self.one, HashMap::with_hasher(state)) {
            let i = self.index(&k);
            self.parts[i].insert(k, v);
        }
    }

    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.part(k).get(k)
    }

    pub fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.part_mut(k).get_mut(k)
    }

    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.part(k).contains_key(k)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.split_if_due();
        self.part_mut(&k).insert(k, v)
    }

    pub fn entry(&mut self, k: K) -> hash_map::Entry<'_, K, V> {
        self.split_if_due();
        self.part_mut(&k).entry(k)
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.part_mut(k).remove(k)
    }

    pub fn len(&self) -> usize {
        self.one.len() + self.parts.iter().map(HashMap::len).sum::<usize>()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.one
            .iter()
            .chain(self.parts.iter().flat_map(HashMap::iter))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    #[cfg(test)]
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.one
            .values_mut()
            .chain(self.parts.iter_mut().flat_map(HashMap::values_mut))
    }

    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        self.one.retain(&mut f);
        for part in &mut self.parts {
            part.retain(&mut f);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_split_map_keeps_every_entry_across_the_split_and_after_it() {
        let mut m: SplitMap<u64, u64> = SplitMap::default();
        let n = (SPLIT_AT * 3) as u64;
        for k in 0..n {
            assert_eq!(m.insert(k, k * 2), None);
        }
        assert!(!m.parts.is_empty(), "not split past {SPLIT_AT} entries");
        assert!(m.one.is_empty());
        assert_eq!(m.len(), n as usize);
        for k in (0..n).step_by(7) {
            assert_eq!(m.get(&k), Some(&(k * 2)));
            assert!(m.contains_key(&k));
        }
        assert_eq!(m.get(&n), None);
        *m.get_mut(&5).unwrap() = 1;
        *m.entry(6).or_default() += 1;
        *m.entry(n + 1).or_default() += 4;
        assert_eq!(
            (m.get(&5), m.get(&6), m.get(&(n + 1))),
            (Some(&1), Some(&13), Some(&4))
        );
        assert_eq!(m.remove(&5), Some(1));
        assert_eq!(m.remove(&5), None);
        m.retain(|k, _| k % 2 == 0);
        assert_eq!(m.len(), m.iter().count());
        assert!(m
            .iter()
            .all(|(k, v)| k % 2 == 0 && (*v == k * 2 || *k == 6 || *k == n + 1)));
        for v in m.values_mut() {
            *v = 0;
        }
        assert!(m.values().all(|v| *v == 0));
        let mut keys: Vec<u64> = m.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let want: Vec<u64> = (0..n).chain([n + 1]).filter(|k| k % 2 == 0).collect();
        assert_eq!(keys, want);
    }

    #[test]
    fn a_split_map_spreads_its_entries_over_every_part() {
        let mut m: SplitMap<u64, ()> = SplitMap::default();
        for k in 0..(SPLIT_AT * 4) as u64 {
            m.insert(k << 20, ());
        }
        let sizes: Vec<usize> = m.parts.iter().map(HashMap::len).collect();
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        let even = SPLIT_AT * 4 / SPLIT_PARTS;
        assert!(*lo > even / 2 && *hi < even * 2, "{sizes:?}");
    }

    #[test]
    fn keys_that_differ_only_in_high_bits_spread_over_low_bits() {
        let s = FastState::default();
        let low: std::collections::HashSet<u64> =
            (0..1024u64).map(|i| s.hash_one(i << 40) & 1023).collect();
        assert!(low.len() > 550, "{}", low.len());
    }
}
