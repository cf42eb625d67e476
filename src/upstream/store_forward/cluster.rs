//! The store-and-forward queue in NATS JetStream (`journal.backend = "jetstream"`): every
//! gateway node of the cluster queues into it and any live node delivers from it, so a
//! reversal queued by a node that dies is still delivered (DOMAIN §8; issue #20).
//!
//! - **Queue**: stream `<stream>_SAF` (work-queue retention, file storage, the journal's
//!   replicas, at most [`SAF_PENDING_MAX`] messages, new ones refused beyond). One message
//!   per entry, on `<stream>_SAF.q.<hex of the upstream name>`, holding the same record as
//!   the local queue's journal (`1`/`4`: the message reduced to the allow-listed elements,
//!   its PAN sealed under `security.saf_pan_key`). [`ClusterSaf::enqueue`] returns once the
//!   stream acknowledged it, i.e. stored it on a quorum: the terminal's 91/98 leaves after
//!   that, as with the local queue. A `Nats-Msg-Id` made of the upstream and the message's
//!   key keeps the same reversal from being queued twice (by one node or two) within
//!   [`DUPLICATE_WINDOW`].
//! - **Delivery**: one durable pull consumer per upstream (`saf_<hex of the name>`), shared by
//!   all nodes: the server hands each message to one node at a time. The node sends it while
//!   its link to that upstream is up, acknowledges it on an accepted answer (`00`, `25`),
//!   which removes it from the stream, or gives it back with a delay (exponential backoff with
//!   jitter, as the local queue). A node that dies mid-delivery never acknowledges: after the
//!   consumer's ack wait the server hands the message to another node. Every delivery after
//!   the first is sent as a repeat (0401, 0421): the message may have reached the host
//!   already, so the host applies the reversal once.
//! - **Dead letters**: an entry delivered `max_retries` times without an accepted answer, or
//!   older than `expiry_s`, is published to stream `<stream>_SAF_DEAD` (limits retention, the
//!   newest [`SAF_DEAD_LETTERS_KEPT_MAX`] kept) and then acknowledged in the queue. An
//!   operator's retry puts it back in the queue, marked to be sent as a repeat.
//! - **Figures**: `refundgate_saf_pending` is the queue's message count and
//!   `refundgate_saf_dead_letters` the dead letters ever recorded (the dead stream's last
//!   sequence), the same on every node; `refundgate_saf_delivered_total` counts this node's
//!   deliveries. They are read every [`REFRESH`].
//!
//! Unlike the local queue, every delivery counts as a send towards `max_retries` (a node
//! fetches only while its link is up, so one that was not sent is rare).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{
    accepted, mark_repeat, reduce, DeadLetter, DeadReason, Entry, Record, SafError, SafOptions,
    SAF_DEAD_LETTERS, SAF_DELIVERED_TOTAL, SAF_PENDING,
};
use crate::clock::Clock;
use crate::dialect::Dialect;
use crate::limits::{
    SAF_BODY_BYTES_MAX, SAF_DEAD_LETTERS_KEPT_MAX, SAF_IN_FLIGHT_MAX, SAF_PENDING_MAX,
};
use crate::upstream::link::{Key, Link, LinkError};

/// How long the queue remembers a queued entry's `Nats-Msg-Id` (the same reversal queued
/// again within it is not queued twice).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// How often the figures and the lists of [`ClusterSaf::pending`] and
/// [`ClusterSaf::dead_letters`] are read from the streams.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Entries [`ClusterSaf::pending`] lists at most (the count in `refundgate_saf_pending` is
/// exact).
pub const PENDING_LISTED_MAX: usize = 1000;

/// Header of an entry put back by an operator's retry: it was sent before, so even its first
/// delivery is a repeat.
const SENT_BEFORE: &str = "Refundgate-Sent-Before";

/// Where the queue lives.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The ledger journal's stream name; the queue is `<stream>_SAF`, its dead letters
    /// `<stream>_SAF_DEAD`.
    pub stream: String,
    /// Copies of each message (the journal's replicas).
    pub replicas: usize,
    /// How long a node may hold a message before the server hands it to another node: longer
    /// than the longest send (the upstreams' timeout).
    pub ack_wait: Duration,
}

