//! Logging and metrics.
//!
//! Metric names are the constants below; their labels come only from bounded sets (dialect,
//! MTI, response code, reason: DOMAIN §10) and are `&'static str`, so recording a metric does
//! not allocate on the request path. The Prometheus recorder is installed once per process
//! ([`install_metrics`]) and rendered by the admin server's `/metrics`.
//!
//! Log lines never block a decision: [`init_logging`] formats each event in the calling task
//! and appends the line to one bounded in-memory buffer (`LineSink`); a writer thread takes
//! the whole buffer every [`LOG_FLUSH_DELAY`] or so and writes it to stdout in one call. No
//! line costs an allocation, a channel message or a wake-up of that thread.
//!
//! - Lines below WARN (the per-request line at `info`, debug, trace) are **lossy**: once
//!   [`LOG_BUFFER_BYTES`] are waiting, new ones are dropped, never waited for, and counted in
//!   [`LOG_LINES_DROPPED_TOTAL`].
//! - WARN and ERROR lines (storage trouble, skipped journal events, failed snapshots: the
//!   audit-worthy ones, and rare) are **never dropped**: they may use
//!   [`AUDIT_EXTRA_BYTES`] more, and a caller waits only if a flood of them filled even that.
//!
//! Lines of both kinds go through the one buffer, so they keep their order. Colours (ANSI) only
//! when stdout is a terminal and `NO_COLOR` is unset.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tracing::Level;

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
/// Batches the file journal wrote: one `pwrite` and, with `journal.durability = "fdatasync"`,
/// one `fdatasync` each.
pub const JOURNAL_BATCHES_TOTAL: &str = "refundgate_journal_batches_total";
/// Records the file journal wrote; divided by [`JOURNAL_BATCHES_TOTAL`], the records each
/// sync covered (raised under load by `journal.gather_us`).
pub const JOURNAL_RECORDS_TOTAL: &str = "refundgate_journal_records_total";
/// Seconds each file-journal batch took to write and `fdatasync` (the write alone with
/// `journal.durability = "unsafe_no_fsync"`): the disk's share of every approval's wait.
pub const JOURNAL_SYNC_SECONDS: &str = "refundgate_journal_sync_seconds";
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

/// Bytes of lines below WARN waiting for the log writer at most; more are dropped and counted.
pub const LOG_BUFFER_BYTES: usize = 8 << 20;
/// Bytes WARN and ERROR lines may use beyond [`LOG_BUFFER_BYTES`]; a caller then waits (never
/// drops).
pub const AUDIT_EXTRA_BYTES: usize = 2 << 20;
/// How long the log writer thread lets lines gather before it takes them: lines reach stdout
/// at most about this much later.
pub const LOG_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// Buckets of [`DECISION_SECONDS`]: from a cached answer (sub-millisecond) through a group
/// commit (milliseconds) to an upstream round trip (seconds).
pub const DECISION_SECONDS_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Buckets of [`JOURNAL_SYNC_SECONDS`]: a healthy local disk syncs in 0.1–1 ms; tens of
/// milliseconds mean approvals wait on a slow or shared disk.
pub const JOURNAL_SYNC_SECONDS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
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
/// The installed log buffer (its dropped-line count feeds [`LOG_LINES_DROPPED_TOTAL`]).
static LOG_SINK: OnceLock<Arc<LineSink>> = OnceLock::new();
/// Whether per-request lines are written without the fmt layer ([`log_request`]): plain text
/// without colours.
static REQUEST_LINES_DIRECT: OnceLock<bool> = OnceLock::new();

