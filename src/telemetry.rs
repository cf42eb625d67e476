//! Logging and metrics.
//!
//! Metric names are the constants below; their labels come only from bounded sets (dialect,
//! MTI, response code, reason: DOMAIN §10) and are `&'static str`, so recording a metric does
//! not allocate on the request path. The Prometheus recorder is installed once per process
//! ([`install_metrics`]) and rendered by the admin server's `/metrics`.
//!
//! Log lines never block a decision: [`init_logging`] formats each event in the calling task
//! and hands the line to a writer thread over a bounded channel.
//!
//! - Lines below WARN (the per-request line at `info`, debug, trace) go through a **lossy**
//!   channel of [`LOG_LINES_BUFFERED_MAX`] lines: when the writer falls behind, new lines are
//!   dropped, never waited for, and counted in [`LOG_LINES_DROPPED_TOTAL`].
//! - WARN and ERROR lines (storage trouble, skipped journal events, failed snapshots: the
//!   audit-worthy ones, and rare) go through a second, **non-lossy** channel and writer thread:
//!   none is dropped; a caller waits only if a flood of them filled that channel.
//!
//! Both writer threads write whole lines, a batch at a time (every few milliseconds under
//! load, not per line), to stdout, so lines of the two never interleave within a line (their
//! relative order is not kept). Colours (ANSI) only
//! when stdout is a terminal and `NO_COLOR` is unset.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Level;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::config::LogFormat;

/// `refundgate_requests_total{dialect,mti,code,reason}`: requests answered or dropped, recorded
/// by the message layer through [`record_request`].
pub const REQUESTS_TOTAL: &str = "refundgate_requests_total";
/// `refundgate_decision_seconds{dialect}`: histogram of request → decision time.
pub const DECISION_SECONDS: &str = "refundgate_decision_seconds";
/// `refundgate_connections_open{dialect}`: gauge of established (post-accept) connections.
pub const CONNECTIONS_OPEN: &str = "refundgate_connections_open";
/// `refundgate_connections_refused_total{cause}`: sockets closed by admission control, by
/// cause: `max_connections`, `ip_connections`, `handshake_budget` (evicted as the oldest
/// handshake), `ip_handshakes` (evicted as its address's oldest), `handshake_timeout`,
/// `not_tls`.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "refundgate_connections_refused_total";
/// `refundgate_handshakes_in_progress`: gauge of sockets in the handshake budget.
pub const HANDSHAKES_IN_PROGRESS: &str = "refundgate_handshakes_in_progress";
/// `refundgate_tls_handshake_failures_total{dialect}`: handshakes that failed or timed out.
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "refundgate_tls_handshake_failures_total";
/// `refundgate_framing_errors_total{dialect}`: connections closed for a framing error.
pub const FRAMING_ERRORS_TOTAL: &str = "refundgate_framing_errors_total";
/// `refundgate_message_errors_total{dialect}`: well-framed messages that could not be used.
pub const MESSAGE_ERRORS_TOTAL: &str = "refundgate_message_errors_total";
/// `refundgate_idle_timeouts_total{dialect}`: connections closed for being idle.
pub const IDLE_TIMEOUTS_TOTAL: &str = "refundgate_idle_timeouts_total";
/// Counter: requests answered 96 because their record was not durable within the deadline.
pub const REQUEST_DEADLINE_TOTAL: &str = "refundgate_request_deadline_exceeded_total";
/// Events of the replicated journal by outcome (`journal.backend = "jetstream"`).
pub const REPLICA_EVENTS_TOTAL: &str = "refundgate_journal_replica_events_total";
/// Label of [`REPLICA_EVENTS_TOTAL`].
pub const LABEL_OUTCOME: &str = "outcome";
/// Ledger snapshots of the replicated journal by outcome: `written`, `failed` (not written),
/// `unreadable` (skipped at start).
pub const REPLICA_SNAPSHOTS_TOTAL: &str = "refundgate_journal_replica_snapshots_total";
/// Gauge: events read from the stream when this node started (after its snapshot, if it had
/// one).
pub const REPLICA_START_REPLAYED: &str = "refundgate_journal_replica_start_replayed_events";
/// Gauge: stream sequence of the ledger snapshot this node started from (0: none).
pub const REPLICA_START_SNAPSHOT_SEQ: &str = "refundgate_journal_replica_start_snapshot_seq";
/// `refundgate_log_lines_dropped_total`: log lines below WARN dropped because the log writer
/// fell behind (brought up to date whenever [`metrics_handle`] is asked for).
pub const LOG_LINES_DROPPED_TOTAL: &str = "refundgate_log_lines_dropped_total";

