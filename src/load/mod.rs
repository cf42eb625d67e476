//! The load generator (`refundgate load`): replays a scenario over N TLS connections, verifies
//! every answer, and reports throughput, latency percentiles and answers by code.
//!
//! - [`scenario`]: the replay file format (`fixtures/replay/*.toml`) and its compiled form.
//! - [`client`]: one task per connection, pipelined requests, in-order answer matching.
//! - [`report`]: counters, the HdrHistogram and the printed / JSON report.
//!
//! ```text
//! refundgate load --target 127.0.0.1:18583 --scenario fixtures/replay/ceiling-echo.toml \
//!     --connections 64 --in-flight 8 [--closed | --rate 5000] [--duration 10 | --count N] \
//!     [--json] [--ca gateway.pem [--server-name localhost] | --insecure-skip-verify] \
//!     [--dialect ascii1987|cup_pos|iso87b] [--timeout 10] [--allow-remote] [--quiet] [--threads N]
//!     [--stan-start N]
//! ```
//!
//! Each answer is checked against its step: response MTI (request MTI + 10 unless the step
//! says otherwise), DE11 equal to the request's, DE39 among the step's codes, DE44 when the
//! step sets `reason`, and the fields later steps of the session refer to. A mismatch cuts the
//! session short (its later steps would refer to a wrong answer) and is counted.
//!
//! The integrator adds the subcommand with `Load(refundgate::load::LoadArgs)` in the
//! `Command` enum and `Command::Load(args) => return refundgate::load::run_blocking(args)`.

pub mod client;
mod pace;
pub mod report;
pub mod scenario;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

pub use report::{Errors, Latency, Mismatch, Report};
pub use scenario::{Dialect, Scenario, ScenarioError};

use client::{Finished, Shared, Timing};
use report::Tally;
use scenario::Ids;

/// Most TLS connections one run opens.
pub const CONNECTIONS_MAX: u32 = 4096;
/// Most requests outstanding on one connection.
pub const IN_FLIGHT_MAX: u32 = 256;
/// Longest run, in seconds (also the bound of a `--count` run).
pub const DURATION_S_MAX: f64 = 3600.0;
/// Run length when neither `--duration` nor `--count` is given, in seconds.
pub const DURATION_S_DEFAULT: f64 = 10.0;
/// Most requests a `--count` run sends.
pub const COUNT_MAX: u64 = 100_000_000;
/// Highest open-loop rate, requests/s in total.
pub const RATE_MAX: f64 = 10_000_000.0;
/// Longest per-request timeout, in seconds.
pub const TIMEOUT_S_MAX: f64 = 600.0;
/// Most worker threads the generator's runtime may use.
pub const THREADS_MAX: usize = 64;

pub use crate::exit::{EXIT_ERRORS, EXIT_MISMATCH, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE};

/// Arguments of `refundgate load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Address of the TLS ISO 8583 endpoint, HOST:PORT (loopback unless --allow-remote).
    #[arg(long)]
    pub target: String,
    /// Dialect; must match the scenario's `dialect` (which it defaults to).
    #[arg(long, value_parser = crate::dialect::Dialect::named)]
    pub dialect: Option<Dialect>,
    /// The replay scenario (fixtures/replay/*.toml).
    #[arg(long)]
    pub scenario: PathBuf,
    /// TLS connections to open.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Requests outstanding per connection at most (pipelining; answers are matched in order).
    #[arg(long, default_value_t = 1)]
    pub in_flight: u32,
    /// Open loop: total requests per second over all connections; latency is measured from
    /// each request's intended send time.
    #[arg(long, conflicts_with = "closed")]
    pub rate: Option<f64>,
    /// Closed loop (the default): each slot sends its next request when the answer arrives.
    #[arg(long)]
    pub closed: bool,
    /// Seconds to send for (default 10).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Requests to send in total (the run still stops after 3600 s).
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds to wait for one answer.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// PEM file of the CA (or self-signed certificate) the server's certificate must chain to.
    #[arg(long, conflicts_with = "insecure_skip_verify")]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (test responders such as `ceiling serve` only).
    #[arg(long)]
    pub insecure_skip_verify: bool,
    /// Name to verify the certificate against (default: the host of --target).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Worker threads of the generator's runtime (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// First STAN (1..=999999; default: random). Chain runs against one gateway with the
    /// report's `stan_next` so no STAN repeats within the gateway's duplicate window.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=999_999))]
    pub stan_start: Option<u32>,
}

