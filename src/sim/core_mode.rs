//! `refundgate sim --core`: the deterministic simulation of the real gateway core (issue 17).
//!
//! One thread, one seed. Unlike the model mode of [`super::run`], nothing here imitates
//! `flow`: the terminals' requests are real ISO 8583 bytes (the ascii1987 spec encoder), given
//! in batches to the real [`Gateway::handle_batch`] on two links, decided by the real ledger,
//! journaled by the real [`Journal`] in its stepped mode ([`Options::stepped`]) over a
//! [`SimDisk`], and answered with bytes read back by the real decoder. The gateway's clock is
//! a [`ManualClock`] the seed moves (from 2026-01-31 across merchant-local days and a month).
//! The gateway runs inside a current-thread tokio runtime that this thread drives: each step
//! polls the batches until they wait for the journal, steps the journal (with the seed's
//! faults: failed syncs, torn writes, a full disk), and polls again until every batch is
//! answered. The request deadline is a day, so no timer fires: real time never enters a
//! decision. Crashes come at random steps, also between a batch's decision and its sync, and
//! between the sync and the answers leaving: the gateway, journal and runtime are dropped, the
//! disk loses what was not synced (or keeps part of it, the last write possibly torn), and the
//! gateway is started again the way `serve` starts it (`Journal::open`, snapshot restore and
//! replay through [`recover_ledger`], the startup policies journaled). Snapshots are written
//! at random durable points the way `serve`'s snapshot task writes them.
//!
//! Invariants, on the real stack:
//! - (b) at every durable point (nothing queued, the journal not holding after a failure),
//!   replay of the journal (the newest snapshot and the records after it, as a restart reads
//!   them) equals the live ledger byte for byte (snapshot encoding). Every snapshot was itself
//!   taken at such a point, so by induction this is replay from scratch;
//! - (c) a repeat (0201/0401) or identical retransmission of an acknowledged request gets the
//!   acknowledged DE39, DE44 and DE54, declines included, before and after crashes (after each
//!   restart a sample of the acknowledged answers is repeated at once), and journals nothing;
//!   another request reusing its key gets 94 and journals nothing;
//! - (a) no refund limit exceeded, recomputed from the acknowledged answers alone (per
//!   original: the sale; per merchant-local day: the amount and count caps; a refund any
//!   reversal was sent for is left out), and the ledger's own day usage never below those sums;
//! - (settle) a 0500 of a terminal that never sent a sign-on gets 03;
//! - (f) no panic, and every batch is answered (a batch that cannot finish is reported);
//! - (d) one reversal per request the host approved and the terminal was answered as failed
//!   (see `State::check_reversals`): at most one gateway-built reversal not marked as a
//!   repeat reaches the host, none for a request answered 00, and once the queue is empty each
//!   owed one has reversed its posting; after the last step the host heals and the queue must
//!   drain;
//! - (e) the funds equation of DOMAIN §4 on `Ledger::funds`, nothing reserved with every
//!   request answered, and the ledger's sales and refunds within what the answers allow.
//!
//! The upstream world (`src/sim/host.rs`): merchant 2 is routed to a bank host in process. The
//! real [`crate::upstream::Link`] reaches it through [`LinkConfig::connector`] over
//! `tokio::io::duplex` pipes, and the real [`StoreForward`] queue keeps its journal, stepped
//! by this driver, on a `SimDisk` of its own (crashed with the gateway). The runtime starts
//! with tokio's clock paused: link timeouts, backoffs and the host's delays are virtual, and
//! the runtime jumps to the next timer when everything waits. The driver looks at both
//! journals every `TICK` while batches wait and lets the world run 0–3 s after each step.
//! For a seed to replay bit for bit, nothing on this thread may depend on real time or on
//! unseeded randomness: backoff jitter comes from [`crate::clock::jitter`] (seeded here), the
//! upstream `select!`s are biased, a broken link fails its requests in key order, and the
//! gateway runs a stepped journal's rebuild and scrub inline.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;

use super::host::{self, Host, HostState, PostingKey, Weather, LINK_TIMEOUT_MS, UPSTREAM};
use super::{
    merchant_set, month_of, pan_key, transient, Failure, DAY_CAP, DAY_COUNT_CAP, MERCHANTS,
    OFFSET_S, PANS, REPEAT_HORIZON_S, T0, TERMINALS, TRACE_KEPT,
};
use crate::clock::{Clock, ManualClock};
use crate::flow::{recover_ledger, Gateway, Link, Outcome, Summary};
use crate::iso8583::{self, FieldList, Mti, Value, ASCII1987};
use crate::journal::{Durability, Journal, Options, SimDisk};
use crate::ledger::{AdminId, Ledger, LedgerEvent, MerchantSet, Reason};
use crate::upstream::{LinkConfig, Routes, SafOptions, StoreForward, Upstreams};

/// A bug to re-introduce, from the simulator's side, to show the invariants have teeth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CoreMutation {
    /// The gateway as built.
    #[default]
    None,
    /// Answers leave before the sync that makes their record durable: the journal runs with
    /// `Durability::UnsafeNoFsync` (acknowledged after the write alone).
    AckBeforeSync,
    /// The disk loses synced writes in a crash (a disk that lies about `fdatasync`): the
    /// simulator must notice that acknowledged answers were lost.
    LostSyncedWrites,
    /// Declines are applied in memory but not journaled (a switch in `flow`, compiled only
    /// with the test-only `sim-mutations` feature).
    #[cfg(feature = "sim-mutations")]
    DeclinesNotJournaled,
    /// A routed request whose host timed out keeps its reservation (a switch in `flow`,
    /// test builds only).
    #[cfg(feature = "sim-mutations")]
    HoldNotReleased,
    /// A routed request whose host timed out is answered 91 and never reversed (a switch in
    /// `upstream`, test builds only).
    #[cfg(feature = "sim-mutations")]
    ReversalNotQueued,
    /// Store-and-forward retries are not marked as repeats (0400 again): the host takes each
    /// for a new reversal (a switch in `Dialect::with_origin`, test builds only).
    #[cfg(feature = "sim-mutations")]
    RepeatsUnmarked,
}

/// What one core run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreReport {
    /// Steps run.
    pub steps: u32,
    /// Messages given to the gateway (repeats included).
    pub messages: u64,
    /// Batches given to `handle_batch`.
    pub batches: u64,
    /// Answers acknowledged to the terminals and remembered for repeats.
    pub acknowledged: u64,
    /// Approvals (00) among the answers.
    pub approved: u64,
    /// Answers 96 (the journal failed or was full).
    pub store_unavailable: u64,
    /// Crashes and restarts.
    pub crashes: u32,
    /// Of those, crashes between a batch's decisions and the answers leaving.
    pub crashes_mid_batch: u32,
    /// Restarts that restored a snapshot.
    pub snapshot_restores: u32,
    /// Snapshots written.
    pub snapshots: u32,
    /// Journal steps whose sync or write failed by injection.
    pub failed_steps: u32,
    /// Steps the disk was full.
    pub disk_full_steps: u32,
    /// Durable points checked by (b).
    pub durable_points: u32,
    /// Repeats and retransmissions checked against the acknowledged answer.
    pub repeats_checked: u64,
    /// Requests reusing an acknowledged request's key (checked: 94).
    pub key_reuses: u32,
    /// Bad messages sent.
    pub bad_messages: u32,
    /// Answers to requests of the merchant routed to the simulated host.
    pub routed: u64,
    /// Of those, answered 91 `HOST_TIMEOUT`.
    pub host_timeouts: u64,
    /// Requests the host approved and the terminal got a failure for: each owed one reversal.
    pub owed_reversals: u64,
    /// Reversals built by the gateway that reached the host (repeats included).
    pub reversals_at_host: u64,
    /// Of those, marked as repeats (0401).
    pub repeats_at_host: u64,
    /// Steps the host was not healthy (slow, silent, down, partitioned or flapping).
    pub host_fault_steps: u32,
    /// Connections the host accepted.
    pub host_connections: u64,
    /// (e) checks of the funds equation (per merchant and step).
    pub funds_checks: u64,
}

