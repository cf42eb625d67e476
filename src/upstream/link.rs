//! One multiplexed TLS link to an upstream host (DOMAIN §8).
//!
//! Many requests are in flight on one connection; each answer is matched to its request by
//! [`Key`] = (request MTI with the origin digit cleared, DE41, DE42, DE11): terminal ids are
//! only unique within a merchant. An answer without DE42 (a host that does not echo it) is
//! matched on (MTI, DE41, DE11) when exactly one pending request has them. The pending map is bounded
//! by `max_pending`: a request beyond it is refused at once ([`LinkError::Full`], answered 91)
//! rather than queued. Each request waits at most `timeout`; an answer arriving after that finds
//! no pending entry and is counted as late and dropped — never delivered as a match.
//!
//! A supervisor task owns the connection: it connects to the addresses in priority order
//! (failing over to the next when one refuses or fails the TLS handshake or the sign-on),
//! signs on (0800 / 001) before it lets requests through, sends an echo (0800 / 301) when the
//! link has been quiet for `echo_interval` and drops the connection if the echo goes
//! unanswered, and reconnects with exponential backoff and jitter. While no connection is up
//! requests fail at once with [`LinkError::Down`].
//!
//! Deadlines: a batch of writes must complete within `write_timeout`, and once something was
//! sent the host must send *something* back within `read_timeout` (half-way through, an echo
//! probes it, so a host that is merely slow on one request answers the echo and keeps the
//! link); otherwise the connection is dropped (marked down, reconnected, failing over to the next address). A host that stops
//! reading therefore cannot stall the link while it still counts as up.
//!
//! When a connection breaks its pending requests fail at once as timeouts: whether the host
//! saw them is unknown, so the caller treats them like any other timeout (and reverses).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::dialect::{Dialect, NetworkCode};
use crate::frame::{Frame, FrameCodec, Framing};
use crate::iso8583::{self, FieldList, Message, Mti, Spec, Value};
use crate::limits::{
    UPSTREAM_CONNECT_TIMEOUT_MAX_MS, UPSTREAM_FRAME_BYTES_MAX, UPSTREAM_QUARANTINE_TIMEOUTS,
};
use crate::mac::{self, MacKey};

/// `refundgate_upstream_up{upstream}`: 1 while the link is connected and signed on.
pub const UPSTREAM_UP: &str = "refundgate_upstream_up";
/// `refundgate_upstream_late_answers_total{upstream}`: answers that matched no pending request.
pub const UPSTREAM_LATE_ANSWERS_TOTAL: &str = "refundgate_upstream_late_answers_total";
/// `refundgate_upstream_unmatched_answers_total{upstream, reason}`: the same answers by why
/// they matched nothing ([`Unmatched::label`]).
pub const UPSTREAM_UNMATCHED_ANSWERS_TOTAL: &str = "refundgate_upstream_unmatched_answers_total";

/// Answers delivered lately, remembered to tell a duplicate answer from a stray one.
const RECENTLY_DELIVERED_MAX: usize = 1024;

/// Why an answer from the host matched no waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Its request timed out (and was reversed) this long before it arrived.
    AfterTimeout {
        /// Milliseconds between the timeout and the answer.
        ms: u64,
    },
    /// Its request was already answered: the host sent it twice.
    Duplicate,
    /// A request with its terminal and STAN waits, but for another MTI (e.g. 0410 to a 0200).
    WrongMti,
    /// No DE42 in the answer and several requests it could be for: given to none.
    Ambiguous,
    /// Nothing was ever sent with its key (or it was forgotten long ago).
    NoPending,
}

impl Unmatched {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Unmatched::AfterTimeout { .. } => "after_timeout",
            Unmatched::Duplicate => "duplicate",
            Unmatched::WrongMti => "wrong_mti",
            Unmatched::Ambiguous => "ambiguous",
            Unmatched::NoPending => "no_pending",
        }
    }
}
/// `refundgate_upstream_bad_macs_total{upstream}`: answers whose MAC was wrong, or approvals
/// without one, on a link with a MAC key (each also logged once).
pub const UPSTREAM_BAD_MACS_TOTAL: &str = "refundgate_upstream_bad_macs_total";
/// `refundgate_upstream_connects_total{upstream}`: connections established (signed on).
pub const UPSTREAM_CONNECTS_TOTAL: &str = "refundgate_upstream_connects_total";
/// `refundgate_upstream_disconnects_total{upstream,reason}`: signed-on connections dropped, by
/// reason (`write_timeout`, `read_timeout`, `echo_unanswered`, `write_error`, `read_error`,
/// `closed_by_host`, `stopped`).
pub const UPSTREAM_DISCONNECTS_TOTAL: &str = "refundgate_upstream_disconnects_total";

