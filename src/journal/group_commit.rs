//! The writer thread: group commit with one positioned write and one `fdatasync` per batch.
//!
//! Appenders take their seq at once, under the queue's lock ([`Journal::enqueue`]), so a
//! caller that enqueues under its own lock (the ledger's shard) gets the journal order it
//! applied in. The writer sleeps on a condition variable only while the queue is empty; it
//! takes everything queued in one swap, writes it in chunks (up to the batch limits and the
//! room left in the segment) with one `pwrite` and one `fdatasync` each, publishes the new
//! durable seq and wakes every waiter once per chunk ([`Journal::durable`]): no per-record
//! channel, no per-record wake-up from this thread.
//!
//! # Gathering under load
//!
//! Each `fdatasync` costs about the same CPU however few records it covers (here ~30 µs, and
//! the device interrupt and the thread switches around it again as much). While the journal
//! takes more records per second than [`GatherConfig::above_per_s`], the writer writes at
//! most once per [`GatherConfig::wait`]: a batch taken sooner after the previous write began
//! waits out the rest and adds what arrived meanwhile, so one sync covers several batches'
//! worth: on a busy machine that CPU goes to deciding instead. The previous write's own time
//! counts toward the wait (waiting the whole of it after each sync left both cores idle
//! while every request waited, about 5 % of the answers at 256 × 1).
//!
//! The wait also ends on [`Journal::idle_hint`](super::Journal::idle_hint): the server calls
//! it when every connection thread has run out of work, so no more records can come before
//! the answers already waiting go out. Waiting on would leave the cores idle (at 256 × 1 a
//! quarter of the machine sat idle while every request waited out the gather).
//!
//! Below that rate a batch waits for that hint alone (at most the same wait): the requests
//! of one burst, decided one after the other on the connection threads, share one sync
//! instead of the first going alone and the rest waiting for it and then their own. Where
//! no hint ever comes (a server without connection threads, or none yet), light load
//! writes at once.
//!
//! # Faults
//!
//! If the write or the sync fails, every record not yet durable — the failed chunk, the rest
//! of the batch and everything queued behind it — is dropped: their waiters get
//! [`StoreError::Unavailable`] (their failure epoch has ended below their seq), and the next
//! record takes the first failed seq again. The failed bytes may be in the page cache or on
//! disk, whole, torn or not at all, and a crash may keep any of them, so they are never
//! written over: an overwrite torn by a crash could leave zeros in front of whole failed
//! records, which recovery must take for damage in the middle of the log. Instead the writer
//! leaves the segment as it is and goes on in a fresh one that starts with a void marker
//! ([`record::encode_void`]): "records from seq `from` on, before this, were never
//! acknowledged". The marker goes out with the next batch (in its write and sync), or alone
//! on [`scrub`](Writer::scrub) and at shutdown, so a restart does not replay appends answered
//! as failed; if the marker never reaches the disk, recovery's caveat applies (see
//! [`Journal::append`](super::Journal::append)). A failure in the fresh segment moves on
//! again. Each failure costs a segment file, so a flapping disk leaves short segments behind;
//! snapshots remove them like any other.
//!
//! With `hold_after_failure`, the journal then refuses appends until the caller has
//! [`scrub`](super::Journal::scrub)bed the failed region, rebuilt its state from what is
//! durable, and [`resume`](super::Journal::resume)d: a caller that applies before the record is
//! durable (the ledger) must drop what it applied on top of the failed records first.
//!
//! [`Journal::enqueue`]: super::Journal::enqueue
//! [`Journal::durable`]: super::Journal::durable

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::record;
use super::segment::{self, Segment, SEGMENT_HEADER_BYTES};
use super::storage::Storage;
use super::{Durability, StoreError};

/// The page size: the segment's size floor (see `segment::SEGMENT_BYTES_MIN`).
pub(crate) const PAGE_BYTES: u64 = 4096;

/// Failure epochs remembered for late waiters.
const ENDED_EPOCHS_KEPT: usize = 64;

