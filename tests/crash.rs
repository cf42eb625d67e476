//! Crash test (DOMAIN §7): the real `refundgate serve` binary with a journal in a temporary
//! directory is driven over TLS with concurrent sales, refunds and reversals, killed with
//! SIGKILL at random moments and restarted. After every restart: every approval the client
//! received is still there (its identical retransmission gets the stored 00, a sale's with
//! the same RRN), no original's remainder went past what was acknowledged, and reversed
//! sales stay reversed.
//!
//! `REFUNDGATE_CRASH_CYCLES` sets the number of kill/restart cycles (default 20).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::iso8583::{self, json};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value as Json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

const MERCHANTS: &str = r#"
[profiles.wide]
refund_window_days = 180
refund_single_max = 100000000
refund_day_amount_max = 100000000000
refund_month_amount_max = 100000000000
refund_day_count_max = 1000000
refund_month_count_max = 1000000
refundable_share_percent = 100
same_day_refund = "allow"

[[merchants]]
id = "MERCHANT 000001"
profile = "wide"
currency = 840
reserve = 100000000
utc_offset = "+00:00"
terminals = [{ id = "TERM0001" }]
"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    listener: SocketAddr,
    admin: SocketAddr,
    cert: CertificateDer<'static>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("merchants.toml"), MERCHANTS).unwrap();
    let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = dir.path().display();
    let config = format!(
        r#"merchants = "{d}/merchants.toml"
[admin]
addr = "{admin}"
[journal]
dir = "{d}/journal"
durability = "fdatasync"
snapshot_every_records = 300
[log]
filter = "warn"
[[listeners]]
addr = "{listener}"
dialect = "ascii1987"
framing = "binary2"
tls = {{ cert = "{d}/server.pem", key = "{d}/server.key" }}
"#
    );
    std::fs::write(dir.path().join("refundgate.toml"), config).unwrap();
    Setup {
        dir,
        listener,
        admin,
        cert: cert.der().clone(),
    }
}

