//! Shutdown signalling, in the shape of mini-redis' `shutdown.rs`, on a `watch` channel so
//! that a connection accepted just as shutdown starts still sees it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
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

/// A future polled on every turn of a busy loop (a connection's `select!`) that only polls
/// `inner` when `inner` woke it, or the first time, or from another task.
///
/// A registered `watch::Receiver::changed()` locks the channel's waiter list on every poll to
/// check its waker, and that list is shared by every connection: at 256 connections with one
/// request each it was 2 % of the gateway's CPU, contended between the workers. Here a turn
/// costs a waker comparison and one atomic swap on a flag of this connection.
pub(crate) struct WokenOnly<F> {
    inner: Pin<Box<F>>,
    /// Set by the waker `inner` holds; cleared when `inner` is polled.
    woken: Arc<Flag>,
    /// The task waker `inner` was last polled for (`None`: never polled).
    polled_for: Option<Waker>,
}

/// The waker handed to the inner future: sets the flag, then wakes the task.
struct Flag {
    set: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WokenOnly<F> {
    pub(crate) fn new(inner: F) -> Self {
        WokenOnly {
            inner: Box::pin(inner),
            woken: Arc::new(Flag {
                set: AtomicBool::new(false),
                task: AtomicWaker::new(),
            }),
            polled_for: None,
        }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let same_task = this
            .polled_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !this.woken.set.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        if !same_task {
            this.woken.task.register(cx.waker());
            this.polled_for = Some(cx.waker().clone());
        }
        let waker = Waker::from(this.woken.clone());
        this.inner.as_mut().poll(&mut Context::from_waker(&waker))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that counts its polls, keeps the last waker, and is ready once `ready` is set.
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    #[tokio::test]
    async fn a_woken_only_future_polls_its_inner_future_only_when_that_woke_it() {
        // In a spawned task, as on a connection's lane: in a release build the waker of the
        // test's own `block_on` did not compare equal to its clone (`will_wake`), and every
        // turn polled the inner future.
        tokio::spawn(woken_only_polls_its_inner_future_only_when_that_woke_it())
            .await
            .unwrap();
    }

    async fn woken_only_polls_its_inner_future_only_when_that_woke_it() {
        let probe = Arc::new(Probe {
            polls: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            waker: std::sync::Mutex::new(None),
        });
        let p = probe.clone();
        let mut gated = WokenOnly::new(std::future::poll_fn(move |cx| {
            p.polls.fetch_add(1, Ordering::SeqCst);
            if p.ready.load(Ordering::SeqCst) {
                return Poll::Ready(7);
            }
            *p.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }));
        // A busy loop's turns: the inner future is polled once, not once per turn.
        for _ in 0..100 {
            assert!(futures::poll!(&mut gated).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);
        // The inner future wakes: the next turn polls it and sees it ready.
        probe.ready.store(true, Ordering::SeqCst);
        let waker = probe.waker.lock().unwrap().take().unwrap();
        waker.wake();
        assert_eq!(futures::poll!(&mut gated), Poll::Ready(7));
        assert_eq!(probe.polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn every_connection_loop_sees_the_shutdown_fired_while_it_waits() {
        let (trigger, shutdown) = channel();
        let mut waiting = Vec::new();
        for _ in 0..8 {
            let mut s = shutdown.clone();
            waiting.push(tokio::spawn(async move {
                let mut stopping = WokenOnly::new(s.recv());
                loop {
                    tokio::select! {
                        biased;
                        () = &mut stopping => break,
                        () = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        trigger.fire();
        for w in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("a loop missed the shutdown")
                .unwrap();
        }
    }
}