struct Conn {
    js: jetstream::Context,
    queue: stream::Stream,
    dead: stream::Stream,
}

#[derive(Default)]
struct Cache {
    pending_count: u64,
    pending: Vec<Entry>,
    pending_mark: (u64, u64, u64),
    dead: Vec<(u64, DeadLetter)>,
    dead_total: u64,
    dead_mark: (u64, u64, u64),
}

/// The store-and-forward queue of a cluster node.
pub struct ClusterSaf {
    settings: ClusterSettings,
    options: SafOptions,
    clock: Arc<dyn Clock>,
    pan_cipher: OnceLock<crate::at_rest::PanCipher>,
    /// The SAF PAN key file was created by this start (refused if the streams hold entries).
    fresh_key: std::sync::atomic::AtomicBool,
    conn: OnceLock<Conn>,
    delivered_total: AtomicU64,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for ClusterSaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSaf")
            .field("stream", &self.queue_name())
            .field("pending", &self.lock().pending_count)
            .finish_non_exhaustive()
    }
}

impl ClusterSaf {
    /// A queue not connected yet: [`ClusterSaf::connect`] before serving.
    pub fn new(
        settings: ClusterSettings,
        options: SafOptions,
        clock: Arc<dyn Clock>,
    ) -> ClusterSaf {
        ClusterSaf {
            settings,
            options,
            clock,
            pan_cipher: OnceLock::new(),
            fresh_key: std::sync::atomic::AtomicBool::new(false),
            conn: OnceLock::new(),
            delivered_total: AtomicU64::new(0),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Sets the cipher of queued PANs (once; later calls are ignored).
    pub fn set_pan_cipher(&self, cipher: crate::at_rest::PanCipher) {
        let _ = self.pan_cipher.set(cipher);
    }

    /// Marks the PAN key as created by this start: [`ClusterSaf::connect`] then refuses
    /// streams that already hold entries (sealed under the other nodes' key).
    pub fn set_fresh_key(&self) {
        self.fresh_key.store(true, Ordering::Relaxed);
    }

    fn queue_name(&self) -> String {
        format!("{}_SAF", self.settings.stream)
    }

    fn dead_name(&self) -> String {
        format!("{}_SAF_DEAD", self.settings.stream)
    }

    fn queue_subject(&self, upstream: &str) -> String {
        format!("{}.q.{}", self.queue_name(), hex::encode(upstream))
    }

    /// Creates (or opens) the queue and dead-letter streams on the cluster `js` is connected to.
    pub async fn connect(&self, js: jetstream::Context) -> Result<(), String> {
        let queue_config = stream::Config {
            name: self.queue_name(),
            subjects: vec![format!("{}.q.*", self.queue_name())],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.settings.replicas.max(1),
            max_messages: i64::try_from(SAF_PENDING_MAX).unwrap_or(i64::MAX),
            max_message_size: i32::try_from(4 * SAF_BODY_BYTES_MAX).unwrap_or(i32::MAX),
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            ..Default::default()
        };
        let dead_config = stream::Config {
            name: self.dead_name(),
            subjects: vec![format!("{}.x", self.dead_name())],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.settings.replicas.max(1),
            max_messages: i64::try_from(SAF_DEAD_LETTERS_KEPT_MAX).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            ..Default::default()
        };
        let mut tries = 0;
        let (queue, dead) = loop {
            let made = async {
                let q = js.get_or_create_stream(queue_config.clone()).await?;
                let d = js.get_or_create_stream(dead_config.clone()).await?;
                Ok::<_, jetstream::context::CreateStreamError>((q, d))
            };
            match made.await {
                Ok(both) => break both,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::info!(error = %e, "waiting for the JetStream cluster (store-and-forward)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("store-and-forward streams: {e}")),
            }
        };
        let held = {
            let q = queue.get_info().await.map_err(|e| e.to_string())?;
            let d = dead.get_info().await.map_err(|e| e.to_string())?;
            q.state.messages + d.state.messages
        };
        if held > 0 && self.fresh_key.load(Ordering::Relaxed) {
            return Err(format!(
                "security.saf_pan_key was created by this start, but the store-and-forward streams hold {held} entries sealed under the other nodes' key: copy that key"
            ));
        }
        let _ = self.conn.set(Conn { js, queue, dead });
        self.refresh().await;
        Ok(())
    }

    fn conn(&self) -> Result<&Conn, SafError> {
        self.conn
            .get()
            .ok_or_else(|| SafError::Store("store-and-forward streams not connected".into()))
    }

    /// Queues `body` for `upstream`; returns once the stream stored it on a quorum. The same
    /// upstream and key queued again within [`DUPLICATE_WINDOW`] is not queued twice (the id
    /// of the first is returned).
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
        let conn = self.conn()?;
        let Some(reduced) = reduce(dialect, &body) else {
            return Err(SafError::Store("message cannot be decoded".to_string()));
        };
        // Unique across nodes without coordination; below 2^53 so JSON readers keep it exact.
        let id = (rand::random::<u64>() & ((1 << 53) - 1)).max(1);
        let entry = Entry::sealed(
            id,
            upstream,
            dialect,
            self.clock.now_unix_s(),
            key,
            reduced,
            self.pan_cipher.get(),
        );
        let mut payload = Vec::with_capacity(128 + entry.body.len());
        Record::Add(entry).encode(&mut payload);
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(dedup_id(upstream, &key));
        let ack = async {
            conn.js
                .send_publish(self.queue_subject(upstream), publish)
                .await?
                .await
        }
        .await
        .map_err(|e| {
            let text = e.to_string();
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            if text.contains("maximum messages")
                || source.is_some_and(|s| s.contains("maximum messages"))
            {
                SafError::Full
            } else {
                tracing::warn!(error = %text, "store-and-forward stream refused the entry");
                SafError::Store(text)
            }
        })?;
        if ack.duplicate {
            let first = conn
                .queue
                .direct_get(ack.sequence)
                .await
                .ok()
                .and_then(|m| match Record::decode(&m.payload) {
                    Some(Record::Add(e)) => Some(e.id),
                    _ => None,
                });
            return Ok(first.unwrap_or(id));
        }
        // The figures follow at the next refresh (counted here, a refresh that already saw
        // the message would count it twice).
        Ok(id)
    }

    /// Entries waiting, oldest first, as read at the last refresh (at most
    /// [`PENDING_LISTED_MAX`]).
    pub fn pending(&self) -> Vec<Entry> {
        self.lock().pending.clone()
    }

    /// Entries waiting, as counted at the last refresh.
    pub fn pending_count(&self) -> u64 {
        self.lock().pending_count
    }

    /// The dead letters kept, oldest first, as read at the last refresh.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Dead letters ever recorded in the cluster.
    pub fn dead_total(&self) -> u64 {
        self.lock().dead_total
    }

    /// Entries this node delivered since start.
    pub fn delivered_total(&self) -> u64 {
        self.delivered_total.load(Ordering::Relaxed)
    }

    /// Puts dead letter `id` back in the queue, to be sent as a repeat. `Ok(false)` when no
    /// dead letter has that id.
    pub async fn retry_dead(&self, id: u64) -> Result<bool, String> {
        self.refresh().await;
        let found = self
            .lock()
            .dead
            .iter()
            .find(|(_, d)| d.entry.id == id)
            .map(|(seq, d)| (*seq, d.entry.clone()));
        let Some((seq, entry)) = found else {
            return Ok(false);
        };
        let conn = self.conn().map_err(|e| e.to_string())?;
        let subject = self.queue_subject(&entry.upstream);
        let mut payload = Vec::with_capacity(128 + entry.body.len());
        Record::Add(entry).encode(&mut payload);
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .header(SENT_BEFORE, "1")
            .message_id(format!("retry-{id}-{seq}"));
        async { conn.js.send_publish(subject, publish).await?.await }
            .await
            .map_err(|e| e.to_string())?;
        conn.dead
            .delete_message(seq)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh().await;
        Ok(true)
    }

    /// Delivers entries for every upstream in `links` until `stop` turns true, and keeps the
    /// figures current.
    pub async fn run(
        self: Arc<Self>,
        links: Arc<HashMap<String, Arc<Link>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut workers = JoinSet::new();
        for (name, link) in links.iter() {
            workers.spawn(Arc::clone(&self).deliver(name.clone(), Arc::clone(link), stop.clone()));
        }
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => self.refresh().await,
            }
        }
        // The workers see `stop` too; their sends in progress end with them, and the server
        // hands the messages they held to another node after the ack wait.
        while workers.join_next().await.is_some() {}
    }

