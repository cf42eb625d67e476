//! Connection threads ("lanes"): each runs a single-threaded tokio runtime of its own, and every
//! accepted connection is served, handshake included, on one of them (round-robin).
//!
//! On the shared work-stealing runtime each wake-up of a connection task could move it to the
//! other worker, and a task scheduled while a worker searched woke a parked one to steal it: at
//! 64 × 8 on two cores those wake-ups and the cache lines moving with the tasks cost about a
//! tenth of the gateway's CPU per answer. A lane keeps its connections, their socket
//! registrations and their timers on one thread. Accept loops, the admin site, upstream links
//! and the background loops stay on the process runtime; a lane's task that waits on them (or
//! on the journal writer) is woken across threads as before.
//!
//! When every lane has run out of work at once it calls the server's idle hook
//! ([`Dispatch::idle`](super::Dispatch::idle)): the gateway's journal then stops waiting to
//! gather more records under load, since none can come before the answers waiting for it go out.
//!
//! Dropping [`Lanes`] tells each thread to stop: its runtime ends the tasks still on it (the
//! listeners have drained or aborted them by then) and the thread exits. Nothing joins it, so
//! dropping is safe inside async code.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// How long a stopping lane waits for blocking work of its runtime (e.g. a snapshot write
/// started by a request) before its thread exits anyway.
const STOP_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection threads of one server.
pub(crate) struct Lanes {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stops: Vec<oneshot::Sender<()>>,
}

impl Lanes {
    /// Starts `threads` lanes; 0 = one per core ([`std::thread::available_parallelism`]).
    /// `on_idle` runs (on a lane) each time the last busy lane goes to sleep.
    pub(crate) fn start(
        threads: usize,
        on_idle: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<Lanes> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        let mut lanes = Lanes {
            handles: Vec::with_capacity(threads),
            next: AtomicUsize::new(0),
            stops: Vec::with_capacity(threads),
        };
        let on_idle = Arc::new(on_idle);
        // Lanes asleep: tokio calls the park hook right before a lane sleeps and the unpark
        // hook right after it wakes, in pairs.
        let asleep = Arc::new(AtomicUsize::new(0));
        for i in 0..threads {
            let (parks, unparks) = (Arc::clone(&asleep), Arc::clone(&asleep));
            let on_idle = Arc::clone(&on_idle);
            let runtime = Builder::new_current_thread()
                .enable_all()
                .on_thread_park(move || {
                    if parks.fetch_add(1, Ordering::SeqCst) + 1 == threads {
                        on_idle();
                    }
                })
                .on_thread_unpark(move || {
                    unparks.fetch_sub(1, Ordering::SeqCst);
                })
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name(format!("refundgate-conn-{i}"))
                .spawn(move || {
                    // Ends when the sender is dropped or used.
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_timeout(STOP_BLOCKING_WAIT);
                })?;
            // Pushed only once the thread runs: a failed spawn leaves no handle to a runtime
            // nobody drives (the lanes already started stop as `lanes` drops).
            lanes.handles.push(handle);
            lanes.stops.push(stop);
        }
        Ok(lanes)
    }

    /// No lanes: [`Lanes::next`] is `None` and connections stay on the caller's runtime.
    pub(crate) fn none() -> Lanes {
        Lanes {
            handles: Vec::new(),
            next: AtomicUsize::new(0),
            stops: Vec::new(),
        }
    }

    /// The lane for the next connection (round-robin); `None` only if there are no lanes.
    pub(crate) fn next(&self) -> Option<&Handle> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len().max(1);
        self.handles.get(n)
    }

    /// How many lanes there are.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashSet;

    #[tokio::test]
    async fn connections_are_spread_over_every_lane_off_the_callers_thread() {
        let lanes = Lanes::start(2, || ()).unwrap();
        assert_eq!(lanes.len(), 2);
        let here = std::thread::current().id();
        let mut seen = HashSet::new();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..6 {
            set.spawn_on(async { std::thread::current().id() }, lanes.next().unwrap());
        }
        while let Some(id) = set.join_next().await {
            let id = id.unwrap();
            assert_ne!(id, here, "a connection ran on the accepting thread");
            seen.insert(id);
        }
        assert_eq!(seen.len(), 2, "six connections should land on both lanes");
    }

    /// Says when it is dropped.
    struct Tell(std::sync::mpsc::Sender<()>);

    impl Drop for Tell {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    #[tokio::test]
    async fn dropping_the_lanes_ends_their_tasks() {
        let lanes = Lanes::start(1, || ()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let tell = Tell(tx);
        // A task that would never end on its own: the lane's shutdown drops it.
        lanes.next().unwrap().spawn(async move {
            let _tell = tell;
            std::future::pending::<()>().await;
        });
        drop(lanes);
        let ended = tokio::task::spawn_blocking(move || {
            rx.recv_timeout(std::time::Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert!(ended.is_ok(), "the lane's task was not dropped");
    }

    #[test]
    fn the_idle_hook_runs_only_once_every_lane_sleeps() {
        let idle = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&idle);
        let lanes = Lanes::start(2, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = crate::clock::monotonic() + std::time::Duration::from_secs(10);
            while !done() {
                assert!(crate::clock::monotonic() < deadline, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        // Both lanes start with nothing to do.
        wait_for("two new lanes never both slept", &|| {
            idle.load(Ordering::SeqCst) > 0
        });
        // The first lane busy (a task that blocks its thread until told to stop).
        let (busy, release) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        lanes.next().unwrap().spawn(async move {
            let _ = started.send(());
            let _ = release.recv();
        });
        running.recv().unwrap();
        let before = idle.load(Ordering::SeqCst);
        // The second lane wakes, works and sleeps again, many times: never all asleep.
        let other = lanes.next().unwrap().clone();
        for _ in 0..50 {
            let (done, finished) = std::sync::mpsc::channel::<()>();
            other.spawn(async move {
                let _ = done.send(());
            });
            finished.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert_eq!(
            idle.load(Ordering::SeqCst),
            before,
            "ran while one lane was busy"
        );
        // The busy lane done: both asleep, the hook runs.
        busy.send(()).unwrap();
        wait_for("the hook never ran once both slept", &|| {
            idle.load(Ordering::SeqCst) > before
        });
    }

    #[test]
    fn zero_threads_means_one_per_core() {
        let lanes = Lanes::start(0, || ()).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(lanes.len(), cores);
    }
}
