//! The durable journal: append-only, group-committed, checksummed records of opaque payloads,
//! with snapshots to bound replay (DOMAIN §7). Payload-agnostic: the ledger owns the bytes.
//!
//! # Use
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use refundgate::journal::{Journal, Options};
//! let (journal, mut recovered) = Journal::open("/var/lib/refundgate/journal", Options::default())?;
//! if let Some(snapshot) = recovered.take_snapshot() { /* ledger.restore(&snapshot.bytes) */ }
//! recovered.replay(|seq, payload| { /* ledger.apply(seq, payload) */ })?;
//! let seq = journal.append(b"event".to_vec()).await?; // resolves once durable
//! if journal.records_since_snapshot() >= 100_000 {
//!     // let bytes = ledger.snapshot(); (state as of `seq`)
//!     # let bytes = Vec::new();
//!     journal.snapshot(seq, &bytes)?; // blocking: call from spawn_blocking in async code
//! }
//! # Ok(()) }
//! ```
//!
//! # Files in the directory
//!
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments ([`segment`]), each preallocated and zeroed, holding
//!   records ([`record`]) `len u32 | crc32c u32 | seq u64 | payload`; a zero length ends them.
//! - `snapshot-NNNNNNNNNNNNNNNNNNNN.snap`: the caller's state as of a seq ([`snapshot`]).
//! - `*.tmp`: interrupted preallocations or snapshot writes, removed at open.
//! - `LOCK`: `flock`ed by the open journal, so a second process (or a second open) is refused.
//!
//! # Faults
//!
//! A failed write or sync fails every append of its batch with [`StoreError`] (answer 96)
//! and acknowledges nothing. The failed bytes are never written over (a torn overwrite could
//! leave zeros in front of whole failed records, which recovery must refuse as damage in the
//! middle): the writer leaves that segment and goes on in a fresh one whose first record is a
//! void marker, "records from seq `from` on, before me, were never acknowledged"; the next
//! batch reuses the failed seqs after it, and replay returns exactly what was acknowledged.
//! [`Journal::scrub`] and shutdown write the marker alone. Caveat: if the process dies while the storage is failing, bytes
//! the storage persisted despite reporting failure may be replayed — the 96 answer means
//! "outcome unknown", and the terminal's reversal settles it.
//!
//! # Recovery
//!
//! A bad record followed by nothing but zeros or garbage is a torn tail: zeroed at open
//! with one warning; so is garbage in a later segment with nothing valid after it (a write
//! in the fresh segment that failed too). A segment that starts with a void marker cuts the
//! records it voids from the segments before it, and clears their torn tails. A bad record with any valid record after it, or a seq gap, refuses
//! the open naming the file and byte offset. This is conservative: a torn multi-page batch
//! whose later pages reached the disk before its earlier ones is refused too, rather than
//! guessed about; `verify` shows where.
//!
//! Seqs start at 1 and have no gaps. A missing directory is created at open (with its
//! parents); [`verify`] never creates anything.
//!
//! # Modules
//!
//! [`record`], [`segment`], [`snapshot`]: the file formats (sans-IO, plus the file writes);
//! [`storage`]: the seam for fault injection; [`sim_disk`]: the simulator's in-memory storage;
//! `group_commit`: the writer (a thread, or stepped by the caller with [`Options::stepped`]);
//! `recovery`: scan and replay; `verify`: the offline check.

mod error;
mod group_commit;
pub mod jetstream;
pub mod lease;
pub mod record;
mod recovery;
pub mod segment;
pub mod sim_disk;
pub mod snapshot;
pub mod storage;
mod verify;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};

pub use error::{JournalError, StoreError, EXIT_IOERR, EXIT_SOFTWARE, EXIT_USAGE};
pub use group_commit::GatherConfig;
pub use recovery::{ReadOnly, Recovered};
pub use sim_disk::{DiskStats, SimDisk};
pub use snapshot::Snapshot;
pub use storage::{Faults, FaultyStorage, FsStorage, Storage, StorageFile};
pub use verify::{run_verify, verify, verify_with, VerifyReport};

use group_commit::{ClosedSegment, Request, Shared, Writer, WriterConfig, WriterStart, PAGE_BYTES};

