//! One writer per merchant on the replicated journal (`journal.jetstream.lease_ttl_ms` > 0;
//! issue #20, design B of deploy/cluster/README.md, "Why optimistic appends (or leases)").
//!
//! - **The lease.** A key-value bucket (a stream of the shape async-nats' kv module creates:
//!   `KV_<stream>_LEASES`, subjects `$KV.<stream>_LEASES.m<hex merchant id>`, one message per
//!   key, `max_age` = the TTL) names each merchant's owner: the node id (random per process
//!   start). A node that needs a merchant without owner takes it (append with expected last
//!   subject sequence 0, so two takers cannot both succeed); owners renew every held lease
//!   every TTL/3 (expected sequence = the revision they hold); a node acts as owner only
//!   until 0.9 TTL after its last successful renewal was **sent**. A lease that is not
//!   renewed expires with its message (`max_age`), and the next node that needs the merchant
//!   takes it.
//! - **Take-over.** The new owner reads the merchant's events it has not applied
//!   ([`Replica::refresh`], bounded) before it decides, so its first append rarely conflicts.
//! - **Forwarding.** A decision (sale, refund, void, reversal) of a merchant owned elsewhere
//!   is sent to the owner by NATS request/reply on `<subject_prefix>_fwd.<node id>`: the
//!   ledger request in an owned, versioned encoding ([`encode_forward`]) and the clock
//!   reading of the node that received it; the owner decides it with [`Replica::decide_here`]
//!   (so the answer exists only once its event is stored on a quorum) and returns the
//!   decision with its DE54 figures; the receiving node renders and MACs the answer itself.
//!   "No responders", a timeout, "not owner" or the owner's lease expiring while the
//!   forwarder waits make it read the bucket again and retry until the request deadline,
//!   then answer 96. A retried request that the first
//!   owner did decide gets its stored answer (an identical retransmission, DOMAIN §6).
//! - **The fence stays.** Every append still names the merchant's expected last sequence: a
//!   holder whose lease lapsed while its append was in flight is refused by the stream, and
//!   decides again on the events it missed. Leases only make conflicts rare; the stream's
//!   check keeps the limits exact.
//! - Sign-ons, settlements, cut-overs and operators' changes are not forwarded: they are rare
//!   and append from the node that received them, guarded by the same expected-sequence
//!   check (a conflict with the owner costs one catch-up).
//!
//! A forwarded request carries the card number (DE2) in clear over the NATS connection (see
//! deploy/cluster/README.md); it is never logged and never stored by NATS (core
//! request/reply, no stream).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::jetstream::{is_conflict, ReplError, Replica, Settings};
use crate::ledger::{
    CardType, Decision, Dialect, Figures, Logged, MerchantId, Operation, OriginalRef, Reason,
    Request,
};
use crate::telemetry;

/// Version byte of the forwarded request's encoding.
const FORWARD_VERSION: u8 = 1;

/// Reply tags of a forward.
const R_APPLIED: u8 = 0;
const R_UNLOGGED: u8 = 1;
const R_NOT_OWNER: u8 = 2;
const R_FAILED: u8 = 3;
const R_BAD: u8 = 4;

/// Longest wait of one forward before the forwarder reads the bucket again (the owner's own
/// wait for the stream is `ack_timeout`; a hung owner does not hold the request longer).
fn forward_wait(ack_timeout: Duration) -> Duration {
    ack_timeout.saturating_mul(2) + Duration::from_millis(500)
}

/// A lease this node holds: the revision of its message in the bucket, and until when this
/// node may decide on it.
#[derive(Debug, Clone, Copy)]
struct Held {
    rev: u64,
    valid_until: Instant,
}

/// Counters of the leases (read by tests and the log).
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Leases this node took (a merchant without owner).
    pub taken: AtomicU64,
    /// Decisions this node sent to another node, owner of their merchant.
    pub forwarded: AtomicU64,
    /// Forwarded decisions this node decided as owner.
    pub served: AtomicU64,
    /// Forwards that found no owner there (no responders, timeout, "not owner").
    pub redirects: AtomicU64,
    /// Renewals refused because another node holds the lease now.
    pub lost: AtomicU64,
}

