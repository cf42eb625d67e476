//! What a run measured: per-connection counters merged into one [`Report`], printed as text or
//! JSON.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::scenario::Difference;

/// Mismatches described in full in a report; the rest are only counted.
pub const MISMATCH_EXAMPLES_MAX: usize = 5;
/// Largest latency the histogram records (longer ones are clamped): 10 minutes, in µs.
pub const LATENCY_US_MAX: u64 = 600_000_000;
/// Latencies a connection collects before adding them to its histogram in one go: recorded
/// one at a time, each answer touched a cold line of one of many histograms.
pub const LATENCY_BATCH: usize = 1024;

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The address driven.
    pub target: String,
    /// The scenario's name.
    pub scenario: String,
    /// `ascii1987` or `cup_pos`.
    pub dialect: String,
    /// TLS connections opened.
    pub connections: u32,
    /// Requests outstanding per connection at most.
    pub in_flight: u32,
    /// `closed` (send on answer) or `open` (fixed rate).
    pub mode: String,
    /// Target rate of an open-loop run, requests/s in total.
    pub rate_per_s: Option<f64>,
    /// Seconds from the first send to the last answer.
    pub elapsed_s: f64,
    /// Requests written.
    pub sent: u64,
    /// Answers received (verified or not).
    pub answered: u64,
    /// Answers that matched their step's expectation.
    pub verified: u64,
    /// `answered / elapsed_s`.
    pub throughput_per_s: f64,
    /// Latency of the answers, from the intended send time in open loop.
    pub latency_us: Latency,
    /// Open loop: how late the generator sent requests after their intended time (part of
    /// every latency above; near zero unless the generator or its machine fell behind).
    pub send_lag_us: Option<Latency>,
    /// Answers by DE39 (`--` when absent).
    pub codes: BTreeMap<String, u64>,
    /// Answers that did not match (MTI, DE11 echo, DE39, DE44, a field later steps need, or
    /// an answer that does not decode).
    pub mismatches: u64,
    /// The first few mismatches, described.
    pub mismatch_examples: Vec<Mismatch>,
    /// Sessions run to their last step.
    pub sessions_completed: u64,
    /// Sessions cut short by a mismatch, an error or the end of the run.
    pub sessions_aborted: u64,
    /// Failures that are not wrong answers.
    pub errors: Errors,
    /// The first failure, described (connect error, broken connection, scenario error).
    pub first_error: Option<String>,
    /// Open loop: requests due by the schedule but never sent (the target fell behind).
    pub backlog_unsent: u64,
    /// More requests than STANs (999 999): some STANs were reused within the run.
    pub stan_reused: bool,
    /// The run's first STAN.
    pub stan_first: u32,
    /// The STAN a following run should start at (`--stan-start`) to avoid reusing any.
    pub stan_next: u32,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// One answer that did not match.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// `session/step`.
    pub step: String,
    /// What differed first.
    pub what: String,
    /// What the step expected (MTI, codes, reason).
    pub expected: String,
    /// What came back.
    pub got: String,
}

/// Failures that are not wrong answers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Errors {
    /// TCP connects or TLS handshakes that failed.
    pub connect: u64,
    /// Connections that broke (I/O error, or closed by the peer while requests were out).
    pub io: u64,
    /// Requests with no answer within the per-request timeout.
    pub timeouts: u64,
    /// Requests outstanding when their connection broke.
    pub lost: u64,
    /// Requests the scenario could not render (a reference out of range, a bad value).
    pub scenario: u64,
}

impl Errors {
    /// Sum of every kind.
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.timeouts + self.lost + self.scenario
    }
}

impl Report {
    /// Every answer arrived and matched, and nothing failed.
    pub fn is_clean(&self) -> bool {
        self.mismatches == 0
            && self.errors.total() == 0
            && self.answered > 0
            && self.answered == self.sent
    }
}

/// Counters of one connection task (or of the whole run once merged).
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    pub histogram: Histogram<u64>,
    /// Latencies (µs, clamped) not yet in `histogram`.
    latencies: Vec<u32>,
    /// Open loop: send time minus intended send time, µs.
    pub send_lag: Histogram<u64>,
    pub sent: u64,
    pub answered: u64,
    pub verified: u64,
    pub codes: BTreeMap<[u8; 2], u64>,
    pub mismatches: u64,
    pub examples: Vec<Mismatch>,
    pub sessions_completed: u64,
    pub sessions_aborted: u64,
    pub errors: Errors,
    pub backlog_unsent: u64,
}