/// One queued append.
pub(crate) struct Request {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// The append queue, under [`Shared::queue`].
pub(crate) struct Queue {
    pub pending: Vec<Request>,
    /// The seq the next enqueued record gets.
    pub next_seq: u64,
    /// After a failure with `hold_after_failure`: appends refused until resumed.
    pub held: bool,
    /// The journal is being dropped: drain and stop.
    pub closing: bool,
    /// The writer waits on [`Shared::wake`].
    pub idle: bool,
    /// `next_seq` when the connection threads were last all idle ([`Journal::idle_hint`]):
    /// no record enqueued after it means none is coming before the waiting answers go out.
    ///
    /// [`Journal::idle_hint`]: super::Journal::idle_hint
    pub idle_from: u64,
    /// The writer is in its gather wait (on [`Shared::wake`]).
    pub gathering: bool,
    /// A scrub asked for by [`Journal::scrub`](super::Journal::scrub).
    pub scrub: Option<std::sync::mpsc::Sender<io::Result<()>>>,
}

/// State the writer shares with [`Journal`](super::Journal).
pub(crate) struct Shared {
    /// The last seq acknowledged as durable.
    pub durable_seq: AtomicU64,
    /// Batches written and synced successfully.
    pub batches: AtomicU64,
    /// Batches that failed (every waiter got an error).
    pub failed_batches: AtomicU64,
    /// Segments the writer has left, oldest first; snapshots delete the covered ones.
    pub closed: Mutex<Vec<ClosedSegment>>,
    pub queue: Mutex<Queue>,
    /// Wakes the writer.
    pub wake: Condvar,
    /// Wakes waiters whenever the durable seq moves or a failure ends an epoch.
    pub moved: tokio::sync::Notify,
    /// Bumped (under the queue lock) by every failure that dropped records.
    pub epoch: AtomicU64,
    /// `(epoch, durable seq when it ended)` of the last failures.
    pub ended: Mutex<VecDeque<(u64, u64)>>,
    pub last_error: Mutex<Option<Arc<io::Error>>>,
    /// Mirrors [`Queue::held`] for a lock-free look.
    pub held: std::sync::atomic::AtomicBool,
    /// Hold after a failure (`Options::hold_after_failure`, or set by the caller).
    pub hold_mode: std::sync::atomic::AtomicBool,
    /// Tasks waiting for a seq to be durable, by seq: the writer wakes exactly those its
    /// chunk covered (all of them when a failure ends the epoch).
    pub waiters: Mutex<BTreeMap<u64, Vec<Waker>>>,
}

impl Shared {
    pub(crate) fn new(last_seq: u64, closed: Vec<ClosedSegment>) -> Shared {
        Shared {
            durable_seq: AtomicU64::new(last_seq),
            batches: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            closed: Mutex::new(closed),
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                next_seq: last_seq + 1,
                held: false,
                closing: false,
                idle: false,
                idle_from: 0,
                gathering: false,
                scrub: None,
            }),
            wake: Condvar::new(),
            moved: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(0),
            ended: Mutex::new(VecDeque::new()),
            last_error: Mutex::new(None),
            held: std::sync::atomic::AtomicBool::new(false),
            hold_mode: std::sync::atomic::AtomicBool::new(false),
            waiters: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock_waiters(&self) -> MutexGuard<'_, BTreeMap<u64, Vec<Waker>>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `waker` for `seq` of `epoch` unless its outcome is known already (checked
    /// again under the waiters' lock, so a wake-up cannot be missed).
    pub(crate) fn register(
        &self,
        seq: u64,
        epoch: u64,
        waker: &Waker,
    ) -> Option<Result<u64, StoreError>> {
        if let Some(done) = self.status(seq, epoch) {
            return Some(done);
        }
        let mut waiters = self.lock_waiters();
        if let Some(done) = self.status(seq, epoch) {
            return Some(done);
        }
        let slot = waiters.entry(seq).or_default();
        if !slot.iter().any(|w| w.will_wake(waker)) {
            slot.push(waker.clone());
        }
        None
    }

    /// Wakes the waiters of every seq up to the durable one (`all`: every waiter).
    pub(crate) fn wake_durable(&self, all: bool) {
        let ready = {
            let mut waiters = self.lock_waiters();
            if waiters.is_empty() {
                return;
            }
            if all {
                std::mem::take(&mut *waiters)
            } else {
                let durable = self.durable_seq.load(Ordering::Acquire);
                let later = waiters.split_off(&durable.saturating_add(1));
                std::mem::replace(&mut *waiters, later)
            }
        };
        for waker in ready.into_values().flatten() {
            waker.wake();
        }
    }