impl LoadArgs {
    /// Arguments for a library caller (a test): one connection, one request in flight,
    /// closed loop, 10 s, no progress output, certificate verified against `ca` (which the
    /// caller must then set, or set `insecure_skip_verify`).
    pub fn new(target: impl Into<String>, scenario: impl Into<PathBuf>) -> LoadArgs {
        LoadArgs {
            target: target.into(),
            dialect: None,
            scenario: scenario.into(),
            connections: 1,
            in_flight: 1,
            rate: None,
            closed: false,
            duration: None,
            count: None,
            timeout: 10.0,
            json: false,
            ca: None,
            insecure_skip_verify: false,
            server_name: None,
            allow_remote: false,
            quiet: true,
            threads: None,
            stan_start: None,
        }
    }
}

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The scenario file cannot be used.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// TLS configuration (certificate file) failed.
    #[error("{0}")]
    Tls(String),
    /// No connection to the target could be opened.
    #[error("{0}")]
    Connect(String),
    /// The scenario's setup steps failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The generator failed (runtime, task).
    #[error("{0}")]
    Internal(String),
}

impl LoadError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            LoadError::Usage(_) | LoadError::Scenario(_) | LoadError::Tls(_) => EXIT_USAGE,
            LoadError::Connect(_) | LoadError::Setup(_) => EXIT_UNAVAILABLE,
            LoadError::Internal(_) => EXIT_SOFTWARE,
        }
    }
}

