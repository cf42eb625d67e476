//! The message flows: decoded request → ledger decision → response bytes.
//!
//! [`Gateway::handle`] is what a connection calls for each framed message. It answers format
//! errors (30), MAC failures (63/A0), unsupported functions (40) and network management
//! itself, turns sales, refunds, voids, reversals and settlements into ledger requests, makes
//! every approval durable in the journal before it is answered (DOMAIN §7), and renders the
//! decision: DE39 per dialect, the reason in DE44, the remaining allowance in DE54.

pub mod ids;
mod render;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::clock::Clock;
pub use crate::dialect::Kind;
use crate::dialect::{Dialect, OriginalKeys, SettlementTotals};
use crate::iso8583::{self, Message, Spec};
use crate::journal::jetstream::{ReplError, Replica};
use crate::journal::{Journal, Recovered, StoreError, Ticket};
use crate::ledger::{
    self, CardType, Decision, Ledger, LedgerEvent, Operation, OriginalRef, Reason,
};
use crate::limits;
use crate::mac::{self, MacKey};
use crate::ratelimit::{self, Admit, Limiter};
use crate::server::tls::ClientCert;
use crate::server::{Dispatch, Handled, RequestCtx};
use crate::telemetry;
use crate::terminal_keys::{Identities, TerminalKeys, TerminalMac};
use crate::upstream::{Upstreams, Verdict};

/// How one listener's messages are read and protected.
#[derive(Debug)]
pub struct Link {
    /// The dialect's spec (the dialect's own, kept apart for the hot path).
    pub spec: &'static Spec,
    /// The dialect spoken: classification, original keys, response codes, echoed fields.
    pub dialect: &'static Dialect,
    /// The MAC key of the link, when it uses MACs (DOMAIN §11). On dialects with
    /// `terminal_keys`, terminals with a master key use their own MAK instead.
    pub mac: Option<MacKey>,
    /// Which ids each client certificate may use; `None`: any (DOMAIN §11, issue 18).
    pub identities: Option<Identities>,
}

impl Link {
    /// A link of `dialect` without MACs.
    pub fn plain(dialect: &'static Dialect) -> Link {
        Link {
            spec: dialect.spec(),
            dialect,
            mac: None,
            identities: None,
        }
    }
}

/// What to do with one framed message.
#[derive(Debug)]
pub enum Outcome {
    /// Send these message bytes.
    Reply(BytesMut),
    /// Send nothing (a message whose MTI or STAN could not be read).
    Drop,
}

/// The decision engine behind every listener.
pub struct Gateway {
    ledger: Arc<Ledger>,
    /// Held shared while a decision is taken and its event enqueued (never across a wait for
    /// the disk or a host), exclusively while a snapshot is serialised or the ledger is rebuilt
    /// from the journal: a snapshot then covers exactly the records enqueued before it.
    gate: tokio::sync::RwLock<()>,
    /// One rebuild at a time after a failed journal write.
    recovering: tokio::sync::Mutex<()>,
    /// The journal failure epoch the ledger was last rebuilt for.
    rebuilt_epoch: AtomicU64,
    journal: Option<Arc<Journal>>,
    /// The replicated journal (`journal.backend = "jetstream"`): decisions are appended to the
    /// stream, and applied once it acknowledged them, instead of the local journal.
    replica: Option<Arc<Replica>>,
    clock: Arc<dyn Clock>,
    links: Vec<Link>,
    upstreams: Option<Arc<Upstreams>>,
    /// Longest a batch waits for its records to be durable before answering 96.
    request_deadline: std::time::Duration,
    /// Master and working keys of the terminals that have their own (DOMAIN §11).
    terminal_keys: TerminalKeys,
    /// Sign-ons per (merchant, terminal) on MAC links.
    sign_ons: Limiter<(String, String)>,
}

/// Who sent the messages being decided: set by [`Dispatch`] for the duration of a batch, so
/// the decision can check the client certificate against the link's identities and logs can
/// be limited per source, without threading the connection through every call.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The peer's address.
    pub peer: Option<IpAddr>,
    /// The client certificate (mTLS listeners).
    pub cert: Option<Arc<ClientCert>>,
}

tokio::task_local! {
    static CALLER: Caller;
}

impl Caller {
    /// The caller of a request arriving with `ctx`.
    pub fn of(ctx: &RequestCtx) -> Caller {
        Caller {
            peer: Some(ctx.peer.ip()),
            cert: ctx.client_cert.clone(),
        }
    }

    /// Runs `f` (a call of [`Gateway::handle`] or [`Gateway::handle_batch`]) as this caller.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        CALLER.scope(self, f).await
    }

    /// The caller of the batch being decided (none outside [`Caller::scope`]).
    fn current() -> Caller {
        CALLER.try_with(Caller::clone).unwrap_or_default()
    }
}

/// The MAC key of one message: the link's, or the terminal's own MAK.
enum KeyRef<'a> {
    Link(&'a MacKey),
    Own(Arc<MacKey>),
}

impl std::ops::Deref for KeyRef<'_> {
    type Target = MacKey;
    fn deref(&self) -> &MacKey {
        match self {
            KeyRef::Link(k) => k,
            KeyRef::Own(k) => k,
        }
    }
}

/// What the gateway tells the log and metrics about one request.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Response code sent (DE39), or `None` when the message was dropped.
    pub code: Option<&'static str>,
    /// Reason sent (DE44).
    pub reason: &'static str,
}

/// A decided message: its answer, and what must happen before the answer may leave.
struct Decided {
    out: BytesMut,
    decision: Decision,
    /// The journal record the answer stands on (its own event, or the last event applied to
    /// the merchant when it is a stored answer): the answer leaves once it is durable.
    wait: Option<Ticket>,
    /// The host approved it: if the record is lost, the host must be told (reversal).
    forwarded: bool,
    /// The request's MTI (metrics label).
    mti: u16,
}

/// Merchant file reloads by outcome (`applied`, `refused`).
pub const MERCHANT_RELOADS_TOTAL: &str = "refundgate_merchant_reloads_total";

/// Why a reload of the merchant file did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadFailure {
    /// The file is invalid, or cannot replace the running set: the one-line reason. The old
    /// policies stay.
    Invalid(String),
    /// The journal could not take the change: the old policies stay (or, after a write
    /// failure, what is durable).
    Store,
}

/// Why an operator's change was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminChangeError {
    /// The ledger refused it: `INVALID_AMOUNT`, `UNKNOWN_MERCHANT`, `UNKNOWN_TERMINAL`, or
    /// `DUPLICATE` (the request id was used for another change).
    Refused(Reason),
    /// The journal could not take it or make it durable: nothing is applied.
    Store,
}

/// Why a logged ledger call did not apply.
enum LogError {
    Refused(ledger::Refused),
    Store,
}

impl From<ledger::Refused> for LogError {
    fn from(r: ledger::Refused) -> LogError {
        LogError::Refused(r)
    }
}

impl From<ReplError> for LogError {
    fn from(e: ReplError) -> LogError {
        match e {
            ReplError::Refused(r) => LogError::Refused(ledger::Refused(r)),
            _ => LogError::Store,
        }
    }
}

impl From<StoreError> for LogError {
    fn from(_: StoreError) -> LogError {
        LogError::Store
    }
}

