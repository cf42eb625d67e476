//! Injectable time source.
//!
//! Decisions depend on merchant-local days, months and refund windows, so nothing in the
//! sans-IO core reads the system clock: the caller passes `now` in, and the I/O layer gets it
//! from a [`Clock`] that tests replace with a [`ManualClock`].

use std::sync::atomic::{AtomicI64, Ordering};

/// Seconds since the Unix epoch, UTC.
pub type UnixSeconds = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time in seconds since the Unix epoch (UTC).
    fn now_unix_s(&self) -> UnixSeconds;
}

/// The monotonic clock, for durations, deadlines and rate limits (never for a decision: those
/// read a [`Clock`]). The one place it is read outside tokio's own timer, whose
/// `tokio::time::Instant` tests can pause.
pub fn monotonic() -> std::time::Instant {
    #[allow(clippy::disallowed_methods)]
    std::time::Instant::now()
}

thread_local! {
    /// The deterministic simulator's jitter sequence on its thread (`None`: the OS's
    /// randomness, as in every gateway a user runs).
    static SEEDED_JITTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Makes [`jitter`] and [`random_below`] on this thread a sequence drawn from `seed` (the
/// simulator, `refundgate sim --core`, so that a seed reproduces its reconnect and retry
/// timings bit for bit), or the OS's randomness again (`None`).
pub fn seed_jitter(seed: Option<u64>) {
    SEEDED_JITTER.with(|c| c.set(seed.map(|s| s.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)));
}

/// The next number of this thread's seeded sequence, if [`seed_jitter`] set one.
fn seeded_next() -> Option<u64> {
    SEEDED_JITTER.with(|c| {
        let mut x = c.get()?;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(Some(x));
        Some(x)
    })
}

/// A jitter factor in `0.75..1.25` (reconnect and retry backoffs, so many switches do not
/// retry in step).
pub fn jitter() -> f64 {
    match seeded_next() {
        Some(x) => 0.75 + (x >> 11) as f64 / (1u64 << 53) as f64 * 0.5,
        None => rand::random_range(0.75..1.25),
    }
}

/// A number in `0..n` (`n` at least 1): a link's first STAN.
pub fn random_below(n: u32) -> u32 {
    let n = n.max(1);
    match seeded_next() {
        Some(x) => u32::try_from(x % u64::from(n)).unwrap_or(0),
        None => rand::random_range(0..n),
    }
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_s(&self) -> UnixSeconds {
        #[allow(clippy::disallowed_methods)] // The one place that reads the wall clock.
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            // A clock set before 1970 is a broken host; report the epoch rather than panic.
            Err(_) => 0,
        }
    }
}

/// A clock that only moves when told to; for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_unix_s: AtomicI64,
}

impl ManualClock {
    /// A clock stopped at `now_unix_s`.
    pub fn new(now_unix_s: UnixSeconds) -> Self {
        Self {
            now_unix_s: AtomicI64::new(now_unix_s),
        }
    }

    /// Sets the time.
    pub fn set(&self, now_unix_s: UnixSeconds) {
        self.now_unix_s.store(now_unix_s, Ordering::SeqCst);
    }

    /// Moves the time forward (or back, with a negative step).
    pub fn advance(&self, step_s: i64) {
        self.now_unix_s.fetch_add(step_s, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_s(&self) -> UnixSeconds {
        self.now_unix_s.load(Ordering::SeqCst)
    }
}

/// MMDD of the UTC date at `unix_s` (civil-from-days, H. Hinnant); pass a local time
/// (`unix_s + offset`) for a local date.
pub fn mmdd_of(unix_s: UnixSeconds) -> u16 {
    crate::date::Civil::from_unix(unix_s).mmdd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_700_000_000);
        assert_eq!(clock.now_unix_s(), 1_700_000_000);
        clock.advance(86_400);
        assert_eq!(clock.now_unix_s(), 1_700_086_400);
        clock.set(5);
        assert_eq!(clock.now_unix_s(), 5);
    }
}
