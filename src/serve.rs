//! `refundgate serve`: reads the configuration once, recovers the ledger from the journal,
//! and runs the TLS listeners until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use std::os::unix::fs::DirBuilderExt;

use crate::at_rest;
use crate::clock::SystemClock;
use crate::config::{self, Config};
use crate::exit::{EXIT_IOERR, EXIT_USAGE};
use crate::flow::{Gateway, Link};
use crate::journal::jetstream::{self, Replica};
use crate::journal::{self, Journal};
use crate::ledger::{MerchantSet, PanKey};
use crate::mac;
use crate::server::{self, Server};
use crate::telemetry;
use crate::terminal_keys::{Identities, TerminalKeys};
use crate::upstream;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the embedded defaults run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Merchant file; overrides `merchants` of the configuration.
    #[arg(long)]
    pub merchants: Option<PathBuf>,
    /// Journal directory; overrides `journal.dir` of the configuration.
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
}

/// A start-up failure and the exit code it maps to.
#[derive(Debug)]
pub struct StartError {
    /// Process exit code (64 configuration, 74 storage, 71 bind).
    pub code: u8,
    /// One line for the operator.
    pub message: String,
}

fn usage(message: impl Into<String>) -> StartError {
    StartError {
        code: EXIT_USAGE,
        message: message.into(),
    }
}

/// Everything `serve` needs, built and validated before any port is bound.
pub struct Prepared {
    /// The validated configuration.
    pub config: Config,
    /// The decision engine (without its upstreams, which start inside the runtime).
    pub gateway: Gateway,
    /// The open journal (kept alive for the process).
    pub journal: Arc<Journal>,
    /// Upstream links and the recovered SAF queue, when `[[upstreams]]` are configured.
    pub upstreams: Option<upstream::Plan>,
    /// The PAN hash key was created by this start (a replicated stream that already holds
    /// events needs the other nodes' key instead).
    pub fresh_pan_key: bool,
    /// The admin API's bearer tokens (`admin.token_file`; none: the API answers 403).
    pub admin_tokens: crate::admin::Tokens,
}