impl Gateway {
    /// A gateway deciding with `ledger`, journaling to `journal` (none: decisions are not
    /// durable, for tests and `unsafe` runs), reading time from `clock`, one [`Link`] per
    /// listener index. The journal is switched to `hold_after_failure`: a failed write is
    /// followed by a rebuild of the ledger from what is durable before anything is decided.
    pub fn new(
        ledger: Arc<Ledger>,
        journal: Option<Arc<Journal>>,
        clock: Arc<dyn Clock>,
        links: Vec<Link>,
    ) -> Gateway {
        if let Some(j) = &journal {
            j.set_hold_after_failure(true);
        }
        Gateway {
            ledger,
            gate: tokio::sync::RwLock::new(()),
            recovering: tokio::sync::Mutex::new(()),
            rebuilt_epoch: AtomicU64::new(0),
            journal,
            replica: None,
            clock,
            links,
            upstreams: None,
            request_deadline: std::time::Duration::from_millis(
                crate::limits::REQUEST_DEADLINE_DEFAULT_MS,
            ),
            terminal_keys: TerminalKeys::empty(),
            sign_ons: Limiter::new(
                limits::SIGN_ONS_PER_TERMINAL_MAX,
                Duration::from_secs(limits::SIGN_ON_INTERVAL_S),
                limits::SIGN_ON_TERMINALS_TRACKED_MAX,
            ),
        }
    }

    /// The same gateway answering 96 (outcome unknown) to requests whose records are not
    /// durable within `deadline` (a hung disk): the connection and its slot are not held.
    pub fn with_request_deadline(mut self, deadline: std::time::Duration) -> Gateway {
        self.request_deadline = deadline;
        self
    }

    /// The same gateway with per-terminal master keys: on `cup_pos` links those terminals get
    /// fresh working keys at each sign-on and their MACs use their MAK (DOMAIN §11).
    pub fn with_terminal_keys(mut self, keys: TerminalKeys) -> Gateway {
        self.terminal_keys = keys;
        self
    }

    /// Takes a consistent snapshot of the ledger: the ticket of the last record it covers
    /// (wait for it to be durable before writing the snapshot) and the ledger's bytes.
    /// Decisions wait for the gate only while the ledger is serialised.
    pub async fn snapshot(&self) -> Option<(Ticket, Vec<u8>)> {
        let journal = self.journal.as_ref()?;
        let _exclusive = self.gate.write().await;
        if journal.is_held() {
            return None;
        }
        let ticket = journal.last_ticket();
        let mut bytes = Vec::with_capacity(1 << 20);
        self.ledger.snapshot(&mut bytes);
        Some((ticket, bytes))
    }

    /// Runs the merchants' scheduled cut-overs that are due now (DOMAIN §9a): each settles
    /// every terminal of its merchant and is journaled before it takes effect. Returns how
    /// many ran, once they are durable.
    pub async fn run_cutovers(&self) -> usize {
        let now = self.clock.now_unix_s();
        let mut ran = 0;
        let mut last = None;
        for merchant in self.ledger.due_cutovers(now) {
            if !self.store_ready().await {
                break;
            }
            let mut ticket = None;
            let done = match &self.replica {
                Some(replica) => replica
                    .step(&merchant, |log| {
                        self.ledger
                            .scheduled_cutover_logged::<ReplError>(&merchant, now, log)
                    })
                    .await
                    .and_then(|r| r)
                    .map_err(LogError::from),
                None => {
                    let _gate = self.gate.read().await;
                    self.ledger
                        .scheduled_cutover_logged::<LogError>(&merchant, now, |e| {
                            Ok(self.enqueue(e, &mut ticket)?)
                        })
                }
            };
            match done {
                Ok(Some(_)) => {
                    ran += 1;
                    last = ticket.or(last);
                    tracing::info!(
                        merchant = merchant.as_str(),
                        "scheduled cut-over settled every batch"
                    );
                }
                Ok(None) => {}
                Err(_) => tracing::warn!(
                    merchant = merchant.as_str(),
                    "scheduled cut-over not journaled; retried at the next check"
                ),
            }
        }
        if let (Some(t), Some(journal)) = (last, &self.journal) {
            // Off the connection threads, whose idle hint may not come: nothing more of
            // this change is on its way, so the journal need not wait to gather.
            journal.idle_hint();
            if journal.durable(t).await.is_err() {
                tracing::warn!("journal write of a scheduled cut-over failed");
            }
        }
        ran
    }

    /// The same gateway journaling to the replicated journal `replica` (several nodes deciding
    /// for the same merchants) instead of a local one: build it with no local journal.
    pub fn with_replica(mut self, replica: Arc<Replica>) -> Gateway {
        self.replica = Some(replica);
        self
    }

