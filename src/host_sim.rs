//! `refundgate host`: a stand-in bank host over TLS, for tests, demos and fault drills.
//!
//! It speaks any dialect of the registry (`src/dialect.rs`; one listener per dialect), approves by default (echoing DE 3, 4,
//! 11, 12, 13, 37, 41, 42 and adding DE 38 and DE 39 `00`), answers sign-on and echo, and
//! applies reversals idempotently (the first reversal of a (DE41, DE11) applies, repeats are
//! answered 00 again). Its [`Faults`] come from flags and can be changed at run time through a
//! small admin endpoint:
//!
//! - `GET /faults` → the fault set as JSON; `POST /faults` with a JSON body replaces it (keys
//!   left out mean "no fault"): `{"latency_ms":0,"latency_max_ms":0,"drop_percent":0,
//!   "decline":null,"close_after":null,"no_echo":false,"stop_reading":false}`.
//! - `GET /stats` → counters and the reversals received per (DE41, DE11).
//! - `GET /healthz`, `/readyz`, `/metrics`: the server's own (its connection counters;
//!   `refundgate host` installs the recorder, a host in a test shares its caller's).
//!
//! The transport is the gateway's own (`src/server/`): its accept loop and admission (handshake
//! budget, connection limits), its connection loop and its admin HTTP, with the host's
//! [`Dispatch`] deciding the answers. Its listeners send each answer as soon as it is ready
//! ([`AnswerOrder::AsReady`]), each request waiting its own latency, so with a random latency
//! pipelined requests are answered out of order (what a multiplexed link must cope with).
//! `stop_reading` and `close_after` are the dispatch's [`Dispatch::reading_paused`] and
//! [`Dispatch::intake`]. Everything is bounded (`HOST_*` in [`crate::limits`]): answers in
//! flight per connection, connections, tracked reversal keys, admin bodies, latencies.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::config::{LimitsConfig, TlsConfig};
use crate::dialect::Dialect;
use crate::frame::Framing;
use crate::iso8583::{self, FieldList, Message, Value};
use crate::limits::{self, HOST_LATENCY_MAX_MS, HOST_REVERSAL_KEYS_MAX};
use crate::mac::{self, MacKey};
use crate::server::admin::{self, AdminRoutes};
use crate::server::listener::Listener;
use crate::server::{
    self, tls, AnswerOrder, Dispatch, Handled, Intake, ListenerInfo, Readiness, RequestCtx,
};

/// The faults the host injects; all off by default (an always-approving host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Delay before each answer to a financial request or reversal, in milliseconds (the lower
    /// bound when `latency_max_ms` is larger). Sign-on and echo are answered at once (use
    /// `no_echo` to fail liveness).
    pub latency_ms: u64,
    /// When above `latency_ms`, each answer waits a uniformly random delay in
    /// `latency_ms..=latency_max_ms` (answers then come out of order).
    pub latency_max_ms: u64,
    /// Percentage (0–100) of requests silently dropped (never answered). Network management
    /// is never dropped.
    pub drop_percent: u8,
    /// Answer financial requests (02xx) with this DE39 instead of `00`. Reversals are still
    /// approved.
    pub decline: Option<String>,
    /// Close each connection after it has carried this many requests.
    pub close_after: Option<u64>,
    /// Leave echo tests (network code 301) unanswered.
    pub no_echo: bool,
    /// Stop reading from every connection (after its TLS handshake): the switch's writes
    /// pile up in the socket buffers and nothing is answered, as with a wedged host.
    pub stop_reading: bool,
    /// With a MAC key set: approvals carry a wrong MAC (a switch must not trust them).
    pub bad_answer_mac: bool,
}