/// Loads configuration and merchants, opens and replays the journal.
pub fn prepare(args: &ServeArgs) -> Result<Prepared, StartError> {
    let mut config = Config::load(args.config.as_deref()).map_err(|e| usage(e.to_string()))?;
    if let Some(m) = &args.merchants {
        config.merchants = Some(m.clone());
    }
    if let Some(d) = &args.journal_dir {
        config.journal.dir = d.clone();
    }
    // A token file others may read is refused before anything else is opened.
    let admin_tokens = match &config.admin.token_file {
        Some(path) => crate::admin::Tokens::load(path).map_err(usage)?,
        None => crate::admin::Tokens::none(),
    };
    let merchants = match &config.merchants {
        Some(path) => MerchantSet::from_path(path),
        None => MerchantSet::embedded(),
    }
    .map_err(|e| usage(format!("merchants: {e}")))?;
    let links = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| link(i, l))
        .collect::<Result<Vec<_>, _>>()?;
    let durability = match config.journal.durability {
        config::Durability::Fdatasync => journal::Durability::Fdatasync,
        config::Durability::UnsafeNoFsync => {
            tracing::warn!("journal.durability = unsafe_no_fsync: approvals are acknowledged before they are on stable storage");
            journal::Durability::UnsafeNoFsync
        }
    };
    let io = |e: journal::JournalError| StartError {
        code: EXIT_IOERR,
        message: format!("journal {}: {e}", config.journal.dir.display()),
    };
    let options = journal::Options {
        durability,
        segment_bytes: config.journal.segment_bytes,
        gather: journal::GatherConfig {
            wait: std::time::Duration::from_micros(config.journal.gather_us),
            above_per_s: config.journal.gather_above_per_s,
        },
        ..journal::Options::default()
    };
    // DOMAIN §10: refuse a data directory others may read before touching it.
    at_rest::check_private_tree(&config.journal.dir).map_err(|e| StartError {
        code: EXIT_IOERR,
        message: format!("journal {}: {e}", config.journal.dir.display()),
    })?;
    move_legacy_pan_key(&config)?;
    let (journal, mut recovered) = Journal::open(&config.journal.dir, options).map_err(io)?;
    let empty = recovered.last_seq() == 0 && recovered.snapshot().is_none();
    let replicated = config.journal.backend == config::JournalBackend::Jetstream;
    if replicated && !empty {
        return Err(StartError {
            code: EXIT_IOERR,
            message: format!(
                "journal {}: holds a file journal, but journal.backend = \"jetstream\" rebuilds the ledger from the stream; move the directory away",
                config.journal.dir.display()
            ),
        });
    }
    let fresh_pan_key = !config.pan_hash_key_path().exists();
    let pan_key = pan_key(&config.pan_hash_key_path(), empty)?;
    let (ledger, replayed) = crate::flow::recover_ledger(&merchants, pan_key, &mut recovered, None)
        .map_err(|e| StartError {
            code: EXIT_IOERR,
            message: format!("journal {}: {e}", config.journal.dir.display()),
        })?;
    // The file's policies from here on, journaled (first start, or a file changed while the
    // gateway was down), so that a later replay applies the journal's events under the
    // policy that was in force when they were decided. Made durable with the next decision.
    // With the replicated journal the policies are the shared merchant file's, not journaled
    // (hot reload is refused there): nothing may go to the local journal.
    let startup = crate::ledger::AdminId::new("startup").unwrap_or_default();
    let now = crate::clock::Clock::now_unix_s(&SystemClock);
    let policies = if replicated {
        Ok(Vec::new())
    } else {
        ledger.reload_logged(&merchants, startup, now, |e| {
            let mut payload = Vec::with_capacity(128);
            e.encode(&mut payload);
            journal.enqueue(payload).map(|t| t.seq)
        })
    }
    .map_err(|e| StartError {
        code: match e {
            crate::ledger::ReloadError::Incompatible(_) => EXIT_USAGE,
            crate::ledger::ReloadError::Log(_) => EXIT_IOERR,
        },
        message: match e {
            crate::ledger::ReloadError::Incompatible(c) => format!("merchants: {c}"),
            crate::ledger::ReloadError::Log(s) => {
                format!("journal {}: {s}", config.journal.dir.display())
            }
        },
    })?;
    if !policies.is_empty() {
        tracing::info!(merchants = policies.len(), "merchant policies journaled");
    }
    tracing::info!(
        replayed,
        last_seq = recovered.last_seq(),
        "ledger recovered from the journal"
    );
    let journal = Arc::new(journal);
    // With the replicated journal the local one only holds the directory: events go to the
    // stream, and the SAF queue to the cluster's SAF streams.
    let gateway = Gateway::new(
        Arc::new(ledger),
        (!replicated).then(|| Arc::clone(&journal)),
        Arc::new(SystemClock),
        links,
    )
    .with_request_deadline(std::time::Duration::from_millis(
        config.limits.request_deadline_ms,
    ))
    .with_terminal_keys(terminal_keys(&config)?);
    let upstreams =
        upstream::Plan::from_config(&config, Arc::new(SystemClock)).map_err(|e| StartError {
            code: match e {
                upstream::PlanError::Config(_) => EXIT_USAGE,
                upstream::PlanError::Store(_) => EXIT_IOERR,
            },
            message: e.to_string(),
        })?;
    Ok(Prepared {
        config,
        gateway,
        journal,
        upstreams,
        fresh_pan_key,
        admin_tokens,
    })
}