    /// The replicated journal, when the gateway uses one.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        self.replica.as_ref()
    }

    /// The same gateway forwarding routed merchants' requests to `upstreams` (DOMAIN §8).
    pub fn with_upstreams(mut self, upstreams: Arc<Upstreams>) -> Gateway {
        self.upstreams = Some(upstreams);
        self
    }

    /// The ledger, for admin calls and tests.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The ledger, shared (the replicated journal applies other nodes' events to it).
    pub fn shared_ledger(&self) -> Arc<Ledger> {
        Arc::clone(&self.ledger)
    }

    /// Now, from the gateway's clock (admin views use it).
    pub fn now(&self) -> crate::clock::UnixSeconds {
        self.clock.now_unix_s()
    }

    /// The upstream links and SAF queue, when configured (admin views).
    pub fn upstreams(&self) -> Option<&Arc<Upstreams>> {
        self.upstreams.as_ref()
    }

    /// Makes `set`'s policies the ones in force (hot reload, issue 22): with the gate held
    /// exclusively, so every merchant switches between the same two decisions; each changed
    /// policy journaled before it applies; returned once durable. An incompatible set (other
    /// merchants or terminals) is refused with one line and nothing changes.
    pub async fn reload(
        &self,
        set: &ledger::MerchantSet,
        who: &str,
    ) -> Result<Vec<(String, u32)>, ReloadFailure> {
        let counted = |outcome: &'static str| {
            metrics::counter!(MERCHANT_RELOADS_TOTAL, "outcome" => outcome).increment(1);
        };
        if !self.store_ready().await {
            counted("refused");
            return Err(ReloadFailure::Store);
        }
        let who = ledger::AdminId::new(&who[..who.len().min(64)]).unwrap_or_default();
        let now = self.clock.now_unix_s();
        let mut ticket = None;
        let done = {
            let _exclusive = self.gate.write().await;
            self.ledger
                .reload_logged(set, who, now, |e| self.enqueue(e, &mut ticket))
        };
        let changed = match done {
            Ok(changed) => changed,
            Err(ledger::ReloadError::Incompatible(e)) => {
                counted("refused");
                return Err(ReloadFailure::Invalid(e.0));
            }
            Err(ledger::ReloadError::Log(_)) => {
                counted("refused");
                let _ = self.store_ready().await;
                return Err(ReloadFailure::Store);
            }
        };
        if let (Some(t), Some(journal)) = (ticket, &self.journal) {
            // Off the connection threads, whose idle hint may not come: nothing more of
            // this change is on its way, so the journal need not wait to gather.
            journal.idle_hint();
            if journal.durable(t).await.is_err() {
                counted("refused");
                let _ = self.store_ready().await;
                return Err(ReloadFailure::Store);
            }
        }
        counted("applied");
        Ok(changed)
    }

    /// An operator's change (admin API, issue 22): journaled through the same ordered path
    /// as decisions (`*_logged` + `enqueue` under the gate) and returned once durable. A
    /// repeated request id gets its stored result (waiting until what it stands on is
    /// durable).
    pub async fn admin_change(
        &self,
        merchant: &str,
        request: ledger::AdminId,
        who: ledger::AdminId,
        intent: ledger::AdminIntent<'_>,
    ) -> Result<ledger::AdminOutcome, AdminChangeError> {
        if !self.store_ready().await {
            return Err(AdminChangeError::Store);
        }
        let now = self.clock.now_unix_s();
        if let Some(replica) = &self.replica {
            // Several nodes: appended to the merchant's subject like any decision.
            let done = replica
                .step(merchant, |log| {
                    self.ledger
                        .admin_logged::<ReplError>(merchant, request, who, intent, now, log)
                })
                .await
                .and_then(|r| r)
                .map_err(LogError::from);
            return match done {
                Ok(outcome) => Ok(outcome),
                Err(LogError::Refused(r)) => Err(AdminChangeError::Refused(r.0)),
                Err(LogError::Store) => Err(AdminChangeError::Store),
            };
        }
        let mut ticket = None;
        let done = {
            let _gate = self.gate.read().await;
            let done =
                self.ledger
                    .admin_logged::<LogError>(merchant, request, who, intent, now, |e| {
                        Ok(self.enqueue(e, &mut ticket)?)
                    });
            // A repeat's stored result may stand on a record still in flight.
            if ticket.is_none() && done.is_ok() {
                ticket = self.journal.as_ref().map(|j| j.last_ticket());
            }
            done
        };
        let outcome = match done {
            Ok(outcome) => outcome,
            Err(LogError::Refused(r)) => return Err(AdminChangeError::Refused(r.0)),
            Err(LogError::Store) => return Err(AdminChangeError::Store),
        };
        if let (Some(t), Some(journal)) = (ticket, &self.journal) {
            // Off the connection threads, whose idle hint may not come: nothing more of
            // this change is on its way, so the journal need not wait to gather.
            journal.idle_hint();
            if journal.durable(t).await.is_err() {
                // Drop what the lost record changed before answering.
                let _ = self.store_ready().await;
                return Err(AdminChangeError::Store);
            }
        }
        Ok(outcome)
    }

    /// Decides one message received on listener `link` and renders the answer.
    pub async fn handle(&self, link: usize, body: &[u8]) -> (Outcome, Summary) {
        let mut out = Vec::with_capacity(1);
        self.handle_batch(link, std::slice::from_ref(&body), &mut out)
            .await;
        out.pop().unwrap_or((
            Outcome::Drop,
            Summary {
                code: None,
                reason: "INTERNAL_ERROR",
            },
        ))
    }

    /// Decides the messages of one read, in order, and pushes their answers to `out` once
    /// every approval among them is durable: one wait for the journal per batch, not per
    /// message.
    pub async fn handle_batch<B: AsRef<[u8]>>(
        &self,
        link: usize,
        bodies: &[B],
        out: &mut Vec<(Outcome, Summary)>,
    ) {
        let started = crate::clock::monotonic();
        let Some(l) = self.links.get(link) else {
            out.extend(bodies.iter().map(|_| {
                (
                    Outcome::Drop,
                    Summary {
                        code: None,
                        reason: "INTERNAL_ERROR",
                    },
                )
            }));
            return;
        };
        let first = out.len();
        // Decoded once: the decision, a lost record's 96 and the log line all read these.
        let messages: Vec<_> = bodies
            .iter()
            .map(|body| iso8583::decode_partial(l.spec, body.as_ref()))
            .collect();
        let mut decided = Vec::with_capacity(bodies.len());
        // Consecutive plain decisions of this node's ledger are decided together (one hold of
        // a merchant's shard and of the journal's queue per merchant); anything else is
        // decided on its own, after the run before it, so answers keep the request order.
        let mut run: Vec<(&Message<'_>, Kind)> = Vec::new();
        for (msg, err) in &messages {
            if let (None, Some(kind)) = (err, self.plain_local(l, msg)) {
                run.push((msg, kind));
                continue;
            }
            if !run.is_empty() {
                self.decide_run(l, &run, &mut decided).await;
                run.clear();
            }
            decided.push(self.decide_message(l, msg, err.as_ref()).await);
        }
        if !run.is_empty() {
            self.decide_run(l, &run, &mut decided).await;
        }
        if let Some(journal) = &self.journal {
            let deadline = started + self.request_deadline;
            // One wait for the newest record of the batch covers the others of its epoch.
            let newest = decided
                .iter()
                .filter_map(|d| d.as_ref().and_then(|d| d.wait))
                .max_by_key(|t| (t.epoch, t.seq));
            if let Some(t) = newest.filter(|t| journal.status(*t).is_none()) {
                let _ = journal.durable_until(t, deadline).await;
            }
            for ((msg, _), d) in messages.iter().zip(decided.iter_mut()) {
                let Some(Decided {
                    wait: Some(t),
                    forwarded,
                    ..
                }) = d
                else {
                    continue;
                };
                let forwarded = *forwarded;
                // After the wait above the outcome is known, or the deadline has passed: a
                // plain look (the bounded wait stays as a fallback).
                let status = match journal.status(*t) {
                    Some(known) => Ok(known),
                    None => journal.durable_until(*t, deadline).await,
                };
                match status {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => {
                        tracing::warn!("journal write failed; answering 96");
                        // Drop what the lost record changed before the 96 leaves.
                        let _ = self.store_ready().await;
                        *d = Some(Box::pin(self.lost(l, msg, forwarded)).await);
                    }
                    Err(_) => {
                        // The record may still become durable: the outcome is unknown, and
                        // the terminal's repeat will get the stored answer.
                        tracing::warn!(
                            "journal not durable within the request deadline; answering 96"
                        );
                        telemetry::count_request_deadline(l.dialect.name());
                        *d = Some(Box::pin(self.lost(l, msg, false)).await);
                    }
                }
            }
        }
        let micros = started.elapsed().as_micros() as u64;
        for ((msg, _), d) in messages.iter().zip(decided) {
            out.push(self.finish(l, msg, d, micros));
        }
        debug_assert_eq!(out.len() - first, bodies.len());
    }

    /// The answer of a message whose record the journal lost: 96, and the host told.
    async fn lost(&self, l: &Link, msg: &Message<'_>, forwarded: bool) -> Decided {
        self.reverse_forwarded(l, msg, forwarded).await;
        let kind = l.dialect.classify(msg).unwrap_or(Kind::Op(Operation::Sale));
        self.answer(
            l,
            msg,
            kind,
            &Decision::bare(Reason::STORE_UNAVAILABLE),
            None,
        )
    }

    /// Logs and counts one answered message.
    fn finish(
        &self,
        l: &Link,
        msg: &Message<'_>,
        d: Option<Decided>,
        micros: u64,
    ) -> (Outcome, Summary) {
        let Some(Decided {
            out, decision, mti, ..
        }) = d
        else {
            return (
                Outcome::Drop,
                Summary {
                    code: None,
                    reason: "FORMAT_ERROR",
                },
            );
        };
        let code = decision.reason.code(l.dialect.code_column);
        let reason = decision.reason.as_str();
        telemetry::record_request(l.dialect.name(), mti_label(mti), code, reason);
        telemetry::record_decision_seconds(l.dialect.name(), micros as f64 / 1e6);
        if telemetry::request_line_enabled() {
            let masked = msg.pan().map(|p| p.masked());
            telemetry::log_request(&telemetry::RequestLine {
                dialect: l.spec.name(),
                mti: msg.mti().0,
                pan: masked.as_ref().map_or("", |m| m.as_str()),
                stan: msg.stan().unwrap_or(0),
                terminal: msg.terminal().unwrap_or(""),
                code,
                reason,
                us: micros,
            });
        }
        (
            Outcome::Reply(out),
            Summary {
                code: Some(code),
                reason,
            },
        )
    }

    /// Decodes and decides one message; `None` when it cannot be answered (dropped).
    async fn decide_message(
        &self,
        l: &Link,
        msg: &Message<'_>,
        err: Option<&iso8583::DecodeError>,
    ) -> Option<Decided> {
        match err {
            Some(e) if e.answerable() => {
                if let Some(suppressed) = bad_input_admitted() {
                    tracing::info!(dialect = l.spec.name(), mti = %msg.mti(), stan = ?e.stan, error = %e, suppressed, "message error");
                }
                telemetry::count_message_error(l.dialect.name());
                Some(self.answer(
                    l,
                    msg,
                    Kind::Op(Operation::Sale),
                    &Decision::bare(Reason::FORMAT_ERROR),
                    None,
                ))
            }
            Some(e) => {
                if let Some(suppressed) = bad_input_admitted() {
                    tracing::info!(dialect = l.spec.name(), error = %e, suppressed, "message error, dropped");
                }
                telemetry::count_message_error(l.dialect.name());
                None
            }
            None => Some(self.decide(l, msg).await),
        }
    }

    /// The kind of `msg` when it is a plain decision of this node's ledger (a merchant no
    /// upstream host is routed for, no replicated journal; an operation other than a
    /// settlement, from a terminal whose identity checks out): such messages are decided in
    /// runs by [`Gateway::decide_run`].
    fn plain_local(&self, l: &Link, msg: &Message<'_>) -> Option<Kind> {
        if self.replica.is_some()
            || self
                .upstreams
                .as_ref()
                .is_some_and(|u| u.routes(msg.merchant()))
        {
            return None;
        }
        match l.dialect.classify(msg)? {
            Kind::Op(op) if op != Operation::Settlement && self.identity_ok(l, msg) => {
                Some(Kind::Op(op))
            }
            _ => None,
        }
    }

    /// Decides a run of plain messages (see [`Gateway::plain_local`]) in order, as
    /// [`Gateway::decide`] would one by one (store, MAC, then the ledger), and pushes their
    /// answers to `out`.
    async fn decide_run(
        &self,
        l: &Link,
        run: &[(&Message<'_>, Kind)],
        out: &mut Vec<Option<Decided>>,
    ) {
        if !self.store_ready().await {
            for (msg, kind) in run {
                out.push(Some(self.answer(
                    l,
                    msg,
                    *kind,
                    &Decision::bare(Reason::STORE_UNAVAILABLE),
                    None,
                )));
            }
            return;
        }
        let now = self.clock.now_unix_s();
        let mut bufs: Vec<([u8; 19], [u8; 12])> = run
            .iter()
            .map(|(msg, _)| ([0u8; 19], sale_rrn(msg, now)))
            .collect();
        // Each message's answer if it never reaches the ledger (bad MAC, no request).
        let mut early: Vec<Option<Decided>> = Vec::with_capacity(run.len());
        let mut asked = Vec::with_capacity(run.len());
        let mut reqs = Vec::with_capacity(run.len());
        for ((msg, kind), (pan_buf, rrn_buf)) in run.iter().zip(bufs.iter_mut()) {
            let refusal = if !self.mac_ok(l, msg) {
                Reason::MAC_INVALID
            } else {
                let rrn = (*kind == Kind::Op(Operation::Sale)).then_some(*rrn_buf);
                match self.ledger_request(l, msg, *kind, pan_buf, rrn_buf) {
                    Some(req) => {
                        reqs.push(req);
                        asked.push((*msg, *kind, rrn));
                        early.push(None);
                        continue;
                    }
                    None => Reason::FORMAT_ERROR,
                }
            };
            early.push(Some(self.answer(
                l,
                msg,
                *kind,
                &Decision::bare(refusal),
                None,
            )));
        }
        let mut decided = self.decide_local(l, &asked, &reqs, now).await.into_iter();
        for (e, (msg, kind)) in early.into_iter().zip(run) {
            out.push(match e {
                Some(d) => Some(d),
                // decide_local answers every request it is given.
                None => Some(decided.next().unwrap_or_else(|| {
                    self.answer(l, msg, *kind, &Decision::bare(Reason::INTERNAL_ERROR), None)
                })),
            });
        }
    }

    /// Decides `reqs` (one per message of `msgs`, with the RRN a sale gets) on this node's
    /// ledger in order; each merchant's run is journaled under one hold of its shard and of
    /// the journal's queue.
    async fn decide_local(
        &self,
        l: &Link,
        msgs: &[(&Message<'_>, Kind, Option<[u8; 12]>)],
        reqs: &[ledger::decision::Request<'_>],
        now: i64,
    ) -> Vec<Decided> {
        let epoch = self.journal.as_ref().map_or(0, |j| j.epoch());
        let tickets = std::cell::RefCell::new(std::collections::VecDeque::new());
        let mut logged = Vec::with_capacity(reqs.len());
        let mut done = 0;
        loop {
            {
                let _gate = self.gate.read().await;
                done += self.ledger.try_decide_run_logged(
                    &reqs[done..],
                    now,
                    || {
                        let mut appender = None;
                        let tickets = &tickets;
                        move |e: &ledger::LedgerEvent| {
                            let t = self.enqueue_in(e, &mut appender)?;
                            if let Some(t) = t {
                                tickets.borrow_mut().push_back(t);
                            }
                            Ok::<u64, StoreError>(t.map_or(0, |t| t.seq))
                        }
                    },
                    &mut logged,
                );
            }
            if done >= reqs.len() {
                break;
            }
            // A merchant's shard is held by the other connection thread: serve this thread's
            // other connections meanwhile (their reads, writes and decisions) instead of
            // spinning on the lock, then go on with the rest of the run.
            tokio::task::yield_now().await;
        }
        let mut tickets = tickets.into_inner();
        logged
            .into_iter()
            .zip(msgs)
            .map(|(lg, (msg, kind, rrn))| {
                // Each applied event's ticket, in the order they were journaled; an applied
                // event with a seq but no ticket of its own (never expected) still waits.
                let ticket = match &lg {
                    ledger::Logged::Applied { seq, .. }
                        if tickets.front().is_some_and(|t| t.seq == *seq) =>
                    {
                        tickets.pop_front()
                    }
                    ledger::Logged::Applied { seq, .. } if *seq > 0 => {
                        Some(Ticket { seq: *seq, epoch })
                    }
                    _ => None,
                };
                self.logged(l, msg, *kind, lg, ticket, epoch, *rrn)
            })
            .collect()
    }

    async fn decide(&self, l: &Link, msg: &Message<'_>) -> Decided {
        let Some(kind) = l.dialect.classify(msg) else {
            return self.answer(
                l,
                msg,
                Kind::Op(Operation::Sale),
                &Decision::bare(Reason::FUNCTION_NOT_SUPPORTED),
                None,
            );
        };
        if !self.identity_ok(l, msg) {
            return self.answer(
                l,
                msg,
                kind,
                &Decision::bare(Reason::TERMINAL_NOT_PERMITTED),
                None,
            );
        }
        let now = self.clock.now_unix_s();
        if matches!(kind, Kind::Echo | Kind::SignOff) {
            return self.answer(l, msg, kind, &Decision::bare(Reason::APPROVED), None);
        }
        if !self.store_ready().await {
            return self.answer(
                l,
                msg,
                kind,
                &Decision::bare(Reason::STORE_UNAVAILABLE),
                None,
            );
        }
        if kind == Kind::SignOn {
            return Box::pin(self.sign_on(l, msg, now)).await;
        }
        if !self.mac_ok(l, msg) {
            return self.answer(l, msg, kind, &Decision::bare(Reason::MAC_INVALID), None);
        }
        if kind == Kind::Op(Operation::Settlement) {
            return Box::pin(self.settle(l, msg, now)).await;
        }
        let mut pan_buf = [0u8; 19];
        let rrn_buf = sale_rrn(msg, now);
        let Some(req) = self.ledger_request(l, msg, kind, &mut pan_buf, &rrn_buf) else {
            return self.answer(l, msg, kind, &Decision::bare(Reason::FORMAT_ERROR), None);
        };
        let rrn = (kind == Kind::Op(Operation::Sale)).then_some(rrn_buf);
        let epoch = self.journal.as_ref().map_or(0, |j| j.epoch());
        let Some(upstreams) = &self.upstreams else {
            if let Some(replica) = &self.replica {
                let logged = Box::pin(replica.decide(&req, now)).await;
                return self.logged(l, msg, kind, logged, None, 0, rrn);
            }
            let mut one = self.decide_local(l, &[(msg, kind, rrn)], &[req], now).await;
            return match one.pop() {
                Some(d) => d,
                None => self.answer(l, msg, kind, &Decision::bare(Reason::INTERNAL_ERROR), None),
            };
        };
        Box::pin(self.decide_routed(l, msg, kind, &req, now, upstreams, epoch, rrn)).await
    }

    /// [`Gateway::decide`] for a merchant routed to an upstream host: reserve, forward,
    /// commit (boxed: its future is large and most merchants are decided locally).
    #[allow(clippy::too_many_arguments)]
    async fn decide_routed(
        &self,
        l: &Link,
        msg: &Message<'_>,
        kind: Kind,
        req: &ledger::decision::Request<'_>,
        now: i64,
        upstreams: &Upstreams,
        epoch: u64,
        rrn: Option<[u8; 12]>,
    ) -> Decided {
        let mut ticket = None;
        let reservation = match &self.replica {
            // The holds are placed on this node only; the stream decides at commit.
            Some(replica) => Box::pin(replica.reserve(req, now)).await,
            None => {
                let _gate = self.gate.read().await;
                self.ledger
                    .reserve_logged(req, now, |e| self.enqueue(e, &mut ticket))
                    .map_err(|l| l.map_err(|e| ReplError::Unavailable(e.to_string())))
            }
        };
        let reservation = match reservation {
            Ok(r) => r,
            Err(logged) => return self.logged(l, msg, kind, logged, ticket, epoch, rrn),
        };
        let forwarded = match Box::pin(upstreams.forward(l.dialect, msg, kind)).await {
            Verdict::Local => false,
            Verdict::Approved => true,
            Verdict::Declined(code) => {
                let logged = match &self.replica {
                    Some(replica) => Box::pin(replica.decline_by_host(reservation, code)).await,
                    None => {
                        let _gate = self.gate.read().await;
                        self.ledger
                            .decline_by_host_logged(reservation, code, |e| {
                                self.enqueue(e, &mut ticket)
                            })
                            .map_err(|e| ReplError::Unavailable(e.to_string()))
                    }
                };
                return match logged.decision() {
                    Some(d) => {
                        let d = *d;
                        let mut out = BytesMut::with_capacity(256);
                        render::host_declined(l, msg, kind, &d, &code, &mut out);
                        Decided {
                            out,
                            decision: d,
                            wait: ticket,
                            forwarded: false,
                            mti: msg.mti().0,
                        }
                    }
                    None => self.answer(
                        l,
                        msg,
                        kind,
                        &Decision::bare(Reason::STORE_UNAVAILABLE),
                        None,
                    ),
                };
            }
            other => {
                let reason = match other {
                    Verdict::Timeout => Reason::HOST_TIMEOUT,
                    Verdict::NoRoute => Reason::NO_ROUTE,
                    _ => Reason::HOST_UNREACHABLE,
                };
                #[cfg(feature = "sim-mutations")]
                if reason == Reason::HOST_TIMEOUT && crate::sim::switches::hold_not_released() {
                    // The core simulator's re-introduced bug (test builds only): the
                    // reservation of a request the host did not answer is never given back.
                    return self.answer(l, msg, kind, &Decision::bare(reason), None);
                }
                self.ledger.release(reservation);
                return self.answer(l, msg, kind, &Decision::bare(reason), None);
            }
        };
        let mut decided = match &self.replica {
            Some(replica) => {
                // Decided again against the stream (another node may have used the limits
                // meanwhile): an approval is appended with the merchant's expected sequence.
                // Not approved now: the host's approval is reversed below.
                self.ledger.release(reservation);
                let mut logged = Box::pin(replica.decide(req, now)).await;
                if forwarded && matches!(logged, ledger::Logged::Failed(_)) {
                    // The host approved and the append's outcome is unknown: ask the stream
                    // once more (an append that did land comes back as this request's stored
                    // answer) before the host's approval is reversed below.
                    logged = Box::pin(replica.decide(req, now)).await;
                }
                self.logged(l, msg, kind, logged, None, 0, rrn)
            }
            None => {
                let logged = {
                    let _gate = self.gate.read().await;
                    self.ledger
                        .commit_logged(reservation, |e| self.enqueue(e, &mut ticket))
                };
                self.logged(l, msg, kind, logged, ticket, epoch, rrn)
            }
        };
        if forwarded {
            if decided.decision.is_approved() {
                decided.forwarded = true;
            } else {
                // The host approved what the gateway does not: reverse it there.
                self.reverse_forwarded(l, msg, true).await;
            }
        }
        decided
    }

    /// Encodes `event` and queues it in the journal (no wait): the ledger applies it right
    /// after, under the same shard lock, so journal order is apply order.
    fn enqueue(&self, event: &LedgerEvent, ticket: &mut Option<Ticket>) -> Result<u64, StoreError> {
        let t = self.enqueue_in(event, &mut None)?;
        if t.is_some() {
            *ticket = t;
        }
        Ok(t.map_or(0, |t| t.seq))
    }

    /// Journals `event` through `appender` (taken on the first record: under the ledger shard
    /// the caller holds); `None` when there is nothing to wait for (no journal).
    fn enqueue_in<'j>(
        &'j self,
        event: &LedgerEvent,
        appender: &mut Option<crate::journal::Appender<'j>>,
    ) -> Result<Option<Ticket>, StoreError> {
        let Some(journal) = &self.journal else {
            if self.replica.is_some() {
                // With the replicated journal every change goes through `Replica::step`: one
                // applied here alone would make this node's ledger differ from the stream.
                return Err(StoreError::Closed);
            }
            return Ok(None);
        };
        #[cfg(feature = "sim-mutations")]
        if matches!(event.body, ledger::EventBody::Declined { .. })
            && crate::sim::switches::declines_not_journaled()
        {
            // The core simulator's re-introduced bug (test builds only): the decline is
            // applied in memory and never journaled.
            return Ok(None);
        }
        let mut payload = Vec::with_capacity(128);
        event.encode(&mut payload);
        appender
            .get_or_insert_with(|| journal.appender())
            .enqueue(payload)
            .map(Some)
    }

    /// Renders what a logged ledger call decided, with the journal record it must wait for.
    #[allow(clippy::too_many_arguments)]
    fn logged<E: std::fmt::Display>(
        &self,
        l: &Link,
        msg: &Message<'_>,
        kind: Kind,
        logged: ledger::Logged<E>,
        ticket: Option<Ticket>,
        epoch: u64,
        rrn: Option<[u8; 12]>,
    ) -> Decided {
        let (d, wait) = match logged {
            ledger::Logged::Applied { decision, .. } => (decision, ticket),
            ledger::Logged::Unlogged { decision, after } => {
                let wait = (after > 0).then_some(Ticket { seq: after, epoch });
                (decision, wait)
            }
            ledger::Logged::Failed(e) => {
                tracing::warn!(error = %e, "journal refused the event; answering 96");
                (Decision::bare(Reason::STORE_UNAVAILABLE), None)
            }
        };
        let mut decided = self.answer(l, msg, kind, &d, rrn);
        decided.wait = wait;
        decided
    }

    /// After a failed journal write the journal holds. The ledger is rebuilt at once from what
    /// is durable (snapshot + records up to the durable seq), dropping every change that was
    /// applied but never made durable, so nothing answered 96 stays in it; then the failed
    /// region is rewritten and decisions resume. `false` while the storage still fails
    /// (answer 96). Called by every request while the journal holds, and by the batch whose
    /// record was lost.
    async fn store_ready(&self) -> bool {
        let Some(journal) = &self.journal else {
            return true;
        };
        if !journal.is_held() {
            return true;
        }
        // Boxed: every request awaits this function, and the rebuild behind it is large.
        Box::pin(self.recover_store(journal)).await
    }

    /// [`Gateway::store_ready`] once the journal holds: rebuild, scrub, resume.
    async fn recover_store(&self, journal: &Arc<Journal>) -> bool {
        let _one = self.recovering.lock().await;
        if !journal.is_held() {
            return true;
        }
        let epoch = journal.epoch();
        if self.rebuilt_epoch.load(Ordering::Acquire) != epoch && self.rebuild(journal).await {
            self.rebuilt_epoch.store(epoch, Ordering::Release);
        }
        let j = Arc::clone(journal);
        if !matches!(off_thread(journal, move || j.scrub()).await, Ok(Ok(()))) {
            return false;
        }
        if self.rebuilt_epoch.load(Ordering::Acquire) != epoch {
            if !self.rebuild(journal).await {
                return false;
            }
            self.rebuilt_epoch.store(epoch, Ordering::Release);
        }
        journal.resume();
        tracing::warn!("journal storage is back: decisions resume");
        true
    }

    /// Replaces the ledger's durable state by a replay of the journal up to its durable seq.
    async fn rebuild(&self, journal: &Arc<Journal>) -> bool {
        let _exclusive = self.gate.write().await;
        let j = Arc::clone(journal);
        let ledger = Arc::clone(&self.ledger);
        let rebuilt = off_thread(journal, move || {
            let mut recovered = j.reread().map_err(|e| e.to_string())?;
            let (merchants, pan_key) = ledger.origin();
            recover_ledger(merchants, pan_key, &mut recovered, Some(j.durable_seq()))
        })
        .await;
        match rebuilt {
            Ok(Ok((rebuilt, replayed))) => {
                self.ledger.adopt_durable(rebuilt);
                tracing::warn!(
                    replayed,
                    "journal write failed: ledger rebuilt from the durable journal"
                );
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "ledger rebuild from the journal failed; answering 96");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger rebuild task failed; answering 96");
                false
            }
        }
    }

    /// A request the host approved but that is not answered 00 (journal failure, or a decline
    /// at commit) is reversed at the host through the SAF queue.
    async fn reverse_forwarded(&self, l: &Link, msg: &Message<'_>, forwarded: bool) {
        if let (true, Some(upstreams)) = (forwarded, &self.upstreams) {
            upstreams.reverse(l.dialect, msg).await;
        }
    }

    async fn sign_on(&self, l: &Link, msg: &Message<'_>, now: i64) -> Decided {
        // A sign-on carries no MAC when the terminal has no working key yet (its answer's keys
        // are useless without the TMK); one that does carry a MAC must verify.
        if msg.mac().is_some() && !self.mac_ok(l, msg) {
            let d = Decision::bare(Reason::MAC_INVALID);
            return self.answer(l, msg, Kind::SignOn, &d, None);
        }
        let keyed = self.keyed(l, msg);
        if (l.mac.is_some() || keyed) && !self.sign_on_admitted(l, msg) {
            let d = Decision::bare(Reason::TERMINAL_NOT_PERMITTED);
            return self.answer(l, msg, Kind::SignOn, &d, None);
        }
        let (Some(merchant), Some(terminal)) = (msg.merchant(), msg.terminal()) else {
            // ascii1987 sign-on of a host link carries no merchant: nothing to record.
            return self.answer(
                l,
                msg,
                Kind::SignOn,
                &Decision::bare(Reason::APPROVED),
                None,
            );
        };
        let mut ticket = None;
        let signed = if let Some(replica) = &self.replica {
            replica
                .step(merchant, |log| {
                    self.ledger
                        .sign_on_logged::<ReplError>(merchant, terminal, now, log)
                })
                .await
                .and_then(|r| r)
                .map_err(LogError::from)
        } else {
            let _gate = self.gate.read().await;
            self.ledger
                .sign_on_logged::<LogError>(merchant, terminal, now, |e| {
                    Ok(self.enqueue(e, &mut ticket)?)
                })
        };
        match signed {
            Ok((batch, _)) => {
                let mut out = BytesMut::with_capacity(256);
                let d = Decision::bare(Reason::APPROVED);
                // Fresh working keys, the old ones dead from here on; the answer carries them
                // under the TMK and is MACed with the new MAK.
                let working = keyed
                    .then(|| self.terminal_keys.sign_on(merchant, terminal))
                    .flatten();
                let keys = match &working {
                    Some(w) => render::Keys {
                        mac: Some(&*w.mak),
                        de62: Some(&w.de62[..]),
                    },
                    None => render::Keys {
                        mac: l.mac.as_ref(),
                        de62: None,
                    },
                };
                render::response(l, msg, Kind::SignOn, &d, None, Some(batch), keys, &mut out);
                Decided {
                    out,
                    decision: d,
                    wait: ticket,
                    forwarded: false,
                    mti: msg.mti().0,
                }
            }
            Err(LogError::Refused(refused)) => {
                self.answer(l, msg, Kind::SignOn, &Decision::bare(refused.0), None)
            }
            Err(LogError::Store) => self.answer(
                l,
                msg,
                Kind::SignOn,
                &Decision::bare(Reason::STORE_UNAVAILABLE),
                None,
            ),
        }
    }

    /// A 0500 settles its terminal's open batch (DOMAIN §9a): decided by the ledger like any
    /// request (row 3 terminal and sign-on, row 4 repeats), with the batch totals it carries.
    async fn settle(&self, l: &Link, msg: &Message<'_>, now: i64) -> Decided {
        let kind = Kind::Op(Operation::Settlement);
        let Ok(totals) = batch_totals(msg, l.dialect.settlement_totals) else {
            return self.answer(l, msg, kind, &Decision::bare(Reason::FORMAT_ERROR), None);
        };
        let mut pan_buf = [0u8; 19];
        let rrn_buf = [b'0'; 12];
        let Some(req) = self.ledger_request(l, msg, kind, &mut pan_buf, &rrn_buf) else {
            return self.answer(l, msg, kind, &Decision::bare(Reason::FORMAT_ERROR), None);
        };
        if let Some(replica) = &self.replica {
            let logged = replica
                .step(req.merchant, |log| {
                    self.ledger.settle_batch_logged(&req, totals, now, log)
                })
                .await
                .unwrap_or_else(ledger::Logged::Failed);
            return self.logged(l, msg, kind, logged, None, 0, None);
        }
        let epoch = self.journal.as_ref().map_or(0, |j| j.epoch());
        let mut ticket = None;
        let logged = {
            let _gate = self.gate.read().await;
            self.ledger
                .settle_batch_logged(&req, totals, now, |e| self.enqueue(e, &mut ticket))
        };
        self.logged(l, msg, kind, logged, ticket, epoch, None)
    }

    /// Whether the message's MAC is what its terminal's key (or the link's) gives; a MAC
    /// where there is no key, or none where there is one, fails (DOMAIN §11).
    fn mac_ok(&self, l: &Link, msg: &Message<'_>) -> bool {
        let present = msg.mac();
        match (self.mac_key(l, msg), present) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(_), None) => false,
            (Some(key), Some((mab, value))) => mac::verify(&key, mab, value),
        }
    }

    /// The key of the message's MAC: on `cup_pos` links a terminal with a master key uses its
    /// MAK (none before its first sign-on), any other the link's static key.
    fn mac_key<'l>(&self, l: &'l Link, msg: &Message<'_>) -> Option<KeyRef<'l>> {
        if !l.dialect.terminal_keys || self.terminal_keys.is_empty() {
            return l.mac.as_ref().map(KeyRef::Link);
        }
        match self.terminal_keys.mac_key(msg.merchant(), msg.terminal()) {
            TerminalMac::Link => l.mac.as_ref().map(KeyRef::Link),
            TerminalMac::Own(mak) => mak.map(KeyRef::Own),
        }
    }

    /// Whether the message comes from a terminal with its own master key on a `cup_pos` link.
    fn keyed(&self, l: &Link, msg: &Message<'_>) -> bool {
        l.dialect.terminal_keys
            && matches!(
                self.terminal_keys.mac_key(msg.merchant(), msg.terminal()),
                TerminalMac::Own(_)
            )
    }

    /// Sign-ons on a MAC link are limited per terminal: each rotates the working keys, so a
    /// flood would keep the terminal's MACs failing.
    /// Only configured terminals are counted (the ledger refuses the others, and nothing of
    /// theirs rotates), so made-up ids cannot fill the limiter's bounded map.
    fn sign_on_admitted(&self, l: &Link, msg: &Message<'_>) -> bool {
        let (Some(merchant), Some(terminal)) = (msg.merchant(), msg.terminal()) else {
            return true;
        };
        let configured = self
            .ledger
            .origin()
            .0
            .merchant(merchant)
            .is_some_and(|m| m.terminals.iter().any(|t| t.id == terminal));
        if !configured {
            return true;
        }
        let id = (merchant.to_string(), terminal.to_string());
        if self.sign_ons.admit(id, crate::clock::monotonic()).allowed() {
            return true;
        }
        metrics::counter!(SIGN_ONS_REFUSED_TOTAL, telemetry::LABEL_DIALECT => l.dialect.name())
            .increment(1);
        if let Some(suppressed) = bad_input_admitted() {
            tracing::warn!(
                dialect = l.spec.name(),
                terminal = msg.terminal().unwrap_or(""),
                suppressed,
                "sign-on rate limit: answering 58"
            );
        }
        false
    }

    /// Whether the connection's client certificate may use the message's DE42/DE41 on this
    /// link (always, on links without `identities`). Refusals are counted.
    fn identity_ok(&self, l: &Link, msg: &Message<'_>) -> bool {
        let Some(identities) = &l.identities else {
            return true;
        };
        let caller = Caller::current();
        if identities.permits(caller.cert.as_deref(), msg.merchant(), msg.terminal()) {
            return true;
        }
        metrics::counter!(TERMINAL_NOT_PERMITTED_TOTAL, telemetry::LABEL_DIALECT => l.dialect.name())
            .increment(1);
        if let Some(suppressed) = bad_input_admitted() {
            tracing::warn!(
                dialect = l.spec.name(),
                terminal = msg.terminal().unwrap_or(""),
                subject = caller
                    .cert
                    .as_ref()
                    .and_then(|c| c.subject.as_deref())
                    .unwrap_or(""),
                suppressed,
                "client certificate may not use this terminal id: answering 58"
            );
        }
        false
    }

    fn answer(
        &self,
        l: &Link,
        msg: &Message<'_>,
        kind: Kind,
        d: &Decision,
        rrn: Option<[u8; 12]>,
    ) -> Decided {
        let mut out = BytesMut::with_capacity(256);
        let key = self.mac_key(l, msg);
        let keys = render::Keys {
            mac: key.as_deref(),
            de62: None,
        };
        render::response(l, msg, kind, d, rrn, None, keys, &mut out);
        Decided {
            out,
            decision: *d,
            wait: None,
            forwarded: false,
            mti: msg.mti().0,
        }
    }

    fn ledger_request<'m>(
        &self,
        l: &Link,
        msg: &Message<'m>,
        kind: Kind,
        pan_buf: &'m mut [u8; 19],
        rrn_buf: &'m [u8; 12],
    ) -> Option<ledger::Request<'m>> {
        // Network management never reaches the ledger.
        let Kind::Op(op) = kind else {
            return None;
        };
        // A settlement names no card.
        let n = match (msg.pan(), kind) {
            (Some(p), _) => {
                let pan_digits = p.digits();
                let n = pan_digits.len().min(19);
                for (i, slot) in pan_buf.iter_mut().enumerate().take(n) {
                    *slot = pan_digits.char_at(i);
                }
                n
            }
            (None, Kind::Op(Operation::Settlement)) => 0,
            (None, _) => return None,
        };
        let pan = std::str::from_utf8(&pan_buf[..n]).ok()?;
        let original = match (kind, l.dialect.original) {
            (Kind::Op(Operation::Sale | Operation::Settlement), _) => None,
            (_, OriginalKeys::De90) => msg.original_data().map(|od| OriginalRef::Iso {
                mti: od.mti.0,
                stan: od.stan,
                transmission: od.transmission,
                rrn: msg.rrn(),
            }),
            (_, OriginalKeys::De61) => msg.cup61().map(|c| OriginalRef::Cup {
                batch: c.batch,
                trace: c.trace,
                date_mmdd: c.date_mmdd,
                rrn: msg.rrn(),
            }),
        };
        let rrn = if kind == Kind::Op(Operation::Sale) {
            std::str::from_utf8(&rrn_buf[..]).ok()
        } else {
            msg.rrn()
        };
        // DE13, else the date of DE7, else (cup sales carry neither) 0: the ledger keys it on
        // the merchant-local date (DOMAIN §6).
        let local_date_mmdd = msg
            .local_date()
            .or_else(|| msg.transmission().map(|t| (t / 1_000_000) as u16))
            .unwrap_or(0);
        Some(ledger::Request {
            dialect: l.dialect.ledger_dialect(),
            op,
            repeat: msg.mti().is_repeat(),
            merchant: msg.merchant()?,
            // A 0500 without DE41 is from no configured terminal: row 3 answers it.
            terminal: match kind {
                Kind::Op(Operation::Settlement) => msg.terminal().unwrap_or(""),
                _ => msg.terminal()?,
            },
            stan: msg.stan()?,
            local_date_mmdd,
            mti_class: msg.mti().class(),
            transmission: msg.transmission(),
            rrn,
            batch: msg.cup60().map(|c| c.batch),
            pan,
            amount_minor: msg.amount().map_or(0, |a| a.0),
            currency: msg.currency().unwrap_or(0),
            card_type: CardType::from_pan(pan),
            original,
            body_fingerprint: fingerprint(msg),
        })
    }
}