/// Several records enqueued under one hold of the journal's queue lock: see
/// [`Journal::appender`].
pub struct Appender<'j> {
    journal: &'j Journal,
    /// `None` only while being dropped.
    queue: Option<std::sync::MutexGuard<'j, group_commit::Queue>>,
    /// The writer went idle before one of these records: wake it once the lock is released.
    wake: bool,
}

impl Appender<'_> {
    /// [`Journal::enqueue`] under the appender's hold of the queue.
    pub fn enqueue(&mut self, payload: Vec<u8>) -> Result<Ticket, StoreError> {
        self.journal.check_payload(&payload)?;
        let Some(q) = self.queue.as_mut() else {
            return Err(StoreError::Closed);
        };
        if q.closing {
            return Err(StoreError::Closed);
        }
        if q.held {
            return Err(self.journal.shared.unavailable());
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        // Failures bump the epoch under the queue lock, so it cannot change while this is held.
        let epoch = self.journal.shared.epoch.load(Ordering::Acquire);
        q.pending.push(Request { seq, payload });
        // Only the first append after the writer went idle wakes it: every `notify_one` is a
        // futex syscall, and appenders hold a ledger shard's lock here.
        self.wake |= std::mem::replace(&mut q.idle, false);
        Ok(Ticket { seq, epoch })
    }
}

impl Drop for Appender<'_> {
    fn drop(&mut self) {
        drop(self.queue.take());
        if self.wake {
            self.journal.shared.wake.notify_one();
        }
    }
}

/// A record handed to [`Journal::enqueue`]: its seq, and the failure epoch it was queued in
/// (a failure drops every record not yet durable; seqs are then given out again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The record's seq (journal order).
    pub seq: u64,
    /// The failure epoch it was queued in ([`Journal::epoch`]).
    pub epoch: u64,
}
use recovery::{Scan, SegmentScan};
use segment::{Segment, SEGMENT_HEADER_BYTES};

/// Default bound of the append queue: appends beyond it wait (backpressure).
pub const QUEUE_CAPACITY_DEFAULT: usize = 4096;
/// Default largest number of records in one write + sync.
pub const BATCH_RECORDS_DEFAULT_MAX: usize = 1024;
/// Default largest number of bytes in one write + sync (a single larger record still goes).
pub const BATCH_BYTES_DEFAULT_MAX: usize = 1024 * 1024;

const _: () = assert!(QUEUE_CAPACITY_DEFAULT >= BATCH_RECORDS_DEFAULT_MAX);
const _: () = assert!(
    (BATCH_BYTES_DEFAULT_MAX as u64) < segment::SEGMENT_BYTES_DEFAULT - SEGMENT_HEADER_BYTES as u64
);
const _: () = assert!(segment::SEGMENT_BYTES_MIN >= PAGE_BYTES);

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After `fdatasync` of the batch holding it (the only safe choice).
    #[default]
    Fdatasync,
    /// After the write only: a crash or power loss can lose acknowledged records. For tests
    /// and benches; the caller logs a warning at start when it is chosen.
    UnsafeNoFsync,
}

/// Journal settings. `Options::default()` is the production setting.
#[derive(Debug, Clone)]
pub struct Options {
    /// When an append is acknowledged (default [`Durability::Fdatasync`]).
    pub durability: Durability,
    /// Size of new segment files, 4 KiB..=1 GiB (default 64 MiB); existing ones keep theirs.
    pub segment_bytes: u64,
    /// Bound of the append queue (default [`QUEUE_CAPACITY_DEFAULT`]).
    pub queue_capacity: usize,
    /// Most records per write + sync (default [`BATCH_RECORDS_DEFAULT_MAX`]); 1 turns group
    /// commit off.
    pub batch_records_max: usize,
    /// Most bytes per write + sync (default [`BATCH_BYTES_DEFAULT_MAX`]).
    pub batch_bytes_max: usize,
    /// The file system ([`FsStorage`], default), or a fault-injecting one in tests.
    pub storage: Arc<dyn Storage>,
    /// After a failed write, refuse appends until [`Journal::scrub`] and [`Journal::resume`]
    /// (default false: the next append simply retries). For callers that apply a record
    /// before it is durable and must rebuild their state from the journal after a failure.
    pub hold_after_failure: bool,
    /// Stepped mode, for the deterministic simulator (`refundgate sim --core`): no writer
    /// thread and no preallocation thread. Nothing is written until the caller runs
    /// [`Journal::step`]; [`Journal::scrub`] does its work on the caller's thread, and
    /// dropping the journal writes nothing (like a process that died). Default false.
    pub stepped: bool,
    /// Waiting for more records under load before a write (default
    /// [`GatherConfig::OFF`]; see [`group_commit`](self::group_commit)'s docs). Stepped mode
    /// never waits.
    pub gather: GatherConfig,
}

