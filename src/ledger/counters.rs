//! Refund counters per merchant-local day and month and per card per day.
//!
//! Committed values ([`Bucket`]) change only through `apply` of a journaled event, so replay
//! rebuilds them exactly; reservations in flight ([`Held`]) are kept apart and never journaled.

/// Committed refunds of one period (a local day or month number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Bucket {
    pub period: i32,
    pub amount: u64,
    pub count: u32,
}

/// Refunds reserved but not yet committed in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Held {
    pub period: i32,
    pub amount: u64,
    pub count: u32,
}

impl Bucket {
    /// Committed amount and count in `period` (zero for a later period than the bucket's).
    pub fn in_period(&self, period: i32) -> (u64, u32) {
        if self.period == period {
            (self.amount, self.count)
        } else {
            (0, 0)
        }
    }

    /// Adds a committed refund of `period`; an older period than the bucket's is history.
    pub fn add(&mut self, period: i32, amount: u64) {
        if period > self.period {
            *self = Bucket {
                period,
                amount: 0,
                count: 0,
            };
        }
        if period == self.period {
            self.amount = self.amount.saturating_add(amount);
            self.count = self.count.saturating_add(1);
        }
    }

    /// Gives back a refund of `period` (its reversal).
    pub fn give_back(&mut self, period: i32, amount: u64) {
        if period == self.period {
            self.amount = self.amount.saturating_sub(amount);
            self.count = self.count.saturating_sub(1);
        }
    }
}

impl Held {
    /// Reserved amount and count in `period`.
    pub fn in_period(&self, period: i32) -> (u64, u32) {
        if self.period == period {
            (self.amount, self.count)
        } else {
            (0, 0)
        }
    }

    /// Reserves one refund of `amount` in `period`. A period older than the held one (a
    /// caller's `now` that went backwards) is not held: dropping the newer holds would let
    /// concurrent requests of the current period past their limit.
    pub fn hold(&mut self, period: i32, amount: u64) {
        if period > self.period {
            *self = Held {
                period,
                amount: 0,
                count: 0,
            };
        }
        if period == self.period {
            self.amount = self.amount.saturating_add(amount);
            self.count = self.count.saturating_add(1);
        }
    }

    /// Releases a reservation made in `period` (no-op once the period rolled).
    pub fn release(&mut self, period: i32, amount: u64) {
        if period == self.period {
            self.amount = self.amount.saturating_sub(amount);
            self.count = self.count.saturating_sub(1);
        }
    }
}

/// Checks `used + asked <= max`; returns `(limit, used, remaining)` when it would go over.
pub(crate) fn over(max: Option<u64>, used: u64, asked: u64) -> Option<(u64, u64, u64)> {
    let max = max?;
    let total = used.saturating_add(asked);
    (total > max).then(|| (max, used, max.saturating_sub(used)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn buckets_roll_forward_and_ignore_history() {
        let mut b = Bucket::default();
        b.add(10, 5);
        b.add(10, 7);
        assert_eq!(b.in_period(10), (12, 2));
        b.add(9, 100);
        assert_eq!(b.in_period(10), (12, 2));
        b.add(11, 1);
        assert_eq!(b.in_period(10), (0, 0));
        assert_eq!(b.in_period(11), (1, 1));
        b.give_back(11, 1);
        assert_eq!(b.in_period(11), (0, 0));
    }

    #[test]
    fn holds_of_an_older_period_never_drop_the_current_ones() {
        let mut h = Held::default();
        h.hold(11, 5);
        h.hold(10, 7);
        assert_eq!(h.in_period(11), (5, 1));
        h.release(10, 7);
        assert_eq!(h.in_period(11), (5, 1));
        h.release(11, 5);
        assert_eq!(h.in_period(11), (0, 0));
    }

    #[test]
    fn over_reports_the_limit_used_and_remaining() {
        assert_eq!(over(None, 10, 10), None);
        assert_eq!(over(Some(20), 10, 10), None);
        assert_eq!(over(Some(20), 10, 11), Some((20, 10, 10)));
    }
}
