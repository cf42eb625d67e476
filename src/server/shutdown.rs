//! Shutdown signalling, in the shape of mini-redis' `shutdown.rs`, on a `watch` channel so
//! that a connection accepted just as shutdown starts still sees it.

use tokio::sync::watch;

/// Tells every task of the server to stop; sent once by [`super::Server::run`].
#[derive(Debug)]
pub(crate) struct Trigger(watch::Sender<bool>);

/// One task's view of the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A connected trigger and its first listener.
pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown { rx })
}

impl Trigger {
    /// Starts the shutdown of every task holding a [`Shutdown`].
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Whether shutdown has started.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until shutdown starts (returns at once when it has). Cancel-safe.
    pub async fn recv(&mut self) {
        // A dropped trigger also means "stop": nobody is left to keep the server running.
        while !*self.rx.borrow_and_update() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C): the `shutdown` future for
/// [`super::run`] in the binary. If the handlers cannot be installed it logs and waits for
/// Ctrl-C only.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops"),
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        // Without any signal handler, never resolve: the process is stopped by other means.
        tracing::warn!(error = %e, "cannot watch SIGINT");
        std::future::pending::<()>().await;
    }
    tracing::info!("SIGINT: shutting down");
}
