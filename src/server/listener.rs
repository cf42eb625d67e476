//! Accept loop of one listener: connection limit, backoff on accept errors, bounded drain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::shutdown::Shutdown;
use super::{connection, Dispatch, ListenerInfo};
use crate::config::Config;
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

    /// Accepts until shutdown, then closes the socket and waits for this listener's
    /// connections for at most the grace period (aborting the rest).
    pub(crate) async fn serve<D: Dispatch>(
        self,
        dispatch: Arc<D>,
        connections: Arc<Semaphore>,
        config: Arc<Config>,
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
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                // At the limit: accepted and closed at once, so the client sees an orderly
                // close rather than a connect timeout, and existing connections are untouched.
                telemetry::count_refused();
                tracing::debug!(listener = %self.info.name, %peer, "refused: max_connections open");
                drop(stream);
                continue;
            };
            let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(connection::serve(
                connection::Accepted {
                    stream,
                    peer,
                    id,
                    info: self.info.clone(),
                    acceptor: self.acceptor.clone(),
                    config: config.clone(),
                    shutdown: shutdown.clone(),
                },
                dispatch.clone(),
                permit,
            ));
        }
        drop(self.tcp);
        let grace =
            Duration::from_millis(config.limits.shutdown_grace_ms + limits::CLOSE_FLUSH_TIMEOUT_MS);
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