/// What a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot file written.
    pub path: PathBuf,
    /// Segments deleted because the snapshot covers all their records.
    pub segments_removed: usize,
    /// Older snapshot files deleted.
    pub snapshots_removed: usize,
}

/// An open journal: appends through its writer thread, snapshots from the caller's thread.
///
/// Dropping it drains the queue (every queued append is completed) and joins the writer.
pub struct Journal {
    queue_capacity: usize,
    writer: Option<JoinHandle<()>>,
    /// Stepped mode ([`Options::stepped`]): the writer, run by [`Journal::step`].
    stepped: Option<Mutex<Writer>>,
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    payload_max: usize,
    snapshot_seq: AtomicU64,
    snapshot_lock: Mutex<()>,
    /// Held for the journal's life; declared last so it is released after the writer joined.
    _lock: storage::DirLock,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::Fdatasync,
            segment_bytes: segment::SEGMENT_BYTES_DEFAULT,
            queue_capacity: QUEUE_CAPACITY_DEFAULT,
            batch_records_max: BATCH_RECORDS_DEFAULT_MAX,
            batch_bytes_max: BATCH_BYTES_DEFAULT_MAX,
            storage: Arc::new(FsStorage),
            hold_after_failure: false,
            stepped: false,
            gather: GatherConfig::OFF,
        }
    }
}

impl Options {
    fn validate(&self) -> Result<(), JournalError> {
        let bad = JournalError::InvalidOptions;
        if !(segment::SEGMENT_BYTES_MIN..=segment::SEGMENT_BYTES_MAX).contains(&self.segment_bytes)
        {
            return Err(bad("segment_bytes must be within 4 KiB..=1 GiB"));
        }
        if self.queue_capacity == 0 || self.queue_capacity > 1 << 20 {
            return Err(bad("queue_capacity must be within 1..=1048576"));
        }
        if self.batch_records_max == 0 || self.batch_records_max > self.queue_capacity {
            return Err(bad("batch_records_max must be within 1..=queue_capacity"));
        }
        // A batch also stops where the segment is full, so a larger bound is harmless.
        if self.batch_bytes_max == 0 {
            return Err(bad("batch_bytes_max must be at least 1"));
        }
        Ok(())
    }
}

