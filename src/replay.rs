//! `refundgate replay`: policy what-if replay (issue 22). Re-decides the requests of a journal
//! under another merchant file and reports every answer that would change.
//!
//! The journal is opened read-only ([`journal::ReadOnly`]: no write, no lock, no truncation),
//! so it runs on a live journal or a copy of one. Two ledgers are rebuilt side by side from
//! the journal's start (or from its snapshot when the records before it are gone): the
//! journaled one, which applies every event as recovery does and gives each request's old
//! answer, and the what-if one, which decides every request again under the new policies
//! ([`Ledger::redo`]) and applies the new outcome, so later decisions see the changed state.
//! Merchants absent from the new file keep their journaled policies (`PolicySet` events).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::cli::{EXIT_IOERR, EXIT_USAGE};
use crate::clock::UnixSeconds;
use crate::journal;
use crate::ledger::whatif::Redone;
use crate::ledger::{
    Decision, Dialect, EventBody, Figures, Ledger, LedgerEvent, MerchantSet, PanKey, Policy,
    Reason, SameDayRefund,
};

/// `refundgate replay` arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The journal directory (a live one or a copy); opened read-only.
    #[arg(long)]
    pub journal: PathBuf,
    /// The what-if merchant file: its merchants are decided under its policies.
    #[arg(long)]
    pub merchants: Option<PathBuf>,
    /// The merchant file the gateway ran with (merchants and terminals); default the
    /// embedded sample set, as `serve` without `--merchants`.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Report decisions from this time on (RFC 3339, e.g. 2026-12-04T09:00:00Z, or unix
    /// seconds); earlier ones are still replayed.
    #[arg(long)]
    pub from: Option<String>,
    /// Report decisions up to this time (inclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What to replay and report.
#[derive(Debug, Clone)]
pub struct Options {
    /// The merchants and terminals the journal was written under.
    pub base: MerchantSet,
    /// What-if policies (merchants of `base` only).
    pub whatif: Option<MerchantSet>,
    /// Report window, unix seconds, inclusive.
    pub from: Option<UnixSeconds>,
    /// Report window, unix seconds, inclusive.
    pub to: Option<UnixSeconds>,
}

/// The replay's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Seq of the first record replayed.
    pub from_seq: u64,
    /// The snapshot the ledgers started from (the records before it are gone), if any.
    pub snapshot_seq: Option<u64>,
    /// The last seq read.
    pub last_seq: u64,
    /// The journal ended in a torn record (read up to the last whole one).
    pub torn_tail: bool,
    /// Records replayed.
    pub records: u64,
    /// Requests in the report window.
    pub requests: u64,
    /// Of those, decided again under the what-if policy.
    pub redecided: u64,
    /// Of those, kept as journaled: upstream answers, settlement reconciliations, declines
    /// journaled without their request (before event version 3).
    pub kept: u64,
    /// Events of merchants the base file does not have (skipped).
    pub unknown_merchant_events: u64,
    /// Every answer that changes, in journal order.
    pub changes: Vec<Change>,
    /// Per reason: answers with it before and after.
    pub totals: Vec<Total>,
    /// Per (old reason, new reason) pair that changed: how many.
    pub transitions: Vec<Transition>,
}

/// One answer that changes.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Journal seq of the request's event.
    pub seq: u64,
    /// Decision time, RFC 3339 UTC.
    pub at: String,
    /// Decision time, unix seconds.
    pub at_unix: UnixSeconds,
    /// DE42.
    pub merchant: String,
    /// DE41.
    pub terminal: String,
    /// DE11, six digits.
    pub stan: String,
    /// Key date MMDD (DE13).
    pub date: String,
    /// sale, refund, void or reversal.
    pub operation: &'static str,
    /// Masked PAN (first 6 + last 4), when the request carried one.
    pub pan: Option<String>,
    /// DE4, minor units (absent for reversals: not journaled).
    pub amount: Option<u64>,
    /// The journaled answer.
    pub old: Answer,
    /// The what-if answer.
    pub new: Answer,
    /// What made the difference.
    pub rule: Rule,
}

/// An answer: DE39 in the request's dialect, DE44 and the figures.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// DE39.
    pub code: &'static str,
    /// DE44.
    pub reason: &'static str,
    /// The figures that decided (DE54, `explain`).
    pub figures: Figures,
}

