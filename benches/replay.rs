//! Policy what-if replay (issue 22): a journal of 1M requests (sales, refunds, voids and
//! reversals over 100 merchants; about 13 % declined, by the single cap, the day cap, the
//! remainder or a void's amount) replayed by the release binary, `refundgate replay --json`,
//! under a merchant file whose single refund cap changed. Target: < 10 s on this machine.
//! A replay under the journal's own policy runs first and must change no answer.
//!
//! Printed beside it, measured in the same run: plain recovery of the same journal (read +
//! decode + `Ledger::apply` of every record), the floor replay cannot go below, and the ratio.
//!
//! `cargo bench --bench replay` (REPLAY_REQUESTS=N for another size; 3 runs, medians).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These benches measure real elapsed time; the product reads `clock::monotonic()`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use refundgate::journal::{self, Durability, Journal};
use refundgate::ledger::{
    CardType, Dialect, Ledger, LedgerEvent, Logged, MerchantSet, Operation, OriginalRef, PanKey,
    Request,
};

const NOW: i64 = 1_769_871_600; // 2026-01-31T15:00:00Z
const MERCHANTS: usize = 100;
const PAN: &str = "4761739001010119";

fn merchants_toml(single: u64) -> String {
    let mut s = format!(
        "[profiles.p]\nrefund_single_max = {single}\nrefund_day_amount_max = 60000000\n\
         refund_month_amount_max = 100000000000\nrefund_day_count_max = 1000000\n\
         refund_month_count_max = 10000000\nreserve = 100000000000\ncurrency = 840\n\
         utc_offset = \"+00:00\"\n"
    );
    for m in 0..MERCHANTS {
        let _ = write!(
            s,
            "[[merchants]]\nid = \"M{m:014}\"\nprofile = \"p\"\nterminals = [{{ id = \"T1\" }}]\n"
        );
    }
    s
}

/// DE7 MMDDhhmmss of `t` (2026-01-31 only: the run stays within the day).
fn de7(t: i64) -> u64 {
    let s = t.rem_euclid(86_400);
    131_000_000 + (s / 3600 * 10_000 + s % 3600 / 60 * 100 + s % 60) as u64
}

/// Journals `n` requests decided on the base policy into `dir`.
fn build(dir: &Path, set: &MerchantSet, n: u64) -> u64 {
    let options = journal::Options {
        durability: Durability::UnsafeNoFsync,
        segment_bytes: 256 << 20,
        ..journal::Options::default()
    };
    let (journal, _) = Journal::open(dir, options).unwrap();
    let ledger = Ledger::new(set, PanKey::new(&[7; 16]));
    let ids: Vec<String> = set.merchants.iter().map(|m| m.id.clone()).collect();
    let mut last = None;
    let mut approved = 0;
    for i in 0..n {
        let m = (i % MERCHANTS as u64) as usize;
        let j = i / MERCHANTS as u64; // per-merchant request number
        let now = NOW + (i / 1000) as i64;
        let stan = (j % 999_999 + 1) as u32;
        // Per merchant, groups of 10: 5 sales, 3 refunds, a void, a reversal.
        let k = j % 10;
        let base = j - k;
        let sale_of = |x: u64| (x % 999_999 + 1) as u32;
        let sale_amount = |x: u64| 1000 + (x * 37 % 9000);
        let (op, amount, original) = match k {
            0..=4 => (Operation::Sale, sale_amount(base + k), None),
            5..=7 => (Operation::Refund, 1 + (j * 53 % 8000), Some(base + (k - 5))),
            8 => (Operation::Void, sale_amount(base + 3), Some(base + 3)),
            _ => (Operation::Reversal, sale_amount(base + 4), Some(base + 4)),
        };
        let t = de7(now);
        let req = Request {
            dialect: Dialect::Ascii1987,
            op,
            repeat: false,
            merchant: &ids[m],
            terminal: "T1",
            stan,
            local_date_mmdd: 131,
            mti_class: if op == Operation::Reversal { 4 } else { 2 },
            transmission: Some(t),
            rrn: None,
            batch: None,
            pan: PAN,
            amount_minor: amount,
            currency: 840,
            card_type: CardType::Visa,
            original: original.map(|x| OriginalRef::Iso {
                mti: 200,
                stan: sale_of(x),
                // Sales of a group are decided within the same second or the one before.
                transmission: de7(NOW + ((x * MERCHANTS as u64 + m as u64) / 1000) as i64),
                rrn: None,
            }),
            body_fingerprint: i,
        };
        let logged = ledger.decide_logged(&req, now, |e: &LedgerEvent| {
            let mut payload = Vec::with_capacity(128);
            e.encode(&mut payload);
            let ticket = journal.enqueue(payload)?;
            last = Some(ticket);
            Ok::<u64, journal::StoreError>(ticket.seq)
        });
        if matches!(&logged, Logged::Applied { decision, .. } if decision.is_approved()) {
            approved += 1;
        }
        if i % 4096 == 4095 {
            if let Some(t) = last {
                futures::executor::block_on(journal.durable(t)).unwrap();
            }
        }
    }
    if let Some(t) = last {
        futures::executor::block_on(journal.durable(t)).unwrap();
    }
    approved
}