/// This node's leases: the bucket, what it holds, who owns what elsewhere, and its forward
/// subject.
pub struct Leases {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: stream::Stream,
    /// `$KV.<bucket>.`
    key_prefix: String,
    /// `<subject_prefix>_fwd.`: never matched by the event stream's `<subject_prefix>.>`.
    forward_prefix: String,
    /// This node's id in the bucket and in its forward subject.
    node: String,
    ttl: Duration,
    /// How long a decision may look for an owner (the gateway's request deadline).
    deadline: Duration,
    ack_timeout: Duration,
    held: Mutex<HashMap<MerchantId, Held>>,
    /// Owners read from the bucket (node id), until a forward to one fails.
    owners: Mutex<HashMap<MerchantId, String>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Counters.
    pub counters: LeaseCounters,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("node", &self.node)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The lease bucket's name for the stream `stream`.
pub fn lease_bucket(stream: &str) -> String {
    format!("{stream}_LEASES")
}

fn unavailable(e: impl std::fmt::Display) -> ReplError {
    ReplError::Unavailable(e.to_string())
}

impl Leases {
    /// Connects (one more NATS connection, for leases and forwards), creates the bucket when
    /// missing, starts the renewal and the forward server, and makes `replica` route its
    /// decisions through the leases. `deadline`: how long a decision may look for an owner.
    pub async fn start(
        replica: &Arc<Replica>,
        settings: &Settings,
        ttl: Duration,
        deadline: Duration,
    ) -> Result<Arc<Leases>, ReplError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(settings.ack_timeout.max(Duration::from_secs(1)))
            .request_timeout(Some(forward_wait(settings.ack_timeout)))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(settings.servers.as_slice())
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.ack_timeout);
        let bucket_name = lease_bucket(&settings.stream);
        let config = stream::Config {
            name: format!("KV_{bucket_name}"),
            subjects: vec![format!("$KV.{bucket_name}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            duplicate_window: ttl,
            num_replicas: settings.replicas.max(1),
            storage: stream::StorageType::File,
            allow_direct: true,
            allow_rollup: true,
            deny_delete: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let mut tries = 0;
        let bucket = loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::info!(error = %e, "waiting for the JetStream cluster (lease bucket)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        let node = format!("{:016x}", rand::random::<u64>());
        let forward_prefix = format!("{}_fwd.", settings.subject_prefix);
        let sub = client
            .subscribe(format!("{forward_prefix}{node}"))
            .await
            .map_err(unavailable)?;
        let leases = Arc::new(Leases {
            client,
            js,
            bucket,
            key_prefix: format!("$KV.{bucket_name}."),
            forward_prefix,
            node,
            ttl,
            deadline,
            ack_timeout: settings.ack_timeout,
            held: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            counters: LeaseCounters::default(),
        });
        let renew = tokio::spawn(Arc::clone(&leases).renew());
        let serve = tokio::spawn(Arc::clone(&leases).serve(Arc::clone(replica), sub));
        if let Ok(mut tasks) = leases.tasks.lock() {
            tasks.push(renew);
            tasks.push(serve);
        }
        replica.use_leases(Arc::clone(&leases));
        tracing::info!(
            node = leases.node,
            ttl_ms = ttl.as_millis() as u64,
            "one writer per merchant: leases on"
        );
        Ok(leases)
    }

    /// This node's id (the value of the leases it holds).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stops renewing and answering forwards (the leases held lapse; tests use it to play a
    /// node that stalls).
    pub fn stop(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }

    fn key(&self, m: &MerchantId) -> String {
        format!("{}m{}", self.key_prefix, hex::encode(m.as_str()))
    }

    /// Whether this node may decide for `m` now.
    pub fn owns(&self, m: &MerchantId) -> bool {
        let now = Instant::now();
        self.held
            .lock()
            .ok()
            .and_then(|h| h.get(m).copied())
            .is_some_and(|h| h.valid_until > now)
    }

    fn forget_owner(&self, m: &MerchantId) {
        if let Ok(mut o) = self.owners.lock() {
            o.remove(m);
        }
    }

    fn cached_owner(&self, m: &MerchantId) -> Option<String> {
        self.owners.lock().ok().and_then(|o| o.get(m).cloned())
    }

    /// Writes the lease of `m` naming this node if the key's last revision is `rev` (0: no
    /// lease); its new revision, `None` when another revision is there.
    async fn put(&self, m: &MerchantId, rev: u64) -> Result<Option<u64>, ReplError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(self.node.clone()))
            .expected_last_subject_sequence(rev);
        let ack = self.js.send_publish(self.key(m), publish).await;
        match async move { ack?.await }.await {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The owner of `m` in the bucket and the lease's revision (`None`: nobody holds it).
    pub async fn owner(&self, m: &MerchantId) -> Result<Option<(String, u64)>, ReplError> {
        match self.bucket.direct_get_last_for_subject(self.key(m)).await {
            Ok(msg) => Ok(Some((
                String::from_utf8_lossy(&msg.payload).into_owned(),
                msg.sequence,
            ))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Takes the lease of `m` if its last revision is `rev` (0: nobody holds it; else a
    /// revision naming this node), reads the merchant's events this node missed, and holds
    /// it. `false`: another node was first.
    async fn take(&self, replica: &Replica, m: &MerchantId, rev: u64) -> Result<bool, ReplError> {
        let sent = Instant::now();
        let Some(rev) = self.put(m, rev).await? else {
            return Ok(false);
        };
        if let Err(e) = replica.refresh(m.as_str()).await {
            // The fence still holds: the first append catches up if this one did not.
            tracing::debug!(error = %e, "catch-up on take-over failed");
        }
        if let Ok(mut held) = self.held.lock() {
            held.insert(
                *m,
                Held {
                    rev,
                    valid_until: sent + self.ttl.mul_f64(0.9),
                },
            );
        }
        self.forget_owner(m);
        self.counters.taken.fetch_add(1, Ordering::Relaxed);
        telemetry::count_replica("lease_taken");
        Ok(true)
    }

    /// Renews every lease held, every TTL/3 (all renewals sent, then their acknowledgements
    /// read), until stopped. A renewal refused means another node holds it now: dropped.
    async fn renew(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held: Vec<(MerchantId, u64)> = match self.held.lock() {
                Ok(h) => h.iter().map(|(m, l)| (*m, l.rev)).collect(),
                Err(_) => continue,
            };
            let sent = Instant::now();
            let mut acks = Vec::with_capacity(held.len());
            for (m, rev) in held {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(self.node.clone()))
                    .expected_last_subject_sequence(rev);
                acks.push((m, rev, self.js.send_publish(self.key(&m), publish).await));
            }
            for (m, rev, ack) in acks {
                let result = match ack {
                    Ok(a) => a.await,
                    Err(e) => Err(e),
                };
                let Ok(mut held) = self.held.lock() else {
                    continue;
                };
                // Only the revision renewed: a decision may have taken the lease back (a
                // newer revision) meanwhile.
                let current = held.get(&m).is_some_and(|l| l.rev == rev);
                match result {
                    Ok(a) => {
                        if let Some(l) = held.get_mut(&m).filter(|_| current) {
                            l.rev = a.sequence;
                            l.valid_until = sent + self.ttl.mul_f64(0.9);
                        }
                    }
                    Err(e) if is_conflict(&e) => {
                        if current {
                            held.remove(&m);
                        }
                        self.counters.lost.fetch_add(1, Ordering::Relaxed);
                        telemetry::count_replica("lease_lost");
                    }
                    // Unknown: kept; it lapses on its own unless a later renewal lands.
                    Err(e) => tracing::debug!(error = %e, "lease renewal without answer"),
                }
            }
        }
    }

    /// Answers the decisions other nodes forward to this one, until stopped.
    async fn serve(self: Arc<Self>, replica: Arc<Replica>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let me = Arc::clone(&self);
            let replica = Arc::clone(&replica);
            tokio::spawn(async move {
                let Some(reply) = msg.reply else { return };
                let answer = match decode_forward(&msg.payload) {
                    Some((req, now)) => me.decide_forwarded(&replica, &req, now).await,
                    None => vec![R_BAD],
                };
                if let Err(e) = me.client.publish(reply, answer.into()).await {
                    tracing::debug!(error = %e, "answer of a forwarded decision not sent");
                }
            });
        }
    }

    async fn decide_forwarded(
        &self,
        replica: &Arc<Replica>,
        req: &OwnedRequest,
        now: i64,
    ) -> Vec<u8> {
        let req = req.as_request();
        let owned = MerchantId::new(req.merchant).is_some_and(|m| self.owns(&m));
        if !owned {
            return vec![R_NOT_OWNER];
        }
        self.counters.served.fetch_add(1, Ordering::Relaxed);
        encode_reply(&replica.decide_here(&req, now).await)
    }

    /// Decides `req` at its merchant's owner: here when this node holds the lease (taking it
    /// when nobody does), else forwarded to the owner; retried on another owner until the
    /// request deadline, then 96 (`Unavailable`).
    pub async fn decide(
        &self,
        replica: &Arc<Replica>,
        req: &Request<'_>,
        now: i64,
    ) -> Logged<ReplError> {
        // A merchant id nobody configured takes no lease (the bucket and the renewals stay
        // bounded by the merchant file): the ledger refuses it here.
        let Some(m) = MerchantId::new(req.merchant).filter(|m| replica.serves(m)) else {
            return replica.decide_here(req, now).await;
        };
        let until = Instant::now() + self.deadline;
        let mut payload: Option<Bytes> = None;
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            pause = Duration::from_millis(20);
            if self.owns(&m) {
                return replica.decide_here(req, now).await;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                telemetry::count_replica("no_owner");
                return Logged::Failed(ReplError::Unavailable(
                    "no owner of the merchant's lease answered within the request deadline".into(),
                ));
            }
            let owner = match self.cached_owner(&m) {
                Some(o) => Some((o, 0)),
                None => match self.owner(&m).await {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::debug!(error = %e, "lease bucket unreadable; retrying");
                        continue;
                    }
                },
            };
            let owner = match owner {
                None => {
                    match self.take(replica, &m, 0).await {
                        Ok(true) => pause = Duration::ZERO,
                        Ok(false) => pause = Duration::from_millis(2),
                        Err(e) => tracing::debug!(error = %e, "lease not taken; retrying"),
                    }
                    continue;
                }
                Some((o, rev)) if o == self.node => {
                    // The bucket names this node, but its lease lapsed here (a renewal
                    // without answer): renewing that revision takes it back, unless another
                    // node took it meanwhile.
                    self.forget_owner(&m);
                    if rev != 0 && matches!(self.take(replica, &m, rev).await, Ok(true)) {
                        pause = Duration::ZERO;
                    }
                    continue;
                }
                Some((o, _)) => o,
            };
            if let Ok(mut owners) = self.owners.lock() {
                owners.insert(m, owner.clone());
            }
            let body = payload
                .get_or_insert_with(|| Bytes::from(encode_forward(req, now)))
                .clone();
            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            telemetry::count_replica("forwarded");
            let request = async_nats::Request::new()
                .payload(body)
                .timeout(Some(left.min(forward_wait(self.ack_timeout))));
            let subject = format!("{}{owner}", self.forward_prefix);
            // An owner killed after it received the request never answers: stop waiting once
            // the bucket no longer names it (its lease expired), and go to the next owner.
            let lapsed = async {
                loop {
                    tokio::time::sleep(self.ttl / 3).await;
                    match self.owner(&m).await {
                        Ok(Some((o, _))) if o == owner => {}
                        Err(_) => {}
                        Ok(_) => return,
                    }
                }
            };
            let answered = tokio::select! {
                r = self.client.send_request(subject, request) => Some(r),
                () = lapsed => None,
            };
            let Some(answered) = answered else {
                self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                self.forget_owner(&m);
                pause = Duration::ZERO;
                continue;
            };
            match answered {
                Ok(reply) => match decode_reply(&reply.payload) {
                    Some(Reply::Logged(logged)) => return logged,
                    Some(Reply::NotOwner) | None => {
                        self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                        self.forget_owner(&m);
                        pause = Duration::from_millis(5);
                    }
                },
                Err(e) => {
                    // No responders (the owner is gone) or no answer in time: read the
                    // bucket again (a retried request the owner did decide gets its stored
                    // answer).
                    tracing::debug!(error = %e, "forward to the merchant's owner failed");
                    self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                    self.forget_owner(&m);
                }
            }
        }
    }
}

// --- the forwarded request and its answer ------------------------------------------------

/// A ledger request owned (decoded from a forward). Its `Debug` is the request's (PAN
/// masked).
#[derive(Clone)]
pub struct OwnedRequest {
    dialect: Dialect,
    op: Operation,
    repeat: bool,
    merchant: String,
    terminal: String,
    stan: u32,
    local_date_mmdd: u16,
    mti_class: u8,
    transmission: Option<u64>,
    rrn: Option<String>,
    batch: Option<u32>,
    pan: String,
    amount_minor: u64,
    currency: u16,
    card_type: CardType,
    original: Option<OwnedOriginal>,
    body_fingerprint: u64,
}

impl std::fmt::Debug for OwnedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_request().fmt(f)
    }
}