/// The DOMAIN §5 row and reason that made the difference, and the policy knob behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// DOMAIN §5 row (`"12"`), or `"§9"` for a reversal's outcome.
    pub row: &'static str,
    /// The reason of the side that declined (the new one if both did).
    pub reason: &'static str,
    /// The merchant-file knob behind it, when one is.
    pub knob: Option<&'static str>,
    /// Its value in the journaled policy.
    pub old_value: Option<String>,
    /// Its value in the what-if policy (equal to `old_value`: the state changed, through
    /// earlier what-if decisions, not the knob).
    pub new_value: Option<String>,
}

/// Answers with one reason, before and after.
#[derive(Debug, Clone, Serialize)]
pub struct Total {
    /// DE44.
    pub reason: &'static str,
    /// Journaled.
    pub old: u64,
    /// What-if.
    pub new: u64,
}

/// Answers that moved from one reason to another.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    /// Journaled reason.
    pub old: &'static str,
    /// What-if reason.
    pub new: &'static str,
    /// How many.
    pub count: u64,
}

/// Why the replay could not run: the exit code and one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError {
    /// 64 (bad usage or merchant file) or 74 (journal unusable).
    pub code: u8,
    /// One line.
    pub message: String,
}

/// Runs `refundgate replay`.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let result = options(args).and_then(|opts| replay_dir(&args.journal, &opts));
    match result {
        Ok(report) => {
            let text = if args.json {
                serde_json::to_string_pretty(&report).unwrap_or_default()
            } else {
                render(&report)
            };
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("refundgate: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn usage(message: String) -> ReplayError {
    ReplayError {
        code: EXIT_USAGE,
        message,
    }
}

fn io(message: String) -> ReplayError {
    ReplayError {
        code: EXIT_IOERR,
        message,
    }
}

/// The options `args` name, every file read and validated.
pub fn options(args: &ReplayArgs) -> Result<Options, ReplayError> {
    let base = crate::serve::load_merchants(args.base.as_deref())
        .map_err(|e| usage(format!("--base {e}")))?;
    let whatif = args
        .merchants
        .as_deref()
        .map(|p| crate::serve::load_merchants(Some(p)).map_err(|e| usage(format!("--{e}"))))
        .transpose()?;
    if let Some(w) = &whatif {
        if let Some(m) = w
            .merchants
            .iter()
            .find(|m| !base.merchants.iter().any(|b| b.id == m.id))
        {
            return Err(usage(format!(
                "--merchants: merchant {:?} is not in the base merchant set (--base)",
                m.id
            )));
        }
    }
    let time = |flag: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| parse_time(s).ok_or_else(|| usage(format!("--{flag}: {s:?} is neither RFC 3339 (2026-12-04T09:00:00Z) nor unix seconds"))))
            .transpose()
    };
    let from = time("from", &args.from)?;
    let to = time("to", &args.to)?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(usage("--from is after --to".to_string()));
        }
    }
    Ok(Options {
        base,
        whatif,
        from,
        to,
    })
}

/// Replays the journal in `dir` under `opts` (read-only).
///
/// A live gateway may write a snapshot and remove the segments it covers while they are
/// read: a file that vanished that way makes the replay start again (at most three times).
pub fn replay_dir(dir: &Path, opts: &Options) -> Result<Report, ReplayError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match replay_once(dir, opts) {
            Err(Attempt::Vanished(_)) if attempt < 3 => continue,
            Err(Attempt::Vanished(e) | Attempt::Failed(e)) => return Err(e),
            Ok(report) => return Ok(report),
        }
    }
}

/// How one pass over the journal failed.
enum Attempt {
    /// A journal file disappeared under it (a snapshot of the live gateway).
    Vanished(ReplayError),
    Failed(ReplayError),
}

impl From<ReplayError> for Attempt {
    fn from(e: ReplayError) -> Self {
        Attempt::Failed(e)
    }
}