/// Runs one load test and returns its report (mismatches and errors are in the report; an
/// `Err` means no run took place).
pub async fn run(args: LoadArgs) -> Result<Report, LoadError> {
    let plan = Plan::check(&args)?;
    let scenario = Arc::new(Scenario::load(&args.scenario)?);
    if let Some(d) = args.dialect {
        if d != scenario.dialect {
            return Err(LoadError::Usage(format!(
                "--dialect {} but the scenario is {}",
                d.name(),
                scenario.dialect.name()
            )));
        }
    }
    let config = client::tls_config(args.ca.as_deref(), args.insecure_skip_verify)
        .map_err(LoadError::Tls)?;
    let addr = resolve(&args.target, args.allow_remote).await?;
    let server_name = server_name(&args)?;
    let mut shared = Shared {
        scenario: scenario.clone(),
        setup_values: Vec::new(),
        ids: Ids::new(args.stan_start),
        connector: TlsConnector::from(config),
        addr,
        server_name,
        in_flight: args.in_flight as usize,
        timeout: plan.timeout,
        frame_max: crate::limits::FRAME_BYTES_HARD_MAX - 1,
        budget: args.count.map(AtomicU64::new),
        interval_ns: plan.interval_ns,
        connections: args.connections as usize,
        answered: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        exhausted: AtomicBool::new(false),
    };
    if !scenario.setup.steps.is_empty() {
        shared.setup_values = client::run_setup(&shared).await.map_err(LoadError::Setup)?;
    }
    let shared = Arc::new(shared);
    let (start_tx, start_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = mpsc::channel(args.connections as usize);
    let mut tasks = JoinSet::new();
    for id in 0..args.connections as usize {
        let tally = Tally::new().map_err(|e| LoadError::Internal(e.to_string()))?;
        tasks.spawn(client::connection(
            id,
            shared.clone(),
            tally,
            start_rx.clone(),
            ready_tx.clone(),
        ));
    }
    drop(ready_tx);
    // Each task reports once, after its first connect (bounded by the timeout) succeeded or not.
    let mut connected = 0u32;
    for _ in 0..args.connections {
        match ready_rx.recv().await {
            Some(ok) => connected += u32::from(ok),
            None => break,
        }
    }
    let start = Instant::now();
    let deadline = start + plan.duration;
    if connected == 0 {
        drop(start_tx);
        let mut first = None;
        while let Some(done) = tasks.join_next().await {
            if let Ok(f) = done {
                first = first.or(f.first_error);
            }
        }
        return Err(LoadError::Connect(
            first.unwrap_or_else(|| "no connection".into()),
        ));
    }
    // Every task waits for this; none can be gone while `tasks` holds them.
    let _ = start_tx.send(Some(Timing { start, deadline }));
    let finished = collect(&mut tasks, &shared, &args, &plan, start).await?;
    Ok(report(&args, &scenario, &shared, start, finished))
}

/// Builds a runtime, runs, prints the report (text, or JSON with `--json`) and maps the
/// outcome to an exit code: 0 every answer verified, 1 mismatches, 2 errors only, 64 bad
/// arguments or scenario, 69 target unreachable or setup failed, 70 internal failure.
pub fn run_blocking(args: LoadArgs) -> ExitCode {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, THREADS_MAX);
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refundgate load: runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("refundgate load: report: {e}");
                        return ExitCode::from(EXIT_SOFTWARE);
                    }
                }
            } else {
                println!("{report}");
            }
            if report.mismatches > 0 {
                ExitCode::from(EXIT_MISMATCH)
            } else if !report.is_clean() {
                ExitCode::from(EXIT_ERRORS)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("refundgate load: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The checked numbers of a run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    duration: Duration,
    timeout: Duration,
    interval_ns: Option<u64>,
    /// Count mode: the progress bar counts answers, not seconds.
    count: Option<u64>,
}

impl Plan {
    fn check(args: &LoadArgs) -> Result<Plan, LoadError> {
        let usage = |m: String| Err(LoadError::Usage(m));
        if args.connections == 0 || args.connections > CONNECTIONS_MAX {
            return usage(format!("--connections: want 1..={CONNECTIONS_MAX}"));
        }
        if args.in_flight == 0 || args.in_flight > IN_FLIGHT_MAX {
            return usage(format!("--in-flight: want 1..={IN_FLIGHT_MAX}"));
        }
        let duration_s = match (args.duration, args.count) {
            (Some(d), _) if !(d > 0.0 && d <= DURATION_S_MAX) => {
                return usage(format!("--duration: want (0, {DURATION_S_MAX}] seconds"));
            }
            (Some(d), _) => d,
            (None, Some(n)) if n == 0 || n > COUNT_MAX => {
                return usage(format!("--count: want 1..={COUNT_MAX}"))
            }
            (None, Some(_)) => DURATION_S_MAX,
            (None, None) => DURATION_S_DEFAULT,
        };
        if !(args.timeout > 0.0 && args.timeout <= TIMEOUT_S_MAX) {
            return usage(format!("--timeout: want (0, {TIMEOUT_S_MAX}] seconds"));
        }
        let interval_ns = match args.rate {
            None => None,
            Some(r) if !(r > 0.0 && r <= RATE_MAX) => {
                return usage(format!("--rate: want (0, {RATE_MAX}] per second"))
            }
            Some(r) => {
                let per_connection = r / f64::from(args.connections);
                Some(((1e9 / per_connection) as u64).max(1))
            }
        };
        if args.ca.is_none() && !args.insecure_skip_verify {
            return usage("give --ca FILE to verify the server, or --insecure-skip-verify for a test responder".into());
        }
        Ok(Plan {
            duration: Duration::from_secs_f64(duration_s),
            timeout: Duration::from_secs_f64(args.timeout),
            interval_ns,
            count: args.count,
        })
    }
}

/// Resolves the target; refuses a non-loopback address unless allowed.
async fn resolve(target: &str, allow_remote: bool) -> Result<SocketAddr, LoadError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| LoadError::Usage(format!("--target {target}: {e}")))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| LoadError::Usage(format!("--target {target}: no address")))?;
    if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(LoadError::Usage(format!(
            "--target {target} is not a loopback address; pass --allow-remote to drive it"
        )));
    }
    Ok(first)
}