/// Connects a `journal.backend = "jetstream"` node to its stream and rebuilds the ledger from
/// it; `None` with the file journal.
async fn replica(prepared: &Prepared) -> Result<Option<Arc<Replica>>, String> {
    let config = &prepared.config.journal;
    if config.backend != config::JournalBackend::Jetstream {
        return Ok(None);
    }
    let js = &config.jetstream;
    let settings = jetstream::Settings {
        servers: js.servers.clone(),
        stream: js.stream.clone(),
        subject_prefix: js.subject_prefix.clone(),
        replicas: js.replicas,
        ack_timeout: std::time::Duration::from_millis(js.ack_timeout_ms),
    };
    let started = crate::clock::monotonic();
    let (replica, state) = Replica::connect(&settings, prepared.gateway.shared_ledger())
        .await
        .map_err(|e| format!("journal.jetstream: {e}"))?;
    if state.messages > 0 && prepared.fresh_pan_key {
        return Err(format!(
            "security.pan_hash_key {} was created by this start, but stream {} already holds {} events: copy the key of the other nodes",
            prepared.config.pan_hash_key_path().display(),
            js.stream,
            state.messages
        ));
    }
    let applied = replica
        .load(state.last_sequence)
        .await
        .map_err(|e| format!("journal.jetstream: {e}"))?;
    tracing::info!(
        applied,
        snapshot_seq = replica
            .counters
            .start_snapshot_seq
            .load(std::sync::atomic::Ordering::Relaxed),
        last_sequence = state.last_sequence,
        ms = started.elapsed().as_millis() as u64,
        "ledger rebuilt from the replicated journal"
    );
    if let Some(plan) = &prepared.upstreams {
        plan.connect_cluster(replica.jetstream())
            .await
            .map_err(|e| format!("store-and-forward: {e}"))?;
    }
    let replica = Arc::new(replica);
    tokio::spawn(Arc::clone(&replica).tail(state.last_sequence));
    if js.lease_ttl_ms > 0 {
        let ttl = std::time::Duration::from_millis(js.lease_ttl_ms);
        let deadline = std::time::Duration::from_millis(prepared.config.limits.request_deadline_ms);
        crate::journal::lease::Leases::start(&replica, &settings, ttl, deadline)
            .await
            .map_err(|e| format!("journal.jetstream (leases): {e}"))?;
    }
    Ok(Some(replica))
}

fn link(i: usize, l: &config::ListenerConfig) -> Result<Link, StartError> {
    let mut link = Link::plain(l.dialect);
    link.identities = Identities::from_config(&l.identities);
    if let Some(mac) = &l.mac {
        let key = mac::key_from_config(&mac.algorithm, &mac.key)
            .map_err(|e| usage(format!("listeners[{i}].mac.{e}")))?;
        if mac::field_for(&key, l.dialect.spec(), false).is_none() {
            return Err(usage(format!(
                "listeners[{i}].mac.algorithm: the {} MAC element cannot carry a {} MAC",
                l.dialect.name(),
                mac.algorithm
            )));
        }
        link.mac = Some(key);
    }
    Ok(link)
}

/// The terminal master keys of `security.terminal_keys` (none when it is not set).
fn terminal_keys(config: &Config) -> Result<TerminalKeys, StartError> {
    let Some(path) = &config.security.terminal_keys else {
        return Ok(TerminalKeys::empty());
    };
    let keys = TerminalKeys::load(path).map_err(|e| StartError {
        code: EXIT_IOERR,
        message: e.to_string(),
    })?;
    tracing::info!(terminals = keys.len(), "terminal master keys loaded");
    Ok(keys)
}

/// The key of the PAN hashes kept in the ledger and journal, from `security.pan_hash_key`
/// (outside the journal directory). Created (random, 0600) only while the journal is empty:
/// a new key for a journal with data would silently break card matching of older sales and
/// reset per-card limits, so a missing key is refused then.
fn pan_key(path: &Path, journal_empty: bool) -> Result<PanKey, StartError> {
    let may_create = if journal_empty {
        Ok(())
    } else {
        Err("the journal already has records".to_string())
    };
    let bytes = at_rest::load_or_create_key(path, 16, may_create, "security.pan_hash_key")
        .map_err(|e| StartError {
            code: EXIT_IOERR,
            message: e.to_string(),
        })?;
    let key: [u8; 16] = bytes.as_slice().try_into().map_err(|_| StartError {
        code: EXIT_IOERR,
        message: format!("{}: expected 16 bytes", path.display()),
    })?;
    Ok(PanKey::new(&key))
}