fn replay_once(dir: &Path, opts: &Options) -> Result<Report, Attempt> {
    let journal_err = |e: journal::JournalError| {
        let vanished = matches!(&e, journal::JournalError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound && dir.is_dir());
        let e = io(format!("journal {}: {e}", dir.display()));
        if vanished {
            Attempt::Vanished(e)
        } else {
            Attempt::Failed(e)
        }
    };
    let view = journal::ReadOnly::open(dir).map_err(journal_err)?;
    // A dummy key: replay never hashes a PAN, it reads the journaled hashes.
    let key = PanKey::new(&[0; 16]);
    let whatif_set = whatif_set(opts);
    let from_start = view.first_seq.is_none_or(|s| s == 1);
    let (old, new, after_seq, snapshot_seq) = match (&view.snapshot, from_start) {
        (Some(snap), false) => {
            let restore = |set: &MerchantSet| {
                Ledger::restore(set, key.clone(), &snap.bytes).map_err(|e| {
                    io(format!(
                        "journal {}: snapshot {}: {e}",
                        dir.display(),
                        snap.seq
                    ))
                })
            };
            (
                restore(&opts.base)?,
                restore(&whatif_set)?,
                snap.seq,
                Some(snap.seq),
            )
        }
        _ => (
            Ledger::new(&opts.base, key.clone()),
            Ledger::new(&whatif_set, key.clone()),
            0,
            None,
        ),
    };
    let pinned: Vec<String> = opts
        .whatif
        .iter()
        .flat_map(|w| w.merchants.iter())
        .map(|m| m.id.clone())
        .collect();
    for m in opts.whatif.iter().flat_map(|w| w.merchants.iter()) {
        // Known: `options` checked every what-if merchant is in the base set.
        let _ = new.set_policy_unlogged(&m.id, m.policy.clone());
    }
    let mut run = Run {
        opts,
        old,
        new,
        pinned,
        acc: Acc::default(),
        bad: None,
    };
    let records = view
        .records(after_seq, |seq, payload| run.record(seq, payload))
        .map_err(journal_err)?;
    if let Some(bad) = run.bad {
        return Err(io(format!("journal {}: {bad}", dir.display())).into());
    }
    Ok(run.acc.report(Start {
        from_seq: after_seq + 1,
        snapshot_seq,
        last_seq: view.last_seq,
        torn_tail: view.torn_tail,
        records,
    }))
}

/// The base set with the what-if merchants' policies (their starting reserve included).
fn whatif_set(opts: &Options) -> MerchantSet {
    let mut set = opts.base.clone();
    for m in &mut set.merchants {
        if let Some(w) = opts
            .whatif
            .iter()
            .flat_map(|w| w.merchants.iter())
            .find(|w| w.id == m.id)
        {
            m.policy = w.policy.clone();
        }
    }
    set
}

/// The two ledgers and what has been counted so far.
struct Run<'a> {
    opts: &'a Options,
    old: Ledger,
    new: Ledger,
    /// Merchants decided under the what-if file: their journaled policy events are skipped.
    pinned: Vec<String>,
    acc: Acc,
    bad: Option<String>,
}

impl Run<'_> {
    fn record(&mut self, seq: u64, payload: &[u8]) {
        if self.bad.is_some() {
            return;
        }
        let event = match LedgerEvent::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                self.bad = Some(format!("record {seq}: {e}"));
                return;
            }
        };
        let merchant = event.merchant.as_str();
        let Some(currency) = self.old.currency(&event.merchant) else {
            self.acc.unknown_merchant_events += 1;
            return;
        };
        let old_policy_before = matches!(event.body, EventBody::PolicySet(_))
            .then(|| self.old.policy(merchant))
            .flatten();
        let Ok(old) = self.old.apply(&event) else {
            self.acc.unknown_merchant_events += 1;
            return;
        };
        if old_policy_before.is_some() && self.pinned.iter().any(|m| m == merchant) {
            // The what-if policy stays in force for this merchant.
            return;
        }
        let Ok(redone) = self.new.redo(&event, currency) else {
            return;
        };
        let in_window = self.opts.from.is_none_or(|f| event.at >= f)
            && self.opts.to.is_none_or(|t| event.at <= t);
        let (new, kept) = match redone {
            Redone::Applied => return,
            Redone::Decided(d) => (d, false),
            Redone::Kept(d) => (d, true),
        };
        if !in_window {
            return;
        }
        self.acc
            .count(seq, &event, &old, &new, kept, &self.old, &self.new);
    }
}

/// Where the replay started and what it read.
struct Start {
    from_seq: u64,
    snapshot_seq: Option<u64>,
    last_seq: u64,
    torn_tail: bool,
    records: u64,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    redecided: u64,
    kept: u64,
    unknown_merchant_events: u64,
    changes: Vec<Change>,
    totals: BTreeMap<u8, (u64, u64)>,
    transitions: BTreeMap<(u8, u8), u64>,
}

