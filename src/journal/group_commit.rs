//! The writer thread: group commit with one positioned write and one `fdatasync` per batch.
//!
//! Appenders put a [`Request`] on a bounded channel (a full channel makes them wait: that is
//! the backpressure) and wait on a oneshot. The writer takes the first request, drains what
//! else is queued (up to the batch limits and the room left in the segment), assigns seqs,
//! encodes the batch into one buffer, writes it with one `pwrite`, calls `fdatasync` once,
//! and only then completes every waiter.
//!
//! # Faults
//!
//! If the write or the sync fails, every request of the batch gets [`StoreError::Unavailable`]
//! and their seqs are not used: the next batch takes the same seqs and is written at the same
//! offset. The failed bytes may be in the page cache or on disk, or neither, so the next write
//! (records, or zeros if there are none) also covers the whole failed region, and starts at
//! the page boundary before it with the bytes of that page kept in memory: nothing written
//! before a failed sync is trusted to be on disk until a later sync covering it succeeds.
//! Before moving to a new segment the failed region is zeroed and synced the same way.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use tokio::sync::{mpsc, oneshot};

use super::record;
use super::segment::{self, Segment, SEGMENT_HEADER_BYTES};
use super::storage::Storage;
use super::{Durability, StoreError};

/// The page size assumed when rewriting after a fault (the start of a failed write is
/// rewritten from this boundary).
pub(crate) const PAGE_BYTES: u64 = 4096;

/// One pending append.
pub(crate) struct Request {
    pub payload: Vec<u8>,
    pub done: oneshot::Sender<Result<u64, StoreError>>,
}

/// State the writer shares with [`Journal`](super::Journal).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The last seq acknowledged as durable.
    pub durable_seq: AtomicU64,
    /// Batches written and synced successfully.
    pub batches: AtomicU64,
    /// Batches that failed (every waiter got an error).
    pub failed_batches: AtomicU64,
    /// Segments the writer has left, oldest first; snapshots delete the covered ones.
    pub closed: Mutex<Vec<ClosedSegment>>,
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
}

/// Where the writer starts, as recovery left the directory.
pub(crate) struct WriterStart {
    pub active: Segment,
    pub active_last_seq: Option<u64>,
    pub pos: u64,
    /// Bytes `[pos rounded down to a page, pos)` of the active segment.
    pub tail: Vec<u8>,
    pub next_seq: u64,
    pub spares: VecDeque<Segment>,
    pub next_index: u64,
}

/// The writer thread's state.
pub(crate) struct Writer {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: WriterConfig,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    active: Segment,
    active_last_seq: Option<u64>,
    pos: u64,
    tail: Vec<u8>,
    /// After a failure: end of the region that may hold failed bytes (else equals `pos`).
    dirty_end: u64,
    /// After a failure: rewrite from the page boundary before `pos`.
    rewrite: bool,
    next_seq: u64,
    spares: VecDeque<Segment>,
    pending: Option<JoinHandle<io::Result<Segment>>>,
    next_index: u64,
    buf: Vec<u8>,
    carry: Option<Request>,
    /// Batches failed in a row (0 while the storage works).
    failing_batches: u64,
}

