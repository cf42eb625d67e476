//! Helpers shared by the behaviour tests that speak ascii1987 to a running gateway.
#![allow(dead_code, clippy::unwrap_used)]

pub mod client;
pub mod nats;
pub mod nats_cluster;

use refundgate::clock::{Clock, SystemClock};
use serde_json::{json, Value as Json};

/// MMDD of the UTC date at `unix_s` (civil-from-days, H. Hinnant).
pub fn mmdd(unix_s: i64) -> String {
    let z = unix_s.div_euclid(86_400) + 719_468;
    let doe = z - z.div_euclid(146_097) * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{m:02}{d:02}")
}

/// Today's DE13 (MMDD), DE12 (hhmmss) and DE7 (MMDDhhmmss), UTC.
pub fn now_de7() -> (String, String, String) {
    let secs = SystemClock.now_unix_s();
    let s = secs.rem_euclid(86_400);
    let hhmmss = format!("{:02}{:02}{:02}", s / 3600, s % 3600 / 60, s % 60);
    let mmdd = mmdd(secs);
    (mmdd.clone(), hhmmss.clone(), format!("{mmdd}{hhmmss}"))
}

/// An ascii1987 request of the sample merchant's terminal TERM0001 (card 4761…0119), with
/// `extra` elements set on top.
pub fn ascii_request(
    mti: &str,
    pc: &str,
    amount: u64,
    stan: u32,
    extra: &[(&str, String)],
) -> Json {
    let (mmdd, hhmmss, de7) = now_de7();
    let mut fields = json!({
        "2": "4761739001010119", "3": pc, "4": format!("{amount:012}"), "7": de7,
        "11": format!("{stan:06}"), "12": hhmmss, "13": mmdd, "22": "051", "25": "00",
        "41": "TERM0001", "42": "MERCHANT 000001", "49": "840"
    });
    for (k, v) in extra {
        fields[*k] = Json::String(v.clone());
    }
    json!({ "mti": mti, "fields": fields })
}

/// DE90 naming `sale` (a request built by [`ascii_request`]): 0200 + its STAN + its DE7 +
/// zero acquirer and forwarding ids.
pub fn de90(sale: &Json) -> String {
    let f = &sale["fields"];
    format!(
        "0200{}{}{:022}",
        f["11"].as_str().unwrap(),
        f["7"].as_str().unwrap(),
        0
    )
}

/// `refundgate serve` as a child process, with the addresses it bound (read back from its
/// JSON log lines, so its configuration can say port 0). Killed (SIGKILL) when dropped, so a
/// failing assert leaves no gateway running.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// The listeners' bound addresses, in configuration order.
    pub listeners: Vec<std::net::SocketAddr>,
    /// The admin socket's bound address.
    pub admin: std::net::SocketAddr,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `[log]` table `spawn_serve` needs in the configuration.
pub const SERVE_LOG_TOML: &str =
    "\n[log]\nformat = \"json\"\nfilter = \"warn,refundgate::server=info\"\n";

/// Writes `dir/refundgate.toml` for [`spawn_serve`]: the merchants of `dir/merchants.toml`, an
/// fdatasync journal in `dir/journal` (1 MiB segments), one ascii1987 listener (binary2
/// framing) with the TLS pair `dir/server.pem` / `dir/server.key`, ports chosen by the system.
pub fn write_one_listener_config(dir: &std::path::Path) {
    let d = dir.display();
    let config = format!(
        r#"merchants = "{d}/merchants.toml"
[admin]
addr = "127.0.0.1:0"
[journal]
dir = "{d}/journal"
durability = "fdatasync"
segment_bytes = 1048576
[[listeners]]
addr = "127.0.0.1:0"
dialect = "ascii1987"
framing = "binary2"
tls = {{ cert = "{d}/server.pem", key = "{d}/server.key" }}
{SERVE_LOG_TOML}"#
    );
    std::fs::write(dir.join("refundgate.toml"), config).unwrap();
}

/// Starts `refundgate serve --config config` and waits (up to 60 s) until it logged
/// `listeners` bound listener addresses and its admin address (bound right after: a
/// configuration may say port 0 for both, so no port chosen ahead can be taken meanwhile). (The first node of a fresh three-server NATS
/// cluster creates its streams before it listens: 1.5 to 11 s each in one run of
/// tests/cluster.rs, two tests at a time on two cores; 20 s was once too short.)
pub fn spawn_serve(config: &std::path::Path, listeners: usize) -> ServeProcess {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut listening = Vec::new();
    let mut admin = None;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Reads the log to its end, so the child never blocks on a full pipe.
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Json>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "listening" {
                let bound = v["fields"]["listener"]
                    .as_str()
                    .and_then(|l| l.split_once('@'));
                if let Some(addr) = bound.and_then(|(_, a)| a.parse().ok()) {
                    let _ = tx.send((false, addr));
                }
            }
            if v["fields"]["message"] == "admin http listening" {
                if let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()) {
                    let _ = tx.send((true, addr));
                }
            }
        }
    });
    while listening.len() < listeners || admin.is_none() {
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok((true, addr)) => admin = Some(addr),
            Ok((false, addr)) => listening.push(addr),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("refundgate serve did not log its listeners and admin address: {e}")
            }
        }
    }
    ServeProcess {
        child,
        listeners: listening,
        admin: admin.unwrap(),
    }
}

/// Writes what every gateway node of the several-node tests (`tests/cluster.rs`,
/// `tests/cluster_lease.rs`) shares into `dir`: a TLS pair for localhost (`server.pem`,
/// `server.key`), the merchants ([`nats_cluster::CLUSTER_MERCHANTS`] as `merchants.toml`) and
/// an empty `keys/` for the key files the nodes create. The certificate to trust.
pub fn write_cluster_gateway_files(
    dir: &std::path::Path,
) -> rustls_pki_types::CertificateDer<'static> {
    let cert = write_tls_pair(dir);
    std::fs::write(dir.join("merchants.toml"), nats_cluster::CLUSTER_MERCHANTS).unwrap();
    std::fs::create_dir(dir.join("keys")).unwrap();
    cert
}

/// Writes a TLS pair for localhost into `dir` (`server.pem`, `server.key`); the certificate
/// to trust.
pub fn write_tls_pair(dir: &std::path::Path) -> rustls_pki_types::CertificateDer<'static> {
    let (pem, key, cert) = client::localhost_cert();
    std::fs::write(dir.join("server.pem"), pem).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    cert
}

/// Sends `r1` on `a` and `r2` on `b` before reading either answer (a race over two
/// connections); both answers.
pub async fn race(
    a: &mut client::Client,
    r1: &Json,
    b: &mut client::Client,
    r2: &Json,
) -> (client::Answer, client::Answer) {
    client::send(a, r1).await;
    client::send(b, r2).await;
    tokio::join!(client::receive(a), client::receive(b))
}

/// [`race`], checking that exactly one of the two is approved (two refunds racing over two
/// nodes). Both answers.
pub async fn race_two(
    a: &mut client::Client,
    r1: &Json,
    b: &mut client::Client,
    r2: &Json,
) -> (client::Answer, client::Answer) {
    let (x, y) = race(a, r1, b, r2).await;
    assert_eq!(
        [&x, &y].iter().filter(|a| a.code == "00").count(),
        1,
        "{x:?} {y:?}"
    );
    (x, y)
}
