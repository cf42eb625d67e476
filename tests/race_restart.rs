//! Conflicting requests raced on two TLS connections, then kill -9 and restart (DOMAIN §6,
//! §7): every request repeated after the restart gets exactly the answer the terminal was
//! given before it, and the merchant's remaining allowance (DE54 type 91) is what the
//! acknowledged answers imply.
//!
//! Pairs raced per sale: refund vs reversal of the sale, two refunds whose sum exceeds the
//! remainder, void vs refund. Before the fix, decisions were applied in wake-up order but
//! replayed in journal order, and declines were not journaled: some 00 became 22 and some 22
//! became 00 after the restart.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

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

use common::{ascii_request, de90, spawn_serve, ServeProcess, SERVE_LOG_TOML};

/// Day cap 10,000,000.00: high enough that the pairs never hit it, so the allowance left is
/// the cap less the refunds acknowledged.
const DAY_CAP: u64 = 1_000_000_000;

const MERCHANTS: &str = r#"
[profiles.race]
refund_window_days = 180
refund_single_max = 100000000
refund_day_amount_max = 1000000000
refund_month_amount_max = 100000000000
refund_day_count_max = 1000000
refund_month_count_max = 1000000
refundable_share_percent = 100
same_day_refund = "allow"

[[merchants]]
id = "MERCHANT 000001"
profile = "race"
currency = 840
reserve = 100000000000
utc_offset = "+00:00"
terminals = [{ id = "TERM0001" }]
"#;

struct Setup {
    dir: tempfile::TempDir,
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
    let d = dir.path().display();
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
    std::fs::write(dir.path().join("refundgate.toml"), config).unwrap();
    Setup {
        dir,
        cert: cert.der().clone(),
    }
}

/// The real binary on port 0; killed (SIGKILL) when dropped.
fn start(setup: &Setup) -> ServeProcess {
    spawn_serve(&setup.dir.path().join("refundgate.toml"), 1)
}

type Client = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

async fn connect(setup: &Setup, gateway: &ServeProcess) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gateway.listeners[0]).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    Framed::new(tls, FrameCodec::new(Framing::Binary2, false, 8192))
}

/// What a terminal sees of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    code: String,
    reason: String,
    rrn: Option<String>,
    de54: Option<String>,
}

async fn send(c: &mut Client, doc: &Json) {
    let mut out = BytesMut::new();
    json::from_json(&iso8583::ASCII1987, doc, &mut out).unwrap();
    c.send(Frame::Message {
        tpdu: None,
        header: None,
        body: Bytes::from(out.to_vec()),
    })
    .await
    .unwrap();
}

async fn receive(c: &mut Client) -> Answer {
    match tokio::time::timeout(Duration::from_secs(30), c.next()).await {
        Ok(Some(Ok(Frame::Message { body, .. }))) => {
            let m = iso8583::decode(&iso8583::ASCII1987, &body).unwrap();
            Answer {
                code: m.response_code().unwrap_or("").to_string(),
                reason: m.text(44).unwrap_or("").to_string(),
                rrn: m.rrn().map(str::to_string),
                de54: m.text(54).map(str::to_string),
            }
        }
        other => panic!("no answer: {other:?}"),
    }
}

async fn ask(c: &mut Client, doc: &Json) -> Answer {
    send(c, doc).await;
    receive(c).await
}

/// Sends `a` on one connection and `b` on the other at the same instant.
async fn race(x: &mut Client, y: &mut Client, a: &Json, b: &Json) -> (Answer, Answer) {
    send(x, a).await;
    send(y, b).await;
    tokio::join!(receive(x), receive(y))
}

fn repeat(doc: &Json) -> Json {
    let mut d = doc.clone();
    let mti = d["mti"].as_str().unwrap().to_string();
    d["mti"] = json!(format!("{}1", &mti[..3]));
    d
}

/// The amount of DE54 block `kind` (e.g. "91").
fn de54_amount(de54: &str, kind: &str) -> Option<u64> {
    de54.as_bytes()
        .chunks(20)
        .filter_map(|b| std::str::from_utf8(b).ok())
        .find(|b| b.len() == 20 && &b[2..4] == kind)
        .and_then(|b| b[8..].parse().ok())
}

