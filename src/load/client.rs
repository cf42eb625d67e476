//! The connection task: one TLS connection, up to `in_flight` pipeline slots, each slot running
//! sessions step by step. Requests of all ready slots are rendered into one buffer and go out
//! in one write; every complete answer of one read is matched, in order, to the oldest
//! outstanding request and verified before the freed slots send again. The task owns its
//! buffers, counters and histogram: nothing is allocated, locked or sent over a channel per
//! request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::pace::Pacer;
use super::report::Tally;
use super::scenario::{Ids, Rendered, Scenario, Session, Stamp};
use crate::clock::{Clock, SystemClock};

/// Reconnects one connection task may make in a run before giving up.
pub const RECONNECTS_MAX: u32 = 20;
/// Pause before a reconnect.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// Longest a connection task sleeps before looking at its clock again (timeouts, the end of
/// the run, publishing progress).
pub const TICK: Duration = Duration::from_millis(50);

/// When the load starts and stops; sent to every connection once all have connected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub start: Instant,
    pub deadline: Instant,
}

/// What every connection task of a run shares.
pub(crate) struct Shared {
    pub scenario: Arc<Scenario>,
    /// Values captured by the setup steps.
    pub setup_values: Vec<Vec<u8>>,
    pub ids: Ids,
    pub connector: TlsConnector,
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub in_flight: usize,
    pub timeout: Duration,
    pub frame_max: usize,
    /// Requests left to send in a `--count` run.
    pub budget: Option<AtomicU64>,
    /// Open loop: nanoseconds between two requests of one connection.
    pub interval_ns: Option<u64>,
    pub connections: usize,
    /// Progress counters, published every tick.
    pub answered: AtomicU64,
    pub mismatches: AtomicU64,
    /// Set when the budget ran out.
    pub exhausted: AtomicBool,
}

impl Shared {
    /// Claims one request from the `--count` budget.
    fn claim(&self) -> bool {
        let Some(b) = &self.budget else {
            return true;
        };
        let ok = b
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !ok {
            self.exhausted.store(true, Ordering::Relaxed);
        }
        ok
    }
}

/// What a connection task hands back.
#[derive(Debug)]
pub(crate) struct Finished {
    pub tally: Tally,
    pub last_answer: Option<Instant>,
    /// The first failure, described.
    pub first_error: Option<String>,
}