fn server_name(args: &LoadArgs) -> Result<ServerName<'static>, LoadError> {
    let host = match &args.server_name {
        Some(n) => n.clone(),
        None => {
            let t = args.target.as_str();
            let host = t.rsplit_once(':').map_or(t, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
    };
    ServerName::try_from(host.clone())
        .map_err(|e| LoadError::Usage(format!("server name {host:?}: {e}")))
}

/// Waits for every connection task, showing progress meanwhile.
async fn collect(
    tasks: &mut JoinSet<Finished>,
    shared: &Shared,
    args: &LoadArgs,
    plan: &Plan,
    start: Instant,
) -> Result<Vec<Finished>, LoadError> {
    let mut progress = Progress::new(args, plan);
    let mut ticker = tokio::time::interval(Duration::from_millis(if progress.bar.is_some() {
        200
    } else {
        1000
    }));
    ticker.tick().await;
    let mut out = Vec::with_capacity(args.connections as usize);
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(Ok(f)) => out.push(f),
                Some(Err(e)) => return Err(LoadError::Internal(format!("connection task: {e}"))),
                None => break,
            },
            _ = ticker.tick() => progress.show(shared, start),
        }
    }
    progress.done();
    Ok(out)
}

/// A progress bar on a terminal, a line a second otherwise, nothing with `--quiet`.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    count: Option<u64>,
}

impl Progress {
    fn new(args: &LoadArgs, plan: &Plan) -> Progress {
        if args.quiet {
            return Progress {
                bar: None,
                plain: false,
                count: None,
            };
        }
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                plain: true,
                count: plan.count,
            };
        }
        let len = plan.count.unwrap_or(plan.duration.as_millis() as u64);
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress {
            bar: Some(bar),
            plain: false,
            count: plan.count,
        }
    }

    fn show(&mut self, shared: &Shared, start: Instant) {
        let answered = shared.answered.load(Ordering::Relaxed);
        let mismatches = shared.mismatches.load(Ordering::Relaxed);
        let elapsed = start.elapsed();
        let rate = answered as f64 / elapsed.as_secs_f64().max(1e-3);
        let msg = format!("answered {answered} ({rate:.0}/s), mismatches {mismatches}");
        if let Some(bar) = &self.bar {
            bar.set_position(self.count.map_or(elapsed.as_millis() as u64, |_| answered));
            bar.set_message(msg);
        } else if self.plain {
            eprintln!("load: {:>6.1} s  {msg}", elapsed.as_secs_f64());
        }
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn report(
    args: &LoadArgs,
    scenario: &Scenario,
    shared: &Shared,
    start: Instant,
    finished: Vec<Finished>,
) -> Report {
    let mut tally: Option<Tally> = None;
    let mut last_answer = start;
    let mut first_error = None;
    for f in finished {
        if let Some(t) = f.last_answer {
            last_answer = last_answer.max(t);
        }
        first_error = first_error.or(f.first_error);
        match &mut tally {
            None => tally = Some(f.tally),
            Some(t) => t.merge(f.tally),
        }
    }
    if let Some(t) = &mut tally {
        t.flush_latencies();
    }
    let elapsed_s = last_answer.saturating_duration_since(start).as_secs_f64();
    let empty = Tally::new().ok();
    let t = tally.or(empty);
    let (latency, codes) = t
        .as_ref()
        .map(|t| (t.latency_summary(), t.codes_text()))
        .unwrap_or_default();
    let get = |f: fn(&Tally) -> u64| t.as_ref().map_or(0, f);
    let answered = get(|t| t.answered);
    Report {
        target: args.target.clone(),
        scenario: scenario.name.clone(),
        dialect: scenario.dialect.name().to_string(),
        connections: args.connections,
        in_flight: args.in_flight,
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        rate_per_s: args.rate,
        elapsed_s,
        sent: get(|t| t.sent),
        answered,
        verified: get(|t| t.verified),
        throughput_per_s: if elapsed_s > 0.0 {
            answered as f64 / elapsed_s
        } else {
            0.0
        },
        latency_us: latency,
        send_lag_us: t.as_ref().and_then(Tally::send_lag_summary),
        codes,
        mismatches: get(|t| t.mismatches),
        mismatch_examples: t.as_ref().map(|t| t.examples.clone()).unwrap_or_default(),
        sessions_completed: get(|t| t.sessions_completed),
        sessions_aborted: get(|t| t.sessions_aborted),
        errors: t.as_ref().map(|t| t.errors).unwrap_or_default(),
        first_error,
        backlog_unsent: get(|t| t.backlog_unsent),
        stan_reused: shared.ids.stans_used() > scenario::STAN_SPACE,
        stan_first: shared.ids.stan_first(),
        stan_next: shared.ids.stan_after(),
    }
}
