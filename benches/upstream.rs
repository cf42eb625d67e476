//! Upstream hop bench (custom harness, prints three lines): decisions per second and the
//! terminals' p50 / p99 round trip for sales decided locally against sales forwarded through
//! one multiplexed link to the in-process host simulator (zero latency), same gateway, journal
//! without fsync to isolate the hop.
//!
//! `cargo bench --bench upstream`. Environment: `UPSTREAM_BENCH_CLIENTS` (16),
//! `UPSTREAM_BENCH_PER_CLIENT` (2000 sequential sales per terminal connection).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These benches measure real elapsed time; the product reads `clock::monotonic()`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::host_sim::{pem_of, Faults, Host, HostListener, HostOptions};
use refundgate::iso8583::{self, json};
use refundgate::serve::{self, ServeArgs};
use refundgate::server::{ListenerInfo, Server};
use rustls::crypto::ring;
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

#[path = "../tests/common/mod.rs"]
mod common;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Client = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

async fn terminal(info: &ListenerInfo) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(info.cert_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(info.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    Framed::new(tls, FrameCodec::new(Framing::Binary2, false, 8192))
}

/// `clients` terminals, each sending `per_client` sales one after the other; returns
/// decisions per second and the p50 / p99 round trip seen by the terminals.
async fn load(
    info: &Arc<ListenerInfo>,
    (merchant, terminal_id): (&'static str, &'static str),
    stan_base: u32,
    clients: u32,
    per_client: u32,
) -> (f64, Duration, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let info = Arc::clone(info);
        tasks.push(tokio::spawn(async move {
            let bodies: Vec<Bytes> = (0..per_client)
                .map(|i| {
                    let stan = stan_base + k * per_client + i + 1;
                    let mut m = common::ascii_request("0200", "000000", 100, stan, &[]);
                    m["fields"]["42"] = json!(merchant);
                    m["fields"]["41"] = json!(terminal_id);
                    let mut out = BytesMut::new();
                    json::from_json(&iso8583::ASCII1987, &m, &mut out).unwrap();
                    out.freeze()
                })
                .collect();
            let mut c = terminal(&info).await;
            let mut rtts = Vec::with_capacity(bodies.len());
            for body in bodies {
                let t0 = Instant::now();
                c.send(Frame::Message {
                    tpdu: None,
                    header: None,
                    body,
                })
                .await
                .unwrap();
                let Some(Ok(Frame::Message { body, .. })) = c.next().await else {
                    panic!("no answer");
                };
                rtts.push(t0.elapsed());
                let m = iso8583::decode(&iso8583::ASCII1987, &body).unwrap();
                assert_eq!(m.response_code(), Some("00"), "every sale approved");
            }
            rtts
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort();
    let pct = |p: usize| all[(all.len() * p / 100).min(all.len() - 1)];
    (all.len() as f64 / wall.as_secs_f64(), pct(50), pct(99))
}

fn config_toml(dir: &std::path::Path, host: SocketAddr, ca: &std::path::Path) -> String {
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"
[journal]
dir = "{}"
durability = "unsafe_no_fsync"
[log]
filter = "warn"
[[listeners]]
addr = "127.0.0.1:0"
dialect = "ascii1987"
[[upstreams]]
name = "bank"
addrs = ["{host}"]
dialect = "ascii1987"
timeout_ms = 5000
max_pending = 1024
tls = {{ ca = "{}" }}
[routes]
merchants = {{ "MERCHANT 000001" = "bank" }}
"#,
        dir.join("journal").display(),
        ca.display()
    )
}

fn main() {
    let clients: u32 = env_or("UPSTREAM_BENCH_CLIENTS", 16);
    let per_client: u32 = env_or("UPSTREAM_BENCH_PER_CLIENT", 2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::bind(HostOptions {
            listeners: vec![HostListener {
                addr: "127.0.0.1:0".parse().unwrap(),
                dialect: &refundgate::dialect::ASCII1987,
                framing: Framing::Binary2,
            }],
            admin: None,
            faults: Faults::default(),
        })
        .await
        .unwrap();
        let host_addr = host.listeners()[0].addr;
        let control = host.control();
        let ca = dir.path().join("host-ca.pem");
        std::fs::write(&ca, pem_of(&host.cert_der())).unwrap();
        tokio::spawn(host.run(futures::future::pending()));
        let path = dir.path().join("refundgate.toml");
        std::fs::write(&path, config_toml(dir.path(), host_addr, &ca)).unwrap();
        let prepared = serve::prepare(&ServeArgs {
            config: Some(path),
            merchants: None,
            journal_dir: None,
        })
        .map_err(|e| e.message)
        .unwrap();
        let server = Server::bind(prepared.config).await.unwrap();
        let info = Arc::clone(&server.listeners()[0]);
        let upstreams = Arc::new(prepared.upstreams.unwrap().start());
        let gateway = Arc::new(prepared.gateway.with_upstreams(Arc::clone(&upstreams)));
        tokio::spawn(server.run(gateway, futures::future::pending()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !upstreams.link("bank").is_some_and(|l| l.is_up()) {
            assert!(Instant::now() < deadline, "link never came up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let local_ids = ("MERCHANT 000002", "TERM0101");
        let forwarded_ids = ("MERCHANT 000001", "TERM0001");
        // Warm up both paths (TLS sessions, allocations).
        load(&info, local_ids, 900_000, 4, 200).await;
        let local = load(&info, local_ids, 0, clients, per_client).await;
        let forwarded = load(&info, forwarded_ids, 0, clients, per_client).await;
        println!(
            "local:     {:.0} decisions/s, p50 {:?}, p99 {:?}",
            local.0, local.1, local.2
        );
        println!(
            "forwarded: {:.0} decisions/s, p50 {:?}, p99 {:?} (one link, zero-latency host)",
            forwarded.0, forwarded.1, forwarded.2
        );
        println!(
            "forwarded / local: {:.2}; added by the hop: p50 {:?}, p99 {:?}",
            forwarded.0 / local.0,
            forwarded.1.saturating_sub(local.1),
            forwarded.2.saturating_sub(local.2)
        );
        assert_eq!(
            control.stats().approved,
            u64::from(clients * per_client),
            "every forwarded sale reached the host"
        );
        upstreams.shutdown().await;
    });
}