impl Acc {
    #[allow(clippy::too_many_arguments)]
    fn count(
        &mut self,
        seq: u64,
        event: &LedgerEvent,
        old: &Decision,
        new: &Decision,
        kept: bool,
        old_ledger: &Ledger,
        new_ledger: &Ledger,
    ) {
        self.requests += 1;
        if kept {
            self.kept += 1;
        } else {
            self.redecided += 1;
        }
        self.totals.entry(old.reason.to_u8()).or_default().0 += 1;
        self.totals.entry(new.reason.to_u8()).or_default().1 += 1;
        if old.reason == new.reason && old.code == new.code {
            return;
        }
        *self
            .transitions
            .entry((old.reason.to_u8(), new.reason.to_u8()))
            .or_default() += 1;
        let merchant = event.merchant.as_str();
        let policies = (old_ledger.policy(merchant), new_ledger.policy(merchant));
        self.changes.push(change(
            seq,
            event,
            old,
            new,
            policies.0.as_ref(),
            policies.1.as_ref(),
        ));
    }

    fn report(self, start: Start) -> Report {
        let name = |n: u8| Reason::from_u8(n).map_or("INTERNAL_ERROR", Reason::as_str);
        Report {
            from_seq: start.from_seq,
            snapshot_seq: start.snapshot_seq,
            last_seq: start.last_seq,
            torn_tail: start.torn_tail,
            records: start.records,
            requests: self.requests,
            redecided: self.redecided,
            kept: self.kept,
            unknown_merchant_events: self.unknown_merchant_events,
            changes: self.changes,
            totals: self
                .totals
                .into_iter()
                .map(|(r, (old, new))| Total {
                    reason: name(r),
                    old,
                    new,
                })
                .collect(),
            transitions: self
                .transitions
                .into_iter()
                .map(|((o, n), count)| Transition {
                    old: name(o),
                    new: name(n),
                    count,
                })
                .collect(),
        }
    }
}

fn change(
    seq: u64,
    event: &LedgerEvent,
    old: &Decision,
    new: &Decision,
    old_policy: Option<&Policy>,
    new_policy: Option<&Policy>,
) -> Change {
    let (answer, op, txn, cup) = match &event.body {
        EventBody::Sale { answer, txn } => (Some(answer), "sale", Some(txn), None),
        EventBody::Refund { answer, txn, .. } => (Some(answer), "refund", Some(txn), None),
        EventBody::Void { answer, txn, .. } => (Some(answer), "void", Some(txn), None),
        EventBody::Reversal { answer, target } => (
            Some(answer),
            "reversal",
            None,
            Some(target.tag & (1 << 31) != 0),
        ),
        EventBody::Declined {
            answer, request, ..
        } => {
            let op = request.as_ref().map_or("request", |r| operation_name(r.op));
            (
                Some(answer),
                op,
                request.as_ref().map(|r| &r.txn),
                request.as_ref().map(|r| r.cup),
            )
        }
        _ => (None, "event", None, None),
    };
    let cup = cup.unwrap_or_else(|| txn.is_some_and(|t| t.key.tag & (1 << 31) != 0));
    let dialect = if cup {
        Dialect::CupPos
    } else {
        Dialect::Ascii1987
    };
    let answer_of = |d: &Decision| Answer {
        code: d.de39(dialect),
        reason: d.reason.as_str(),
        figures: d.figures,
    };
    Change {
        seq,
        at: rfc3339(event.at),
        at_unix: event.at,
        merchant: event.merchant.as_str().to_string(),
        terminal: answer.map_or(String::new(), |a| a.terminal.as_str().to_string()),
        stan: answer.map_or(String::new(), |a| format!("{:06}", a.stan)),
        date: answer.map_or(String::new(), |a| format!("{:04}", a.mmdd)),
        operation: op,
        pan: txn.map(|t| t.pan.to_string()),
        amount: txn.map(|t| t.amount),
        old: answer_of(old),
        new: answer_of(new),
        rule: rule(old, new, old_policy, new_policy),
    }
}

fn operation_name(op: crate::ledger::Operation) -> &'static str {
    use crate::ledger::Operation;
    match op {
        Operation::Sale => "sale",
        Operation::Refund => "refund",
        Operation::Void => "void",
        Operation::Reversal => "reversal",
        Operation::Settlement => "settlement",
    }
}

