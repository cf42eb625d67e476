//! `refundgate sim`: a deterministic simulation of the decision core (issue 17, after
//! TigerBeetle's VOPR). One thread, one seed: the real [`Ledger`] decides a random workload
//! of sales, refunds, voids, reversals (of sales, refunds and voids; again for an original
//! already reversed; before their sale, reordered), repeats, identical retransmissions,
//! requests reusing a key, sign-ons, terminal 0500s (with the gateway's totals, wrong
//! totals or none) and merchant settlements, forwarded requests held across steps and bad
//! requests, from 2026-01-31 on across merchant-local days and a month boundary, and
//! journals through a simulated disk that syncs, fails syncs, fills up (ENOSPC: writes
//! refused for some steps) and crashes (losing unsynced records, or keeping some of them as a
//! disk may) at any step. Ledger snapshots are taken at durable points; a restart restores
//! the last one and replays the records after it.
//!
//! The simulated gateway does what `flow` does: decide and journal in one step under the
//! merchant's shard (the logged ledger API), answer only once the record is synced (96 when
//! the write is refused), rebuild the ledger from what is durable after a failed sync, restore
//! and replay after a crash.
//!
//! Invariants, checked as the run goes:
//! - (a) no refund limit exceeded, recomputed from the acknowledged answers alone (per
//!   original: the sale amount; per merchant-local day: amount and count caps; a refund a
//!   journaled reversal undid counts no more, once); and the ledger's usage per day, month and
//!   original is never below those sums (below: something was given back twice);
//! - (b) at every durable point and after every rebuild, replay(journal) from scratch equals
//!   the live ledger byte for byte (snapshot encoding), also when the live one was restored
//!   from a snapshot;
//! - (c) a repeat or identical retransmission of an acknowledged request gets the
//!   acknowledged answer, before and after crashes; another request reusing its key gets 94
//!   and writes nothing;
//! - (d) the refunds reserved in the ledger equal the forwarded refunds the simulation holds
//!   (the upstream half of issue 17's (d), one reversal per failed host debit, is
//!   `tests/upstream.rs`
//!   `each_debit_answered_as_failed_gets_exactly_one_reversal_across_faults_and_restarts`);
//! - (e) nothing grows past what the workload made;
//! - (order) a sale whose reversal was decided before it and acknowledged is never approved;
//! - (settle) a 0500 from a terminal that never signed on gets 03, one with the gateway's own
//!   totals never 95, one with other totals is never approved (DOMAIN §9a).
//!
//! `refundgate sim --core` ([`core_mode`]) runs the real gateway core instead of this model:
//! ISO 8583 bytes through `flow::Gateway::handle_batch`, the real journal in its stepped mode
//! over [`crate::journal::SimDisk`], snapshots and `serve`'s recovery after crashes.
//!
//! A failing seed prints the last steps; the same seed reproduces it bit for bit. The
//! [`Mutation`] switches re-introduce known bugs in the simulated gateway (never in the
//! product's paths; the one ledger-side switch exists only in test builds) to show that the
//! invariants catch them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

pub mod core_mode;
mod host;
#[cfg(feature = "sim-mutations")]
pub mod switches;

pub use core_mode::{run_core, CoreMutation, CoreReport};

use crate::ledger::{
    BatchTotals, CardType, Decision, Dialect, EventBody, Ledger, LedgerEvent, Logged, MerchantSet,
    Operation, OriginalRef, PanKey, Reason, Request, Reservation,
};

/// A bug to re-introduce in the simulated gateway, to show the invariants have teeth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mutation {
    /// The gateway as built.
    #[default]
    None,
    /// Answers leave before their record is synced.
    AckBeforeSync,
    /// Declines are remembered in memory only, not journaled.
    DeclinesNotJournaled,
    /// A forwarded request's event is journaled when reserved but applied when the host
    /// answers (wake-up order instead of journal order).
    ApplyInWakeUpOrder,
    /// A forwarded request that times out keeps its reservation.
    HoldNotReleased,
    /// A reversal of an already reversed refund, void or sale undoes it again (money and
    /// limits given back twice). The ledger's idempotency by state makes this impossible
    /// through its API, so this one switch sits in the ledger, compiled only with the
    /// test-only `sim-mutations` feature (`cargo test` turns it on).
    #[cfg(feature = "sim-mutations")]
    ReversalAppliedTwice,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Steps run.
    pub steps: u32,
    /// Requests decided.
    pub requests: u64,
    /// Answers acknowledged (sent to the terminal).
    pub acknowledged: u64,
    /// Crashes and restarts.
    pub crashes: u32,
    /// Failed syncs followed by a rebuild.
    pub sync_failures: u32,
    /// Repeats checked against their acknowledged answer.
    pub repeats_checked: u64,
    /// Times the disk filled up (writes refused for some steps).
    pub disk_full: u32,
    /// Rebuilds (after a crash or a failed sync) that restored a snapshot and replayed only
    /// the records after it.
    pub snapshot_restores: u32,
    /// Sales sent after their own reversal (reordered on the network).
    pub reordered: u32,
    /// Requests that reused an acknowledged request's key (checked: 94).
    pub key_reuses: u32,
    /// Terminal 0500s approved (batch closed) and answered 95 (totals differ).
    pub batches_settled: u32,
    /// Terminal 0500s answered 95.
    pub batches_unreconciled: u32,
}

impl Report {
    /// Adds the counts of another run (totals over seeds).
    pub fn add(&mut self, other: &Report) {
        self.steps = self.steps.saturating_add(other.steps);
        self.requests = self.requests.saturating_add(other.requests);
        self.acknowledged = self.acknowledged.saturating_add(other.acknowledged);
        self.crashes = self.crashes.saturating_add(other.crashes);
        self.sync_failures = self.sync_failures.saturating_add(other.sync_failures);
        self.repeats_checked = self.repeats_checked.saturating_add(other.repeats_checked);
        self.disk_full = self.disk_full.saturating_add(other.disk_full);
        self.snapshot_restores = self
            .snapshot_restores
            .saturating_add(other.snapshot_restores);
        self.reordered = self.reordered.saturating_add(other.reordered);
        self.key_reuses = self.key_reuses.saturating_add(other.key_reuses);
        self.batches_settled = self.batches_settled.saturating_add(other.batches_settled);
        self.batches_unreconciled = self
            .batches_unreconciled
            .saturating_add(other.batches_unreconciled);
    }
}