    /// The delivery loop of one upstream: fetches due entries while its link is up.
    async fn deliver(
        self: Arc<Self>,
        upstream: String,
        link: Arc<Link>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Ok(conn) = self.conn() else {
            tracing::error!(
                upstream,
                "store-and-forward streams not connected: nothing is delivered"
            );
            return;
        };
        let name = format!("saf_{}", hex::encode(&upstream));
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: self.queue_subject(&upstream),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            max_ack_pending: i64::try_from(4 * SAF_IN_FLIGHT_MAX).unwrap_or(1024),
            ..Default::default()
        };
        // Opened again after a failed fetch (the consumer may have been deleted, or its
        // stream moved to another leader).
        let mut open: Option<consumer::PullConsumer> = None;
        let mut tasks = JoinSet::new();
        let mut failing = false;
        loop {
            while tasks.try_join_next().is_some() {}
            if *stop.borrow() {
                break;
            }
            let consumer = match &open {
                Some(c) => c.clone(),
                None => match conn
                    .queue
                    .get_or_create_consumer(&name, config.clone())
                    .await
                {
                    Ok(c) => {
                        open = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(upstream, error = %e, "store-and-forward consumer unavailable; retrying");
                        }
                        failing = true;
                        tokio::select! {
                            _ = stop.changed() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                },
            };
            let room = SAF_IN_FLIGHT_MAX.saturating_sub(tasks.len());
            if !link.is_up() || room == 0 {
                tokio::select! {
                    _ = stop.changed() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
                continue;
            }
            let fetched = async {
                let mut batch = consumer
                    .fetch()
                    .max_messages(room)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                while let Some(m) = batch.next().await {
                    match m {
                        Ok(msg) => {
                            tasks.spawn(Arc::clone(&self).attempt(Arc::clone(&link), msg));
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(())
            };
            let outcome = tokio::select! {
                _ = stop.changed() => break,
                outcome = fetched => outcome,
            };
            match outcome {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(upstream, error = %e, "store-and-forward fetch failed; retrying");
                    }
                    failing = true;
                    open = None;
                    tokio::select! {
                        _ = stop.changed() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        tasks.shutdown().await;
    }

    /// One delivery of one message: send it, then acknowledge, give back or dead-letter it.
    async fn attempt(self: Arc<Self>, link: Arc<Link>, msg: jetstream::Message) {
        let (seq, delivered) = match msg.info() {
            Ok(info) => (
                info.stream_sequence,
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "store-and-forward message without delivery info");
                return;
            }
        };
        let Some(Record::Add(entry)) = Record::decode(&msg.payload) else {
            tracing::error!(
                seq,
                "unreadable store-and-forward message dropped from the queue"
            );
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        };
        let sent_before = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(SENT_BEFORE).is_some());
        // Deliveries before this one: each may have reached the host.
        let attempts = delivered - 1;
        let now_s = self.clock.now_unix_s();
        if now_s.saturating_sub(entry.created_s) >= self.options.expiry_s {
            return self
                .give_up(msg, seq, entry, DeadReason::Expired, attempts)
                .await;
        }
        if attempts >= self.options.max_retries {
            return self
                .give_up(msg, seq, entry, DeadReason::RetriesExhausted, attempts)
                .await;
        }
        let body = super::body_to_send(self.pan_cipher.get(), &entry);
        let body = match delivered > 1 || sent_before {
            true => mark_repeat(entry.dialect, &body),
            false => body,
        };
        match link.call_repeatable(entry.key, body).await {
            Ok(answer) if accepted(entry.dialect, &answer) => match msg.double_ack().await {
                Ok(()) => {
                    self.delivered_total.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(SAF_DELIVERED_TOTAL).increment(1);
                }
                Err(e) => {
                    // Delivered again later, as a repeat (the host treats it as a no-op).
                    tracing::warn!(id = entry.id, error = %e, "store-and-forward acknowledgement failed");
                }
            },
            Ok(_) | Err(LinkError::Timeout | LinkError::BadMac) => {
                self.later(&msg, delivered).await
            }
            Err(LinkError::Down | LinkError::Full | LinkError::Busy | LinkError::Unkeyed) => {
                self.later(&msg, delivered).await
            }
        }
    }

    /// Gives `msg` back to the queue, due after the backoff of its `delivered`-th try.
    async fn later(&self, msg: &jetstream::Message, delivered: u32) {
        let delay = backoff(&self.options, delivered);
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            // Not given back: the server hands it out again after the ack wait.
            tracing::debug!(error = %e, "store-and-forward nak failed");
        }
    }

    async fn give_up(
        &self,
        msg: jetstream::Message,
        seq: u64,
        entry: Entry,
        reason: DeadReason,
        attempts: u32,
    ) {
        let Ok(conn) = self.conn() else { return };
        let at_s = self.clock.now_unix_s();
        let id = entry.id;
        let mut dead = Vec::with_capacity(32);
        Record::Dead {
            id,
            reason,
            at_s,
            attempts,
        }
        .encode(&mut dead);
        let mut payload = Vec::with_capacity(64 + entry.body.len());
        payload.extend_from_slice(&u16::try_from(dead.len()).unwrap_or(0).to_be_bytes());
        payload.extend_from_slice(&dead);
        Record::Add(entry).encode(&mut payload);
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("dead-{id}-{seq}"));
        let recorded = async {
            conn.js
                .send_publish(format!("{}.x", self.dead_name()), publish)
                .await?
                .await
        }
        .await;
        match recorded {
            Ok(_) => {
                if let Err(e) = msg.double_ack().await {
                    // Handed out again and dead-lettered again: the same Msg-Id, stored once.
                    tracing::warn!(id, error = %e, "store-and-forward acknowledgement failed");
                }
                tracing::error!(
                    id,
                    ?reason,
                    attempts,
                    "store-and-forward entry dead-lettered"
                );
                self.refresh().await;
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "store-and-forward dead letter not recorded; retried");
                self.later(&msg, attempts.saturating_add(1)).await;
            }
        }
    }

    /// Reads the figures (and, when they changed, the lists) from the streams ([`ClusterSaf::run`]
    /// does every [`REFRESH`]).
    pub async fn refresh(&self) {
        let Ok(conn) = self.conn() else { return };
        if let Ok(info) = conn.queue.get_info().await {
            let s = info.state;
            let mark = (s.first_sequence, s.last_sequence, s.messages);
            let stale = self.lock().pending_mark != mark;
            let listed = match stale {
                true => Some(list(&conn.queue, s.first_sequence, PENDING_LISTED_MAX).await),
                false => None,
            };
            let mut c = self.lock();
            c.pending_count = s.messages;
            if let Some(listed) = listed {
                c.pending = listed
                    .into_iter()
                    .filter_map(|(_, m)| match Record::decode(&m.payload) {
                        Some(Record::Add(e)) => Some(e),
                        _ => None,
                    })
                    .collect();
                c.pending_mark = mark;
            }
            metrics::gauge!(SAF_PENDING).set(s.messages as f64);
        }
        if let Ok(info) = conn.dead.get_info().await {
            let s = info.state;
            let mark = (s.first_sequence, s.last_sequence, s.messages);
            let stale = self.lock().dead_mark != mark;
            let listed = match stale {
                true => Some(list(&conn.dead, s.first_sequence, SAF_DEAD_LETTERS_KEPT_MAX).await),
                false => None,
            };
            let mut c = self.lock();
            c.dead_total = s.last_sequence;
            if let Some(listed) = listed {
                c.dead = listed
                    .into_iter()
                    .filter_map(|(seq, m)| decode_dead(&m.payload).map(|d| (seq, d)))
                    .collect();
                c.dead_mark = mark;
            }
            metrics::gauge!(SAF_DEAD_LETTERS).set(s.last_sequence as f64);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Up to `max` messages of `stream` from sequence `from` on, oldest first.
async fn list(
    stream: &stream::Stream,
    from: u64,
    max: usize,
) -> Vec<(u64, jetstream::message::StreamMessage)> {
    let mut out = Vec::new();
    let mut next = from.max(1);
    let subjects = format!("{}.>", stream.cached_info().config.name);
    while out.len() < max {
        match stream
            .direct_get_next_for_subject(subjects.as_str(), Some(next))
            .await
        {
            Ok(m) => {
                next = m.sequence + 1;
                out.push((m.sequence, m));
            }
            Err(_) => break,
        }
    }
    out
}

/// A dead-letter message: the length of its `3` record, the record, then the entry's `1`/`4`.
fn decode_dead(payload: &[u8]) -> Option<DeadLetter> {
    let (len, rest) = payload.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return None;
    }
    let (dead, add) = rest.split_at(len);
    let (
        Some(Record::Dead {
            reason,
            at_s,
            attempts,
            ..
        }),
        Some(Record::Add(entry)),
    ) = (Record::decode(dead), Record::decode(add))
    else {
        return None;
    };
    Some(DeadLetter {
        entry,
        reason,
        at_s,
        attempts,
    })
}

/// The `Nats-Msg-Id` of the entry for `key` at `upstream`.
fn dedup_id(upstream: &str, key: &Key) -> String {
    format!(
        "saf-{}-{:04}-{}-{}-{}",
        hex::encode(upstream),
        key.mti,
        hex::encode(key.terminal),
        hex::encode(key.merchant),
        key.stan
    )
}

/// The delay before try `tries + 1`: `retry_min` doubled per try up to `retry_max`, ±25 %.
fn backoff(options: &SafOptions, tries: u32) -> Duration {
    let base = options
        .retry_min
        .saturating_mul(1u32 << tries.saturating_sub(1).min(16))
        .min(options.retry_max);
    base.mul_f64(rand::random_range(0.75..1.25))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_round_trips_and_a_cut_one_is_refused() {
        let entry = Entry {
            id: 42,
            upstream: "bank".into(),
            dialect: &crate::dialect::ASCII1987,
            created_s: 7,
            key: Key {
                mti: 400,
                terminal: *b"TERM0001",
                merchant: *b"MERCHANT 000001",
                stan: 9,
            },
            body: Bytes::from_static(b"0400"),
            sealed_pan: None,
        };
        // The body must decode for the record to: build a real one.
        let spec = crate::dialect::ASCII1987.spec();
        let mut fields: crate::iso8583::FieldList<'_, 4> = crate::iso8583::FieldList::new();
        fields.set(11, crate::iso8583::Value::Number(9)).unwrap();
        fields
            .set(41, crate::iso8583::Value::Text(b"TERM0001"))
            .unwrap();
        fields
            .set(42, crate::iso8583::Value::Text(b"MERCHANT 000001"))
            .unwrap();
        let mut out = bytes::BytesMut::new();
        crate::iso8583::encode(spec, crate::iso8583::Mti(400), fields.as_slice(), &mut out)
            .unwrap();
        let entry = Entry {
            body: out.freeze(),
            ..entry
        };
        let mut dead = Vec::new();
        Record::Dead {
            id: 42,
            reason: DeadReason::Expired,
            at_s: 99,
            attempts: 3,
        }
        .encode(&mut dead);
        let mut payload = (dead.len() as u16).to_be_bytes().to_vec();
        payload.extend_from_slice(&dead);
        Record::Add(entry.clone()).encode(&mut payload);
        let back = decode_dead(&payload).unwrap();
        assert_eq!(
            (back.entry, back.reason, back.at_s, back.attempts),
            (entry, DeadReason::Expired, 99, 3)
        );
        assert!(decode_dead(&payload[..payload.len() - 1]).is_none());
        assert!(decode_dead(&payload[..3]).is_none());
        assert!(decode_dead(&[]).is_none());
    }

    #[test]
    fn the_same_key_at_the_same_upstream_gets_the_same_message_id() {
        let key = Key {
            mti: 400,
            terminal: *b"TERM0001",
            merchant: *b"MERCHANT 000001",
            stan: 9,
        };
        assert_eq!(dedup_id("bank", &key), dedup_id("bank", &key));
        assert_ne!(dedup_id("bank", &key), dedup_id("bank2", &key));
        assert_ne!(
            dedup_id("bank", &key),
            dedup_id("bank", &Key { stan: 10, ..key })
        );
    }
}