/// Earlier versions kept the PAN hash key in the journal directory (`pan-hash.key`), beside
/// the hashes it protects. Moves it to `security.pan_hash_key` when that does not exist yet;
/// refuses to start while a copy stays in the data directory.
fn move_legacy_pan_key(config: &Config) -> Result<(), StartError> {
    let legacy = config.journal.dir.join(LEGACY_PAN_KEY_NAME);
    if !legacy.exists() {
        return Ok(());
    }
    let target = config.pan_hash_key_path();
    let refuse = |why: String| {
        StartError {
        code: EXIT_IOERR,
        message: format!(
            "{}: a key inside the data directory ({why}); move it to {} (security.pan_hash_key) and start again",
            legacy.display(),
            target.display()
        ),
    }
    };
    if target.exists() {
        return Err(refuse(format!("{} exists too", target.display())));
    }
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(at_rest::DIR_MODE)
            .create(parent)
            .map_err(|e| refuse(e.to_string()))?;
    }
    std::fs::rename(&legacy, &target).map_err(|e| refuse(e.to_string()))?;
    tracing::warn!(
        from = %legacy.display(),
        to = %target.display(),
        "moved the PAN hash key out of the data directory"
    );
    Ok(())
}

/// How often the scheduled cut-overs are looked at (DOMAIN §9a).
const CUTOVER_CHECK_MS: u64 = 30_000;

/// Runs the merchants' scheduled cut-overs as they fall due.
async fn cutover_loop(gateway: Arc<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(CUTOVER_CHECK_MS));
    loop {
        tick.tick().await;
        gateway.run_cutovers().await;
    }
}
/// The merchant file (`None`: the embedded sample set), read and validated whole.
pub fn load_merchants(path: Option<&Path>) -> Result<MerchantSet, String> {
    match path {
        Some(p) => MerchantSet::from_path(p),
        None => MerchantSet::embedded(),
    }
    .map_err(|e| format!("merchants: {e}"))
}

/// Reloads the merchant file on every SIGHUP (issue 22); a bad file is refused with its
/// one-line error and the policies in force stay.
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    gateway: Arc<Gateway>,
    path: Option<PathBuf>,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("SIGHUP handler not installed: reload through the admin API only");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = load_merchants(path.as_deref());
        let result = match loaded {
            Ok(set) => gateway.reload(&set, "sighup").await.map_err(|e| match e {
                crate::flow::ReloadFailure::Invalid(why) => why,
                crate::flow::ReloadFailure::Store => "journal unavailable".to_string(),
            }),
            Err(why) => Err(why),
        };
        match result {
            Ok(changed) => {
                tracing::info!(changed = changed.len(), "SIGHUP: merchant file reloaded")
            }
            Err(why) => {
                tracing::warn!(error = %why, "SIGHUP: merchant file refused; the policies in force stay")
            }
        }
    }
}

/// Name of the PAN hash key inside the journal directory in earlier versions.
const LEGACY_PAN_KEY_NAME: &str = "pan-hash.key";

/// How often the snapshot task looks at the journal.
const SNAPSHOT_CHECK_MS: u64 = 500;

/// Writes a ledger snapshot whenever `every` records were journaled since the last one.
async fn snapshot_loop(gateway: Arc<Gateway>, journal: Arc<Journal>, every: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(SNAPSHOT_CHECK_MS));
    loop {
        tick.tick().await;
        if journal.records_since_snapshot() < every {
            continue;
        }
        let Some((ticket, bytes)) = gateway.snapshot().await else {
            continue;
        };
        if journal.durable(ticket).await.is_err() {
            continue;
        }
        let seq = ticket.seq;
        let j = Arc::clone(&journal);
        let size = bytes.len();
        match tokio::task::spawn_blocking(move || j.snapshot(seq, &bytes)).await {
            Ok(Ok(report)) => tracing::info!(
                seq,
                bytes = size,
                segments_removed = report.segments_removed,
                "ledger snapshot written"
            ),
            Ok(Err(e)) => {
                tracing::warn!(seq, error = %e, "ledger snapshot failed; replay stays longer")
            }
            Err(e) => tracing::warn!(error = %e, "ledger snapshot task failed"),
        }
    }
}