/// Lines below WARN waiting for the log writer at most; more are dropped and counted.
pub const LOG_LINES_BUFFERED_MAX: usize = 65_536;
/// WARN and ERROR lines waiting for their writer at most; a caller then waits (never drops).
pub const AUDIT_LINES_BUFFERED_MAX: usize = 16_384;
/// Bytes of whole lines a log writer thread gathers before one write to stdout.
pub const LOG_WRITE_BATCH_BYTES: usize = 64 * 1024;
/// How long a log writer thread lets lines gather before writing a small batch: lines reach
/// stdout at most about this much later.
pub const LOG_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// Buckets of [`DECISION_SECONDS`]: from a cached answer (sub-millisecond) through a group
/// commit (milliseconds) to an upstream round trip (seconds).
pub const DECISION_SECONDS_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Label name of the dialect (`ascii1987`, `cup_pos`).
pub const LABEL_DIALECT: &str = "dialect";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directives do not parse.
    #[error("log filter: {0}")]
    Filter(String),
    /// A global subscriber or recorder was already installed by someone else.
    #[error("already installed: {0}")]
    AlreadyInstalled(String),
}

static METRICS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
/// Dropped-line counter of the installed lossy log writer.
static LOG_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log writer threads alive; dropping it writes out the lines still buffered. Hold
/// it until the process is about to exit.
#[must_use = "dropping the guard stops the log writers"]
#[derive(Debug)]
pub struct LogGuard {
    _lossy: WorkerGuard,
    _audit: WorkerGuard,
}