#[derive(Clone)]
enum OwnedOriginal {
    Iso {
        mti: u16,
        stan: u32,
        transmission: u64,
        rrn: Option<String>,
    },
    Cup {
        batch: u32,
        trace: u32,
        date_mmdd: Option<u16>,
        rrn: Option<String>,
    },
}

impl OwnedRequest {
    /// The request, borrowed from this one.
    pub fn as_request(&self) -> Request<'_> {
        Request {
            dialect: self.dialect,
            op: self.op,
            repeat: self.repeat,
            merchant: &self.merchant,
            terminal: &self.terminal,
            stan: self.stan,
            local_date_mmdd: self.local_date_mmdd,
            mti_class: self.mti_class,
            transmission: self.transmission,
            rrn: self.rrn.as_deref(),
            batch: self.batch,
            pan: &self.pan,
            amount_minor: self.amount_minor,
            currency: self.currency,
            card_type: self.card_type,
            original: self.original.as_ref().map(|o| match o {
                OwnedOriginal::Iso {
                    mti,
                    stan,
                    transmission,
                    rrn,
                } => OriginalRef::Iso {
                    mti: *mti,
                    stan: *stan,
                    transmission: *transmission,
                    rrn: rrn.as_deref(),
                },
                OwnedOriginal::Cup {
                    batch,
                    trace,
                    date_mmdd,
                    rrn,
                } => OriginalRef::Cup {
                    batch: *batch,
                    trace: *trace,
                    date_mmdd: *date_mmdd,
                    rrn: rrn.as_deref(),
                },
            }),
            body_fingerprint: self.body_fingerprint,
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        let b = s.as_bytes();
        let len = u8::try_from(b.len()).unwrap_or(u8::MAX);
        self.u8(len);
        self.0.extend_from_slice(&b[..usize::from(len)]);
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
            None => self.u8(0),
        }
    }
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_be_bytes)
    }
    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    fn str(&mut self) -> Option<String> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?)
            .ok()
            .map(str::to_string)
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.bool()? {
            f(self).map(Some)
        } else {
            Some(None)
        }
    }
}