    /// Wakes the waiters of every seq below `below` without an outcome: each looks at its
    /// own deadline and waits again (see [`Journal::durable_until`](super::Journal::durable_until)).
    pub(crate) fn wake_below(&self, below: u64) {
        let ready = {
            let mut waiters = self.lock_waiters();
            match waiters.first_key_value() {
                Some((&first, _)) if first < below => {}
                _ => return,
            }
            let later = waiters.split_off(&below);
            std::mem::replace(&mut *waiters, later)
        };
        for waker in ready.into_values().flatten() {
            waker.wake();
        }
    }

    pub(crate) fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The error a dropped record's waiter gets.
    pub(crate) fn unavailable(&self) -> StoreError {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        StoreError::Unavailable(
            last.unwrap_or_else(|| Arc::new(io::Error::other("journal write failed"))),
        )
    }

    /// Whether the record `seq` queued in `epoch` is durable (`Some(Ok)`), was dropped by a
    /// failure (`Some(Err)`), or is still pending (`None`).
    pub(crate) fn status(&self, seq: u64, epoch: u64) -> Option<Result<u64, StoreError>> {
        loop {
            let before = self.epoch.load(Ordering::Acquire);
            let durable = self.durable_seq.load(Ordering::Acquire);
            if self.epoch.load(Ordering::Acquire) != before {
                continue;
            }
            if epoch == before {
                return (durable >= seq).then_some(Ok(seq));
            }
            let end = self
                .ended
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .find(|(e, _)| *e == epoch)
                .map(|(_, end)| *end);
            return Some(match end {
                Some(end) if seq <= end => Ok(seq),
                _ => Err(self.unavailable()),
            });
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("durable_seq", &self.durable_seq)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A segment no longer written to.
#[derive(Debug, Clone)]
pub(crate) struct ClosedSegment {
    pub path: PathBuf,
    pub last_seq: Option<u64>,
}

/// Writer settings taken from [`Options`](super::Options).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterConfig {
    pub durability: Durability,
    pub segment_bytes: u64,
    pub batch_records_max: usize,
    pub batch_bytes_max: u64,
    /// Stepped mode: spare segments are made inline, never on a preallocation thread.
    pub inline_prealloc: bool,
    /// Waiting for more records under load (see the module docs).
    pub gather: GatherConfig,
}

/// When and how long the writer waits for more records before a write (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherConfig {
    /// The shortest time from one write to the next under load; zero: never wait.
    pub wait: Duration,
    /// Wait only while the journal takes more records per second than this.
    pub above_per_s: u64,
}

impl GatherConfig {
    /// Never waits.
    pub const OFF: GatherConfig = GatherConfig {
        wait: Duration::ZERO,
        above_per_s: 0,
    };
}

/// The writer's measure of its intake, in windows of [`Gather::WINDOW`]: whether it is
/// above [`GatherConfig::above_per_s`], and so whether a batch waits for more.
#[derive(Debug)]
pub(crate) struct Gather {
    config: GatherConfig,
    window_start: Instant,
    window_records: u64,
    busy: bool,
    /// When the previous write began ([`Gather::writing`]).
    last_write: Option<Instant>,
    /// An idle hint has come ([`Journal::idle_hint`](super::Journal::idle_hint)): below
    /// the rate a batch waits for the next one (at most `wait`).
    pub(crate) hints_seen: bool,
}

impl Gather {
    /// Length of the windows the intake rate is measured over.
    pub(crate) const WINDOW: Duration = Duration::from_millis(100);

    pub(crate) fn new(config: GatherConfig, now: Instant) -> Self {
        Self {
            config,
            window_start: now,
            window_records: 0,
            busy: false,
            last_write: None,
            hints_seen: false,
        }
    }