/// Plain recovery: every record read, decoded and applied.
fn recover(dir: &Path, set: &MerchantSet) -> u64 {
    let view = journal::ReadOnly::open(dir).unwrap();
    let ledger = Ledger::new(set, PanKey::new(&[0; 16]));
    view.records(0, |_, payload| {
        let event = LedgerEvent::decode(payload).unwrap();
        let _ = ledger.apply(&event);
    })
    .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: build only then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u64 = std::env::var("REPLAY_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let base_path = tmp.path().join("base.toml");
    let what_if_path = tmp.path().join("what-if.toml");
    std::fs::write(&base_path, merchants_toml(6000)).unwrap();
    std::fs::write(&what_if_path, merchants_toml(7000)).unwrap();
    let set = MerchantSet::from_toml_str(&merchants_toml(6000)).unwrap();
    let t = Instant::now();
    let approved = build(&dir, &set, n);
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "journal: {n} requests ({approved} approved), {} MiB of segments, built in {:.1} s",
        bytes >> 20,
        t.elapsed().as_secs_f64()
    );
    let same = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .arg("replay")
        .arg("--journal")
        .arg(&dir)
        .arg("--base")
        .arg(&base_path)
        .arg("--json")
        .output()
        .unwrap();
    let same: serde_json::Value = serde_json::from_slice(&same.stdout).unwrap();
    assert_eq!(same["requests"], n, "{}", same["totals"]);
    assert_eq!(
        same["changes"].as_array().map(Vec::len),
        Some(0),
        "the journal's own policy changed answers: {}",
        same["transitions"]
    );
    println!(
        "same policy: {} requests decided again, 0 changed",
        same["requests"]
    );
    let mut replays = Vec::new();
    let mut recoveries = Vec::new();
    let mut summary = String::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_refundgate"))
            .arg("replay")
            .arg("--journal")
            .arg(&dir)
            .arg("--base")
            .arg(&base_path)
            .arg("--merchants")
            .arg(&what_if_path)
            .arg("--json")
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        replays.push(t.elapsed());
        assert!(out.status.success());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        summary = format!(
            "{} requests decided again, {} answers changed",
            report["requests"],
            report["changes"].as_array().map_or(0, Vec::len)
        );
        let t = Instant::now();
        let records = recover(&dir, &set);
        recoveries.push(t.elapsed());
        assert!(records >= n - n / 10);
    }
    let (replay, recovery) = (median(replays), median(recoveries));
    println!("what-if replay (release binary, --json, single cap 6000 → 7000): {summary}");
    println!(
        "replay {:.2} s (target < 10 s: {}), plain recovery {:.2} s, ratio {:.2}",
        replay.as_secs_f64(),
        if replay < Duration::from_secs(10) {
            "met"
        } else {
            "missed"
        },
        recovery.as_secs_f64(),
        replay.as_secs_f64() / recovery.as_secs_f64()
    );
}