impl CoreReport {
    /// Adds the counts of another run (totals over seeds).
    pub fn add(&mut self, other: &CoreReport) {
        self.steps = self.steps.saturating_add(other.steps);
        self.messages = self.messages.saturating_add(other.messages);
        self.batches = self.batches.saturating_add(other.batches);
        self.acknowledged = self.acknowledged.saturating_add(other.acknowledged);
        self.approved = self.approved.saturating_add(other.approved);
        self.store_unavailable = self
            .store_unavailable
            .saturating_add(other.store_unavailable);
        self.crashes = self.crashes.saturating_add(other.crashes);
        self.crashes_mid_batch = self
            .crashes_mid_batch
            .saturating_add(other.crashes_mid_batch);
        self.snapshot_restores = self
            .snapshot_restores
            .saturating_add(other.snapshot_restores);
        self.snapshots = self.snapshots.saturating_add(other.snapshots);
        self.failed_steps = self.failed_steps.saturating_add(other.failed_steps);
        self.disk_full_steps = self.disk_full_steps.saturating_add(other.disk_full_steps);
        self.durable_points = self.durable_points.saturating_add(other.durable_points);
        self.repeats_checked = self.repeats_checked.saturating_add(other.repeats_checked);
        self.key_reuses = self.key_reuses.saturating_add(other.key_reuses);
        self.bad_messages = self.bad_messages.saturating_add(other.bad_messages);
        self.routed = self.routed.saturating_add(other.routed);
        self.host_timeouts = self.host_timeouts.saturating_add(other.host_timeouts);
        self.owed_reversals = self.owed_reversals.saturating_add(other.owed_reversals);
        self.reversals_at_host = self
            .reversals_at_host
            .saturating_add(other.reversals_at_host);
        self.repeats_at_host = self.repeats_at_host.saturating_add(other.repeats_at_host);
        self.host_fault_steps = self.host_fault_steps.saturating_add(other.host_fault_steps);
        self.host_connections = self.host_connections.saturating_add(other.host_connections);
        self.funds_checks = self.funds_checks.saturating_add(other.funds_checks);
    }
}

/// Where the journal lives on the simulated disk.
const ROOT: &str = "/sim";
const DIR: &str = "/sim/journal";
/// Small segments, so runs rotate and snapshots delete covered segments.
const SEGMENT_BYTES: u64 = 16 * 1024;
/// No timer may fire within a run: the deadline is far beyond any run's real duration.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(86_400);
/// A batch that cannot finish in this much time (virtual: tokio's clock is paused) is
/// reported (f).
const STUCK: std::time::Duration = std::time::Duration::from_secs(3_600);
/// How often (virtual time) the driver looks at the journals while it waits for the upstream
/// world: what the store-and-forward queue appended is stepped at the next look.
const TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the driver looks at the queue's journal between steps (nothing waits on it but
/// the queue's own bookkeeping).
const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(250);
/// The store-and-forward journal, on a disk of its own.
const SAF_ROOT: &str = "/saf";
const SAF_DIR: &str = "/saf/journal";
/// The merchant routed to the simulated host (the other is decided locally).
const ROUTED: usize = 1;
/// Longest the world runs (virtual) after the last step for the queue to drain.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(600);
/// Acknowledged answers repeated right after each restart.
const REPEATS_AFTER_RESTART: usize = 6;
/// One durable-point check in this many (on average) replays the journal afresh.
const FULL_REPLAY_EVERY: u64 = 16;

/// What a terminal sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sale,
    Refund,
    Void,
    Reversal,
    SignOn,
    Settle,
    Bad,
}

/// One request, as the terminal built it.
#[derive(Debug, Clone)]
struct Req {
    op: Op,
    merchant: usize,
    terminal: usize,
    stan: u32,
    /// DE7 MMDDhhmmss (UTC) and DE13 MMDD, DE12 hhmmss (merchant-local).
    de7: u64,
    mmdd: u16,
    hhmmss: u32,
    pan: &'static str,
    amount: u64,
    /// The request (index) this one names in DE90.
    original: Option<usize>,
    /// Bad messages: the bytes.
    raw: Option<Vec<u8>>,
}

/// DE39, DE44, DE54 of an answer as the terminal got them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Answer {
    de39: String,
    de44: String,
    de54: String,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.de39, self.de44)?;
        if !self.de54.is_empty() {
            write!(f, " [{}]", self.de54)?;
        }
        Ok(())
    }
}

/// An acknowledged answer.
#[derive(Debug, Clone)]
struct Ack {
    req: usize,
    at: i64,
    answer: Answer,
}

/// What the driver sends in one batch.
struct Batch {
    link: usize,
    /// (request index, repeat flag) per message.
    msgs: Vec<(usize, bool)>,
    bodies: Vec<Vec<u8>>,
    /// Check: a lone repeat, retransmission or key reuse of acknowledged `Ack`.
    check: Option<(Check, Ack)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Repeat,
    Retransmission,
    KeyReuse,
}

/// One life of the gateway: from a start to the next crash.
struct Life {
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
    journal: Arc<Journal>,
    /// The store-and-forward queue (its journal stepped by the driver).
    saf: Arc<StoreForward>,
}

type Answers = Vec<(Outcome, Summary)>;
type BatchFuture<'a> = Pin<Box<dyn Future<Output = Answers> + 'a>>;

/// Where a crash hits a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashAt {
    /// After the batches were decided, before the journal step.
    BeforeSync,
    /// After the journal step, before the answers leave.
    AfterSync,
}

/// How a step's batches ended.
enum Driven {
    Answered(Vec<Answers>),
    Crashed,
}

struct State {
    seed: u64,
    rng: u64,
    mutation: CoreMutation,
    merchants: MerchantSet,
    disk: SimDisk,
    clock: Arc<ManualClock>,
    step: u32,
    stan: u32,
    reqs: Vec<Req>,
    acked: Vec<Ack>,
    /// Approved sales, refunds/voids, reversals (request indexes).
    sales: Vec<usize>,
    debits: Vec<usize>,
    /// Originals some reversal was sent for.
    reversal_sent: HashSet<usize>,
    /// Sales whose reversal was sent first.
    future: Vec<usize>,
    /// (merchant, terminal) that ever sent a sign-on.
    signed_on: HashSet<(usize, usize)>,
    full_until: u32,
    /// The replay of the journal at the last durable point (b).
    shadow: Option<Shadow>,
    /// The bank host and the disk of the store-and-forward journal (kept across crashes).
    host: Host,
    saf_disk: SimDisk,
    tls: Arc<rustls::ClientConfig>,
    /// The first answer the terminal got to each routed sale, refund and void (DE39).
    routed_answers: BTreeMap<PostingKey, String>,
    /// The first answer (DE39) to each request, when one was read.
    first_answer: HashMap<usize, String>,
    trace: VecDeque<String>,
    report: CoreReport,
}