    /// Counts `records` taken at `now`; returns how long to wait for more before writing
    /// them (`None`: write at once), an idle hint ending the wait sooner. The rate of the
    /// last whole window decides: above it the wait ends [`GatherConfig::wait`] after the
    /// previous write began, so the time that write and its sync took counts toward it (one
    /// write per `wait` at most, and no wait at all once a sync takes longer than that);
    /// below it a batch waits only for the idle hint, at most `wait`, and only once hints
    /// come at all ([`Gather::hints_seen`]): without them it is written at once.
    pub(crate) fn taken(&mut self, records: usize, now: Instant) -> Option<Duration> {
        self.window_records = self.window_records.saturating_add(records as u64);
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Self::WINDOW {
            let per_s = u128::from(self.window_records) * 1_000_000 / elapsed.as_micros().max(1);
            self.busy = per_s > u128::from(self.config.above_per_s);
            self.window_start = now;
            self.window_records = 0;
        }
        if self.config.wait.is_zero() {
            return None;
        }
        if !self.busy {
            return self.hints_seen.then_some(self.config.wait);
        }
        let since = self
            .last_write
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        Some(self.config.wait.saturating_sub(since)).filter(|w| !w.is_zero())
    }

    /// Notes that a write begins at `now`.
    pub(crate) fn writing(&mut self, now: Instant) {
        self.last_write = Some(now);
    }

    /// Counts records added to a batch while it waited.
    pub(crate) fn gathered(&mut self, records: usize) {
        self.window_records = self.window_records.saturating_add(records as u64);
    }
}

/// Where the writer starts, as recovery left the directory.
pub(crate) struct WriterStart {
    pub active: Segment,
    pub active_last_seq: Option<u64>,
    pub pos: u64,
    pub next_seq: u64,
    pub spares: VecDeque<Segment>,
    pub next_index: u64,
}

/// The writer thread's state.
pub(crate) struct Writer {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: WriterConfig,
    shared: Arc<Shared>,
    active: Segment,
    active_last_seq: Option<u64>,
    pos: u64,
    /// A write or sync in the active segment failed: nothing more is written to it.
    abandoned: bool,
    /// The active segment is fresh after a failure: its first write starts with a void
    /// marker from this seq (`pos` is past the room kept for it).
    void_from: Option<u64>,
    next_seq: u64,
    spares: VecDeque<Segment>,
    pending: Option<JoinHandle<io::Result<Segment>>>,
    next_index: u64,
    buf: Vec<u8>,
    /// Batches failed in a row (0 while the storage works).
    failing_batches: u64,
    gather: Gather,
}

enum Work {
    Batch,
    Scrub(std::sync::mpsc::Sender<io::Result<()>>),
    Exit,
}

impl Writer {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: WriterConfig,
        shared: Arc<Shared>,
        start: WriterStart,
    ) -> Self {
        Self {
            storage,
            dir,
            config,
            shared,
            active: start.active,
            active_last_seq: start.active_last_seq,
            pos: start.pos,
            abandoned: false,
            void_from: None,
            next_seq: start.next_seq,
            spares: start.spares,
            pending: None,
            next_index: start.next_index,
            buf: Vec::new(),
            failing_batches: 0,
            gather: Gather::new(config.gather, crate::clock::monotonic()),
        }
    }

    /// Runs until the [`Journal`](super::Journal) closes and the queue is drained.
    pub(crate) fn run(mut self) {
        let mut taken: Vec<Request> = Vec::with_capacity(self.config.batch_records_max);
        loop {
            let work = {
                let mut q = self.shared.lock_queue();
                loop {
                    if let Some(done) = q.scrub.take() {
                        break Work::Scrub(done);
                    }
                    if !q.pending.is_empty() {
                        std::mem::swap(&mut q.pending, &mut taken);
                        // Someone says when the connection threads run out of work.
                        self.gather.hints_seen |= q.idle_from != 0;
                        break Work::Batch;
                    }
                    if q.closing {
                        break Work::Exit;
                    }
                    q.idle = true;
                    q = self
                        .shared
                        .wake
                        .wait(q)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    q.idle = false;
                }
            };
            match work {
                Work::Exit => break,
                Work::Scrub(done) => {
                    let _ = done.send(self.scrub());
                }
                Work::Batch => {
                    if let Some(wait) = self.gather.taken(taken.len(), crate::clock::monotonic()) {
                        let before = taken.len();
                        taken.append(&mut self.gather_for(wait));
                        self.gather.gathered(taken.len() - before);
                    }
                    self.gather.writing(crate::clock::monotonic());
                    self.write_taken(&taken);
                    taken.clear();
                }
            }
        }
        // Void a failed region at shutdown too, so a clean restart cannot replay appends
        // that were answered as failed. If the storage is still failing, recovery's caveat
        // applies (see `Journal::append`).
        let _ = self.scrub();
        if let Some(pending) = self.pending.take() {
            // Let an in-flight preallocation finish so shutdown leaves whole files.
            let _ = pending.join();
        }
    }

