//! The ledger's journal replicated on NATS JetStream (`journal.backend = "jetstream"`): several
//! gateway nodes decide for the same merchants, and the loss of one node (or of one of three
//! NATS servers) loses no acknowledged answer.
//!
//! - One stream (`journal.jetstream.stream`, replicas = `journal.jetstream.replicas`) holds every
//!   ledger event, one subject per merchant: `<subject_prefix>.<hex of the merchant id>`.
//! - A decision is taken under the merchant's lock on this node, **without** applying it; its
//!   event is published with `Nats-Expected-Last-Subject-Sequence` = the stream sequence of
//!   the last event of that merchant this node applied. Only when the stream acknowledged it
//!   (stored on a quorum) is the event applied and the answer sent. If another node appended
//!   first, the publish is refused: this node reads the merchant's events it missed, applies
//!   them in stream order, and decides again. So every node's ledger is a replay of the
//!   stream, and limits are exact across nodes.
//! - Each node tails the stream (an ordered consumer) to stay current, and a starting node
//!   rebuilds its ledger from the newest usable ledger snapshot of the object store bucket
//!   `<stream>_SNAPSHOTS` and the stream after it (or from the start without one).
//! - Ledger snapshots: any node writes one once its tail passed `snapshot_every_records`
//!   sequences beyond the newest in the bucket (see [`Replica::write_snapshot`]).
//! - A publish whose outcome is unknown (timeout, cluster without quorum) is answered 96; the
//!   merchant is marked stale and caught up before its next decision, so a repeat of that
//!   request gets the stored answer if the event did land.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, object_store, stream};
use dashmap::DashMap;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::ledger::{Decision, Ledger, LedgerEvent, Logged, MerchantId, Request, Reservation};
use crate::telemetry;

/// Where the replicated journal lives and how long an append may take.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NATS server URLs (any of the cluster's).
    pub servers: Vec<String>,
    /// Stream name.
    pub stream: String,
    /// Subject prefix; a merchant's events go to `<prefix>.<hex merchant id>`.
    pub subject_prefix: String,
    /// Copies of each event the stream keeps (3 in a three-server cluster).
    pub replicas: usize,
    /// Longest wait for the stream's acknowledgement of one append.
    pub ack_timeout: Duration,
}

/// Why a replicated step did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Internal: the first pass of a step hands its event over without applying it.
    #[error("event deferred until the stream acknowledges it")]
    Deferred,
    /// The stream is unreachable or did not acknowledge in time: the outcome is unknown.
    #[error("replicated journal unavailable: {0}")]
    Unavailable(String),
    /// Other nodes kept appending for this merchant faster than this node could catch up.
    #[error("replicated journal: merchant contended, gave up after {0} attempts")]
    Contended(u32),
    /// An event in the stream could not be read or applied.
    #[error("replicated journal: {0}")]
    Corrupt(String),
    /// The ledger refused the call (nothing to journal).
    #[error("refused: {}", .0.as_str())]
    Refused(crate::ledger::Reason),
}

impl From<crate::ledger::Refused> for ReplError {
    fn from(r: crate::ledger::Refused) -> ReplError {
        ReplError::Refused(r.0)
    }
}

/// How long and how often a decision on a contended merchant is tried before it gives up:
/// at least [`crate::limits::CLUSTER_CONTENDED_ATTEMPTS_MIN`] attempts and
/// [`crate::limits::CLUSTER_CONTENDED_BUDGET_MS`] (a bounded catch-up makes each attempt
/// short, so a count alone gave up within milliseconds under contention).
struct Budget {
    started: tokio::time::Instant,
    attempts: u32,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            started: tokio::time::Instant::now(),
            attempts: 0,
        }
    }

    /// Counts one attempt; `false` once both the attempts and the time are used up.
    fn next(&mut self) -> bool {
        self.attempts = self.attempts.saturating_add(1);
        self.attempts <= crate::limits::CLUSTER_CONTENDED_ATTEMPTS_MIN
            || self.started.elapsed()
                < std::time::Duration::from_millis(crate::limits::CLUSTER_CONTENDED_BUDGET_MS)
    }

    fn spent(&self) -> ReplError {
        ReplError::Contended(self.attempts.saturating_sub(1))
    }
}

/// Unusable snapshots a node remembers from its start (the bucket keeps
/// [`crate::limits::CLUSTER_SNAPSHOTS_KEPT`], unless writers race).
const UNUSABLE_REMEMBERED_MAX: usize = 16;

/// This node's view of one merchant's subject.
#[derive(Default)]
struct Part {
    /// Stream sequence of the last message of this merchant applied to the ledger (0: none).
    last: u64,
    /// An append's outcome is unknown: read the subject before deciding again.
    stale: bool,
    /// Decisions taken (holds placed, declines not applied) waiting for the next group append.
    open: Vec<Item>,
    /// A flush task is running for this merchant.
    flushing: bool,
    /// A group is appended and its acknowledgement not yet applied: nothing else may be
    /// applied to this merchant until it is (stream order).
    awaiting_ack: bool,
}

/// One decision of a group append.
struct Item {
    what: Pending,
    tx: tokio::sync::oneshot::Sender<Outcome>,
}

/// What a group member applies once its group is acknowledged.
enum Pending {
    /// An approval: its holds are placed; commit it.
    Commit(Reservation),
    /// A decline to remember: apply its event.
    Apply(LedgerEvent),
}

/// What became of a group member.
enum Outcome {
    /// Applied at stream sequence `seq`.
    Done(Decision, u64),
    /// Another node appended first: decide again.
    Retry,
    /// No acknowledgement: answer 96.
    Failed(String),
}

