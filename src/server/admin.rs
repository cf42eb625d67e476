//! Admin HTTP (hyper 1, HTTP/1.1): `/metrics`, `/healthz`, `/readyz` open; the paths of its
//! [`AdminRoutes`] (the gateway's: `/v1/…`, the authenticated admin API, [`crate::admin`],
//! bearer token; the host simulator's: `/faults`, `/stats`); 404 otherwise.
//!
//! Plain HTTP meant for loopback or a private network. Bounded: at most
//! [`limits::ADMIN_CONNECTIONS_MAX`] connections, request headers within
//! [`limits::ADMIN_HEADER_READ_TIMEOUT_MS`], each connection closed after
//! `admin.connection_timeout_ms` whatever it is doing (a client that pipelines requests and
//! never reads the answers cannot keep a slot), and every connection is aborted on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::shutdown::Shutdown;
use super::Readiness;
use crate::admin::{self, AdminApi};
use crate::{limits, telemetry};

/// How often histogram buckets are folded (metrics-exporter-prometheus upkeep).
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Paths an admin server answers beyond `/metrics`, `/healthz` and `/readyz`.
pub(crate) trait AdminRoutes: Send + Sync + 'static {
    /// Whether `path` is one of these routes (asked before the built-in ones).
    fn serves(&self, path: &str) -> bool;

    /// The answer to a request for one of these routes (the body is read by the handler,
    /// bounded).
    fn call(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// The gateway's: `/v1/…`.
impl AdminRoutes for AdminApi {
    fn serves(&self, path: &str) -> bool {
        path.starts_with("/v1/")
    }

    fn call(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        call_api(self, req, peer)
    }
}

/// A bound admin socket and what it serves.
pub(crate) struct Site<R> {
    pub(crate) listener: TcpListener,
    /// Behind `/readyz`.
    pub(crate) readiness: Readiness,
    /// `None`: only the built-in paths.
    pub(crate) routes: Option<Arc<R>>,
    /// Longest one admin connection may stay open, whatever it does.
    pub(crate) connection_timeout: Duration,
}

/// Serves the admin endpoints until shutdown, then aborts open admin connections.
pub(crate) async fn serve<R: AdminRoutes>(site: Site<R>, mut shutdown: Shutdown) {
    let Site {
        listener,
        readiness,
        routes,
        connection_timeout,
    } = site;
    let slots = Arc::new(Semaphore::new(limits::ADMIN_CONNECTIONS_MAX));
    let mut tasks = JoinSet::new();
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.recv() => break,
            _ = upkeep.tick() => {
                if let Some(handle) = telemetry::metrics_handle() {
                    handle.run_upkeep();
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(limits::ACCEPT_BACKOFF_MAX_MS / 10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // Dropped: too many admin connections.
        };
        let readiness = readiness.clone();
        let routes = routes.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let readiness = readiness.clone();
                let routes = routes.clone();
                async move {
                    if let Some(routes) = routes.filter(|r| r.serves(req.uri().path())) {
                        return Ok::<_, Infallible>(routes.call(req, peer.ip()).await);
                    }
                    Ok::<_, Infallible>(respond(&req, &readiness))
                }
            });
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(limits::ADMIN_HEADER_READ_TIMEOUT_MS))
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(connection_timeout, serving).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "admin connection ended"),
                // Dropping the connection future closes the socket.
                Err(_) => tracing::debug!("admin connection closed at its deadline"),
            }
        });
    }
    tasks.shutdown().await;
}

fn respond(req: &Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => match telemetry::metrics_handle() {
            Some(handle) => {
                let mut response = Response::new(Full::new(Bytes::from(handle.render())));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder\n"),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Hands a `/v1/` request to the admin API: the body is read up to
/// [`admin::BODY_BYTES_MAX`] (413 beyond), headers that are not UTF-8 are left out.
async fn call_api(api: &AdminApi, req: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, admin::BODY_BYTES_MAX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                "{\"error\":\"body too large or unreadable\"}\n",
            )
        }
    };
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let reply = api
        .handle(parts.method.as_str(), target, &headers, &body, Some(peer))
        .await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json(status, reply.body);
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