    /// Waits up to `wait` for more records, ending early once the connection threads were
    /// all idle after the newest record (an idle hint, before or during the wait); returns
    /// what was queued meanwhile.
    fn gather_for(&self, wait: Duration) -> Vec<Request> {
        let mut q = self.shared.lock_queue();
        q.gathering = true;
        let (mut q, _) = self
            .shared
            .wake
            .wait_timeout_while(q, wait, |q| {
                q.idle_from < q.next_seq && !q.closing && q.scrub.is_none()
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        q.gathering = false;
        std::mem::take(&mut q.pending)
    }

    /// Stepped mode: takes everything queued, writes and syncs it (waking its waiters, or
    /// failing it as [`run`](Self::run) would) on the caller's thread. Returns how many
    /// records were taken.
    pub(crate) fn step(&mut self) -> usize {
        let taken = std::mem::take(&mut self.shared.lock_queue().pending);
        if taken.is_empty() {
            return 0;
        }
        self.write_taken(&taken);
        taken.len()
    }

    /// Voids a failed region (if any), so the files replay exactly the durable records: moves
    /// to a fresh segment and writes its void marker alone.
    pub(crate) fn scrub(&mut self) -> io::Result<()> {
        if self.abandoned {
            self.leave_failed_segment()?;
        }
        if self.void_from.is_some() {
            self.write(&[])
        } else {
            Ok(())
        }
    }

    /// Moves to a fresh segment after a failure, keeping room for its void marker.
    fn leave_failed_segment(&mut self) -> io::Result<()> {
        self.void_from = Some(self.next_seq);
        self.switch_segment()?;
        self.abandoned = false;
        Ok(())
    }

    /// Writes `taken` in chunks that fit the batch limits and the segment; stops at the first
    /// failure (which drops the rest).
    fn write_taken(&mut self, taken: &[Request]) {
        let mut i = 0;
        while i < taken.len() {
            if self.abandoned {
                if let Err(error) = self.leave_failed_segment() {
                    self.fail(&error);
                    return;
                }
            }
            let need = record::encoded_len(taken[i].payload.len()) as u64;
            if self.pos + need > self.active.size {
                if let Err(error) = self.switch_segment() {
                    self.fail(&error);
                    return;
                }
            }
            let mut bytes = need;
            let mut j = i + 1;
            while j < taken.len() && j - i < self.config.batch_records_max {
                let n = record::encoded_len(taken[j].payload.len()) as u64;
                if self.pos + bytes + n > self.active.size
                    || bytes + n > self.config.batch_bytes_max
                {
                    break;
                }
                bytes += n;
                j += 1;
            }
            let started = crate::clock::monotonic();
            if let Err(error) = self.write(&taken[i..j]) {
                self.fail(&error);
                return;
            }
            crate::telemetry::count_journal_batch(
                j - i,
                crate::clock::monotonic().saturating_duration_since(started),
            );
            if self.failing_batches > 0 {
                tracing::info!(
                    failed_batches = self.failing_batches,
                    "journal storage recovered; failed region voided, writing in a fresh segment"
                );
                self.failing_batches = 0;
            }
            self.shared.wake_durable(false);
            self.shared.moved.notify_waiters();
            i = j;
            if self.pos > self.active.size / 2 {
                // Ahead of need, but not at start-up: 64 MiB of zeros being written back
                // would slow the syncs of the first batches.
                self.prepare_spare();
            }
        }
    }

    /// Drops every record not yet durable and ends the failure epoch.
    fn fail(&mut self, error: &io::Error) {
        self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
        if self.failing_batches == 0 {
            // Once per outage, not once per batch: a dead disk must not flood the log.
            tracing::warn!(
                segment = %self.active.path.display(),
                offset = self.pos,
                error = %error,
                "journal write failed; appends answered as store unavailable until it recovers"
            );
        }
        self.failing_batches += 1;
        let error = Arc::new(io::Error::new(error.kind(), error.to_string()));
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
        {
            let mut q = self.shared.lock_queue();
            q.pending.clear();
            q.next_seq = self.next_seq;
            if self.shared.hold_mode.load(Ordering::Acquire) {
                q.held = true;
                self.shared.held.store(true, Ordering::Release);
            }
            let epoch = self.shared.epoch.load(Ordering::Acquire);
            let mut ended = self
                .shared
                .ended
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ended.push_back((epoch, self.shared.durable_seq.load(Ordering::Acquire)));
            if ended.len() > ENDED_EPOCHS_KEPT {
                ended.pop_front();
            }
            self.shared.epoch.store(epoch + 1, Ordering::Release);
        }
        self.shared.wake_durable(true);
        self.shared.moved.notify_waiters();
    }

    /// Writes `batch` at `pos` (after the void marker, if the segment owes one; an empty
    /// batch writes just the marker) and syncs it.
    fn write(&mut self, batch: &[Request]) -> io::Result<()> {
        self.buf.clear();
        let start = match self.void_from {
            Some(from) => {
                record::encode_void(from, &mut self.buf);
                SEGMENT_HEADER_BYTES as u64
            }
            None => self.pos,
        };
        let mut seq = self.next_seq;
        for request in batch {
            debug_assert_eq!(request.seq, seq, "records are written in seq order");
            record::encode(seq, &request.payload, &mut self.buf);
            seq += 1;
        }
        let result = self.active.file.write_at(&self.buf, start).and_then(|()| {
            match self.config.durability {
                Durability::Fdatasync => self.active.file.sync_data(),
                Durability::UnsafeNoFsync => Ok(()),
            }
        });
        if let Err(error) = result {
            self.abandoned = true;
            return Err(error);
        }
        self.pos = start + self.buf.len() as u64;
        self.void_from = None;
        if seq > self.next_seq {
            self.active_last_seq = Some(seq - 1);
            self.shared.durable_seq.store(seq - 1, Ordering::Release);
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
        }
        self.next_seq = seq;
        Ok(())
    }

    /// Closes the active segment and moves to a spare (a void marker still owed goes with it).
    fn switch_segment(&mut self) -> io::Result<()> {
        let next = self.take_spare()?;
        tracing::debug!(segment = %next.path.display(), index = next.index, "journal moves to a new segment");
        let old = std::mem::replace(&mut self.active, next);
        let closed = ClosedSegment {
            path: old.path,
            last_seq: self.active_last_seq.take(),
        };
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(closed);
        self.pos = SEGMENT_HEADER_BYTES as u64;
        if self.void_from.is_some() {
            self.pos += record::VOID_BYTES as u64;
        }
        Ok(())
    }

    fn take_spare(&mut self) -> io::Result<Segment> {
        if let Some(spare) = self.spares.pop_front() {
            return Ok(spare);
        }
        if let Some(pending) = self.pending.take() {
            return pending
                .join()
                .map_err(|_| io::Error::other("segment preallocation thread panicked"))?;
        }
        let index = self.next_index;
        let segment =
            segment::create_segment(&self.storage, &self.dir, index, self.config.segment_bytes)?;
        self.next_index = index + 1;
        Ok(segment)
    }

    /// Starts preallocating the next segment in the background, unless one is ready
    /// (stepped mode: makes it at once, on the caller's thread).
    fn prepare_spare(&mut self) {
        if !self.spares.is_empty() || self.pending.is_some() {
            return;
        }
        let storage = Arc::clone(&self.storage);
        let dir = self.dir.clone();
        let (index, size) = (self.next_index, self.config.segment_bytes);
        if self.config.inline_prealloc {
            match segment::create_segment(&storage, &dir, index, size) {
                Ok(spare) => {
                    self.spares.push_back(spare);
                    self.next_index = index + 1;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot preallocate a segment; will create at rotation");
                }
            }
            return;
        }
        let spawned = thread::Builder::new()
            .name("journal-prealloc".into())
            .spawn(move || segment::create_segment_paced(&storage, &dir, index, size, true));
        match spawned {
            Ok(handle) => {
                self.pending = Some(handle);
                self.next_index = index + 1;
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot start segment preallocation; will create at rotation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `per_window` records, in batches of `batch`, over each of `windows` windows
    /// from `start`; returns the waits asked for in the last window.
    fn feed(
        gather: &mut Gather,
        start: &mut Instant,
        windows: u32,
        per_window: usize,
        batch: usize,
    ) -> Vec<Option<Duration>> {
        let mut last = Vec::new();
        for _ in 0..windows {
            last.clear();
            let batches = per_window / batch;
            let step = Gather::WINDOW / batches as u32;
            for _ in 0..batches {
                *start += step;
                last.push(gather.taken(batch, *start));
            }
        }
        last
    }

    /// A gather of 500 µs above 10,000 records/s, its config, and the instant it starts at.
    fn gather_above_10k() -> (Gather, GatherConfig, Instant) {
        let config = GatherConfig {
            wait: Duration::from_micros(500),
            above_per_s: 10_000,
        };
        let now = crate::clock::monotonic();
        (Gather::new(config, now), config, now)
    }

    #[test]
    fn a_batch_waits_only_while_the_intake_is_above_the_rate() {
        let (mut gather, config, mut now) = gather_above_10k();
        // 5,000 records/s (500 per 100 ms window): written at once.
        let light = feed(&mut gather, &mut now, 3, 500, 2);
        assert!(light.iter().all(Option::is_none), "{light:?}");
        // 30,000/s: once a whole window measured it, every batch waits.
        let heavy = feed(&mut gather, &mut now, 2, 3_000, 10);
        assert!(heavy.iter().all(|w| *w == Some(config.wait)), "{heavy:?}");
        // Back to light load: the next window's measure stops the waits.
        let light = feed(&mut gather, &mut now, 2, 500, 2);
        assert!(light.iter().all(Option::is_none), "{light:?}");
    }

    #[test]
    fn records_gathered_while_waiting_count_toward_the_rate() {
        let (mut gather, _, mut now) = gather_above_10k();
        // 1 record per batch taken, 14 more gathered while it waited: 15,000/s in all,
        // of which the batches taken alone are 1,000/s.
        for _ in 0..200 {
            now += Duration::from_millis(1);
            if gather.taken(1, now).is_some() {
                return;
            }
            gather.gathered(14);
        }
        panic!("an intake of 15,000/s, most of it gathered, never made a batch wait");
    }

    #[test]
    fn the_time_the_previous_write_took_counts_toward_the_wait() {
        let (mut gather, config, mut now) = gather_above_10k();
        let heavy = feed(&mut gather, &mut now, 2, 3_000, 10);
        assert!(heavy.iter().all(|w| *w == Some(config.wait)), "{heavy:?}");
        // A write began 200 µs ago: the next batch waits only the 300 µs left.
        gather.writing(now);
        now += Duration::from_micros(200);
        assert_eq!(gather.taken(10, now), Some(Duration::from_micros(300)));
        // A write (and its sync) that took longer than the wait: written at once, so a slow
        // disk does not add the wait on top of its own latency.
        gather.writing(now);
        now += Duration::from_micros(700);
        assert_eq!(gather.taken(10, now), None);
    }

    #[test]
    fn below_the_rate_a_batch_waits_for_the_idle_hint_once_hints_come() {
        let (mut gather, config, mut now) = gather_above_10k();
        let light = feed(&mut gather, &mut now, 2, 500, 2);
        assert!(light.iter().all(Option::is_none), "{light:?}");
        gather.hints_seen = true;
        // The whole wait at most: the hint ends it (the writer's wait, not this).
        let light = feed(&mut gather, &mut now, 2, 500, 2);
        assert!(light.iter().all(|w| *w == Some(config.wait)), "{light:?}");
    }

    #[test]
    fn no_wait_when_gathering_is_off() {
        let mut now = crate::clock::monotonic();
        let mut gather = Gather::new(GatherConfig::OFF, now);
        let heavy = feed(&mut gather, &mut now, 3, 50_000, 100);
        assert!(heavy.iter().all(Option::is_none), "{heavy:?}");
    }
}