/// The payload of one stream message: each event as a 2-byte big-endian length and its bytes
/// (a group append holds several decisions of one merchant).
pub fn encode_group<'a>(events: impl Iterator<Item = &'a LedgerEvent>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut one = Vec::with_capacity(128);
    for e in events {
        one.clear();
        e.encode(&mut one);
        let len = u16::try_from(one.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&one[..usize::from(len)]);
    }
    out
}

/// The events of one stream message, in order.
pub fn decode_group(payload: &[u8]) -> Result<Vec<LedgerEvent>, String> {
    let mut events = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<2>()
            .ok_or("group payload cut inside a length")?;
        let len = usize::from(u16::from_be_bytes(*len));
        if tail.len() < len {
            return Err("group payload cut inside an event".into());
        }
        let (event, tail) = tail.split_at(len);
        events.push(LedgerEvent::decode(event).map_err(|e| e.to_string())?);
        rest = tail;
    }
    if events.is_empty() {
        return Err("empty group payload".into());
    }
    Ok(events)
}

/// One merchant's [`Part`], and the wake-up of those waiting for its group's acknowledgement.
#[derive(Default)]
struct PartCell {
    state: tokio::sync::Mutex<Part>,
    acked: tokio::sync::Notify,
}

impl PartCell {
    /// The merchant's state once no group append awaits its acknowledgement (nothing may be
    /// applied to the merchant before that group is).
    async fn settled(&self) -> tokio::sync::MutexGuard<'_, Part> {
        loop {
            let p = self.state.lock().await;
            if !p.awaiting_ack {
                return p;
            }
            let woken = self.acked.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            drop(p);
            woken.await;
        }
    }
}

/// Counters of the replicated journal (read by tests, metrics and the bench).
#[derive(Debug, Default)]
pub struct Counters {
    /// Events this node appended.
    pub appended: AtomicU64,
    /// Appends refused because another node appended first (the decision was taken again).
    pub conflicts: AtomicU64,
    /// Events of other nodes applied by catch-up or the tail.
    pub applied_remote: AtomicU64,
    /// Stream sequence of the ledger snapshot this node started from (0: none, the whole
    /// stream was read).
    pub start_snapshot_seq: AtomicU64,
    /// Events read from the stream at start (after the snapshot; those its books already
    /// held are read but not applied).
    pub start_replayed: AtomicU64,
    /// Ledger snapshots this node wrote to the bucket.
    pub snapshots_written: AtomicU64,
}

/// The replicated journal of one gateway node.
pub struct Replica {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    ledger: Arc<Ledger>,
    parts: DashMap<MerchantId, Arc<PartCell>>,
    /// Stream sequence the tail has read up to (it restarts from there). Every event at or
    /// before it is applied to the ledger.
    tailed: AtomicU64,
    /// The ledger snapshots' bucket (`None`: it could not be opened; snapshots are off).
    snapshots: Option<object_store::ObjectStore>,
    /// Stream sequence of the newest snapshot known in the bucket.
    newest_snapshot: AtomicU64,
    /// Snapshots this node found unusable at start: not counted as the newest, and removed
    /// once this node wrote a usable one (a few at most: the bucket keeps few).
    unusable: std::sync::Mutex<Vec<String>>,
    /// When the stream was created (ns since the epoch): a snapshot names the stream it was
    /// taken of, so one left in the bucket from a deleted stream of the same name is refused.
    stream_created_ns: i128,
    /// One writer per merchant (`journal.jetstream.lease_ttl_ms` > 0): decisions go to the
    /// merchant's lease owner (see [`super::lease`]); unset, any node decides.
    leases: std::sync::OnceLock<Arc<super::lease::Leases>>,
    /// Counters.
    pub counters: Counters,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Whether a refused append means another node appended first: the server says "wrong last
/// sequence" (10071, and 10164 from servers ≥ 2.12 for the per-subject check), or the
/// per-subject check is not ready yet on a new leader (10163): read the subject and retry.
pub(crate) fn is_conflict(e: &jetstream::context::PublishError) -> bool {
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            let code = j.error_code();
            code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
                || code == jetstream::ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY
        })
}

fn unavailable(e: impl std::fmt::Display) -> ReplError {
    ReplError::Unavailable(e.to_string())
}

/// The stream's state when this node connected.
#[derive(Debug, Clone, Copy)]
pub struct StreamState {
    /// Events in the stream.
    pub messages: u64,
    /// Sequence of the newest.
    pub last_sequence: u64,
}