fn start(setup: &Setup) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["serve", "--config"])
        .arg(setup.dir.path().join("refundgate.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ready(setup.admin) {
            return Gateway(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("gateway did not become ready");
}

fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = StdTcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

type Client = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

async fn connect(setup: &Setup) -> Option<Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(setup.listener).await.ok()?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    Some(Framed::new(
        tls,
        FrameCodec::new(Framing::Binary2, false, 8192),
    ))
}

/// Sends one request; `None` when the connection broke before an answer.
async fn ask(c: &mut Client, doc: &Json) -> Option<(String, Option<String>)> {
    let mut out = BytesMut::new();
    json::from_json(&iso8583::ASCII1987, doc, &mut out).unwrap();
    let frame = Frame::Message {
        tpdu: None,
        header: None,
        body: Bytes::from(out.to_vec()),
    };
    c.send(frame).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
        Ok(Some(Ok(Frame::Message { body, .. }))) => {
            let m = iso8583::decode(&iso8583::ASCII1987, &body).unwrap();
            Some((
                m.response_code().unwrap_or("").to_string(),
                m.rrn().map(str::to_string),
            ))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Default)]
struct Sale {
    doc: Json,
    amount: u64,
    rrn: String,
    /// Sum of refunds answered 00.
    refunded_acked: u64,
    /// A refund or reversal of it was sent without an answer: its state is uncertain.
    uncertain: bool,
    reversed_acked: bool,
}

#[derive(Default)]
struct Model {
    sales: Vec<Sale>,
    /// Every request answered 00, with the RRN of the answer.
    approved: Vec<(Json, Option<String>)>,
}

static STAN: AtomicU32 = AtomicU32::new(1);

fn request(mti: &str, pc: &str, amount: u64, extra: &[(&str, String)]) -> Json {
    let stan = STAN.fetch_add(1, Ordering::Relaxed);
    let mut fields = json!({
        "2": "4761739001010119", "3": pc, "4": format!("{amount:012}"), "7": format!("1125{:06}", stan % 240_000),
        "11": format!("{stan:06}"), "12": "120000", "13": "1125", "22": "051", "25": "00",
        "41": "TERM0001", "42": "MERCHANT 000001", "49": "840"
    });
    for (k, v) in extra {
        fields[*k] = Json::String(v.clone());
    }
    json!({ "mti": mti, "fields": fields })
}

fn de90(sale: &Json) -> String {
    let f = &sale["fields"];
    format!(
        "0200{}{}{:022}",
        f["11"].as_str().unwrap(),
        f["7"].as_str().unwrap(),
        0
    )
}

/// One terminal-like connection: sales, partial refunds, sale reversals, until the server dies.
async fn drive(setup: Arc<Setup>, model: Arc<Mutex<Model>>, seed: u64) {
    let Some(mut c) = connect(&setup).await else {
        return;
    };
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    loop {
        let pick = next(10);
        let target = {
            let m = model.lock().unwrap();
            let live: Vec<usize> = (0..m.sales.len())
                .filter(|&i| !m.sales[i].uncertain && !m.sales[i].reversed_acked)
                .collect();
            (!live.is_empty()).then(|| live[next(live.len() as u64) as usize])
        };
        let (doc, sale_idx, kind) = match (pick, target) {
            (0..=4, _) | (_, None) => (request("0200", "000000", 1000 + next(9000), &[]), None, 0),
            (5..=8, Some(i)) => {
                let m = model.lock().unwrap();
                let s = &m.sales[i];
                let amount = 1 + next((s.amount - s.refunded_acked).max(1) + 500);
                (
                    request(
                        "0200",
                        "200000",
                        amount,
                        &[("37", s.rrn.clone()), ("90", de90(&s.doc))],
                    ),
                    Some(i),
                    1,
                )
            }
            (_, Some(i)) => {
                let m = model.lock().unwrap();
                let s = &m.sales[i];
                let mut d = s.doc.clone();
                d["mti"] = json!("0400");
                d["fields"]["90"] = json!(de90(&s.doc));
                (d, Some(i), 2)
            }
        };
        if let Some(i) = sale_idx {
            model.lock().unwrap().sales[i].uncertain = true;
        }
        let answer = ask(&mut c, &doc).await;
        let mut m = model.lock().unwrap();
        let Some((code, rrn)) = answer else {
            return; // killed: whatever was in flight stays uncertain
        };
        if code == "00" {
            m.approved.push((doc.clone(), rrn.clone()));
        }
        match (kind, sale_idx) {
            (0, _) if code == "00" => {
                let amount = doc["fields"]["4"].as_str().unwrap().parse().unwrap();
                m.sales.push(Sale {
                    doc,
                    amount,
                    rrn: rrn.unwrap_or_default(),
                    ..Sale::default()
                });
            }
            (1, Some(i)) => {
                let s = &mut m.sales[i];
                if code == "00" {
                    s.refunded_acked +=
                        doc["fields"]["4"].as_str().unwrap().parse::<u64>().unwrap();
                    assert!(
                        s.refunded_acked <= s.amount,
                        "refunds approved past the sale amount"
                    );
                }
                s.uncertain = false;
            }
            (2, Some(i)) => {
                let s = &mut m.sales[i];
                s.reversed_acked = code == "00";
                s.uncertain = code != "00";
            }
            _ => {}
        }
    }
}

/// After a restart: every acknowledged approval is remembered, remainders hold.
async fn verify(setup: &Setup, model: &Mutex<Model>, cycle: usize) {
    let mut c = connect(setup).await.expect("connect after restart");
    let (approved, sales) = {
        let m = model.lock().unwrap();
        (m.approved.clone(), m.sales.clone())
    };
    // Identical retransmissions of the approvals (all of them on the first and last cycles,
    // a recent window otherwise to keep the test bounded).
    let from = if cycle % 10 == 0 {
        0
    } else {
        approved.len().saturating_sub(400)
    };
    for (doc, _) in &approved[from..] {
        // A different request reusing the key of a remembered approval gets 94; a forgotten
        // one would be decided anew. This probe moves nothing.
        let mut probe = doc.clone();
        let amount: u64 = doc["fields"]["4"].as_str().unwrap().parse().unwrap();
        probe["fields"]["4"] = json!(format!("{:012}", amount + 1));
        let (code, _) = ask(&mut c, &probe).await.expect("answer");
        assert_eq!(
            code, "94",
            "acknowledged approval forgotten after kill -9: {doc}"
        );
    }
    for (doc, rrn) in &approved[from..] {
        let (code, got_rrn) = ask(&mut c, doc).await.expect("answer");
        assert_eq!(
            code, "00",
            "acknowledged approval lost after kill -9: {doc}"
        );
        if doc["fields"]["3"] == "000000" && doc["mti"] == "0200" {
            assert_eq!(&got_rrn, rrn, "a repeated sale must get its original RRN");
        }
    }
    for s in sales.iter().filter(|s| !s.uncertain).rev().take(40) {
        if s.reversed_acked {
            let d = request(
                "0200",
                "200000",
                1,
                &[("37", s.rrn.clone()), ("90", de90(&s.doc))],
            );
            let (code, _) = ask(&mut c, &d).await.expect("answer");
            assert_ne!(code, "00", "a refund of a reversed sale was approved");
            continue;
        }
        let over = s.amount - s.refunded_acked + 1;
        let d = request(
            "0200",
            "200000",
            over,
            &[("37", s.rrn.clone()), ("90", de90(&s.doc))],
        );
        let (code, _) = ask(&mut c, &d).await.expect("answer");
        assert_ne!(
            code, "00",
            "refund past the acknowledged remainder approved"
        );
    }
}

/// The running binary; killed (SIGKILL) when dropped, so a failing test leaves no process.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill(child: Gateway) {
    drop(child); // SIGKILL
}

