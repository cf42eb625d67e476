//! Accept loop of one listener: admission (handshake budget, connection limits, see
//! `admission.rs`), backoff on accept errors, bounded drain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::admission::{self, Admission, Refusal};
use super::lanes::Lanes;
use super::shutdown::Shutdown;
use super::{connection, Dispatch, ListenerInfo};
use crate::config::LimitsConfig;
use crate::{limits, telemetry};

/// Process-wide connection numbers, for logs.
static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// One bound listening socket and what its connections need.
pub(crate) struct Listener {
    tcp: TcpListener,
    info: Arc<ListenerInfo>,
    acceptor: TlsAcceptor,
}

impl Listener {
    pub(crate) fn new(tcp: TcpListener, info: Arc<ListenerInfo>, acceptor: TlsAcceptor) -> Self {
        Self {
            tcp,
            info,
            acceptor,
        }
    }

    pub(crate) fn info(&self) -> &Arc<ListenerInfo> {
        &self.info
    }

    /// Accepts until shutdown, serving each connection on one of `lanes`, then closes the
    /// socket and waits for this listener's connections for at most the grace period
    /// (aborting the rest).
    pub(crate) async fn serve<D: Dispatch>(
        self,
        dispatch: Arc<D>,
        admission: Arc<Admission>,
        limits: Arc<LimitsConfig>,
        lanes: Arc<Lanes>,
        mut shutdown: Shutdown,
    ) {
        let mut tasks = JoinSet::new();
        let mut backoff_ms = 1u64;
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.recv() => break,
                accepted = self.tcp.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff_ms = 1;
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = %self.info.name, error = %e, backoff_ms, "accept failed");
                    tokio::select! {
                        () = shutdown.recv() => break,
                        () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                    }
                    backoff_ms = (backoff_ms * 2).min(limits::ACCEPT_BACKOFF_MAX_MS);
                    continue;
                }
            };
            // Reap finished connections so the set holds live ones only.
            while tasks.try_join_next().is_some() {}
            let ticket = match admission.begin_handshake(peer.ip()) {
                Ok(ticket) => ticket,
                Err(cause) => {
                    refused(&self.info.name, peer, cause);
                    drop(stream);
                    continue;
                }
            };
            let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
            let accepted = connection::Accepted {
                peer,
                id,
                info: self.info.clone(),
                acceptor: self.acceptor.clone(),
                limits: limits.clone(),
                shutdown: shutdown.clone(),
            };
            let Some(lane) = lanes.next() else {
                tasks.spawn(admit_and_serve(accepted, stream, ticket, dispatch.clone()));
                continue;
            };
            // The socket moves to the lane's own reactor: deregistered here, registered
            // again on the lane when its task starts.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(listener = %self.info.name, %peer, error = %e, "accepted socket lost");
                    continue;
                }
            };
            let dispatch = dispatch.clone();
            tasks.spawn_on(
                async move {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => admit_and_serve(accepted, stream, ticket, dispatch).await,
                        Err(e) => {
                            tracing::debug!(peer = %accepted.peer, error = %e, "accepted socket lost");
                        }
                    }
                },
                lane,
            );
        }
        drop(self.tcp);
        let grace =
            Duration::from_millis(limits.shutdown_grace_ms + limits::CLOSE_FLUSH_TIMEOUT_MS);
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                listener = %self.info.name,
                left = tasks.len(),
                "grace period over: closing remaining connections"
            );
            tasks.shutdown().await;
        }
    }
}

/// Completes the TLS handshake while in the handshake budget (bounded by the handshake
/// timeout, eviction and shutdown), and only then takes a connection slot and serves the
/// connection: a socket that stalls anywhere in its handshake never holds a slot.
async fn admit_and_serve<D: Dispatch>(
    mut accepted: connection::Accepted,
    stream: tokio::net::TcpStream,
    mut ticket: admission::HandshakeTicket,
    dispatch: Arc<D>,
) {
    let dialect = accepted.info.dialect.name();
    let timeout = Duration::from_millis(accepted.limits.handshake_timeout_ms);
    let mut shutdown = accepted.shutdown.clone();
    let handshake = async {
        // Not TLS at all: refuse before running the handshake.
        match admission::client_hello_received(&stream).await {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(cause) => return Err(cause),
        }
        Ok(connection::accept_tls(&accepted, stream).await)
    };
    let admitted = {
        // Outlives the select, so a socket whose handshake timed out is closed only after
        // the failure is counted: a peer that sees the close then reads the count.
        let mut timed = std::pin::pin!(tokio::time::timeout(timeout, handshake));
        let tls = tokio::select! {
            biased;
            () = shutdown.recv() => return,
            cause = ticket.evicted() => Err(cause),
            done = &mut timed => match done {
                Ok(Ok(Some(tls))) => Ok(tls),
                // Closed before saying hello, or a failed handshake (counted where it failed).
                Ok(Ok(None)) => return,
                Ok(Err(cause)) => Err(cause),
                Err(_) => Err(Refusal::HandshakeTimeout),
            },
        };
        let admitted = tls.and_then(|tls| ticket.admit().map(|a| (tls, a)));
        if let Err(cause) = &admitted {
            if matches!(cause, Refusal::HandshakeTimeout | Refusal::NotTls) {
                telemetry::count_handshake_failure(dialect);
            }
        }
        admitted
    };
    let (tls, (permit, _place)) = match admitted {
        Ok(admitted) => admitted,
        Err(cause) => {
            refused(&accepted.info.name, accepted.peer, cause);
            return;
        }
    };
    accepted.shutdown = shutdown;
    connection::serve(accepted, tls, dispatch, permit).await;
}

fn refused(listener: &str, peer: std::net::SocketAddr, cause: Refusal) {
    telemetry::count_refused(cause.as_str());
    tracing::debug!(listener, %peer, cause = cause.as_str(), "connection refused");
}