impl Replica {
    /// Connects to the cluster and creates the stream when it does not exist yet. The
    /// ledger is not touched: call [`Replica::load`] before serving.
    pub async fn connect(
        settings: &Settings,
        ledger: Arc<Ledger>,
    ) -> Result<(Replica, StreamState), ReplError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(settings.ack_timeout.max(Duration::from_secs(1)))
            .request_timeout(Some(settings.ack_timeout))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(settings.servers.as_slice())
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client);
        js.set_timeout(settings.ack_timeout);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![format!("{}.>", settings.subject_prefix)],
            num_replicas: settings.replicas.max(1),
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        // The stream may take a moment while a fresh cluster elects its meta leader.
        let mut tries = 0;
        let mut stream = loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::info!(error = %e, "waiting for the JetStream cluster");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        let info = stream.info().await.map_err(unavailable)?;
        let snapshots = snapshot_store(&js, settings).await;
        let stream_created_ns = info.created.unix_timestamp_nanos();
        let state = StreamState {
            messages: info.state.messages,
            last_sequence: info.state.last_sequence,
        };
        Ok((
            Replica {
                js,
                stream,
                prefix: settings.subject_prefix.clone(),
                ledger,
                parts: DashMap::new(),
                tailed: AtomicU64::new(0),
                snapshots,
                newest_snapshot: AtomicU64::new(0),
                unusable: std::sync::Mutex::new(Vec::new()),
                stream_created_ns,
                leases: std::sync::OnceLock::new(),
                counters: Counters::default(),
            },
            state,
        ))
    }

    /// The JetStream context of this node's connection (the store-and-forward queue shares it).
    pub fn jetstream(&self) -> jetstream::Context {
        self.js.clone()
    }

    /// The subject of a merchant's events.
    fn subject(&self, merchant: &MerchantId) -> String {
        format!("{}.{}", self.prefix, hex::encode(merchant.as_str()))
    }

    fn part(&self, merchant: &MerchantId) -> Arc<PartCell> {
        Arc::clone(self.parts.entry(*merchant).or_default().value())
    }

    /// Applies the events of one stream message (another node's, or one of this node's whose
    /// outcome was unknown) to the ledger; returns their merchant.
    fn apply_remote(&self, seq: u64, payload: &[u8]) -> Result<MerchantId, ReplError> {
        let events = decode_group(payload)
            .map_err(|e| ReplError::Corrupt(format!("message at stream seq {seq}: {e}")))?;
        self.apply_events(seq, &events);
        Ok(events[0].merchant)
    }

    /// Applies the decoded events of the stream message at `seq`.
    fn apply_events(&self, seq: u64, events: &[LedgerEvent]) {
        for event in events {
            if self.ledger.apply(event).is_ok() {
                self.counters.applied_remote.fetch_add(1, Ordering::Relaxed);
                telemetry::count_replica("remote");
            } else {
                // Every node must have the same merchant file: counted, not logged per event.
                telemetry::count_replica("skipped");
                tracing::debug!(
                    seq,
                    "event of a merchant not configured on this node skipped"
                );
            }
        }
    }

    /// Rebuilds the ledger, up to `upto` (the stream's last sequence when the node
    /// connected), before the node serves: from the newest usable snapshot in the bucket and
    /// the stream after it, or from the whole stream. Returns the events of the stream
    /// applied.
    pub async fn load(&self, upto: u64) -> Result<u64, ReplError> {
        if upto == 0 {
            return Ok(0);
        }
        let (from, mut last) = match self.load_snapshot(upto).await {
            Some((seq, marks)) => (seq, marks),
            None => (0, HashMap::new()),
        };
        self.counters
            .start_snapshot_seq
            .store(from, Ordering::Relaxed);
        let before = self.counters.applied_remote.load(Ordering::Relaxed);
        let read = if from < upto {
            self.replay(from, upto, &mut last).await?
        } else {
            0
        };
        for (merchant, seq) in last {
            self.part(&merchant).state.lock().await.last = seq;
        }
        self.counters.start_replayed.store(read, Ordering::Relaxed);
        telemetry::count_replica_start(read, from);
        Ok(self.counters.applied_remote.load(Ordering::Relaxed) - before)
    }

    /// Applies the stream's messages after `from` up to `upto`, in stream order, except the
    /// events a merchant's book already holds (`last`: its last sequence in the snapshot);
    /// `last` ends as each merchant's last sequence. Returns the events read.
    async fn replay(
        &self,
        from: u64,
        upto: u64,
        last: &mut HashMap<MerchantId, u64>,
    ) -> Result<u64, ReplError> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut read = 0;
        while let Some(m) = messages.next().await {
            let m = m.map_err(unavailable)?;
            let seq = m.info().map_err(unavailable)?.stream_sequence;
            let events = decode_group(&m.payload)
                .map_err(|e| ReplError::Corrupt(format!("message at stream seq {seq}: {e}")))?;
            read += events.len() as u64;
            let merchant = events[0].merchant;
            let applied = last.entry(merchant).or_insert(0);
            if seq > *applied {
                self.apply_events(seq, &events);
                *applied = seq;
            }
            if seq >= upto {
                break;
            }
        }
        Ok(read)
    }

    /// Tails the stream after `from`: applies every event of other nodes as it is stored, so
    /// this node's next decision rarely has to catch up. Runs until the task is aborted.
    pub async fn tail(self: Arc<Self>, from: u64) {
        self.tailed.fetch_max(from, Ordering::AcqRel);
        loop {
            let from = self.tailed.load(Ordering::Acquire);
            if let Err(e) = self.tail_once(from).await {
                tracing::warn!(error = %e, "tail of the replicated journal broke; restarting it");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn tail_once(&self, from: u64) -> Result<(), ReplError> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(unavailable)?;
            let seq = m.info().map_err(unavailable)?.stream_sequence;
            let merchant = match decode_group(&m.payload) {
                Ok(events) => events[0].merchant,
                Err(e) => {
                    tracing::error!(seq, error = %e, "unreadable message in the stream skipped");
                    continue;
                }
            };
            let cell = self.part(&merchant);
            let mut p = cell.settled().await;
            if seq > p.last {
                self.retry_open(&mut p);
                self.apply_remote(seq, &m.payload)?;
                p.last = seq;
            }
            drop(p);
            self.tailed.store(seq, Ordering::Release);
        }
        Ok(())
    }

    /// The open decisions were taken on a state without another node's message about to be
    /// applied: their holds go and they are taken again (after it). So every decision of a
    /// group saw exactly the merchant's messages up to the sequence the group expects.
    fn retry_open(&self, p: &mut Part) {
        for item in std::mem::take(&mut p.open) {
            if let Pending::Commit(r) = item.what {
                self.ledger.release(r);
            }
            self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
            telemetry::count_replica("conflict");
            let _ = item.tx.send(Outcome::Retry);
        }
    }

    /// Applies the merchant's messages after `p.last` that this node has not applied yet, up
    /// to the subject's last sequence **when the call starts** (one direct get of it first),
    /// then returns: a node chasing another node's tail reads a bounded backlog, releases the
    /// merchant's lock and lets its decision retry, instead of reading until the other node
    /// pauses. Only while no group append of the merchant awaits its acknowledgement.
    async fn catch_up(&self, merchant: &MerchantId, p: &mut Part) -> Result<(), ReplError> {
        let subject = self.subject(merchant);
        let upto = match self
            .stream
            .direct_get_last_for_subject(subject.clone())
            .await
        {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => 0,
            Err(e) => return Err(unavailable(e)),
        };
        while p.last < upto {
            let m = match self
                .stream
                .direct_get_next_for_subject(subject.clone(), Some(p.last + 1))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            };
            if m.sequence <= p.last || m.sequence > upto {
                break;
            }
            self.retry_open(p);
            self.apply_remote(m.sequence, &m.payload)?;
            p.last = m.sequence;
        }
        p.stale = false;
        Ok(())
    }

    /// Reads and applies the events of `merchant` this node has not applied yet, up to the
    /// subject's last sequence when called (bounded, like the catch-up after a refused
    /// append); returns the merchant's last sequence applied. A new lease owner calls it
    /// before deciding, so its first append rarely conflicts.
    pub async fn refresh(&self, merchant: &str) -> Result<u64, ReplError> {
        let Some(merchant) = &MerchantId::new(merchant) else {
            return Err(ReplError::Refused(crate::ledger::Reason::UNKNOWN_MERCHANT));
        };
        let cell = self.part(merchant);
        let mut p = cell.settled().await;
        self.catch_up(merchant, &mut p).await?;
        Ok(p.last)
    }

    /// Appends `payload` to the merchant's subject if its last sequence is still `expected`.
    async fn append(
        &self,
        merchant: &MerchantId,
        payload: Vec<u8>,
        expected: u64,
    ) -> Result<u64, jetstream::context::PublishError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(self.subject(merchant), publish)
            .await?;
        Ok(ack.await?.sequence)
    }

    /// Decides a request (sale, refund, void, reversal) of `merchant` against the stream, in a
    /// group with the other decisions of that merchant taken on this node while the previous
    /// group's append was in flight: one append (one round trip to a quorum) per group, not
    /// per decision. The decision places its holds at once, so the next ones see it; it is
    /// applied once its group is acknowledged, and taken again if another node appended
    /// first.
    ///
    /// With leases on ([`Replica::use_leases`]) the decision is taken at the merchant's lease
    /// owner: here, or forwarded.
    pub async fn decide(self: &Arc<Self>, req: &Request<'_>, now: i64) -> Logged<ReplError> {
        if let Some(leases) = self.leases.get() {
            return Box::pin(leases.decide(self, req, now)).await;
        }
        self.decide_here(req, now).await
    }

    /// Whether `merchant` is in this node's merchant file (only those get a lease: a request
    /// naming any other is answered here, without an event).
    pub(crate) fn serves(&self, merchant: &MerchantId) -> bool {
        self.ledger.funds(merchant.as_str()).is_some()
    }

    /// Routes this node's decisions through `leases` from now on (once; later calls change
    /// nothing).
    pub fn use_leases(&self, leases: Arc<super::lease::Leases>) {
        let _ = self.leases.set(leases);
    }

    /// [`Replica::decide`] on this node, whatever the leases say: what a lease owner runs,
    /// and what a holder whose lease lapsed while it decided ends up appending (the
    /// expected-sequence check refuses it if another node appended meanwhile).
    pub async fn decide_here(self: &Arc<Self>, req: &Request<'_>, now: i64) -> Logged<ReplError> {
        let Some(merchant) = &MerchantId::new(req.merchant) else {
            // An id no merchant can have: the ledger answers it without an event.
            return self.ledger.decide_logged(req, now, |_| {
                Err(ReplError::Refused(crate::ledger::Reason::UNKNOWN_MERCHANT))
            });
        };
        let cell = self.part(merchant);
        let mut budget = Budget::new();
        while budget.next() {
            let rx = {
                let mut p = cell.state.lock().await;
                if p.stale && !p.awaiting_ack {
                    if let Err(e) = self.catch_up(merchant, &mut p).await {
                        return Logged::Failed(e);
                    }
                }
                let mut declined = None;
                let what = match self.ledger.reserve_logged(req, now, |e: &LedgerEvent| {
                    declined = Some(e.clone());
                    Err(ReplError::Deferred)
                }) {
                    Ok(r) => Pending::Commit(r),
                    Err(Logged::Failed(ReplError::Deferred)) => match declined {
                        Some(e) => Pending::Apply(e),
                        None => return Logged::Failed(ReplError::Corrupt("no event".into())),
                    },
                    Err(other) => return other,
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                p.open.push(Item { what, tx });
                if !p.flushing {
                    p.flushing = true;
                    tokio::spawn(Arc::clone(self).flush(*merchant, Arc::clone(&cell)));
                }
                rx
            };
            match rx.await {
                Ok(Outcome::Done(decision, seq)) => return Logged::Applied { decision, seq },
                Ok(Outcome::Retry) => continue,
                Ok(Outcome::Failed(e)) => return Logged::Failed(ReplError::Unavailable(e)),
                Err(_) => return Logged::Failed(ReplError::Unavailable("flush task gone".into())),
            }
        }
        Logged::Failed(budget.spent())
    }

    /// Appends the merchant's open decisions as one group, applies them on the
    /// acknowledgement (in order, before anything else of the merchant), and goes on with the
    /// decisions taken meanwhile. Spawned: a member whose connection closes cannot leave its
    /// group half applied.
    async fn flush(self: Arc<Self>, merchant: MerchantId, cell: Arc<PartCell>) {
        loop {
            let (items, expected) = {
                let mut p = cell.state.lock().await;
                if p.open.is_empty() {
                    p.flushing = false;
                    return;
                }
                p.awaiting_ack = true;
                (std::mem::take(&mut p.open), p.last)
            };
            let payload = encode_group(items.iter().map(|i| match &i.what {
                Pending::Commit(r) => r.event(),
                Pending::Apply(e) => e,
            }));
            let result = self.append(&merchant, payload, expected).await;
            let mut p = cell.state.lock().await;
            p.awaiting_ack = false;
            match result {
                Ok(seq) => {
                    for item in items {
                        let decision = match item.what {
                            Pending::Commit(r) => {
                                match self.ledger.commit_logged(r, |_| Ok::<u64, ReplError>(seq)) {
                                    Logged::Applied { decision, .. }
                                    | Logged::Unlogged { decision, .. } => decision,
                                    Logged::Failed(_) => continue,
                                }
                            }
                            Pending::Apply(e) => match self.ledger.apply(&e) {
                                Ok(d) => d,
                                Err(_) => continue,
                            },
                        };
                        self.counters.appended.fetch_add(1, Ordering::Relaxed);
                        telemetry::count_replica("appended");
                        let _ = item.tx.send(Outcome::Done(decision, seq));
                    }
                    p.last = seq;
                }
                Err(e) => {
                    let conflict = is_conflict(&e);
                    // Those taken meanwhile counted on this group's holds: decide them again.
                    let open = std::mem::take(&mut p.open);
                    for item in items.into_iter().chain(open) {
                        if let Pending::Commit(r) = item.what {
                            self.ledger.release(r);
                        }
                        let outcome = if conflict {
                            self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                            telemetry::count_replica("conflict");
                            Outcome::Retry
                        } else {
                            telemetry::count_replica("unavailable");
                            Outcome::Failed(e.to_string())
                        };
                        let _ = item.tx.send(outcome);
                    }
                    p.stale = true;
                    if conflict {
                        // Left stale on failure: the next decision reads the subject first.
                        let _ = self.catch_up(&merchant, &mut p).await;
                    }
                }
            }
            cell.acked.notify_waiters();
        }
    }

    /// For a merchant routed to an upstream host: places the request's holds on this node
    /// without an event (the host is asked next, then [`Replica::decide`] appends the approval
    /// against the stream). A refusal is returned as it was logged: a decline to remember is
    /// appended to the stream first and then applied as appended (it may rest on holds of
    /// other requests at their hosts, released meanwhile: it is not decided twice), a stored
    /// answer or a bare refusal is returned at once.
    pub async fn reserve(
        &self,
        req: &Request<'_>,
        now: i64,
    ) -> Result<Reservation, Logged<ReplError>> {
        let Some(merchant) = MerchantId::new(req.merchant) else {
            // An id no merchant can have: the ledger answers it without an event.
            return self.ledger.reserve_logged(req, now, |_| {
                Err(ReplError::Refused(crate::ledger::Reason::UNKNOWN_MERCHANT))
            });
        };
        let cell = self.part(&merchant);
        let mut p = cell.settled().await;
        if p.stale {
            self.catch_up(&merchant, &mut p)
                .await
                .map_err(Logged::Failed)?;
        }
        let mut budget = Budget::new();
        while budget.next() {
            let attempt = budget.attempts;
            let mut captured: Option<LedgerEvent> = None;
            let event = match self.ledger.reserve_logged(req, now, |e: &LedgerEvent| {
                captured = Some(e.clone());
                Err(ReplError::Deferred)
            }) {
                Ok(r) => return Ok(r),
                Err(Logged::Failed(ReplError::Deferred)) => match captured {
                    Some(e) => e,
                    None => return Err(Logged::Failed(ReplError::Corrupt("no event".into()))),
                },
                Err(other) => return Err(other),
            };
            match self.append_applied(&merchant, &mut p, &event).await {
                Ok(logged) => return Err(logged),
                Err(ReplError::Deferred) => {
                    tracing::debug!(attempt, "another node appended first; deciding again");
                }
                Err(e) => return Err(Logged::Failed(e)),
            }
        }
        Err(Logged::Failed(budget.spent()))
    }

    /// For a merchant routed to an upstream host: the host declined the request reserved as
    /// `r` with `code`. The decline is appended to the stream (so a repeat gets it back on any
    /// node) and applied; the holds are released.
    pub async fn decline_by_host(&self, r: Reservation, code: [u8; 2]) -> Logged<ReplError> {
        let merchant = r.event().merchant;
        let mut captured: Option<LedgerEvent> = None;
        let logged = self
            .ledger
            .decline_by_host_logged(r, code, |e: &LedgerEvent| {
                captured = Some(e.clone());
                Err(ReplError::Deferred)
            });
        let event = match (logged, captured) {
            (Logged::Failed(ReplError::Deferred), Some(e)) => e,
            (other, _) => return other,
        };
        let cell = self.part(&merchant);
        let mut p = cell.settled().await;
        if p.stale {
            if let Err(e) = self.catch_up(&merchant, &mut p).await {
                return Logged::Failed(e);
            }
        }
        let mut budget = Budget::new();
        while budget.next() {
            // A decline moves no money: after another node's events it is appended as it is.
            match self.append_applied(&merchant, &mut p, &event).await {
                Ok(logged) => return logged,
                Err(ReplError::Deferred) => continue,
                Err(e) => return Logged::Failed(e),
            }
        }
        Logged::Failed(budget.spent())
    }

    /// Appends `event` with the merchant's expected last sequence and applies it once
    /// acknowledged. `Err(Deferred)`: another node appended first (caught up: try again).
    async fn append_applied(
        &self,
        merchant: &MerchantId,
        p: &mut Part,
        event: &LedgerEvent,
    ) -> Result<Logged<ReplError>, ReplError> {
        let bytes = encode_group(std::iter::once(event));
        match self.append(merchant, bytes, p.last).await {
            Ok(seq) => {
                p.last = seq;
                self.counters.appended.fetch_add(1, Ordering::Relaxed);
                telemetry::count_replica("appended");
                Ok(match self.ledger.apply(event) {
                    Ok(decision) => Logged::Applied { decision, seq },
                    Err(r) => Logged::Failed(r.into()),
                })
            }
            Err(e) if is_conflict(&e) => {
                self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                telemetry::count_replica("conflict");
                self.catch_up(merchant, p).await?;
                Err(ReplError::Deferred)
            }
            Err(e) => {
                p.stale = true;
                telemetry::count_replica("unavailable");
                Err(unavailable(e))
            }
        }
    }

    /// Runs one logged ledger call for `merchant` against the stream (sign-ons, settlements,
    /// cut-overs): `call` is given the `log` closure to pass to the ledger's `*_logged`
    /// method. It runs once without applying (its event is captured), the event is appended
    /// with the merchant's expected last sequence, and on the acknowledgement `call` runs
    /// again and applies exactly that event. A call that journals nothing (a stored answer,
    /// a bare refusal) returns at once.
    pub async fn step<T>(
        &self,
        merchant: &str,
        mut call: impl FnMut(&mut dyn FnMut(&LedgerEvent) -> Result<u64, ReplError>) -> T,
    ) -> Result<T, ReplError> {
        let Some(merchant) = &MerchantId::new(merchant) else {
            // An id no merchant can have: the ledger answers it without an event.
            return Ok(call(&mut |_| {
                Err(ReplError::Refused(crate::ledger::Reason::UNKNOWN_MERCHANT))
            }));
        };
        let cell = self.part(merchant);
        // Held across the append: no group of this merchant starts meanwhile.
        let mut p = cell.settled().await;
        if p.stale {
            self.catch_up(merchant, &mut p).await?;
        }
        let mut budget = Budget::new();
        while budget.next() {
            let attempt = budget.attempts;
            let mut captured: Option<LedgerEvent> = None;
            let first = call(&mut |e: &LedgerEvent| {
                captured = Some(e.clone());
                Err(ReplError::Deferred)
            });
            let Some(event) = captured else {
                return Ok(first);
            };
            drop(first);
            let bytes = encode_group(std::iter::once(&event));
            match self.append(merchant, bytes.clone(), p.last).await {
                Ok(seq) => {
                    let mut same = false;
                    let out = call(&mut |e: &LedgerEvent| {
                        if encode_group(std::iter::once(e)) == bytes {
                            same = true;
                            Ok(seq)
                        } else {
                            Err(ReplError::Corrupt(
                                "decision changed between append and apply".into(),
                            ))
                        }
                    });
                    p.last = seq;
                    if !same {
                        // The stream holds the first event: the ledger must too.
                        let _ = self.ledger.apply(&event);
                        return Err(ReplError::Corrupt(
                            "decision changed between append and apply".into(),
                        ));
                    }
                    self.counters.appended.fetch_add(1, Ordering::Relaxed);
                    telemetry::count_replica("appended");
                    return Ok(out);
                }
                Err(e) if is_conflict(&e) => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    telemetry::count_replica("conflict");
                    tracing::debug!(attempt, "another node appended first; catching up");
                    self.catch_up(merchant, &mut p).await?;
                }
                Err(e) => {
                    p.stale = true;
                    telemetry::count_replica("unavailable");
                    return Err(unavailable(e));
                }
            }
        }
        Err(budget.spent())
    }
}