/// TPDU the switch sends on `cup_pos` upstream links (destination 0000, source 0000).
const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x00, 0x00, 0x00];
/// `cup_pos` message header the switch sends upstream.
const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

/// Everything one link needs; built from `[[upstreams]]` by [`super::Upstreams::start`].
#[derive(Clone)]
pub struct LinkConfig {
    /// The upstream's name (metric label; bounded by configuration).
    pub name: Arc<str>,
    /// Addresses in priority order.
    pub addrs: Vec<SocketAddr>,
    /// Dialect spoken on the link.
    pub dialect: &'static Dialect,
    /// MAC key of the link: requests are MACed with it and answers checked (never logged).
    pub mac: Option<MacKey>,
    /// Length header.
    pub framing: Framing,
    /// rustls client configuration (CA, client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Name checked against the host certificate; `None`: each address's IP.
    pub server_name: Option<ServerName<'static>>,
    /// How long a request waits for its answer.
    pub timeout: Duration,
    /// Longest one batch of writes may take: a host whose receive window stays shut this long
    /// is wedged, and the link is dropped.
    pub write_timeout: Duration,
    /// Longest the link may go without reading anything from the host while something it
    /// sent is unanswered; then the link is dropped (reconnect, failover).
    pub read_timeout: Duration,
    /// Most requests in flight at once.
    pub max_pending: usize,
    /// Quiet time after which an echo is sent.
    pub echo_interval: Duration,
    /// First reconnect delay; doubles per failed round up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Wall time (DE7 of the link's own sign-ons and echoes): the gateway's injected clock.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// How a connection is opened: `None`, TCP and TLS to the address (every configured
    /// upstream); the deterministic simulator gives its simulated network here.
    pub connector: Option<Connector>,
}

/// A byte stream to a host (TLS over TCP, or the simulator's in-memory pipe).
pub trait HostIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> HostIo for T {}

/// Opens a connection to one address instead of TCP + TLS ([`LinkConfig::connector`]).
pub type Connector = Arc<
    dyn Fn(
            SocketAddr,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<Box<dyn HostIo>>> + Send>,
        > + Send
        + Sync,
>;

/// What identifies an answer's request: MTI (origin digit cleared), DE41, DE42, DE11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Request MTI with the origin digit cleared (0200, 0220, 0400, 0800, …).
    pub mti: u16,
    /// DE41, space-padded (spaces when absent).
    pub terminal: [u8; 8],
    /// DE42, space-padded (spaces when absent).
    pub merchant: [u8; 15],
    /// DE11.
    pub stan: u32,
}

/// Why a request got no answer from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// No connection is up (never sent): 91 `HOST_UNREACHABLE`.
    #[error("link down")]
    Down,
    /// The pending map is full (never sent): 91 `HOST_UNREACHABLE`.
    #[error("too many requests in flight")]
    Full,
    /// A request with the same key is in flight, or timed out and is quarantined (never sent).
    #[error("a request with the same key is in flight")]
    Busy,
    /// Sent, no answer within the timeout: the host may or may not have acted on it.
    #[error("no answer in time")]
    Timeout,
    /// The message has no readable MTI/DE11 (never sent).
    #[error("message cannot be keyed")]
    Unkeyed,
    /// Sent, and answered with a wrong MAC (or an approval without one): the answer is not
    /// trusted, so whether the host acted is unknown, as after a timeout.
    #[error("answer with a bad MAC")]
    BadMac,
}

/// A running link; dropping it stops its supervisor and closes the connection.
pub struct Link {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    config: LinkConfig,
    spec: &'static Spec,
    pending: Mutex<HashMap<Key, oneshot::Sender<Bytes>>>,
    /// Keys of financial requests that timed out, until their late answer arrives or
    /// [`UPSTREAM_QUARANTINE_TIMEOUTS`] timeouts pass: a new request with the same key is refused
    /// meanwhile, so the old answer can never be taken for the new request's.
    quarantine: Mutex<HashMap<Key, Instant>>,
    /// Keys whose answer was delivered lately (bounded), to tell duplicates.
    delivered: Mutex<std::collections::VecDeque<Key>>,
    outbox: Mutex<Option<mpsc::Sender<Bytes>>>,
    stan: AtomicU32,
    late: AtomicU64,
    connects: AtomicU64,
}

// === impl Key ===

