//! `refundgate replay` (issue 22, policy what-if replay) over the real binary: traffic built
//! from DOMAIN §5 rows through a running gateway, then replays of its live journal under
//! merchant files where exactly one knob changed. Each must flip exactly the decisions that
//! knob should flip, with the right old → new codes and reasons; the same policy flips
//! nothing; the live journal stays byte-identical.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value as Json};

use common::client::{ask, Client};
use common::{ascii_request, de90, spawn_serve};

const VISA: &str = "4761739001010119";

/// The base policy: single refund cap 50.00, day cap 90.00, share 100 %.
fn merchants(single: u64, day: u64, share: u8) -> String {
    format!(
        r#"
[profiles.p]
refund_window_days = 180
refund_single_max = {single}
refund_day_amount_max = {day}
refund_month_amount_max = 100000000
refund_day_count_max = 1000
refund_month_count_max = 10000
refundable_share_percent = {share}
same_day_refund = "allow"

[[merchants]]
id = "MERCHANT 000001"
profile = "p"
currency = 840
reserve = 100000000
utc_offset = "+00:00"
terminals = [{{ id = "TERM0001" }}]
"#
    )
}

const SINGLE: u64 = 5000;
const DAY: u64 = 9000;

fn replay(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .arg("replay")
        .arg("--journal")
        .arg(dir.join("journal"))
        .arg("--base")
        .arg(dir.join("merchants.toml"))
        .args(extra)
        .output()
        .unwrap()
}

/// `replay --json` with `what_if` (a merchant file's text, or none).
fn replay_json(dir: &Path, what_if: Option<&str>, extra: &[&str]) -> Json {
    let mut args: Vec<String> = vec!["--json".into()];
    if let Some(text) = what_if {
        let path = dir.join("what-if.toml");
        std::fs::write(&path, text).unwrap();
        args.push("--merchants".into());
        args.push(path.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = replay(dir, &args);
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The changes of a report as STAN → (old code, old reason, new code, new reason).
fn flips(report: &Json) -> BTreeMap<u32, (String, String, String, String)> {
    report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |v: &Json| v.as_str().unwrap().to_string();
            (
                s(&c["stan"]).parse().unwrap(),
                (
                    s(&c["old"]["code"]),
                    s(&c["old"]["reason"]),
                    s(&c["new"]["code"]),
                    s(&c["new"]["reason"]),
                ),
            )
        })
        .collect()
}

fn flip(old: (&str, &str), new: (&str, &str)) -> (String, String, String, String) {
    (old.0.into(), old.1.into(), new.0.into(), new.1.into())
}

/// Every file of the journal directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn setup() -> (tempfile::TempDir, rustls_pki_types::CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, der) = common::client::localhost_cert();
    std::fs::write(dir.path().join("server.pem"), cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), key_pem).unwrap();
    std::fs::write(
        dir.path().join("merchants.toml"),
        merchants(SINGLE, DAY, 100),
    )
    .unwrap();
    common::write_one_listener_config(dir.path());
    (dir, der)
}

/// A sale of `amount` at `stan`, answered 00; returns the request and its RRN.
async fn sale(c: &mut Client, stan: u32, amount: u64) -> (Json, String) {
    let s = ascii_request("0200", "000000", amount, stan, &[]);
    let a = ask(c, &s).await;
    assert_eq!(a.code, "00", "sale {stan}: {a:?}");
    (s, a.rrn.unwrap())
}

/// A refund (or with `pc` 020000 a void) of `sale`, with the answer it must get live.
async fn refund(
    c: &mut Client,
    pc: &str,
    of: &(Json, String),
    stan: u32,
    amount: u64,
    want: (&str, &str),
) {
    let original = [("37", of.1.clone()), ("90", de90(&of.0))];
    let r = ascii_request("0200", pc, amount, stan, &original);
    let a = ask(c, &r).await;
    assert_eq!((a.code.as_str(), a.reason.as_str()), want, "stan {stan}");
}