/// The object store bucket of the ledger snapshots of `stream`.
pub fn snapshot_bucket(stream: &str) -> String {
    format!("{stream}_SNAPSHOTS")
}

/// The object name of the snapshot covering the stream up to `seq` (20 digits: names sort
/// like sequences).
pub fn snapshot_object_name(seq: u64) -> String {
    format!("ledger-{seq:020}")
}

/// The sequence in a snapshot object name, if `name` is one.
pub fn parse_snapshot_object_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ledger-")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Opens the snapshots' bucket, creating it (replicated like the stream) when it does not
/// exist. Snapshots only shorten starts: without the bucket the node runs, and says so.
async fn snapshot_store(
    js: &jetstream::Context,
    settings: &Settings,
) -> Option<object_store::ObjectStore> {
    let bucket = snapshot_bucket(&settings.stream);
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Some(store);
    }
    let config = object_store::Config {
        bucket: bucket.clone(),
        description: Some("refundgate ledger snapshots".into()),
        num_replicas: settings.replicas.max(1),
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match js.create_object_store(config).await {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!(bucket, error = %e, "ledger snapshot bucket unavailable: no snapshots; starts read the whole stream");
            None
        }
    }
}

/// A ledger snapshot of the replicated journal, decoded: the ledger holds every event up to
/// stream sequence `seq`, and each merchant's events up to its own `last` (at least `seq`'s).
#[derive(Debug, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// When the stream it was taken of was created (ns since the epoch).
    pub stream_created_ns: i128,
    /// Replay resumes after this sequence.
    pub seq: u64,
    /// Each merchant's last sequence applied to its book.
    pub last: Vec<(MerchantId, u64)>,
    /// The ledger's bytes ([`Ledger::snapshot`]'s encoding).
    pub ledger: Vec<u8>,
}