/// Installs the global `tracing` subscriber: `format` lines, filtered by `RUST_LOG` when set,
/// else by `filter`, written off the request path (see the module documentation). Keep the
/// returned guard alive until exit.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<LogGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::try_new(env),
        _ => tracing_subscriber::EnvFilter::try_new(filter),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let (lossy, lossy_guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_LINES_BUFFERED_MAX)
        .thread_name("refundgate-log")
        .finish(LineBatches::stdout());
    let (audit, audit_guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(AUDIT_LINES_BUFFERED_MAX)
        .thread_name("refundgate-log-audit")
        .finish(LineBatches::stdout());
    let drops = lossy.error_counter();
    // WARN and ERROR to the writer that never drops, everything else to the lossy one.
    let writer = audit
        .with_max_level(Level::WARN)
        .and(lossy.with_min_level(Level::INFO));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(UtcMicros)
        .with_ansi(ansi_wanted(std::io::stdout().is_terminal()))
        .with_writer(writer);
    let installed = match format {
        LogFormat::Plain => builder.fmt_fields(PlainFields).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    let _ = LOG_DROPS.set(drops);
    Ok(LogGuard {
        _lossy: lossy_guard,
        _audit: audit_guard,
    })
}

/// The fmt layer's timestamp (RFC 3339, UTC, microseconds: `2026-12-04T16:18:56.227651Z`, as
/// `tracing_subscriber::fmt::time::SystemTime` writes it), with the date and time of the
/// current second formatted once per second per thread instead of once per line.
struct UtcMicros;

impl tracing_subscriber::fmt::time::FormatTime for UtcMicros {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
        }
        // Log timestamps only; decisions read time through clock::Clock.
        #[allow(clippy::disallowed_methods)]
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (cached, mut text) = SECOND.get();
        if cached != secs {
            text = rfc3339_second(secs);
            SECOND.set((secs, text));
        }
        let mut tail = *b".000000Z";
        let mut micros = since.subsec_micros();
        for b in tail[1..7].iter_mut().rev() {
            *b = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        // Both are ASCII digits and punctuation.
        w.write_str(std::str::from_utf8(&text).unwrap_or("????-??-??T??:??:??"))?;
        w.write_str(std::str::from_utf8(&tail).unwrap_or(".??????Z"))
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second (UTC).
fn rfc3339_second(unix_s: u64) -> [u8; 19] {
    let rem = unix_s % 86_400;
    let date = crate::date::Civil::from_unix(i64::try_from(unix_s).unwrap_or(i64::MAX));
    let (year, month, day) = (date.year, date.month, date.day);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for b in out[at..at + width].iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, u64::from(month));
    put(8, 2, u64::from(day));
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    out
}

/// The plain format's fields, byte for byte as `tracing_subscriber`'s `DefaultFields` writes
/// them, with a short cut for the per-request line's fields: without colours, a string of
/// printable ASCII with no `"` or `\\` is written as `name="value"` and an integer or bool
/// as `name=value` directly, instead of through `Debug` and its escaping (which would give
/// the same text). Everything else (the message, strings that need escaping, errors, other
/// types, coloured output) goes to `DefaultVisitor`.
struct PlainFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut v = PlainVisitor {
            plain: !writer.has_ansi_escapes(),
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct PlainVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    /// No colours: the short cuts apply.
    plain: bool,
    is_empty: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    /// Whether `name` is written as is by `DefaultVisitor` (not the message, not a raw
    /// identifier, not `log.` metadata, which it skips).
    fn plain_name(&self, name: &str) -> bool {
        self.plain && name != "message" && !name.starts_with("r#") && !name.starts_with("log.")
    }

    /// Writes ` name=` (no space before the first field).
    fn start(&mut self, name: &str) -> std::fmt::Result {
        if self.is_empty {
            self.is_empty = false;
        } else {
            std::fmt::Write::write_char(&mut self.writer, ' ')?;
        }
        std::fmt::Write::write_str(&mut self.writer, name)?;
        std::fmt::Write::write_char(&mut self.writer, '=')
    }

    fn direct(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        self.result = self
            .start(name)
            .and_then(|()| std::fmt::Write::write_fmt(&mut self.writer, value));
    }

    fn default_visitor(
        &mut self,
        name: &str,
        record: impl FnOnce(&mut tracing_subscriber::fmt::format::DefaultVisitor<'_>),
    ) {
        use tracing_subscriber::field::VisitOutput;
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let mut v = tracing_subscriber::fmt::format::DefaultVisitor::new(
            self.writer.by_ref(),
            self.is_empty,
        );
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        let printable = value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if printable && self.plain_name(name) {
            self.direct(name, format_args!("\"{value}\""));
        } else {
            self.default_visitor(name, |v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if self.result.is_ok() && self.plain_name(field.name()) {
            self.direct(field.name(), format_args!("{value}"));
        } else {
            self.default_visitor(field.name(), |v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if self.result.is_ok() && self.plain_name(field.name()) {
            self.direct(field.name(), format_args!("{value}"));
        } else {
            self.default_visitor(field.name(), |v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        if self.result.is_ok() && self.plain_name(field.name()) {
            self.direct(field.name(), format_args!("{value}"));
        } else {
            self.default_visitor(field.name(), |v| v.record_bool(field, value));
        }
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.default_visitor(field.name(), |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.default_visitor(field.name(), |v| v.record_debug(field, value));
    }
}

/// Colour codes only for a terminal, and not when `NO_COLOR` is set (<https://no-color.org>).
fn ansi_wanted(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets [`LOG_LINES_DROPPED_TOTAL`] from a lossy writer's counter.
fn publish_dropped_lines(counter: &ErrorCounter) {
    metrics::counter!(LOG_LINES_DROPPED_TOTAL).absolute(counter.dropped_lines() as u64);
}

/// The sink of a log writer thread: whole lines gathered, then written to stdout in one call
/// (under stdout's lock), when the batch is full or the thread has drained its channel.
struct LineBatches<W: Write> {
    out: W,
    batch: Vec<u8>,
}

impl LineBatches<std::io::Stdout> {
    fn stdout() -> Self {
        LineBatches::new(std::io::stdout())
    }
}

impl<W: Write> LineBatches<W> {
    fn new(out: W) -> Self {
        LineBatches {
            out,
            batch: Vec::with_capacity(LOG_WRITE_BATCH_BYTES),
        }
    }

    fn write_batch(&mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            let result = self.out.write_all(&self.batch);
            // A failed write loses this batch rather than retrying it forever.
            self.batch.clear();
            result?;
        }
        Ok(())
    }
}

impl<W: Write> Write for LineBatches<W> {
    /// The writer thread hands over one whole line per call.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if self.batch.len() + line.len() > LOG_WRITE_BATCH_BYTES {
            self.write_batch()?;
        }
        if line.len() > LOG_WRITE_BATCH_BYTES {
            self.out.write_all(line)?;
        } else {
            self.batch.extend_from_slice(line);
        }
        Ok(line.len())
    }

    /// Called by the writer thread each time it has drained its channel. Waiting a moment
    /// first lets the next lines gather in the channel: under load the thread writes once
    /// per [`LOG_FLUSH_DELAY`] instead of being woken (and calling write) per line.
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() && self.batch.len() < LOG_WRITE_BATCH_BYTES / 2 {
            std::thread::sleep(LOG_FLUSH_DELAY);
        }
        self.write_batch()?;
        self.out.flush()
    }
}

/// Installs the Prometheus recorder on the first call and returns its handle; later calls
/// return the same handle (tests start several servers in one process).
pub fn install_metrics() -> Result<PrometheusHandle, TelemetryError> {
    METRICS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(DECISION_SECONDS.to_string()),
                    DECISION_SECONDS_BUCKETS,
                )
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| e.to_string())?;
            describe_metrics();
            Ok(handle)
        })
        .clone()
        .map_err(TelemetryError::AlreadyInstalled)
}

/// The installed handle, if [`install_metrics`] succeeded, with
/// [`LOG_LINES_DROPPED_TOTAL`] brought up to date (the admin server asks for it before each
/// `/metrics` render and every upkeep interval).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    let handle = METRICS.get().and_then(|r| r.as_ref().ok()).cloned()?;
    if let Some(drops) = LOG_DROPS.get() {
        publish_dropped_lines(drops);
    }
    Some(handle)
}

/// Counts one request with its outcome; all labels from bounded sets.
pub fn record_request(
    dialect: &'static str,
    mti: &'static str,
    code: &'static str,
    reason: &'static str,
) {
    metrics::counter!(
        REQUESTS_TOTAL,
        LABEL_DIALECT => dialect,
        "mti" => mti,
        "code" => code,
        "reason" => reason
    )
    .increment(1);
}

/// Records how long one decision took.
pub fn record_decision_seconds(dialect: &'static str, seconds: f64) {
    metrics::histogram!(DECISION_SECONDS, LABEL_DIALECT => dialect).record(seconds);
}

/// Counts one request answered 96 because its record was not durable within the deadline.
pub fn count_request_deadline(dialect: &'static str) {
    metrics::counter!(REQUEST_DEADLINE_TOTAL, LABEL_DIALECT => dialect).increment(1);
}

/// Counts one event of the replicated journal: `appended` by this node, `conflict` (another
/// node appended first; decided again), `remote` (another node's, applied here) or
/// `unavailable` (append without an acknowledgement: answered 96) or `skipped` (an event of a
/// merchant this node's merchant file does not have).
pub fn count_replica(outcome: &'static str) {
    metrics::counter!(REPLICA_EVENTS_TOTAL, LABEL_OUTCOME => outcome).increment(1);
}

/// Counts one ledger snapshot of the replicated journal: `written`, `failed` or
/// `unreadable` (skipped at start).
pub fn count_replica_snapshot(outcome: &'static str) {
    metrics::counter!(REPLICA_SNAPSHOTS_TOTAL, LABEL_OUTCOME => outcome).increment(1);
}

/// Records how this node's ledger was rebuilt at start: `replayed` events read from the stream
/// after the snapshot at stream sequence `snapshot_seq` (0: none).
pub fn count_replica_start(replayed: u64, snapshot_seq: u64) {
    metrics::gauge!(REPLICA_START_REPLAYED).set(replayed as f64);
    metrics::gauge!(REPLICA_START_SNAPSHOT_SEQ).set(snapshot_seq as f64);
}

/// Counts one well-framed message that could not be used (DOMAIN §2).
pub fn count_message_error(dialect: &'static str) {
    metrics::counter!(MESSAGE_ERRORS_TOTAL, LABEL_DIALECT => dialect).increment(1);
}

pub(crate) fn count_framing_error(dialect: &'static str) {
    metrics::counter!(FRAMING_ERRORS_TOTAL, LABEL_DIALECT => dialect).increment(1);
}

pub(crate) fn count_handshake_failure(dialect: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, LABEL_DIALECT => dialect).increment(1);
}