/// Counters of what the host received and answered, as `GET /stats` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Messages received (all kinds).
    pub requests: u64,
    /// Financial requests (02xx) received.
    pub financial: u64,
    /// Financial requests answered `00`.
    pub approved: u64,
    /// Financial requests answered with the `decline` code.
    pub declined: u64,
    /// Requests dropped by `drop_percent`.
    pub dropped: u64,
    /// Sign-ons answered.
    pub sign_ons: u64,
    /// Echo tests received.
    pub echoes: u64,
    /// Reversals (04xx) received.
    pub reversals_received: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed by `close_after`.
    pub closed_by_fault: u64,
    /// Requests refused for a missing or wrong MAC (with a MAC key set), answered with the
    /// dialect's `MAC_INVALID` code.
    pub bad_macs: u64,
    /// Reversals of keys beyond [`HOST_REVERSAL_KEYS_MAX`] (counted, not tracked).
    pub reversals_untracked: u64,
    /// Reversals per (DE41, DE11), sorted by key.
    pub reversals: Vec<ReversalCount>,
}

/// Reversals the host received for one (DE41, DE11).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversalCount {
    /// DE41 of the reversal.
    pub terminal: String,
    /// DE11 of the reversal (the reversed request's STAN).
    pub stan: u32,
    /// Reversals and repeats received and answered (not dropped).
    pub answered: u32,
    /// Reversals dropped by `drop_percent`.
    pub dropped: u32,
    /// Of the reversals received (answered or dropped), those marked as repeats (0401,
    /// 0421): a host applies only the first reversal of a debit; a switch must mark every
    /// later send so.
    #[serde(default)]
    pub repeats: u32,
}

/// One listener of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostListener {
    /// Address to bind (port 0: any free port).
    pub addr: SocketAddr,
    /// Dialect spoken on it.
    pub dialect: &'static Dialect,
    /// Length header.
    pub framing: Framing,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// One entry per listening socket.
    pub listeners: Vec<HostListener>,
    /// Admin HTTP address (`None`: no admin endpoint).
    pub admin: Option<SocketAddr>,
    /// The faults at start.
    pub faults: Faults,
}

/// The run-time controls of a host: shared by the listeners, the admin endpoint and tests.
#[derive(Debug, Clone)]
pub struct HostControl(Arc<HostState>);

#[derive(Debug)]
struct HostState {
    faults: Mutex<Faults>,
    counters: Mutex<Stats>,
    reversals: Mutex<HashMap<(String, u32), ReversalCount>>,
    auth_seq: AtomicU64,
    /// MAC key of every listener: requests must carry a MAC under it, approvals get one.
    mac: Mutex<Option<Arc<MacKey>>>,
}

/// A host whose sockets are bound; [`Host::run`] serves them.
pub struct Host {
    /// The server's listeners, in option order.
    sockets: Vec<Listener>,
    /// What each of them is, with its real port.
    listeners: Vec<HostListener>,
    admin: Option<TcpListener>,
    cert_der: CertificateDer<'static>,
    cert_sha256: String,
    control: HostControl,
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("tls: {0}")]
    Tls(String),
    /// The options are unusable.
    #[error("{0}")]
    Usage(String),
}

// === impl Faults ===

impl Faults {
    /// Checks the bounds serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.drop_percent > 100 {
            return Err(format!("drop_percent {} is above 100", self.drop_percent));
        }
        if self.latency_ms.max(self.latency_max_ms) > HOST_LATENCY_MAX_MS {
            return Err(format!("latency above {HOST_LATENCY_MAX_MS} ms"));
        }
        if let Some(code) = &self.decline {
            if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!(
                    "decline {code:?} is not a 2-character response code"
                ));
            }
        }
        Ok(())
    }

    fn latency(&self) -> Duration {
        let ms = if self.latency_max_ms > self.latency_ms {
            rand::random_range(self.latency_ms..=self.latency_max_ms)
        } else {
            self.latency_ms
        };
        Duration::from_millis(ms)
    }

    fn drops(&self) -> bool {
        self.drop_percent > 0 && rand::random_range(0u8..100) < self.drop_percent
    }
}

// === impl HostControl ===

impl HostControl {
    fn new(faults: Faults) -> HostControl {
        HostControl(Arc::new(HostState {
            faults: Mutex::new(faults),
            counters: Mutex::new(Stats::default()),
            reversals: Mutex::new(HashMap::new()),
            auth_seq: AtomicU64::new(1),
            mac: Mutex::new(None),
        }))
    }

