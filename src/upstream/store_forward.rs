//! The persistent store-and-forward (SAF) queue of reversals and advices (DOMAIN §8, §9).
//!
//! Every entry is appended to its own [`Journal`] (`<journal dir>/saf`) and is durable before
//! [`StoreForward::enqueue`] returns, so the terminal's 91/98 is sent only once the reversal
//! behind it cannot be lost (kill -9 included). A worker ([`StoreForward::run`]) sends each
//! entry on its upstream's link, the first time as queued (0400), afterwards marked as a repeat
//! (0401; every entry recovered at start counts as possibly sent), with exponential backoff and
//! jitter between tries, until the host answers `00` (or `25`: nothing to reverse). Then a
//! completion record is journaled. An entry that was sent `max_retries` times without being
//! accepted, or is older than `expiry_s`, moves to the dead-letter list (journaled too), counted
//! in `refundgate_saf_dead_letters` and shown by `refundgate saf list`.
//!
//! Records (payloads of the SAF journal): `1 id created dialect upstream body` (added; the
//! dialect is `0` ascii1987, `1` cup_pos, or `255` followed by its name as `u8` length + bytes),
//! `2 id` (delivered), `3 id reason at attempts` (dead letter). Replay rebuilds the queue.
//! Every [`SAF_SNAPSHOT_RECORDS`] records the worker snapshots the live queue (pending entries
//! and kept dead letters, as the same records) so the journal's old segments are removed and
//! replay stays short. Appends hold a shared gate and the snapshot the exclusive one, so the
//! snapshot's seq covers exactly the records it folds in.
//!
//! Send counts are not journaled: after a restart an entry gets `max_retries` sends again
//! (its age still bounds it through `expiry_s`).
//!
//! Stored messages keep only an allow-list of elements ([`KEPT`], and [`KEPT_DE61`] in dialects
//! naming originals by DE61):
//! no track (35, 36, 45), PIN (52, 53), chip (55), key (62, 96) or MAC data reaches the SAF
//! files (DOMAIN §10). A PAN (DE2) the message carried is kept only sealed with AES-256-GCM
//! under the key set by [`StoreForward::set_pan_cipher`] (kept outside the data directory),
//! bound to its entry, and put back into the message only when it is sent; without a cipher
//! it is not kept at all. Record `4` is record `1` followed by the sealed PAN.

pub mod cluster;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify, RwLock};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::link::{Key, Link, LinkError};
use crate::clock::{Clock, UnixSeconds};
use crate::dialect::{Dialect, OriginalKeys};
use crate::iso8583;
use crate::journal::{self, Journal, JournalError};
pub use crate::limits::{
    SAF_BODY_BYTES_MAX, SAF_DEAD_LETTERS_KEPT_MAX, SAF_DELIVERED_KEYS_KEPT, SAF_IN_FLIGHT_MAX,
    SAF_PENDING_MAX, SAF_SEGMENT_BYTES, SAF_SNAPSHOT_RECORDS,
};

/// Elements a queued message keeps (besides DE2, sealed apart), as far as it carries them.
pub const KEPT: &[u8] = &[
    3, 4, 7, 11, 12, 13, 22, 25, 32, 37, 38, 39, 41, 42, 49, 90, 95,
];
/// Elements kept besides [`KEPT`] in dialects naming the original by DE61 (`cup_pos`): the
/// message type and batch in DE60, the original in DE61.
pub const KEPT_DE61: &[u8] = &[60, 61];

/// Dialect tag of a record naming its dialect by name (tags 0 and 1 are the two dialects
/// earlier versions wrote).
const DIALECT_BY_NAME: u8 = 255;

/// Version tag at the start of a SAF snapshot.
const SNAPSHOT_MAGIC: &[u8; 4] = b"SAF1";

/// `refundgate_saf_pending`: entries waiting for an accepted answer.
pub const SAF_PENDING: &str = "refundgate_saf_pending";
/// `refundgate_saf_dead_letters`: entries given up on (expired or retries exhausted).
pub const SAF_DEAD_LETTERS: &str = "refundgate_saf_dead_letters";
/// `refundgate_saf_delivered_total`: entries accepted by their host.
pub const SAF_DELIVERED_TOTAL: &str = "refundgate_saf_delivered_total";

/// The store-and-forward queue of a gateway: a local journal (single node), or streams in
/// the NATS JetStream cluster the ledger's journal is replicated on (`journal.backend =
/// "jetstream"`: any node delivers what any node queued).
#[derive(Debug)]
pub enum Saf {
    /// `<journal.dir>/saf`.
    File(Arc<StoreForward>),
    /// `<stream>_SAF` and `<stream>_SAF_DEAD`.
    Cluster(Arc<cluster::ClusterSaf>),
}

impl From<Arc<StoreForward>> for Saf {
    fn from(saf: Arc<StoreForward>) -> Saf {
        Saf::File(saf)
    }
}

impl Saf {
    /// Queues `body` for `upstream`; returns once the entry is durable (on disk, or stored on
    /// a quorum of the cluster).
    pub async fn enqueue(
        &self,
        upstream: &str,
        dialect: &'static Dialect,
        key: Key,
        body: Bytes,
    ) -> Result<u64, SafError> {
        match self {
            Saf::File(s) => s.enqueue(upstream, dialect, key, body).await,
            Saf::Cluster(s) => s.enqueue(upstream, dialect, key, body).await,
        }
    }

    /// Entries waiting, oldest first (the cluster's: as read at its last refresh, at most
    /// [`cluster::PENDING_LISTED_MAX`]).
    pub fn pending(&self) -> Vec<Entry> {
        match self {
            Saf::File(s) => s.pending(),
            Saf::Cluster(s) => s.pending(),
        }
    }

    /// Puts dead letter `id` back in the queue; `Ok(false)` when there is no such dead letter.
    pub async fn retry_dead(&self, id: u64) -> Result<bool, String> {
        match self {
            Saf::File(s) => s.retry_dead(id).await,
            Saf::Cluster(s) => s.retry_dead(id).await,
        }
    }