/// Sign-ons refused by the per-terminal rate limit (answered 58).
pub const SIGN_ONS_REFUSED_TOTAL: &str = "refundgate_sign_ons_refused_total";
/// Messages whose DE41/DE42 the connection's client certificate may not use (answered 58).
pub const TERMINAL_NOT_PERMITTED_TOTAL: &str = "refundgate_terminal_not_permitted_total";

/// Whether a line about bad input from the current caller may be logged now (one per source
/// per interval); `Some(n)`: yes, `n` lines were left out since the last one.
fn bad_input_admitted() -> Option<u64> {
    let Some(peer) = Caller::current().peer else {
        return Some(0);
    };
    match ratelimit::bad_input_log(peer, crate::clock::monotonic()) {
        Admit::Yes { suppressed } => Some(suppressed),
        Admit::No => None,
    }
}

/// The batch totals a 0500 carries (DOMAIN §9a), `Ok(None)` when it carries none.
/// ascii1987: DE 74 credits count, 76 debits count, 86 credits amount, 88 debits amount
/// (an absent one of them is 0). cup_pos DE 48: domestic debit amount n12, count n3, credit
/// amount n12, count n3, reconciliation code n1, then the same for foreign cards; the two
/// are added (the gateway does not tell them apart). A DE 48 shorter than 30 digits is a
/// format error.
fn batch_totals(
    msg: &Message<'_>,
    place: SettlementTotals,
) -> Result<Option<ledger::BatchTotals>, ()> {
    match place {
        SettlementTotals::De74 => {
            if ![74, 76, 86, 88].iter().any(|&n| msg.has(n)) {
                return Ok(None);
            }
            let get = |n: usize| match msg.field(n) {
                None => Ok(0),
                Some(_) => msg.number(n).ok_or(()),
            };
            Ok(Some(ledger::BatchTotals {
                credit_count: get(74)?,
                debit_count: get(76)?,
                credit_amount: get(86)?,
                debit_amount: get(88)?,
            }))
        }
        SettlementTotals::De48 => {
            let Some(d) = msg.digits(48) else {
                return Ok(None);
            };
            if d.len() < 30 {
                return Err(());
            }
            let mut t = ledger::BatchTotals::default();
            for base in [0usize, 31] {
                if base + 30 > d.len() {
                    break;
                }
                let num = |a: usize, b: usize| d.number(base + a, base + b).ok_or(());
                t.debit_amount = t.debit_amount.saturating_add(num(0, 12)?);
                t.debit_count = t.debit_count.saturating_add(num(12, 15)?);
                t.credit_amount = t.credit_amount.saturating_add(num(15, 27)?);
                t.credit_count = t.credit_count.saturating_add(num(27, 30)?);
            }
            Ok(Some(t))
        }
    }
}

