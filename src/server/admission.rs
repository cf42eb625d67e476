//! Connection admission: who may hold a connection slot, and who may wait for one.
//!
//! A freshly accepted socket first joins the **handshake budget** (`limits.max_handshakes`,
//! at most `limits.max_handshakes_per_ip` from one source address). It holds no connection
//! slot while there: it is admitted to a slot only once its TLS handshake has completed (a
//! socket whose first bytes are not a TLS ClientHello is refused at once, see
//! [`client_hello_received`]), so sockets that connect and say nothing, dribble, or stall
//! after a canned ClientHello never take a slot from a terminal. When the budget is full the **oldest** handshaking
//! socket is evicted (closed) to make room: a flood of silent sockets churns itself, while a
//! real client, whose ClientHello follows its connect within milliseconds, gets through. The
//! same goes per source address: the oldest handshake of that address is evicted.
//!
//! Established connections count against `limits.max_connections` (all listeners) and
//! `limits.max_connections_per_ip`; over either, the socket is closed and counted.
//!
//! Loopback peers are exempt from the per-address limits while
//! `limits.per_ip_exempt_loopback` is true (the default): behind a local TLS proxy every
//! terminal would otherwise share 127.0.0.1.
//!
//! Every refusal or eviction is counted in `refundgate_connections_refused_total{cause}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::{limits, telemetry};

/// Why a socket was closed before or instead of being served; the `cause` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `limits.max_connections` established connections were open.
    MaxConnections,
    /// `limits.max_connections_per_ip` were open from the same address.
    IpConnections,
    /// Evicted: the handshake budget was full and this was the oldest handshake.
    HandshakeBudget,
    /// Evicted: its address had `limits.max_handshakes_per_ip` handshakes and this was the
    /// oldest.
    IpHandshakes,
    /// No complete ClientHello within `limits.handshake_timeout_ms`.
    HandshakeTimeout,
    /// The first bytes are not a TLS handshake record.
    NotTls,
}

impl Refusal {
    /// The metric label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::IpConnections => "ip_connections",
            Refusal::HandshakeBudget => "handshake_budget",
            Refusal::IpHandshakes => "ip_handshakes",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NotTls => "not_tls",
        }
    }
}

/// The admission state shared by every listener of one server.
pub(crate) struct Admission {
    inner: Mutex<Inner>,
    connections: Arc<Semaphore>,
    max_handshakes: usize,
    /// 0 = no limit.
    max_handshakes_per_ip: usize,
    /// 0 = no limit.
    max_connections_per_ip: usize,
    exempt_loopback: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Handshaking sockets by age (ids only grow).
    handshakes: BTreeMap<u64, Handshaking>,
    /// Per source address: its handshakes (by age) and established connections. An entry
    /// exists only while one of them does, so the map is bounded by the two budgets.
    per_ip: HashMap<IpAddr, PerIp>,
}

struct Handshaking {
    ip: IpAddr,
    evict: oneshot::Sender<Refusal>,
}

#[derive(Default)]
struct PerIp {
    handshakes: BTreeSet<u64>,
    connections: usize,
}

/// A socket in the handshake budget; dropping it leaves the budget.
pub(crate) struct HandshakeTicket {
    admission: Arc<Admission>,
    id: u64,
    ip: IpAddr,
    evicted: oneshot::Receiver<Refusal>,
}

