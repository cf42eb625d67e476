//! Refund counters per merchant-local day and month and per card per day.
//!
//! Committed values ([`Bucket`]) change only through `apply` of a journaled event, so replay
//! rebuilds them exactly; reservations in flight ([`Held`]) are kept apart and never journaled.

/// Refund amount and count of one period (a local day or month number). The same tally
/// serves committed refunds ([`Bucket`]) and reservations in flight ([`Held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tally {
    pub period: i32,
    pub amount: u64,
    pub count: u32,
}

/// Committed refunds of one period; changed only by `apply` of a journaled event.
pub(crate) type Bucket = Tally;
/// Refunds reserved but not yet committed in one period; never journaled.
pub(crate) type Held = Tally;

impl Tally {
    /// Amount and count in `period` (zero for another period than the tally's).
    pub fn in_period(&self, period: i32) -> (u64, u32) {
        if self.period == period {
            (self.amount, self.count)
        } else {
            (0, 0)
        }
    }

    /// Adds one refund of `amount` in `period`. A later period starts the tally afresh; an
    /// older one (history, or a caller's `now` that went backwards) is not added: dropping the
    /// newer values would let concurrent requests of the current period past their limit.
    pub fn add(&mut self, period: i32, amount: u64) {
        if period > self.period {
            *self = Tally {
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

    /// Takes one refund of `period` out again (its reversal, or a released reservation);
    /// a no-op once the period rolled.
    pub fn remove(&mut self, period: i32, amount: u64) {
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
        b.remove(11, 1);
        assert_eq!(b.in_period(11), (0, 0));
    }

    #[test]
    fn holds_of_an_older_period_never_drop_the_current_ones() {
        let mut h = Held::default();
        h.add(11, 5);
        h.add(10, 7);
        assert_eq!(h.in_period(11), (5, 1));
        h.remove(10, 7);
        assert_eq!(h.in_period(11), (5, 1));
        h.remove(11, 5);
        assert_eq!(h.in_period(11), (0, 0));
    }

    #[test]
    fn over_reports_the_limit_used_and_remaining() {
        assert_eq!(over(None, 10, 10), None);
        assert_eq!(over(Some(20), 10, 10), None);
        assert_eq!(over(Some(20), 10, 11), Some((20, 10, 10)));
    }
}
