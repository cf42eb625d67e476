//! Fixed-window rate limits: at most `max` events per `interval` per key, over a bounded map.
//!
//! Two users: logging of repeated bad input (one line per source per interval, the next line
//! carrying how many were suppressed; DOMAIN §10, issue 18) and sign-ons per terminal on MAC
//! links. Sans-IO: every call takes `now` from the caller.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The verdict on one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Let it through; `suppressed` events of this key were refused since the last admitted
    /// one (a log line reports them).
    Yes {
        /// Events refused since the previous admitted one.
        suppressed: u64,
    },
    /// Over the limit for this window.
    No,
}

impl Admit {
    /// Whether the event may go through.
    pub fn allowed(self) -> bool {
        matches!(self, Admit::Yes { .. })
    }
}

/// One key's window: when it started, events admitted in it, events refused since the last
/// admitted one.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

/// A window-per-key limiter holding at most `keys_max` keys. When the map is full, windows
/// that have ended are dropped; if none has, the map is cleared (the limit then restarts for
/// every key, which errs toward letting events through rather than growing without bound).
#[derive(Debug)]
pub struct Limiter<K> {
    max: u32,
    interval: Duration,
    keys_max: usize,
    windows: Mutex<HashMap<K, Window>>,
}

impl Window {
    /// An empty window.
    pub const fn new() -> Window {
        Window {
            start: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Counts one event at `now` against `max` per `interval`.
    pub fn admit(&mut self, now: Instant, max: u32, interval: Duration) -> Admit {
        let expired = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= interval);
        if expired {
            self.start = Some(now);
            self.admitted = 0;
        }
        if self.admitted >= max {
            self.suppressed = self.suppressed.saturating_add(1);
            return Admit::No;
        }
        self.admitted += 1;
        let suppressed = std::mem::take(&mut self.suppressed);
        Admit::Yes { suppressed }
    }

    fn ended(&self, now: Instant, interval: Duration) -> bool {
        self.start
            .is_none_or(|s| now.saturating_duration_since(s) >= interval)
    }
}

impl Default for Window {
    fn default() -> Window {
        Window::new()
    }
}

impl<K: Hash + Eq> Limiter<K> {
    /// At most `max` events per `interval` for each of at most `keys_max` keys.
    pub fn new(max: u32, interval: Duration, keys_max: usize) -> Limiter<K> {
        Limiter {
            max,
            interval,
            keys_max: keys_max.max(1),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event of `key` at `now`.
    pub fn admit(&self, key: K, now: Instant) -> Admit {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= self.keys_max && !windows.contains_key(&key) {
            windows.retain(|_, w| !w.ended(now, self.interval));
            if windows.len() >= self.keys_max {
                windows.clear();
            }
        }
        windows
            .entry(key)
            .or_default()
            .admit(now, self.max, self.interval)
    }
}

/// Sources (peer addresses) whose bad input is logged: one line per source per
/// [`BAD_INPUT_LOG_INTERVAL`], the next one saying how many were left out.
pub fn bad_input_log(source: IpAddr, now: Instant) -> Admit {
    static LIMITER: OnceLock<Limiter<IpAddr>> = OnceLock::new();
    LIMITER
        .get_or_init(|| Limiter::new(1, BAD_INPUT_LOG_INTERVAL, BAD_INPUT_SOURCES_MAX))
        .admit(source, now)
}

/// Interval of the bad-input log limit.
pub const BAD_INPUT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Sources tracked by the bad-input log limit at once.
pub const BAD_INPUT_SOURCES_MAX: usize = 4096;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_passes_and_the_next_reports_the_suppressed_count() {
        let limiter = Limiter::new(1, Duration::from_secs(10), 8);
        let t0 = crate::clock::monotonic();
        assert_eq!(limiter.admit("a", t0), Admit::Yes { suppressed: 0 });
        for i in 1..=5 {
            assert_eq!(limiter.admit("a", t0 + Duration::from_secs(i)), Admit::No);
        }
        // Another source has its own window.
        assert_eq!(
            limiter.admit("b", t0 + Duration::from_secs(1)),
            Admit::Yes { suppressed: 0 }
        );
        assert_eq!(
            limiter.admit("a", t0 + Duration::from_secs(10)),
            Admit::Yes { suppressed: 5 }
        );
        assert_eq!(
            limiter.admit("a", t0 + Duration::from_secs(11)),
            Admit::No,
            "the new window started at the admitted event"
        );
    }

    #[test]
    fn max_events_pass_per_window() {
        let mut w = Window::new();
        let t0 = crate::clock::monotonic();
        let interval = Duration::from_secs(60);
        for _ in 0..3 {
            assert!(w.admit(t0, 3, interval).allowed());
        }
        assert_eq!(w.admit(t0, 3, interval), Admit::No);
        assert_eq!(
            w.admit(t0 + interval, 3, interval),
            Admit::Yes { suppressed: 1 }
        );
    }

    #[test]
    fn the_map_stays_bounded() {
        let limiter = Limiter::new(1, Duration::from_secs(10), 4);
        let t0 = crate::clock::monotonic();
        for k in 0..100u32 {
            assert!(limiter.admit(k, t0).allowed(), "a new key is let through");
        }
        assert!(limiter.windows.lock().unwrap().len() <= 4);
    }
}