/// Keeps the log writer thread alive; dropping it writes out the lines still buffered. Hold
/// it until the process is about to exit.
#[must_use = "dropping the guard stops the log writer"]
#[derive(Debug)]
pub struct LogGuard {
    sink: Arc<LineSink>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sink.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    let sink = Arc::new(LineSink::new(LOG_BUFFER_BYTES, AUDIT_EXTRA_BYTES));
    let ansi = ansi_wanted(std::io::stdout().is_terminal());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(UtcMicros)
        .with_ansi(ansi)
        .with_writer(SinkWriters(sink.clone()));
    let installed = match format {
        LogFormat::Plain => builder.fmt_fields(PlainFields).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    let thread = sink
        .clone()
        .spawn_writer(std::io::stdout())
        .map_err(|e| TelemetryError::AlreadyInstalled(format!("log writer thread: {e}")))?;
    let _ = LOG_SINK.set(sink.clone());
    let _ = REQUEST_LINES_DIRECT.set(format == LogFormat::Plain && !ansi);
    Ok(LogGuard {
        sink,
        thread: Some(thread),
    })
}

/// The bounded buffer every log line goes through (module documentation).
#[derive(Debug)]
pub(crate) struct LineSink {
    state: Mutex<SinkState>,
    /// Wakes the writer thread: the buffer stopped being empty, or closing.
    gathered: Condvar,
    /// Wakes WARN/ERROR callers waiting for room.
    room: Condvar,
    dropped: AtomicU64,
    lossy_bytes: usize,
    audit_extra_bytes: usize,
}

#[derive(Debug, Default)]
struct SinkState {
    buf: Vec<u8>,
    closing: bool,
}

impl LineSink {
    fn new(lossy_bytes: usize, audit_extra_bytes: usize) -> LineSink {
        LineSink {
            state: Mutex::new(SinkState::default()),
            gathered: Condvar::new(),
            room: Condvar::new(),
            dropped: AtomicU64::new(0),
            lossy_bytes,
            audit_extra_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one whole line: dropped (and counted) when a lossy line does not fit; a
    /// lossless one waits for room beyond the lossy share.
    fn push(&self, line: &[u8], lossless: bool) {
        let mut st = self.lock();
        if lossless {
            while !st.closing
                && !st.buf.is_empty()
                && st.buf.len() + line.len() > self.lossy_bytes + self.audit_extra_bytes
            {
                st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        } else if st.buf.len() + line.len() > self.lossy_bytes {
            drop(st);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(line);
        drop(st);
        if was_empty {
            // Once per batch, not per line: the writer sleeps only on an empty buffer.
            self.gathered.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closing = true;
        self.gathered.notify_all();
        self.room.notify_all();
    }

    /// Lines dropped so far.
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The writer thread: sleeps while the buffer is empty; otherwise lets lines gather for
    /// [`LOG_FLUSH_DELAY`], takes them all and writes them in one call. On close it writes
    /// what is left and ends.
    fn spawn_writer<W: Write + Send + 'static>(
        self: Arc<Self>,
        mut out: W,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("refundgate-log".into())
            .spawn(move || {
                let mut taken = Vec::new();
                loop {
                    let closing = {
                        let mut st = self.lock();
                        while st.buf.is_empty() && !st.closing {
                            st = self.gathered.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        if st.buf.is_empty() {
                            return;
                        }
                        st.closing
                    };
                    if !closing {
                        std::thread::sleep(LOG_FLUSH_DELAY);
                    }
                    std::mem::swap(&mut self.lock().buf, &mut taken);
                    self.room.notify_all();
                    // A failed write loses this batch rather than retrying it forever.
                    let _ = out.write_all(&taken).and_then(|()| out.flush());
                    taken.clear();
                }
            })
    }
}

/// The fmt layer's writers: WARN and ERROR lossless, the rest lossy.
struct SinkWriters(Arc<LineSink>);

/// One line's writer (the fmt layer writes each line with one `write_all`).
pub(crate) struct SinkWriter<'a> {
    sink: &'a LineSink,
    lossless: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriters {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        SinkWriter {
            sink: &self.0,
            lossless: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SinkWriter<'a> {
        SinkWriter {
            sink: &self.0,
            lossless: *meta.level() <= Level::WARN,
        }
    }
}

impl Write for SinkWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.sink.push(line, self.lossless);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fmt layer's timestamp (RFC 3339, UTC, microseconds: `2026-12-04T16:18:56.227651Z`, as
/// `tracing_subscriber::fmt::time::SystemTime` writes it), with the date and time of the
/// current second formatted once per second per thread instead of once per line.
struct UtcMicros;

impl tracing_subscriber::fmt::time::FormatTime for UtcMicros {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let (text, tail) = utc_micros_now();
        // Both are ASCII digits and punctuation.
        w.write_str(std::str::from_utf8(&text).unwrap_or("????-??-??T??:??:??"))?;
        w.write_str(std::str::from_utf8(&tail).unwrap_or(".??????Z"))
    }
}

/// The current time as the log lines show it: `YYYY-MM-DDTHH:MM:SS` (formatted once per
/// second per thread) and `.uuuuuuZ`.
fn utc_micros_now() -> ([u8; 19], [u8; 8]) {
    {
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
        (text, tail)
    }
}

/// The fields of the per-request line (`refundgate::flow` at INFO): one line per answered
/// message. `pan` is masked by the caller.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// The listener's dialect.
    pub dialect: &'a str,
    /// The request's MTI.
    pub mti: u16,
    /// The masked PAN, or empty.
    pub pan: &'a str,
    /// DE 11, or 0.
    pub stan: u32,
    /// DE 41, or empty.
    pub terminal: &'a str,
    /// The response code answered (DE 39).
    pub code: &'a str,
    /// The reason's name.
    pub reason: &'a str,
    /// Microseconds from the read to the answer.
    pub us: u64,
}

/// Whether the per-request line is wanted (the `refundgate::flow` target enabled at INFO).
pub fn request_line_enabled() -> bool {
    tracing::enabled!(target: "refundgate::flow", Level::INFO)
}

/// Logs the per-request line. With plain lines and no colours it is written straight to the
/// lossy writer, byte for byte what the fmt layer would write (a test holds them equal),
/// without the fmt layer's field visiting and `fmt::Write` machinery: at 64 × 8 that
/// machinery cost about a third of the gateway's CPU per answer. Otherwise (JSON, colours,
/// a field that needs escaping, no writer installed), through `tracing` as any other line.
pub fn log_request(line: &RequestLine<'_>) {
    if let (Some(true), Some(sink)) = (REQUEST_LINES_DIRECT.get(), LOG_SINK.get()) {
        if [
            line.dialect,
            line.pan,
            line.terminal,
            line.code,
            line.reason,
        ]
        .iter()
        .all(|v| plain_str(v))
        {
            thread_local! {
                static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            BUF.with_borrow_mut(|buf| {
                buf.clear();
                let (text, tail) = utc_micros_now();
                write_request_line(buf, &text, &tail, line);
                // Lossy: never waits; a full buffer drops and counts the line.
                sink.push(buf, false);
            });
            return;
        }
    }
    trace_request(line);
}

/// The per-request line through `tracing` (the fmt layer formats it).
fn trace_request(line: &RequestLine<'_>) {
    tracing::info!(
        target: "refundgate::flow",
        dialect = line.dialect,
        mti = %Mti4(line.mti),
        pan = line.pan,
        stan = line.stan,
        terminal = line.terminal,
        code = line.code,
        reason = line.reason,
        us = line.us,
        "request"
    );
}

/// An MTI as four digits.
struct Mti4(u16);

impl std::fmt::Display for Mti4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

/// Printable ASCII without `"` or `\\`: `Debug` writes it quoted and unchanged.
fn plain_str(v: &str) -> bool {
    v.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The fmt layer's plain line for a [`RequestLine`] (fields already checked by [`plain_str`]).
fn write_request_line(buf: &mut Vec<u8>, text: &[u8; 19], tail: &[u8; 8], l: &RequestLine<'_>) {
    let mut num = itoa::Buffer::new();
    buf.extend_from_slice(text);
    buf.extend_from_slice(tail);
    buf.extend_from_slice(b"  INFO refundgate::flow: request dialect=\"");
    buf.extend_from_slice(l.dialect.as_bytes());
    buf.extend_from_slice(b"\" mti=");
    let mti = l.mti.min(9999);
    buf.extend_from_slice(&[
        b'0' + (mti / 1000) as u8,
        b'0' + (mti / 100 % 10) as u8,
        b'0' + (mti / 10 % 10) as u8,
        b'0' + (mti % 10) as u8,
    ]);
    if l.mti > 9999 {
        buf.truncate(buf.len() - 4);
        buf.extend_from_slice(num.format(l.mti).as_bytes());
    }
    buf.extend_from_slice(b" pan=\"");
    buf.extend_from_slice(l.pan.as_bytes());
    buf.extend_from_slice(b"\" stan=");
    buf.extend_from_slice(num.format(l.stan).as_bytes());
    buf.extend_from_slice(b" terminal=\"");
    buf.extend_from_slice(l.terminal.as_bytes());
    buf.extend_from_slice(b"\" code=\"");
    buf.extend_from_slice(l.code.as_bytes());
    buf.extend_from_slice(b"\" reason=\"");
    buf.extend_from_slice(l.reason.as_bytes());
    buf.extend_from_slice(b"\" us=");
    buf.extend_from_slice(num.format(l.us).as_bytes());
    buf.push(b'\n');
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

/// Sets [`LOG_LINES_DROPPED_TOTAL`] from a log buffer's count.
fn publish_dropped_lines(sink: &LineSink) {
    metrics::counter!(LOG_LINES_DROPPED_TOTAL).absolute(sink.dropped());
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
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(JOURNAL_SYNC_SECONDS.to_string()),
                        JOURNAL_SYNC_SECONDS_BUCKETS,
                    )
                })
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
    if let Some(sink) = LOG_SINK.get() {
        publish_dropped_lines(sink);
    }
    Some(handle)
}

/// A `&'static str` by address: the labels below are string constants, so their addresses
/// identify them without hashing their text.
fn label_id(s: &'static str) -> (usize, usize) {
    (s.as_ptr() as usize, s.len())
}

thread_local! {
    /// This thread's handles of [`REQUESTS_TOTAL`], by label values: the recorder is asked once
    /// per combination (its lookup builds and hashes the labelled key, for every request).
    static REQUEST_COUNTERS: std::cell::RefCell<std::collections::HashMap<[(usize, usize); 4], metrics::Counter>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// This thread's handles of [`DECISION_SECONDS`], by dialect.
    static DECISION_HISTOGRAMS: std::cell::RefCell<std::collections::HashMap<(usize, usize), metrics::Histogram>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Whether the Prometheus recorder is installed: handles are only cached then (one taken
/// before would be the no-op recorder's for ever).
fn recorder_installed() -> bool {
    matches!(METRICS.get(), Some(Ok(_)))
}

/// Counts one request with its outcome; all labels from bounded sets.
pub fn record_request(
    dialect: &'static str,
    mti: &'static str,
    code: &'static str,
    reason: &'static str,
) {
    let lookup = || {
        metrics::counter!(
            REQUESTS_TOTAL,
            LABEL_DIALECT => dialect,
            "mti" => mti,
            "code" => code,
            "reason" => reason
        )
    };
    if !recorder_installed() {
        lookup().increment(1);
        return;
    }
    let key = [
        label_id(dialect),
        label_id(mti),
        label_id(code),
        label_id(reason),
    ];
    REQUEST_COUNTERS.with_borrow_mut(|cache| cache.entry(key).or_insert_with(lookup).increment(1));
}

/// Records how long one decision took.
pub fn record_decision_seconds(dialect: &'static str, seconds: f64) {
    let lookup = || metrics::histogram!(DECISION_SECONDS, LABEL_DIALECT => dialect);
    if !recorder_installed() {
        lookup().record(seconds);
        return;
    }
    DECISION_HISTOGRAMS.with_borrow_mut(|cache| {
        cache
            .entry(label_id(dialect))
            .or_insert_with(lookup)
            .record(seconds)
    });
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

/// Counts one batch of `records` the file journal wrote (and synced) in `took`.
pub(crate) fn count_journal_batch(records: usize, took: std::time::Duration) {
    metrics::counter!(JOURNAL_BATCHES_TOTAL).increment(1);
    metrics::counter!(JOURNAL_RECORDS_TOTAL).increment(records as u64);
    metrics::histogram!(JOURNAL_SYNC_SECONDS).record(took.as_secs_f64());
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
    metrics::counter!(JOURNAL_BATCHES_TOTAL).increment(0);
    metrics::counter!(JOURNAL_RECORDS_TOTAL).increment(0);
    let _registered = metrics::histogram!(JOURNAL_SYNC_SECONDS);
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
        JOURNAL_BATCHES_TOTAL,
        "Batches the file journal wrote, each with one write and one fdatasync."
    );
    describe_counter!(
        JOURNAL_RECORDS_TOTAL,
        "Records the file journal wrote; per batch: the records one fdatasync covered."
    );
    describe_histogram!(
        JOURNAL_SYNC_SECONDS,
        Unit::Seconds,
        "Time each file-journal batch took to write and fdatasync."
    );
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
        "Events of the replicated journal: appended, conflict (decided again), remote, unavailable, skipped; with leases: lease_taken, lease_lost, forwarded, no_owner."
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

    /// A sink, the sender that lets its writer go on, what the writer wrote, its thread.
    type StuckSink = (
        Arc<LineSink>,
        std::sync::mpsc::Sender<()>,
        Arc<Mutex<Vec<u8>>>,
        std::thread::JoinHandle<()>,
    );

    /// A sink whose writer thread writes only once it is told to go on.
    fn stuck_sink(lossy_bytes: usize, audit_extra_bytes: usize) -> StuckSink {
        let (go_tx, go) = std::sync::mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = Stuck {
            go,
            lines: lines.clone(),
            waited: false,
        };
        let sink = Arc::new(LineSink::new(lossy_bytes, audit_extra_bytes));
        let thread = sink.clone().spawn_writer(out).unwrap();
        (sink, go_tx, lines, thread)
    }

    fn count_lines(lines: &Mutex<Vec<u8>>) -> usize {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    #[test]
    fn lines_dropped_by_a_stuck_lossy_writer_are_counted_in_the_metric() {
        let handle = install_metrics().unwrap();
        // Room for 4 lines of 8 bytes; the writer thread takes what is there and then waits.
        let (sink, go, lines, thread) = stuck_sink(32, 32);
        let mut w = SinkWriter {
            sink: &sink,
            lossless: false,
        };
        for i in 0..100 {
            // Never blocks: a full buffer drops the line.
            w.write_all(format!("line {i:02}\n").as_bytes()).unwrap();
        }
        let dropped = sink.dropped();
        assert!((88..=96).contains(&dropped), "dropped {dropped}");
        publish_dropped_lines(&sink);
        let text = handle.render();
        assert!(
            text.contains(&format!("{LOG_LINES_DROPPED_TOTAL} {dropped}")),
            "{text}"
        );
        go.send(()).unwrap();
        sink.close();
        thread.join().unwrap();
        assert_eq!(count_lines(&lines) as u64 + dropped, 100);
    }

    #[test]
    fn warnings_are_never_dropped_and_keep_their_order_with_the_rest() {
        let (sink, go, lines, thread) = stuck_sink(32, 32);
        let s = sink.clone();
        // 100 WARN lines do not fit either: the caller waits until the writer goes on.
        let caller = std::thread::spawn(move || {
            let mut info = SinkWriter {
                sink: &s,
                lossless: false,
            };
            info.write_all(b"info 00\n").unwrap();
            let mut warn = SinkWriter {
                sink: &s,
                lossless: true,
            };
            for i in 0..100 {
                warn.write_all(format!("warn {i:02}\n").as_bytes()).unwrap();
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!caller.is_finished(), "a full buffer must make WARN wait");
        go.send(()).unwrap();
        caller.join().unwrap();
        sink.close();
        thread.join().unwrap();
        assert_eq!(sink.dropped(), 0);
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let expected: String = std::iter::once("info 00\n".to_string())
            .chain((0..100).map(|i| format!("warn {i:02}\n")))
            .collect();
        assert_eq!(text, expected);
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
    fn the_direct_request_line_is_what_the_fmt_layer_writes() {
        let lines = [
            RequestLine {
                dialect: "ascii1987",
                mti: 200,
                pan: "476173******0119",
                stan: 31_680,
                terminal: "TERM0001",
                code: "00",
                reason: "APPROVED",
                us: 2_930,
            },
            RequestLine {
                dialect: "cup_pos",
                mti: 9,
                pan: "",
                stan: 0,
                terminal: "",
                code: "96",
                reason: "STORE_UNAVAILABLE",
                us: u64::MAX,
            },
        ];
        let captured = Capture::default();
        let c = captured.clone();
        let sub = tracing_subscriber::fmt()
            .with_timer(UtcMicros)
            .with_ansi(false)
            .fmt_fields(PlainFields)
            .with_writer(move || c.clone())
            .finish();
        tracing::subscriber::with_default(sub, || lines.iter().for_each(trace_request));
        let traced = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let traced: Vec<&str> = traced.lines().collect();
        assert_eq!(traced.len(), lines.len());
        for (line, traced) in lines.iter().zip(traced) {
            let mut direct = Vec::new();
            let (text, tail) = utc_micros_now();
            write_request_line(&mut direct, &text, &tail, line);
            let direct = String::from_utf8(direct).unwrap();
            // Timestamps differ by when each was taken: compare what follows them.
            assert_eq!(direct[27..].trim_end(), &traced[27..], "{direct}");
            assert_eq!(traced.as_bytes()[10], b'T', "{traced}");
        }
    }

    #[test]
    fn a_field_that_needs_escaping_takes_the_fmt_layer() {
        assert!(plain_str("TERM0001"));
        assert!(!plain_str("TERM\"01"));
        assert!(!plain_str("T\u{1b}[2J"));
        assert!(!plain_str("TÉRM"));
    }

    #[test]
    fn no_colours_off_a_terminal() {
        assert!(!ansi_wanted(false));
    }
}