/// A violated invariant.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The step at which it was found.
    pub step: u32,
    /// Which invariant.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
    /// The last steps before it.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} step {}: invariant {} violated: {}",
            self.seed, self.step, self.invariant, self.detail
        )?;
        writeln!(f, "last steps:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: refundgate sim --seed {} --steps {}",
            self.seed,
            self.step + 1
        )
    }
}

/// 2026-01-31T00:00:00Z (08:00 merchant-local): a run of a few hundred steps crosses the
/// local month boundary as well as days.
const T0: i64 = 1_769_817_600;
const DAY_CAP: u64 = 90_000;
const DAY_COUNT_CAP: u32 = 8;
const MERCHANTS: [&str; 2] = ["SIM MERCHANT 01", "SIM MERCHANT 02"];
const TERMINALS: [&str; 2] = ["SIMT0001", "SIMT0002"];
const PANS: [&str; 3] = ["4761739001010119", "5413330089020011", "4761739001010010"];
const OFFSET_S: i64 = 8 * 3600;
/// Answers older than this are not repeated (the ledger keeps them 25 h).
const REPEAT_HORIZON_S: i64 = 20 * 3600;
const TRACE_KEPT: usize = 40;

fn merchant_set() -> Result<MerchantSet, String> {
    let mut toml = format!(
        "[profiles.sim]\nrefund_window_days = 30\nrefund_single_max = 40000\n\
         refund_day_amount_max = {DAY_CAP}\nrefund_day_count_max = {DAY_COUNT_CAP}\n\
         refund_month_amount_max = 400000\nrefund_month_count_max = 60\n\
         card_refund_day_amount_max = 60000\ncard_refund_day_count_max = 5\n\
         refundable_share_percent = 100\nsame_day_refund = \"allow\"\nreserve = 20000\n\
         utc_offset = \"+08:00\"\ncurrency = 840\n"
    );
    for m in MERCHANTS {
        let _ = write!(
            toml,
            "[[merchants]]\nid = \"{m}\"\nprofile = \"sim\"\nterminals = [{{ id = \"{}\" }}, {{ id = \"{}\" }}]\n",
            TERMINALS[0], TERMINALS[1]
        );
    }
    MerchantSet::from_toml_str(&toml).map_err(|e| e.to_string())
}

/// A request the simulated terminals send, owned.
#[derive(Debug, Clone)]
struct SimReq {
    op: Operation,
    merchant: usize,
    terminal: usize,
    stan: u32,
    mmdd: u16,
    transmission: u64,
    rrn: Option<String>,
    pan: &'static str,
    amount: u64,
    /// STAN, DE7 and RRN of the original.
    original: Option<(u32, u64, Option<String>)>,
    repeat: bool,
    /// A 0500's batch totals, when it carries them.
    totals: Option<BatchTotals>,
}

impl SimReq {
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            h ^= v;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        eat(self.op as u64);
        eat(self.merchant as u64);
        eat(self.terminal as u64);
        eat(u64::from(self.stan));
        eat(self.amount);
        eat(self.pan.len() as u64 + u64::from(self.pan.as_bytes().get(15).copied().unwrap_or(0)));
        if let Some((s, t, _)) = &self.original {
            eat(u64::from(*s));
            eat(*t);
        }
        h
    }

    fn req(&self) -> Request<'_> {
        let class = match self.op {
            Operation::Reversal => 4,
            Operation::Settlement => 5,
            _ => 2,
        };
        Request {
            dialect: Dialect::Ascii1987,
            op: self.op,
            repeat: self.repeat,
            merchant: MERCHANTS[self.merchant],
            terminal: TERMINALS[self.terminal],
            stan: self.stan,
            local_date_mmdd: self.mmdd,
            mti_class: class,
            transmission: Some(self.transmission),
            rrn: self.rrn.as_deref(),
            batch: None,
            pan: self.pan,
            amount_minor: self.amount,
            currency: 840,
            card_type: CardType::from_pan(self.pan),
            original: self
                .original
                .as_ref()
                .map(|(stan, t, rrn)| OriginalRef::Iso {
                    mti: 200,
                    stan: *stan,
                    transmission: *t,
                    rrn: rrn.as_deref(),
                }),
            body_fingerprint: self.fingerprint(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{:?} m{} t{} stan {} amount {}{}{}",
            self.op,
            self.merchant,
            self.terminal,
            self.stan,
            self.amount,
            self.original
                .as_ref()
                .map_or(String::new(), |(s, _, _)| format!(" of stan {s}")),
            if self.repeat { " (repeat)" } else { "" }
        )
    }
}

/// An answer acknowledged to a terminal.
#[derive(Debug, Clone, Copy)]
struct Ack {
    req: usize,
    at: i64,
    decision: Decision,
}

/// An answer waiting for its record.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    req: usize,
    at: i64,
    decision: Decision,
    /// Journal length that must be synced.
    until: usize,
}

/// A forwarded request between reserve and the host's answer.
struct Held {
    req: usize,
    reservation: Reservation,
    due: u32,
    /// When it was reserved.
    at: i64,
    /// `ApplyInWakeUpOrder`: already journaled at reserve time.
    journaled: bool,
}

/// Refund sums (amount, count) recomputed from the acknowledged answers, for (a).
struct Sums {
    per_day: HashMap<(usize, i64), (u64, u32)>,
    per_month: HashMap<(usize, i64), (u64, u32)>,
    per_original: HashMap<(usize, u32), u64>,
    /// Approved sales by (merchant, STAN): request index.
    sales: HashMap<(usize, u32), usize>,
}