/// An established connection's place in its address's count; dropping it frees the place.
/// (Its `max_connections` slot is the semaphore permit handed to the connection.)
pub(crate) struct IpConnection {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    pub(crate) fn new(limits: &LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            max_handshakes: limits.max_handshakes.max(1),
            max_handshakes_per_ip: limits.max_handshakes_per_ip,
            max_connections_per_ip: limits.max_connections_per_ip,
            exempt_loopback: limits.per_ip_exempt_loopback,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than refusing service; keep going with the inner value.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limited(&self, ip: IpAddr) -> bool {
        !(self.exempt_loopback && ip.is_loopback())
    }

    /// Puts a new socket from `ip` into the handshake budget, evicting the oldest handshake
    /// of the same address or overall when full. Refused only when `ip` already holds
    /// `max_connections_per_ip` established connections.
    pub(crate) fn begin_handshake(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<HandshakeTicket, Refusal> {
        let limited = self.limited(ip);
        let mut inner = self.lock();
        if limited && self.max_connections_per_ip > 0 {
            let open = inner.per_ip.get(&ip).map_or(0, |p| p.connections);
            if open >= self.max_connections_per_ip {
                return Err(Refusal::IpConnections);
            }
        }
        if limited && self.max_handshakes_per_ip > 0 {
            let oldest = inner
                .per_ip
                .get(&ip)
                .filter(|p| p.handshakes.len() >= self.max_handshakes_per_ip)
                .and_then(|p| p.handshakes.first().copied());
            if let Some(oldest) = oldest {
                inner.evict(oldest, Refusal::IpHandshakes);
            }
        }
        while inner.handshakes.len() >= self.max_handshakes {
            let Some(oldest) = inner.handshakes.keys().next().copied() else {
                break;
            };
            inner.evict(oldest, Refusal::HandshakeBudget);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        inner.handshakes.insert(id, Handshaking { ip, evict });
        inner.per_ip.entry(ip).or_default().handshakes.insert(id);
        drop(inner);
        telemetry::handshakes_in_progress(1.0);
        Ok(HandshakeTicket {
            admission: self.clone(),
            id,
            ip,
            evicted,
        })
    }

    /// How many sockets are in the handshake budget (for tests and logs).
    #[cfg(test)]
    pub(crate) fn handshaking(&self) -> usize {
        self.lock().handshakes.len()
    }
}

impl Inner {
    /// Removes handshake `id` and tells its task why.
    fn evict(&mut self, id: u64, cause: Refusal) {
        if let Some(h) = self.remove(id) {
            // The task may be gone already; then there is nobody to tell.
            let _ = h.evict.send(cause);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Handshaking> {
        let h = self.handshakes.remove(&id)?;
        if let Some(p) = self.per_ip.get_mut(&h.ip) {
            p.handshakes.remove(&id);
            if p.handshakes.is_empty() && p.connections == 0 {
                self.per_ip.remove(&h.ip);
            }
        }
        Some(h)
    }
}

impl HandshakeTicket {
    /// Completes when this socket is evicted from the budget, with the cause.
    pub(crate) async fn evicted(&mut self) -> Refusal {
        match (&mut self.evicted).await {
            Ok(cause) => cause,
            // The sender lives in the budget until eviction or our own drop: unreachable,
            // but never wake up for nothing.
            Err(_) => std::future::pending().await,
        }
    }

    /// Leaves the handshake budget for an established slot: a `max_connections` permit and
    /// a place in the address's count, or the cause of the refusal.
    pub(crate) fn admit(self) -> Result<(OwnedSemaphorePermit, IpConnection), Refusal> {
        let admission = self.admission.clone();
        let limited = admission.limited(self.ip);
        let mut inner = admission.lock();
        // Evicted meanwhile: the eviction wins (its task was told to close).
        inner.remove(self.id).ok_or(Refusal::HandshakeBudget)?;
        if limited && admission.max_connections_per_ip > 0 {
            let open = inner.per_ip.get(&self.ip).map_or(0, |p| p.connections);
            if open >= admission.max_connections_per_ip {
                return Err(Refusal::IpConnections);
            }
        }
        let permit = admission
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::MaxConnections)?;
        inner.per_ip.entry(self.ip).or_default().connections += 1;
        drop(inner);
        Ok((
            permit,
            IpConnection {
                admission: admission.clone(),
                ip: Some(self.ip),
            },
        ))
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.admission.lock().remove(self.id);
        telemetry::handshakes_in_progress(-1.0);
    }
}

impl Drop for IpConnection {
    fn drop(&mut self) {
        let Some(ip) = self.ip.take() else {
            return;
        };
        let mut inner = self.admission.lock();
        if let Some(p) = inner.per_ip.get_mut(&ip) {
            p.connections = p.connections.saturating_sub(1);
            if p.handshakes.is_empty() && p.connections == 0 {
                inner.per_ip.remove(&ip);
            }
        }
    }
}

/// Waits until a whole first TLS record (the ClientHello) sits in the socket's receive
/// buffer, without consuming it (the TLS acceptor reads it next). `Ok(false)`: the peer
/// closed first. `Err(NotTls)`: the first bytes are not a TLS handshake record.
///
/// `peek` does not clear read readiness, so while a record is incomplete the wait is a short
/// sleep between peeks (a real client sends its ClientHello in one segment; only dribbling
/// peers take this path, and the handshake budget bounds how many do).
pub(crate) async fn client_hello_received(stream: &TcpStream) -> Result<bool, Refusal> {
    const HEADER: usize = 5;
    let mut buf = vec![0u8; HEADER];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Ok(false),
            Ok(n) => n,
        };
        if buf.first() != Some(&limits::TLS_HANDSHAKE_RECORD_TYPE) {
            return Err(Refusal::NotTls);
        }
        if n >= HEADER {
            let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if len == 0 || len > limits::TLS_RECORD_PAYLOAD_MAX {
                return Err(Refusal::NotTls);
            }
            if buf.len() < HEADER + len {
                buf.resize(HEADER + len, 0);
                continue; // Peek again at once with room for the whole record.
            }
            if n >= HEADER + len {
                return Ok(true);
            }
        }
        tokio::time::sleep(Duration::from_millis(limits::CLIENT_HELLO_PEEK_INTERVAL_MS)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn limits(max_handshakes: usize, per_ip: usize, conns_per_ip: usize) -> LimitsConfig {
        LimitsConfig {
            max_connections: 3,
            max_handshakes,
            max_handshakes_per_ip: per_ip,
            max_connections_per_ip: conns_per_ip,
            per_ip_exempt_loopback: false,
            ..LimitsConfig::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[tokio::test]
    async fn a_full_budget_evicts_the_oldest_handshake() {
        let admission = Admission::new(&limits(2, 0, 0));
        let mut first = admission.begin_handshake(ip(1)).unwrap();
        let mut second = admission.begin_handshake(ip(2)).unwrap();
        let third = admission.begin_handshake(ip(3)).unwrap();
        assert_eq!(first.evicted().await, Refusal::HandshakeBudget);
        assert_eq!(admission.handshaking(), 2);
        assert!(futures::FutureExt::now_or_never(second.evicted()).is_none());
        // An evicted ticket can no longer be admitted; the others can.
        assert_eq!(first.admit().err(), Some(Refusal::HandshakeBudget));
        assert!(third.admit().is_ok());
        assert_eq!(admission.handshaking(), 1);
        drop(second);
        assert_eq!(admission.handshaking(), 0);
    }

    #[tokio::test]
    async fn one_address_evicts_only_its_own_oldest_handshake() {
        let admission = Admission::new(&limits(10, 2, 0));
        let mut other = admission.begin_handshake(ip(9)).unwrap();
        let mut a1 = admission.begin_handshake(ip(1)).unwrap();
        let _a2 = admission.begin_handshake(ip(1)).unwrap();
        let _a3 = admission.begin_handshake(ip(1)).unwrap();
        assert_eq!(a1.evicted().await, Refusal::IpHandshakes);
        assert!(futures::FutureExt::now_or_never(other.evicted()).is_none());
        assert_eq!(admission.handshaking(), 3);
    }

    #[tokio::test]
    async fn connections_per_address_and_overall_are_bounded_and_freed() {
        let admission = Admission::new(&limits(10, 0, 1));
        let (permit, place) = admission.begin_handshake(ip(1)).unwrap().admit().unwrap();
        // A second one from the same address: refused up front, and at admission.
        assert_eq!(
            admission.begin_handshake(ip(1)).err(),
            Some(Refusal::IpConnections)
        );
        let pending = admission.begin_handshake(ip(2)).unwrap();
        drop(permit);
        drop(place);
        let _again = admission.begin_handshake(ip(1)).unwrap().admit().unwrap();
        let _pending = pending.admit().unwrap();
        // max_connections = 3: the third address gets the last slot, a fourth none.
        let _held = admission.begin_handshake(ip(3)).unwrap().admit().unwrap();
        assert_eq!(
            admission.begin_handshake(ip(4)).unwrap().admit().err(),
            Some(Refusal::MaxConnections)
        );
    }

    #[tokio::test]
    async fn loopback_is_exempt_from_per_address_limits_when_configured() {
        let mut l = limits(10, 1, 1);
        l.per_ip_exempt_loopback = true;
        let admission = Admission::new(&l);
        let local = IpAddr::from([127, 0, 0, 1]);
        let mut first = admission.begin_handshake(local).unwrap();
        let _second = admission.begin_handshake(local).unwrap();
        assert!(futures::FutureExt::now_or_never(first.evicted()).is_none());
        let _c1 = first.admit().unwrap();
        let _c2 = admission.begin_handshake(local).unwrap().admit().unwrap();
    }
}