#[test]
fn raced_conflicts_keep_their_answers_across_kill_9() {
    let setup = setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pairs: u32 = std::env::var("REFUNDGATE_RACE_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let child = start(&setup);
    let (sent, refunded) = rt.block_on(async {
        let mut x = connect(&setup, &child).await;
        let mut y = connect(&setup, &child).await;
        let mut stan = 1u32;
        let mut next_stan = || {
            stan += 1;
            stan
        };
        let mut sent: Vec<(Json, Answer)> = Vec::new();
        let mut refunded = 0u64;
        for i in 0..pairs {
            let amount = 10_000 + u64::from(i);
            let sale = ascii_request("0200", "000000", amount, next_stan(), &[]);
            let sa = ask(&mut x, &sale).await;
            assert_eq!(sa.code, "00", "sale {sale}");
            let rrn = sa.rrn.clone().unwrap();
            let original = [("37", rrn.clone()), ("90", de90(&sale))];
            let (a, b) = match i % 3 {
                0 => {
                    let refund = ascii_request("0200", "200000", amount, next_stan(), &original);
                    let mut reversal = sale.clone();
                    reversal["mti"] = json!("0400");
                    reversal["fields"]["11"] = json!(format!("{:06}", next_stan()));
                    reversal["fields"]["90"] = json!(de90(&sale));
                    (refund, reversal)
                }
                1 => {
                    let part = amount * 6 / 10;
                    let r1 = ascii_request("0200", "200000", part, next_stan(), &original);
                    let r2 = ascii_request("0200", "200000", part, next_stan(), &original);
                    (r1, r2)
                }
                _ => {
                    let void = ascii_request("0200", "020000", amount, next_stan(), &original);
                    let refund = ascii_request("0200", "200000", amount, next_stan(), &original);
                    (void, refund)
                }
            };
            let (ra, rb) = if i % 2 == 0 {
                race(&mut x, &mut y, &a, &b).await
            } else {
                let (rb, ra) = race(&mut x, &mut y, &b, &a).await;
                (ra, rb)
            };
            for (doc, ans) in [(&a, &ra), (&b, &rb)] {
                if ans.code == "00" && doc["fields"]["3"] == "200000" && doc["mti"] == "0200" {
                    refunded += doc["fields"]["4"].as_str().unwrap().parse::<u64>().unwrap();
                }
            }
            sent.push((sale, sa));
            sent.push((a, ra));
            sent.push((b, rb));
        }
        (sent, refunded)
    });
    drop(child); // kill -9 right after the last answer
    let child = start(&setup);
    rt.block_on(async {
        let mut c = connect(&setup, &child).await;
        let mut changed = Vec::new();
        for (doc, before) in &sent {
            let after = ask(&mut c, &repeat(doc)).await;
            if after.code != before.code || after.reason != before.reason {
                changed.push(format!(
                    "{} {} {}: {} {} before the restart, {} {} after",
                    doc["mti"],
                    doc["fields"]["3"],
                    doc["fields"]["11"],
                    before.code,
                    before.reason,
                    after.code,
                    after.reason
                ));
            }
        }
        assert!(
            changed.is_empty(),
            "{} of {} answers changed by kill -9 + restart:\n{}",
            changed.len(),
            sent.len(),
            changed.join("\n")
        );
        // A probe refund of 1 on a fresh sale: the allowance left today is the cap less
        // every refund acknowledged before the crash, less the probe.
        let sale = ascii_request("0200", "000000", 5_000, 900_001, &[]);
        let sa = ask(&mut c, &sale).await;
        assert_eq!(sa.code, "00");
        let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
        let probe = ascii_request("0200", "200000", 1, 900_002, &original);
        let pa = ask(&mut c, &probe).await;
        assert_eq!(pa.code, "00", "probe {pa:?}");
        let left = de54_amount(pa.de54.as_deref().unwrap_or(""), "91");
        assert_eq!(
            left,
            Some(DAY_CAP - refunded - 1),
            "allowance after the restart (DE54 {:?}) must be the cap less the acknowledged refunds",
            pa.de54
        );
    });
    drop(child);
}