impl Tally {
    /// Empty counters.
    pub fn new() -> Result<Tally, hdrhistogram::CreationError> {
        // 3 significant figures from 1 µs to LATENCY_US_MAX: a fixed, small allocation.
        let histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)?;
        Ok(Tally {
            send_lag: histogram.clone(),
            histogram,
            latencies: Vec::with_capacity(LATENCY_BATCH),
            sent: 0,
            answered: 0,
            verified: 0,
            codes: BTreeMap::new(),
            mismatches: 0,
            examples: Vec::new(),
            sessions_completed: 0,
            sessions_aborted: 0,
            errors: Errors::default(),
            backlog_unsent: 0,
        })
    }

    /// Records one answer's latency.
    #[inline]
    pub fn latency(&mut self, us: u64) {
        // LATENCY_US_MAX fits in u32.
        self.latencies
            .push(us.clamp(1, LATENCY_US_MAX).min(u64::from(u32::MAX)) as u32);
        if self.latencies.len() >= LATENCY_BATCH {
            self.flush_latencies();
        }
    }

    /// Records how late one open-loop request was sent, µs.
    pub fn send_lag(&mut self, us: u64) {
        self.send_lag.saturating_record(us.min(LATENCY_US_MAX));
    }

    /// Adds the collected latencies to the histogram.
    pub fn flush_latencies(&mut self) {
        for &us in &self.latencies {
            self.histogram.saturating_record(u64::from(us));
        }
        self.latencies.clear();
    }

    /// Counts one DE39 value.
    pub fn code(&mut self, code: Option<&str>) {
        let key = match code.map(str::as_bytes) {
            Some(&[a, b]) => [a, b],
            _ => *b"--",
        };
        *self.codes.entry(key).or_insert(0) += 1;
    }

    /// Counts a mismatch and describes it when it is among the first few.
    pub fn mismatch(
        &mut self,
        step: impl FnOnce() -> String,
        what: &str,
        expected: String,
        got: String,
    ) {
        self.mismatches += 1;
        if self.examples.len() < MISMATCH_EXAMPLES_MAX {
            self.examples.push(Mismatch {
                step: step(),
                what: what.to_string(),
                expected,
                got,
            });
        }
    }

    /// Counts a mismatch described by a [`Difference`].
    pub fn difference(&mut self, step: impl FnOnce() -> String, d: &Difference) {
        let expected = format!(
            "MTI {} DE39 {}{}",
            d.expected_mti,
            d.expected_codes.join("|"),
            d.expected_reason
                .as_deref()
                .map(|r| format!(" DE44 {r}"))
                .unwrap_or_default()
        );
        let got = format!(
            "MTI {} DE39 {}{}",
            d.got_mti,
            d.got_code,
            d.got_reason
                .as_deref()
                .map(|r| format!(" DE44 {}", r.trim_end()))
                .unwrap_or_default()
        );
        self.mismatch(step, d.what, expected, got);
    }

    /// Adds another connection's counters.
    pub fn merge(&mut self, mut other: Tally) {
        self.flush_latencies();
        other.flush_latencies();
        // Both histograms share bounds, so adding cannot fail; a failure would only lose
        // latency samples, never counts.
        let _ = self.histogram.add(&other.histogram);
        let _ = self.send_lag.add(&other.send_lag);
        self.sent += other.sent;
        self.answered += other.answered;
        self.verified += other.verified;
        for (k, v) in other.codes {
            *self.codes.entry(k).or_insert(0) += v;
        }
        self.mismatches += other.mismatches;
        for e in other.examples {
            if self.examples.len() < MISMATCH_EXAMPLES_MAX {
                self.examples.push(e);
            }
        }
        self.sessions_completed += other.sessions_completed;
        self.sessions_aborted += other.sessions_aborted;
        let (a, b) = (&mut self.errors, other.errors);
        a.connect += b.connect;
        a.io += b.io;
        a.timeouts += b.timeouts;
        a.lost += b.lost;
        a.scenario += b.scenario;
        self.backlog_unsent += other.backlog_unsent;
    }

    /// The latency summary (of the latencies added to the histogram: see
    /// [`Tally::flush_latencies`]).
    pub fn latency_summary(&self) -> Latency {
        summary(&self.histogram)
    }

    /// The send-lag summary; `None` when no open-loop request was sent.
    pub fn send_lag_summary(&self) -> Option<Latency> {
        (!self.send_lag.is_empty()).then(|| summary(&self.send_lag))
    }

    /// Answers by code as text keys.
    pub fn codes_text(&self) -> BTreeMap<String, u64> {
        self.codes
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
            .collect()
    }
}

/// Percentiles of one histogram.
fn summary(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.rate_per_s {
            Some(r) => format!("open loop at {r:.0}/s (latency from intended send time)"),
            None => "closed loop".to_string(),
        };
        writeln!(
            f,
            "load: {} ({}) against {}: {} connections x {} in flight, {mode}",
            self.scenario, self.dialect, self.target, self.connections, self.in_flight
        )?;
        writeln!(
            f,
            "  {:.2} s: sent {}, answered {}, verified {}  ->  {:.0} answers/s",
            self.elapsed_s, self.sent, self.answered, self.verified, self.throughput_per_s
        )?;
        let l = &self.latency_us;
        writeln!(
            f,
            "  latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.0})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        if let Some(l) = &self.send_lag_us {
            writeln!(
                f,
                "  sent late by us: p50 {}  p99 {}  max {}  (the generator's own lag, part of the latency)",
                l.p50, l.p99, l.max
            )?;
        }
        let codes: Vec<String> = self
            .codes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(
            f,
            "  answers by DE39: {}",
            if codes.is_empty() {
                "none".into()
            } else {
                codes.join(", ")
            }
        )?;
        writeln!(
            f,
            "  sessions: {} completed, {} cut short",
            self.sessions_completed, self.sessions_aborted
        )?;
        writeln!(f, "  mismatches: {}", self.mismatches)?;
        for m in &self.mismatch_examples {
            writeln!(
                f,
                "    {}: {}: expected {}, got {}",
                m.step, m.what, m.expected, m.got
            )?;
        }
        let e = &self.errors;
        writeln!(
            f,
            "  errors: connect {}, io {}, timeouts {}, lost {}, scenario {}",
            e.connect, e.io, e.timeouts, e.lost, e.scenario
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "  first error: {e}")?;
        }
        if self.backlog_unsent > 0 {
            writeln!(
                f,
                "  behind schedule: {} requests due but never sent",
                self.backlog_unsent
            )?;
        }
        if self.stan_reused {
            writeln!(f, "  warning: more than 999999 requests, STANs were reused")?;
        }
        write!(
            f,
            "  verdict: {}",
            if self.is_clean() {
                "every answer verified"
            } else {
                "NOT CLEAN"
            }
        )
    }
}
