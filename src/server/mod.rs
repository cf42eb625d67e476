//! The TLS gateway: listeners, connections, admin HTTP and graceful shutdown.
//!
//! Shaped like mini-redis: a [`Server`] binds every socket first (so tests can bind
//! `127.0.0.1:0` and read [`Server::local_addrs`]), then [`Server::run`] accepts on each
//! listener (admission: handshake budget, `max_connections`, per-address limits; backoff on
//! accept errors) and serves each
//! connection in its own task until the `shutdown` future completes; then it stops accepting,
//! lets connections answer what is in flight within `shutdown_grace_ms`, and returns.
//!
//! The server knows nothing of ISO 8583 fields or the ledger: each framed message body goes to
//! a [`Dispatch`] (the seam the integrator implements) and its [`Handled`] answer is framed
//! back in request order (or, on a listener whose [`ListenerInfo::answer_order`] is
//! [`AnswerOrder::AsReady`], each as soon as it is ready: the host simulator's listeners).
//!
//! - `listener.rs`: accept loop, drain; `admission.rs`: handshake budget and connection limits.
//! - `lanes.rs`: the connection threads, each a single-threaded runtime the listeners hand
//!   accepted sockets to (`limits.connection_threads`).
//! - `connection.rs`: TLS handshake, pipelined read loop, batched writes.
//! - `tls.rs`: rustls configuration; `shutdown.rs`: the signal; `admin.rs`: `/metrics` etc.

pub(crate) mod admin;
mod admission;
mod connection;
mod lanes;
pub(crate) mod listener;
pub mod shutdown;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, Dialect, LimitsConfig, MacConfig};
use crate::frame::Framing;
use crate::limits;
use crate::telemetry;

/// What the server knows about one listener; shared by every request it carries.
#[derive(Debug)]
pub struct ListenerInfo {
    /// Position in `config.listeners`.
    pub index: usize,
    /// `dialect@addr`, for logs.
    pub name: String,
    /// The bound address (the real port when the configuration said 0).
    pub addr: SocketAddr,
    /// Message dialect of this listener.
    pub dialect: Dialect,
    /// Length header of this listener.
    pub framing: Framing,
    /// The MAC configuration of this link, for the message layer to interpret.
    pub mac: Option<MacConfig>,
    /// Whether clients must present a certificate (mTLS).
    pub client_auth: bool,
    /// The certificate the listener presents (DER), e.g. for a test client to trust.
    pub cert_der: CertificateDer<'static>,
    /// Lower-case hex SHA-256 of [`Self::cert_der`].
    pub cert_sha256: String,
    /// In which order the answers of one connection are sent.
    pub answer_order: AnswerOrder,
}

/// In which order a connection sends its answers (chosen per listener, once per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnswerOrder {
    /// In request order, whatever order they are decided in (the gateway: what a terminal
    /// expects). The frames of one read go to [`Dispatch::handle_batch`] together.
    #[default]
    Request,
    /// Each as soon as it is ready (a multiplexed bank host: its answers come out of order,
    /// the switch matches them by key). Each frame goes to [`Dispatch::handle`] on its own.
    AsReady,
}

/// What a connection does with a frame it has just read ([`Dispatch::intake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Dispatch it (the default).
    Take,
    /// Drop it unanswered, as if it had not been read, and read nothing more until
    /// [`Dispatch::reading_paused`] says otherwise (the peer's writes then pile up in the socket
    /// buffers).
    Pause,
    /// Drop it unanswered, stop reading, send the answers in flight, then close.
    Close,
}

/// Who sent a request: passed to [`Dispatch::handle`] with every message.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The listener the connection came in on.
    pub listener: Arc<ListenerInfo>,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The client certificate's subject (`CN=…, O=…`) on mTLS listeners.
    pub client_cert_subject: Option<String>,
    /// Subject, alternative names and fingerprint of the client certificate on mTLS
    /// listeners: what the listener's `identities` map is matched against.
    pub client_cert: Option<Arc<tls::ClientCert>>,
    /// Process-unique number of the connection, for logs.
    pub connection_id: u64,
}

/// The answer of the message layer to one framed message.
#[derive(Debug)]
pub enum Handled {
    /// Send these message bytes (MTI onward); the server adds length, TPDU and header.
    Reply(bytes::BytesMut),
    /// Send nothing; the connection stays open (a message error that cannot be answered).
    Drop,
}