struct Sim {
    seed: u64,
    rng: u64,
    mutation: Mutation,
    set: MerchantSet,
    ledger: Ledger,
    /// The simulated disk: records written, and how many of them are synced.
    written: Vec<LedgerEvent>,
    synced: usize,
    now: i64,
    stan: u32,
    reqs: Vec<SimReq>,
    acked: Vec<Ack>,
    waiting: Vec<Waiting>,
    held: Vec<Held>,
    /// Sales acknowledged as approved (request index).
    sales: Vec<usize>,
    /// Refunds and voids acknowledged as approved (request index): what a terminal reverses
    /// besides sales.
    debits: Vec<usize>,
    /// Reversals acknowledged (request index): a terminal may send another one for the same
    /// original (a new STAN, as after a lost answer).
    reversals: Vec<usize>,
    /// Sales whose reversal was sent first, not sent yet.
    future: Vec<SimReq>,
    /// Those sales by (merchant, STAN): the first acknowledged reversal naming it and the
    /// sale acknowledged as approved (request indexes, which follow decision order). A sale
    /// approved after a reversal of it was decided and acknowledged breaks DOMAIN §9 (a sale
    /// reversed first is declined 22).
    early: HashMap<(usize, u32), (Option<usize>, Option<usize>)>,
    /// Terminals that ever sent a sign-on the disk took.
    signed_on: HashSet<(usize, usize)>,
    /// A violation found while acknowledging, reported at the end of the step.
    violation: Option<(&'static str, String)>,
    trace: VecDeque<String>,
    report: Report,
    step: u32,
    /// The disk is full (every write fails) before this step.
    full_until: u32,
    /// The last ledger snapshot, taken at a durable point, and how many records it covers:
    /// a restart restores it and replays the records after it.
    snapshot: Option<(Vec<u8>, usize)>,
}

/// Runs `steps` steps of seed `seed`.
pub fn run(seed: u64, steps: u32, mutation: Mutation) -> Result<Report, Failure> {
    let set = merchant_set().map_err(|e| Failure {
        seed,
        step: 0,
        invariant: "setup",
        detail: e,
        trace: Vec::new(),
    })?;
    let ledger = Ledger::new(&set, pan_key());
    let mut sim = Sim {
        seed,
        rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d | 1,
        mutation,
        set,
        ledger,
        written: Vec::new(),
        synced: 0,
        now: T0,
        stan: 0,
        reqs: Vec::new(),
        acked: Vec::new(),
        waiting: Vec::new(),
        held: Vec::new(),
        sales: Vec::new(),
        debits: Vec::new(),
        reversals: Vec::new(),
        future: Vec::new(),
        early: HashMap::new(),
        signed_on: HashSet::new(),
        violation: None,
        trace: VecDeque::new(),
        report: Report::default(),
        step: 0,
        full_until: 0,
        snapshot: None,
    };
    let _switch = LedgerMutation::on(mutation);
    for step in 0..steps {
        sim.step = step;
        sim.one_step()?;
        sim.report.steps = step + 1;
    }
    Ok(sim.report)
}

/// Turns the ledger-side mutation on for one run on this thread, and off again when dropped
/// (also when the run fails).
struct LedgerMutation;

impl LedgerMutation {
    fn on(mutation: Mutation) -> LedgerMutation {
        #[cfg(feature = "sim-mutations")]
        crate::ledger::sim_mutation::set_reversal_applied_twice(
            mutation == Mutation::ReversalAppliedTwice,
        );
        let _ = mutation;
        LedgerMutation
    }
}

impl Drop for LedgerMutation {
    fn drop(&mut self) {
        #[cfg(feature = "sim-mutations")]
        crate::ledger::sim_mutation::set_reversal_applied_twice(false);
    }
}

/// Why the simulated disk refused a record.
#[derive(Debug)]
enum DiskError {
    /// ENOSPC: the write failed, nothing was written.
    Full,
    /// The ledger refused the call (unknown merchant).
    Refused,
}

impl From<crate::ledger::Refused> for DiskError {
    fn from(_: crate::ledger::Refused) -> DiskError {
        DiskError::Refused
    }
}

/// The simulated disk's log: the event is written (not yet synced); its seq is its position.
/// A full disk refuses the write.
fn log_to(
    written: &mut Vec<LedgerEvent>,
    full: bool,
) -> impl FnOnce(&LedgerEvent) -> Result<u64, DiskError> + '_ {
    move |e| {
        if full {
            return Err(DiskError::Full);
        }
        written.push(e.clone());
        Ok(written.len() as u64)
    }
}

fn pan_key() -> PanKey {
    PanKey::new(b"simulated-key-16")
}