/// The rule behind a change: the reason of the side that declined (the new one when both
/// did), its DOMAIN §5 row and knob, and the knob's value in both policies.
fn rule(
    old: &Decision,
    new: &Decision,
    old_policy: Option<&Policy>,
    new_policy: Option<&Policy>,
) -> Rule {
    let deciding = if !new.is_approved() || old.is_approved() {
        new.reason
    } else {
        old.reason
    };
    // Both approved (a reversal that now undoes or no longer undoes): the §9 outcome.
    let deciding = if old.is_approved() && new.is_approved() && deciding == Reason::APPROVED {
        old.reason
    } else {
        deciding
    };
    let (row, knob) = row_and_knob(deciding);
    let value = |p: Option<&Policy>| knob.and_then(|k| Some(knob_value(p?, k)));
    Rule {
        row,
        reason: deciding.as_str(),
        knob,
        old_value: value(old_policy),
        new_value: value(new_policy),
    }
}

/// DOMAIN §5 row and merchant-file knob of a reason.
fn row_and_knob(r: Reason) -> (&'static str, Option<&'static str>) {
    match r {
        Reason::FORMAT_ERROR => ("1", None),
        Reason::MAC_INVALID => ("2", None),
        Reason::UNKNOWN_MERCHANT | Reason::UNKNOWN_TERMINAL | Reason::BATCH_MISMATCH => ("3", None),
        Reason::DUPLICATE => ("4", None),
        Reason::STORE_UNAVAILABLE | Reason::CUTOVER => ("5", None),
        Reason::INVALID_AMOUNT => ("6", Some("currency")),
        Reason::ORIGINAL_NOT_FOUND => ("7", None),
        Reason::PAN_MISMATCH
        | Reason::ORIGINAL_NOT_APPROVED
        | Reason::ORIGINAL_VOIDED
        | Reason::ORIGINAL_REVERSED
        | Reason::TYPE_NOT_REFUNDABLE
        | Reason::REVERSED_BEFORE_COMMIT => ("8", None),
        Reason::USE_REFUND => ("9", None),
        Reason::USE_VOID => ("9", Some("same_day_refund")),
        Reason::REFUND_WINDOW_EXPIRED => ("9", Some("refund_window_days")),
        Reason::VOID_AMOUNT_MISMATCH | Reason::AMOUNT_EXCEEDS_REMAINING => ("10", None),
        Reason::TERMINAL_NOT_PERMITTED => ("11", Some("refund_enabled")),
        Reason::CARD_NOT_PERMITTED => ("11", Some("denied_card_types")),
        Reason::SINGLE_REFUND_CAP => ("12", Some("refund_single_max")),
        Reason::REFUNDABLE_SHARE => ("12", Some("refundable_share_percent")),
        Reason::ORIGINAL_REFUND_COUNT => ("12", Some("original_refund_count_max")),
        Reason::CARD_DAY_AMOUNT => ("12", Some("card_refund_day_amount_max")),
        Reason::CARD_DAY_COUNT => ("12", Some("card_refund_day_count_max")),
        Reason::MERCHANT_DAY_AMOUNT => ("12", Some("refund_day_amount_max")),
        Reason::MERCHANT_MONTH_AMOUNT => ("12", Some("refund_month_amount_max")),
        Reason::MERCHANT_DAY_COUNT => ("12", Some("refund_day_count_max")),
        Reason::MERCHANT_MONTH_COUNT => ("12", Some("refund_month_count_max")),
        Reason::BALANCE_INSUFFICIENT | Reason::BALANCE_PENDING => ("13", Some("reserve")),
        Reason::HOST_UNREACHABLE
        | Reason::NO_ROUTE
        | Reason::HOST_TIMEOUT
        | Reason::HOST_DECLINED => ("14", None),
        Reason::REVERSAL_NOT_APPLIED
        | Reason::REVERSAL_APPLIED
        | Reason::REVERSAL_NOTHING_TO_UNDO => ("§9", None),
        _ => ("—", None),
    }
}

