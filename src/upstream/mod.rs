//! Upstream bank hosts (DOMAIN §8, §5 row 14): routing, multiplexed links, store-and-forward.
//!
//! - [`route`]: which upstream a merchant's requests go to, and the links built from
//!   `[[upstreams]]` (TLS client settings included).
//! - [`link`]: one multiplexed TLS link with a bounded pending map, timeouts, sign-on, echo,
//!   reconnect and failover.
//! - [`store_forward`]: the persistent queue of reversals, retried until the host accepts them.
//!
//! [`Upstreams::forward`] is the one call the flow layer makes, after the ledger reserved and
//! before it journals and commits. Its [`Verdict`] says what to do with the reservation:
//! commit on [`Verdict::Approved`] (or [`Verdict::Local`]: the merchant has no route), decline
//! with the host's code, or release and answer 91 / 92 / 91-or-98. A timeout queues a reversal
//! durably *before* the verdict is returned, so the terminal's 91/98 never precedes it.
//!
//! `/readyz` does not depend on upstreams: a down bank only affects the merchants routed to it
//! (they get 91), and pulling the whole gateway out of a load balancer would also stop the
//! merchants decided locally. Link state is in `refundgate_upstream_up{upstream}`.

pub mod link;
pub mod route;
pub mod store_forward;
pub mod translate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{self, Config};
use crate::dialect::Kind;
use crate::dialect::{Dialect, OriginalKeys};
use crate::iso8583::{self, FieldList, Message, Mti, Value};
use crate::journal;
use crate::ledger::Operation;
pub use link::{Key, Link, LinkConfig, LinkError};
pub use route::Routes;
pub use store_forward::{DeadLetter, DeadReason, Entry, Saf, SafOptions, StoreForward};

/// `refundgate_upstream_requests_total{upstream,outcome}`: forwarded requests by outcome
/// (`approved`, `declined`, `unreachable`, `timeout`).
pub const UPSTREAM_REQUESTS_TOTAL: &str = "refundgate_upstream_requests_total";
/// `refundgate_saf_enqueue_failures_total`: reversals that could not be queued (logged as errors).
pub const SAF_ENQUEUE_FAILURES_TOTAL: &str = "refundgate_saf_enqueue_failures_total";

/// What the upstream said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not routed: decide locally, as without upstreams.
    Local,
    /// The host approved: commit.
    Approved,
    /// The host declined with this DE39: decline, pass the code through.
    Declined([u8; 2]),
    /// Never reached the host (link down, pending map full, the same key still in flight or
    /// quarantined after a timeout): 91 `HOST_UNREACHABLE`.
    Unreachable,
    /// No answer in time; a reversal is queued: 91 / CUP 98 `HOST_TIMEOUT`.
    Timeout,
    /// The route names no configured upstream: 92 `NO_ROUTE`.
    NoRoute,
}

/// What [`Plan::start`] needs, prepared (and the SAF journal recovered) before any socket.
pub struct Plan {
    /// One link per `[[upstreams]]`.
    pub links: Vec<LinkConfig>,
    /// `[routes]`.
    pub routes: Routes,
    /// The recovered SAF queue (the cluster's: connected by [`Plan::connect_cluster`]).
    pub saf: Saf,
}