impl Writer {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: WriterConfig,
        rx: mpsc::Receiver<Request>,
        shared: Arc<Shared>,
        start: WriterStart,
    ) -> Self {
        Self {
            storage,
            dir,
            config,
            rx,
            shared,
            active: start.active,
            active_last_seq: start.active_last_seq,
            pos: start.pos,
            tail: start.tail,
            dirty_end: start.pos,
            rewrite: false,
            next_seq: start.next_seq,
            spares: start.spares,
            pending: None,
            next_index: start.next_index,
            buf: Vec::new(),
            carry: None,
            failing_batches: 0,
        }
    }

    /// Runs until every [`Journal`](super::Journal) sender is gone and the queue is drained.
    pub(crate) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.config.batch_records_max);
        loop {
            let first = match self.carry.take() {
                Some(request) => request,
                None => match self.rx.blocking_recv() {
                    Some(request) => request,
                    None => break,
                },
            };
            let need = record::encoded_len(first.payload.len()) as u64;
            if self.pos + need > self.active.size {
                if let Err(error) = self.rotate() {
                    self.fail(vec![first], &error);
                    continue;
                }
            }
            let mut bytes = need;
            batch.push(first);
            while batch.len() < self.config.batch_records_max {
                let Ok(next) = self.rx.try_recv() else { break };
                let n = record::encoded_len(next.payload.len()) as u64;
                if self.pos + bytes + n > self.active.size
                    || bytes + n > self.config.batch_bytes_max
                {
                    self.carry = Some(next);
                    break;
                }
                bytes += n;
                batch.push(next);
            }
            self.commit(&mut batch);
            if self.pos > self.active.size / 2 {
                // Ahead of need, but not at start-up: 64 MiB of zeros being written back
                // would slow the syncs of the first batches.
                self.prepare_spare();
            }
        }
        if self.rewrite || self.dirty_end > self.pos {
            // Wipe a failed region at shutdown too, so a clean restart cannot replay appends
            // that were answered as failed. If the storage is still failing, recovery's
            // caveat applies (see `Journal::append`).
            let _ = self.write(&[]);
        }
        if let Some(pending) = self.pending.take() {
            // Let an in-flight preallocation finish so shutdown leaves whole files.
            let _ = pending.join();
        }
    }

    fn commit(&mut self, batch: &mut Vec<Request>) {
        let first_seq = self.next_seq;
        match self.write(batch) {
            Ok(()) => {
                if self.failing_batches > 0 {
                    tracing::info!(
                        failed_batches = self.failing_batches,
                        "journal storage recovered; failed region rewritten"
                    );
                    self.failing_batches = 0;
                }
                for (i, request) in batch.drain(..).enumerate() {
                    // A waiter that gave up (dropped its future) is simply not told.
                    let _ = request.done.send(Ok(first_seq + i as u64));
                }
            }
            Err(error) => {
                let failed = std::mem::take(batch);
                self.fail(failed, &error);
            }
        }
    }

    fn fail(&mut self, requests: Vec<Request>, error: &io::Error) {
        self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
        if self.failing_batches == 0 {
            // Once per outage, not once per batch: a dead disk must not flood the log.
            tracing::warn!(
                segment = %self.active.path.display(),
                offset = self.pos,
                records = requests.len(),
                error = %error,
                "journal write failed; appends answered as store unavailable until it recovers"
            );
        }
        self.failing_batches += 1;
        let error =
            StoreError::Unavailable(Arc::new(io::Error::new(error.kind(), error.to_string())));
        for request in requests {
            let _ = request.done.send(Err(error.clone()));
        }
    }

    /// Writes `batch` (possibly empty, to scrub a failed region) at `pos` and syncs it.
    fn write(&mut self, batch: &[Request]) -> io::Result<()> {
        self.buf.clear();
        let (start, prefix) = if self.rewrite {
            self.buf.extend_from_slice(&self.tail);
            (self.pos - self.tail.len() as u64, self.tail.len())
        } else {
            (self.pos, 0)
        };
        let mut seq = self.next_seq;
        for request in batch {
            record::encode(seq, &request.payload, &mut self.buf);
            seq += 1;
        }
        let records_len = self.buf.len() - prefix;
        let records_end = self.pos + records_len as u64;
        let write_end = records_end.max(self.dirty_end);
        self.buf.resize((write_end - start) as usize, 0);
        let result = self.active.file.write_at(&self.buf, start).and_then(|()| {
            match self.config.durability {
                Durability::Fdatasync => self.active.file.sync_data(),
                Durability::UnsafeNoFsync => Ok(()),
            }
        });
        if let Err(error) = result {
            self.dirty_end = self.dirty_end.max(write_end);
            self.rewrite = true;
            return Err(error);
        }
        advance_tail(
            &mut self.tail,
            &self.buf[prefix..prefix + records_len],
            records_end,
        );
        self.pos = records_end;
        self.dirty_end = records_end;
        self.rewrite = false;
        if seq > self.next_seq {
            self.active_last_seq = Some(seq - 1);
            self.shared.durable_seq.store(seq - 1, Ordering::Release);
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
        }
        self.next_seq = seq;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.rewrite || self.dirty_end > self.pos {
            self.write(&[])?;
        }
        let next = self.take_spare()?;
        tracing::debug!(segment = %next.path.display(), "journal rotates to a new segment");
        self.tail = segment::encode_header(next.index).to_vec();
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
        self.dirty_end = self.pos;
        Ok(())
    }

    fn take_spare(&mut self) -> io::Result<Segment> {
        if let Some(spare) = self.spares.pop_front() {
            return Ok(spare);
        }
        if self.rewrite || self.dirty_end > self.pos {
            // Wipe a failed region at shutdown too, so a clean restart cannot replay appends
            // that were answered as failed. If the storage is still failing, recovery's
            // caveat applies (see `Journal::append`).
            let _ = self.write(&[]);
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

    /// Starts preallocating the next segment in the background, unless one is ready.
    fn prepare_spare(&mut self) {
        if !self.spares.is_empty() || self.pending.is_some() {
            return;
        }
        let storage = Arc::clone(&self.storage);
        let dir = self.dir.clone();
        let (index, size) = (self.next_index, self.config.segment_bytes);
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

/// Keeps `tail` = the bytes from the page boundary before `new_pos` up to `new_pos`, after
/// `records` were written ending at `new_pos` (and `tail` held the same for the old position).
fn advance_tail(tail: &mut Vec<u8>, records: &[u8], new_pos: u64) {
    let keep = (new_pos % PAGE_BYTES) as usize;
    if records.len() >= keep {
        tail.clear();
        tail.extend_from_slice(&records[records.len() - keep..]);
    } else {
        let from_old = keep - records.len();
        tail.drain(..tail.len() - from_old);
        tail.extend_from_slice(records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_tracks_the_last_partial_page() {
        let mut file = vec![7u8; 32];
        let mut tail = file.clone();
        for len in [10usize, 5000, 3, 4096 - 45 - 5000 % 4096 + 4096, 1, 8000] {
            let records: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            file.extend_from_slice(&records);
            advance_tail(&mut tail, &records, file.len() as u64);
            let floor = file.len() / 4096 * 4096;
            assert_eq!(tail, file[floor..], "after {len}");
        }
    }
}