/// The RRN a sale gets: DE12 `hhmmss` (or the UTC time of day) and the STAN.
fn sale_rrn(msg: &Message<'_>, now: i64) -> [u8; 12] {
    let hhmmss = msg.number(12).map_or_else(
        || {
            let s = now.rem_euclid(86_400);
            (s / 3600 * 10_000 + s % 3600 / 60 * 100 + s % 60) as u32
        },
        |t| t as u32,
    );
    ids::rrn(hhmmss, msg.stan().unwrap_or(0))
}

/// A hash of what identifies a request, without the MTI's origin digit and DE7 (which a
/// terminal changes on a retransmission): an identical retransmission gets the stored answer,
/// a different request reusing the key gets 94.
fn fingerprint(msg: &Message<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(&[msg.mti().class(), msg.mti().function()]);
    // 48 and 74/76/86/88: a 0500's batch totals (DOMAIN §9a).
    for n in [2usize, 3, 4, 41, 42, 48, 49, 61, 74, 76, 86, 88, 90] {
        eat(msg.field_bytes(n).unwrap_or(&[]));
    }
    h
}

/// Metric label of an MTI: known ones by name, anything else `other` (labels stay bounded).
pub fn mti_label(mti: u16) -> &'static str {
    match mti {
        200 => "0200",
        201 => "0201",
        220 => "0220",
        221 => "0221",
        400 => "0400",
        401 => "0401",
        420 => "0420",
        421 => "0421",
        500 => "0500",
        800 => "0800",
        820 => "0820",
        _ => "other",
    }
}