impl ClusterSnapshot {
    /// The object's bytes: the snapshot file layout (`journal::snapshot::frame`: magic,
    /// version, `seq`, length, CRC32C) around the stream's creation time (i128), the
    /// merchants' last sequences (count u64, then per merchant its id's length u8, id,
    /// sequence u64), little endian, and the ledger bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(24 + self.last.len() * 32 + self.ledger.len());
        body.extend_from_slice(&self.stream_created_ns.to_le_bytes());
        body.extend_from_slice(&(self.last.len() as u64).to_le_bytes());
        for (id, seq) in &self.last {
            let id = id.as_str().as_bytes();
            body.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
            body.extend_from_slice(&id[..id.len().min(usize::from(u8::MAX))]);
            body.extend_from_slice(&seq.to_le_bytes());
        }
        body.extend_from_slice(&self.ledger);
        super::snapshot::frame(self.seq, &body)
    }

    /// The snapshot in `bytes`, or why it cannot be used (checksum, layout).
    pub fn decode(bytes: &[u8]) -> Result<ClusterSnapshot, &'static str> {
        let framed = super::snapshot::unframe(bytes)?;
        let mut rest = framed.bytes.as_slice();
        let mut take = |n: usize| -> Result<&[u8], &'static str> {
            if rest.len() < n {
                return Err("snapshot cut inside its merchants' sequences");
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u64_of = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
        let created = take(16)?
            .try_into()
            .map(i128::from_le_bytes)
            .map_err(|_| "snapshot cut inside its stream's creation time")?;
        let count = u64_of(take(8)?);
        let mut last = Vec::new();
        for _ in 0..count {
            let len = usize::from(take(1)?[0]);
            let id = std::str::from_utf8(take(len)?)
                .ok()
                .and_then(MerchantId::new)
                .ok_or("snapshot names an invalid merchant id")?;
            last.push((id, u64_of(take(8)?)));
        }
        Ok(ClusterSnapshot {
            stream_created_ns: created,
            seq: framed.seq,
            last,
            ledger: rest.to_vec(),
        })
    }
}