fn op_code(op: Operation) -> u8 {
    match op {
        Operation::Sale => 1,
        Operation::Refund => 2,
        Operation::Void => 3,
        Operation::Reversal => 4,
        Operation::Settlement => 5,
    }
}

fn op_of(v: u8) -> Option<Operation> {
    Some(match v {
        1 => Operation::Sale,
        2 => Operation::Refund,
        3 => Operation::Void,
        4 => Operation::Reversal,
        5 => Operation::Settlement,
        _ => return None,
    })
}

/// The bytes of a forwarded decision: version, the receiving node's clock reading (`now`,
/// Unix seconds) and every field of `req`, big endian, strings as a length byte and UTF-8.
pub fn encode_forward(req: &Request<'_>, now: i64) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(160));
    w.u8(FORWARD_VERSION);
    w.i64(now);
    w.u8(match req.dialect {
        Dialect::Ascii1987 => 0,
        Dialect::CupPos => 1,
    });
    w.u8(op_code(req.op));
    w.u8(u8::from(req.repeat));
    w.str(req.merchant);
    w.str(req.terminal);
    w.u32(req.stan);
    w.u16(req.local_date_mmdd);
    w.u8(req.mti_class);
    w.opt_u64(req.transmission);
    w.opt_str(req.rrn);
    w.opt_u64(req.batch.map(u64::from));
    w.str(req.pan);
    w.u64(req.amount_minor);
    w.u16(req.currency);
    w.u8(req.card_type.to_u8());
    match req.original {
        None => w.u8(0),
        Some(OriginalRef::Iso {
            mti,
            stan,
            transmission,
            rrn,
        }) => {
            w.u8(1);
            w.u16(mti);
            w.u32(stan);
            w.u64(transmission);
            w.opt_str(rrn);
        }
        Some(OriginalRef::Cup {
            batch,
            trace,
            date_mmdd,
            rrn,
        }) => {
            w.u8(2);
            w.u32(batch);
            w.u32(trace);
            w.opt_u64(date_mmdd.map(u64::from));
            w.opt_str(rrn);
        }
    }
    w.u64(req.body_fingerprint);
    w.0
}