/// The seam between the transport and the message layer, implemented by the integrator.
///
/// Called once per framed message with the bytes from the MTI onward. Up to
/// `max_in_flight_per_connection` calls of one connection run at once; their answers are sent
/// in request order (or as ready, see [`AnswerOrder`]). The future should not outlive `shutdown_grace_ms` once shutdown starts:
/// after that the connection is closed without its answer.
///
/// ```no_run
/// use std::sync::Arc;
/// use refundgate::config::Config;
/// use refundgate::server::{self, Dispatch, Handled, RequestCtx};
///
/// struct Echo;
/// impl Dispatch for Echo {
///     async fn handle(&self, _ctx: &RequestCtx, body: bytes::Bytes) -> Handled {
///         Handled::Reply(bytes::BytesMut::from(&body[..]))
///     }
/// }
///
/// # async fn start() -> Result<(), server::ServerError> {
/// let config = Config::load(None)?;
/// server::run(config, Arc::new(Echo), server::shutdown::signal()).await
/// # }
/// ```
pub trait Dispatch: Send + Sync + 'static {
    /// Decides the answer to one message (async: an approval waits for its journal sync).
    fn handle(&self, ctx: &RequestCtx, body: bytes::Bytes) -> impl Future<Output = Handled> + Send;

    /// Decides the messages of one read, in order, one answer each: an implementation can
    /// decide them all and wait for the journal once. By default, one [`Dispatch::handle`]
    /// after the other.
    fn handle_batch(
        &self,
        ctx: &RequestCtx,
        bodies: Vec<bytes::Bytes>,
    ) -> impl Future<Output = Vec<Handled>> + Send {
        async move {
            let mut out = Vec::with_capacity(bodies.len());
            for body in bodies {
                out.push(self.handle(ctx, body).await);
            }
            out
        }
    }

    /// Called once per connection when its TLS handshake has completed, before anything is
    /// read. By default, nothing.
    fn opened(&self, _ctx: &RequestCtx) {}

    /// Asked before each read: whether the connection leaves its socket unread for now (asked
    /// again every [`limits::READING_PAUSED_RECHECK_MS`]; answers in flight are still sent).
    /// By default, never: the gateway always reads.
    fn reading_paused(&self, _ctx: &RequestCtx) -> bool {
        false
    }

    /// Called when every connection thread has run out of work and is about to sleep: no
    /// request is being read or decided, so whatever waits for more company (the journal's
    /// gather) may go ahead now. Called often under light load: keep it cheap. By default,
    /// nothing.
    fn idle(&self) {}

    /// Asked for each frame read, before it is dispatched; `taken` counts the frames this
    /// connection took before it. By default, [`Intake::Take`].
    fn intake(&self, _ctx: &RequestCtx, _taken: u64) -> Intake {
        Intake::Take
    }
}

/// `/readyz` state: ready once the merchants are loaded (set by the integrator) and the
/// listeners are accepting (set by [`Server::run`]); not ready again once shutdown starts.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessFlags>);

#[derive(Debug, Default)]
struct ReadinessFlags {
    merchants_loaded: AtomicBool,
    accepting: AtomicBool,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration (or a file it names) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket could not be bound.
    #[error("bind {key} ({addr}): {source}")]
    Bind {
        /// The configuration key of the address.
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ServerError {
    /// The process exit status for this error: 64 (`EX_USAGE`) for a bad configuration, 71
    /// (`EX_OSERR`) when a socket cannot be bound.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => i32::from(crate::exit::EXIT_USAGE),
            ServerError::Bind { .. } => i32::from(crate::exit::EXIT_OSERR),
        }
    }
}

/// A gateway whose sockets are bound; [`Server::run`] serves them.
pub struct Server {
    config: Arc<Config>,
    listeners: Vec<listener::Listener>,
    admin: TcpListener,
    admin_addr: SocketAddr,
    readiness: Readiness,
    /// The authenticated admin API (`/v1/…`); `None`: those paths answer 404.
    admin_api: Option<Arc<crate::admin::AdminApi>>,
}

/// Binds everything `config` asks for and serves until `shutdown` completes, then drains.
pub async fn run<D: Dispatch>(
    config: Config,
    dispatch: Arc<D>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(dispatch, shutdown).await
}

// === impl Readiness ===

