//! The admin API (issue 22) over a running gateway: authentication, the decision trail of a
//! declined refund, "what would pass", top-up, settlement and the terminal refund switch,
//! idempotency by request id, and durability across restarts (in-process through
//! `serve::prepare`, and the real binary killed with SIGKILL).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use refundgate::admin::AdminApi;
use refundgate::serve::{self, ServeArgs};
use refundgate::server::{ListenerInfo, Server};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

mod common;
use common::{ascii_request as ascii, de90};

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "ops:0123456789abcdef0123";
const BEARER: &str = "Bearer 0123456789abcdef0123";
const M: &str = "MERCHANT%20000001";

struct Running {
    listener: Arc<ListenerInfo>,
    admin: SocketAddr,
    gateway: Arc<refundgate::flow::Gateway>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dir: Arc<tempfile::TempDir>,
}

/// Writes the configuration (one ascii1987 listener, journal in the temp dir, the token
/// file when `token`) and starts the gateway the way `serve` does.
async fn start(dir: Arc<tempfile::TempDir>, token: bool) -> Running {
    try_start(dir, token).await.unwrap()
}

/// [`start`], with `serve::prepare`'s refusal as `Err`.
async fn try_start(dir: Arc<tempfile::TempDir>, token: bool) -> Result<Running, String> {
    let token_line = if token {
        let path = dir.path().join("admin.tokens");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!("token_file = \"{}\"\n", path.display())
    } else {
        String::new()
    };
    // A merchant file in the directory is used (the reload tests rewrite it).
    let merchants = dir.path().join("merchants.toml");
    let merchants_line = if merchants.exists() {
        format!("merchants = \"{}\"\n", merchants.display())
    } else {
        String::new()
    };
    let config = format!(
        "{merchants_line}[admin]\naddr = \"127.0.0.1:0\"\n{token_line}[journal]\ndir = \"{}\"\nsegment_bytes = 262144\n\
         [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"ascii1987\"\n",
        dir.path().join("journal").display()
    );
    let path = dir.path().join("refundgate.toml");
    std::fs::write(&path, config).unwrap();
    let prepared = serve::prepare(&ServeArgs {
        config: Some(path),
        merchants: None,
        journal_dir: None,
    })
    .map_err(|e| e.message)?;
    let merchants_file = prepared.config.merchants.clone();
    let mut server = Server::bind(prepared.config).await.unwrap();
    server.readiness().set_merchants_loaded(true);
    let gateway = Arc::new(prepared.gateway);
    server.set_admin_api(Arc::new(
        AdminApi::new(Arc::clone(&gateway), prepared.admin_tokens)
            .with_merchants_file(merchants_file),
    ));
    let listener = server.listeners().remove(0);
    let admin = server.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let g = Arc::clone(&gateway);
    let task = tokio::spawn(async move {
        let _ = server
            .run(g, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(Running {
        listener,
        admin,
        gateway,
        stop: Some(stop),
        task,
        dir,
    })
}

impl Running {
    /// Stops the gateway and starts it again on the same journal.
    async fn restart(mut self) -> Running {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .unwrap()
            .unwrap();
        // The journal's directory lock goes with the last gateway handle.
        let started = std::time::Instant::now();
        while Arc::strong_count(&self.gateway) > 1 {
            assert!(started.elapsed() < WAIT, "the gateway is still held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dir = Arc::clone(&self.dir);
        drop(self);
        // A child process another test spawns holds every open descriptor, the journal's
        // lock included, between its fork and its exec: retry while the lock is taken.
        loop {
            match try_start(Arc::clone(&dir), true).await {
                Ok(r) => return r,
                Err(e) if e.contains("locked") && started.elapsed() < WAIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("restart: {e}"),
            }
        }
    }

    /// `POST /v1/reload` with the token: the merchant file read again.
    async fn reload(&self) -> (u16, Json) {
        http(
            self.admin,
            "POST",
            "/v1/reload",
            &[("Authorization", BEARER)],
            "",
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, Json) {
        http(self.admin, "GET", path, &[("Authorization", BEARER)], "").await
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> (u16, Json) {
        let headers = [("Authorization", BEARER), ("Idempotency-Key", key)];
        http(self.admin, "POST", path, &headers, body).await
    }
}

/// One HTTP/1.1 request; the status and the JSON body (Null when it is not JSON).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Json) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Json::Null))
}

use common::client::{ask as send, connect_listener as connect, Client};

/// A sale of `amount` with STAN `stan`, approved; returns the request and its RRN.
async fn sale(c: &mut Client, amount: u64, stan: u32) -> (Json, String) {
    let s = ascii("0200", "000000", amount, stan, &[]);
    let a = send(c, &s).await;
    assert_eq!((a.code.as_str(), a.reason.as_str()), ("00", "APPROVED"));
    (s, a.rrn.unwrap())
}

fn refund(sale: &Json, rrn: &str, amount: u64, stan: u32) -> Json {
    ascii(
        "0200",
        "200000",
        amount,
        stan,
        &[("37", rrn.to_string()), ("90", de90(sale))],
    )
}

fn tempdir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_the_token_is_refused_401_and_metrics_stay_open() {
    let gw = start(tempdir(), true).await;
    let path = format!("/v1/merchants/{M}");
    let (status, body) = http(gw.admin, "GET", &path, &[], "").await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("token"));
    let wrong = [("Authorization", "Bearer 0123456789abcdef0124")];
    assert_eq!(http(gw.admin, "GET", &path, &wrong, "").await.0, 401);
    let top_up = format!("{path}/top-up");
    let key = [("Idempotency-Key", "x")];
    assert_eq!(
        http(gw.admin, "POST", &top_up, &key, "{\"amount\":5}")
            .await
            .0,
        401
    );
    assert_eq!(http(gw.admin, "GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(http(gw.admin, "GET", "/metrics", &[], "").await.0, 200);
    let (status, body) = gw.get(&path).await;
    assert_eq!(status, 200);
    assert_eq!(body["funds"]["reserve"], 100_000, "{body}");
    // A wrong token moved nothing.
    assert!(body["admin_changes"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_every_api_call_is_refused_403() {
    let gw = start(tempdir(), false).await;
    let (status, body) = http(
        gw.admin,
        "GET",
        &format!("/v1/merchants/{M}"),
        &[("Authorization", BEARER)],
        "",
    )
    .await;
    assert_eq!(status, 403);
    assert!(body["error"].as_str().unwrap().contains("token_file"));
    assert_eq!(http(gw.admin, "GET", "/healthz", &[], "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_of_a_declined_refund_names_the_row_that_bound_with_the_figures_of_its_de54() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 600_000, 1).await;
    // The sample merchant's single refund cap is 500000.
    let r = refund(&s, &rrn, 500_001, 2);
    let declined = send(&mut c, &r).await;
    assert_eq!(declined.code, "61");
    assert_eq!(declined.reason, "SINGLE_REFUND_CAP");
    let date = r["fields"]["13"].as_str().unwrap();
    let (status, body) = gw
        .get(&format!(
            "/v1/merchants/{M}/transactions?terminal=TERM0001&stan=2&date={date}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let trail = &body["trail"];
    assert_eq!(trail["outcome"], "declined");
    assert_eq!(trail["bound_by"], 12);
    assert_eq!(trail["de54"].as_str(), declined.de54.as_deref());
    let row12 = &trail["checks"][11];
    assert_eq!(row12["status"], "bound");
    assert_eq!(row12["figures"]["limit"], 500_000);
    let cap = row12["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["status"] == "bound")
        .unwrap();
    assert_eq!(cap["check"], "SINGLE_REFUND_CAP");
    assert_eq!(trail["checks"][12]["status"], "not_reached");
    assert!(
        trail["explain"]["en"].as_str().unwrap().contains("5000.00"),
        "{trail}"
    );
    assert!(!trail["explain"]["zh"].as_str().unwrap().is_empty());
    // The sale by its RRN: masked PAN only.
    let (status, body) = gw
        .get(&format!("/v1/merchants/{M}/transactions?rrn={rrn}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["transaction"]["pan"], "476173******0119");
    assert!(!body.to_string().contains("4761739001010119"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_view_gives_one_cards_refunds_today_against_the_card_caps() {
    let dir = tempdir();
    let capped = merchants_with_cap(500_000).replacen(
        "refund_single_max = 500000",
        "refund_single_max = 500000\ncard_refund_day_amount_max = 200000\ncard_refund_day_count_max = 3",
        1,
    );
    std::fs::write(dir.path().join("merchants.toml"), capped).unwrap();
    let gw = start(dir, true).await;
    let mut c = connect(&gw.listener).await;
    let (a, rrn_a) = sale(&mut c, 600_000, 1).await;
    let other_card = [("2", "5500000000000004".to_string())];
    let b = ascii("0200", "000000", 300_000, 2, &other_card);
    let b_answer = send(&mut c, &b).await;
    assert_eq!(b_answer.code, "00");
    let rrn_b = b_answer.rrn.unwrap();
    for (stan, amount) in [(3, 50_000), (4, 30_000)] {
        assert_eq!(
            send(&mut c, &refund(&a, &rrn_a, amount, stan)).await.code,
            "00"
        );
    }
    let mut rb = refund(&b, &rrn_b, 10_000, 5);
    rb["fields"]["2"] = Json::String("5500000000000004".into());
    assert_eq!(send(&mut c, &rb).await.code, "00");

    let (status, body) = gw.get(&format!("/v1/merchants/{M}?card_rrn={rrn_a}")).await;
    assert_eq!(status, 200, "{body}");
    let card = &body["usage"]["card"];
    assert_eq!(card["pan"], "476173******0119", "{body}");
    assert_eq!(card["day"]["amount"], 80_000);
    assert_eq!(card["day"]["count"], 2);
    assert_eq!(card["day"]["amount_remaining"], 120_000);
    assert_eq!(card["day"]["count_remaining"], 1);
    assert_eq!(
        body["usage"]["day"]["amount"], 90_000,
        "the merchant's day holds both cards"
    );
    let (_, body) = gw.get(&format!("/v1/merchants/{M}?card_rrn={rrn_b}")).await;
    assert_eq!(body["usage"]["card"]["pan"], "550000******0004", "{body}");
    assert_eq!(body["usage"]["card"]["day"]["amount"], 10_000);
    assert_eq!(body["usage"]["card"]["day"]["count_remaining"], 2);
    assert!(!body.to_string().contains("5500000000000004"));
    let (_, plain) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert!(plain["usage"]["card"].is_null(), "{plain}");
    let (status, _) = gw
        .get(&format!("/v1/merchants/{M}?card_rrn=000000000000"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_would_pass_is_approved_and_one_unit_more_is_declined_by_the_rule_it_names() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 600_000, 1).await;
    let first = send(&mut c, &refund(&s, &rrn, 40_000, 2)).await;
    assert_eq!(first.code, "00");
    let de7 = s["fields"]["7"].as_str().unwrap();
    let (status, w) = gw
        .get(&format!(
            "/v1/merchants/{M}/would-pass?terminal=TERM0001&stan=1&transmission={de7}"
        ))
        .await;
    assert_eq!(status, 200, "{w}");
    let x = w["would_pass"].as_u64().unwrap();
    // Funds: 100000 reserve + 600000 sale - 40000 refunded = 660000; the 500000 cap binds.
    assert_eq!(x, 500_000);
    assert_eq!(w["binding"], "SINGLE_REFUND_CAP");
    assert!(w["resets_at"].is_null());
    let over = send(&mut c, &refund(&s, &rrn, x + 1, 3)).await;
    assert_eq!(over.reason, w["binding"].as_str().unwrap());
    let exact = send(&mut c, &refund(&s, &rrn, x, 4)).await;
    assert_eq!(
        (exact.code.as_str(), exact.reason.as_str()),
        ("00", "APPROVED")
    );
    // Now the sale's remainder binds: 600000 - 540000.
    let (_, w) = gw
        .get(&format!(
            "/v1/merchants/{M}/would-pass?terminal=TERM0001&rrn={rrn}"
        ))
        .await;
    assert_eq!(w["would_pass"], 60_000, "{w}");
    assert_eq!(w["binding"], "AMOUNT_EXCEEDS_REMAINING");
    let over = send(&mut c, &refund(&s, &rrn, 60_001, 5)).await;
    assert_eq!(over.reason, "AMOUNT_EXCEEDS_REMAINING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_changes_what_passes_once_per_request_id_and_survives_a_restart() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 300_000, 1).await;
    // Settle the merchant: the sale is paid out, only the 100000 reserve backs refunds.
    let (status, settled) = gw
        .post(&format!("/v1/merchants/{M}/settle"), "settle-1", "{}")
        .await;
    assert_eq!(status, 201, "{settled}");
    assert_eq!(settled["action"]["settle"]["payout"], 300_000);
    let would = |gw: &Running| {
        let path = format!("/v1/merchants/{M}/would-pass?terminal=TERM0001&rrn={rrn}");
        let admin = gw.admin;
        async move {
            http(admin, "GET", &path, &[("Authorization", BEARER)], "")
                .await
                .1
        }
    };
    let w = would(&gw).await;
    assert_eq!(w["would_pass"], 100_000, "{w}");
    assert_eq!(w["binding"], "BALANCE_INSUFFICIENT");
    let over = send(&mut c, &refund(&s, &rrn, 100_001, 2)).await;
    assert_eq!(over.code, "51");

    let top_up = format!("/v1/merchants/{M}/top-up");
    let (status, first) = gw.post(&top_up, "top-up-1", "{\"amount\": 50000}").await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["repeat"], false);
    assert_eq!(first["who"].as_str().unwrap(), "ops@127.0.0.1");
    let (status, again) = gw.post(&top_up, "top-up-1", "{\"amount\": 50000}").await;
    assert_eq!(status, 200);
    assert_eq!(again["repeat"], true);
    assert_eq!(again["at"], first["at"]);
    let (status, _) = gw.post(&top_up, "top-up-1", "{\"amount\": 7}").await;
    assert_eq!(status, 409, "the same id for another change");
    let (_, m) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(m["funds"]["reserve"], 150_000, "topped up once");
    assert_eq!(would(&gw).await["would_pass"], 150_000);

    let gw = gw.restart().await;
    let (_, m) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(m["funds"]["reserve"], 150_000, "{m}");
    let changes = m["admin_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{m}");
    assert_eq!(changes[1]["request_id"], "top-up-1");
    assert_eq!(changes[1]["who"], "ops@127.0.0.1");
    let (status, again) = gw.post(&top_up, "top-up-1", "{\"amount\": 50000}").await;
    assert_eq!((status, again["repeat"].clone()), (200, Json::Bool(true)));
    let (_, m) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(
        m["funds"]["reserve"], 150_000,
        "no second top-up after the restart"
    );
    let mut c = connect(&gw.listener).await;
    let passes = send(&mut c, &refund(&s, &rrn, 150_000, 3)).await;
    assert_eq!(passes.code, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_of_one_request_id_top_up_once() {
    let gw = start(tempdir(), true).await;
    let path = format!("/v1/merchants/{M}/top-up");
    let calls = (0..8).map(|_| {
        let path = path.clone();
        let admin = gw.admin;
        tokio::spawn(async move {
            let headers = [("Authorization", BEARER), ("Idempotency-Key", "race-1")];
            http(admin, "POST", &path, &headers, "{\"amount\": 1000}").await
        })
    });
    let mut created = 0;
    let mut repeats = 0;
    for call in calls.collect::<Vec<_>>() {
        let (status, body) = call.await.unwrap();
        match status {
            201 => created += 1,
            200 => {
                assert_eq!(body["repeat"], true);
                repeats += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!((created, repeats), (1, 7));
    let (_, m) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(m["funds"]["reserve"], 101_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_disabled_for_refunds_declines_them_and_stays_disabled_after_a_restart() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 10_000, 1).await;
    let switch = format!("/v1/merchants/{M}/terminals/TERM0001/refunds");
    let (status, body) = gw.post(&switch, "off-1", "{\"enabled\": false}").await;
    assert_eq!(status, 201, "{body}");
    let declined = send(&mut c, &refund(&s, &rrn, 1_000, 2)).await;
    assert_eq!(declined.reason, "TERMINAL_NOT_PERMITTED");
    let (_, w) = gw
        .get(&format!(
            "/v1/merchants/{M}/would-pass?terminal=TERM0001&rrn={rrn}"
        ))
        .await;
    assert_eq!(w["would_pass"], 0);
    assert_eq!(w["binding"], "TERMINAL_NOT_PERMITTED");
    let unknown = gw
        .post(
            &format!("/v1/merchants/{M}/terminals/NOPE/refunds"),
            "off-2",
            "{\"enabled\": false}",
        )
        .await;
    assert_eq!(unknown.0, 404);
    let auth = [("Authorization", BEARER)];
    let missing_key = http(gw.admin, "POST", &switch, &auth, "{\"enabled\": true}").await;
    assert_eq!(missing_key.0, 400);

    let gw = gw.restart().await;
    let mut c = connect(&gw.listener).await;
    let declined = send(&mut c, &refund(&s, &rrn, 1_000, 3)).await;
    assert_eq!(
        declined.reason, "TERMINAL_NOT_PERMITTED",
        "still off after the restart"
    );
    let (status, _) = gw.post(&switch, "on-1", "{\"enabled\": true}").await;
    assert_eq!(status, 201);
    let approved = send(&mut c, &refund(&s, &rrn, 1_000, 4)).await;
    assert_eq!(approved.code, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_one_terminals_batch_pays_it_out_and_survives_a_restart() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    sale(&mut c, 20_000, 1).await;
    let (_, before) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(
        before["terminals"][0]["open_batch_totals"]["debit_amount"],
        20_000
    );
    let batch = before["terminals"][0]["batch"].as_u64().unwrap();
    let (status, body) = gw
        .post(
            &format!("/v1/merchants/{M}/settle"),
            "close-1",
            "{\"terminal\": \"TERM0001\"}",
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["action"]["settle_terminal"]["payout"], 20_000);
    let gw = gw.restart().await;
    let (_, after) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(after["funds"]["unsettled_sales"], 0, "{after}");
    assert_eq!(
        after["terminals"][0]["open_batch_totals"]["debit_amount"],
        0
    );
    assert_eq!(after["terminals"][0]["batch"].as_u64().unwrap(), batch + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_list_reversals_not_applied() {
    let gw = start(tempdir(), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 10_000, 1).await;
    assert_eq!(send(&mut c, &refund(&s, &rrn, 1_000, 2)).await.code, "00");
    let de90 = de90(&s);
    let reversal = ascii("0400", "000000", 10_000, 1, &[("90", de90)]);
    let a = send(&mut c, &reversal).await;
    assert_eq!(
        (a.code.as_str(), a.reason.as_str()),
        ("00", "REVERSAL_NOT_APPLIED")
    );
    let (status, body) = gw.get("/v1/exceptions").await;
    assert_eq!(status, 200);
    let list = body["reversals_not_applied"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["amount"], 10_000);
    assert_eq!(list[0]["pan"], "476173******0119");
    assert!(body["upstream_links"].is_null());
}

/// `refundgate serve` as a child, with its admin address read from its log.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_binary(config: &Path) -> (Child, SocketAddr) {
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
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Json>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "admin http listening" {
                if let Some(a) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()) {
                    let _ = tx.send(a);
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    (Child(child), addr)
}

fn binary_config(dir: &Path) -> PathBuf {
    let tokens = dir.join("admin.tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("refundgate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\naddr = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n[journal]\ndir = \"{}\"\nsegment_bytes = 262144\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"ascii1987\"\n{}",
            tokens.display(),
            dir.join("journal").display(),
            common::SERVE_LOG_TOML
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_acknowledged_by_the_binary_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path());
    let (child, admin) = spawn_binary(&config);
    let headers = [("Authorization", BEARER), ("Idempotency-Key", "k9-1")];
    let path = format!("/v1/merchants/{M}/top-up");
    let (status, body) = http(admin, "POST", &path, &headers, "{\"amount\": 12345}").await;
    assert_eq!(status, 201, "{body}");
    drop(child); // SIGKILL
    let (_child, admin) = spawn_binary(&config);
    let auth = [("Authorization", BEARER)];
    let (_, m) = http(admin, "GET", &format!("/v1/merchants/{M}"), &auth, "").await;
    assert_eq!(m["funds"]["reserve"], 100_000 + 12_345, "{m}");
    let (status, again) = http(admin, "POST", &path, &headers, "{\"amount\": 12345}").await;
    assert_eq!((status, again["repeat"].clone()), (200, Json::Bool(true)));
}

#[test]
fn the_binary_refuses_a_token_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path());
    let tokens = dir.path().join("admin.tokens");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

/// The sample merchant file with the standard profile's single refund cap set to `cap`.
fn merchants_with_cap(cap: u64) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/merchants.toml"
    ))
    .unwrap();
    let old = "refund_single_max = 500000          # 5000.00";
    assert!(text.contains(old), "the fixture's standard cap moved");
    text.replacen(old, &format!("refund_single_max = {cap}"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_decisions_from_the_next_request_and_keeps_the_counters() {
    let dir = tempdir();
    let file = dir.path().join("merchants.toml");
    std::fs::write(&file, merchants_with_cap(500_000)).unwrap();
    let gw = start(Arc::clone(&dir), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 600_000, 1).await;
    assert_eq!(send(&mut c, &refund(&s, &rrn, 400_000, 2)).await.code, "00");
    let (_, before) = gw.get(&format!("/v1/merchants/{M}")).await;
    let version = before["policy_version"].as_u64().unwrap();
    assert!(version >= 1, "the first policy is journaled: {before}");

    std::fs::write(&file, merchants_with_cap(100_000)).unwrap();
    let (status, body) = gw.reload().await;
    assert_eq!(status, 200, "{body}");
    assert!(body["changed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["merchant"] == "MERCHANT 000001"));
    let over = send(&mut c, &refund(&s, &rrn, 100_001, 3)).await;
    assert_eq!(
        (over.code.as_str(), over.reason.as_str()),
        ("61", "SINGLE_REFUND_CAP")
    );
    let (_, after) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(after["policy"]["refund_single_max"], 100_000);
    assert_eq!(after["policy_version"].as_u64().unwrap(), version + 1);
    assert_eq!(
        after["usage"]["day"]["amount"], 400_000,
        "counters kept: {after}"
    );
    assert_eq!(after["funds"]["refunds_committed"], 400_000);

    // The policy in force survives a restart with the same file, at the same version.
    let gw = gw.restart().await;
    let (_, restarted) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(restarted["policy"]["refund_single_max"], 100_000);
    assert_eq!(restarted["policy_version"].as_u64().unwrap(), version + 1);
    assert_eq!(restarted["usage"]["day"]["amount"], 400_000);
}

/// A `refundgate load` scenario: a sale of 25.00, then a refund of 20.00 of it, answered 00
/// or 61 (a reload lowers the single refund cap under it).
const SALE_REFUND_SCENARIO: &str = r#"
name = "sale-refund-under-reload"
dialect = "ascii1987"
utc_offset = "-05:00"
[[session]]
name = "sale-refund"
weight = 1
[[session.step]]
name = "sale"
mti = "0200"
expect = { code = "00" }
[session.step.fields]
2 = "4761739001010119"
3 = "000000"
4 = "000000002500"
7 = "{de7}"
11 = "{stan}"
12 = "{time}"
13 = "{date}"
22 = "051"
25 = "00"
41 = "TERM0001"
42 = "MERCHANT 000001"
49 = "840"
[[session.step]]
name = "refund"
mti = "0200"
expect = { code = ["00", "61"] }
[session.step.fields]
2 = "{sale.req.2}"
3 = "200000"
4 = "000000002000"
7 = "{de7}"
11 = "{stan}"
12 = "{time}"
13 = "{date}"
22 = "051"
25 = "00"
37 = "{sale.ans.37}"
41 = "TERM0001"
42 = "MERCHANT 000001"
49 = "840"
90 = "0200{sale.req.11}{sale.req.7}0000001234500000000000"
"#;

/// [`merchants_with_cap`] with day and month caps no load run reaches.
fn merchants_for_load(cap: u64) -> String {
    let mut text = merchants_with_cap(cap);
    for (old, new) in [
        (
            "refund_day_amount_max = 2000000 ",
            "refund_day_amount_max = 100000000000 ",
        ),
        (
            "refund_month_amount_max = 20000000\n",
            "refund_month_amount_max = 100000000000\n",
        ),
        (
            "refund_day_count_max = 20\n",
            "refund_day_count_max = 1000000000\n",
        ),
        (
            "refund_month_count_max = 300\n",
            "refund_month_count_max = 1000000000\n",
        ),
    ] {
        assert!(text.contains(old), "the fixture's {old} moved");
        text = text.replacen(old, new, 1);
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_changes_decisions_from_the_next_request_with_no_error_or_counter_reset(
) {
    let dir = tempdir();
    let file = dir.path().join("merchants.toml");
    std::fs::write(&file, merchants_for_load(500_000)).unwrap();
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, SALE_REFUND_SCENARIO).unwrap();
    let gw = start(Arc::clone(&dir), true).await;
    let load = std::process::Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args([
            "load",
            "--target",
            &gw.listener.addr.to_string(),
            "--scenario",
        ])
        .arg(&scenario)
        .args([
            "--connections",
            "4",
            "--closed",
            "--duration",
            "6",
            "--json",
        ])
        .arg("--insecure-skip-verify")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let load = Child(load);
    let day = |v: &Json| {
        (
            v["usage"]["day"]["count"].as_u64().unwrap(),
            v["usage"]["day"]["amount"].as_u64().unwrap(),
        )
    };
    // Refunds are being approved under the first policy.
    let started = std::time::Instant::now();
    let before = loop {
        let (_, v) = gw.get(&format!("/v1/merchants/{M}")).await;
        if day(&v).0 >= 20 {
            break day(&v).0;
        }
        assert!(
            started.elapsed() < WAIT,
            "the load approved no refunds: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    std::fs::write(&file, merchants_for_load(1_000)).unwrap();
    let (status, body) = gw.reload().await;
    assert_eq!(status, 200, "{body}");
    let (_, at_reload) = gw.get(&format!("/v1/merchants/{M}")).await;
    let (count, amount) = day(&at_reload);
    assert!(
        count >= before,
        "{before} refunds before, {count} after: {at_reload}"
    );
    assert_eq!(
        amount,
        count * 2_000,
        "counters kept across the swap: {at_reload}"
    );

    let mut out = String::new();
    let mut load = load;
    let mut stdout = load.0.stdout.take().unwrap();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    let status = load.0.wait().unwrap();
    let report: Json = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(status.success(), "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    for (what, n) in report["errors"].as_object().unwrap() {
        assert_eq!(n, 0, "{what} errors: {report}");
    }
    assert!(
        report["codes"]["61"].as_u64().unwrap_or(0) > 0,
        "no refund met the new cap: {report}"
    );
    // From the reload on, no refund of 20.00 passed, and nothing was reset.
    let (_, end) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(day(&end), (count, amount), "{end}");
    assert_eq!(end["policy"]["refund_single_max"], 1_000);
    assert_eq!(end["funds"]["refunds_committed"], amount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_after_a_reload_reads_the_policy_in_force_when_the_request_was_decided() {
    let dir = tempdir();
    let file = dir.path().join("merchants.toml");
    std::fs::write(&file, merchants_with_cap(500_000)).unwrap();
    let gw = start(Arc::clone(&dir), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 600_000, 1).await;
    let declined = refund(&s, &rrn, 500_001, 2);
    assert_eq!(send(&mut c, &declined).await.code, "61");
    let approved = refund(&s, &rrn, 1_000, 3);
    assert_eq!(send(&mut c, &approved).await.code, "00");
    let (_, before) = gw.get(&format!("/v1/merchants/{M}")).await;
    let version = before["policy_version"].as_u64().unwrap();

    std::fs::write(&file, merchants_with_cap(100_000)).unwrap();
    let (status, body) = gw.reload().await;
    assert_eq!(status, 200, "{body}");
    let date = declined["fields"]["13"].as_str().unwrap();
    let cap_of = |body: &Json| {
        body["trail"]["checks"][11]["limits"][0]["policy"]
            .as_u64()
            .unwrap_or_else(|| panic!("{body}"))
    };
    let (_, old) = gw
        .get(&format!(
            "/v1/merchants/{M}/transactions?terminal=TERM0001&stan=2&date={date}"
        ))
        .await;
    assert_eq!(
        cap_of(&old),
        500_000,
        "the decline's trail reads its own policy: {old}"
    );
    assert_eq!(old["policy_version"], version, "{old}");
    let (_, ok) = gw
        .get(&format!(
            "/v1/merchants/{M}/transactions?terminal=TERM0001&stan=3&date={date}"
        ))
        .await;
    assert_eq!(cap_of(&ok), 500_000, "{ok}");
    // A request decided after the reload reads the new one.
    let after = refund(&s, &rrn, 100_001, 4);
    assert_eq!(send(&mut c, &after).await.code, "61");
    let (_, new) = gw
        .get(&format!(
            "/v1/merchants/{M}/transactions?terminal=TERM0001&stan=4&date={date}"
        ))
        .await;
    assert_eq!(cap_of(&new), 100_000, "{new}");
    assert_eq!(new["policy_version"], version + 1, "{new}");
    // And the same after a restart (snapshot or replay of the journal).
    let gw = gw.restart().await;
    let (_, old) = gw
        .get(&format!(
            "/v1/merchants/{M}/transactions?terminal=TERM0001&stan=2&date={date}"
        ))
        .await;
    assert_eq!(cap_of(&old), 500_000, "after a restart: {old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_merchant_file_is_refused_with_one_line_and_the_old_policy_stays() {
    let dir = tempdir();
    let file = dir.path().join("merchants.toml");
    std::fs::write(&file, merchants_with_cap(500_000)).unwrap();
    let gw = start(Arc::clone(&dir), true).await;
    let mut c = connect(&gw.listener).await;
    let (s, rrn) = sale(&mut c, 600_000, 1).await;
    let bad = merchants_with_cap(100_000).replacen(
        "refund_window_days = 180",
        "refund_window_dayz = 180",
        1,
    );
    std::fs::write(&file, bad).unwrap();
    let (status, body) = gw.reload().await;
    assert_eq!(status, 422);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("refund_window_dayz") && !error.contains('\n'),
        "{error}"
    );
    // Another merchant set (a merchant added) needs a restart: refused too.
    let added = merchants_with_cap(100_000)
        + "\n[[merchants]]\nid = \"MERCHANT 000009\"\nprofile = \"standard\"\nterminals = [{ id = \"TERM0009\" }]\n";
    std::fs::write(&file, added).unwrap();
    let (status, body) = gw.reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("MERCHANT 000009"));
    // The old cap (500000) still decides.
    let passes = send(&mut c, &refund(&s, &rrn, 500_000, 2)).await;
    assert_eq!(passes.code, "00");
    let (_, m) = gw.get(&format!("/v1/merchants/{M}")).await;
    assert_eq!(m["policy"]["refund_single_max"], 500_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_merchant_file_of_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("merchants.toml");
    std::fs::write(&file, merchants_with_cap(500_000)).unwrap();
    let config = binary_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("merchants = \"{}\"\n{text}", file.display()),
    )
    .unwrap();
    let (child, admin) = spawn_binary(&config);
    let auth = [("Authorization", BEARER)];
    let cap = |admin| async move {
        let (_, m) = http(admin, "GET", &format!("/v1/merchants/{M}"), &auth, "").await;
        m["policy"]["refund_single_max"].as_u64()
    };
    assert_eq!(cap(admin).await, Some(500_000));
    std::fs::write(&file, merchants_with_cap(123_400)).unwrap();
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    while cap(admin).await != Some(123_400) {
        assert!(started.elapsed() < WAIT, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `refundgate_*` names in `text`, with histogram suffixes taken off.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("refundgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

fn source_metric_names(dir: &Path, out: &mut std::collections::BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_metric_names(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Only string literals: "refundgate_…" as the metric macros and constants hold them.
            for piece in text.split('"').skip(1).step_by(2) {
                if piece.starts_with("refundgate_") && !piece.contains(' ') {
                    out.insert(piece.to_string());
                }
            }
        }
    }
}

#[test]
fn every_dashboard_and_alert_query_names_a_metric_the_gateway_defines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut defined = std::collections::BTreeSet::new();
    source_metric_names(&root.join("src"), &mut defined);
    assert!(defined.contains("refundgate_requests_total"), "{defined:?}");
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/refundgate.json")).unwrap();
    let doc: Json = serde_json::from_str(&dashboard).unwrap();
    let panels = doc["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{}: {expr} names no refundgate metric",
                panel["title"]
            );
            for n in names {
                assert!(
                    defined.contains(&n),
                    "{}: {n} is not a metric the gateway defines",
                    panel["title"]
                );
            }
        }
    }
    let alerts = std::fs::read_to_string(root.join("deploy/alerts.yml")).unwrap();
    let named = metric_names(&alerts);
    assert!(named.len() >= 8);
    for n in named {
        assert!(
            defined.contains(&n),
            "alerts.yml: {n} is not a metric the gateway defines"
        );
    }
}

/// `/metrics` as text (it is not JSON, so not through `http`).
async fn metrics_text(admin: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_binary_exports_every_dashboard_metric_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path());
    // An upstream nobody listens on: its series exist from start too.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "[[upstreams]]\nname = \"bank\"\naddrs = [\"127.0.0.1:9\"]\ndialect = \"ascii1987\"\n\
         framing = \"binary2\"\ntls = { insecure_skip_verify = true }\n",
    );
    std::fs::write(&config, text).unwrap();
    let (_child, admin) = spawn_binary(&config);
    let metrics = metrics_text(admin).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/refundgate.json")).unwrap();
    let samples: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
    for name in metric_names(&dashboard) {
        assert!(
            samples.iter().any(|l| l.starts_with(&name)),
            "{name} is not on an idle gateway's /metrics:\n{metrics}"
        );
    }
    for zero in [
        "refundgate_framing_errors_total{dialect=\"ascii1987\"} 0",
        "refundgate_merchant_reloads_total{outcome=\"refused\"} 0",
        "refundgate_saf_dead_letters 0",
    ] {
        assert!(samples.contains(&zero), "{zero} missing:\n{metrics}");
    }
}