/// A ledger replayed from the journal, and the last seq it applied.
struct Shadow {
    ledger: Ledger,
    seq: u64,
}

/// Runs `steps` steps of seed `seed` on the real gateway core.
pub fn run_core(seed: u64, steps: u32, mutation: CoreMutation) -> Result<CoreReport, Failure> {
    let setup = |detail: String| Failure {
        seed,
        step: 0,
        invariant: "setup",
        detail,
        trace: Vec::new(),
    };
    let merchants = merchant_set().map_err(setup)?;
    let tls = crate::upstream::route::client_tls_trusting(&[]).map_err(setup)?;
    let mut state = State {
        seed,
        rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d | 1,
        mutation,
        merchants,
        disk: SimDisk::new(Path::new(ROOT), seed),
        clock: Arc::new(ManualClock::new(T0)),
        step: 0,
        stan: 0,
        reqs: Vec::new(),
        acked: Vec::new(),
        sales: Vec::new(),
        debits: Vec::new(),
        reversal_sent: HashSet::new(),
        future: Vec::new(),
        signed_on: HashSet::new(),
        full_until: 0,
        shadow: None,
        host: HostState::new(seed),
        saf_disk: SimDisk::new(Path::new(SAF_ROOT), seed ^ 0x5af),
        tls: Arc::new(tls),
        routed_answers: BTreeMap::new(),
        first_answer: HashMap::new(),
        trace: VecDeque::new(),
        report: CoreReport::default(),
    };
    let _switch = FlowMutation::on(mutation);
    let _jitter = SeededJitter::on(seed);
    let mut life = state.start().map_err(|e| state.fail("recovery", e))?;
    for step in 0..steps {
        state.step = step;
        life = state.one_step(life)?;
        state.report.steps = step + 1;
    }
    state.step = steps;
    state.drain(&life)?;
    Ok(state.report)
}

/// Reconnect and retry jitter of the links and the queue drawn from the seed on this thread
/// (so a seed reproduces its timings), the OS's randomness again when dropped.
struct SeededJitter;

impl SeededJitter {
    fn on(seed: u64) -> SeededJitter {
        crate::clock::seed_jitter(Some(seed));
        SeededJitter
    }
}

impl Drop for SeededJitter {
    fn drop(&mut self) {
        crate::clock::seed_jitter(None);
    }
}

/// Turns the flow-side mutation on for this thread, off again when dropped.
struct FlowMutation;

impl FlowMutation {
    fn on(mutation: CoreMutation) -> FlowMutation {
        #[cfg(feature = "sim-mutations")]
        {
            use super::switches::{set, Switch};
            set(match mutation {
                CoreMutation::DeclinesNotJournaled => Some(Switch::DeclinesNotJournaled),
                CoreMutation::HoldNotReleased => Some(Switch::HoldNotReleased),
                CoreMutation::ReversalNotQueued => Some(Switch::ReversalNotQueued),
                CoreMutation::RepeatsUnmarked => Some(Switch::RepeatsUnmarked),
                _ => None,
            });
        }
        let _ = mutation;
        FlowMutation
    }
}

impl Drop for FlowMutation {
    fn drop(&mut self) {
        #[cfg(feature = "sim-mutations")]
        super::switches::set(None);
    }
}