    /// The dead letters kept, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        match self {
            Saf::File(s) => s.dead_letters(),
            Saf::Cluster(s) => s.dead_letters(),
        }
    }

    /// Dead letters ever recorded.
    pub fn dead_total(&self) -> u64 {
        match self {
            Saf::File(s) => s.dead_total(),
            Saf::Cluster(s) => s.dead_total(),
        }
    }

    /// Entries this gateway delivered since start.
    pub fn delivered_total(&self) -> u64 {
        match self {
            Saf::File(s) => s.delivered_total(),
            Saf::Cluster(s) => s.delivered_total(),
        }
    }

    /// Sets the cipher of queued PANs (once).
    pub fn set_pan_cipher(&self, cipher: crate::at_rest::PanCipher) {
        match self {
            Saf::File(s) => s.set_pan_cipher(cipher),
            Saf::Cluster(s) => s.set_pan_cipher(cipher),
        }
    }

    /// Delivers queued entries on `links` until `stop` turns true.
    pub async fn run(&self, links: Arc<HashMap<String, Arc<Link>>>, stop: watch::Receiver<bool>) {
        match self {
            Saf::File(s) => Arc::clone(s).run(links, stop).await,
            Saf::Cluster(s) => Arc::clone(s).run(links, stop).await,
        }
    }
}

/// How the queue retries.
#[derive(Debug, Clone)]
pub struct SafOptions {
    /// Sends without an accepted answer before an entry is dead-lettered.
    pub max_retries: u32,
    /// Age after which an entry is dead-lettered.
    pub expiry_s: i64,
    /// First retry delay; doubles per try up to `retry_max`.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Journal durability (`Fdatasync` in production).
    pub durability: journal::Durability,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Queue-unique id (journal order).
    pub id: u64,
    /// The upstream it goes to.
    pub upstream: String,
    /// Dialect of `body`.
    pub dialect: &'static Dialect,
    /// When it was queued (unix seconds).
    pub created_s: i64,
    /// What identifies its answer.
    pub key: Key,
    /// The message, MTI onward, as first sent (origin digit 0), reduced to the allow-listed
    /// elements and without DE2.
    pub body: Bytes,
    /// DE2 sealed with the SAF PAN key (nonce, ciphertext, tag), when the message had one.
    pub sealed_pan: Option<Bytes>,
}

impl Entry {
    /// A new entry for `reduced` (the body and PAN from [`reduce`]), its PAN sealed under
    /// `cipher` (bound to `id` and `upstream`); without a cipher the PAN is not kept.
    fn sealed(
        id: u64,
        upstream: &str,
        dialect: &'static Dialect,
        created_s: UnixSeconds,
        key: Key,
        (body, pan): (Bytes, Option<Vec<u8>>),
        cipher: Option<&crate::at_rest::PanCipher>,
    ) -> Entry {
        let sealed_pan = match (pan, cipher) {
            (Some(pan), Some(cipher)) => cipher.seal(&pan, &pan_aad(id, upstream)).map(Bytes::from),
            _ => None,
        };
        Entry {
            id,
            upstream: upstream.to_string(),
            dialect,
            created_s,
            key,
            body,
            sealed_pan,
        }
    }
}

/// Why an entry was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Sent `max_retries` times without an accepted answer.
    RetriesExhausted,
    /// Older than `expiry_s`.
    Expired,
}

/// An entry given up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The entry.
    pub entry: Entry,
    /// Why.
    pub reason: DeadReason,
    /// When (unix seconds).
    pub at_s: i64,
    /// Times it was sent.
    pub attempts: u32,
}

/// Why an entry could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SafError {
    /// The queue holds [`SAF_PENDING_MAX`] entries.
    #[error("store-and-forward queue full")]
    Full,
    /// The message is larger than [`SAF_BODY_BYTES_MAX`].
    #[error("message too large for the store-and-forward queue")]
    TooLarge,
    /// The SAF journal refused the write.
    #[error("store-and-forward journal: {0}")]
    Store(String),
}

/// The queue: journal, in-memory index, worker wake-up.
pub struct StoreForward {
    journal: Arc<Journal>,
    /// Shared by appends (append + apply), exclusive for a snapshot.
    gate: RwLock<()>,
    since_snapshot: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    notify: Notify,
    options: SafOptions,
    clock: Arc<dyn Clock>,
    pan_cipher: std::sync::OnceLock<crate::at_rest::PanCipher>,
}

#[derive(Default)]
struct State {
    pending: BTreeMap<u64, Slot>,
    dead: VecDeque<DeadLetter>,
    dead_total: u64,
    delivered_total: u64,
    /// Keys (upstream, key) of delivered entries, oldest first, at most
    /// [`SAF_DELIVERED_KEYS_KEPT`]: a new entry under one of them goes as a repeat.
    delivered_keys: VecDeque<(String, Key)>,
    delivered_set: std::collections::HashSet<(String, Key)>,
    next_id: u64,
    reserved: usize,
    recovering: bool,
}

struct Slot {
    entry: Entry,
    attempts: u32,
    tries: u32,
    repeat: bool,
    next_at: Instant,
    in_flight: bool,
}

enum Record {
    Add(Entry),
    Done {
        id: u64,
    },
    /// In snapshots only: a key whose entry was delivered (see `State::delivered_keys`).
    Delivered {
        upstream: String,
        key: Key,
    },
    Dead {
        id: u64,
        reason: DeadReason,
        at_s: i64,
        attempts: u32,
    },
}

// === impl StoreForward ===

