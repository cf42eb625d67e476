//! Logging and metrics.
//!
//! Metric names are the constants below; their labels come only from bounded sets (dialect,
//! MTI, response code, reason: DOMAIN §10) and are `&'static str`, so recording a metric does
//! not allocate on the request path. The Prometheus recorder is installed once per process
//! ([`install_metrics`]) and rendered by the admin server's `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Installs the global `tracing` subscriber: `format` lines, filtered by `RUST_LOG` when set,
/// else by `filter`.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::try_new(env),
        _ => tracing_subscriber::EnvFilter::try_new(filter),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))
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

/// The installed handle, if [`install_metrics`] succeeded.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS.get().and_then(|r| r.as_ref().ok()).cloned()
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
        assert!(matches!(
            second,
            Err(TelemetryError::AlreadyInstalled(_)) | Err(TelemetryError::Filter(_))
        ));
    }
}