    /// Sets (or with `None` clears) the MAC key of every listener (DOMAIN §11): financial
    /// requests and reversals without a valid MAC under it are answered `MAC_INVALID` (63,
    /// CUP A0), approvals carry one. Network management is never MACed.
    pub fn set_mac(&self, key: Option<MacKey>) {
        if let Ok(mut m) = self.0.mac.lock() {
            *m = key.map(Arc::new);
        }
    }

    fn mac(&self) -> Option<Arc<MacKey>> {
        self.0.mac.lock().ok().and_then(|m| m.clone())
    }

    /// The current fault set.
    pub fn faults(&self) -> Faults {
        self.0.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// `f` of the current fault set, without copying it (asked for every frame read).
    fn with_faults<T>(&self, f: impl FnOnce(&Faults) -> T) -> T {
        match self.0.faults.lock() {
            Ok(faults) => f(&faults),
            Err(_) => f(&Faults::default()),
        }
    }

    /// Replaces the fault set (it applies to requests read from now on).
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        if let Ok(mut f) = self.0.faults.lock() {
            *f = faults;
        }
        Ok(())
    }

    /// A copy of the counters, reversals sorted by (DE41, DE11).
    pub fn stats(&self) -> Stats {
        let mut stats = self
            .0
            .counters
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if let Ok(map) = self.0.reversals.lock() {
            stats.reversals = map.values().cloned().collect();
        }
        stats
            .reversals
            .sort_by(|a, b| (&a.terminal, a.stan).cmp(&(&b.terminal, b.stan)));
        stats
    }

    /// Reversals answered for (`terminal`, `stan`).
    pub fn reversals_answered(&self, terminal: &str, stan: u32) -> u32 {
        self.0
            .reversals
            .lock()
            .ok()
            .and_then(|m| m.get(&(terminal.to_string(), stan)).map(|r| r.answered))
            .unwrap_or(0)
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.0.counters.lock() {
            f(&mut s);
        }
    }

    fn count_reversal(&self, terminal: &str, stan: u32, dropped: bool, repeat: bool) {
        let Ok(mut map) = self.0.reversals.lock() else {
            return;
        };
        let key = (terminal.to_string(), stan);
        if !map.contains_key(&key) && map.len() >= HOST_REVERSAL_KEYS_MAX {
            drop(map);
            self.count(|s| s.reversals_untracked += 1);
            return;
        }
        let entry = map.entry(key).or_insert_with(|| ReversalCount {
            terminal: terminal.to_string(),
            stan,
            ..ReversalCount::default()
        });
        if dropped {
            entry.dropped += 1;
        } else {
            entry.answered += 1;
        }
        if repeat {
            entry.repeats += 1;
        }
    }
}

// === impl Host ===

impl Host {
    /// Validates `options`, generates the self-signed certificate (its SHA-256 is logged) and
    /// binds every socket.
    pub async fn bind(options: HostOptions) -> Result<Host, HostError> {
        options.faults.validate().map_err(HostError::Usage)?;
        if options.listeners.is_empty() {
            return Err(HostError::Usage("at least one listener is needed".into()));
        }
        let mut self_signed = None;
        let tls = tls::listener_tls(&TlsConfig::default(), 0, &mut self_signed)
            .map_err(|e| HostError::Tls(e.to_string()))?;
        let mut sockets = Vec::with_capacity(options.listeners.len());
        let mut listeners = Vec::with_capacity(options.listeners.len());
        for (index, l) in options.listeners.iter().enumerate() {
            let tcp = bind(l.addr).await?;
            let addr = tcp.local_addr().map_err(|source| HostError::Bind {
                addr: l.addr,
                source,
            })?;
            tracing::info!(%addr, dialect = l.dialect.name(), cert_sha256 = %tls.cert_sha256, "host listening");
            let info = Arc::new(ListenerInfo {
                index,
                name: format!("host:{}@{addr}", l.dialect.name()),
                addr,
                dialect: l.dialect,
                framing: l.framing,
                // The host's MAC key is its control's, changeable at run time.
                mac: None,
                client_auth: tls.client_auth,
                cert_der: tls.cert_der.clone(),
                cert_sha256: tls.cert_sha256.clone(),
                answer_order: AnswerOrder::AsReady,
            });
            sockets.push(Listener::new(tcp, info, tls.acceptor.clone()));
            listeners.push(HostListener { addr, ..*l });
        }
        let admin = match options.admin {
            Some(addr) => {
                let tcp = bind(addr).await?;
                tracing::info!(addr = ?tcp.local_addr().ok(), "host admin http listening");
                Some(tcp)
            }
            None => None,
        };
        Ok(Host {
            sockets,
            listeners,
            admin,
            cert_der: tls.cert_der,
            cert_sha256: tls.cert_sha256,
            control: HostControl::new(options.faults),
        })
    }

