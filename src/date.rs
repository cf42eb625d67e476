//! Civil dates: the proleptic Gregorian calendar over days since 1970-01-01 (Howard
//! Hinnant's `civil_from_days` / `days_from_civil`). The one copy: merchant-local days and
//! months, DE7/DE13 dates, log timestamps and admin times all read it.

/// Seconds in a civil day.
pub const SECONDS_PER_DAY: i64 = 86_400;

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year (proleptic Gregorian; negative before year 0).
    pub year: i64,
    /// Month, 1–12.
    pub month: u32,
    /// Day of the month, 1–31.
    pub day: u32,
}

impl Civil {
    /// The date `days` days after 1970-01-01 (before it when negative).
    pub fn from_days(days: i64) -> Civil {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        // In range by construction: 1..=31 and 1..=12.
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
        }
    }

    /// The date of Unix second `unix_s` (UTC; pass `unix_s + offset` for a local date).
    pub fn from_unix(unix_s: i64) -> Civil {
        Civil::from_days(unix_s.div_euclid(SECONDS_PER_DAY))
    }

    /// Days since 1970-01-01 of this date (`month` and `day` taken as given: day 0 is the
    /// last day of the month before).
    pub fn to_days(self) -> i64 {
        let m = i64::from(self.month);
        let y = if m <= 2 { self.year - 1 } else { self.year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The running month number `year * 12 + month - 1`.
    pub fn month_number(self) -> i64 {
        self.year * 12 + i64::from(self.month) - 1
    }

    /// The first day of running month number `m` (`year * 12 + month - 1`).
    pub fn first_of_month(m: i64) -> Civil {
        Civil {
            year: m.div_euclid(12),
            month: (m.rem_euclid(12) + 1) as u32,
            day: 1,
        }
    }

    /// Month and day as the number MMDD (e.g. 1204), as DE13 carries it.
    pub fn mmdd(self) -> u16 {
        (self.month * 100 + self.day) as u16
    }

    /// Day of the year, 1–366.
    pub fn day_of_year(self) -> u32 {
        const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let y = self.year;
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        BEFORE[(self.month.clamp(1, 12) - 1) as usize]
            + self.day
            + u32::from(leap && self.month > 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        let d = |y, m, d| Civil {
            year: y,
            month: m,
            day: d,
        };
        assert_eq!(Civil::from_days(0), d(1970, 1, 1));
        assert_eq!(Civil::from_days(-1), d(1969, 12, 31));
        assert_eq!(Civil::from_days(11_016), d(2000, 2, 29));
        assert_eq!(Civil::from_unix(1_796_342_400), d(2026, 12, 4));
        assert_eq!(Civil::from_unix(1_796_342_399), d(2026, 12, 3));
        assert_eq!(d(2026, 12, 4).mmdd(), 1204);
        assert_eq!(d(2024, 12, 31).day_of_year(), 366);
        assert_eq!(d(2026, 3, 1).day_of_year(), 60);
        assert_eq!(Civil::first_of_month(2026 * 12 + 11), d(2026, 12, 1));
        assert_eq!(Civil::first_of_month(-1), d(-1, 12, 1));
    }

    #[test]
    fn days_round_trip_over_four_centuries_either_side_of_the_epoch() {
        let mut prev = Civil::from_days(-146_098);
        for days in -146_097..=146_097 {
            let c = Civil::from_days(days);
            assert_eq!(c.to_days(), days, "{c:?}");
            // Consecutive days: the next day, or the first of the next month.
            let next_day = c.day == prev.day + 1 && c.month == prev.month;
            let next_month = c.day == 1
                && (c.month == prev.month + 1 && c.year == prev.year
                    || c.month == 1 && prev.month == 12 && c.year == prev.year + 1);
            assert!(next_day || next_month, "{prev:?} -> {c:?}");
            prev = c;
        }
    }
}