impl Plan {
    /// The links, routes and SAF queue of a validated `config`; `None` when it has no
    /// upstreams. Opens the SAF journal in `<journal.dir>/saf`, or with `journal.backend =
    /// "jetstream"` prepares the cluster's queue (connected by [`Plan::connect_cluster`]).
    pub fn from_config(config: &Config, clock: Arc<dyn Clock>) -> Result<Option<Plan>, PlanError> {
        if config.upstreams.is_empty() {
            return Ok(None);
        }
        let links = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| route::link_config(i, u, Arc::clone(&clock)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PlanError::Config)?;
        if config.journal.backend == config::JournalBackend::Jetstream {
            return Plan::cluster(config, clock, links);
        }
        let dir = saf_dir(&config.journal.dir);
        crate::at_rest::check_private_tree(&dir).map_err(|e| PlanError::Store(e.to_string()))?;
        let saf = StoreForward::open(&dir, saf_options(config), clock).map_err(|e| {
            PlanError::Store(format!("store-and-forward journal {}: {e}", dir.display()))
        })?;
        // The key of the PANs queued messages keep: created only while none is kept.
        let may_create = match saf.holds_sealed_pans() {
            false => Ok(()),
            true => Err("queued messages hold PANs sealed under it".to_string()),
        };
        let key = crate::at_rest::load_or_create_key(
            &config.saf_pan_key_path(),
            crate::at_rest::PanCipher::KEY_BYTES,
            may_create,
            "security.saf_pan_key",
        )
        .map_err(|e| PlanError::Store(e.to_string()))?;
        let cipher = crate::at_rest::PanCipher::new(&key)
            .ok_or_else(|| PlanError::Store("security.saf_pan_key: not a 32-byte key".into()))?;
        saf.set_pan_cipher(cipher);
        Ok(Some(Plan {
            links,
            routes: Routes::from_config(&config.routes),
            saf: Saf::File(Arc::new(saf)),
        }))
    }

    /// [`Plan::from_config`] with the replicated journal: the SAF queue is in the cluster.
    /// Every node must use the same `security.saf_pan_key`; one created by this start is
    /// refused by [`Plan::connect_cluster`] when the queue already holds entries.
    fn cluster(
        config: &Config,
        clock: Arc<dyn Clock>,
        links: Vec<LinkConfig>,
    ) -> Result<Option<Plan>, PlanError> {
        let key_path = config.saf_pan_key_path();
        let fresh = !key_path.exists();
        let key = crate::at_rest::load_or_create_key(
            &key_path,
            crate::at_rest::PanCipher::KEY_BYTES,
            Ok(()),
            "security.saf_pan_key",
        )
        .map_err(|e| PlanError::Store(e.to_string()))?;
        let cipher = crate::at_rest::PanCipher::new(&key)
            .ok_or_else(|| PlanError::Store("security.saf_pan_key: not a 32-byte key".into()))?;
        // Longer than any send (a call ends at its upstream's timeout): a node holds a
        // message for one send at a time.
        let longest_ms = config
            .upstreams
            .iter()
            .map(|u| u.timeout_ms)
            .max()
            .unwrap_or(0);
        let settings = store_forward::cluster::ClusterSettings {
            stream: config.journal.jetstream.stream.clone(),
            replicas: config.journal.jetstream.replicas,
            ack_wait: Duration::from_millis(longest_ms.saturating_mul(2).saturating_add(5_000)),
        };
        let saf = store_forward::cluster::ClusterSaf::new(settings, saf_options(config), clock);
        saf.set_pan_cipher(cipher);
        if fresh {
            saf.set_fresh_key();
        }
        Ok(Some(Plan {
            links,
            routes: Routes::from_config(&config.routes),
            saf: Saf::Cluster(Arc::new(saf)),
        }))
    }

    /// With the replicated journal: creates (or opens) the SAF streams on the cluster `js`
    /// is connected to. Does nothing with the local queue.
    pub async fn connect_cluster(
        &self,
        js: async_nats::jetstream::Context,
    ) -> Result<(), PlanError> {
        match &self.saf {
            Saf::File(_) => Ok(()),
            Saf::Cluster(saf) => saf.connect(js).await.map_err(PlanError::Store),
        }
    }

    /// Starts the links and the SAF worker (inside a tokio runtime).
    pub fn start(self) -> Upstreams {
        Upstreams::start(self.links, self.routes, self.saf)
    }
}

/// Why the upstreams of a configuration cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A TLS file or setting is unusable (exit 64).
    #[error("config: {0}")]
    Config(String),
    /// The SAF journal cannot be opened or recovered (exit 74).
    #[error("{0}")]
    Store(String),
}