    /// The bound listeners (real ports), in option order.
    pub fn listeners(&self) -> Vec<HostListener> {
        self.listeners.clone()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The certificate every listener presents (DER), for a client to trust.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Lower-case hex SHA-256 of [`Host::cert_der`].
    pub fn cert_sha256(&self) -> &str {
        &self.cert_sha256
    }

    /// The run-time controls (faults, stats).
    pub fn control(&self) -> HostControl {
        self.control.clone()
    }

    /// Serves until `shutdown` completes, then closes every connection at once (a host that
    /// goes away does not drain).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let readiness = Readiness::default();
        // Nothing to load: ready once accepting.
        readiness.set_merchants_loaded(true);
        let service = Arc::new(HostService(self.control));
        let admin = self.admin.map(|listener| admin::Site {
            listener,
            readiness: readiness.clone(),
            routes: Some(service.clone()),
            connection_timeout: Duration::from_millis(limits::ADMIN_CONNECTION_TIMEOUT_DEFAULT_MS),
        });
        server::serve(
            self.sockets,
            admin,
            Arc::new(host_limits()),
            service,
            &readiness,
            shutdown,
        )
        .await;
    }
}

/// The server limits of the host: the gateway's defaults (handshake budget, handshake
/// timeout, frame size) but for its own connection and in-flight bounds, a long idle time and
/// no drain.
fn host_limits() -> LimitsConfig {
    LimitsConfig {
        max_connections: limits::HOST_CONNECTIONS_MAX,
        max_in_flight_per_connection: limits::HOST_IN_FLIGHT_PER_CONNECTION_MAX,
        idle_timeout_ms: limits::HOST_IDLE_TIMEOUT_MS,
        // A host that goes away does not drain.
        shutdown_grace_ms: 0,
        ..LimitsConfig::default()
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, HostError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Bind { addr, source })
}

/// The host's behaviour behind the server's listeners and admin HTTP.
struct HostService(HostControl);

impl Dispatch for HostService {
    fn handle(&self, ctx: &RequestCtx, body: Bytes) -> impl Future<Output = Handled> + Send {
        let dialect = ctx.listener.dialect;
        // The faults when the request is dispatched (as soon as it is read) apply to it,
        // whatever its latency.
        let faults = self.0.faults();
        async move {
            match answer(dialect, &body, &faults, &self.0).await {
                Some(reply) => Handled::Reply(reply),
                None => Handled::Drop,
            }
        }
    }

    fn opened(&self, _ctx: &RequestCtx) {
        self.0.count(|s| s.connections += 1);
    }

    fn reading_paused(&self, _ctx: &RequestCtx) -> bool {
        self.0.with_faults(|f| f.stop_reading)
    }

    fn intake(&self, _ctx: &RequestCtx, taken: u64) -> Intake {
        let (stop_reading, close_after) = self.0.with_faults(|f| (f.stop_reading, f.close_after));
        if stop_reading {
            // Set while this frame was arriving: not read, as it were.
            return Intake::Pause;
        }
        if close_after.is_some_and(|n| taken >= n) {
            // Answer what is in flight, then close without reading this one.
            self.0.count(|s| s.closed_by_fault += 1);
            return Intake::Close;
        }
        Intake::Take
    }
}

/// `GET /faults`, `POST /faults`, `GET /stats`.
impl AdminRoutes for HostService {
    fn serves(&self, path: &str) -> bool {
        matches!(path, "/faults" | "/stats")
    }