impl Key {
    /// The key of a request (or of the request an answer belongs to).
    pub fn of(msg: &Message<'_>) -> Option<Key> {
        let mti = msg.mti();
        let stan = msg.stan()?;
        let mut terminal = [b' '; 8];
        if let Some(t) = msg.terminal() {
            let n = t.len().min(8);
            terminal[..n].copy_from_slice(&t.as_bytes()[..n]);
        }
        let mut merchant = [b' '; 15];
        if let Some(m) = msg.merchant() {
            let n = m.len().min(15);
            merchant[..n].copy_from_slice(&m.as_bytes()[..n]);
        }
        Some(Key {
            mti: request_mti(mti),
            terminal,
            merchant,
            stan,
        })
    }

    /// Whether `other` names the same request apart from DE42.
    fn same_but_merchant(&self, other: &Key) -> bool {
        self.mti == other.mti && self.terminal == other.terminal && self.stan == other.stan
    }

    /// DE41 as text (trailing spaces trimmed).
    pub fn terminal_str(&self) -> &str {
        std::str::from_utf8(&self.terminal).unwrap_or("").trim_end()
    }
}

/// Whether an answer may be trusted on a MAC link: its MAC verifies, or it carries none and
/// is not an approval (declines are sent without a MAC, DOMAIN §11). Network management is
/// never MACed; an answer that does not decode is left to the caller (it decides nothing).
fn answer_mac_holds(spec: &Spec, key: &MacKey, answer: &[u8]) -> bool {
    let Ok(msg) = iso8583::decode(spec, answer) else {
        return true;
    };
    if msg.mti().class() == 8 {
        return true;
    }
    match msg.mac() {
        Some((mab, value)) => mac::verify(key, mab, value),
        None => msg.response_code() != Some("00"),
    }
}

/// The request MTI of a request or answer, origin digit cleared: 0201→0200, 0210→0200.
pub fn request_mti(mti: Mti) -> u16 {
    let tens = mti.0 / 10;
    if tens % 2 == 1 {
        (tens - 1) * 10
    } else {
        tens * 10
    }
}

// === impl Link ===

impl Link {
    /// Starts the supervisor: it connects in the background; until it is signed on requests
    /// fail with [`LinkError::Down`].
    pub fn start(config: LinkConfig) -> Link {
        let spec: &'static Spec = config.dialect.spec();
        metrics::gauge!(UPSTREAM_UP, "upstream" => config.name.to_string()).set(0.0);
        let shared = Arc::new(Shared {
            config,
            spec,
            pending: Mutex::new(HashMap::new()),
            quarantine: Mutex::new(HashMap::new()),
            delivered: Mutex::new(std::collections::VecDeque::new()),
            outbox: Mutex::new(None),
            stan: AtomicU32::new(1 + crate::clock::random_below(899_999)),
            late: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(supervise(Arc::clone(&shared), stopped));
        Link { shared, stop, task }
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The dialect spoken on the link.
    pub fn dialect(&self) -> &'static Dialect {
        self.shared.config.dialect
    }

    /// Whether a connection is up and signed on.
    pub fn is_up(&self) -> bool {
        self.shared.outbox.lock().is_ok_and(|o| o.is_some())
    }

    /// Requests waiting for their answer.
    pub fn pending(&self) -> usize {
        self.shared.pending.lock().map_or(0, |p| p.len())
    }

    /// Connections established and signed on since start.
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Answers that arrived after their request had timed out (or matched nothing).
    pub fn late_answers(&self) -> u64 {
        self.shared.late.load(Ordering::Relaxed)
    }

    /// Sends `body` (MTI onward) and waits for the answer matched by `key`, at most the
    /// link's timeout. After a timeout the key is quarantined (see [`LinkError::Busy`]) until
    /// the late answer arrives, so it cannot be delivered to a later request with the same key.
    pub async fn call(&self, key: Key, body: Bytes) -> Result<Bytes, LinkError> {
        self.shared.call(key, body, true).await
    }

    /// [`Link::call`] for a message whose every send is the same request (a reversal and its
    /// repeats): an answer to an earlier send is a valid answer, so no quarantine.
    pub async fn call_repeatable(&self, key: Key, body: Bytes) -> Result<Bytes, LinkError> {
        self.shared.call(key, body, false).await
    }

    /// Stops the supervisor and closes the connection; pending requests time out.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.shared.config.name)
            .field("up", &self.is_up())
            .field("pending", &self.pending())
            .finish()
    }
}

// === impl Shared ===

impl Shared {
    async fn call(&self, key: Key, body: Bytes, quarantine: bool) -> Result<Bytes, LinkError> {
        if quarantine && self.quarantined(&key) {
            return Err(LinkError::Busy);
        }
        let outbox = self
            .outbox
            .lock()
            .ok()
            .and_then(|o| o.clone())
            .ok_or(LinkError::Down)?;
        let body = match &self.config.mac {
            Some(key) => mac::sign_message(self.spec, key, &body).ok_or(LinkError::Unkeyed)?,
            None => body,
        };
        let (tx, mut rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().map_err(|_| LinkError::Down)?;
            if pending.contains_key(&key) {
                return Err(LinkError::Busy);
            }
            if pending.len() >= self.config.max_pending {
                return Err(LinkError::Full);
            }
            pending.insert(key, tx);
        }
        // The outbox holds max_pending bodies, so with the map bounded it is never full; a
        // closed one means the connection just went away before the request was written.
        if outbox.try_send(body).is_err() {
            self.forget(&key);
            return Err(LinkError::Down);
        }
        match tokio::time::timeout(self.config.timeout, &mut rx).await {
            Ok(Ok(answer)) => self.checked(key, answer),
            Ok(Err(_)) => Err(LinkError::Timeout),
            Err(_) => {
                self.forget(&key);
                // The answer may have been matched between the timer and the removal.
                let late = rx.try_recv().map_err(|_| LinkError::Timeout);
                if late.is_err() && quarantine {
                    self.quarantine(key);
                }
                late
            }
        }
    }