impl StoreForward {
    /// Opens (creating) the SAF journal in `dir` and rebuilds the queue from it.
    pub fn open(
        dir: &Path,
        options: SafOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<StoreForward, JournalError> {
        let on = journal::Options {
            segment_bytes: SAF_SEGMENT_BYTES,
            ..journal::Options::default()
        };
        Self::open_on(dir, options, clock, on)
    }

    /// [`StoreForward::open`] with the journal options `on` (its durability from `options`):
    /// the deterministic simulator's `SimDisk`, small segments, stepped by its driver through
    /// [`StoreForward::journal`].
    pub fn open_on(
        dir: &Path,
        options: SafOptions,
        clock: Arc<dyn Clock>,
        on: journal::Options,
    ) -> Result<StoreForward, JournalError> {
        let journal_options = journal::Options {
            durability: options.durability,
            ..on
        };
        let (journal, mut recovered) = Journal::open(dir, journal_options)?;
        let mut state = State {
            next_id: 1,
            recovering: true,
            ..State::default()
        };
        let now = Instant::now();
        if let Some(snapshot) = recovered.take_snapshot() {
            if !state.restore(&snapshot.bytes, now) {
                tracing::warn!(
                    seq = snapshot.seq,
                    "unreadable store-and-forward snapshot; entries in it are lost"
                );
            }
        }
        recovered.replay(|seq, payload| match Record::decode(payload) {
            Some(record) => state.apply(record, now),
            None => tracing::warn!(seq, "unreadable store-and-forward record skipped"),
        })?;
        state.recovering = false;
        tracing::info!(
            pending = state.pending.len(),
            dead_letters = state.dead_total,
            "store-and-forward queue recovered"
        );
        let saf = StoreForward {
            journal: Arc::new(journal),
            gate: RwLock::new(()),
            since_snapshot: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(state),
            notify: Notify::new(),
            options,
            clock,
            pan_cipher: std::sync::OnceLock::new(),
        };
        saf.publish();
        Ok(saf)
    }

    /// The SAF journal (the simulator steps it when it runs in stepped mode).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Sets the cipher of the PANs kept for queued messages (once; later calls are ignored).
    /// Without one a message's PAN is not kept.
    pub fn set_pan_cipher(&self, cipher: crate::at_rest::PanCipher) {
        let _ = self.pan_cipher.set(cipher);
    }

    /// Whether any entry (pending or dead) holds a sealed PAN: its key must not change.
    pub fn holds_sealed_pans(&self) -> bool {
        let s = self.lock();
        s.pending.values().any(|x| x.entry.sealed_pan.is_some())
            || s.dead.iter().any(|d| d.entry.sealed_pan.is_some())
    }

    /// Queues `body` for `upstream`; returns once the entry is durable. An entry with the same
    /// upstream and key already waiting is not queued twice (its id is returned).
    pub async fn enqueue(
        &self,
        upstream: &str,
        dialect: &'static Dialect,
        key: Key,
        body: Bytes,
    ) -> Result<u64, SafError> {
        if body.len() > SAF_BODY_BYTES_MAX || upstream.len() > usize::from(u8::MAX) {
            return Err(SafError::TooLarge);
        }
        let id = {
            let mut s = self.lock();
            if let Some(slot) = s
                .pending
                .values()
                .find(|x| x.entry.key == key && x.entry.upstream == upstream)
            {
                return Ok(slot.entry.id);
            }
            if s.pending.len() + s.reserved >= SAF_PENDING_MAX {
                return Err(SafError::Full);
            }
            s.reserved += 1;
            s.next_id += 1;
            s.next_id - 1
        };
        let Some(reduced) = reduce(dialect, &body) else {
            self.lock().reserved -= 1;
            return Err(SafError::Store("message cannot be decoded".to_string()));
        };
        let entry = Entry::sealed(
            id,
            upstream,
            dialect,
            self.clock.now_unix_s(),
            key,
            reduced,
            self.pan_cipher.get(),
        );
        let appended = self.append_apply(Record::Add(entry)).await;
        self.lock().reserved -= 1;
        appended.map_err(SafError::Store)?;
        self.notify.notify_one();
        Ok(id)
    }

    /// Entries waiting, oldest first.
    pub fn pending(&self) -> Vec<Entry> {
        self.lock()
            .pending
            .values()
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Puts dead letter `id` back in the queue (an operator's retry): journaled as the entry
    /// added again under its id, so a restart replays it the same way; sent as a repeat.
    /// `Ok(false)` when `id` is not a dead letter (never one, already retried or delivered).
    pub async fn retry_dead(&self, id: u64) -> Result<bool, String> {
        let entry = self
            .lock()
            .dead
            .iter()
            .find(|d| d.entry.id == id)
            .map(|d| d.entry.clone());
        let Some(entry) = entry else {
            return Ok(false);
        };
        self.append_apply(Record::Add(entry)).await?;
        self.notify.notify_one();
        Ok(true)
    }

    /// The dead letters kept in memory, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.iter().cloned().collect()
    }

    /// Dead letters ever recorded in this journal.
    pub fn dead_total(&self) -> u64 {
        self.lock().dead_total
    }

    /// Entries accepted by their host since start.
    pub fn delivered_total(&self) -> u64 {
        self.lock().delivered_total
    }

    /// Sends due entries on `links` until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        links: Arc<HashMap<String, Arc<Link>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tasks = JoinSet::new();
        loop {
            self.compact_if_due().await;
            let wake = self.start_due(&links, &mut tasks);
            // Biased: the same branch order on every run (the deterministic simulator
            // replays a seed bit for bit); each branch is ready only once per event.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                () = self.notify.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.shutdown().await;
    }

    /// Starts every due entry (within [`SAF_IN_FLIGHT_MAX`]); returns when to look again.
    fn start_due(
        self: &Arc<Self>,
        links: &Arc<HashMap<String, Arc<Link>>>,
        tasks: &mut JoinSet<()>,
    ) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        let mut due = Vec::new();
        {
            let mut s = self.lock();
            let mut in_flight = s.pending.values().filter(|x| x.in_flight).count();
            for slot in s.pending.values_mut() {
                if slot.in_flight {
                    continue;
                }
                if slot.next_at > now {
                    wake = wake.min(slot.next_at);
                    continue;
                }
                if in_flight >= SAF_IN_FLIGHT_MAX {
                    break;
                }
                slot.in_flight = true;
                in_flight += 1;
                due.push((slot.entry.clone(), slot.attempts, slot.repeat));
            }
        }
        for (entry, attempts, repeat) in due {
            let link = links.get(&entry.upstream).cloned();
            tasks.spawn(Arc::clone(self).attempt(link, entry, attempts, repeat));
        }
        wake
    }

    async fn attempt(
        self: Arc<Self>,
        link: Option<Arc<Link>>,
        entry: Entry,
        attempts: u32,
        repeat: bool,
    ) {
        let now_s = self.clock.now_unix_s();
        if now_s.saturating_sub(entry.created_s) >= self.options.expiry_s {
            return self.give_up(entry.id, DeadReason::Expired, attempts).await;
        }
        if attempts >= self.options.max_retries {
            return self
                .give_up(entry.id, DeadReason::RetriesExhausted, attempts)
                .await;
        }
        let Some(link) = link else {
            return self.retry(entry.id, false);
        };
        let body = body_to_send(self.pan_cipher.get(), &entry);
        let body = if repeat {
            mark_repeat(entry.dialect, &body)
        } else {
            body
        };
        let sent = match link.call_repeatable(entry.key, body).await {
            Ok(answer) if accepted(entry.dialect, &answer) => {
                return self.delivered(entry.id).await;
            }
            Ok(_) | Err(LinkError::Timeout | LinkError::BadMac) => true,
            Err(LinkError::Down | LinkError::Full | LinkError::Busy | LinkError::Unkeyed) => false,
        };
        self.retry(entry.id, sent);
    }

    fn retry(&self, id: u64, sent: bool) {
        let mut s = self.lock();
        if let Some(slot) = s.pending.get_mut(&id) {
            slot.in_flight = false;
            slot.tries = slot.tries.saturating_add(1);
            if sent {
                slot.attempts = slot.attempts.saturating_add(1);
                slot.repeat = true;
            }
            slot.next_at = Instant::now() + self.backoff(slot.tries);
        }
    }

    fn backoff(&self, tries: u32) -> Duration {
        let base = self
            .options
            .retry_min
            .saturating_mul(1u32 << tries.saturating_sub(1).min(16))
            .min(self.options.retry_max);
        base.mul_f64(crate::clock::jitter())
    }

    async fn delivered(&self, id: u64) {
        if self.append_apply(Record::Done { id }).await.is_ok() {
            self.lock().delivered_total += 1;
            metrics::counter!(SAF_DELIVERED_TOTAL).increment(1);
        } else {
            // Not recorded: send it again later (the host treats a repeat as a no-op).
            self.retry(id, true);
        }
    }

    async fn give_up(&self, id: u64, reason: DeadReason, attempts: u32) {
        let at_s = self.clock.now_unix_s();
        let record = Record::Dead {
            id,
            reason,
            at_s,
            attempts,
        };
        if self.append_apply(record).await.is_ok() {
            tracing::error!(
                id,
                ?reason,
                attempts,
                "store-and-forward entry dead-lettered"
            );
        } else {
            self.retry(id, false);
        }
    }

    /// Journals `record` (durably) and then applies it, under the shared gate.
    async fn append_apply(&self, record: Record) -> Result<(), String> {
        let mut payload = Vec::with_capacity(64);
        record.encode(&mut payload);
        let _gate = self.gate.read().await;
        if let Err(e) = self.journal.append(payload).await {
            tracing::warn!(error = %e, "store-and-forward journal write failed");
            return Err(e.to_string());
        }
        self.lock().apply(record, Instant::now());
        self.since_snapshot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    async fn compact_if_due(&self) {
        let since = self
            .since_snapshot
            .load(std::sync::atomic::Ordering::Relaxed);
        if since >= SAF_SNAPSHOT_RECORDS {
            if let Err(e) = self.compact().await {
                tracing::warn!(error = %e, "store-and-forward snapshot failed; retried later");
            }
        }
    }

    /// Snapshots the queue and lets the journal drop the segments the snapshot covers.
    pub async fn compact(&self) -> Result<(), String> {
        let _gate = self.gate.write().await;
        // No append is in flight: every durable record is applied, and nothing else is.
        let seq = self.journal.durable_seq();
        let bytes = self.lock().snapshot();
        let journal = Arc::clone(&self.journal);
        tokio::task::spawn_blocking(move || journal.snapshot(seq, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.since_snapshot
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn publish(&self) {
        let (pending, dead) = {
            let s = self.lock();
            (s.pending.len(), s.dead_total)
        };
        metrics::gauge!(SAF_PENDING).set(pending as f64);
        metrics::gauge!(SAF_DEAD_LETTERS).set(dead as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for StoreForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("StoreForward")
            .field("pending", &s.pending.len())
            .field("dead_total", &s.dead_total)
            .finish_non_exhaustive()
    }
}

// === impl State ===

impl State {
    fn apply(&mut self, record: Record, now: Instant) {
        match record {
            Record::Add(entry) => {
                self.next_id = self.next_id.max(entry.id.saturating_add(1));
                // The same id again: an operator's retry of a dead letter (it was sent before).
                let before = self.dead.len();
                self.dead.retain(|d| d.entry.id != entry.id);
                let retried = self.dead.len() != before;
                // A reversal of this key already reached the host: this one is a repeat to it.
                let seen = self
                    .delivered_set
                    .contains(&(entry.upstream.clone(), entry.key));
                self.pending.insert(
                    entry.id,
                    Slot {
                        entry,
                        attempts: 0,
                        tries: 0,
                        // Recovered entries may have been sent before the restart.
                        repeat: self.recovering || retried || seen,
                        next_at: now,
                        in_flight: false,
                    },
                );
            }
            Record::Done { id } => {
                if let Some(slot) = self.pending.remove(&id) {
                    self.remember_delivered(slot.entry.upstream, slot.entry.key);
                }
            }
            Record::Delivered { upstream, key } => self.remember_delivered(upstream, key),
            Record::Dead {
                id,
                reason,
                at_s,
                attempts,
            } => {
                let Some(slot) = self.pending.remove(&id) else {
                    return;
                };
                self.dead_total += 1;
                if self.dead.len() >= SAF_DEAD_LETTERS_KEPT_MAX {
                    self.dead.pop_front();
                }
                self.dead.push_back(DeadLetter {
                    entry: slot.entry,
                    reason,
                    at_s,
                    attempts,
                });
            }
        }
    }
}

impl State {
    fn remember_delivered(&mut self, upstream: String, key: Key) {
        let k = (upstream, key);
        if self.delivered_set.contains(&k) {
            return;
        }
        if self.delivered_keys.len() >= SAF_DELIVERED_KEYS_KEPT {
            if let Some(old) = self.delivered_keys.pop_front() {
                self.delivered_set.remove(&old);
            }
        }
        self.delivered_set.insert(k.clone());
        self.delivered_keys.push_back(k);
    }

    /// The live queue as a snapshot: header, then the records that rebuild it.
    fn snapshot(&self) -> Vec<u8> {
        let mut records: Vec<Record> = Vec::with_capacity(
            self.delivered_keys.len() + self.pending.len() + 2 * self.dead.len(),
        );
        records.extend(
            self.delivered_keys
                .iter()
                .map(|(upstream, key)| Record::Delivered {
                    upstream: upstream.clone(),
                    key: *key,
                }),
        );
        for d in &self.dead {
            records.push(Record::Add(d.entry.clone()));
            records.push(Record::Dead {
                id: d.entry.id,
                reason: d.reason,
                at_s: d.at_s,
                attempts: d.attempts,
            });
        }
        records.extend(self.pending.values().map(|s| Record::Add(s.entry.clone())));
        let mut out = Vec::with_capacity(64 + 128 * records.len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.next_id.to_be_bytes());
        out.extend_from_slice(&self.dead_total.to_be_bytes());
        let mut buf = Vec::with_capacity(256);
        for r in &records {
            buf.clear();
            r.encode(&mut buf);
            out.extend_from_slice(&u32::try_from(buf.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&buf);
        }
        out
    }

    /// Rebuilds the queue from [`State::snapshot`] bytes; false when they are unreadable.
    fn restore(&mut self, bytes: &[u8], now: Instant) -> bool {
        let mut r = Reader(bytes);
        if r.take(4) != Some(SNAPSHOT_MAGIC.as_slice()) {
            return false;
        }
        let (Some(next_id), Some(dead_total)) = (r.u64(), r.u64()) else {
            return false;
        };
        while !r.0.is_empty() {
            let Some(len) = r
                .take(4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
            else {
                return false;
            };
            let Some(record) = r.take(len as usize).and_then(Record::decode) else {
                return false;
            };
            self.apply(record, now);
        }
        self.next_id = self.next_id.max(next_id);
        self.dead_total = self.dead_total.max(dead_total);
        true
    }
}

// === records ===

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Add(e) => {
                out.push(if e.sealed_pan.is_some() { 4 } else { 1 });
                out.extend_from_slice(&e.id.to_be_bytes());
                out.extend_from_slice(&e.created_s.to_be_bytes());
                match e.dialect.name() {
                    "ascii1987" => out.push(0),
                    "cup_pos" => out.push(1),
                    name => {
                        out.push(DIALECT_BY_NAME);
                        out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                        out.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
                    }
                }
                out.push(u8::try_from(e.upstream.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&e.upstream.as_bytes()[..e.upstream.len().min(255)]);
                out.extend_from_slice(&u16::try_from(e.body.len()).unwrap_or(0).to_be_bytes());
                out.extend_from_slice(&e.body);
                if let Some(sealed) = &e.sealed_pan {
                    out.push(u8::try_from(sealed.len()).unwrap_or(0));
                    out.extend_from_slice(&sealed[..sealed.len().min(255)]);
                }
            }
            Record::Done { id } => {
                out.push(2);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Record::Delivered { upstream, key } => {
                out.push(5);
                out.push(u8::try_from(upstream.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&upstream.as_bytes()[..upstream.len().min(255)]);
                out.extend_from_slice(&key.mti.to_be_bytes());
                out.extend_from_slice(&key.terminal);
                out.extend_from_slice(&key.merchant);
                out.extend_from_slice(&key.stan.to_be_bytes());
            }
            Record::Dead {
                id,
                reason,
                at_s,
                attempts,
            } => {
                out.push(3);
                out.extend_from_slice(&id.to_be_bytes());
                out.push(match reason {
                    DeadReason::RetriesExhausted => 1,
                    DeadReason::Expired => 2,
                });
                out.extend_from_slice(&at_s.to_be_bytes());
                out.extend_from_slice(&attempts.to_be_bytes());
            }
        }
    }

    fn decode(buf: &[u8]) -> Option<Record> {
        let mut r = Reader(buf);
        match r.u8()? {
            tag @ (1 | 4) => {
                let id = r.u64()?;
                let created_s = UnixSeconds::from_be_bytes(r.take(8)?.try_into().ok()?);
                let dialect = match r.u8()? {
                    0 => Dialect::by_name("ascii1987")?,
                    1 => Dialect::by_name("cup_pos")?,
                    DIALECT_BY_NAME => {
                        let n = usize::from(r.u8()?);
                        Dialect::by_name(std::str::from_utf8(r.take(n)?).ok()?)?
                    }
                    _ => return None,
                };
                let ulen = usize::from(r.u8()?);
                let upstream = std::str::from_utf8(r.take(ulen)?).ok()?.to_string();
                let blen = usize::from(u16::from_be_bytes(r.take(2)?.try_into().ok()?));
                let body = Bytes::copy_from_slice(r.take(blen)?);
                let spec = dialect.spec();
                let key = Key::of(&iso8583::decode(spec, &body).ok()?)?;
                let sealed_pan = match tag {
                    4 => {
                        let n = usize::from(r.u8()?);
                        Some(Bytes::copy_from_slice(r.take(n)?))
                    }
                    _ => None,
                };
                Some(Record::Add(Entry {
                    id,
                    upstream,
                    dialect,
                    created_s,
                    key,
                    body,
                    sealed_pan,
                }))
            }
            2 => Some(Record::Done { id: r.u64()? }),
            5 => {
                let ulen = usize::from(r.u8()?);
                let upstream = std::str::from_utf8(r.take(ulen)?).ok()?.to_string();
                let mti = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
                let terminal = r.take(8)?.try_into().ok()?;
                let merchant = r.take(15)?.try_into().ok()?;
                let stan = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
                Some(Record::Delivered {
                    upstream,
                    key: Key {
                        mti,
                        terminal,
                        merchant,
                        stan,
                    },
                })
            }
            3 => {
                let id = r.u64()?;
                let reason = match r.u8()? {
                    1 => DeadReason::RetriesExhausted,
                    2 => DeadReason::Expired,
                    _ => return None,
                };
                let at_s = i64::from_be_bytes(r.take(8)?.try_into().ok()?);
                let attempts = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
                Some(Record::Dead {
                    id,
                    reason,
                    at_s,
                    attempts,
                })
            }
            _ => None,
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// What `refundgate saf list` prints for the SAF journal in `dir`: pending entries, then dead
/// letters, one line each (no card data is stored, so nothing needs masking).
///
/// The journal is read from a private copy, so this never writes to the directory of a
/// running gateway (which may have appended after the copy was taken).
pub fn run_list(dir: &Path) -> Result<String, String> {
    if !dir.is_dir() {
        return Err(format!("{}: no store-and-forward journal", dir.display()));
    }
    let unique: u64 = rand::random();
    let copy = std::env::temp_dir().join(format!(
        "refundgate-saf-{}-{unique:016x}",
        std::process::id()
    ));
    let listed = copy_dir(dir, &copy)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let options = SafOptions {
                max_retries: 1,
                expiry_s: i64::MAX,
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(1),
                durability: journal::Durability::UnsafeNoFsync,
            };
            let saf = StoreForward::open(&copy, options, Arc::new(crate::clock::SystemClock))
                .map_err(|e| e.to_string())?;
            Ok(render_list(&saf))
        });
    let _ = std::fs::remove_dir_all(&copy);
    listed.map_err(|e| format!("{}: {e}", dir.display()))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // Private like the original: the copy holds the same queued messages.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(crate::journal::storage::DIR_MODE)
        .create(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn render_list(saf: &StoreForward) -> String {
    use std::fmt::Write;
    let pending = saf.pending();
    let dead = saf.dead_letters();
    let mut out = format!(
        "pending {} dead_letters {} (kept {})\n",
        pending.len(),
        saf.dead_total(),
        dead.len()
    );
    let line = |out: &mut String, state: &str, e: &Entry, tail: &str| {
        let _ = writeln!(
            out,
            "{state} id={} upstream={} mti={:04} terminal={} stan={:06} created={}{tail}",
            e.id,
            e.upstream,
            e.key.mti,
            e.key.terminal_str(),
            e.key.stan,
            e.created_s
        );
    };
    for e in &pending {
        line(&mut out, "pending", e, "");
    }
    for d in &dead {
        let reason = match d.reason {
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::Expired => "expired",
        };
        let tail = format!(" reason={reason} attempts={} at={}", d.attempts, d.at_s);
        line(&mut out, "dead", &d.entry, &tail);
    }
    out
}

/// Associated data binding a sealed PAN to its entry.
/// The stored message with its PAN unsealed (by `cipher`) and put back, when it had one
/// (the local queue and the cluster's).
fn body_to_send(cipher: Option<&crate::at_rest::PanCipher>, entry: &Entry) -> Bytes {
    let Some(sealed) = &entry.sealed_pan else {
        return entry.body.clone();
    };
    let pan = cipher.and_then(|c| c.open(sealed, &pan_aad(entry.id, &entry.upstream)));
    match pan.and_then(|pan| with_pan(entry.dialect, &entry.body, &pan)) {
        Some(body) => body,
        None => {
            tracing::warn!(
                id = entry.id,
                "sealed PAN of a queued message cannot be opened; sent without it"
            );
            entry.body.clone()
        }
    }
}

fn pan_aad(id: u64, upstream: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + upstream.len());
    aad.extend_from_slice(&id.to_be_bytes());
    aad.extend_from_slice(upstream.as_bytes());
    aad
}

/// The message reduced to the allow-listed elements of its dialect, and its PAN (ASCII
/// digits) apart; `None` when it does not decode.
fn reduce(dialect: &Dialect, body: &[u8]) -> Option<(Bytes, Option<Vec<u8>>)> {
    let spec = dialect.spec();
    let msg = iso8583::decode(spec, body).ok()?;
    let extra = match dialect.original {
        OriginalKeys::De90 => &[][..],
        OriginalKeys::De61 => KEPT_DE61,
    };
    let mut kept: Vec<u8> = KEPT.iter().chain(extra).copied().collect();
    kept.sort_unstable();
    let mut fields: iso8583::FieldList<'_, 32> = iso8583::FieldList::new();
    for n in kept {
        fields.echo(&msg, n).ok()?;
    }
    let mut out = bytes::BytesMut::with_capacity(body.len());
    iso8583::encode(spec, msg.mti(), fields.as_slice(), &mut out).ok()?;
    let pan = msg.pan().map(|p| p.digits().chars().collect::<Vec<u8>>());
    Some((out.freeze(), pan))
}

/// `body` (without DE2) with DE2 = `pan` put back.
fn with_pan(dialect: &Dialect, body: &[u8], pan: &[u8]) -> Option<Bytes> {
    let spec = dialect.spec();
    let msg = iso8583::decode(spec, body).ok()?;
    let mut fields: iso8583::FieldList<'_, 33> = iso8583::FieldList::new();
    fields.set(2, iso8583::Value::Text(pan)).ok()?;
    for n in msg.present().filter(|&n| n > 2) {
        fields.echo(&msg, n).ok()?;
    }
    let mut out = bytes::BytesMut::with_capacity(body.len() + 24);
    iso8583::encode(spec, msg.mti(), fields.as_slice(), &mut out).ok()?;
    Some(out.freeze())
}

/// The same message with the MTI's origin digit set to 1 (0400 → 0401, 0220 → 0221).
pub fn mark_repeat(dialect: &Dialect, body: &Bytes) -> Bytes {
    dialect.with_origin(body, true)
}

/// Whether a host's answer ends an entry: `00`, or `25` (the host has nothing to reverse).
fn accepted(dialect: &Dialect, answer: &[u8]) -> bool {
    iso8583::decode(dialect.spec(), answer)
        .ok()
        .and_then(|m| m.response_code().map(|c| c == "00" || c == "25"))
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn repeats_set_the_origin_digit_in_both_dialects() {
        assert_eq!(
            &mark_repeat(&crate::dialect::ASCII1987, &Bytes::from_static(b"0400xyz"))[..],
            b"0401xyz"
        );
        assert_eq!(
            &mark_repeat(
                &crate::dialect::CUP_POS,
                &Bytes::from_static(&[0x04, 0x00, 0xff])
            )[..],
            &[0x04, 0x01, 0xff]
        );
        assert_eq!(
            &mark_repeat(
                &crate::dialect::ISO87B,
                &Bytes::from_static(&[0x04, 0x20, 0xff])
            )[..],
            &[0x04, 0x21, 0xff]
        );
    }

    #[test]
    fn an_entry_of_a_dialect_added_as_data_survives_a_restart() {
        let mut fields: iso8583::FieldList<'_, 8> = iso8583::FieldList::new();
        fields.set(3, iso8583::Value::Number(0)).unwrap();
        fields.set(4, iso8583::Value::Number(1000)).unwrap();
        fields
            .set(7, iso8583::Value::Number(1_125_093_015))
            .unwrap();
        fields.set(11, iso8583::Value::Number(42)).unwrap();
        fields.set(41, iso8583::Value::Text(b"TERM0001")).unwrap();
        fields
            .set(42, iso8583::Value::Text(b"MERCHANT 000001"))
            .unwrap();
        let spec = crate::dialect::ISO87B.spec();
        let mut out = bytes::BytesMut::new();
        iso8583::encode(spec, crate::iso8583::Mti(200), fields.as_slice(), &mut out).unwrap();
        let msg = iso8583::decode(spec, &out).unwrap();
        let (key, body) = super::super::reversal_of(&crate::dialect::ISO87B, &msg).unwrap();
        let entry = Entry {
            id: 7,
            upstream: "bank".into(),
            dialect: &crate::dialect::ISO87B,
            created_s: 1,
            key,
            body,
            sealed_pan: None,
        };
        let mut buf = Vec::new();
        Record::Add(entry.clone()).encode(&mut buf);
        let Some(Record::Add(back)) = Record::decode(&buf) else {
            panic!("the record did not decode");
        };
        assert_eq!(back.dialect.name(), "iso87b");
        assert_eq!((back.key, &back.body[..]), (entry.key, &entry.body[..]));
    }

    fn reversal(stan: u32) -> (Key, Bytes) {
        use crate::iso8583::{FieldList, Mti, Value};
        let mut fields: FieldList<'_, 8> = FieldList::new();
        fields.set(3, Value::Number(0)).unwrap();
        fields.set(4, Value::Number(1000)).unwrap();
        fields.set(7, Value::Number(1_125_093_015)).unwrap();
        fields.set(11, Value::Number(u64::from(stan))).unwrap();
        fields.set(41, Value::Text(b"TERM0001")).unwrap();
        fields.set(42, Value::Text(b"MERCHANT 000001")).unwrap();
        fields.set(49, Value::Number(840)).unwrap();
        let spec = crate::dialect::ASCII1987.spec();
        let mut out = bytes::BytesMut::new();
        iso8583::encode(spec, Mti(200), fields.as_slice(), &mut out).unwrap();
        let msg = iso8583::decode(spec, &out).unwrap();
        super::super::reversal_of(&crate::dialect::ASCII1987, &msg).unwrap()
    }

    /// One send, then a dead letter; retries 1 ms apart; no fsync.
    fn quick_options() -> SafOptions {
        SafOptions {
            max_retries: 1,
            expiry_s: 3600,
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
            durability: journal::Durability::UnsafeNoFsync,
        }
    }

    /// The queue in `dir` with [`quick_options`] and the system clock.
    fn open_quick(dir: &Path) -> StoreForward {
        StoreForward::open(dir, quick_options(), Arc::new(crate::clock::SystemClock)).unwrap()
    }

    #[tokio::test]
    async fn a_snapshot_keeps_pending_entries_and_dead_letters_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let saf = open_quick(dir.path());
        for stan in 1..=5 {
            let (key, body) = reversal(stan);
            saf.enqueue("bank", &crate::dialect::ASCII1987, key, body)
                .await
                .unwrap();
        }
        let (key, body) = reversal(1);
        let again = saf
            .enqueue("bank", &crate::dialect::ASCII1987, key, body)
            .await;
        assert_eq!(again.unwrap(), saf.pending()[0].id, "not queued twice");
        let ids: Vec<u64> = saf.pending().iter().map(|e| e.id).collect();
        saf.delivered(ids[0]).await;
        saf.give_up(ids[1], DeadReason::Expired, 0).await;
        saf.compact().await.unwrap();
        let (key, body) = reversal(6);
        let last = saf
            .enqueue("bank", &crate::dialect::ASCII1987, key, body)
            .await
            .unwrap();
        drop(saf);

        let saf = open_quick(dir.path());
        let stans: Vec<u32> = saf.pending().iter().map(|e| e.key.stan).collect();
        assert_eq!(stans, [3, 4, 5, 6]);
        assert_eq!(saf.dead_total(), 1);
        assert_eq!(saf.dead_letters()[0].entry.key.stan, 2);
        assert_eq!(saf.dead_letters()[0].reason, DeadReason::Expired);
        let (key, body) = reversal(7);
        let next = saf
            .enqueue("bank", &crate::dialect::ASCII1987, key, body)
            .await
            .unwrap();
        assert!(next > last, "ids stay unique across snapshot and restart");
        assert!(saf.pending().iter().all(|e| e.key.mti == 400));
    }

    /// Found by `refundgate sim --core` (seed 99290): a sale answered 91 got its reversal
    /// delivered; a later request under the same key (here damaged bytes read as that STAN)
    /// was answered 91 too, and its reversal reached the host as a first 0400 again.
    #[tokio::test]
    async fn a_reversal_of_a_key_already_reversed_goes_as_a_repeat_also_after_a_snapshot_and_restart(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let saf = open_quick(dir.path());
        async fn enqueue(saf: &StoreForward, stan: u32) -> u64 {
            let (key, body) = reversal(stan);
            saf.enqueue("bank", &crate::dialect::ASCII1987, key, body)
                .await
                .unwrap()
        }
        let first = enqueue(&saf, 1).await;
        assert!(!saf.lock().pending[&first].repeat, "a first send");
        saf.delivered(first).await;
        let again = enqueue(&saf, 1).await;
        assert_ne!(again, first, "a new entry: the first one was delivered");
        assert!(
            saf.lock().pending[&again].repeat,
            "the host has seen a reversal of this key: 0401"
        );
        let other = enqueue(&saf, 2).await;
        assert!(!saf.lock().pending[&other].repeat, "another key: 0400");
        saf.delivered(again).await;
        saf.delivered(other).await;
        saf.compact().await.unwrap();
        drop(saf);
        let saf = open_quick(dir.path());
        assert!(saf.pending().is_empty());
        let third = enqueue(&saf, 1).await;
        assert!(
            saf.lock().pending[&third].repeat,
            "remembered across a snapshot and a restart"
        );
        let fresh = enqueue(&saf, 3).await;
        assert!(!saf.lock().pending[&fresh].repeat);
    }

    #[tokio::test]
    async fn a_retried_dead_letter_is_queued_again_once_and_stays_queued_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let saf = open_quick(dir.path());
        let (key, body) = reversal(1);
        let id = saf
            .enqueue("bank", &crate::dialect::ASCII1987, key, body)
            .await
            .unwrap();
        saf.give_up(id, DeadReason::RetriesExhausted, 0).await;
        assert!(saf.pending().is_empty());
        assert_eq!(saf.retry_dead(id).await, Ok(true));
        assert_eq!(saf.retry_dead(id).await, Ok(false), "retried once only");
        assert_eq!(saf.retry_dead(999).await, Ok(false));
        assert!(saf.dead_letters().is_empty());
        assert_eq!(saf.pending().iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
        assert!(
            saf.lock().pending[&id].repeat,
            "sent as a repeat: it was sent before"
        );
        drop(saf);
        let saf = open_quick(dir.path());
        assert_eq!(saf.pending().iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
        assert!(saf.dead_letters().is_empty(), "replay keeps the retry");
        saf.compact().await.unwrap();
        drop(saf);
        let saf = open_quick(dir.path());
        assert_eq!(saf.pending().iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
    }

    /// A terminal's own reversal carrying PAN, track 2 and a PIN block.
    fn terminal_reversal(stan: u32) -> (Key, Bytes) {
        use crate::iso8583::{FieldList, Mti, Value};
        let mut fields: FieldList<'_, 12> = FieldList::new();
        fields.set(2, Value::Text(b"4761739001010119")).unwrap();
        fields.set(3, Value::Number(0)).unwrap();
        fields.set(4, Value::Number(1000)).unwrap();
        fields.set(11, Value::Number(u64::from(stan))).unwrap();
        fields
            .set(35, Value::Text(b"4761739001010119=25121011000012345678"))
            .unwrap();
        fields.set(41, Value::Text(b"TERM0001")).unwrap();
        fields.set(42, Value::Text(b"MERCHANT 000001")).unwrap();
        fields.set(49, Value::Number(840)).unwrap();
        fields.set(52, Value::Text(b"0123456789ABCDEF")).unwrap();
        let spec = crate::dialect::ASCII1987.spec();
        let mut out = bytes::BytesMut::new();
        iso8583::encode(spec, Mti(400), fields.as_slice(), &mut out).unwrap();
        let key = Key::of(&iso8583::decode(spec, &out).unwrap()).unwrap();
        (key, out.freeze())
    }

    #[tokio::test]
    async fn queued_messages_keep_allowed_elements_and_a_sealed_pan_only() {
        let dir = tempfile::tempdir().unwrap();
        let cipher = || crate::at_rest::PanCipher::new(&[9; 32]).unwrap();
        let spec = crate::dialect::ASCII1987.spec();
        {
            let saf = open_quick(dir.path());
            // Without a cipher the PAN is not kept at all.
            let (key, body) = terminal_reversal(1);
            saf.enqueue("bank", &crate::dialect::ASCII1987, key, body)
                .await
                .unwrap();
            saf.set_pan_cipher(cipher());
            let (key, body) = terminal_reversal(2);
            saf.enqueue("bank", &crate::dialect::ASCII1987, key, body)
                .await
                .unwrap();
            assert!(saf.holds_sealed_pans());
        }
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for secret in [&b"4761739001010119"[..], b"=2512", b"0123456789ABCDEF"] {
                assert!(!bytes.windows(secret.len()).any(|w| w == secret));
            }
        }
        let saf = open_quick(dir.path());
        saf.set_pan_cipher(cipher());
        let pending = saf.pending();
        assert_eq!(pending.len(), 2);
        for e in &pending {
            let stored = iso8583::decode(spec, &e.body).unwrap();
            assert!(!stored.has(2) && !stored.has(35) && !stored.has(52));
            assert_eq!(
                (stored.stan(), stored.terminal()),
                (Some(e.key.stan), Some("TERM0001"))
            );
        }
        assert!(pending[0].sealed_pan.is_none());
        let sent = body_to_send(saf.pan_cipher.get(), &pending[1]);
        let sent = iso8583::decode(spec, &sent).unwrap();
        assert_eq!(
            sent.text(2),
            Some("4761739001010119"),
            "PAN put back to send"
        );
        assert!(!sent.has(35) && !sent.has(52));
        // Under another key (or entry) the sealed PAN does not open: sent without it.
        let other = open_quick(tempfile::tempdir().unwrap().path());
        other.set_pan_cipher(crate::at_rest::PanCipher::new(&[1; 32]).unwrap());
        assert!(
            !iso8583::decode(spec, &body_to_send(other.pan_cipher.get(), &pending[1]))
                .unwrap()
                .has(2)
        );
    }

    #[test]
    fn records_round_trip() {
        for r in [
            Record::Done { id: 7 },
            Record::Dead {
                id: 9,
                reason: DeadReason::Expired,
                at_s: 1_700_000_000,
                attempts: 3,
            },
        ] {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            let back = Record::decode(&buf).unwrap();
            let mut again = Vec::new();
            back.encode(&mut again);
            assert_eq!(buf, again);
        }
        assert!(Record::decode(&[9]).is_none());
        assert!(Record::decode(&[1, 0, 0]).is_none());
    }
}