/// The SAF journal directory of a journal directory.
pub fn saf_dir(journal_dir: &Path) -> PathBuf {
    journal_dir.join("saf")
}

/// The SAF retry settings of `config`.
pub fn saf_options(config: &Config) -> SafOptions {
    SafOptions {
        max_retries: config.saf.max_retries,
        expiry_s: i64::try_from(config.saf.expiry_s).unwrap_or(i64::MAX),
        retry_min: Duration::from_millis(config.saf.retry_min_ms),
        retry_max: Duration::from_millis(config.saf.retry_max_ms),
        durability: match config.journal.durability {
            config::Durability::Fdatasync => journal::Durability::Fdatasync,
            config::Durability::UnsafeNoFsync => journal::Durability::UnsafeNoFsync,
        },
    }
}

/// The links, the routes and the SAF queue of one gateway.
pub struct Upstreams {
    links: Arc<HashMap<String, Arc<Link>>>,
    routes: Routes,
    saf: Arc<Saf>,
    stop: watch::Sender<bool>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Upstreams {
    /// Whether a request of this merchant (DE42) goes to an upstream host; `false`: it is
    /// decided on this node alone (what [`Upstreams::forward`] answers with
    /// [`Verdict::Local`] for every kind).
    pub fn routes(&self, merchant: Option<&str>) -> bool {
        merchant.is_none_or(|m| self.routes.upstream_for(m).is_some())
    }

    /// Starts one link per config and the SAF worker (call inside a tokio runtime).
    pub fn start(links: Vec<LinkConfig>, routes: Routes, saf: impl Into<Saf>) -> Upstreams {
        let saf = Arc::new(saf.into());
        let links: HashMap<String, Arc<Link>> = links
            .into_iter()
            .map(|c| (c.name.to_string(), Arc::new(Link::start(c))))
            .collect();
        let links = Arc::new(links);
        let (stop, stopped) = watch::channel(false);
        let worker = {
            let (saf, links) = (Arc::clone(&saf), Arc::clone(&links));
            tokio::spawn(async move { saf.run(links, stopped).await })
        };
        Upstreams {
            links,
            routes,
            saf,
            stop,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// The link named `name`.
    pub fn link(&self, name: &str) -> Option<&Arc<Link>> {
        self.links.get(name)
    }

    /// Every link, in no particular order (admin views).
    pub fn links(&self) -> impl Iterator<Item = &Arc<Link>> {
        self.links.values()
    }

    /// The SAF queue.
    pub fn saf(&self) -> &Arc<Saf> {
        &self.saf
    }

    /// Stops the SAF worker and every link and waits for the worker to finish its sends in
    /// progress (it leaves unfinished entries in the journal for the next start).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let worker = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = worker {
            let _ = w.await;
        }
        for link in self.links.values() {
            link.shutdown().await;
        }
    }

    /// Forwards a request the ledger reserved, if its merchant is routed (DOMAIN §5 row 14).
    ///
    /// Sales, refunds and voids wait for the host. A terminal's reversal of a routed merchant is
    /// queued for the host (durably) and then decided locally. Everything else is local.
    pub async fn forward(
        &self,
        dialect: &'static Dialect,
        msg: &Message<'_>,
        kind: Kind,
    ) -> Verdict {
        let Some(name) = msg.merchant().and_then(|m| self.routes.upstream_for(m)) else {
            return Verdict::Local;
        };
        let Some(link) = self.links.get(name) else {
            return Verdict::NoRoute;
        };
        if !matches!(
            kind,
            Kind::Op(Operation::Sale | Operation::Refund | Operation::Void | Operation::Reversal)
        ) {
            return Verdict::Local;
        }
        // The request as the host reads it: the terminal's own bytes (without its MAC) on a
        // link of the same dialect, else translated field by field.
        let Some(body) = outgoing(dialect, link.dialect(), msg, kind) else {
            return Verdict::Unreachable;
        };
        let Ok(sent) = iso8583::decode(link.dialect().spec(), &body) else {
            return Verdict::Unreachable;
        };
        let Some(key) = Key::of(&sent) else {
            return Verdict::Unreachable;
        };
        if kind == Kind::Op(Operation::Reversal) {
            return match self.queue_as_is(link, key, body).await {
                true => Verdict::Local,
                false => Verdict::Unreachable,
            };
        }
        let verdict = match link.call(key, body.clone()).await {
            Ok(answer) => verdict_of(link.dialect(), dialect, &answer),
            // An answer that cannot be trusted leaves the outcome unknown, as no answer does.
            Err(LinkError::Timeout | LinkError::BadMac) => Verdict::Timeout,
            Err(_) => Verdict::Unreachable,
        };
        if verdict == Verdict::Timeout && !reversal_skipped() {
            self.queue_reversal(link, &sent).await;
        }
        let outcome = match verdict {
            Verdict::Approved => "approved",
            Verdict::Declined(_) => "declined",
            Verdict::Timeout => "timeout",
            _ => "unreachable",
        };
        metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "upstream" => name.to_string(), "outcome" => outcome)
            .increment(1);
        verdict
    }