    /// `answer` when the link has no MAC key or its MAC holds; else counted, logged once and
    /// refused.
    fn checked(&self, key: Key, answer: Bytes) -> Result<Bytes, LinkError> {
        let Some(mac_key) = &self.config.mac else {
            return Ok(answer);
        };
        if answer_mac_holds(self.spec, mac_key, &answer) {
            return Ok(answer);
        }
        metrics::counter!(UPSTREAM_BAD_MACS_TOTAL, "upstream" => self.config.name.to_string())
            .increment(1);
        tracing::warn!(
            upstream = %self.config.name,
            mti = key.mti,
            terminal = key.terminal_str(),
            stan = key.stan,
            "answer from host with a bad or missing MAC; not trusted, treated as no answer"
        );
        Err(LinkError::BadMac)
    }

    fn quarantined(&self, key: &Key) -> bool {
        let Ok(mut q) = self.quarantine.lock() else {
            return true;
        };
        match q.get(key) {
            Some(&until) if until > Instant::now() => true,
            Some(_) => {
                q.remove(key);
                false
            }
            None => false,
        }
    }

    /// Bounded like the pending map: when full, expired keys go first, then the oldest.
    fn quarantine(&self, key: Key) {
        let Ok(mut q) = self.quarantine.lock() else {
            return;
        };
        let now = Instant::now();
        if q.len() >= self.config.max_pending {
            q.retain(|_, until| *until > now);
        }
        if q.len() >= self.config.max_pending {
            if let Some(oldest) = q.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                q.remove(&oldest);
            }
        }
        q.insert(
            key,
            now + self.config.timeout * UPSTREAM_QUARANTINE_TIMEOUTS,
        );
    }

    fn pending(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }

    fn forget(&self, key: &Key) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(key);
        }
    }

    /// Routes one answer read from the host to its waiting request, or counts it as late.
    fn deliver(&self, body: Bytes) {
        let Ok(msg) = iso8583::decode(self.spec, &body) else {
            tracing::info!(upstream = %self.config.name, "undecodable answer from host dropped");
            return;
        };
        if msg.mti().class() == 8 {
            return; // Echo / sign-on answers only prove liveness.
        }
        let Some(key) = Key::of(&msg) else {
            return;
        };
        let code = msg.response_code().unwrap_or("").to_string();
        let echoes_merchant = msg.has(42);
        let mut ambiguous = false;
        let waiter = self.pending.lock().ok().and_then(|mut p| {
            if let Some(tx) = p.remove(&key) {
                return Some(tx);
            }
            if echoes_merchant {
                return None;
            }
            // No DE42 in the answer: only an unambiguous match is delivered.
            let mut candidates = p.keys().filter(|k| k.same_but_merchant(&key));
            let only = match (candidates.next(), candidates.next()) {
                (Some(k), None) => *k,
                (Some(_), Some(_)) => {
                    ambiguous = true;
                    return None;
                }
                _ => return None,
            };
            p.remove(&only)
        });
        match waiter {
            Some(tx) => {
                if tx.send(body).is_err() {
                    // The request gave up between the match and now.
                    self.count_unmatched(&key, &code, Unmatched::AfterTimeout { ms: 0 });
                } else if let Ok(mut d) = self.delivered.lock() {
                    if d.len() == RECENTLY_DELIVERED_MAX {
                        d.pop_front();
                    }
                    d.push_back(key);
                }
            }
            None => {
                let why = if ambiguous {
                    Unmatched::Ambiguous
                } else {
                    self.why_unmatched(&key)
                };
                self.count_unmatched(&key, &code, why);
            }
        }
    }

    /// Why an answer with `key` found no waiting request.
    fn why_unmatched(&self, key: &Key) -> Unmatched {
        if let Some(at) = self
            .quarantine
            .lock()
            .ok()
            .and_then(|q| q.get(key).copied())
        {
            return Unmatched::AfterTimeout {
                ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
        }
        if self.delivered.lock().is_ok_and(|d| d.contains(key)) {
            return Unmatched::Duplicate;
        }
        let other_mti = self.pending.lock().is_ok_and(|p| {
            p.keys().any(|k| {
                k.mti != key.mti
                    && k.stan == key.stan
                    && k.terminal == key.terminal
                    && (k.merchant == key.merchant || key.merchant == [b' '; 15])
            })
        });
        if other_mti {
            return Unmatched::WrongMti;
        }
        Unmatched::NoPending
    }

    /// Logs (once per answer) and counts an answer that matched nothing, with why.
    fn count_unmatched(&self, key: &Key, code: &str, why: Unmatched) {
        self.late.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut q) = self.quarantine.lock() {
            q.remove(key);
        }
        let upstream = self.config.name.to_string();
        metrics::counter!(UPSTREAM_LATE_ANSWERS_TOTAL, "upstream" => upstream.clone()).increment(1);
        metrics::counter!(UPSTREAM_UNMATCHED_ANSWERS_TOTAL, "upstream" => upstream, "reason" => why.label())
            .increment(1);
        let ms = match why {
            Unmatched::AfterTimeout { ms } => Some(ms),
            _ => None,
        };
        tracing::info!(
            upstream = %self.config.name,
            mti = key.mti,
            terminal = key.terminal_str(),
            stan = key.stan,
            code,
            reason = why.label(),
            ms_after_timeout = ms,
            "answer from host matched no waiting request; dropped"
        );
    }

    fn next_stan(&self) -> u32 {
        self.stan.fetch_add(1, Ordering::Relaxed) % 999_999 + 1
    }

    /// A sign-on (`001`) or echo (`301`) request of this link's dialect.
    fn network_message(&self, code: u16) -> Option<(Key, Bytes)> {
        let stan = self.next_stan();
        let mut fields: FieldList<'_, 8> = FieldList::new();
        let cup60 = format!("00000000{code:03}");
        fields.set(11, Value::Number(u64::from(stan))).ok()?;
        let dialect = self.config.dialect;
        match dialect.network_code {
            NetworkCode::De70 => {
                let now = self.config.clock.now_unix_s();
                fields.set(7, Value::Number(transmission_at(now))).ok()?;
                fields.set(70, Value::Number(u64::from(code))).ok()?;
            }
            NetworkCode::De60_3 => {
                fields.set(60, Value::Text(cup60.as_bytes())).ok()?;
            }
        }
        let mti = match code {
            301 => Mti(dialect.echo_mti),
            _ => Mti(800),
        };
        let mut out = BytesMut::with_capacity(64);
        iso8583::encode(self.spec, mti, fields.as_slice(), &mut out).ok()?;
        let key = Key {
            mti: mti.0,
            terminal: [b' '; 8],
            merchant: [b' '; 15],
            stan,
        };
        Some((key, out.freeze()))
    }

    fn frame(&self, body: Bytes) -> Frame {
        let cup = self.config.dialect.has_tpdu();
        Frame::Message {
            tpdu: cup.then_some(CUP_TPDU),
            header: cup.then_some(CUP_HEADER),
            body,
        }
    }

    fn set_up(&self, outbox: Option<mpsc::Sender<Bytes>>) {
        let up = outbox.is_some();
        if let Ok(mut o) = self.outbox.lock() {
            *o = outbox;
        }
        metrics::gauge!(UPSTREAM_UP, "upstream" => self.config.name.to_string()).set(if up {
            1.0
        } else {
            0.0
        });
    }
}