impl Readiness {
    /// Marks the merchant set as loaded (or not).
    pub fn set_merchants_loaded(&self, loaded: bool) {
        self.0.merchants_loaded.store(loaded, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.merchants_loaded.load(Ordering::SeqCst) && self.0.accepting.load(Ordering::SeqCst)
    }

    fn set_accepting(&self, accepting: bool) {
        self.0.accepting.store(accepting, Ordering::SeqCst);
    }
}

// === impl Server ===

impl Server {
    /// Validates `config`, builds the TLS configurations (generating a self-signed certificate
    /// if a listener has none) and binds every listener and the admin socket. Installs the
    /// Prometheus recorder if nobody has yet.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        if let Err(e) = telemetry::install_metrics() {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
        }
        let config = Arc::new(config);
        let mut self_signed = None;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, lc) in config.listeners.iter().enumerate() {
            let tls = tls::listener_tls(&lc.tls, index, &mut self_signed)?;
            if lc.tls.cert.is_none() && !lc.addr.ip().is_loopback() {
                // Allowed only with tls.self_signed = true written out (config validation).
                tracing::warn!(
                    addr = %lc.addr,
                    "listener on a non-loopback address presents a generated self-signed certificate (tls.self_signed = true)"
                );
            }
            let key = format!("listeners[{index}].addr");
            let tcp = bind(&key, lc.addr).await?;
            let addr = tcp.local_addr().map_err(|source| ServerError::Bind {
                key,
                addr: lc.addr,
                source,
            })?;
            let info = Arc::new(ListenerInfo {
                index,
                name: format!("{}@{addr}", lc.dialect.name()),
                addr,
                dialect: lc.dialect,
                framing: lc.framing,
                mac: lc.mac.clone(),
                client_auth: tls.client_auth,
                cert_der: tls.cert_der.clone(),
                cert_sha256: tls.cert_sha256.clone(),
                answer_order: AnswerOrder::Request,
            });
            tracing::info!(
                listener = %info.name,
                framing = info.framing.as_str(),
                mtls = info.client_auth,
                cert_sha256 = %info.cert_sha256,
                "listening"
            );
            listeners.push(listener::Listener::new(tcp, info, tls.acceptor));
        }
        let admin = bind("admin.addr", config.admin.addr).await?;
        let admin_addr = admin.local_addr().map_err(|source| ServerError::Bind {
            key: "admin.addr".to_string(),
            addr: config.admin.addr,
            source,
        })?;
        tracing::info!(addr = %admin_addr, "admin http listening");
        Ok(Server {
            config,
            listeners,
            admin,
            admin_addr,
            readiness: Readiness::default(),
            admin_api: None,
        })
    }

    /// The bound address of every listener, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.info().addr).collect()
    }

    /// What the server knows about each listener, in configuration order.
    pub fn listeners(&self) -> Vec<Arc<ListenerInfo>> {
        self.listeners.iter().map(|l| l.info().clone()).collect()
    }

    /// Serves `api` under `/v1/` on the admin address (issue 22).
    pub fn set_admin_api(&mut self, api: Arc<crate::admin::AdminApi>) {
        self.admin_api = Some(api);
    }

    /// The bound address of the admin HTTP server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The readiness flag behind `/readyz`; call `set_merchants_loaded(true)` once loaded.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, drains connections within
    /// `limits.shutdown_grace_ms` (closing the rest) and returns.
    pub async fn run<D: Dispatch>(
        self,
        dispatch: Arc<D>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let limits = Arc::new(self.config.limits.clone());
        let admin = Some(admin::Site {
            listener: self.admin,
            readiness: self.readiness.clone(),
            routes: self.admin_api.clone(),
            connection_timeout: Duration::from_millis(self.config.admin.connection_timeout_ms),
        });
        serve(
            self.listeners,
            admin,
            limits,
            dispatch,
            &self.readiness,
            shutdown,
        )
        .await;
        Ok(())
    }
}

/// Accepts on every listener and serves `admin` until `shutdown` completes, then stops
/// accepting, drains connections within `limits.shutdown_grace_ms` (closing the rest) and
/// returns: [`Server::run`], and the host simulator's (`host_sim.rs`) with its own dispatch,
/// limits and admin routes.
pub(crate) async fn serve<D: Dispatch, R: admin::AdminRoutes>(
    listeners: Vec<listener::Listener>,
    admin: Option<admin::Site<R>>,
    limits: Arc<LimitsConfig>,
    dispatch: Arc<D>,
    readiness: &Readiness,
    shutdown: impl Future<Output = ()>,
) {
    let (trigger, shutdown_rx) = shutdown::channel();
    let admission = admission::Admission::new(&limits);
    // Dropped when this returns, after every listener drained (or aborted) its connections.
    let on_idle = {
        let dispatch = dispatch.clone();
        move || dispatch.idle()
    };
    let lanes = match lanes::Lanes::start(limits.connection_threads, on_idle) {
        Ok(lanes) => Arc::new(lanes),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the connection threads; serving connections on the main runtime");
            Arc::new(lanes::Lanes::none())
        }
    };
    let accepting = futures::future::join_all(listeners.into_iter().map(|l| {
        l.serve(
            dispatch.clone(),
            admission.clone(),
            limits.clone(),
            lanes.clone(),
            shutdown_rx.clone(),
        )
    }));
    let admin = async {
        if let Some(site) = admin {
            admin::serve(site, shutdown_rx).await;
        }
    };
    let serving = futures::future::join(accepting, admin);
    tokio::pin!(serving, shutdown);
    readiness.set_accepting(true);
    tokio::select! {
        _ = &mut serving => {
            // Accept loops only end on shutdown; reaching here means the signal was
            // dropped. Treat it as a shutdown that has already drained.
            readiness.set_accepting(false);
            return;
        }
        () = &mut shutdown => {}
    }
    tracing::info!(
        grace_ms = limits.shutdown_grace_ms,
        "shutdown: no longer accepting, draining connections"
    );
    readiness.set_accepting(false);
    trigger.fire();
    // Each listener bounds its own drain by the grace period and then aborts what is
    // left; this outer bound is a backstop.
    let backstop =
        Duration::from_millis(limits.shutdown_grace_ms + 2 * limits::CLOSE_FLUSH_TIMEOUT_MS);
    if tokio::time::timeout(backstop, serving).await.is_err() {
        tracing::warn!("shutdown: drain backstop reached");
    }
    tracing::info!("shutdown: done");
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            key: key.to_string(),
            addr,
            source,
        })
}