    fn call(
        &self,
        req: Request<Incoming>,
        _peer: IpAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        admin_respond(req, &self.0)
    }
}

/// Decides and renders the answer to one message (from its MTI on) after its latency;
/// `None`: no answer.
async fn answer(
    dialect: &'static Dialect,
    body: &[u8],
    faults: &Faults,
    control: &HostControl,
) -> Option<BytesMut> {
    control.count(|s| s.requests += 1);
    let spec = dialect.spec();
    let msg = iso8583::decode(spec, body).ok()?;
    let mti = msg.mti();
    if !mti.is_request() {
        return None;
    }
    let network = mti.class() == 8;
    if !network && faults.drops() {
        control.count(|s| s.dropped += 1);
        if mti.class() == 4 {
            control.count(|s| s.reversals_received += 1);
            let (t, stan) = (msg.terminal().unwrap_or(""), msg.stan().unwrap_or(0));
            control.count_reversal(t, stan, true, mti.is_repeat());
        }
        return None;
    }
    let delay = if network {
        Duration::ZERO
    } else {
        faults.latency()
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut out = BytesMut::with_capacity(256);
    let key = control.mac().filter(|_| !network);
    if let Some(key) = &key {
        let valid = msg
            .mac()
            .is_some_and(|(mab, value)| mac::verify(key, mab, value));
        if !valid {
            control.count(|s| s.bad_macs += 1);
            let code = crate::ledger::Reason::MAC_INVALID.code(dialect.code_column);
            financial_answer(&msg, code, None, &mut out)?;
            return Some(out);
        }
    }
    let rendered = match mti.class() {
        8 => network_answer(&msg, faults, control, &mut out),
        4 => {
            control.count(|s| s.reversals_received += 1);
            let (t, stan) = (msg.terminal().unwrap_or(""), msg.stan().unwrap_or(0));
            control.count_reversal(t, stan, false, mti.is_repeat());
            financial_answer(&msg, "00", None, &mut out)
        }
        2 => {
            control.count(|s| s.financial += 1);
            let code = faults.decline.as_deref().unwrap_or("00");
            if code == "00" {
                control.count(|s| s.approved += 1);
            } else {
                control.count(|s| s.declined += 1);
            }
            let auth = control.0.auth_seq.fetch_add(1, Ordering::Relaxed) % 1_000_000;
            financial_answer(&msg, code, Some(auth), &mut out)
        }
        _ => None,
    };
    rendered?;
    let approved = iso8583::decode(spec, &out).is_ok_and(|a| a.response_code() == Some("00"));
    match (&key, approved) {
        (Some(key), true) => {
            let mut signed = BytesMut::from(&mac::sign_message(spec, key, &out)?[..]);
            if faults.bad_answer_mac {
                corrupt_last_byte(&mut signed);
            }
            Some(signed)
        }
        _ => Some(out),
    }
}

/// Changes the last byte of `body` (to another hex digit when it was one): a wrong MAC that
/// still decodes.
fn corrupt_last_byte(body: &mut BytesMut) {
    if let Some(b) = body.last_mut() {
        *b = if *b == b'0' { b'1' } else { b'0' };
    }
}

/// Sign-on and echo answers: DE 7, 11, 41, 42, 60, 70 echoed, DE39 `00`.
fn network_answer(
    msg: &Message<'_>,
    faults: &Faults,
    control: &HostControl,
    out: &mut BytesMut,
) -> Option<()> {
    let code = msg
        .network_code()
        .or_else(|| msg.cup60().and_then(|c| c.network_code));
    if code == Some(301) {
        control.count(|s| s.echoes += 1);
        if faults.no_echo {
            return None;
        }
    } else {
        control.count(|s| s.sign_ons += 1);
    }
    let mut fields: FieldList<'_, 12> = FieldList::new();
    for n in [7, 11, 41, 42, 60, 70] {
        fields.echo(msg, n).ok()?;
    }
    fields.set(39, Value::Text(b"00")).ok()?;
    iso8583::encode(msg.spec(), msg.mti().response(), fields.as_slice(), out).ok()
}

/// Financial and reversal answers: DE 3, 4, 11, 12, 13, 37, 41, 42 echoed, DE38 on approval
/// of a financial request, DE39 `code`.
fn financial_answer(
    msg: &Message<'_>,
    code: &str,
    auth: Option<u64>,
    out: &mut BytesMut,
) -> Option<()> {
    let mut fields: FieldList<'_, 16> = FieldList::new();
    for n in [3, 4, 11, 12, 13, 37, 41, 42] {
        fields.echo(msg, n).ok()?;
    }
    let rrn = format!("{:012}", msg.stan().unwrap_or(0));
    if !msg.has(37) {
        fields.set(37, Value::Text(rrn.as_bytes())).ok()?;
    }
    let auth_text = auth.map(|a| format!("{a:06}"));
    if let (Some(a), "00") = (&auth_text, code) {
        fields.set(38, Value::Text(a.as_bytes())).ok()?;
    }
    fields.set(39, Value::Text(code.as_bytes())).ok()?;
    iso8583::encode(msg.spec(), msg.mti().response(), fields.as_slice(), out).ok()
}

// === admin ===

async fn admin_respond(req: Request<Incoming>, control: &HostControl) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/faults") => json(StatusCode::OK, &control.faults()),
        (&Method::GET, "/stats") => json(StatusCode::OK, &control.stats()),
        (&Method::POST, "/faults") => {
            let body = match Limited::new(req.into_body(), limits::HOST_ADMIN_BODY_BYTES_MAX)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return admin::text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            };
            let faults: Faults = match serde_json::from_slice(&body) {
                Ok(f) => f,
                Err(e) => return admin::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            match control.set_faults(faults) {
                Ok(()) => {
                    tracing::info!(faults = ?control.faults(), "host faults changed");
                    json(StatusCode::OK, &control.faults())
                }
                Err(e) => admin::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => admin::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    admin::json(status, serde_json::to_vec(value).unwrap_or_default())
}

// === command line ===

/// Arguments of `refundgate host`.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// A TOML file with `listeners`, `admin` and `[faults]`; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address of the first listener; further `--dialect`s listen on the following ports.
    #[arg(long, default_value = "127.0.0.1:9683")]
    pub addr: SocketAddr,
    /// Dialect(s) to serve, one listener each: ascii1987, cup_pos, iso87b (repeatable).
    #[arg(long, value_parser = Dialect::named)]
    pub dialect: Vec<&'static Dialect>,
    /// Fixed latency before each answer.
    #[arg(long, conflicts_with = "latency_random")]
    pub latency_ms: Option<u64>,
    /// Random latency per answer, `A..B` milliseconds (answers come out of order).
    #[arg(long, value_parser = parse_range)]
    pub latency_random: Option<(u64, u64)>,
    /// Percentage of requests left unanswered.
    #[arg(long)]
    pub drop_percent: Option<u8>,
    /// Answer financial requests with this DE39 instead of 00.
    #[arg(long)]
    pub decline: Option<String>,
    /// Close each connection after this many requests.
    #[arg(long)]
    pub close_after: Option<u64>,
    /// Leave echo tests unanswered.
    #[arg(long)]
    pub no_echo: bool,
    /// Admin HTTP address (`GET/POST /faults`, `GET /stats`).
    #[arg(long, default_value = "127.0.0.1:9684")]
    pub admin: SocketAddr,
    /// Also write the self-signed certificate (PEM) here, for a gateway's `tls.ca`.
    #[arg(long)]
    pub cert_out: Option<PathBuf>,
}

/// `refundgate host --config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HostFile {
    listeners: Vec<HostFileListener>,
    admin: Option<SocketAddr>,
    faults: Faults,
    /// `mac = { algorithm, key }`: the MAC key of every listener (test keys; never logged).
    mac: Option<crate::config::MacConfig>,
    /// Dialect files loaded before the listeners are read (as in the gateway's config).
    dialects: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFileListener {
    addr: SocketAddr,
    #[serde(deserialize_with = "Dialect::deserialize")]
    dialect: &'static Dialect,
    #[serde(default = "binary2")]
    framing: Framing,
}

fn binary2() -> Framing {
    Framing::Binary2
}

/// Loads the `dialects` files a host file lists, before its listeners name them.
fn load_dialect_files(text: &str) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Listed {
        #[serde(default)]
        dialects: Vec<PathBuf>,
    }
    let Ok(listed) = toml::from_str::<Listed>(text) else {
        return Ok(()); // The full parse names the error.
    };
    for (i, path) in listed.dialects.iter().enumerate() {
        Dialect::load_file(path).map_err(|e| format!("dialects[{i}]: {e}"))?;
    }
    Ok(())
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a: u64 = a.trim().parse().map_err(|_| "A is not a number")?;
    let b: u64 = b.trim().parse().map_err(|_| "B is not a number")?;
    if a > b {
        return Err("A is above B".into());
    }
    Ok((a, b))
}