impl Replica {
    /// A snapshot of the ledger as a replay of the stream: every event up to `seq` (the tail's
    /// position, read first) is in it, and each merchant's book is written under that
    /// merchant's lock, once no group of it awaits its acknowledgement, with the sequence of
    /// the last event applied to it (its own appends may be past the tail). Reservations in
    /// flight are not part of the ledger's snapshot. Merchants are held one at a time.
    pub async fn snapshot(&self) -> ClusterSnapshot {
        let seq = self.tailed.load(Ordering::Acquire);
        let order = self.ledger.snapshot_order();
        let mut last = Vec::with_capacity(order.len());
        let mut ledger = Vec::with_capacity(1 << 20);
        self.ledger.snapshot_head(&mut ledger);
        for id in order {
            let cell = self.part(id);
            let p = cell.settled().await;
            self.ledger.snapshot_book(id, &mut ledger);
            last.push((*id, p.last));
            drop(p);
        }
        ClusterSnapshot {
            stream_created_ns: self.stream_created_ns,
            seq,
            last,
            ledger,
        }
    }

    /// Writes a ledger snapshot to the bucket when the tail is `every` sequences or more past
    /// the newest one there (any node may write: two writing at once store two valid
    /// snapshots, and a reader takes the newest), then removes all but the newest
    /// [`crate::limits::CLUSTER_SNAPSHOTS_KEPT`]. Returns the sequence written, if one was.
    pub async fn write_snapshot(&self, every: u64) -> Result<Option<u64>, ReplError> {
        let Some(store) = &self.snapshots else {
            return Ok(None);
        };
        let due = |newest: u64| self.tailed.load(Ordering::Acquire) >= newest.saturating_add(every);
        if !due(self.newest_snapshot.load(Ordering::Acquire)) {
            return Ok(None);
        }
        // Another node may have written one since: look before serialising the ledger.
        let unusable = self.unusable_snapshots();
        let names: Vec<(u64, String)> = self
            .snapshot_names(store)
            .await?
            .into_iter()
            .filter(|(_, name)| !unusable.contains(name))
            .collect();
        if let Some((newest, _)) = names.first() {
            self.newest_snapshot.fetch_max(*newest, Ordering::AcqRel);
        }
        if !due(self.newest_snapshot.load(Ordering::Acquire)) {
            return Ok(None);
        }
        let snapshot = self.snapshot().await;
        let seq = snapshot.seq;
        let bytes = snapshot.encode();
        if bytes.len() as u64 > crate::limits::CLUSTER_SNAPSHOT_BYTES_MAX {
            return Err(ReplError::Corrupt(format!(
                "ledger snapshot of {} bytes is over the limit",
                bytes.len()
            )));
        }
        let name = snapshot_object_name(seq);
        store
            .put(name.as_str(), &mut bytes.as_slice())
            .await
            .map_err(unavailable)?;
        self.newest_snapshot.fetch_max(seq, Ordering::AcqRel);
        self.counters
            .snapshots_written
            .fetch_add(1, Ordering::Relaxed);
        let older = names.iter().filter(|(s, _)| *s < seq).map(|(_, n)| n);
        let kept = crate::limits::CLUSTER_SNAPSHOTS_KEPT.saturating_sub(1);
        // An unusable one of the same name was just replaced.
        let replaced = unusable.iter().filter(|n| **n != name);
        for old in older.skip(kept).chain(replaced) {
            if let Err(e) = store.delete(old).await {
                tracing::debug!(object = old, error = %e, "old ledger snapshot not removed");
            }
        }
        if !unusable.is_empty() {
            self.forget_unusable();
        }
        Ok(Some(seq))
    }