/// A knob's value in `p`, as the merchant file writes it (`none` when unset).
fn knob_value(p: &Policy, knob: &str) -> String {
    let opt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
    let count = |v: Option<u32>| opt(v.map(u64::from));
    match knob {
        "currency" => p.currency.to_string(),
        "same_day_refund" => match p.same_day_refund {
            SameDayRefund::Allow => "allow".into(),
            SameDayRefund::UseVoid => "use_void".into(),
        },
        "refund_window_days" => p.refund_window_days.to_string(),
        "refund_enabled" => format!("{} (void_enabled {})", p.refund_enabled, p.void_enabled),
        "denied_card_types" => format!("{:?}", p.denied_card_types).to_lowercase(),
        "refund_single_max" => opt(p.refund_single_max),
        "refundable_share_percent" => p.refundable_share_percent.to_string(),
        "original_refund_count_max" => count(p.original_refund_count_max),
        "card_refund_day_amount_max" => opt(p.card_refund_day_amount_max),
        "card_refund_day_count_max" => count(p.card_refund_day_count_max),
        "refund_day_amount_max" => opt(p.refund_day_amount_max),
        "refund_month_amount_max" => opt(p.refund_month_amount_max),
        "refund_day_count_max" => count(p.refund_day_count_max),
        "refund_month_count_max" => count(p.refund_month_count_max),
        "reserve" => p.reserve.to_string(),
        _ => String::new(),
    }
}

/// The text report: one block per change, then the totals.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for c in &r.changes {
        let _ = writeln!(
            out,
            "seq {} {} {} {} stan {} date {} {}{}{}",
            c.seq,
            c.at,
            c.merchant,
            c.terminal,
            c.stan,
            c.date,
            c.operation,
            c.pan.as_ref().map_or(String::new(), |p| format!(" {p}")),
            c.amount.map_or(String::new(), |a| format!(" amount {a}")),
        );
        let knob = match (&c.rule.knob, &c.rule.old_value, &c.rule.new_value) {
            (Some(k), Some(o), Some(n)) if o != n => format!("; {k} {o} → {n}"),
            (Some(k), Some(o), _) => {
                format!("; {k} {o}, unchanged: earlier what-if decisions changed the state")
            }
            _ => String::new(),
        };
        let figures = |f: &Figures| match (f.limit, f.used, f.remaining) {
            (Some(l), u, rem) => format!(
                " (limit {l}, used {}, remaining {})",
                u.map_or("-".into(), |u| u.to_string()),
                rem.map_or("-".into(), |r| r.to_string())
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} {}{} → {} {}{}   rule: row {} {}{}",
            c.old.code,
            c.old.reason,
            figures(&c.old.figures),
            c.new.code,
            c.new.reason,
            figures(&c.new.figures),
            c.rule.row,
            c.rule.reason,
            knob
        );
    }
    let _ = writeln!(
        out,
        "{} of {} requests change ({} decided again, {} kept as journaled); records {}..={}{}{}",
        r.changes.len(),
        r.requests,
        r.redecided,
        r.kept,
        r.from_seq,
        r.last_seq,
        r.snapshot_seq
            .map_or(String::new(), |s| format!(" after snapshot {s}")),
        if r.torn_tail {
            " (torn tail: read up to the last whole record)"
        } else {
            ""
        },
    );
    if r.unknown_merchant_events > 0 {
        let _ = writeln!(
            out,
            "{} events of merchants not in the base merchant set were skipped (--base)",
            r.unknown_merchant_events
        );
    }
    let _ = writeln!(out, "{:<26} {:>10} {:>10}", "reason", "old", "new");
    for t in &r.totals {
        let _ = writeln!(out, "{:<26} {:>10} {:>10}", t.reason, t.old, t.new);
    }
    out.pop();
    out
}

/// Unix seconds, or RFC 3339 with a `Z` or `±HH:MM` offset (fractions ignored).
pub fn parse_time(s: &str) -> Option<UnixSeconds> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6 || o[3] != b':' {
                return None;
            }
            let sign = match o[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hh: i64 = rest.get(1..3)?.parse().ok()?;
            let mm: i64 = rest.get(4..6)?.parse().ok()?;
            if hh > 23 || mm > 59 {
                return None;
            }
            sign * (hh * 3600 + mm * 60)
        }
    };
    let date = crate::date::Civil {
        year: y,
        month: u32::try_from(mo).ok()?,
        day: u32::try_from(d).ok()?,
    };
    Some(date.to_days() * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// Unix seconds as RFC 3339 UTC (`2026-12-04T09:31:00Z`).
pub fn rfc3339(t: UnixSeconds) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let crate::date::Civil {
        year: y,
        month: m,
        day: d,
    } = crate::date::Civil::from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_unix_seconds_and_print_back() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-15T06:13:20+08:00"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20.5Z"), Some(1_700_000_000));
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        for bad in [
            "",
            "yesterday",
            "2023-13-01T00:00:00Z",
            "2023-11-14T22:13:20",
            "-5",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