#[test]
fn acknowledged_approvals_survive_kill_9_and_limits_hold() {
    let cycles: usize = std::env::var("REFUNDGATE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let setup = Arc::new(setup());
    let model = Arc::new(Mutex::new(Model::default()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    for cycle in 0..cycles {
        let child = start(&setup);
        if cycle > 0 {
            rt.block_on(verify(&setup, &model, cycle));
        }
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let run_ms = 150 + seed % 450;
        let drivers: Vec<_> = (0..8)
            .map(|i| {
                rt.spawn(drive(
                    Arc::clone(&setup),
                    Arc::clone(&model),
                    seed ^ ((i + 1) * 0x2545_f491),
                ))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(run_ms));
        kill(child);
        for d in drivers {
            let _ = rt.block_on(d);
        }
    }
    let child = start(&setup);
    rt.block_on(verify(&setup, &model, 0));
    kill(child);
    let snapshots = std::fs::read_dir(setup.dir.path().join("journal"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .count();
    assert!(
        snapshots >= 1,
        "recoveries must have gone through snapshots + tail replay"
    );
    let m = model.lock().unwrap();
    let approved = m.approved.len();
    assert!(
        approved > cycles * 5,
        "too little traffic to mean anything: {approved}"
    );
    eprintln!(
        "crash test: {cycles} kill -9 cycles, {approved} approvals acknowledged, all recovered ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// The independent client (pyiso8583 + Python's ssl) talks to the real binary; skipped with a
/// printed reason when Python or pyiso8583 is absent (CI installs it, see `.ci/run`).
#[test]
fn an_independent_pyiso8583_client_gets_its_sale_and_refund_approved() {
    let python = std::env::var("REFUNDGATE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let setup = setup();
    std::fs::write(setup.dir.path().join("ca.pem"), pem(&setup.cert)).unwrap();
    let child = start(&setup);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/pyiso_client.py"
        ))
        .arg("127.0.0.1")
        .arg(setup.listener.port().to_string())
        .arg(setup.dir.path().join("ca.pem"))
        .output();
    kill(child);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: cannot run {python}: {e}");
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        eprintln!("SKIPPED: {python} has no pyiso8583 ({})", text.trim());
        return;
    }
    assert!(out.status.success(), "pyiso8583 client failed:\n{text}");
    assert!(text.contains("refund: 0210 00"), "{text}");
}

/// SIGTERM with requests in flight: every one of them is answered before the process exits.
#[test]
fn sigterm_answers_every_request_in_flight_before_exit() {
    let setup = Arc::new(setup());
    let mut child = start(&setup);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers = rt.block_on(async {
        let mut c = connect(&setup).await.unwrap();
        let docs: Vec<Json> = (0..8)
            .map(|_| request("0200", "000000", 1200, &[]))
            .collect();
        for d in &docs {
            let mut out = BytesMut::new();
            json::from_json(&iso8583::ASCII1987, d, &mut out).unwrap();
            c.feed(Frame::Message {
                tpdu: None,
                header: None,
                body: Bytes::from(out.to_vec()),
            })
            .await
            .unwrap();
        }
        c.flush().await.unwrap();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.0.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let mut codes = Vec::new();
        while let Ok(Some(Ok(Frame::Message { body, .. }))) =
            tokio::time::timeout(Duration::from_secs(10), c.next()).await
        {
            let m = iso8583::decode(&iso8583::ASCII1987, &body).unwrap();
            codes.push(m.response_code().unwrap_or("").to_string());
        }
        codes
    });
    let status = child.0.wait().unwrap();
    assert_eq!(answers, vec!["00"; 8], "every request in flight answered");
    assert!(status.success(), "graceful exit: {status:?}");
}

fn pem(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}