impl Sim {
    fn next(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
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

    fn disk_full(&self) -> bool {
        self.step < self.full_until
    }

    fn one_step(&mut self) -> Result<(), Failure> {
        self.now += self.next(90) as i64;
        if self.next(60) == 0 {
            self.now += 5 * 3600;
        }
        if self.next(150) == 0 {
            // ENOSPC until an operator frees space some steps later.
            self.full_until = self.step + 1 + self.next(12) as u32;
            self.report.disk_full += 1;
            self.note(format!("disk full until #{}", self.full_until));
        }
        self.resolve_held()?;
        match self.next(100) {
            0..=27 => self.sale(),
            28..=47 => self.child(Operation::Refund),
            48..=52 => self.child(Operation::Void),
            53..=58 => self.reversal(),
            59..=66 => self.repeat()?,
            67..=72 => self.forward(),
            73..=75 => self.bad(),
            76..=78 => match self.next(3) {
                0 => self.settle(),
                1 => self.sign_on(),
                _ => self.settle_batch()?,
            },
            79..=93 => self.sync()?,
            94..=96 => self.failed_sync()?,
            _ => self.crash()?,
        }
        if let Some((invariant, detail)) = self.violation.take() {
            return Err(self.fail(invariant, detail));
        }
        self.check_limits()?;
        self.check_holds()?;
        if self.ledger.entries() > self.reqs.len() {
            return Err(self.fail(
                "e",
                format!(
                    "{} entries for {} requests",
                    self.ledger.entries(),
                    self.reqs.len()
                ),
            ));
        }
        Ok(())
    }

    fn new_req(&mut self, op: Operation, merchant: usize) -> SimReq {
        self.stan = self.stan % 999_998 + 1;
        let local = self.now + OFFSET_S;
        let secs = local.rem_euclid(86_400);
        let mmdd = crate::clock::mmdd_of(local);
        let hhmmss = (secs / 3600 * 10_000 + secs % 3600 / 60 * 100 + secs % 60) as u64;
        SimReq {
            op,
            merchant,
            terminal: self.next(2) as usize,
            stan: self.stan,
            mmdd,
            transmission: u64::from(mmdd) * 1_000_000 + hhmmss,
            rrn: None,
            pan: PANS[self.next(3) as usize],
            amount: 1 + self.next(30_000),
            original: None,
            repeat: false,
            totals: None,
        }
    }

    fn sale(&mut self) {
        if !self.future.is_empty() && self.next(3) == 0 {
            // A sale whose reversal overtook it on the network.
            let r = self.future.remove(0);
            self.report.reordered += 1;
            return self.decide(r);
        }
        let r = self.new_sale();
        self.decide(r);
    }

    fn new_sale(&mut self) -> SimReq {
        let m = self.next(2) as usize;
        let mut r = self.new_req(Operation::Sale, m);
        r.amount = 1_000 + self.next(29_000);
        r.rrn = Some(format!("{:012}", u64::from(r.stan) * 7 + 100_000_000_000));
        r
    }

    /// A refund, void or reversal of an acknowledged sale (or, rarely, of one never seen).
    fn child(&mut self, op: Operation) {
        if self.sales.is_empty() {
            return self.sale();
        }
        let at = self.next(self.sales.len() as u64) as usize;
        let pick = self.sales[at];
        let sale = self.reqs[pick].clone();
        let mut r = self.new_req(op, sale.merchant);
        r.terminal = sale.terminal;
        r.pan = sale.pan;
        r.original = Some((sale.stan, sale.transmission, sale.rrn.clone()));
        r.amount = match op {
            Operation::Void => sale.amount,
            Operation::Reversal => sale.amount,
            _ => 1 + self.next(sale.amount + sale.amount / 4),
        };
        if op == Operation::Reversal && self.next(10) == 0 {
            // A reversal of a sale that never arrived.
            r.original = Some((
                self.stan.wrapping_add(500_000) % 999_999,
                sale.transmission,
                None,
            ));
        }
        self.decide(r);
    }

    /// A terminal's reversal: of a sale (half the time), of an acknowledged refund or void, or
    /// another one for an original already reversed (a new STAN).
    fn reversal(&mut self) {
        let pick = match self.next(5) {
            2 if self.future.len() < 8 => {
                // Reordered: the reversal of a sale arrives before the sale itself.
                let sale = self.new_sale();
                let mut r = self.new_req(Operation::Reversal, sale.merchant);
                r.terminal = sale.terminal;
                r.pan = sale.pan;
                r.amount = sale.amount;
                r.original = Some((sale.stan, sale.transmission, None));
                self.early.insert((sale.merchant, sale.stan), (None, None));
                self.future.push(sale);
                return self.decide(r);
            }
            0 if !self.debits.is_empty() => {
                let at = self.next(self.debits.len() as u64) as usize;
                self.debits[at]
            }
            1 if !self.reversals.is_empty() => {
                let at = self.next(self.reversals.len() as u64) as usize;
                let r = self.reversals[at];
                let again = self.reqs[r].clone();
                let mut r = self.new_req(Operation::Reversal, again.merchant);
                r.terminal = again.terminal;
                r.pan = again.pan;
                r.amount = again.amount;
                r.original = again.original;
                return self.decide(r);
            }
            _ => return self.child(Operation::Reversal),
        };
        let debit = self.reqs[pick].clone();
        let mut r = self.new_req(Operation::Reversal, debit.merchant);
        r.terminal = debit.terminal;
        r.pan = debit.pan;
        r.amount = debit.amount;
        r.original = Some((debit.stan, debit.transmission, None));
        self.decide(r);
    }

    fn bad(&mut self) {
        let m = self.next(2) as usize;
        let mut r = self.new_req(Operation::Sale, m);
        r.amount = 0;
        r.rrn = Some(format!("{:012}", u64::from(r.stan) * 7 + 100_000_000_000));
        self.decide(r);
    }

    /// Decides `r` now, in one step, as the gateway does.
    fn decide(&mut self, r: SimReq) {
        let idx = self.reqs.len();
        self.reqs.push(r);
        self.report.requests += 1;
        let now = self.now;
        let req = self.reqs[idx].clone();
        let logged = if self.mutation == Mutation::DeclinesNotJournaled {
            match self.ledger.reserve(&req.req(), now) {
                Ok(res) => {
                    let full = self.disk_full();
                    let written = &mut self.written;
                    self.ledger.commit_logged(res, log_to(written, full))
                }
                Err(decision) => Logged::Unlogged { decision, after: 0 },
            }
        } else {
            let full = self.disk_full();
            let written = &mut self.written;
            self.ledger
                .decide_logged(&req.req(), now, log_to(written, full))
        };
        self.answered(idx, logged);
    }

    /// Files the answer of request `idx` to be sent once its record is synced.
    fn answered(&mut self, idx: usize, logged: Logged<DiskError>) {
        let at = self.now;
        self.answered_at(idx, logged, at);
    }

    /// [`Sim::answered`] for a request decided at `at` (a forwarded one: when it was reserved,
    /// which is the time its event carries).
    fn answered_at(&mut self, idx: usize, logged: Logged<DiskError>, at: i64) {
        let (decision, until) = match logged {
            Logged::Applied { decision, seq } => (decision, seq as usize),
            Logged::Unlogged { decision, after } => (decision, after as usize),
            Logged::Failed(_) => (Decision::bare(Reason::STORE_UNAVAILABLE), 0),
        };
        self.note(format!(
            "{} -> {} {}",
            self.reqs[idx].describe(),
            decision.code.as_str(),
            decision.reason.as_str()
        ));
        let w = Waiting {
            req: idx,
            at,
            decision,
            until,
        };
        if until <= self.synced || self.mutation == Mutation::AckBeforeSync {
            self.acknowledge(w);
        } else {
            self.waiting.push(w);
        }
    }

    fn acknowledge(&mut self, w: Waiting) {
        self.report.acknowledged += 1;
        let req = &self.reqs[w.req];
        if w.decision.is_approved() && !req.repeat {
            let early_key = match (req.op, &req.original) {
                (Operation::Sale, _) => Some(((req.merchant, req.stan), false)),
                (Operation::Reversal, Some((stan, _, _))) => Some(((req.merchant, *stan), true)),
                _ => None,
            };
            if let Some((key, is_reversal)) = early_key {
                if let Some(seen) = self.early.get_mut(&key) {
                    if is_reversal {
                        seen.0 = Some(seen.0.map_or(w.req, |r| r.min(w.req)));
                    } else {
                        seen.1 = Some(w.req);
                    }
                    let broken = matches!(*seen, (Some(r), Some(s)) if r < s);
                    if broken && self.violation.is_none() {
                        self.violation = Some((
                            "order",
                            format!(
                                "m{} stan {}: the sale was approved although its reversal, decided before it, was acknowledged",
                                key.0, key.1
                            ),
                        ));
                    }
                }
            }
            match req.op {
                Operation::Sale => self.sales.push(w.req),
                Operation::Refund | Operation::Void => self.debits.push(w.req),
                Operation::Reversal => self.reversals.push(w.req),
                _ => {}
            }
        }
        if !req.repeat && !transient(w.decision.reason) {
            self.acked.push(Ack {
                req: w.req,
                at: w.at,
                decision: w.decision,
            });
        }
    }

    /// A repeat of an acknowledged request: it must get the acknowledged answer (c).
    fn repeat(&mut self) -> Result<(), Failure> {
        let Some(ack) = self.recent_ack() else {
            return Ok(());
        };
        match self.next(4) {
            // An identical retransmission (no repeat flag): the stored answer too.
            0 => self.check_again(ack, false, "c (retransmission)"),
            // Another request reusing the key: 94, nothing moves.
            1 => self.check_key_reuse(ack),
            _ => self.check_repeat(ack, "c (live)"),
        }
    }

    /// A different request with an acknowledged request's key (DE41, DE11, date, class) gets
    /// 94 `DUPLICATE` and journals nothing (DOMAIN §6).
    fn check_key_reuse(&mut self, ack: Ack) -> Result<(), Failure> {
        self.report.key_reuses += 1;
        let mut other = self.reqs[ack.req].clone();
        other.amount += 1;
        let before = self.written.len();
        let now = self.now;
        let full = self.disk_full();
        let written = &mut self.written;
        let logged = self
            .ledger
            .decide_logged(&other.req(), now, log_to(written, full));
        let got = logged.decision().map(|d| d.reason);
        if got != Some(Reason::DUPLICATE) || self.written.len() != before {
            return Err(self.fail(
                "c (key reused)",
                format!(
                    "{} reusing the key of an acknowledged request got {:?}, {} records written",
                    other.describe(),
                    got.map(Reason::as_str),
                    self.written.len() - before
                ),
            ));
        }
        Ok(())
    }

    fn recent_ack(&mut self) -> Option<Ack> {
        let recent: Vec<Ack> = self
            .acked
            .iter()
            .rev()
            .take_while(|a| self.now - a.at < REPEAT_HORIZON_S)
            .copied()
            .collect();
        if recent.is_empty() {
            return None;
        }
        Some(recent[self.next(recent.len() as u64) as usize])
    }

    fn check_repeat(&mut self, ack: Ack, invariant: &'static str) -> Result<(), Failure> {
        self.check_again(ack, true, invariant)
    }

    /// Sends acknowledged request `ack` again (as a repeat, or as an identical
    /// retransmission): it must get the acknowledged answer, and nothing new is decided.
    fn check_again(
        &mut self,
        ack: Ack,
        repeat: bool,
        invariant: &'static str,
    ) -> Result<(), Failure> {
        let mut again = self.reqs[ack.req].clone();
        again.repeat = repeat;
        let now = self.now;
        let full = self.disk_full();
        let written = &mut self.written;
        let logged = self
            .ledger
            .decide_logged(&again.req(), now, log_to(written, full));
        self.report.repeats_checked += 1;
        let got = match &logged {
            Logged::Unlogged { decision, .. } => *decision,
            Logged::Applied { decision, .. } => {
                return Err(self.fail(
                    invariant,
                    format!(
                        "repeat of {} was decided again, its stored answer is gone: {} {} (acknowledged {} {})",
                        self.reqs[ack.req].describe(),
                        decision.code.as_str(),
                        decision.reason.as_str(),
                        ack.decision.code.as_str(),
                        ack.decision.reason.as_str()
                    ),
                ))
            }
            Logged::Failed(_) => return Ok(()),
        };
        if got.reason != ack.decision.reason {
            return Err(self.fail(
                invariant,
                format!(
                    "repeat of {} answered {} {}, acknowledged {} {}",
                    self.reqs[ack.req].describe(),
                    got.code.as_str(),
                    got.reason.as_str(),
                    ack.decision.code.as_str(),
                    ack.decision.reason.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// A forwarded refund: reserved now, answered by the host some steps later.
    fn forward(&mut self) {
        if self.sales.is_empty() {
            return self.sale();
        }
        let at = self.next(self.sales.len() as u64) as usize;
        let pick = self.sales[at];
        let sale = self.reqs[pick].clone();
        let mut r = self.new_req(Operation::Refund, sale.merchant);
        r.terminal = sale.terminal;
        r.pan = sale.pan;
        r.original = Some((sale.stan, sale.transmission, sale.rrn.clone()));
        r.amount = 1 + self.next(sale.amount);
        let idx = self.reqs.len();
        self.reqs.push(r);
        self.report.requests += 1;
        let req = self.reqs[idx].clone();
        let now = self.now;
        let due = self.step + 1 + self.next(6) as u32;
        let wake_up_order = self.mutation == Mutation::ApplyInWakeUpOrder;
        let full = self.disk_full();
        let written = &mut self.written;
        let reserved = self
            .ledger
            .reserve_logged(&req.req(), now, log_to(written, full))
            .map(|res| {
                if wake_up_order {
                    // The bug: journaled now, applied when the host answers.
                    written.push(res.event().clone());
                }
                (res, wake_up_order)
            });
        match reserved {
            Ok((reservation, journaled)) => {
                self.note(format!("{} -> held until #{due}", req.describe()));
                self.held.push(Held {
                    req: idx,
                    reservation,
                    due,
                    at: now,
                    journaled,
                });
            }
            Err(logged) => self.answered(idx, logged),
        }
    }

    /// Host answers that are due: approve (commit) or time out (release, 91).
    fn resolve_held(&mut self) -> Result<(), Failure> {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].due > self.step {
                i += 1;
                continue;
            }
            let h = self.held.remove(i);
            if self.next(4) == 0 {
                let d = Decision::bare(Reason::HOST_TIMEOUT);
                if self.mutation == Mutation::HoldNotReleased {
                    // The bug: the reservation is dropped, its holds stay.
                    drop(h.reservation);
                } else {
                    self.ledger.release(h.reservation);
                }
                self.answered_at(
                    h.req,
                    Logged::Unlogged {
                        decision: d,
                        after: 0,
                    },
                    h.at,
                );
                continue;
            }
            let logged = if h.journaled {
                let d = self.ledger.commit(h.reservation);
                Logged::Applied {
                    decision: d,
                    seq: self.written.len() as u64,
                }
            } else {
                let full = self.disk_full();
                let written = &mut self.written;
                self.ledger
                    .commit_logged(h.reservation, log_to(written, full))
            };
            self.answered_at(h.req, logged, h.at);
        }
        Ok(())
    }

    fn settle(&mut self) {
        let m = self.next(2) as usize;
        let now = self.now;
        let full = self.disk_full();
        let written = &mut self.written;
        let settled = self
            .ledger
            .settle_logged(MERCHANTS[m], now, log_to(written, full));
        self.note(format!("settle m{m} -> {}", settled.is_ok()));
    }

    /// A terminal signs on (0800 001): journaled, then it may settle its batch.
    fn sign_on(&mut self) {
        let (m, t) = (self.next(2) as usize, self.next(2) as usize);
        let now = self.now;
        let full = self.disk_full();
        let written = &mut self.written;
        let signed =
            self.ledger
                .sign_on_logged(MERCHANTS[m], TERMINALS[t], now, log_to(written, full));
        if signed.is_ok() {
            self.signed_on.insert((m, t));
        }
        self.note(format!("sign-on m{m} t{t} -> {}", signed.is_ok()));
    }

    /// A terminal's 0500 (DOMAIN §9a), with the gateway's own totals, with wrong ones, or
    /// with none. Checked at once: a terminal that never signed on gets 03; right totals are
    /// never 95; wrong ones are never approved. Then it is answered like any request, so its
    /// repeats are checked by (c).
    fn settle_batch(&mut self) -> Result<(), Failure> {
        let m = self.next(2) as usize;
        let mut r = self.new_req(Operation::Settlement, m);
        r.pan = "";
        r.amount = 0;
        let own = self
            .ledger
            .batch_totals(MERCHANTS[m], TERMINALS[r.terminal])
            .unwrap_or_default();
        let wrong = match self.next(4) {
            0 | 1 => {
                r.totals = Some(own);
                false
            }
            2 => {
                r.totals = Some(BatchTotals {
                    debit_count: own.debit_count + 1,
                    ..own
                });
                true
            }
            _ => false,
        };
        let idx = self.reqs.len();
        self.reqs.push(r);
        self.report.requests += 1;
        let req = self.reqs[idx].clone();
        let now = self.now;
        let full = self.disk_full();
        let written = &mut self.written;
        let logged =
            self.ledger
                .settle_batch_logged(&req.req(), req.totals, now, log_to(written, full));
        if let Some(d) = logged.decision() {
            match d.reason {
                Reason::RECONCILE_ERROR => self.report.batches_unreconciled += 1,
                _ if d.is_approved() => self.report.batches_settled += 1,
                _ => {}
            }
            let never_signed = !self.signed_on.contains(&(m, req.terminal));
            let broken = (never_signed && d.reason != Reason::UNKNOWN_TERMINAL)
                || (req.totals.is_some() && !wrong && d.reason == Reason::RECONCILE_ERROR)
                || (wrong && d.is_approved());
            if broken {
                return Err(self.fail(
                    "settle",
                    format!(
                        "{} with {} totals {:?} (gateway's {own:?}{}) answered {} {}",
                        req.describe(),
                        if wrong { "wrong" } else { "its" },
                        req.totals,
                        if never_signed {
                            ", never signed on"
                        } else {
                            ""
                        },
                        d.code.as_str(),
                        d.reason.as_str()
                    ),
                ));
            }
        }
        self.answered(idx, logged);
        Ok(())
    }

    /// A durable point: everything written is synced, its answers leave.
    fn sync(&mut self) -> Result<(), Failure> {
        self.synced = self.written.len();
        let (ready, later): (Vec<Waiting>, Vec<Waiting>) =
            self.waiting.drain(..).partition(|w| w.until <= self.synced);
        self.waiting = later;
        let n = ready.len();
        for w in ready {
            self.acknowledge(w);
        }
        self.note(format!("sync {} records, {n} answers sent", self.synced));
        self.check_replay("b (durable point)")?;
        if self.next(3) == 0 {
            let mut bytes = Vec::new();
            self.ledger.snapshot(&mut bytes);
            self.snapshot = Some((bytes, self.synced));
            self.note(format!("snapshot at {} records", self.synced));
        }
        Ok(())
    }

    /// A sync that fails: the unsynced records are lost, their answers become 96, and the
    /// ledger is rebuilt from what is durable (the gateway's hold-and-rebuild).
    fn failed_sync(&mut self) -> Result<(), Failure> {
        self.report.sync_failures += 1;
        let lost = self.written.len() - self.synced;
        self.written.truncate(self.synced);
        let waiting = std::mem::take(&mut self.waiting);
        let rebuilt = self.recovered()?;
        self.ledger.adopt_durable(rebuilt);
        self.note(format!("sync failed: {lost} records lost, ledger rebuilt"));
        for w in waiting {
            self.note(format!(
                "{} -> 96 (record lost)",
                self.reqs[w.req].describe()
            ));
        }
        self.check_replay("b (after a rebuild)")
    }

    /// kill -9: unsynced records are lost (some may have reached the disk all the same),
    /// nothing in flight is answered, the ledger is replayed from the journal.
    fn crash(&mut self) -> Result<(), Failure> {
        self.report.crashes += 1;
        let unsynced = self.written.len() - self.synced;
        let kept = self.next(unsynced as u64 + 1) as usize;
        self.written.truncate(self.synced + kept);
        self.synced = self.written.len();
        self.waiting.clear();
        // Forwarded requests in flight die with the process (their terminals reverse them).
        self.held.clear();
        self.ledger = self.recovered()?;
        self.note(format!(
            "crash: {unsynced} unsynced records, {kept} of them reached the disk; restarted"
        ));
        // (c) after the restart: every recent acknowledged answer is repeated.
        let recent: Vec<Ack> = self
            .acked
            .iter()
            .rev()
            .take_while(|a| self.now - a.at < REPEAT_HORIZON_S)
            .copied()
            .collect();
        for ack in recent {
            self.check_repeat(ack, "c (after a crash)")?;
        }
        self.check_replay("b (after a crash)")
    }

    /// What a restart rebuilds: the last snapshot restored and the records after it replayed
    /// (or, before any snapshot, the whole journal). (b) compares the live ledger with a
    /// replay from scratch, so a snapshot that restores differently is caught.
    fn recovered(&mut self) -> Result<Ledger, Failure> {
        let Some((bytes, covered)) = &self.snapshot else {
            return self.replayed();
        };
        let restored = Ledger::restore(&self.set, pan_key(), bytes)
            .map_err(|e| self.fail("snapshot", e.to_string()))?;
        for e in &self.written[*covered..] {
            restored
                .apply(e)
                .map_err(|e| self.fail("replay", e.to_string()))?;
        }
        self.report.snapshot_restores += 1;
        Ok(restored)
    }

    fn replayed(&self) -> Result<Ledger, Failure> {
        let fresh = Ledger::new(&self.set, pan_key());
        for e in &self.written {
            fresh
                .apply(e)
                .map_err(|e| self.fail("replay", e.to_string()))?;
        }
        Ok(fresh)
    }

    fn check_replay(&self, invariant: &'static str) -> Result<(), Failure> {
        let mut live = Vec::new();
        self.ledger.snapshot(&mut live);
        let mut replay = Vec::new();
        self.replayed()?.snapshot(&mut replay);
        if live != replay {
            return Err(self.fail(
                invariant,
                format!(
                    "replay of {} records differs from the live ledger ({} vs {} bytes)",
                    self.written.len(),
                    replay.len(),
                    live.len()
                ),
            ));
        }
        Ok(())
    }

    /// (a) limits recomputed from the acknowledged answers alone: per original (the sale
    /// amount) and per merchant-local day (amount and count caps). A refund that a reversal in
    /// the journal undid no longer counts, once, however many reversals name it.
    ///
    /// The ledger's own usage (per day, per month, per original) may be higher than these
    /// sums (durable refunds whose answer was lost in a crash), never lower: lower means it
    /// gave back something the journal does not undo, such as a reversal applied twice.
    fn check_limits(&self) -> Result<(), Failure> {
        let reversed = self.reversed_in_journal();
        let mut per_original: HashMap<(usize, u32), u64> = HashMap::new();
        let mut per_day: HashMap<(usize, i64), (u64, u32)> = HashMap::new();
        let mut per_month: HashMap<(usize, i64), (u64, u32)> = HashMap::new();
        let mut sales: HashMap<(usize, u32), usize> = HashMap::new();
        for a in &self.acked {
            let r = &self.reqs[a.req];
            if r.op == Operation::Sale && a.decision.is_approved() {
                sales.insert((r.merchant, r.stan), a.req);
            }
        }
        for a in &self.acked {
            let r = &self.reqs[a.req];
            if r.op != Operation::Refund || !a.decision.is_approved() {
                continue;
            }
            let Some((stan, _, _)) = r.original else {
                continue;
            };
            if reversed.contains(&(r.terminal, r.stan, r.transmission)) {
                continue;
            }
            let o = per_original.entry((r.merchant, stan)).or_default();
            *o += r.amount;
            let cap = sales
                .get(&(r.merchant, stan))
                .map_or(0, |&i| self.reqs[i].amount);
            if *o > cap {
                return Err(self.fail(
                    "a",
                    format!(
                        "refunds of m{} stan {stan} acknowledged {} > sale {cap}",
                        r.merchant, *o
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
        let sums = Sums {
            per_day,
            per_month,
            per_original,
            sales,
        };
        self.check_usage_floor(&sums)
    }

    /// The second half of (a): the ledger's usage per day, month and original is never below
    /// what the acknowledged answers add up to.
    fn check_usage_floor(&self, sums: &Sums) -> Result<(), Failure> {
        let Sums {
            per_day,
            per_month,
            per_original,
            sales,
        } = sums;
        let day = (self.now + OFFSET_S).div_euclid(86_400);
        for (m, id) in MERCHANTS.iter().enumerate() {
            let Some(usage) = self.ledger.usage(id, self.now) else {
                continue;
            };
            let today = per_day.get(&(m, day)).copied().unwrap_or_default();
            let month = per_month
                .get(&(m, month_of(day)))
                .copied()
                .unwrap_or_default();
            if usage.day_amount < today.0 || usage.day_count < today.1 {
                return Err(self.fail(
                    "a",
                    format!(
                        "m{m}: the ledger counts {} refunds for {} today, the acknowledged answers {} for {}",
                        usage.day_count, usage.day_amount, today.1, today.0
                    ),
                ));
            }
            if usage.month_amount < month.0 || usage.month_count < month.1 {
                return Err(self.fail(
                    "a",
                    format!(
                        "m{m}: the ledger counts {} refunds for {} this month, the acknowledged answers {} for {}",
                        usage.month_count, usage.month_amount, month.1, month.0
                    ),
                ));
            }
        }
        for (&(m, stan), &refunded) in per_original {
            let Some(&i) = sales.get(&(m, stan)) else {
                continue;
            };
            let sale = &self.reqs[i];
            let reference = OriginalRef::Iso {
                mti: 200,
                stan,
                transmission: sale.transmission,
                rrn: None,
            };
            let Some(view) =
                self.ledger
                    .original(MERCHANTS[m], TERMINALS[sale.terminal], reference)
            else {
                continue;
            };
            if view.refunded < refunded {
                return Err(self.fail(
                    "a",
                    format!(
                        "m{m} stan {stan}: the ledger has {} refunded, the acknowledged answers {refunded}",
                        view.refunded
                    ),
                ));
            }
        }
        Ok(())
    }

    /// (terminal, STAN, DE7) of every transaction a reversal in the journal names.
    fn reversed_in_journal(&self) -> HashSet<(usize, u32, u64)> {
        self.written
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Reversal { target, .. } => {
                    let t = TERMINALS
                        .iter()
                        .position(|t| *t == target.terminal.as_str())?;
                    Some((t, target.stan, u64::from(target.tag)))
                }
                _ => None,
            })
            .collect()
    }

    /// (d) refunds reserved in the ledger = forwarded refunds held.
    fn check_holds(&self) -> Result<(), Failure> {
        for (m, id) in MERCHANTS.iter().enumerate() {
            let held: u64 = self
                .held
                .iter()
                .filter(|h| self.reqs[h.req].merchant == m)
                .map(|h| self.reqs[h.req].amount)
                .sum();
            let reserved = self.ledger.funds(id).map_or(0, |f| f.refunds_reserved);
            if reserved != held {
                return Err(self.fail(
                    "d",
                    format!("m{m}: ledger holds {reserved} in reservations, the simulation {held}"),
                ));
            }
        }
        Ok(())
    }
}

/// The month (a running number) of merchant-local day `day` (days since 1970-01-01).
fn month_of(day: i64) -> i64 {
    let date = crate::date::Civil::from_days(day);
    date.year * 12 + i64::from(date.month)
}

/// Refusals that are not answers to remember (a retry is decided anew). Row 3 of DOMAIN §5
/// (merchant, terminal, sign-on, batch) is checked before row 4 (duplicates), so its answers
/// are not stored either: a 0500 answered 03 before its terminal signed on is settled when
/// repeated after the sign-on.
fn transient(r: Reason) -> bool {
    [
        Reason::UNKNOWN_MERCHANT,
        Reason::UNKNOWN_TERMINAL,
        Reason::BATCH_MISMATCH,
        Reason::STORE_UNAVAILABLE,
        Reason::CUTOVER,
        Reason::DUPLICATE,
        Reason::INTERNAL_ERROR,
        Reason::BALANCE_PENDING,
        Reason::HOST_TIMEOUT,
    ]
    .contains(&r)
}

/// Arguments of `sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seeds to run from `--seed` on.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 2000)]
    pub steps: u32,
    /// Re-introduce a known bug (to see the invariants catch it).
    #[arg(long, value_enum, default_value_t = Mutation::None)]
    pub mutation: Mutation,
    /// Drive the real gateway core (codec, `flow`, ledger, journal over a simulated disk,
    /// snapshots, recovery) instead of the model of the flow.
    #[arg(long)]
    pub core: bool,
    /// With `--core`: re-introduce a known bug on the real stack.
    #[arg(long, value_enum, default_value_t = CoreMutation::None, requires = "core")]
    pub core_mutation: CoreMutation,
}

/// Runs `sim`; exit 0 when every seed held every invariant, 1 otherwise.
pub fn main(args: &SimArgs) -> std::process::ExitCode {
    if args.core {
        return main_core(args);
    }
    let started = crate::clock::monotonic();
    let mut total = Report::default();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        match run(seed, args.steps, args.mutation) {
            Ok(r) => {
                total.add(&r);
            }
            Err(f) => {
                eprintln!("{f}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "sim: {} seeds from {} x {} steps: {} requests, {} answers acknowledged, {} crashes, {} failed syncs, {} rebuilds from a snapshot, {} full disks, {} repeats checked, {} keys reused, {} sales after their reversal, {} batches settled, {} answered 95; all invariants held ({:.1} seeds/s)",
        args.seeds,
        args.seed,
        args.steps,
        total.requests,
        total.acknowledged,
        total.crashes,
        total.sync_failures,
        total.snapshot_restores,
        total.disk_full,
        total.repeats_checked,
        total.key_reuses,
        total.reordered,
        total.batches_settled,
        total.batches_unreconciled,
        args.seeds as f64 / secs
    );
    std::process::ExitCode::SUCCESS
}

/// `sim --core`: the real gateway core, seed after seed.
fn main_core(args: &SimArgs) -> std::process::ExitCode {
    let started = crate::clock::monotonic();
    let mut total = CoreReport::default();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        match run_core(seed, args.steps, args.core_mutation) {
            Ok(r) => {
                total.add(&r);
            }
            Err(f) => {
                let mutation = clap::ValueEnum::to_possible_value(&args.core_mutation)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                eprintln!("{f} --core --core-mutation {mutation}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "sim --core: {} seeds from {} x {} steps: {} messages in {} batches, {} answers acknowledged ({} approved, {} answered 96), {} crashes ({} mid-batch), {} failed journal steps, {} full-disk steps, {} snapshots, {} restarts from a snapshot, {} durable points replayed, {} repeats checked, {} keys reused, {} bad messages; upstream: {} routed answers ({} host timeouts), {} host-fault steps, {} host connections, {} reversals owed, {} gateway reversals at the host ({} as repeats); {} funds checks; all invariants held ({:.1} seeds/s)",
        args.seeds,
        args.seed,
        args.steps,
        total.messages,
        total.batches,
        total.acknowledged,
        total.approved,
        total.store_unavailable,
        total.crashes,
        total.crashes_mid_batch,
        total.failed_steps,
        total.disk_full_steps,
        total.snapshots,
        total.snapshot_restores,
        total.durable_points,
        total.repeats_checked,
        total.key_reuses,
        total.bad_messages,
        total.routed,
        total.host_timeouts,
        total.host_fault_steps,
        total.host_connections,
        total.owed_reversals,
        total.reversals_at_host,
        total.repeats_at_host,
        total.funds_checks,
        args.seeds as f64 / secs
    );
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_of_a_day_turns_over_on_the_first() {
        let jan_31_2026 = T0 / 86_400;
        assert_eq!(month_of(0), 1970 * 12 + 1);
        assert_eq!(month_of(jan_31_2026), 2026 * 12 + 1);
        assert_eq!(month_of(jan_31_2026 + 1), 2026 * 12 + 2);
        assert_eq!(month_of(jan_31_2026 - 31), 2025 * 12 + 12);
    }
}