impl HostArgs {
    /// The options these arguments (and the `--config` file) ask for, and the file's MAC key.
    pub fn options(&self) -> Result<(HostOptions, Option<MacKey>), String> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                load_dialect_files(&text)?;
                toml::from_str::<HostFile>(&text)
                    .map_err(|e| format!("{}: {}", path.display(), e.message()))?
            }
            None => HostFile::default(),
        };
        let mut faults = file.faults;
        if let Some(ms) = self.latency_ms {
            faults.latency_ms = ms;
            faults.latency_max_ms = 0;
        }
        if let Some((a, b)) = self.latency_random {
            faults.latency_ms = a;
            faults.latency_max_ms = b;
        }
        if let Some(p) = self.drop_percent {
            faults.drop_percent = p;
        }
        if self.decline.is_some() {
            faults.decline = self.decline.clone();
        }
        if self.close_after.is_some() {
            faults.close_after = self.close_after;
        }
        faults.no_echo |= self.no_echo;
        faults.validate()?;
        let listeners = if !self.dialect.is_empty() || file.listeners.is_empty() {
            let dialects = if self.dialect.is_empty() {
                vec![Dialect::default_dialect()]
            } else {
                self.dialect.clone()
            };
            dialects
                .iter()
                .enumerate()
                .map(|(i, &dialect)| {
                    let mut addr = self.addr;
                    if addr.port() != 0 {
                        let port = u16::try_from(usize::from(addr.port()) + i)
                            .map_err(|_| "port out of range".to_string())?;
                        addr.set_port(port);
                    }
                    Ok(HostListener {
                        addr,
                        dialect,
                        framing: Framing::Binary2,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?
        } else {
            file.listeners
                .iter()
                .map(|l| HostListener {
                    addr: l.addr,
                    dialect: l.dialect,
                    framing: l.framing,
                })
                .collect()
        };
        let admin = file.admin.unwrap_or(self.admin);
        if let Some(clash) = listeners
            .iter()
            .find(|l| l.addr == admin && admin.port() != 0)
        {
            return Err(format!(
                "{} is both a listener and the admin address; pass --admin elsewhere",
                clash.addr
            ));
        }
        let mac = match &file.mac {
            Some(m) => {
                Some(mac::key_from_config(&m.algorithm, &m.key).map_err(|e| format!("mac.{e}"))?)
            }
            None => None,
        };
        if let Some(key) = &mac {
            if let Some(l) = listeners
                .iter()
                .find(|l| mac::field_for(key, l.dialect.spec(), false).is_none())
            {
                return Err(format!(
                    "mac.algorithm: the {} MAC element cannot carry this MAC",
                    l.dialect.name()
                ));
            }
        }
        Ok((
            HostOptions {
                listeners,
                admin: Some(admin),
                faults,
            },
            mac,
        ))
    }
}

/// Runs `refundgate host` until SIGTERM/SIGINT and returns the exit code.
pub fn run(args: &HostArgs) -> ExitCode {
    // Held until `run` returns: dropping it writes out the buffered log lines.
    let _log_guard = match crate::telemetry::init_logging(crate::config::LogFormat::Plain, "info") {
        Ok(guard) => Some(guard),
        Err(e) => {
            eprintln!("refundgate: logging: {e}");
            None
        }
    };
    let (options, mac_key) = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("refundgate: host: {e}");
            return ExitCode::from(crate::exit::EXIT_USAGE);
        }
    };
    // `/metrics` of its admin: the server's connection counters (admission refusals and the
    // like) for the host's listeners.
    if let Err(e) = crate::telemetry::install_metrics() {
        tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refundgate: runtime: {e}");
            return ExitCode::from(crate::exit::EXIT_IOERR);
        }
    };
    runtime.block_on(async {
        let host = match Host::bind(options).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("refundgate: host: {e}");
                return ExitCode::from(crate::exit::EXIT_OSERR);
            }
        };
        host.control().set_mac(mac_key);
        if let Some(path) = &args.cert_out {
            let pem = pem_of(&host.cert_der());
            if let Err(e) = std::fs::write(path, pem) {
                eprintln!("refundgate: host: {}: {e}", path.display());
                return ExitCode::from(crate::exit::EXIT_IOERR);
            }
        }
        host.run(crate::server::shutdown::signal()).await;
        ExitCode::SUCCESS
    })
}