/// With the replicated journal: writes a ledger snapshot to the stream's bucket whenever the
/// stream grew `every` sequences past the newest one there (any node may; see
/// [`Replica::write_snapshot`]). A failure is logged when it starts, not at every check.
async fn replica_snapshot_loop(replica: Arc<Replica>, every: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(SNAPSHOT_CHECK_MS));
    let mut failing = false;
    loop {
        tick.tick().await;
        match replica.write_snapshot(every).await {
            Ok(Some(seq)) => {
                telemetry::count_replica_snapshot("written");
                tracing::info!(
                    seq,
                    "ledger snapshot written to the replicated journal's bucket"
                );
                failing = false;
            }
            Ok(None) => {}
            Err(e) => {
                telemetry::count_replica_snapshot("failed");
                if !failing {
                    tracing::warn!(error = %e, "ledger snapshot not written; starts read more of the stream");
                }
                failing = true;
            }
        }
    }
}

/// Runs `serve` to completion and returns the process exit code.
pub fn run(args: &ServeArgs) -> ExitCode {
    let log = Config::load(args.config.as_deref())
        .map(|c| c.log)
        .unwrap_or_default();
    // Held until `run` returns: dropping it writes out the buffered log lines.
    let _log_guard = match telemetry::init_logging(log.format, &log.filter) {
        Ok(guard) => Some(guard),
        Err(e) => {
            eprintln!("refundgate: logging: {e}");
            None
        }
    };
    if let Err(e) = telemetry::install_metrics() {
        eprintln!("refundgate: metrics: {e}");
    }
    let prepared = match prepare(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("refundgate: {}", e.message);
            return ExitCode::from(e.code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refundgate: runtime: {e}");
            return ExitCode::from(EXIT_IOERR);
        }
    };
    let snapshot_every = prepared.config.journal.snapshot_every_records.max(1);
    let mut prepared = prepared;
    match runtime.block_on(replica(&prepared)) {
        Ok(Some(r)) => {
            prepared.gateway = prepared.gateway.with_replica(r);
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("refundgate: {e}");
            return ExitCode::from(EXIT_IOERR);
        }
    }
    let result = runtime.block_on(async move {
        let merchants_file = prepared.config.merchants.clone();
        let dialects: Vec<&'static str> = prepared
            .config
            .listeners
            .iter()
            .map(|l| l.dialect.name())
            .collect();
        let upstream_names: Vec<String> = prepared
            .config
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect();
        // Before anything is bound and announced: until tokio's handler exists, a SIGHUP
        // (e.g. systemd's ExecReload right after start) would terminate the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let mut server = Server::bind(prepared.config).await?;
        telemetry::export_zeros(&dialects, &upstream_names);
        server.readiness().set_merchants_loaded(true);
        let mut gateway = prepared.gateway;
        let upstreams = prepared.upstreams.map(|plan| Arc::new(plan.start()));
        if let Some(u) = &upstreams {
            gateway = gateway.with_upstreams(Arc::clone(u));
        }
        let gateway = Arc::new(gateway);
        if prepared.admin_tokens.is_empty() {
            tracing::warn!(
                "admin.token_file not set: the admin API answers 403 to every /v1/ call"
            );
        }
        server.set_admin_api(Arc::new(
            crate::admin::AdminApi::new(Arc::clone(&gateway), prepared.admin_tokens)
                .with_merchants_file(merchants_file.clone()),
        ));
        let reloads = tokio::spawn(reload_on_sighup(hup, Arc::clone(&gateway), merchants_file));
        let snapshots = tokio::spawn(snapshot_loop(
            Arc::clone(&gateway),
            Arc::clone(&prepared.journal),
            snapshot_every,
        ));
        let replica_snapshots = gateway
            .replica()
            .map(|r| tokio::spawn(replica_snapshot_loop(Arc::clone(r), snapshot_every)));
        let cutovers = tokio::spawn(cutover_loop(Arc::clone(&gateway)));
        let served = server
            .run(Arc::clone(&gateway), server::shutdown::signal())
            .await;
        snapshots.abort();
        if let Some(r) = replica_snapshots {
            r.abort();
        }
        cutovers.abort();
        reloads.abort();
        if let Some(u) = upstreams {
            u.shutdown().await;
        }
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refundgate: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