impl Dispatch for Gateway {
    fn idle(&self) {
        if let Some(journal) = &self.journal {
            journal.idle_hint();
        }
    }

    fn handle(
        &self,
        ctx: &RequestCtx,
        body: bytes::Bytes,
    ) -> impl std::future::Future<Output = Handled> + Send {
        let link = ctx.listener.index;
        let caller = Caller::of(ctx);
        async move {
            match caller.scope(Gateway::handle(self, link, &body)).await.0 {
                Outcome::Reply(bytes) => Handled::Reply(bytes),
                Outcome::Drop => Handled::Drop,
            }
        }
    }

    fn handle_batch(
        &self,
        ctx: &RequestCtx,
        bodies: Vec<bytes::Bytes>,
    ) -> impl std::future::Future<Output = Vec<Handled>> + Send {
        let link = ctx.listener.index;
        async move {
            let mut out = Vec::with_capacity(bodies.len());
            Caller::of(ctx)
                .scope(Gateway::handle_batch(self, link, &bodies, &mut out))
                .await;
            out.into_iter()
                .map(|(outcome, _)| match outcome {
                    Outcome::Reply(bytes) => Handled::Reply(bytes),
                    Outcome::Drop => Handled::Drop,
                })
                .collect()
        }
    }
}

/// Rebuilds the ledger of `merchants` from what the journal recovered: the newest snapshot,
/// then every record after it in journal order. Returns the ledger and the records replayed.
/// `up_to`: replay no record past this seq (records a failed write left behind).
pub fn recover_ledger(
    merchants: &ledger::MerchantSet,
    pan_key: ledger::PanKey,
    recovered: &mut Recovered,
    up_to: Option<u64>,
) -> Result<(Ledger, u64), String> {
    let ledger = match recovered.take_snapshot() {
        Some(snap) => Ledger::restore(merchants, pan_key, &snap.bytes)
            .map_err(|e| format!("snapshot {}: {e}", snap.seq))?,
        None => Ledger::new(merchants, pan_key),
    };
    let mut bad: Option<String> = None;
    let replayed = recovered
        .replay(|seq, payload| {
            if bad.is_some() || up_to.is_some_and(|last| seq > last) {
                return;
            }
            match LedgerEvent::decode(payload) {
                Ok(event) => {
                    if let Err(e) = ledger.apply(&event) {
                        tracing::warn!(seq, error = %e, "journal event for a merchant no longer configured; skipped");
                    }
                }
                Err(e) => bad = Some(format!("record {seq}: {e}")),
            }
        })
        .map_err(|e| e.to_string())?;
    match bad {
        Some(b) => Err(b),
        None => Ok((ledger, replayed)),
    }
}

