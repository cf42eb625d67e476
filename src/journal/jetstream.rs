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
//!   rebuilds its ledger by reading the stream from the start.
//! - A publish whose outcome is unknown (timeout, cluster without quorum) is answered 96; the
//!   merchant is marked stale and caught up before its next decision, so a repeat of that
//!   request gets the stored answer if the event did land.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use dashmap::DashMap;
use futures::StreamExt;

use crate::ledger::{Ledger, LedgerEvent, MerchantId};
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

/// Attempts of one step before it gives up on a contended merchant.
const ATTEMPTS: u32 = 64;

/// This node's view of one merchant's subject.
#[derive(Debug, Default)]
struct Part {
    /// Stream sequence of the last event of this merchant applied to the ledger (0: none).
    last: u64,
    /// An append's outcome is unknown: read the subject before deciding again.
    stale: bool,
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
}

/// The replicated journal of one gateway node.
pub struct Replica {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    ledger: Arc<Ledger>,
    parts: DashMap<MerchantId, Arc<tokio::sync::Mutex<Part>>>,
    /// Stream sequence the tail has read up to (it restarts from there).
    tailed: AtomicU64,
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
fn is_conflict(e: &jetstream::context::PublishError) -> bool {
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
                counters: Counters::default(),
            },
            state,
        ))
    }

    /// The subject of a merchant's events.
    fn subject(&self, merchant: &MerchantId) -> String {
        format!("{}.{}", self.prefix, hex::encode(merchant.as_str()))
    }

    fn part(&self, merchant: &MerchantId) -> Arc<tokio::sync::Mutex<Part>> {
        Arc::clone(self.parts.entry(*merchant).or_default().value())
    }

    /// Rebuilds the ledger from the stream, up to `upto` (the stream's last sequence when the
    /// node connected), before the node serves. Returns the events applied.
    pub async fn load(&self, upto: u64) -> Result<u64, ReplError> {
        if upto == 0 {
            return Ok(0);
        }
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.prefix),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut last: HashMap<MerchantId, u64> = HashMap::new();
        let mut applied = 0u64;
        while let Some(m) = messages.next().await {
            let m = m.map_err(unavailable)?;
            let seq = m.info().map_err(unavailable)?.stream_sequence;
            let event = LedgerEvent::decode(&m.payload)
                .map_err(|e| ReplError::Corrupt(format!("event at stream seq {seq}: {e}")))?;
            if self.ledger.apply(&event).is_ok() {
                applied += 1;
            } else {
                tracing::warn!(
                    seq,
                    "event of a merchant not configured on this node skipped"
                );
            }
            last.insert(event.merchant, seq);
            if seq >= upto {
                break;
            }
        }
        for (merchant, seq) in last {
            self.part(&merchant).lock().await.last = seq;
        }
        Ok(applied)
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
            let event = match LedgerEvent::decode(&m.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(seq, error = %e, "unreadable event in the stream skipped");
                    continue;
                }
            };
            let part = self.part(&event.merchant);
            let mut p = part.lock().await;
            if seq > p.last {
                if self.ledger.apply(&event).is_ok() {
                    self.counters.applied_remote.fetch_add(1, Ordering::Relaxed);
                    telemetry::count_replica("remote");
                }
                p.last = seq;
            }
            drop(p);
            self.tailed.store(seq, Ordering::Release);
        }
        Ok(())
    }

    /// Applies the merchant's events after `p.last` that this node has not seen yet.
    async fn catch_up(&self, merchant: &MerchantId, p: &mut Part) -> Result<(), ReplError> {
        let subject = self.subject(merchant);
        loop {
            let m = match self
                .stream
                .direct_get_next_for_subject(subject.clone(), Some(p.last + 1))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            };
            if m.sequence <= p.last {
                break;
            }
            let event = LedgerEvent::decode(&m.payload).map_err(|e| {
                ReplError::Corrupt(format!("event at stream seq {}: {e}", m.sequence))
            })?;
            if self.ledger.apply(&event).is_ok() {
                self.counters.applied_remote.fetch_add(1, Ordering::Relaxed);
                telemetry::count_replica("remote");
            }
            p.last = m.sequence;
        }
        p.stale = false;
        Ok(())
    }

    /// Runs one logged ledger call for `merchant` against the stream: `call` is given the
    /// `log` closure to pass to the ledger's `*_logged` method. It runs once without applying
    /// (its event is captured), the event is appended with the merchant's expected last
    /// sequence, and on the acknowledgement `call` runs again and applies exactly that event.
    /// A call that journals nothing (a stored answer, a bare refusal) returns at once.
    pub async fn step<T>(
        &self,
        merchant: &MerchantId,
        mut call: impl FnMut(&mut dyn FnMut(&LedgerEvent) -> Result<u64, ReplError>) -> T,
    ) -> Result<T, ReplError> {
        let part = self.part(merchant);
        let mut p = part.lock().await;
        if p.stale {
            self.catch_up(merchant, &mut p).await?;
        }
        let subject = self.subject(merchant);
        for attempt in 1..=ATTEMPTS {
            let mut captured: Option<Vec<u8>> = None;
            let first = call(&mut |e: &LedgerEvent| {
                let mut bytes = Vec::with_capacity(128);
                e.encode(&mut bytes);
                captured = Some(bytes);
                Err(ReplError::Deferred)
            });
            let Some(bytes) = captured else {
                return Ok(first);
            };
            drop(first);
            let publish = jetstream::message::PublishMessage::build()
                .payload(bytes.clone().into())
                .expected_last_subject_sequence(p.last);
            let acked = match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => {
                    let seq = ack.sequence;
                    let mut same = false;
                    let out = call(&mut |e: &LedgerEvent| {
                        let mut again = Vec::with_capacity(bytes.len());
                        e.encode(&mut again);
                        if again == bytes {
                            same = true;
                            Ok(seq)
                        } else {
                            Err(ReplError::Corrupt(
                                "decision changed between append and apply".into(),
                            ))
                        }
                    });
                    if !same {
                        // The stream holds the first event: the ledger must too.
                        let event = LedgerEvent::decode(&bytes)
                            .map_err(|e| ReplError::Corrupt(e.to_string()))?;
                        let _ = self.ledger.apply(&event);
                        p.last = seq;
                        return Err(ReplError::Corrupt(
                            "decision changed between append and apply".into(),
                        ));
                    }
                    p.last = seq;
                    self.counters.appended.fetch_add(1, Ordering::Relaxed);
                    telemetry::count_replica("appended");
                    return Ok(out);
                }
                Err(e) if is_conflict(&e) => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    telemetry::count_replica("conflict");
                    tracing::debug!(attempt, "another node appended first; catching up");
                    if attempt > 2 {
                        // A direct get may be served by a replica that lags the leader.
                        tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
                    }
                    self.catch_up(merchant, &mut p).await?;
                }
                Err(e) => {
                    p.stale = true;
                    telemetry::count_replica("unavailable");
                    return Err(unavailable(e));
                }
            }
        }
        Err(ReplError::Contended(ATTEMPTS))
    }
}