/// What [`encode_forward`] wrote; `None` for anything else (another version, cut, bad tag).
pub fn decode_forward(bytes: &[u8]) -> Option<(OwnedRequest, i64)> {
    let mut r = Reader(bytes);
    if r.u8()? != FORWARD_VERSION {
        return None;
    }
    let now = r.i64()?;
    let dialect = match r.u8()? {
        0 => Dialect::Ascii1987,
        1 => Dialect::CupPos,
        _ => return None,
    };
    let op = op_of(r.u8()?)?;
    let repeat = r.bool()?;
    let merchant = r.str()?;
    let terminal = r.str()?;
    let stan = r.u32()?;
    let local_date_mmdd = r.u16()?;
    let mti_class = r.u8()?;
    let transmission = r.opt(Reader::u64)?;
    let rrn = r.opt(Reader::str)?;
    let batch = match r.opt(Reader::u64)? {
        Some(b) => Some(u32::try_from(b).ok()?),
        None => None,
    };
    let pan = r.str()?;
    let amount_minor = r.u64()?;
    let currency = r.u16()?;
    let card_type = CardType::from_u8(r.u8()?)?;
    let original = match r.u8()? {
        0 => None,
        1 => Some(OwnedOriginal::Iso {
            mti: r.u16()?,
            stan: r.u32()?,
            transmission: r.u64()?,
            rrn: r.opt(Reader::str)?,
        }),
        2 => Some(OwnedOriginal::Cup {
            batch: r.u32()?,
            trace: r.u32()?,
            date_mmdd: match r.opt(Reader::u64)? {
                Some(d) => Some(u16::try_from(d).ok()?),
                None => None,
            },
            rrn: r.opt(Reader::str)?,
        }),
        _ => return None,
    };
    let body_fingerprint = r.u64()?;
    if !r.0.is_empty() {
        return None;
    }
    Some((
        OwnedRequest {
            dialect,
            op,
            repeat,
            merchant,
            terminal,
            stan,
            local_date_mmdd,
            mti_class,
            transmission,
            rrn,
            batch,
            pan,
            amount_minor,
            currency,
            card_type,
            original,
            body_fingerprint,
        },
        now,
    ))
}