/// Runs `f` on tokio's blocking pool; inline when `journal` is stepped (the deterministic
/// simulator, `refundgate sim --core`, which is single-threaded by design: a blocking thread
/// finishing at a moment real time decides would make a seed's runs differ).
async fn off_thread<R: Send + 'static>(
    journal: &Journal,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    if journal.is_stepped() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_bad_input_from_one_source_logs_one_line_per_interval() {
        use std::io::Write;
        use std::sync::Mutex;

        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let merchants = ledger::MerchantSet::embedded().unwrap();
        let ledger = Ledger::new(&merchants, ledger::PanKey::new(&[1; 16]));
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let gateway = Gateway::new(
            Arc::new(ledger),
            None,
            clock,
            vec![Link::plain(&crate::dialect::ASCII1987)],
        );
        let doc = serde_json::json!({
            "mti": "0200",
            "fields": { "3": "000000", "4": "000000001000", "11": "000001" }
        });
        let mut bad = BytesMut::new();
        iso8583::json::from_json(&iso8583::ASCII1987, &doc, &mut bad).unwrap();
        // DE4 (just before the 6 digits of DE11) gets a letter: answerable, 30.
        let at = bad.len() - 6 - 12;
        bad[at] = b'X';

        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caller = Caller {
            peer: Some("192.0.2.77".parse().unwrap()),
            cert: None,
        };
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                for _ in 0..20 {
                    let (_, summary) = caller.clone().scope(gateway.handle(0, &bad)).await;
                    assert_eq!(summary.code, Some("30"));
                }
            })
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged = text.matches("message error").count();
        assert_eq!(logged, 1, "{text}");
    }

    #[test]
    fn utc_mmdd_follows_the_calendar() {
        assert_eq!(crate::clock::mmdd_of(0), 101);
        assert_eq!(crate::clock::mmdd_of(1_709_164_800), 229); // 2024-02-29
        assert_eq!(crate::clock::mmdd_of(1_798_761_599), 1231); // 2026-12-31 23:59:59
    }
}