/// Builds the TLS client configuration: the server certificate is verified against `ca`, or
/// accepted whatever it is when `insecure` (a named `dangerous` verifier).
pub(crate) fn tls_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                crate::server::tls::danger::AnyServerCertificate::new(provider),
            ))
            .with_no_client_auth()
    } else {
        let path =
            ca.ok_or("TLS: give --ca FILE (PEM) or, for a test responder, --insecure-skip-verify")?;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--ca {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("--ca {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--ca {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "--ca {}: no certificate in the file",
                path.display()
            ));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Opens one TCP + TLS connection, each phase bounded by the request timeout.
pub(crate) async fn open(shared: &Shared) -> Result<TlsStream<TcpStream>, String> {
    let tcp = tokio::time::timeout(shared.timeout, TcpStream::connect(shared.addr))
        .await
        .map_err(|_| format!("connect {}: timed out", shared.addr))?
        .map_err(|e| format!("connect {}: {e}", shared.addr))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    tokio::time::timeout(
        shared.timeout,
        shared.connector.connect(shared.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| format!("TLS handshake with {}: timed out", shared.addr))?
    .map_err(|e| format!("TLS handshake with {}: {e}", shared.addr))
}

/// Bytes of the read buffer a connection starts with; it grows to the largest frame seen.
pub const READ_BUFFER_BYTES: usize = 16 * 1024;
/// How stale the wall-clock second of `{de7}`, `{time}` and `{date}` may be.
const STAMP_REFRESH: Duration = Duration::from_millis(1);

/// Runs the scenario's setup steps once on a connection of its own; returns the values the
/// sessions refer to.
pub(crate) async fn run_setup(shared: &Shared) -> Result<Vec<Vec<u8>>, String> {
    let mut stream = open(shared).await?;
    let mut tally = Tally::new().map_err(|e| e.to_string())?;
    let mut conn = Conn::new(shared, Mode::Setup, 0, Instant::now(), 1);
    let end = conn.drive(&mut stream, &mut tally, far_future()).await;
    if let Some(e) = tally.examples.first() {
        return Err(format!(
            "{}: {}: expected {}, got {}",
            e.step, e.what, e.expected, e.got
        ));
    }
    match end {
        Ok(()) if conn.setup_done => Ok(std::mem::take(&mut conn.slots[0].values)),
        Ok(()) => Err("setup did not finish".into()),
        Err(b) => Err(b.describe()),
    }
}

/// One connection task: connects, waits for the start signal, drives until the run ends,
/// reconnecting (bounded) when the connection breaks.
pub(crate) async fn connection(
    id: usize,
    shared: Arc<Shared>,
    mut tally: Tally,
    mut start: watch::Receiver<Option<Timing>>,
    ready: tokio::sync::mpsc::Sender<bool>,
) -> Finished {
    let mut first_error = None;
    let mut stream = match open(&shared).await {
        Ok(s) => Some(s),
        Err(e) => {
            tally.errors.connect += 1;
            first_error = Some(e);
            None
        }
    };
    let connected = stream.is_some();
    // The receiver only goes away when run() gave up, in which case the start never comes.
    let _ = ready.send(connected).await;
    drop(ready);
    let timing = loop {
        if let Some(t) = *start.borrow_and_update() {
            break t;
        }
        if start.changed().await.is_err() {
            return Finished {
                tally,
                last_answer: None,
                first_error,
            };
        }
    };
    let offset_ns = shared
        .interval_ns
        .map_or(0, |iv| iv / shared.connections.max(1) as u64 * id as u64);
    let mut conn = Conn::new(
        &shared,
        Mode::Load,
        id,
        timing.start + Duration::from_nanos(offset_ns),
        shared.in_flight,
    );
    if shared.interval_ns.is_some() {
        match Pacer::new() {
            Ok(p) => conn.pacer = Some(p),
            Err(e) => {
                if id == 0 {
                    eprintln!(
                        "refundgate load: no timerfd ({e}); the open loop is paced to the millisecond"
                    );
                }
            }
        }
    }
    let mut reconnects = 0u32;
    loop {
        if let Some(mut s) = stream.take() {
            match conn.drive(&mut s, &mut tally, timing.deadline).await {
                Ok(()) => break,
                Err(b) => {
                    if first_error.is_none() {
                        first_error = Some(b.describe());
                    }
                    if matches!(b, Broken::Scenario(_)) {
                        break;
                    }
                }
            }
        }
        if Instant::now() >= timing.deadline || shared.exhausted.load(Ordering::Relaxed) {
            break;
        }
        reconnects += 1;
        if reconnects > RECONNECTS_MAX {
            break;
        }
        tokio::time::sleep(RECONNECT_BACKOFF).await;
        match open(&shared).await {
            Ok(s) => stream = Some(s),
            Err(e) => {
                tally.errors.connect += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    conn.finish(&mut tally, timing.deadline);
    Finished {
        tally,
        last_answer: conn.last_answer,
        first_error,
    }
}

/// Waits for the open-loop timer when it is set; never ends otherwise.
async fn pace(pacer: &mut Option<Pacer>) -> std::io::Result<()> {
    match pacer {
        Some(p) if p.is_armed() => p.fired().await,
        _ => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Why a connection stopped before the end of the run.
#[derive(Debug)]
enum Broken {
    Io(String),
    Closed,
    Timeout,
    Desync,
    Scenario(String),
}

impl Broken {
    fn describe(&self) -> String {
        match self {
            Broken::Io(e) => format!("connection broke: {e}"),
            Broken::Closed => "connection closed by the peer with requests outstanding".into(),
            Broken::Timeout => "no answer within the request timeout".into(),
            Broken::Desync => "an answer arrived with no request outstanding".into(),
            Broken::Scenario(e) => format!("scenario: {e}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Run the setup session once.
    Setup,
    /// Run weighted sessions until the run ends.
    Load,
}

/// One pipeline slot: a session in progress.
#[derive(Debug)]
struct Slot {
    session: usize,
    step: usize,
    values: Vec<Vec<u8>>,
    busy: bool,
}

/// A request written and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: usize,
    stan: Option<u32>,
    sent_at: Instant,
    intended: Instant,
}

/// The state of one connection task.
struct Conn<'s> {
    shared: &'s Shared,
    mode: Mode,
    slots: Vec<Slot>,
    pending: VecDeque<Pending>,
    wheel_pos: usize,
    scratch: Vec<u8>,
    rendered: Rendered,
    /// Framed requests of one fill, written at once.
    out: BytesMut,
    stamp: Stamp,
    /// When the wall clock was last read for `stamp`.
    stamp_read: Option<Instant>,
    /// Open loop: when request 0 of this connection is due.
    schedule_start: Instant,
    /// Open loop: index of the next request to send.
    next_k: u64,
    /// Open loop: the timer that sends each request at its time (`None`: tokio's timer, to
    /// the millisecond, when no timerfd could be made).
    pacer: Option<Pacer>,
    last_answer: Option<Instant>,
    /// Setup mode: every setup step was answered as expected.
    setup_done: bool,
    /// Setup mode: the setup finished, well or not (a failed setup is not retried).
    setup_over: bool,
    /// Answers and mismatches not yet added to the shared progress counters.
    unpublished: (u64, u64),
}

impl<'s> Conn<'s> {
    fn new(
        shared: &'s Shared,
        mode: Mode,
        id: usize,
        schedule_start: Instant,
        slots: usize,
    ) -> Self {
        let wheel_len = shared.scenario.wheel.len().max(1);
        let mut c = Conn {
            shared,
            mode,
            slots: Vec::with_capacity(slots),
            pending: VecDeque::with_capacity(slots),
            // Spread connections over the wheel so they do not run the same session together.
            wheel_pos: id.wrapping_mul(7919) % wheel_len,
            scratch: Vec::with_capacity(1024),
            rendered: Rendered::default(),
            out: BytesMut::with_capacity(slots.max(1) * 512),
            stamp: Stamp::default(),
            stamp_read: None,
            schedule_start,
            next_k: 0,
            pacer: None,
            last_answer: None,
            setup_done: false,
            setup_over: false,
            unpublished: (0, 0),
        };
        for _ in 0..slots {
            c.slots.push(Slot {
                session: 0,
                step: 0,
                values: Vec::new(),
                busy: false,
            });
        }
        for i in 0..slots {
            c.next_session(i);
        }
        c
    }

    fn session(&self, index: usize) -> &'s Session {
        let sc: &'s Scenario = &self.shared.scenario;
        match self.mode {
            Mode::Setup => &sc.setup,
            Mode::Load => &sc.sessions[index],
        }
    }

    fn next_session(&mut self, slot: usize) {
        let sc = &self.shared.scenario;
        let session = match self.mode {
            Mode::Setup => 0,
            Mode::Load => usize::from(
                sc.wheel
                    .get(self.wheel_pos % sc.wheel.len().max(1))
                    .copied()
                    .unwrap_or(0),
            ),
        };
        self.wheel_pos = self.wheel_pos.wrapping_add(1);
        let captures = self.session(session).captures.len();
        let s = &mut self.slots[slot];
        s.session = session;
        s.step = 0;
        s.values.resize_with(captures, Vec::new);
        for v in &mut s.values {
            v.clear();
        }
    }

    fn stopping(&self, now: Instant, deadline: Instant) -> bool {
        match self.mode {
            Mode::Setup => self.setup_over,
            Mode::Load => now >= deadline || self.shared.exhausted.load(Ordering::Relaxed),
        }
    }

    /// When the next open-loop request is due.
    fn next_due(&self) -> Option<Instant> {
        let iv = self.shared.interval_ns?;
        Some(self.schedule_start + Duration::from_nanos(iv.saturating_mul(self.next_k)))
    }

    /// A tick passed: publishes progress, fails when the oldest request is overdue, and sets
    /// the next tick.
    fn on_tick(
        &mut self,
        tick: &mut Pin<Box<Sleep>>,
        tally: &mut Tally,
        deadline: Instant,
    ) -> Result<(), Broken> {
        let now = Instant::now();
        self.publish();
        if let Some(p) = self.pending.front() {
            if now.saturating_duration_since(p.sent_at) >= self.shared.timeout {
                tally.errors.timeouts += self.pending.len() as u64;
                self.pending.clear();
                return Err(Broken::Timeout);
            }
        }
        let mut wake = now + TICK;
        if self.mode == Mode::Load && deadline > now {
            wake = wake.min(deadline);
        }
        if let Some(due) = self.next_due() {
            wake = wake.min(due.max(now));
        }
        tick.as_mut().reset(wake);
        Ok(())
    }

    async fn drive<S>(
        &mut self,
        stream: &mut S,
        tally: &mut Tally,
        deadline: Instant,
    ) -> Result<(), Broken>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A new connection restarts every slot's session: the old answers are gone.
        for i in 0..self.slots.len() {
            if self.slots[i].step > 0 || self.slots[i].busy {
                tally.sessions_aborted += 1;
                self.slots[i].busy = false;
                self.next_session(i);
            }
        }
        self.pending.clear();
        self.out.clear();
        let mut rbuf = vec![0u8; READ_BUFFER_BYTES];
        let mut filled = 0usize;
        let mut now = Instant::now();
        let mut tick: Pin<Box<Sleep>> = Box::pin(sleep_until(now + TICK));
        let result = loop {
            if !self.stopping(now, deadline) {
                if let Err(b) = self.fill(tally, now) {
                    break Err(b);
                }
                if !self.out.is_empty() {
                    if let Err(b) = self.write_out(stream, &mut tick, tally, deadline).await {
                        break Err(b);
                    }
                }
                if let Some(due) = self.next_due() {
                    if self.slots.iter().any(|s| !s.busy) {
                        match &mut self.pacer {
                            Some(p) => {
                                if let Err(e) = p.arm(due) {
                                    break Err(Broken::Io(format!("open-loop timer: {e}")));
                                }
                            }
                            None if due < tick.deadline() => tick.as_mut().reset(due),
                            None => {}
                        }
                    }
                }
            }
            if self.pending.is_empty() && self.stopping(now, deadline) {
                break Ok(());
            }
            tokio::select! {
                biased;
                read = stream.read(&mut rbuf[filled..]) => match read {
                    Ok(0) => break Err(Broken::Closed),
                    Ok(n) => {
                        filled += n;
                        now = Instant::now();
                        if let Err(b) = self.answers(&mut rbuf, &mut filled, tally, now) {
                            break Err(b);
                        }
                        // Reads that are always ready must not starve the tick (timeouts,
                        // progress, the open-loop schedule).
                        if now >= tick.deadline() {
                            if let Err(b) = self.on_tick(&mut tick, tally, deadline) {
                                break Err(b);
                            }
                        }
                    }
                    Err(e) => break Err(Broken::Io(e.to_string())),
                },
                _ = tick.as_mut() => {
                    if let Err(b) = self.on_tick(&mut tick, tally, deadline) {
                        break Err(b);
                    }
                    now = Instant::now();
                }
                fired = pace(&mut self.pacer) => {
                    if let Err(e) = fired {
                        break Err(Broken::Io(format!("open-loop timer: {e}")));
                    }
                    now = Instant::now();
                }
            }
        };
        self.publish();
        if let Err(b) = &result {
            match b {
                Broken::Io(_) | Broken::Closed | Broken::Desync => tally.errors.io += 1,
                Broken::Scenario(_) => tally.errors.scenario += 1,
                Broken::Timeout => {}
            }
            tally.errors.lost += self.pending.len() as u64;
            self.pending.clear();
        }
        result
    }

    /// Verifies every complete frame in `rbuf[..filled]` and keeps the incomplete rest at its
    /// start, growing the buffer when the next frame is longer than it.
    fn answers(
        &mut self,
        rbuf: &mut Vec<u8>,
        filled: &mut usize,
        tally: &mut Tally,
        now: Instant,
    ) -> Result<(), Broken> {
        let mut pos = 0usize;
        let mut need = 0usize;
        while *filled - pos >= 2 {
            let len = usize::from(u16::from_be_bytes([rbuf[pos], rbuf[pos + 1]]));
            if len > self.shared.frame_max {
                return Err(Broken::Io(format!(
                    "an answer of {len} bytes exceeds the frame limit of {}",
                    self.shared.frame_max
                )));
            }
            if *filled - pos - 2 < len {
                need = 2 + len;
                break;
            }
            self.answer(&rbuf[pos + 2..pos + 2 + len], tally, now)?;
            pos += 2 + len;
        }
        if pos > 0 {
            rbuf.copy_within(pos..*filled, 0);
            *filled -= pos;
        }
        if need > rbuf.len() {
            rbuf.resize(need, 0);
        }
        Ok(())
    }

    /// Writes `self.out` (the requests of one fill) and flushes; overdue answers still end the
    /// connection while the write waits.
    async fn write_out<S>(
        &mut self,
        stream: &mut S,
        tick: &mut Pin<Box<Sleep>>,
        tally: &mut Tally,
        deadline: Instant,
    ) -> Result<(), Broken>
    where
        S: AsyncWrite + Unpin,
    {
        let out = std::mem::take(&mut self.out);
        let mut at = 0usize;
        let result = loop {
            if at == out.len() {
                break Ok(());
            }
            tokio::select! {
                biased;
                w = stream.write(&out[at..]) => match w {
                    Ok(0) => break Err(Broken::Io("write returned zero bytes".into())),
                    Ok(n) => at += n,
                    Err(e) => break Err(Broken::Io(e.to_string())),
                },
                _ = tick.as_mut() => {
                    if let Err(b) = self.on_tick(tick, tally, deadline) {
                        break Err(b);
                    }
                }
            }
        };
        let result = match result {
            Ok(()) => loop {
                tokio::select! {
                    biased;
                    f = stream.flush() => break f.map_err(|e| Broken::Io(e.to_string())),
                    _ = tick.as_mut() => {
                        if let Err(b) = self.on_tick(tick, tally, deadline) {
                            break Err(b);
                        }
                    }
                }
            },
            Err(b) => Err(b),
        };
        self.out = out;
        self.out.clear();
        result
    }

    /// Renders the next request of every ready slot into `self.out`, each behind its 2-byte
    /// length; the caller writes them at once.
    fn fill(&mut self, tally: &mut Tally, now: Instant) -> Result<(), Broken> {
        if self
            .stamp_read
            .is_none_or(|t| now.saturating_duration_since(t) >= STAMP_REFRESH)
        {
            self.stamp
                .refresh(SystemClock.now_unix_s(), self.shared.scenario.utc_offset_s);
            self.stamp_read = Some(now);
        }
        for i in 0..self.slots.len() {
            if self.slots[i].busy || (self.mode == Mode::Setup && self.setup_over) {
                continue;
            }
            let intended = match self.next_due() {
                None => now,
                Some(due) if due <= now => due,
                Some(_) => break,
            };
            if self.mode == Mode::Load && !self.shared.claim() {
                break;
            }
            self.next_k += 1;
            let at = self.out.len();
            self.out.put_u16(0);
            let stan = self.render(i).map_err(Broken::Scenario)?;
            let len = self.out.len() - at - 2;
            let Some(len16) = u16::try_from(len)
                .ok()
                .filter(|_| len <= self.shared.frame_max)
            else {
                return Err(Broken::Scenario(format!(
                    "a request of {len} bytes exceeds the frame limit of {}",
                    self.shared.frame_max
                )));
            };
            self.out[at..at + 2].copy_from_slice(&len16.to_be_bytes());
            self.pending.push_back(Pending {
                slot: i,
                stan,
                sent_at: now,
                intended,
            });
            self.slots[i].busy = true;
            tally.sent += 1;
            if self.shared.interval_ns.is_some() {
                tally.send_lag(now.saturating_duration_since(intended).as_micros() as u64);
            }
        }
        Ok(())
    }

    /// Renders slot `i`'s next step into `self.out`; returns the request's STAN.
    fn render(&mut self, i: usize) -> Result<Option<u32>, String> {
        let shared = self.shared;
        let slot = &mut self.slots[i];
        let session = match self.mode {
            Mode::Setup => &shared.scenario.setup,
            Mode::Load => &shared.scenario.sessions[slot.session],
        };
        let step = session.steps.get(slot.step).ok_or("step out of range")?;
        let drawn = shared.scenario.render(
            step,
            &mut slot.values,
            &shared.setup_values,
            &shared.ids,
            &self.stamp,
            &mut self.scratch,
            &mut self.rendered,
            &mut self.out,
        )?;
        Ok(drawn.de11)
    }

    /// Matches one answer, received at `now`, to the oldest outstanding request and verifies
    /// it.
    fn answer(&mut self, body: &[u8], tally: &mut Tally, now: Instant) -> Result<(), Broken> {
        let Some(p) = self.pending.pop_front() else {
            return Err(Broken::Desync);
        };
        self.last_answer = Some(now);
        tally.answered += 1;
        self.unpublished.0 += 1;
        tally.latency(now.saturating_duration_since(p.intended).as_micros() as u64);
        let shared = self.shared;
        let session = self.session(self.slots[p.slot].session);
        let Some(step) = session.steps.get(self.slots[p.slot].step) else {
            return Err(Broken::Scenario("answer for a step out of range".into()));
        };
        let name = || format!("{}/{}", session.name, step.name);
        let head = shared.scenario.dialect.header_bytes();
        let decoded = body
            .get(head..)
            .ok_or_else(|| "shorter than the TPDU and header".to_string())
            .and_then(|b| {
                crate::iso8583::decode(shared.scenario.spec(), b).map_err(|e| e.to_string())
            });
        let ok = match decoded {
            Err(e) => {
                tally.code(None);
                tally.mismatch(
                    name,
                    "answer does not decode",
                    format!("MTI {}", step.expect.mti),
                    e,
                );
                false
            }
            Ok(msg) => {
                tally.code(msg.response_code());
                match step.verify(&msg, p.stan) {
                    Err(d) => {
                        tally.difference(name, &d);
                        false
                    }
                    Ok(()) => match step.keep_answer(&msg, &mut self.slots[p.slot].values) {
                        Err(field) => {
                            tally.mismatch(
                                name,
                                "answer lacks a field a later step needs",
                                format!("DE{field}"),
                                "absent".into(),
                            );
                            false
                        }
                        Ok(()) => true,
                    },
                }
            }
        };
        self.slots[p.slot].busy = false;
        if ok {
            tally.verified += 1;
            self.slots[p.slot].step += 1;
            if self.slots[p.slot].step >= session.steps.len() {
                tally.sessions_completed += 1;
                if self.mode == Mode::Setup {
                    self.setup_done = true;
                    self.setup_over = true;
                    return Ok(());
                }
                self.next_session(p.slot);
            }
        } else {
            self.unpublished.1 += 1;
            tally.sessions_aborted += 1;
            if self.mode == Mode::Setup {
                self.setup_over = true;
                return Ok(());
            }
            self.next_session(p.slot);
        }
        Ok(())
    }

    fn publish(&mut self) {
        let (a, m) = std::mem::take(&mut self.unpublished);
        if a > 0 {
            self.shared.answered.fetch_add(a, Ordering::Relaxed);
        }
        if m > 0 {
            self.shared.mismatches.fetch_add(m, Ordering::Relaxed);
        }
    }

    /// End of the run: sessions left half-way are cut short; an open loop that fell behind
    /// counts the requests it never sent.
    fn finish(&mut self, tally: &mut Tally, deadline: Instant) {
        tally.sessions_aborted += self.slots.iter().filter(|s| s.step > 0 || s.busy).count() as u64;
        if let Some(iv) = self.shared.interval_ns {
            if !self.shared.exhausted.load(Ordering::Relaxed) && iv > 0 {
                // Requests k with k * iv < span were due before the end of the run.
                let span = deadline
                    .saturating_duration_since(self.schedule_start)
                    .as_nanos();
                let due = span.div_ceil(u128::from(iv)) as u64;
                tally.backlog_unsent += due.saturating_sub(self.next_k);
            }
        }
    }
}