    fn unusable_snapshots(&self) -> Vec<String> {
        self.unusable
            .lock()
            .map(|names| names.clone())
            .unwrap_or_default()
    }

    fn forget_unusable(&self) {
        if let Ok(mut names) = self.unusable.lock() {
            names.clear();
        }
    }

    fn remember_unusable(&self, name: &str) {
        if let Ok(mut names) = self.unusable.lock() {
            if names.len() < UNUSABLE_REMEMBERED_MAX {
                names.push(name.to_string());
            }
        }
    }

    /// The snapshots in the bucket, newest first.
    async fn snapshot_names(
        &self,
        store: &object_store::ObjectStore,
    ) -> Result<Vec<(u64, String)>, ReplError> {
        let mut list = store.list().await.map_err(unavailable)?;
        let mut names = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(unavailable)?;
            if let Some(seq) = parse_snapshot_object_name(&info.name) {
                names.push((seq, info.name));
            }
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(names)
    }

    /// Loads the newest usable snapshot at or before `upto` into the ledger: its sequence and
    /// each merchant's last sequence. An unreadable or damaged one is logged once, counted and
    /// skipped for the next older; `None` when there is none (the whole stream is read).
    async fn load_snapshot(&self, upto: u64) -> Option<(u64, HashMap<MerchantId, u64>)> {
        let store = self.snapshots.as_ref()?;
        let names = match self.snapshot_names(store).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "ledger snapshots not listed; reading the whole stream");
                return None;
            }
        };
        for (seq, name) in names {
            let loaded = if seq > upto {
                Err("past the stream's last sequence (a snapshot of another stream?)".to_string())
            } else {
                self.read_snapshot(store, &name).await
            };
            match loaded {
                Ok(last) => {
                    self.newest_snapshot.fetch_max(seq, Ordering::AcqRel);
                    tracing::info!(seq, object = name, "ledger loaded from snapshot");
                    return Some((seq, last));
                }
                Err(why) => {
                    self.remember_unusable(&name);
                    telemetry::count_replica_snapshot("unreadable");
                    tracing::warn!(object = name, error = %why, "ledger snapshot unusable; skipped");
                }
            }
        }
        None
    }

    /// Reads, checks and restores one snapshot object into the ledger.
    async fn read_snapshot(
        &self,
        store: &object_store::ObjectStore,
        name: &str,
    ) -> Result<HashMap<MerchantId, u64>, String> {
        let object = store.get(name).await.map_err(|e| e.to_string())?;
        let size = object.info().size as u64;
        let max = crate::limits::CLUSTER_SNAPSHOT_BYTES_MAX;
        if size > max {
            return Err(format!("{size} bytes, over the limit"));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        object
            .take(max + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        let snapshot = ClusterSnapshot::decode(&bytes).map_err(str::to_string)?;
        if snapshot.stream_created_ns != self.stream_created_ns {
            return Err("taken of another stream of this name (deleted since)".into());
        }
        let last: HashMap<MerchantId, u64> = snapshot.last.into_iter().collect();
        // A merchant without its sequence would miss its events before the snapshot (a
        // writer with another merchant file): the stream has them, the snapshot does not.
        let order = self.ledger.snapshot_order();
        if let Some(missing) = order.iter().find(|id| !last.contains_key(*id)) {
            return Err(format!(
                "merchant {} is not in it (written with another merchant file?)",
                missing.as_str()
            ));
        }
        self.ledger
            .restore_in_place(&snapshot.ledger)
            .map_err(|e| e.to_string())?;
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_snapshot_round_trips_and_a_flipped_byte_is_refused() {
        let a = MerchantId::new("MERCHANT 000001").unwrap();
        let b = MerchantId::new("M2").unwrap();
        let snap = ClusterSnapshot {
            stream_created_ns: 1_790_000_000_123_456_789,
            seq: 77,
            last: vec![(a, 80), (b, 0)],
            ledger: b"RGLS ledger bytes".to_vec(),
        };
        let bytes = snap.encode();
        assert_eq!(ClusterSnapshot::decode(&bytes), Ok(snap));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(ClusterSnapshot::decode(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn snapshot_object_names_sort_like_their_sequences() {
        assert_eq!(
            parse_snapshot_object_name(&snapshot_object_name(12)),
            Some(12)
        );
        assert!(snapshot_object_name(9) < snapshot_object_name(10));
        assert_eq!(parse_snapshot_object_name("ledger-12"), None);
    }
}
