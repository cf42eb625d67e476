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

use rustls_pki_types::CertificateDer;
use serde_json::{json, Value as Json};

use common::client::{ask, de54_amount, repeat, Answer, Client};
use common::{ascii_request, de90, race, spawn_serve, ServeProcess};

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
    let cert = common::write_tls_pair(dir.path());
    std::fs::write(dir.path().join("merchants.toml"), MERCHANTS).unwrap();
    common::write_one_listener_config(dir.path());
    Setup { dir, cert }
}

/// The real binary on port 0; killed (SIGKILL) when dropped.
fn start(setup: &Setup) -> ServeProcess {
    spawn_serve(&setup.dir.path().join("refundgate.toml"), 1)
}

async fn connect(setup: &Setup, gateway: &ServeProcess) -> Client {
    common::client::connect(&setup.cert, gateway.listeners[0]).await
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
                race(&mut x, &a, &mut y, &b).await
            } else {
                let (rb, ra) = race(&mut x, &b, &mut y, &a).await;
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