/// What an owner answered.
#[derive(Debug)]
enum Reply {
    Logged(Logged<ReplError>),
    NotOwner,
}

fn encode_decision(w: &mut Writer, d: &Decision) {
    w.u8(d.reason.to_u8());
    let f = &d.figures;
    w.u64(f.amount);
    w.u16(f.currency);
    for v in f.optionals() {
        w.opt_u64(v);
    }
}

fn decode_decision(r: &mut Reader<'_>) -> Option<Decision> {
    let reason = Reason::from_u8(r.u8()?)?;
    let amount = r.u64()?;
    let currency = r.u16()?;
    let figures = Figures {
        amount,
        currency,
        limit: r.opt(Reader::u64)?,
        used: r.opt(Reader::u64)?,
        remaining: r.opt(Reader::u64)?,
        window_days: match r.opt(Reader::u64)? {
            Some(d) => Some(u32::try_from(d).ok()?),
            None => None,
        },
        original_amount: r.opt(Reader::u64)?,
        original_remaining: r.opt(Reader::u64)?,
        day_allowance_remaining: r.opt(Reader::u64)?,
        would_pass: r.opt(Reader::u64)?,
        host_code: match r.opt(Reader::u64)? {
            Some(c) => Some(u16::try_from(c).ok()?),
            None => None,
        },
    };
    Some(Decision::new(reason, figures))
}

/// The owner's answer: the decision with its figures and the stream sequence it stands on,
/// or why there is none (the owner's append outcome unknown: the forwarder answers 96).
fn encode_reply(logged: &Logged<ReplError>) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(96));
    match logged {
        Logged::Applied { decision, seq } => {
            w.u8(R_APPLIED);
            w.u64(*seq);
            encode_decision(&mut w, decision);
        }
        Logged::Unlogged { decision, after } => {
            w.u8(R_UNLOGGED);
            w.u64(*after);
            encode_decision(&mut w, decision);
        }
        Logged::Failed(e) => {
            w.u8(R_FAILED);
            let text = e.to_string();
            w.str(&text[..text.len().min(200)]);
        }
    }
    w.0
}