pub(crate) fn count_idle_timeout(dialect: &'static str) {
    metrics::counter!(IDLE_TIMEOUTS_TOTAL, LABEL_DIALECT => dialect).increment(1);
}

pub(crate) fn count_refused(cause: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED_TOTAL, "cause" => cause).increment(1);
}

pub(crate) fn handshakes_in_progress(delta: f64) {
    metrics::gauge!(HANDSHAKES_IN_PROGRESS).increment(delta);
}

/// Keeps `refundgate_connections_open` right: up on creation, down on drop.
pub(crate) struct OpenConnection {
    dialect: &'static str,
}

impl OpenConnection {
    pub(crate) fn new(dialect: &'static str) -> Self {
        metrics::gauge!(CONNECTIONS_OPEN, LABEL_DIALECT => dialect).increment(1.0);
        Self { dialect }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN, LABEL_DIALECT => self.dialect).decrement(1.0);
    }
}

/// Exports every metric at 0 for the label values known at start (issue 22): the configured
/// dialects and upstreams and the closed label sets (refusal causes, reload outcomes), so an
/// idle gateway's `/metrics` lists them and dashboards and alerts see 0 rather than no data.
/// Adds 0 to what exists, so it never resets a value.
pub fn export_zeros(dialects: &[&'static str], upstreams: &[String]) {
    use crate::flow::{
        MERCHANT_RELOADS_TOTAL, SIGN_ONS_REFUSED_TOTAL, TERMINAL_NOT_PERMITTED_TOTAL,
    };
    use crate::upstream::link::{
        UPSTREAM_CONNECTS_TOTAL, UPSTREAM_DISCONNECTS_TOTAL, UPSTREAM_LATE_ANSWERS_TOTAL,
        UPSTREAM_UNMATCHED_ANSWERS_TOTAL, UPSTREAM_UP,
    };
    use crate::upstream::store_forward::{SAF_DEAD_LETTERS, SAF_DELIVERED_TOTAL, SAF_PENDING};
    use crate::upstream::{SAF_ENQUEUE_FAILURES_TOTAL, UPSTREAM_REQUESTS_TOTAL};
    use metrics::{describe_counter, describe_gauge};
    // Help text for the metrics defined outside this module (promtool check metrics wants it).
    describe_counter!(
        REQUEST_DEADLINE_TOTAL,
        "Requests answered 96 because their journal record was not durable within the deadline."
    );
    describe_counter!(
        SIGN_ONS_REFUSED_TOTAL,
        "Sign-ons refused by the per-terminal rate limit."
    );
    describe_counter!(
        TERMINAL_NOT_PERMITTED_TOTAL,
        "Requests whose client certificate may not use their DE41/DE42."
    );
    describe_counter!(
        MERCHANT_RELOADS_TOTAL,
        "Merchant file reloads (SIGHUP or admin API), by outcome."
    );
    describe_gauge!(
        SAF_PENDING,
        "Store-and-forward entries waiting for the host."
    );
    describe_gauge!(
        SAF_DEAD_LETTERS,
        "Store-and-forward entries given up on (reconcile by hand)."
    );
    describe_counter!(
        SAF_DELIVERED_TOTAL,
        "Store-and-forward entries the host accepted."
    );
    describe_counter!(
        SAF_ENQUEUE_FAILURES_TOTAL,
        "Reversals or advices that could not be queued."
    );
    describe_gauge!(UPSTREAM_UP, "1 while the upstream link is up.");
    describe_counter!(UPSTREAM_CONNECTS_TOTAL, "Upstream link connections made.");
    describe_counter!(
        UPSTREAM_DISCONNECTS_TOTAL,
        "Upstream link connections lost."
    );
    describe_counter!(
        UPSTREAM_LATE_ANSWERS_TOTAL,
        "Upstream answers that matched no waiting request (late, duplicate, stray)."
    );
    describe_counter!(
        UPSTREAM_UNMATCHED_ANSWERS_TOTAL,
        "Upstream answers that matched no waiting request, by reason: after_timeout, duplicate, wrong_mti, ambiguous, no_pending."
    );
    describe_counter!(
        UPSTREAM_REQUESTS_TOTAL,
        "Requests forwarded upstream, by outcome."
    );
    for &d in dialects {
        // One approval series per dialect: sums over codes and reasons read 0, not nothing.
        metrics::counter!(REQUESTS_TOTAL, LABEL_DIALECT => d, "mti" => "0210", "code" => "00", "reason" => "APPROVED")
            .increment(0);
        let _registered = metrics::histogram!(DECISION_SECONDS, LABEL_DIALECT => d);
        metrics::gauge!(CONNECTIONS_OPEN, LABEL_DIALECT => d).increment(0.0);
        for name in [
            TLS_HANDSHAKE_FAILURES_TOTAL,
            FRAMING_ERRORS_TOTAL,
            MESSAGE_ERRORS_TOTAL,
            IDLE_TIMEOUTS_TOTAL,
            REQUEST_DEADLINE_TOTAL,
            SIGN_ONS_REFUSED_TOTAL,
            TERMINAL_NOT_PERMITTED_TOTAL,
        ] {
            metrics::counter!(name, LABEL_DIALECT => d).increment(0);
        }
    }
    for cause in [
        "max_connections",
        "ip_connections",
        "handshake_budget",
        "ip_handshakes",
        "handshake_timeout",
        "not_tls",
    ] {
        metrics::counter!(CONNECTIONS_REFUSED_TOTAL, "cause" => cause).increment(0);
    }
    metrics::gauge!(HANDSHAKES_IN_PROGRESS).increment(0.0);
    for outcome in ["applied", "refused"] {
        metrics::counter!(MERCHANT_RELOADS_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(SAF_PENDING).increment(0.0);
    metrics::gauge!(SAF_DEAD_LETTERS).increment(0.0);
    metrics::counter!(SAF_DELIVERED_TOTAL).increment(0);
    metrics::counter!(SAF_ENQUEUE_FAILURES_TOTAL).increment(0);
    for u in upstreams {
        metrics::gauge!(UPSTREAM_UP, "upstream" => u.clone()).increment(0.0);
        for name in [
            UPSTREAM_CONNECTS_TOTAL,
            UPSTREAM_DISCONNECTS_TOTAL,
            UPSTREAM_LATE_ANSWERS_TOTAL,
        ] {
            metrics::counter!(name, "upstream" => u.clone()).increment(0);
        }
        for reason in [
            "after_timeout",
            "duplicate",
            "wrong_mti",
            "ambiguous",
            "no_pending",
        ] {
            metrics::counter!(UPSTREAM_UNMATCHED_ANSWERS_TOTAL, "upstream" => u.clone(), "reason" => reason)
                .increment(0);
        }
        for outcome in ["approved", "declined", "timeout", "unreachable"] {
            metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "upstream" => u.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests by dialect, MTI, response code and reason."
    );
    describe_histogram!(
        DECISION_SECONDS,
        Unit::Seconds,
        "Time from a decoded request to its decision."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Connections currently open.");
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Sockets closed by admission control, by cause."
    );
    describe_gauge!(
        HANDSHAKES_IN_PROGRESS,
        "Sockets waiting in the handshake budget (no connection slot yet)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes that failed or timed out."
    );
    describe_counter!(
        FRAMING_ERRORS_TOTAL,
        "Connections closed for a framing error."
    );
    describe_counter!(
        MESSAGE_ERRORS_TOTAL,
        "Well-framed messages that could not be used."
    );
    describe_counter!(IDLE_TIMEOUTS_TOTAL, "Connections closed for being idle.");
    describe_counter!(
        REPLICA_EVENTS_TOTAL,
        "Events of the replicated journal: appended, conflict (decided again), remote, unavailable, skipped."
    );
    describe_counter!(
        REPLICA_SNAPSHOTS_TOTAL,
        "Ledger snapshots of the replicated journal: written, failed, unreadable (skipped at start)."
    );
    describe_gauge!(
        REPLICA_START_REPLAYED,
        "Events read from the replicated journal at start, after the snapshot."
    );
    describe_gauge!(
        REPLICA_START_SNAPSHOT_SEQ,
        "Stream sequence of the ledger snapshot this node started from (0: none)."
    );
    describe_counter!(
        LOG_LINES_DROPPED_TOTAL,
        "Log lines below WARN dropped because the log writer fell behind."
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn metrics_install_once_and_render_static_labels() {
        let handle = install_metrics().unwrap();
        let again = install_metrics().unwrap();
        record_request("cup_pos", "0220", "61", "MERCHANT_DAY_AMOUNT");
        record_decision_seconds("cup_pos", 0.002);
        let text = again.render();
        assert!(
            text.contains(
                "refundgate_requests_total{dialect=\"cup_pos\",mti=\"0220\",code=\"61\",reason=\"MERCHANT_DAY_AMOUNT\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "refundgate_decision_seconds_bucket{dialect=\"cup_pos\",le=\"0.0025\"} 1"
            ),
            "{text}"
        );
        drop(handle);
    }

    #[test]
    fn logging_installs_once() {
        let first = init_logging(LogFormat::Json, "info");
        let second = init_logging(LogFormat::Plain, "info");
        assert!(first.is_ok() || matches!(first, Err(TelemetryError::Filter(_))));
        drop(first);
        assert!(matches!(
            second,
            Err(TelemetryError::AlreadyInstalled(_)) | Err(TelemetryError::Filter(_))
        ));
    }

    /// A sink that blocks until told to go on, then keeps every line.
    struct Stuck {
        go: std::sync::mpsc::Receiver<()>,
        lines: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        waited: bool,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.waited {
                let _ = self.go.recv();
                self.waited = true;
            }
            self.lines.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_dropped_by_a_stuck_lossy_writer_are_counted_in_the_metric() {
        let handle = install_metrics().unwrap();
        let (go_tx, go) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Stuck {
            go,
            lines: lines.clone(),
            waited: false,
        };
        let (mut writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(4)
            .finish(sink);
        let counter = writer.error_counter();
        // The writer thread takes at most one line and then waits; the channel holds 4.
        for i in 0..100 {
            // Never blocks: a full channel drops the line.
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let dropped = counter.dropped_lines();
        assert!((95..=96).contains(&dropped), "dropped {dropped}");
        publish_dropped_lines(&counter);
        let text = handle.render();
        assert!(
            text.contains(&format!("{LOG_LINES_DROPPED_TOTAL} {dropped}")),
            "{text}"
        );
        go_tx.send(()).unwrap();
        drop(guard);
        let kept = lines
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        assert_eq!(kept + dropped, 100);
    }

    #[test]
    fn line_batches_write_whole_lines_and_only_on_flush_or_when_full() {
        let mut out = LineBatches::new(Vec::new());
        out.write_all(b"one\n").unwrap();
        out.write_all(b"two\n").unwrap();
        assert!(out.out.is_empty());
        out.flush().unwrap();
        assert_eq!(out.out, b"one\ntwo\n");
        let long = vec![b'x'; LOG_WRITE_BATCH_BYTES - 2];
        out.write_all(&long).unwrap();
        out.write_all(b"three\n").unwrap();
        // The batch was written before the line that would not fit.
        assert_eq!(out.out.len(), 8 + long.len());
        out.flush().unwrap();
        assert!(out.out.ends_with(b"three\n"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(&rfc3339_second(1_795_618_903), b"2026-11-25T15:01:43");
        assert_eq!(&rfc3339_second(1_709_251_199), b"2024-02-29T23:59:59");
        assert_eq!(&rfc3339_second(0), b"1970-01-01T00:00:00");
    }

    /// Captures what a subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn emit_samples() {
        let e = std::io::Error::other("disk \u{1b}[31mfull");
        tracing::info!(
            dialect = "ascii1987",
            mti = %"0200",
            pan = "476173******0119",
            stan = 42u32,
            terminal = "TERM\"0\u{1b}[2J1",
            code = "00",
            us = 1234u64,
            delta = -5i64,
            ok = true,
            r#type = "x",
            ratio = 0.5f64,
            empty = "",
            nested = ?Some("a b"),
            "request"
        );
        tracing::warn!(error = %e, source = &e as &(dyn std::error::Error + 'static), "journal \n failed");
        tracing::info!("message only {}", 7);
    }

    #[test]
    fn plain_fields_write_what_the_default_fields_write() {
        let (default, fast) = (Capture::default(), Capture::default());
        let d = default.clone();
        let sub = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_writer(move || d.clone())
            .finish();
        tracing::subscriber::with_default(sub, emit_samples);
        let f = fast.clone();
        let sub = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .fmt_fields(PlainFields)
            .with_writer(move || f.clone())
            .finish();
        tracing::subscriber::with_default(sub, emit_samples);
        let (a, b) = (default.0.lock().unwrap(), fast.0.lock().unwrap());
        assert!(a.len() > 200, "{}", String::from_utf8_lossy(&a));
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
    }

    #[test]
    fn no_colours_off_a_terminal() {
        assert!(!ansi_wanted(false));
    }
}