impl Journal {
    /// Opens (creating if missing) the journal in `dir`, recovers it, and starts the writer.
    ///
    /// Restore [`Recovered::snapshot`] and run [`Recovered::replay`] before appending.
    /// Nothing is written before every file header was checked, so a foreign or
    /// other-version directory is left as it was. A torn tail is zeroed (one warning).
    pub fn open(
        dir: impl AsRef<Path>,
        options: Options,
    ) -> Result<(Journal, Recovered), JournalError> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let storage = Arc::clone(&options.storage);
        let existed = storage.list(&dir).is_ok();
        storage
            .create_dir_all(&dir)
            .map_err(|e| JournalError::io("create directory", dir.clone(), e))?;
        if !existed {
            // The new directory's own entry must survive a crash too.
            let parent = match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            storage
                .sync_dir(parent)
                .map_err(|e| JournalError::io("sync", parent.to_path_buf(), e))?;
        }
        // Refuse a foreign or other-version directory before creating even the lock file;
        // then lock, and only then scan, so no other writer can change what the scan saw.
        recovery::check_format(&storage, &dir)?;
        let lock = storage.lock_dir(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => JournalError::Locked { path: dir.clone() },
            _ => JournalError::io("lock", dir.join(storage::LOCK_FILE_NAME), e),
        })?;
        let mut scan = recovery::scan(&storage, &dir)?;
        probe_writable(&storage, &dir)?;
        let (start, closed) = prepare(&storage, &dir, &scan, &options)?;
        let active_capacity = start.active.size - SEGMENT_HEADER_BYTES as u64;
        let payload_max = record::PAYLOAD_BYTES_MAX.min(
            (active_capacity.min(options.segment_bytes - SEGMENT_HEADER_BYTES as u64)) as usize
                - record::RECORD_HEADER_BYTES,
        );
        let recovered = Recovered::new(Arc::clone(&storage), &mut scan);
        let shared = Arc::new(Shared::new(scan.last_seq, closed));
        let config = WriterConfig {
            durability: options.durability,
            segment_bytes: options.segment_bytes,
            batch_records_max: options.batch_records_max,
            batch_bytes_max: options.batch_bytes_max as u64,
            inline_prealloc: options.stepped,
            gather: options.gather,
        };
        shared
            .hold_mode
            .store(options.hold_after_failure, Ordering::Release);
        let writer = Writer::new(
            Arc::clone(&storage),
            dir.clone(),
            config,
            Arc::clone(&shared),
            start,
        );
        let (writer, stepped) = if options.stepped {
            (None, Some(Mutex::new(writer)))
        } else {
            let watched = Arc::downgrade(&shared);
            thread::Builder::new()
                .name("journal-watchdog".into())
                .spawn(move || watch(&watched))
                .map_err(|e| JournalError::io("start watchdog thread for", dir.clone(), e))?;
            let thread = thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer.run())
                .map_err(|e| JournalError::io("start writer thread for", dir.clone(), e))?;
            (Some(thread), None)
        };
        let snapshot_seq = recovered.snapshot().map_or(0, |s| s.seq);
        tracing::info!(
            dir = %dir.display(),
            segments = scan.segments.len(),
            last_seq = scan.last_seq,
            snapshot_seq,
            replay = recovered.records_to_replay(),
            "journal open"
        );
        let journal = Journal {
            queue_capacity: options.queue_capacity,
            writer,
            stepped,
            shared,
            storage,
            dir,
            payload_max,
            snapshot_seq: AtomicU64::new(snapshot_seq),
            snapshot_lock: Mutex::new(()),
            _lock: lock,
        };
        Ok((journal, recovered))
    }

    /// Appends `payload`; resolves with its seq once it is durable (per [`Durability`]).
    ///
    /// Waits while more than `queue_capacity` records are queued. Dropping the future after
    /// the record was queued does not withdraw it: it may still become durable and be
    /// replayed. On [`StoreError`] the record is not acknowledged and will not be replayed
    /// unless the storage persisted it despite reporting the failure and the process stopped
    /// before the next successful write (see `group_commit`).
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64, StoreError> {
        self.check_payload(&payload)?;
        loop {
            let moved = self.shared.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.shared.lock_queue().pending.len() < self.queue_capacity {
                break;
            }
            moved.await;
        }
        let ticket = self.enqueue(payload)?;
        self.durable(ticket).await
    }

    /// [`append`](Self::append) for threads outside an async runtime.
    pub fn append_blocking(&self, payload: Vec<u8>) -> Result<u64, StoreError> {
        futures::executor::block_on(self.append(payload))
    }

    /// Queues `payload` at once, without waiting, and returns its [`Ticket`]: records are
    /// written in the order they were enqueued, so a caller that enqueues under its own lock
    /// journals in the order it applies. Wait for durability with [`durable`](Self::durable).
    ///
    /// Refused while the journal holds after a failure (`hold_after_failure`) and once it
    /// is closing.
    pub fn enqueue(&self, payload: Vec<u8>) -> Result<Ticket, StoreError> {
        self.appender().enqueue(payload)
    }

    /// Holds the queue's lock so that several records go in under one hold of it, each with
    /// [`Appender::enqueue`] (same rules as [`Journal::enqueue`]); the writer is woken, if it
    /// must be, once the appender is dropped. Take it under the ledger shard whose changes it
    /// journals, never the other way round (the shard's lock first, as for `enqueue`), and
    /// drop it before waiting for anything.
    pub fn appender(&self) -> Appender<'_> {
        Appender {
            journal: self,
            queue: Some(self.shared.lock_queue()),
            wake: false,
        }
    }

    /// Resolves once the record of `ticket` is durable (with its seq), or with
    /// [`StoreError::Unavailable`] once a failure dropped it.
    /// Only this waiter's task is woken, once the chunk holding its record is synced.
    pub async fn durable(&self, ticket: Ticket) -> Result<u64, StoreError> {
        std::future::poll_fn(|cx| {
            match self.shared.register(ticket.seq, ticket.epoch, cx.waker()) {
                Some(done) => std::task::Poll::Ready(done),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// [`Journal::durable`] bounded by `deadline`: `Err(DeadlinePassed)` once it has passed
    /// with the outcome still unknown (the record may yet become durable).
    ///
    /// No timer per wait (a tokio timer per batch cost ~2.5 % of the CPU at 256 × 1): the
    /// journal's watchdog wakes, every [`WATCHDOG_TICK`], the waiters of records queued before
    /// its previous tick, and they look at the clock then. A healthy writer has made those
    /// durable long before, so the watchdog wakes nobody; on a hung or very slow disk the
    /// answer comes at most about two ticks after the deadline. A stepped journal has no
    /// watchdog: its waits end with their outcome only.
    pub async fn durable_until(
        &self,
        ticket: Ticket,
        deadline: std::time::Instant,
    ) -> Result<Result<u64, StoreError>, DeadlinePassed> {
        std::future::poll_fn(|cx| {
            if crate::clock::monotonic() >= deadline {
                return std::task::Poll::Ready(self.status(ticket).ok_or(DeadlinePassed));
            }
            match self.shared.register(ticket.seq, ticket.epoch, cx.waker()) {
                Some(done) => std::task::Poll::Ready(Ok(done)),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// The outcome of `ticket`'s record if known: durable (`Some(Ok)`), dropped by a failure
    /// (`Some(Err)`), or still pending (`None`). [`Journal::durable`] without the wait.
    pub fn status(&self, ticket: Ticket) -> Option<Result<u64, StoreError>> {
        self.shared.status(ticket.seq, ticket.epoch)
    }

    /// Says that nothing more will be appended soon (every connection thread ran out of
    /// work): a writer waiting to gather more records under load writes what it has now,
    /// and one about to wait does not, unless a record comes after this.
    pub fn idle_hint(&self) {
        let mut q = self.shared.lock_queue();
        q.idle_from = q.next_seq;
        let gathering = q.gathering;
        drop(q);
        if gathering {
            self.shared.wake.notify_one();
        }
    }

    /// Whether the record of `ticket` is durable already (no wait needed).
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        matches!(self.status(ticket), Some(Ok(_)))
    }

    /// A ticket that is durable once everything enqueued so far is: for answers that
    /// depend on state that may not be durable yet (a stored answer found in memory).
    pub fn last_ticket(&self) -> Ticket {
        let q = self.shared.lock_queue();
        Ticket {
            seq: q.next_seq - 1,
            epoch: self.shared.epoch.load(Ordering::Acquire),
        }
    }

    /// Turns [`Options::hold_after_failure`] on or off for this open journal.
    pub fn set_hold_after_failure(&self, hold: bool) {
        self.shared.hold_mode.store(hold, Ordering::Release);
    }

    /// Whether appends are refused after a failure (`hold_after_failure`).
    pub fn is_held(&self) -> bool {
        self.shared.held.load(Ordering::Acquire)
    }

    /// The current failure epoch: read it before looking at state that a failure could
    /// drop, and wait on `Ticket { seq, epoch }` for that state.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// After a failure: has the writer rewrite the failed region so the files hold exactly
    /// the durable records (blocking; call from `spawn_blocking`). Fails while the storage
    /// still fails.
    pub fn scrub(&self) -> Result<(), StoreError> {
        if let Some(writer) = &self.stepped {
            if self.shared.lock_queue().closing {
                return Err(StoreError::Closed);
            }
            let mut writer = writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            return writer
                .scrub()
                .map_err(|e| StoreError::Unavailable(Arc::new(e)));
        }
        let (done, result) = std::sync::mpsc::channel();
        {
            let mut q = self.shared.lock_queue();
            if q.closing {
                return Err(StoreError::Closed);
            }
            q.scrub = Some(done);
        }
        self.shared.wake.notify_one();
        match result.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(Arc::new(e))),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Stepped mode ([`Options::stepped`]): writes and syncs everything queued now, on this
    /// thread, and wakes its waiters (or fails it, as the writer thread would). Returns how
    /// many records were taken; 0 when nothing was queued, or when the journal has its own
    /// writer thread (then it does nothing).
    pub fn step(&self) -> usize {
        match &self.stepped {
            Some(writer) => writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .step(),
            None => 0,
        }
    }

    /// Whether the journal runs in stepped mode ([`Options::stepped`]: the simulator).
    pub fn is_stepped(&self) -> bool {
        self.stepped.is_some()
    }

    /// Records queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.shared.lock_queue().pending.len()
    }

    /// Accepts appends again after [`scrub`](Self::scrub) (and the caller's rebuild).
    pub fn resume(&self) {
        let mut q = self.shared.lock_queue();
        q.held = false;
        self.shared.held.store(false, Ordering::Release);
    }

    /// Reads the directory again as [`open`](Self::open) did: the newest snapshot and the
    /// records after it, for a caller that rebuilds its state after a failure. Call it after
    /// a successful [`scrub`](Self::scrub), while nothing is being appended.
    pub fn reread(&self) -> Result<Recovered, JournalError> {
        let mut scan = recovery::scan(&self.storage, &self.dir)?;
        Ok(Recovered::new(Arc::clone(&self.storage), &mut scan))
    }

    /// Writes a snapshot of the caller's state as of `seq` (which must be durable), then
    /// deletes older snapshots and the segments whose records it all covers.
    ///
    /// Blocking file I/O: from async code call it inside `spawn_blocking`. The snapshot is
    /// durable (written, synced, renamed, directory synced) before anything is deleted.
    pub fn snapshot(&self, seq: u64, bytes: &[u8]) -> Result<SnapshotReport, JournalError> {
        let _one_at_a_time = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let durable_seq = self.durable_seq();
        let snapshot_seq = self.snapshot_seq();
        if seq > durable_seq || seq < snapshot_seq {
            return Err(JournalError::SnapshotSeq {
                seq,
                durable_seq,
                snapshot_seq,
            });
        }
        let path = snapshot::write(&self.storage, &self.dir, seq, bytes)?;
        self.snapshot_seq.store(seq, Ordering::Release);
        let snapshots_removed = self.remove_older_snapshots(seq)?;
        let segments_removed = self.remove_covered_segments(seq)?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| JournalError::io("sync", self.dir.clone(), e))?;
        tracing::info!(
            seq,
            bytes = bytes.len(),
            segments_removed,
            snapshots_removed,
            "journal snapshot written"
        );
        Ok(SnapshotReport {
            path,
            segments_removed,
            snapshots_removed,
        })
    }

    /// The last seq acknowledged as durable (0 if none).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// The seq of the newest snapshot (0 if none): snapshot when `durable_seq()` is far past it.
    pub fn snapshot_seq(&self) -> u64 {
        self.snapshot_seq.load(Ordering::Acquire)
    }

    /// Durable records not yet covered by a snapshot: snapshot when this passes your bound.
    pub fn records_since_snapshot(&self) -> u64 {
        self.durable_seq().saturating_sub(self.snapshot_seq())
    }

    /// Batches written and synced so far (each one write + one `fdatasync`).
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Batches that failed so far (each of their appends got [`StoreError::Unavailable`]).
    pub fn failed_batches(&self) -> u64 {
        self.shared.failed_batches.load(Ordering::Relaxed)
    }

    /// Largest payload [`append`](Self::append) accepts.
    pub fn payload_max(&self) -> usize {
        self.payload_max
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), StoreError> {
        if payload.is_empty() || payload.len() > self.payload_max {
            return Err(StoreError::PayloadSize {
                len: payload.len(),
                max: self.payload_max,
            });
        }
        Ok(())
    }

    fn remove_older_snapshots(&self, seq: u64) -> Result<usize, JournalError> {
        let names = self
            .storage
            .list(&self.dir)
            .map_err(|e| JournalError::io("list", self.dir.clone(), e))?;
        let mut removed = 0;
        for name in names {
            if snapshot::parse_snapshot_file_name(&name).is_some_and(|older| older < seq) {
                let path = self.dir.join(name);
                self.storage
                    .remove(&path)
                    .map_err(|e| JournalError::io("remove", path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn remove_covered_segments(&self, seq: u64) -> Result<usize, JournalError> {
        let covered: Vec<PathBuf> = self
            .closed()
            .iter()
            .take_while(|segment| segment.last_seq.is_none_or(|last| last <= seq))
            .map(|segment| segment.path.clone())
            .collect();
        for path in &covered {
            match self.storage.remove(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(JournalError::io("remove", path.clone(), e))
                }
                _ => self.closed().retain(|segment| segment.path != *path),
            }
        }
        Ok(covered.len())
    }

    fn closed(&self) -> std::sync::MutexGuard<'_, Vec<ClosedSegment>> {
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How often a journal's watchdog wakes the waiters of records that are not durable after a
/// tick, so they can look at their deadlines ([`Journal::durable_until`]).
pub const WATCHDOG_TICK: std::time::Duration = std::time::Duration::from_millis(25);

/// A wait of [`Journal::durable_until`] passed its deadline before the outcome was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlinePassed;

/// The watchdog's loop: ends within a tick of the journal's end.
fn watch(shared: &Weak<Shared>) {
    let mut mark = 0;
    loop {
        thread::sleep(WATCHDOG_TICK);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.wake_below(mark);
        let q = shared.lock_queue();
        if q.closing {
            return;
        }
        mark = q.next_seq;
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // The writer drains the queue, then returns. A stepped journal has no writer: what is
        // queued is never written (as when the process dies).
        self.shared.lock_queue().closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("journal writer thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("durable_seq", &self.durable_seq())
            .field("snapshot_seq", &self.snapshot_seq())
            .finish_non_exhaustive()
    }
}

/// Fails early, with a clear error, when the directory cannot take new files.
fn probe_writable(storage: &Arc<dyn Storage>, dir: &Path) -> Result<(), JournalError> {
    let probe = dir.join("write-probe.tmp");
    let _ = storage.remove(&probe);
    let file = storage
        .create(&probe)
        .map_err(|e| JournalError::io("create a file in", dir.to_path_buf(), e))?;
    drop(file);
    storage
        .remove(&probe)
        .map_err(|e| JournalError::io("remove", probe, e))
}

/// Applies recovery's changes (stale files, torn tail) and finds where the writer starts.
fn prepare(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    scan: &Scan,
    options: &Options,
) -> Result<(WriterStart, Vec<ClosedSegment>), JournalError> {
    for path in &scan.stale {
        match storage.remove(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(JournalError::io("remove", path.clone(), e))
            }
            _ => {}
        }
    }
    for torn in &scan.torn {
        let io = |op| move |e| JournalError::io(op, torn.path.clone(), e);
        let file = storage.open(&torn.path, true).map_err(io("open"))?;
        let zeros = vec![0u8; (torn.garbage_end - torn.offset) as usize];
        file.write_at(&zeros, torn.offset).map_err(io("write"))?;
        file.sync_data().map_err(io("sync"))?;
        tracing::warn!(
            path = %torn.path.display(),
            offset = torn.offset,
            bytes = zeros.len(),
            reason = torn.reason,
            "journal torn tail discarded (never acknowledged)"
        );
    }
    let next_seq = scan.last_seq + 1;
    let Some(last) = scan.segments.last() else {
        let active = segment::create_segment(storage, dir, 0, options.segment_bytes)
            .map_err(|e| JournalError::io("create segment in", dir.to_path_buf(), e))?;
        let start = WriterStart {
            active,
            active_last_seq: None,
            pos: SEGMENT_HEADER_BYTES as u64,
            next_seq,
            spares: VecDeque::new(),
            next_index: 1,
        };
        return Ok((start, Vec::new()));
    };
    // The last segment holding anything (records or a void marker): writing on in an earlier
    // one would put acknowledged records in front of a void marker that cuts them.
    let at = scan
        .segments
        .iter()
        .rposition(|s| s.end > SEGMENT_HEADER_BYTES as u64)
        .unwrap_or(0);
    let closed = scan.segments[..at]
        .iter()
        .map(|s| ClosedSegment {
            path: s.path.clone(),
            last_seq: s.last_seq,
        })
        .collect();
    let active_scan = &scan.segments[at];
    let active = open_segment(storage, active_scan)?;
    let spares = scan.segments[at + 1..]
        .iter()
        .map(|s| open_segment(storage, s))
        .collect::<Result<VecDeque<_>, _>>()?;
    let start = WriterStart {
        active,
        active_last_seq: active_scan.last_seq,
        pos: active_scan.end,
        next_seq,
        spares,
        next_index: last.index + 1,
    };
    Ok((start, closed))
}

fn open_segment(storage: &Arc<dyn Storage>, scan: &SegmentScan) -> Result<Segment, JournalError> {
    let file = storage
        .open(&scan.path, true)
        .map_err(|e| JournalError::io("open", scan.path.clone(), e))?;
    Ok(Segment {
        index: scan.index,
        path: scan.path.clone(),
        file,
        size: scan.size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    /// A journal whose writer, from its second batch on, waits 60 s to gather more records
    /// (any intake counts as load once a window measured it); one record is durable.
    fn gathering_journal() -> (tempfile::TempDir, Arc<Journal>) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            segment_bytes: 1024 * 1024,
            gather: GatherConfig {
                wait: Duration::from_secs(60),
                above_per_s: 0,
            },
            ..Options::default()
        };
        let (journal, _) = Journal::open(dir.path(), options).unwrap();
        // The first window has not been measured yet: written at once.
        journal.append_blocking(b"first".to_vec()).unwrap();
        std::thread::sleep(group_commit::Gather::WINDOW + Duration::from_millis(20));
        (dir, Arc::new(journal))
    }

    #[test]
    fn an_idle_hint_ends_the_writers_wait_for_more_records() {
        let (_dir, journal) = gathering_journal();
        let (tx, rx) = std::sync::mpsc::channel();
        let appender = Arc::clone(&journal);
        std::thread::spawn(move || {
            let _ = tx.send(appender.append_blocking(b"second".to_vec()));
        });
        let deadline = crate::clock::monotonic() + Duration::from_secs(10);
        while journal.last_ticket().seq < 2 {
            assert!(crate::clock::monotonic() < deadline, "never enqueued");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Under load the record waits for company...
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        // ...until the server says no more is coming.
        journal.idle_hint();
        let durable = rx.recv_timeout(Duration::from_secs(10));
        let seq = durable.expect("still waiting after the idle hint");
        assert_eq!(seq.ok(), Some(2));
    }

    #[test]
    fn at_light_load_a_record_waits_for_the_idle_hint_only_once_hints_come() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            segment_bytes: 1024 * 1024,
            // Never above the rate: light load throughout.
            gather: GatherConfig {
                wait: Duration::from_secs(60),
                above_per_s: u64::MAX,
            },
            ..Options::default()
        };
        let (journal, _) = Journal::open(dir.path(), options).unwrap();
        // No hint yet (no connection threads say when they are idle): written at once.
        journal.append_blocking(b"first".to_vec()).unwrap();
        journal.idle_hint();
        let durable_within = |ticket: Ticket, within: Duration| {
            let deadline = crate::clock::monotonic() + within;
            while !journal.is_durable(ticket) {
                if crate::clock::monotonic() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        };
        // Hints come now: a record waits for the one that says its burst is over.
        let ticket = journal.enqueue(b"second".to_vec()).unwrap();
        let also = journal.enqueue(b"third".to_vec()).unwrap();
        assert!(!durable_within(ticket, Duration::from_millis(300)));
        journal.idle_hint();
        assert!(durable_within(also, Duration::from_secs(10)));
        assert!(journal.is_durable(ticket));
        // One sync for the two.
        assert_eq!(journal.batches(), 2);
    }

    #[test]
    fn an_idle_hint_before_the_writer_waits_still_counts() {
        let (_dir, journal) = gathering_journal();
        // Enqueued and, at once, nothing more to come: the writer, still waking up, must
        // not start a wait the hint can no longer end.
        let ticket = journal.enqueue(b"second".to_vec()).unwrap();
        journal.idle_hint();
        let deadline = crate::clock::monotonic() + Duration::from_secs(10);
        while journal.status(ticket).is_none() {
            assert!(
                crate::clock::monotonic() < deadline,
                "waited for company after the hint"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(journal.is_durable(ticket));
        // A record after the hint waits again (the hint covered only what came before it).
        let later = journal.enqueue(b"third".to_vec()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(journal.status(later).is_none());
        journal.idle_hint();
        let deadline = crate::clock::monotonic() + Duration::from_secs(10);
        while !journal.is_durable(later) {
            assert!(
                crate::clock::monotonic() < deadline,
                "the second hint was lost"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