    /// Queues the reversal of a request the host approved but the gateway did not (journal
    /// failure, decline at commit); returns once it is durable (or logged as lost).
    pub async fn reverse(&self, dialect: &'static Dialect, msg: &Message<'_>) {
        let Some(name) = msg.merchant().and_then(|m| self.routes.upstream_for(m)) else {
            return;
        };
        let Some(link) = self.links.get(name) else {
            return;
        };
        let sent = dialect
            .classify(msg)
            .and_then(|kind| outgoing(dialect, link.dialect(), msg, kind));
        match sent
            .as_deref()
            .map(|b| iso8583::decode(link.dialect().spec(), b))
        {
            Some(Ok(sent)) => self.queue_reversal(link, &sent).await,
            _ => {
                metrics::counter!(SAF_ENQUEUE_FAILURES_TOTAL).increment(1);
                tracing::error!(
                    upstream = link.name(),
                    terminal = msg.terminal().unwrap_or(""),
                    stan = msg.stan().unwrap_or(0),
                    "reversal of a host-approved request could not be built"
                );
            }
        }
    }

    /// Queues the reversal of `msg` (timed out, or approved by the host and not by us) before
    /// its terminal is answered.
    async fn queue_reversal(&self, link: &Link, msg: &Message<'_>) {
        let queued = match reversal_of(link.dialect(), msg) {
            Some((key, body)) => self
                .saf
                .enqueue(link.name(), link.dialect(), key, body)
                .await
                .map_err(|e| e.to_string()),
            None => Err("cannot build the reversal".to_string()),
        };
        if let Err(e) = queued {
            metrics::counter!(SAF_ENQUEUE_FAILURES_TOTAL).increment(1);
            tracing::error!(
                upstream = link.name(),
                terminal = msg.terminal().unwrap_or(""),
                stan = msg.stan().unwrap_or(0),
                error = %e,
                "reversal of a timed-out request could not be queued"
            );
        }
    }

    /// Queues a terminal's own reversal (as the host reads it) for the host; true once it is
    /// durable.
    async fn queue_as_is(&self, link: &Link, key: Key, body: Bytes) -> bool {
        let body = first_send(link.dialect(), body);
        match self
            .saf
            .enqueue(link.name(), link.dialect(), key, body)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                metrics::counter!(SAF_ENQUEUE_FAILURES_TOTAL).increment(1);
                tracing::error!(upstream = link.name(), error = %e, "terminal reversal could not be queued");
                false
            }
        }
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
    }
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("links", &self.links.len())
            .field("saf", &self.saf)
            .finish_non_exhaustive()
    }
}

/// The core simulator's `reversal-not-queued` mutation (test builds only): a timed-out
/// request is answered 91 and never reversed.
fn reversal_skipped() -> bool {
    #[cfg(feature = "sim-mutations")]
    return crate::sim::switches::reversal_not_queued();
    #[cfg(not(feature = "sim-mutations"))]
    false
}