#[test]
fn replay_flips_exactly_the_decisions_one_changed_knob_should_flip_on_a_live_journal() {
    let (dir, cert) = setup();
    let d = dir.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gateway = spawn_serve(&d.join("refundgate.toml"), 1);
    let started = refundgate::clock::Clock::now_unix_s(&refundgate::clock::SystemClock);
    rt.block_on(async {
        let mut c = common::client::connect(&cert, gateway.listeners[0]).await;
        let mut sales = Vec::new();
        for i in 0..5 {
            sales.push(sale(&mut c, 1 + i, 10_000).await);
        }
        // Row 12 in order: the single cap, then the day amount; row 10 before both.
        refund(&mut c, "200000", &sales[0], 11, 3000, ("00", "APPROVED")).await;
        refund(
            &mut c,
            "200000",
            &sales[1],
            12,
            6000,
            ("61", "SINGLE_REFUND_CAP"),
        )
        .await;
        refund(&mut c, "200000", &sales[2], 13, 4000, ("00", "APPROVED")).await;
        refund(
            &mut c,
            "200000",
            &sales[3],
            14,
            4000,
            ("61", "MERCHANT_DAY_AMOUNT"),
        )
        .await;
        refund(&mut c, "200000", &sales[4], 15, 2000, ("00", "APPROVED")).await;
        refund(
            &mut c,
            "200000",
            &sales[0],
            16,
            12_000,
            ("64", "AMOUNT_EXCEEDS_REMAINING"),
        )
        .await;
        // A void and a reversal: no policy knob here touches them.
        let voided = sale(&mut c, 21, 7000).await;
        refund(&mut c, "020000", &voided, 22, 7000, ("00", "APPROVED")).await;
        let reversed = sale(&mut c, 31, 8000).await;
        let mut reversal = reversed.0.clone();
        reversal["mti"] = json!("0400");
        reversal["fields"]["11"] = json!("000032");
        reversal["fields"]["90"] = json!(de90(&reversed.0));
        assert_eq!(ask(&mut c, &reversal).await.code, "00");
    });
    let journal = d.join("journal");
    let before = files(&journal);

    // The same policy (the journal's own, and the base file given as what-if): nothing moves.
    for what_if in [None, Some(merchants(SINGLE, DAY, 100))] {
        let r = replay_json(d, what_if.as_deref(), &[]);
        assert_eq!(r["changes"], json!([]), "{r}");
        assert_eq!(r["requests"], 15, "{r}");
        assert_eq!(r["redecided"], 15, "{r}");
        assert_eq!(r["torn_tail"], false);
    }

    // Single cap 50.00 → 70.00: the 60.00 refund passes, and takes the day allowance the
    // next two approved refunds used (3000 + 6000 = the 9000 day cap).
    let single = replay_json(d, Some(&merchants(7000, DAY, 100)), &[]);
    let want: BTreeMap<_, _> = [
        (12, flip(("61", "SINGLE_REFUND_CAP"), ("00", "APPROVED"))),
        (13, flip(("00", "APPROVED"), ("61", "MERCHANT_DAY_AMOUNT"))),
        (15, flip(("00", "APPROVED"), ("61", "MERCHANT_DAY_AMOUNT"))),
    ]
    .into();
    assert_eq!(flips(&single), want, "{single}");
    let by_stan = |r: &Json, stan: &str| {
        r["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["stan"] == stan)
            .cloned()
            .unwrap()
    };
    let c12 = by_stan(&single, "000012");
    assert_eq!(
        c12["rule"],
        json!({"row": "12", "reason": "SINGLE_REFUND_CAP", "knob": "refund_single_max",
               "old_value": "5000", "new_value": "7000"})
    );
    assert_eq!(c12["pan"], "476173******0119");
    assert_eq!(c12["amount"], 6000);
    assert_eq!(c12["operation"], "refund");
    assert_eq!(c12["terminal"], "TERM0001");
    let c13 = by_stan(&single, "000013");
    assert_eq!(c13["rule"]["knob"], "refund_day_amount_max");
    assert_eq!(c13["rule"]["old_value"], c13["rule"]["new_value"]);
    assert_eq!(c13["new"]["figures"]["used"], 9000);
    let totals: BTreeMap<String, (u64, u64)> = single["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["reason"].as_str().unwrap().to_string(),
                (t["old"].as_u64().unwrap(), t["new"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(totals["SINGLE_REFUND_CAP"], (1, 0));
    assert_eq!(totals["MERCHANT_DAY_AMOUNT"], (1, 3));
    assert_eq!(totals["AMOUNT_EXCEEDS_REMAINING"], (1, 1));

    // Day cap 90.00 → 200.00: only the refund the day cap declined passes.
    let day = replay_json(d, Some(&merchants(SINGLE, 20_000, 100)), &[]);
    let want: BTreeMap<_, _> =
        [(14, flip(("61", "MERCHANT_DAY_AMOUNT"), ("00", "APPROVED")))].into();
    assert_eq!(flips(&day), want, "{day}");

    // Refundable share 100 % → 30 % (30.00 of each 100.00 sale): the 40.00 refunds are
    // declined by the share, which is checked before the day cap.
    let share = replay_json(d, Some(&merchants(SINGLE, DAY, 30)), &[]);
    let want: BTreeMap<_, _> = [
        (13, flip(("00", "APPROVED"), ("61", "REFUNDABLE_SHARE"))),
        (
            14,
            flip(("61", "MERCHANT_DAY_AMOUNT"), ("61", "REFUNDABLE_SHARE")),
        ),
    ]
    .into();
    assert_eq!(flips(&share), want, "{share}");
    assert_eq!(
        by_stan(&share, "000014")["rule"]["new_value"],
        "30",
        "{share}"
    );

    // The report window: before the traffic, nothing is reported; from its start, all of it.
    let early = (started - 3600).to_string();
    let none = replay_json(d, Some(&merchants(7000, DAY, 100)), &["--to", &early]);
    assert_eq!(
        (none["requests"].clone(), none["changes"].clone()),
        (json!(0), json!([]))
    );
    let from = refundgate::replay::rfc3339(started - 1);
    let all = replay_json(d, Some(&merchants(7000, DAY, 100)), &["--from", &from]);
    assert_eq!(flips(&all), flips(&single));

    // The text report names the key, the masked PAN, old → new and the rule; never the PAN.
    std::fs::write(d.join("what-if.toml"), merchants(7000, DAY, 100)).unwrap();
    let what_if = d.join("what-if.toml").display().to_string();
    let out = replay(d, &["--merchants", &what_if]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("TERM0001 stan 000012"), "{text}");
    assert!(text.contains("476173******0119"), "{text}");
    assert!(
        text.contains("61 SINGLE_REFUND_CAP (limit 5000, used 0, remaining 5000) → 00 APPROVED"),
        "{text}"
    );
    assert!(
        text.contains("rule: row 12 SINGLE_REFUND_CAP; refund_single_max 5000 → 7000"),
        "{text}"
    );
    assert!(text.contains("3 of 15 requests change"), "{text}");
    assert!(!text.contains(VISA));

    // Nothing was written, locked or truncated, and the gateway still decides.
    assert_eq!(files(&journal), before);
    rt.block_on(async {
        let mut c = common::client::connect(&cert, gateway.listeners[0]).await;
        sale(&mut c, 41, 100).await;
    });
    drop(gateway);

    // A copy whose last record is torn: read up to the last whole record.
    let copy = d.join("copy");
    std::fs::create_dir(&copy).unwrap();
    for (name, bytes) in files(&journal) {
        std::fs::write(copy.join(name), bytes).unwrap();
    }
    let full = replay_json(d, None, &[]);
    tear_last_record(&copy);
    let out = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["replay", "--json", "--journal"])
        .arg(&copy)
        .arg("--base")
        .arg(d.join("merchants.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let torn: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(torn["torn_tail"], true);
    assert_eq!(torn["last_seq"], full["last_seq"].as_u64().unwrap() - 1);
    assert_eq!(torn["requests"], full["requests"].as_u64().unwrap() - 1);
}

/// Flips one payload byte of the last record of the newest segment with records.
fn tear_last_record(dir: &Path) {
    use refundgate::journal::record::{self, Decoded};
    use refundgate::journal::segment::SEGMENT_HEADER_BYTES;
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    for path in segs.iter().rev() {
        let mut bytes = std::fs::read(path).unwrap();
        let (mut off, mut last) = (SEGMENT_HEADER_BYTES, None);
        while let Decoded::Record { encoded_len, .. } = record::decode(&bytes[off..]) {
            last = Some((off, encoded_len));
            off += encoded_len;
        }
        if let Some((at, len)) = last {
            bytes[at + len - 1] ^= 0x55;
            std::fs::write(path, bytes).unwrap();
            return;
        }
    }
    panic!("no record to tear");
}

#[test]
fn replay_refuses_bad_usage_64_and_an_unusable_journal_74() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("merchants.toml"), merchants(SINGLE, DAY, 100)).unwrap();
    let code = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_refundgate"))
            .arg("replay")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        (out.status.code(), err)
    };
    let journal = d.join("journal").display().to_string();
    let missing = code(&["--journal", &journal]);
    assert_eq!(missing.0, Some(74), "{}", missing.1);
    std::fs::create_dir(d.join("journal")).unwrap();
    std::fs::write(
        d.join("journal/00000000000000000001.seg"),
        b"not a journal at all",
    )
    .unwrap();
    let foreign = code(&["--journal", &journal]);
    assert_eq!(foreign.0, Some(74), "{}", foreign.1);
    // Nothing was created or changed in the directory.
    assert_eq!(std::fs::read_dir(d.join("journal")).unwrap().count(), 1);

    std::fs::write(d.join("bad.toml"), "[[merchants]]\nid = 5\n").unwrap();
    let bad = d.join("bad.toml").display().to_string();
    assert_eq!(
        code(&["--journal", &journal, "--merchants", &bad]).0,
        Some(64)
    );
    let other = merchants(SINGLE, DAY, 100).replace("MERCHANT 000001", "MERCHANT 000009");
    std::fs::write(d.join("other.toml"), other).unwrap();
    let other = d.join("other.toml").display().to_string();
    let base = d.join("merchants.toml").display().to_string();
    let (c, err) = code(&[
        "--journal",
        &journal,
        "--base",
        &base,
        "--merchants",
        &other,
    ]);
    assert_eq!(c, Some(64));
    assert!(err.contains("MERCHANT 000009"), "{err}");
    assert_eq!(
        code(&["--journal", &journal, "--from", "yesterday"]).0,
        Some(64)
    );
    assert_eq!(
        code(&["--journal", &journal, "--from", "2000", "--to", "1000"]).0,
        Some(64)
    );
}