/// DE7 (MMDDhhmmss, UTC) of Unix second `now`.
fn transmission_at(now: crate::clock::UnixSeconds) -> u64 {
    let mmdd = u64::from(crate::date::Civil::from_unix(now).mmdd());
    let s = u64::try_from(now.rem_euclid(86_400)).unwrap_or(0);
    mmdd * 1_000_000 + s / 3600 * 10_000 + s % 3600 / 60 * 100 + s % 60
}

// === the supervisor ===

type Conn = Box<dyn HostIo>;

async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut failed_rounds = 0u32;
    loop {
        let mut served = false;
        for &addr in &shared.config.addrs {
            if *stop.borrow() {
                return;
            }
            match connect(&shared, addr).await {
                Ok(conn) => {
                    tracing::info!(upstream = %shared.config.name, %addr, "upstream link up");
                    metrics::counter!(UPSTREAM_CONNECTS_TOTAL, "upstream" => shared.config.name.to_string())
                        .increment(1);
                    shared.connects.fetch_add(1, Ordering::Relaxed);
                    served = true;
                    failed_rounds = 0;
                    let why = session(&shared, conn, &mut stop).await;
                    shared.set_up(None);
                    // Their answers cannot come any more: fail them now as timeouts (the host
                    // may have acted on them) instead of letting each wait out its budget.
                    // In key order (a map's own order is random), so the deterministic
                    // simulator's runs of one seed wake the callers alike.
                    let mut failed: Vec<_> = shared
                        .pending
                        .lock()
                        .map(|mut p| p.drain().collect())
                        .unwrap_or_default();
                    failed.sort_unstable_by_key(|(key, _)| *key);
                    drop(failed);
                    metrics::counter!(
                        UPSTREAM_DISCONNECTS_TOTAL,
                        "upstream" => shared.config.name.to_string(),
                        "reason" => reason_label(why)
                    )
                    .increment(1);
                    tracing::warn!(upstream = %shared.config.name, %addr, reason = why, "upstream link down");
                    break;
                }
                Err(e) => {
                    tracing::warn!(upstream = %shared.config.name, %addr, error = %e, "upstream connect failed; trying the next address");
                }
            }
        }
        if !served {
            failed_rounds = failed_rounds.saturating_add(1);
        }
        let delay = backoff(&shared.config, failed_rounds);
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The metric label of a [`session`] end.
fn reason_label(why: &'static str) -> &'static str {
    match why {
        "write timed out (host not reading)" => "write_timeout",
        "read timed out (host silent)" => "read_timeout",
        "echo unanswered" => "echo_unanswered",
        "write error" => "write_error",
        "read error" => "read_error",
        "closed by host" => "closed_by_host",
        _ => "stopped",
    }
}

/// Reconnect delay after `rounds` failed rounds: `reconnect_min · 2^(rounds−1)`, capped, with
/// ±25 % jitter so many switches do not reconnect in step.
fn backoff(config: &LinkConfig, rounds: u32) -> Duration {
    let base = config
        .reconnect_min
        .saturating_mul(1u32 << rounds.saturating_sub(1).min(16))
        .min(config.reconnect_max);
    base.mul_f64(crate::clock::jitter())
}

async fn connect(shared: &Shared, addr: SocketAddr) -> Result<Conn, String> {
    let budget = shared
        .config
        .timeout
        .min(Duration::from_millis(UPSTREAM_CONNECT_TIMEOUT_MAX_MS));
    let name = shared
        .config
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
    let connecting = async {
        if let Some(connector) = &shared.config.connector {
            return connector(addr).await.map_err(|e| e.to_string());
        }
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let tls: TlsStream<TcpStream> = TlsConnector::from(Arc::clone(&shared.config.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        Ok(Box::new(tls) as Conn)
    };
    let mut conn = tokio::time::timeout(budget, connecting)
        .await
        .map_err(|_| "connect timed out".to_string())??;
    sign_on(shared, &mut conn).await?;
    Ok(conn)
}

/// Sends the sign-on and waits for its `00` answer before the link carries requests.
async fn sign_on(shared: &Shared, conn: &mut Conn) -> Result<(), String> {
    let (_, body) = shared
        .network_message(1)
        .ok_or_else(|| "cannot encode sign-on".to_string())?;
    let cup = shared.config.dialect.has_tpdu();
    let mut framed = tokio_util::codec::Framed::new(
        conn,
        FrameCodec::new(shared.config.framing, cup, UPSTREAM_FRAME_BYTES_MAX),
    );
    let exchange = async {
        framed
            .send(shared.frame(body))
            .await
            .map_err(|e| e.to_string())?;
        match framed.next().await {
            Some(Ok(Frame::Message { body, .. })) => Ok(body),
            Some(Ok(_)) => Err("unexpected frame".to_string()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("closed during sign-on".to_string()),
        }
    };
    let answer = tokio::time::timeout(shared.config.timeout, exchange)
        .await
        .map_err(|_| "sign-on timed out".to_string())??;
    let msg = iso8583::decode(shared.spec, &answer).map_err(|e| e.to_string())?;
    match msg.response_code() {
        Some("00") => Ok(()),
        other => Err(format!("sign-on refused ({})", other.unwrap_or("no DE39"))),
    }
}

/// Serves one signed-on connection until it breaks, an echo goes unanswered, or stop.
async fn session(
    shared: &Arc<Shared>,
    conn: Conn,
    stop: &mut watch::Receiver<bool>,
) -> &'static str {
    let cup = shared.config.dialect.has_tpdu();
    let framing = shared.config.framing;
    let (r, w) = tokio::io::split(conn);
    let mut reader = FramedRead::new(r, FrameCodec::new(framing, cup, UPSTREAM_FRAME_BYTES_MAX));
    let mut writer = FramedWrite::new(w, FrameCodec::new(framing, cup, UPSTREAM_FRAME_BYTES_MAX));
    let (tx, mut rx) = mpsc::channel::<Bytes>(shared.config.max_pending.max(1) + 4);
    shared.set_up(Some(tx.clone()));
    let mut last_heard = Instant::now();
    let mut echo_deadline: Option<Instant> = None;
    // Since when something written is waiting for the host to say anything at all.
    let mut unanswered_since: Option<Instant> = None;
    let period = shared
        .config
        .echo_interval
        .min(shared.config.read_timeout / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        // Biased, in this order: an answer that arrived is read before the deadlines are
        // looked at, and the order of the branches is the same on every run (the
        // deterministic simulator replays a seed bit for bit; an unbiased select draws it).
        tokio::select! {
            biased;
            _ = stop.changed() => return "stopped",
            frame = reader.next() => match frame {
                Some(Ok(Frame::Message { body, .. })) => {
                    last_heard = Instant::now();
                    echo_deadline = None;
                    // Whatever else is pending now waits from this answer on.
                    unanswered_since = (shared.pending() > 0).then_some(last_heard);
                    shared.deliver(body);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => return "read error",
                None => return "closed by host",
            },
            Some(body) = rx.recv() => {
                // Write what is queued in one flush, within the write deadline.
                let batch = async {
                    writer.feed(shared.frame(body)).await?;
                    while let Ok(more) = rx.try_recv() {
                        writer.feed(shared.frame(more)).await?;
                    }
                    writer.flush().await
                };
                match tokio::time::timeout(shared.config.write_timeout, batch).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return "write error",
                    Err(_) => return "write timed out (host not reading)",
                }
                unanswered_since.get_or_insert_with(Instant::now);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if echo_deadline.is_some_and(|d| now >= d) {
                    return "echo unanswered";
                }
                let silent = unanswered_since.map(|t| now.duration_since(t));
                if silent.is_some_and(|s| s >= shared.config.read_timeout) {
                    return "read timed out (host silent)";
                }
                // Half-way through the read deadline, probe with an echo: a host that is
                // only slow on a request answers it and keeps the link.
                let probe = silent.is_some_and(|s| s >= shared.config.read_timeout / 2);
                if echo_deadline.is_none() && (probe || now.duration_since(last_heard) >= shared.config.echo_interval) {
                    if let Some((_, body)) = shared.network_message(301) {
                        if tx.try_send(body).is_ok() {
                            echo_deadline = Some(now + shared.config.timeout);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_back_to_their_request_mti() {
        for (answer, request) in [
            (210, 200),
            (200, 200),
            (201, 200),
            (230, 220),
            (410, 400),
            (401, 400),
            (810, 800),
            (830, 820),
        ] {
            assert_eq!(request_mti(Mti(answer)), request, "{answer}");
        }
    }

    fn shared() -> Shared {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        Shared {
            config: LinkConfig {
                name: Arc::from("bank"),
                addrs: Vec::new(),
                dialect: &crate::dialect::ASCII1987,
                mac: None,
                framing: Framing::Binary2,
                tls: Arc::new(tls),
                server_name: None,
                timeout: Duration::from_secs(1),
                write_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
                max_pending: 8,
                echo_interval: Duration::from_secs(30),
                reconnect_min: Duration::from_millis(10),
                clock: Arc::new(crate::clock::SystemClock),
                reconnect_max: Duration::from_millis(10),
                connector: None,
            },
            spec: &iso8583::ASCII1987,
            pending: Mutex::new(HashMap::new()),
            quarantine: Mutex::new(HashMap::new()),
            delivered: Mutex::new(std::collections::VecDeque::new()),
            outbox: Mutex::new(None),
            stan: AtomicU32::new(1),
            late: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }

    fn message(mti: u16, merchant: Option<&'static [u8]>) -> Bytes {
        let mut fields: FieldList<'_, 4> = FieldList::new();
        fields.set(11, Value::Number(7)).unwrap();
        if mti % 100 >= 10 {
            fields.set(39, Value::Text(b"00")).unwrap();
        }
        fields.set(41, Value::Text(b"TERM0001")).unwrap();
        if let Some(m) = merchant {
            fields.set(42, Value::Text(m)).unwrap();
        }
        let mut out = BytesMut::new();
        iso8583::encode(&iso8583::ASCII1987, Mti(mti), fields.as_slice(), &mut out).unwrap();
        out.freeze()
    }

    fn key_of(body: &[u8]) -> Key {
        Key::of(&iso8583::decode(&iso8583::ASCII1987, body).unwrap()).unwrap()
    }

    #[test]
    fn an_answer_without_de42_matches_only_an_unambiguous_request() {
        let link = shared();
        let a = key_of(&message(200, Some(b"MERCHANT 000001")));
        let b = key_of(&message(200, Some(b"MERCHANT 000002")));
        assert_ne!(a, b, "DE42 is part of the key");
        let (tx_a, mut rx_a) = oneshot::channel();
        link.pending.lock().unwrap().insert(a, tx_a);
        // One candidate: delivered.
        link.deliver(message(210, None));
        assert!(rx_a.try_recv().is_ok());
        // Two candidates: neither gets it; counted as late.
        let (tx_a, mut rx_a) = oneshot::channel();
        let (tx_b, mut rx_b) = oneshot::channel();
        link.pending.lock().unwrap().insert(a, tx_a);
        link.pending.lock().unwrap().insert(b, tx_b);
        link.deliver(message(210, None));
        assert!(rx_a.try_recv().is_err() && rx_b.try_recv().is_err());
        assert_eq!(link.late.load(Ordering::Relaxed), 1);
        // With DE42 it goes to its own request only.
        link.deliver(message(210, Some(b"MERCHANT 000002")));
        assert!(rx_b.try_recv().is_ok());
        assert!(rx_a.try_recv().is_err());
    }

    #[test]
    fn an_unmatched_answer_says_why() {
        let link = shared();
        let sale = key_of(&message(200, Some(b"MERCHANT 000001")));
        // Answered once: delivered; the same answer again is a duplicate.
        let (tx, _rx) = oneshot::channel();
        link.pending.lock().unwrap().insert(sale, tx);
        link.deliver(message(210, Some(b"MERCHANT 000001")));
        assert_eq!(link.why_unmatched(&sale), Unmatched::Duplicate);
        // Its request timed out 50 ms ago: after_timeout, with the delay.
        link.quarantine
            .lock()
            .unwrap()
            .insert(sale, Instant::now() - Duration::from_millis(50));
        match link.why_unmatched(&sale) {
            Unmatched::AfterTimeout { ms } => assert!((50..5_000).contains(&ms), "{ms}"),
            other => panic!("{other:?}"),
        }
        link.quarantine.lock().unwrap().clear();
        link.delivered.lock().unwrap().clear();
        // A 0400 waits with the same terminal and STAN: a 0210 is the wrong MTI pair.
        let reversal = key_of(&message(400, Some(b"MERCHANT 000001")));
        let (tx, mut rx) = oneshot::channel();
        link.pending.lock().unwrap().insert(reversal, tx);
        assert_eq!(link.why_unmatched(&sale), Unmatched::WrongMti);
        link.deliver(message(210, Some(b"MERCHANT 000001")));
        assert!(rx.try_recv().is_err(), "not given to the 0400");
        // Nothing with its key: no_pending.
        let other = key_of(&message(200, Some(b"MERCHANT 000009")));
        assert_eq!(link.why_unmatched(&other), Unmatched::NoPending);
    }

    #[test]
    fn transmission_time_is_mmddhhmmss() {
        // 2026-12-04T09:31:05Z.
        assert_eq!(
            transmission_at(1_796_342_400 + 9 * 3600 + 31 * 60 + 5),
            1_204_093_105
        );
        assert_eq!(transmission_at(0), 101_000_000);
    }
}