/// A DER certificate as PEM text (LF line endings).
pub fn pem_of(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_as_pem_reads_back_as_the_same_der() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let text = pem_of(&der);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 64));
        let back = pem::parse(&text).unwrap();
        assert_eq!((back.tag(), back.contents()), ("CERTIFICATE", &der[..]));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        host: HostArgs,
    }

    fn host_args(args: &[&str]) -> Result<HostArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("host").chain(args.iter().copied())).map(|c| c.host)
    }

    #[test]
    fn any_dialect_of_the_registry_is_served_by_name_and_the_mac_key_comes_from_the_file() {
        let args = host_args(&[
            "--dialect",
            "iso87b",
            "--dialect",
            "cup_pos",
            "--admin",
            "127.0.0.1:0",
        ])
        .unwrap();
        let (options, mac) = args.options().unwrap();
        let names: Vec<&str> = options.listeners.iter().map(|l| l.dialect.name()).collect();
        assert_eq!(names, ["iso87b", "cup_pos"]);
        assert!(mac.is_none());
        let e = host_args(&["--dialect", "iso93"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown dialect \"iso93\""), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.toml");
        std::fs::write(
            &file,
            "mac = { algorithm = \"aes_cmac\", key = \"2b7e151628aed2a6abf7158809cf4f3c\" }\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"iso87b\"\n",
        )
        .unwrap();
        let args = host_args(&["--config", file.to_str().unwrap()]).unwrap();
        let (options, mac) = args.options().unwrap();
        assert_eq!(options.listeners[0].dialect.name(), "iso87b");
        assert_eq!(
            mac.map(|k| k.algorithm()),
            Some(crate::mac::MacAlgorithm::AesCmac)
        );
        // A key the dialect's MAC element cannot carry is refused, naming the key.
        std::fs::write(
            &file,
            "mac = { algorithm = \"x919\", key = \"0123456789ABCDEFFEDCBA9876543210\" }\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"cup_pos\"\n",
        )
        .unwrap();
        let e = host_args(&["--config", file.to_str().unwrap()])
            .unwrap()
            .options()
            .err()
            .unwrap();
        assert!(
            e.starts_with("mac.algorithm:") && !e.contains("0123"),
            "{e}"
        );
    }

    #[test]
    fn fault_sets_are_bounded() {
        let mut f = Faults {
            drop_percent: 101,
            ..Faults::default()
        };
        assert!(f.validate().is_err());
        f.drop_percent = 20;
        f.decline = Some("051".into());
        assert!(f.validate().is_err());
        f.decline = Some("05".into());
        assert!(f.validate().is_ok());
        let json: Faults = serde_json::from_str(r#"{"latency_ms": 5}"#).unwrap();
        assert_eq!(json.latency_ms, 5);
        assert!(serde_json::from_str::<Faults>(r#"{"bogus": 1}"#).is_err());
    }

    #[test]
    fn latency_random_parses_a_range() {
        assert_eq!(parse_range("5..50"), Ok((5, 50)));
        assert!(parse_range("50..5").is_err());
    }
}