/// The terminal's message as the host gets it: unchanged, except that a MAC (computed with
/// the terminal's key, meaningless to the host) is left out.
fn upstream_body(msg: &Message<'_>) -> Option<Bytes> {
    if !msg.has(64) && !msg.has(128) {
        return Some(Bytes::copy_from_slice(msg.bytes()));
    }
    let mut fields: FieldList<'_, 128> = FieldList::new();
    for n in msg.present().filter(|&n| n != 64 && n != 128 && n > 1) {
        fields.echo(msg, n).ok()?;
    }
    let mut out = BytesMut::with_capacity(msg.bytes().len());
    iso8583::encode(msg.spec(), msg.mti(), fields.as_slice(), &mut out).ok()?;
    Some(out.freeze())
}

/// The message with its MTI origin digit cleared (the SAF worker marks later sends repeats).
fn first_send(dialect: &Dialect, body: Bytes) -> Bytes {
    dialect.with_origin(&body, false)
}

/// `msg` (of `terminal`, asking for `kind`) as it goes to a host speaking `host`.
fn outgoing(terminal: &Dialect, host: &Dialect, msg: &Message<'_>, kind: Kind) -> Option<Bytes> {
    match terminal == host {
        true => upstream_body(msg),
        false => translate::request(terminal, host, msg, kind),
    }
}

/// What the host's answer (of `host`) decides; a decline's code as the terminal's dialect
/// writes it.
fn verdict_of(host: &Dialect, terminal: &Dialect, answer: &[u8]) -> Verdict {
    let code = iso8583::decode(host.spec(), answer)
        .ok()
        .and_then(|m| m.response_code().map(str::as_bytes).map(<[u8]>::to_vec));
    match code.as_deref() {
        Some(b"00") => Verdict::Approved,
        Some(&[a, b]) => Verdict::Declined(translate::answer_code(host, terminal, [a, b])),
        // An answer we cannot read: whether the host acted is unknown, like a timeout.
        _ => Verdict::Timeout,
    }
}

/// The reversal (0400) of a request that timed out, keyed by (0400, DE41, DE11).
///
/// Dialects naming originals by DE90 (`ascii1987`, `iso87b`): DE 3, 4, 7, 11, 12, 13, 22, 25,
/// 37, 41, 42, 49 of the original and DE90 naming it (MTI, STAN, DE7). By DE61 (`cup_pos`):
/// DE 3, 4, 11, 22, 25, 37, 41, 42, 49, 60, 61 and DE39 `98` (reversal reason: no answer).
/// No PAN, track or PIN data: hosts match reversals without them.
pub fn reversal_of(dialect: &Dialect, msg: &Message<'_>) -> Option<(Key, Bytes)> {
    let mut fields: FieldList<'_, 16> = FieldList::new();
    let de90;
    match dialect.original {
        OriginalKeys::De90 => {
            for n in [3, 4, 7, 11, 12, 13, 22, 25, 37, 41, 42, 49] {
                fields.echo(msg, n).ok()?;
            }
            let original_mti = msg.mti().0 - msg.mti().0 % 10;
            de90 = format!(
                "{:04}{:06}{:010}{:022}",
                original_mti,
                msg.stan()?,
                msg.transmission().unwrap_or(0),
                0
            );
            fields.set(90, Value::Text(de90.as_bytes())).ok()?;
        }
        OriginalKeys::De61 => {
            for n in [3, 4, 11, 22, 25, 37, 41, 42, 49, 60, 61] {
                fields.echo(msg, n).ok()?;
            }
            fields.set(39, Value::Text(b"98")).ok()?;
        }
    }
    let spec = dialect.spec();
    let mut out = BytesMut::with_capacity(128);
    iso8583::encode(spec, Mti(400), fields.as_slice(), &mut out).ok()?;
    let body = out.freeze();
    let key = Key::of(&iso8583::decode(spec, &body).ok()?)?;
    Some((key, body))
}