fn decode_reply(bytes: &[u8]) -> Option<Reply> {
    let mut r = Reader(bytes);
    let reply = match r.u8()? {
        R_APPLIED => {
            let seq = r.u64()?;
            Reply::Logged(Logged::Applied {
                decision: decode_decision(&mut r)?,
                seq,
            })
        }
        R_UNLOGGED => {
            let after = r.u64()?;
            Reply::Logged(Logged::Unlogged {
                decision: decode_decision(&mut r)?,
                after,
            })
        }
        R_FAILED => Reply::Logged(Logged::Failed(ReplError::Unavailable(format!(
            "owner: {}",
            r.str()?
        )))),
        R_NOT_OWNER => Reply::NotOwner,
        // R_BAD: the owner could not read it (another version): another owner may.
        _ => return None,
    };
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refund() -> Request<'static> {
        let pan = "6212345678901232";
        Request {
            dialect: Dialect::CupPos,
            op: Operation::Refund,
            repeat: true,
            merchant: "MERCHANT 000001",
            terminal: "TERM0001",
            stan: 123_456,
            local_date_mmdd: 1231,
            mti_class: 2,
            transmission: Some(1_231_235_959),
            rrn: Some("000000000042"),
            batch: Some(7),
            pan,
            amount_minor: 12_345,
            currency: 156,
            card_type: CardType::from_pan(pan),
            original: Some(OriginalRef::Cup {
                batch: 6,
                trace: 99,
                date_mmdd: Some(1230),
                rrn: Some("000000000041"),
            }),
            body_fingerprint: 0xdead_beef_0123,
        }
    }

    #[test]
    fn a_forwarded_request_round_trips_and_damage_is_refused() {
        let req = refund();
        let bytes = encode_forward(&req, 1_790_000_000);
        let (owned, now) = decode_forward(&bytes).unwrap();
        assert_eq!(now, 1_790_000_000);
        assert_eq!(encode_forward(&owned.as_request(), now), bytes);
        let mut iso = refund();
        iso.original = Some(OriginalRef::Iso {
            mti: 200,
            stan: 5,
            transmission: 1_231_000_000,
            rrn: None,
        });
        iso.rrn = None;
        iso.batch = None;
        let bytes = encode_forward(&iso, 5);
        let (owned, _) = decode_forward(&bytes).unwrap();
        assert_eq!(encode_forward(&owned.as_request(), 5), bytes);
        for cut in 0..bytes.len() {
            assert!(decode_forward(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_forward(&longer).is_none());
        let mut other_version = bytes;
        other_version[0] = 2;
        assert!(decode_forward(&other_version).is_none());
    }

    #[test]
    fn an_owners_answer_round_trips_with_its_figures() {
        let figures = Figures {
            amount: 1_000,
            currency: 840,
            limit: Some(50_000),
            used: Some(10_000),
            remaining: Some(40_000),
            window_days: Some(180),
            original_amount: Some(10_000),
            original_remaining: Some(9_000),
            day_allowance_remaining: Some(39_000),
            would_pass: Some(9_000),
            host_code: None,
        };
        let d = Decision::new(Reason::APPROVED, figures);
        let bytes = encode_reply(&Logged::Applied {
            decision: d,
            seq: 77,
        });
        match decode_reply(&bytes) {
            Some(Reply::Logged(Logged::Applied { decision, seq })) => {
                assert_eq!((decision, seq), (d, 77));
            }
            other => panic!("{other:?}"),
        }
        for cut in 0..bytes.len() {
            assert!(decode_reply(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let failed = encode_reply(&Logged::Failed(ReplError::Unavailable("timeout".into())));
        assert!(matches!(
            decode_reply(&failed),
            Some(Reply::Logged(Logged::Failed(ReplError::Unavailable(_))))
        ));
        assert!(matches!(
            decode_reply(&[R_NOT_OWNER]),
            Some(Reply::NotOwner)
        ));
        assert!(decode_reply(&[R_BAD]).is_none());
    }
}