/// Polls every unfinished batch once; true once all are answered.
fn poll_all(
    futures: &mut [Option<BatchFuture<'_>>],
    answers: &mut [Option<Answers>],
    cx: &mut Context<'_>,
) -> bool {
    let mut all = true;
    for (slot, answer) in futures.iter_mut().zip(answers.iter_mut()) {
        if let Some(f) = slot {
            match f.as_mut().poll(cx) {
                Poll::Ready(out) => {
                    *answer = Some(out);
                    *slot = None;
                }
                Poll::Pending => all = false,
            }
        }
    }
    all
}

impl State {
    fn next(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    fn now(&self) -> i64 {
        self.clock.now_unix_s()
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_KEPT {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("#{} {line}", self.step));
    }

    fn fail(&self, invariant: &'static str, detail: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            invariant,
            detail,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    /// Starts the gateway on what the disk holds, as `serve::prepare` does.
    fn start(&mut self) -> Result<Life, String> {
        let options = Options {
            durability: match self.mutation {
                CoreMutation::AckBeforeSync => Durability::UnsafeNoFsync,
                _ => Durability::Fdatasync,
            },
            segment_bytes: SEGMENT_BYTES,
            storage: Arc::new(self.disk.clone()),
            stepped: true,
            ..Options::default()
        };
        let (journal, mut recovered) =
            Journal::open(DIR, options).map_err(|e| format!("journal open: {e}"))?;
        if recovered.snapshot().is_some() {
            self.report.snapshot_restores += 1;
        }
        let (ledger, replayed) = recover_ledger(&self.merchants, pan_key(), &mut recovered, None)?;
        let startup = AdminId::new("startup").unwrap_or_default();
        ledger
            .reload_logged(&self.merchants, startup, self.now(), |e| {
                let mut payload = Vec::with_capacity(128);
                e.encode(&mut payload);
                journal.enqueue(payload).map(|t| t.seq)
            })
            .map_err(|e| format!("startup policies: {e:?}"))?;
        self.note(format!(
            "start: {} records replayed, snapshot {}",
            replayed,
            recovered.snapshot().map_or(0, |s| s.seq)
        ));
        let journal = Arc::new(journal);
        let clock: Arc<dyn Clock> = self.clock.clone();
        // tokio's clock paused: the links' and the queue's timeouts, backoffs and the host's
        // delays are virtual, and the runtime jumps to the next timer when all else waits.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        // Inside the runtime: the queue dates its recovered entries by tokio's (paused) clock,
        // not by the real one it would read outside.
        let inside = runtime.enter();
        let saf = StoreForward::open_on(
            Path::new(SAF_DIR),
            SafOptions {
                max_retries: u32::MAX,
                expiry_s: 400 * 86_400,
                retry_min: std::time::Duration::from_millis(200),
                retry_max: std::time::Duration::from_secs(4),
                durability: Durability::Fdatasync,
            },
            Arc::clone(&clock),
            Options {
                storage: Arc::new(self.saf_disk.clone()),
                segment_bytes: SEGMENT_BYTES,
                stepped: true,
                ..Options::default()
            },
        )
        .map_err(|e| format!("store-and-forward open: {e}"))?;
        let saf = Arc::new(saf);
        let link = LinkConfig {
            name: Arc::from(UPSTREAM),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 9))],
            dialect: &crate::dialect::ASCII1987,
            mac: None,
            framing: crate::frame::Framing::Binary2,
            tls: Arc::clone(&self.tls),
            server_name: None,
            timeout: std::time::Duration::from_millis(LINK_TIMEOUT_MS),
            write_timeout: std::time::Duration::from_millis(LINK_TIMEOUT_MS),
            read_timeout: std::time::Duration::from_millis(2 * LINK_TIMEOUT_MS),
            max_pending: 16,
            echo_interval: std::time::Duration::from_secs(10),
            reconnect_min: std::time::Duration::from_millis(100),
            reconnect_max: std::time::Duration::from_secs(2),
            clock: Arc::clone(&clock),
            connector: Some(host::connector(Arc::clone(&self.host))),
        };
        let upstreams = Upstreams::start(
            vec![link],
            Routes::new([(MERCHANTS[ROUTED], UPSTREAM)], None),
            Arc::clone(&saf),
        );
        drop(inside);
        let gateway = Gateway::new(
            Arc::new(ledger),
            Some(Arc::clone(&journal)),
            clock,
            vec![
                Link::plain(&crate::dialect::ASCII1987),
                Link::plain(&crate::dialect::ASCII1987),
            ],
        )
        .with_request_deadline(DEADLINE)
        .with_upstreams(Arc::new(upstreams));
        Ok(Life {
            runtime,
            gateway,
            journal,
            saf,
        })
    }

    fn one_step(&mut self, life: Life) -> Result<Life, Failure> {
        let dt = self.next(90) as i64;
        self.clock.advance(dt);
        if self.next(60) == 0 {
            self.clock.advance(5 * 3600);
        }
        if self.next(120) == 0 {
            self.full_until = self.step + 1 + self.next(8) as u32;
            self.note(format!("disk full until #{}", self.full_until));
        }
        let full = self.step < self.full_until;
        self.disk.set_full(full);
        if full {
            self.report.disk_full_steps += 1;
        }
        self.weather();
        let crash = match self.next(100) {
            0 => Some(Some(CrashAt::BeforeSync)),
            1 => Some(Some(CrashAt::AfterSync)),
            2 => Some(None),
            _ => None,
        };
        let batches = self.batches();
        let held = life.journal.is_held();
        let crash_at = match crash {
            Some(Some(at)) if !held => Some(at),
            _ => None,
        };
        let seq_before = life.journal.last_ticket().seq;
        let driven = self.drive(&life, &batches, crash_at)?;
        match driven {
            Driven::Crashed => {
                self.report.crashes_mid_batch += 1;
                return self.crash(life, "mid-batch");
            }
            Driven::Answered(answers) => {
                for (batch, out) in batches.iter().zip(answers) {
                    self.answered(&life, batch, out, seq_before)?;
                }
            }
        }
        // The upstream world runs on: late answers, reconnects, the queue's deliveries.
        let idle = std::time::Duration::from_millis(self.next(3_000));
        self.idle(&life, idle, false);
        self.check_limits(&life)?;
        self.check_funds(&life)?;
        self.check_reversals(&life, false)?;
        if !life.journal.is_held() && life.journal.queued() == 0 {
            self.check_durable(&life)?;
            if self.next(8) == 0 {
                self.snapshot(&life);
            }
        }
        if crash == Some(None) || (crash.is_some() && crash_at.is_none()) {
            return self.crash(life, "between steps");
        }
        Ok(life)
    }

    /// Gives the step's batches to the gateway, steps the journal, and collects the answers
    /// (or crashes at `crash_at`).
    fn drive(
        &mut self,
        life: &Life,
        batches: &[Batch],
        crash_at: Option<CrashAt>,
    ) -> Result<Driven, Failure> {
        let gateway = &life.gateway;
        let journal = &life.journal;
        let mut futures: Vec<Option<BatchFuture<'_>>> = batches
            .iter()
            .map(|b| {
                let f: BatchFuture<'_> = Box::pin(async move {
                    let mut out = Vec::with_capacity(b.bodies.len());
                    gateway.handle_batch(b.link, &b.bodies, &mut out).await;
                    out
                });
                Some(f)
            })
            .collect();
        let mut answers: Vec<Option<Answers>> = batches.iter().map(|_| None).collect();
        self.report.batches += batches.len() as u64;
        self.report.messages += batches.iter().map(|b| b.bodies.len() as u64).sum::<u64>();
        let saf = life.saf.journal();
        let outcome = life.runtime.block_on(async {
            let mut synced_once = false;
            let started = tokio::time::Instant::now();
            loop {
                // Every batch decides (forwarding routed requests), enqueues, then waits for
                // the journal, the host or the queue.
                let done = std::future::poll_fn(|cx| {
                    Poll::Ready(poll_all(&mut futures, &mut answers, cx))
                })
                .await;
                if done {
                    return Ok(true);
                }
                if journal.queued() > 0 {
                    if crash_at == Some(CrashAt::BeforeSync) {
                        return Ok(false);
                    }
                    self.inject_faults();
                    let held_before = journal.is_held();
                    let taken = journal.step();
                    let failed = !held_before && journal.is_held();
                    self.note(format!(
                        "journal step: {taken} records{}",
                        if failed { ", failed" } else { "" }
                    ));
                    if failed {
                        self.report.failed_steps += 1;
                    }
                    if crash_at == Some(CrashAt::AfterSync) && !synced_once {
                        return Ok(false);
                    }
                    synced_once = true;
                    continue;
                }
                if saf.queued() > 0 {
                    // A reversal queued before its terminal's 91, or a delivery recorded.
                    saf.step();
                    continue;
                }
                // Waiting for the host: virtual time moves, the journals are looked at again
                // every tick. (A stepped journal's rebuild and scrub after a failure run
                // inline, on this thread.)
                if started.elapsed() > STUCK {
                    return Err(started.elapsed());
                }
                tokio::time::sleep(TICK).await;
            }
        });
        drop(futures);
        match outcome {
            Ok(true) => Ok(Driven::Answered(answers.into_iter().flatten().collect())),
            Ok(false) => Ok(Driven::Crashed),
            Err(waited) => Err(self.fail(
                "f (stuck)",
                format!("a batch was not answered after {waited:?} (virtual)"),
            )),
        }
    }

    /// The seed's faults for the next journal step.
    fn inject_faults(&mut self) {
        match self.next(40) {
            0 => {
                let n = 1 + self.next(2) as u32;
                self.disk.fail_next_syncs(n);
            }
            1 => self.disk.tear_next_writes(1),
            _ => {}
        }
    }

    /// Builds this step's batches: 1..=3 batches of new requests, or a lone check.
    fn batches(&mut self) -> Vec<Batch> {
        if self.next(4) == 0 {
            if let Some(b) = self.check_batch() {
                return vec![b];
            }
        }
        let n = 1 + self.next(3) as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = 1 + self.next(3) as usize;
            let mut msgs = Vec::with_capacity(k);
            for _ in 0..k {
                let idx = self.new_request();
                msgs.push((idx, false));
            }
            let bodies = msgs.iter().map(|&(i, r)| self.encode(i, r)).collect();
            out.push(Batch {
                link: self.next(2) as usize,
                msgs,
                bodies,
                check: None,
            });
        }
        out
    }

    /// A repeat, identical retransmission or key reuse of a recent acknowledged answer.
    fn check_batch(&mut self) -> Option<Batch> {
        let ack = self.recent_ack()?;
        let has_amount = self.reqs[ack.req].op != Op::Settle;
        let check = match self.next(4) {
            0 => Check::Retransmission,
            1 if has_amount => Check::KeyReuse,
            _ => Check::Repeat,
        };
        Some(self.check_of(ack, check))
    }

    fn check_of(&mut self, ack: Ack, check: Check) -> Batch {
        let (idx, repeat) = match check {
            Check::Repeat => (ack.req, true),
            Check::Retransmission => (ack.req, false),
            Check::KeyReuse => {
                let mut other = self.reqs[ack.req].clone();
                other.amount += 1;
                self.reqs.push(other);
                (self.reqs.len() - 1, false)
            }
        };
        let body = self.encode(idx, repeat);
        Batch {
            link: self.next(2) as usize,
            msgs: vec![(idx, repeat)],
            bodies: vec![body],
            check: Some((check, ack)),
        }
    }

    fn recent_ack(&mut self) -> Option<Ack> {
        let now = self.now();
        let recent = self
            .acked
            .iter()
            .rev()
            .take_while(|a| now - a.at < REPEAT_HORIZON_S)
            .count();
        if recent == 0 {
            return None;
        }
        let pick = self.acked.len() - 1 - self.next(recent as u64) as usize;
        Some(self.acked[pick].clone())
    }

    fn new_req(&mut self, op: Op, merchant: usize) -> Req {
        self.stan = self.stan % 999_998 + 1;
        let now = self.now();
        let local = now + OFFSET_S;
        let secs = local.rem_euclid(86_400);
        let hhmmss = (secs / 3600 * 10_000 + secs % 3600 / 60 * 100 + secs % 60) as u32;
        let utc = now.rem_euclid(86_400);
        let utc_hhmmss = (utc / 3600 * 10_000 + utc % 3600 / 60 * 100 + utc % 60) as u64;
        Req {
            op,
            merchant,
            terminal: self.next(2) as usize,
            stan: self.stan,
            de7: u64::from(crate::clock::mmdd_of(now)) * 1_000_000 + utc_hhmmss,
            mmdd: crate::clock::mmdd_of(local),
            hhmmss,
            pan: PANS[self.next(3) as usize],
            amount: 1 + self.next(30_000),
            original: None,
            raw: None,
        }
    }

    fn push(&mut self, r: Req) -> usize {
        self.reqs.push(r);
        self.reqs.len() - 1
    }

    /// A new request of the workload; returns its index.
    fn new_request(&mut self) -> usize {
        match self.next(100) {
            0..=29 => self.sale(),
            30..=54 => self.child(Op::Refund),
            55..=59 => self.child(Op::Void),
            60..=71 => self.reversal(),
            72..=77 => self.bad(),
            78..=83 => {
                let (m, t) = (self.next(2) as usize, self.next(2) as usize);
                let mut r = self.new_req(Op::SignOn, m);
                r.terminal = t;
                self.signed_on.insert((m, t));
                self.push(r)
            }
            84..=89 => {
                let m = self.next(2) as usize;
                let r = self.new_req(Op::Settle, m);
                self.push(r)
            }
            _ => self.sale(),
        }
    }

    fn sale(&mut self) -> usize {
        if !self.future.is_empty() && self.next(3) == 0 {
            // A sale whose reversal overtook it.
            return self.future.remove(0);
        }
        let r = self.new_sale();
        self.push(r)
    }

    fn new_sale(&mut self) -> Req {
        let m = self.next(2) as usize;
        let mut r = self.new_req(Op::Sale, m);
        r.amount = 1_000 + self.next(29_000);
        r
    }

    /// A refund, void or reversal of an approved sale.
    fn child(&mut self, op: Op) -> usize {
        if self.sales.is_empty() {
            return self.sale();
        }
        let at = self.next(self.sales.len() as u64) as usize;
        let pick = self.sales[at];
        self.child_of(op, pick)
    }

    fn child_of(&mut self, op: Op, pick: usize) -> usize {
        let original = self.reqs[pick].clone();
        let mut r = self.new_req(op, original.merchant);
        r.terminal = original.terminal;
        r.pan = original.pan;
        r.original = Some(pick);
        r.amount = match op {
            Op::Refund => 1 + self.next(original.amount + original.amount / 4),
            _ => original.amount,
        };
        if op == Op::Reversal {
            self.reversal_sent.insert(pick);
        }
        self.push(r)
    }

    fn reversal(&mut self) -> usize {
        match self.next(4) {
            0 if self.future.len() < 8 => {
                // Reordered: the reversal of a sale arrives before the sale.
                let sale = self.new_sale();
                let s = self.push(sale);
                self.future.push(s);
                self.child_of(Op::Reversal, s)
            }
            1 if !self.debits.is_empty() => {
                let at = self.next(self.debits.len() as u64) as usize;
                let pick = self.debits[at];
                self.child_of(Op::Reversal, pick)
            }
            _ => self.child(Op::Reversal),
        }
    }

    fn bad(&mut self) -> usize {
        self.report.bad_messages += 1;
        let m = self.next(2) as usize;
        let mut r = self.new_req(Op::Bad, m);
        let mut bytes = self.encode_req(
            &Req {
                op: Op::Sale,
                ..r.clone()
            },
            false,
        );
        match self.next(3) {
            0 => bytes.truncate(self.next(bytes.len() as u64) as usize),
            1 => {
                let at = self.next(bytes.len() as u64) as usize;
                if let Some(b) = bytes.get_mut(at) {
                    *b = self.next(256) as u8;
                }
            }
            _ => {
                let n = self.next(40) as usize;
                bytes = (0..n).map(|_| self.next(256) as u8).collect();
            }
        }
        r.raw = Some(bytes);
        self.push(r)
    }

    fn encode(&mut self, idx: usize, repeat: bool) -> Vec<u8> {
        let r = self.reqs[idx].clone();
        match &r.raw {
            Some(raw) => raw.clone(),
            None => self.encode_req(&r, repeat),
        }
    }

    /// The request's bytes through the real ascii1987 encoder.
    fn encode_req(&self, r: &Req, repeat: bool) -> Vec<u8> {
        let de7 = format!("{:010}", r.de7);
        let stan = format!("{:06}", r.stan);
        let hhmmss = format!("{:06}", r.hhmmss);
        let mmdd = format!("{:04}", r.mmdd);
        let amount = format!("{:012}", r.amount);
        let de90 = r.original.map(|o| {
            let o = &self.reqs[o];
            format!("0200{:06}{:010}{:022}", o.stan, o.de7, 0)
        });
        let pc = match (r.op, r.original.map(|o| self.reqs[o].op)) {
            (Op::Refund, _) | (Op::Reversal, Some(Op::Refund)) => "200000",
            (Op::Void, _) | (Op::Reversal, Some(Op::Void)) => "020000",
            _ => "000000",
        };
        let mti = match r.op {
            Op::Reversal => 400,
            Op::SignOn => 800,
            Op::Settle => 500,
            _ => 200,
        } + u16::from(repeat);
        let mut fields: Vec<(u8, &[u8])> = Vec::with_capacity(16);
        let card = matches!(r.op, Op::Sale | Op::Refund | Op::Void | Op::Reversal);
        if card {
            fields.push((2, r.pan.as_bytes()));
            fields.push((3, pc.as_bytes()));
            fields.push((4, amount.as_bytes()));
        }
        fields.push((7, de7.as_bytes()));
        fields.push((11, stan.as_bytes()));
        if card {
            fields.push((12, hhmmss.as_bytes()));
            fields.push((13, mmdd.as_bytes()));
            fields.push((22, b"051"));
            fields.push((25, b"00"));
        }
        fields.push((41, TERMINALS[r.terminal].as_bytes()));
        fields.push((42, MERCHANTS[r.merchant].as_bytes()));
        if card {
            fields.push((49, b"840"));
        }
        if r.op == Op::SignOn {
            fields.push((70, b"001"));
        }
        if let Some(de90) = &de90 {
            fields.push((90, de90.as_bytes()));
        }
        let mut list: FieldList<'_, 24> = FieldList::new();
        for (n, v) in fields {
            let _ = list.set(n, Value::Text(v));
        }
        let mut out = BytesMut::with_capacity(256);
        // Our own fields within the spec: an encoding error would show as a 30 answer.
        let _ = iso8583::encode(&ASCII1987, Mti(mti), list.as_slice(), &mut out);
        out.to_vec()
    }

    fn describe(&self, idx: usize, repeat: bool) -> String {
        let r = &self.reqs[idx];
        format!(
            "{:?} m{} t{} stan {} amount {}{}{}",
            r.op,
            r.merchant,
            r.terminal,
            r.stan,
            r.amount,
            r.original
                .map_or(String::new(), |o| format!(" of stan {}", self.reqs[o].stan)),
            if repeat { " (repeat)" } else { "" }
        )
    }

    /// Reads the answers of one batch and checks what can be checked at once.
    fn answered(
        &mut self,
        life: &Life,
        batch: &Batch,
        out: Answers,
        seq_before: u64,
    ) -> Result<(), Failure> {
        if out.len() != batch.msgs.len() {
            return Err(self.fail(
                "f",
                format!("{} answers for {} messages", out.len(), batch.msgs.len()),
            ));
        }
        for (&(idx, repeat), (outcome, summary)) in batch.msgs.iter().zip(out) {
            let answer = match outcome {
                Outcome::Drop => {
                    self.note(format!("{} -> dropped", self.describe(idx, repeat)));
                    if self.reqs[idx].op != Op::Bad {
                        return Err(
                            self.fail("f", format!("{} was dropped", self.describe(idx, repeat)))
                        );
                    }
                    continue;
                }
                Outcome::Reply(bytes) => match decode_answer(&bytes) {
                    Some(a) => a,
                    None => {
                        return Err(self.fail(
                            "f",
                            format!(
                                "answer to {} does not decode ({:?})",
                                self.describe(idx, repeat),
                                summary.code
                            ),
                        ))
                    }
                },
            };
            self.note(format!("{} -> {answer}", self.describe(idx, repeat)));
            if answer.de44 == Reason::STORE_UNAVAILABLE.as_str() {
                self.report.store_unavailable += 1;
            }
            if answer.de39 == "00" {
                self.report.approved += 1;
            }
            if batch.check.is_none() {
                self.first_answer
                    .entry(idx)
                    .or_insert_with(|| answer.de39.clone());
                let r = &self.reqs[idx];
                if r.merchant == ROUTED && matches!(r.op, Op::Sale | Op::Refund | Op::Void) {
                    self.report.routed += 1;
                    if answer.de44 == Reason::HOST_TIMEOUT.as_str() {
                        self.report.host_timeouts += 1;
                    }
                    let key = (
                        TERMINALS[r.terminal].to_string(),
                        MERCHANTS[r.merchant].to_string(),
                        r.stan,
                        format!("{:010}", r.de7),
                        format!("{:04}", r.mmdd),
                    );
                    self.routed_answers
                        .entry(key)
                        .or_insert_with(|| answer.de39.clone());
                } else if r.op == Op::Bad && answer.de39 == "00" {
                    // Damaged bytes the gateway approved were forwarded under the keys it
                    // read from them, which may be another request's: that key's posting
                    // is theirs, answered 00. Also when that request was answered 91 or 96
                    // before: those are not stored, so the key was decided again, and what
                    // the host holds under it was answered 00 (seed 40009).
                    if let Some(key) = r.raw.as_deref().and_then(routed_key_of) {
                        let code = self.routed_answers.entry(key).or_default();
                        if code.is_empty() || is_transient_code(code) {
                            *code = answer.de39.clone();
                        }
                    }
                }
            }
            match &batch.check {
                Some((check, ack)) => self.check_answer(life, *check, ack, &answer, seq_before)?,
                None => self.acknowledge(idx, answer)?,
            }
        }
        Ok(())
    }

    fn acknowledge(&mut self, idx: usize, answer: Answer) -> Result<(), Failure> {
        let r = self.reqs[idx].clone();
        if matches!(r.op, Op::Bad | Op::SignOn) {
            // Bad bytes are not stored; a sign-on is decided again each time.
            return Ok(());
        }
        if r.op == Op::Settle
            && !self.signed_on.contains(&(r.merchant, r.terminal))
            && answer.de44 != Reason::STORE_UNAVAILABLE.as_str()
            && answer.de44 != Reason::UNKNOWN_TERMINAL.as_str()
        {
            return Err(self.fail(
                "settle",
                format!(
                    "{} from a terminal that never signed on answered {answer}",
                    self.describe(idx, false)
                ),
            ));
        }
        if answer.de39 == "00" {
            match r.op {
                Op::Sale => self.sales.push(idx),
                Op::Refund | Op::Void => self.debits.push(idx),
                _ => {}
            }
        }
        if !is_transient(&answer.de44) {
            self.report.acknowledged += 1;
            self.acked.push(Ack {
                req: idx,
                at: self.now(),
                answer,
            });
        }
        Ok(())
    }

    /// (c): a lone repeat or retransmission gets the acknowledged answer, a key reuse 94,
    /// and neither journals anything.
    fn check_answer(
        &mut self,
        life: &Life,
        check: Check,
        ack: &Ack,
        answer: &Answer,
        seq_before: u64,
    ) -> Result<(), Failure> {
        if answer.de44 == Reason::STORE_UNAVAILABLE.as_str() {
            return Ok(());
        }
        let seq_after = life.journal.last_ticket().seq;
        let what = match check {
            Check::Repeat => "repeat",
            Check::Retransmission => "retransmission",
            Check::KeyReuse => "key reuse",
        };
        if seq_after > seq_before {
            return Err(self.fail(
                "c",
                format!(
                    "a {what} of {} (acknowledged {}) journaled {} records: it was decided again",
                    self.describe(ack.req, false),
                    ack.answer,
                    seq_after - seq_before
                ),
            ));
        }
        if check == Check::KeyReuse {
            self.report.key_reuses += 1;
            if answer.de44 != Reason::DUPLICATE.as_str() {
                return Err(self.fail(
                    "c (key reused)",
                    format!(
                        "a request reusing the key of {} got {answer}",
                        self.describe(ack.req, false)
                    ),
                ));
            }
            return Ok(());
        }
        self.report.repeats_checked += 1;
        if *answer != ack.answer {
            return Err(self.fail(
                "c",
                format!(
                    "{what} of {} answered {answer}, acknowledged {}",
                    self.describe(ack.req, false),
                    ack.answer
                ),
            ));
        }
        Ok(())
    }

    /// (b): replay of the journal equals the live ledger. The replay is kept between
    /// durable points and brought forward with the records that became durable since (the
    /// records up to a durable seq never change); every [`FULL_REPLAY_EVERY`]th check, and
    /// the first after each start, replays the journal afresh the way a restart does.
    fn check_durable(&mut self, life: &Life) -> Result<(), Failure> {
        const B: &str = "b (durable point)";
        self.report.durable_points += 1;
        let mut recovered = life
            .journal
            .reread()
            .map_err(|e| self.fail(B, format!("reread: {e}")))?;
        let durable = life.journal.durable_seq();
        let full = self.next(FULL_REPLAY_EVERY) == 0;
        let shadow = match self.shadow.take() {
            Some(mut shadow) if !full => {
                let mut bad = None;
                recovered
                    .replay(|seq, payload| {
                        if seq <= shadow.seq || bad.is_some() {
                            return;
                        }
                        match LedgerEvent::decode(payload) {
                            // As `recover_ledger`: an event of a merchant no longer
                            // configured is skipped.
                            Ok(event) => {
                                let _ = shadow.ledger.apply(&event);
                            }
                            Err(e) => bad = Some(format!("record {seq}: {e}")),
                        }
                        shadow.seq = seq;
                    })
                    .map_err(|e| self.fail(B, format!("replay: {e}")))?;
                if let Some(bad) = bad {
                    return Err(self.fail(B, bad));
                }
                shadow
            }
            _ => {
                let (ledger, _) = recover_ledger(&self.merchants, pan_key(), &mut recovered, None)
                    .map_err(|e| self.fail(B, format!("replay: {e}")))?;
                Shadow {
                    ledger,
                    seq: durable,
                }
            }
        };
        let mut from_journal = Vec::new();
        shadow.ledger.snapshot(&mut from_journal);
        let mut live = Vec::new();
        life.gateway.ledger().snapshot(&mut live);
        let seq = shadow.seq;
        self.shadow = Some(shadow);
        if seq != durable || from_journal != live {
            return Err(self.fail(
                B,
                format!(
                    "replay of the journal to seq {seq} ({} bytes) differs from the live ledger ({} bytes) at durable seq {durable}",
                    from_journal.len(),
                    live.len(),
                ),
            ));
        }
        Ok(())
    }

    /// A snapshot written the way `serve`'s snapshot task writes it.
    fn snapshot(&mut self, life: &Life) {
        let journal = &life.journal;
        let gateway = &life.gateway;
        let taken = life.runtime.block_on(async {
            let (ticket, bytes) = gateway.snapshot().await?;
            journal.is_durable(ticket).then_some((ticket.seq, bytes))
        });
        let Some((seq, bytes)) = taken else {
            return;
        };
        match journal.snapshot(seq, &bytes) {
            Ok(_) => {
                self.report.snapshots += 1;
                self.note(format!("snapshot at seq {seq}"));
            }
            Err(e) => self.note(format!("snapshot at seq {seq} failed: {e}")),
        }
    }

    /// kill -9 and power loss; then a start as `serve` does, and repeats of a sample of the
    /// acknowledged answers.
    fn crash(&mut self, life: Life, when: &str) -> Result<Life, Failure> {
        self.report.crashes += 1;
        drop(life);
        self.shadow = None;
        let keep = self.next(2) == 0;
        if self.mutation == CoreMutation::LostSyncedWrites {
            self.disk.lose_synced_tail();
        }
        self.disk.crash(keep);
        self.saf_disk.crash(keep);
        self.full_until = 0;
        self.note(format!(
            "crash {when}{}",
            if keep {
                ", some unsynced writes kept"
            } else {
                ""
            }
        ));
        let life = self.start().map_err(|e| self.fail("recovery", e))?;
        // The newest acknowledged answers (those a lost sync would take), then a sample.
        let now = self.now();
        let mut picks: Vec<Ack> = self
            .acked
            .iter()
            .rev()
            .take_while(|a| now - a.at < REPEAT_HORIZON_S)
            .take(REPEATS_AFTER_RESTART)
            .cloned()
            .collect();
        for _ in 0..REPEATS_AFTER_RESTART / 2 {
            picks.extend(self.recent_ack());
        }
        for ack in picks {
            let check = if self.next(3) == 0 {
                Check::Retransmission
            } else {
                Check::Repeat
            };
            let batch = self.check_of(ack, check);
            let seq_before = life.journal.last_ticket().seq;
            if let Driven::Answered(mut answers) =
                self.drive(&life, std::slice::from_ref(&batch), None)?
            {
                let out = answers.pop().unwrap_or_default();
                self.answered(&life, &batch, out, seq_before)?;
            }
        }
        Ok(life)
    }

    /// The seed's weather between the gateway and its host.
    fn weather(&mut self) {
        if self.next(10) == 0 {
            let weather = match self.next(10) {
                0..=3 => Weather::Healthy,
                4 | 5 => Weather::Slow,
                6 => Weather::Silent,
                7 => Weather::Down,
                8 => Weather::Partitioned,
                _ => Weather::Flapping,
            };
            host::lock(&self.host).weather = weather;
            self.note(format!("host {weather:?}"));
        }
        if host::lock(&self.host).weather != Weather::Healthy {
            self.report.host_fault_steps += 1;
        }
    }

    /// Lets the upstream world run for `duration` of virtual time (or, `drain`, until the
    /// queue is empty, at most that long), stepping the queue's journal at each look.
    fn idle(&self, life: &Life, duration: std::time::Duration, drain: bool) {
        let saf = &life.saf;
        life.runtime.block_on(async {
            let until = tokio::time::Instant::now() + duration;
            loop {
                if saf.journal().queued() > 0 {
                    saf.journal().step();
                    continue;
                }
                let now = tokio::time::Instant::now();
                if now >= until || (drain && saf.pending().is_empty()) {
                    break;
                }
                tokio::time::sleep_until(until.min(now + IDLE_TICK)).await;
            }
        });
    }

    /// After the last step: the host heals, the queue drains, and every reversal owed must
    /// have reached it (d).
    fn drain(&mut self, life: &Life) -> Result<(), Failure> {
        host::lock(&self.host).weather = Weather::Healthy;
        self.note("host Healthy; draining the queue".to_string());
        self.idle(life, DRAIN, true);
        self.check_reversals(life, true)?;
        let host = host::lock(&self.host);
        for (key, p) in &host.postings {
            if self.routed_answers.get(key).is_some_and(|c| c != "00") {
                self.report.owed_reversals += 1;
            }
            self.report.reversals_at_host += u64::from(p.gateway_sends);
            self.report.repeats_at_host +=
                u64::from(p.gateway_sends.saturating_sub(p.gateway_first_sends));
        }
        self.report.host_connections = host.connections;
        Ok(())
    }

    /// (d): at most one reversal not marked as a repeat reaches the host per request it
    /// approved; none built by the gateway for one the terminal was answered 00; and once the
    /// queue is empty, every request the host approved and the terminal was answered as failed
    /// (91 timeout, 96, a decline at commit) is reversed at the host. `drained`: after the
    /// last step, with the host healthy, the queue must have emptied.
    fn check_reversals(&mut self, life: &Life, drained: bool) -> Result<(), Failure> {
        const D: &str = "d";
        let queue_empty = life.saf.pending().is_empty();
        let dead = life.saf.dead_letters().len();
        let mut bad = None;
        {
            let host = host::lock(&self.host);
            for (key, p) in &host.postings {
                let (terminal, merchant, stan, de7, _) = key;
                let what = format!(
                    "{merchant} {terminal} stan {stan} (DE7 {de7}) amount {}",
                    p.amount
                );
                if p.gateway_first_sends > 1 {
                    bad = Some(format!(
                        "{what}: {} reversals not marked as repeats reached the host (it reversed {} times)",
                        p.gateway_first_sends, p.gateway_first_sends
                    ));
                    break;
                }
                match self.routed_answers.get(key) {
                    Some(code) if code == "00" && p.gateway_sends > 0 => {
                        bad = Some(format!(
                            "{what}: answered 00, and the gateway reversed it at the host"
                        ));
                        break;
                    }
                    Some(code) if code != "00" && queue_empty && !p.reversed => {
                        bad = Some(format!(
                            "{what}: approved by the host, answered {code}, and no reversal reached the host (queue empty)"
                        ));
                        break;
                    }
                    _ => {}
                }
            }
        }
        if let Some(detail) = bad {
            return Err(self.fail(D, detail));
        }
        if dead > 0 {
            return Err(self.fail(D, format!("{dead} reversals dead-lettered")));
        }
        if drained && !queue_empty {
            return Err(self.fail(
                D,
                format!(
                    "{} reversals still queued after {DRAIN:?} with the host healthy",
                    life.saf.pending().len()
                ),
            ));
        }
        Ok(())
    }

    /// (e): the funds equation of DOMAIN §4 on the ledger's own figures; with no request in
    /// flight (between steps) nothing reserved; and the sales and refunds the ledger holds
    /// never more than those the terminals could have been approved (answered 00, 96 or not
    /// at all), recomputed from the answers.
    fn check_funds(&mut self, life: &Life) -> Result<(), Failure> {
        const E: &str = "e";
        for (m, id) in MERCHANTS.iter().enumerate() {
            let Some(f) = life.gateway.ledger().funds(id) else {
                continue;
            };
            self.report.funds_checks += 1;
            let equation = (i128::from(f.reserve) + i128::from(f.unsettled_sales)
                - i128::from(f.refunds_committed)
                - i128::from(f.refunds_reserved))
            .max(0);
            if i128::from(f.available) != equation {
                return Err(self.fail(
                    E,
                    format!("m{m}: available {} but {f:?} gives {equation}", f.available),
                ));
            }
            if f.refunds_reserved != 0 || f.sales_pending != 0 {
                return Err(self.fail(
                    E,
                    format!(
                        "m{m}: every request answered, yet {} of refunds and {} of sales stay reserved ({f:?})",
                        f.refunds_reserved, f.sales_pending
                    ),
                ));
            }
            let (mut sales, mut refunds) = (0u64, 0u64);
            for (i, r) in self.reqs.iter().enumerate() {
                let maybe = self
                    .first_answer
                    .get(&i)
                    .is_none_or(|c| c == "00" || c == "96");
                if !maybe || (r.merchant != m && r.op != Op::Bad) {
                    continue;
                }
                match r.op {
                    Op::Sale => sales += r.amount,
                    Op::Refund | Op::Void => refunds += r.amount,
                    Op::Bad => {
                        // Damaged bytes that still decode may be any request of any
                        // merchant, for the amount they now carry.
                        let amount = r.raw.as_deref().map_or(0, amount_of);
                        sales += amount;
                        refunds += amount;
                    }
                    _ => {}
                }
            }
            if f.unsettled_sales > sales || f.refunds_committed > refunds {
                return Err(self.fail(
                    E,
                    format!(
                        "m{m}: the ledger holds {} of unsettled sales and {} of refunds; the answers allow at most {sales} and {refunds}",
                        f.unsettled_sales, f.refunds_committed
                    ),
                ));
            }
        }
        Ok(())
    }

    /// (a): limits recomputed from the acknowledged answers.
    fn check_limits(&self, life: &Life) -> Result<(), Failure> {
        let mut per_original: HashMap<usize, u64> = HashMap::new();
        let mut per_day: HashMap<(usize, i64), (u64, u32)> = HashMap::new();
        let mut per_month: HashMap<(usize, i64), (u64, u32)> = HashMap::new();
        for a in &self.acked {
            let r = &self.reqs[a.req];
            if r.op != Op::Refund || a.answer.de39 != "00" {
                continue;
            }
            let Some(original) = r.original else {
                continue;
            };
            if self.reversal_sent.contains(&a.req) {
                continue;
            }
            let sum = per_original.entry(original).or_default();
            *sum += r.amount;
            let sale = self.reqs[original].amount;
            if *sum > sale {
                return Err(self.fail(
                    "a",
                    format!(
                        "refunds of m{} stan {} acknowledged {} > sale {sale}",
                        r.merchant, self.reqs[original].stan, *sum
                    ),
                ));
            }
            let day = (a.at + OFFSET_S).div_euclid(86_400);
            let d = per_day.entry((r.merchant, day)).or_default();
            d.0 += r.amount;
            d.1 += 1;
            if d.0 > DAY_CAP || d.1 > DAY_COUNT_CAP {
                return Err(self.fail(
                    "a",
                    format!(
                        "m{} day {day}: {} refunds for {} acknowledged (caps {DAY_COUNT_CAP}, {DAY_CAP})",
                        r.merchant, d.1, d.0
                    ),
                ));
            }
            let m = per_month.entry((r.merchant, month_of(day))).or_default();
            m.0 += r.amount;
            m.1 += 1;
        }
        let now = self.now();
        let day = (now + OFFSET_S).div_euclid(86_400);
        for (m, id) in MERCHANTS.iter().enumerate() {
            let Some(usage) = life.gateway.ledger().usage(id, now) else {
                continue;
            };
            let today = per_day.get(&(m, day)).copied().unwrap_or_default();
            let month = per_month
                .get(&(m, month_of(day)))
                .copied()
                .unwrap_or_default();
            if usage.day_amount < today.0
                || usage.day_count < today.1
                || usage.month_amount < month.0
                || usage.month_count < month.1
            {
                return Err(self.fail(
                    "a",
                    format!(
                        "m{m}: the ledger counts {usage:?}, the acknowledged answers {today:?} today and {month:?} this month"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// DE4 of a message, read by the real decoder (0 when it does not decode or has none).
fn amount_of(bytes: &[u8]) -> u64 {
    iso8583::decode(&ASCII1987, bytes)
        .ok()
        .and_then(|m| {
            m.field_bytes(4)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(0)
}

/// The host's posting key (DE41, DE42, DE11, DE7, DE13) of `bytes`, if they decode as a financial
/// request (0200/0220, repeats included) to the routed merchant.
fn routed_key_of(bytes: &[u8]) -> Option<PostingKey> {
    let msg = iso8583::decode(&ASCII1987, bytes).ok()?;
    if !matches!(msg.mti().0, 200 | 201 | 220 | 221) {
        return None;
    }
    if msg.merchant()?.trim_end() != MERCHANTS[ROUTED] {
        return None;
    }
    host::posting_key(&msg)
}

/// DE39, DE44, DE54 of an answer, read by the real decoder.
fn decode_answer(bytes: &[u8]) -> Option<Answer> {
    let msg = iso8583::decode(&ASCII1987, bytes).ok()?;
    let text = |n: usize| {
        msg.field_bytes(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    Some(Answer {
        de39: text(39),
        de44: text(44),
        de54: text(54),
    })
}

/// A DE39 the gateway does not store for a routed request (91 host, 96 journal): a request
/// with the same key later is decided again.
fn is_transient_code(de39: &str) -> bool {
    matches!(de39, "91" | "96")
}

fn is_transient(de44: &str) -> bool {
    // The upstream's 91/92 are not stored either: a repeat is forwarded again.
    if de44 == Reason::HOST_UNREACHABLE.as_str() || de44 == Reason::NO_ROUTE.as_str() {
        return true;
    }
    Reason::all()
        .find(|r| r.as_str() == de44)
        .is_none_or(transient)
}
