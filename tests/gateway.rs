//! The real gateway over TLS on 127.0.0.1:0: flows of both dialects, byte-checked answers,
//! format errors, unsupported functions and MACs, as a terminal sees them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::clock::SystemClock;
use refundgate::config::{Config, IdentityConfig, ListenerConfig, MacConfig, TlsConfig};
use refundgate::dialect::{ASCII1987, CUP_POS};
use refundgate::flow::{Gateway, Link};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::iso8583::{self, json, Message};
use refundgate::journal::{self, Journal};
use refundgate::ledger::{Funds, Ledger, MerchantSet, PanKey};
use refundgate::mac::{self, DesKey, MacAlgorithm, MacKey};
use refundgate::serve;
use refundgate::server::{ListenerInfo, Server};
use refundgate::terminal_keys::{Identities, TerminalKeys};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value as Json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

mod common;
use common::{ascii_request as ascii, de90};

const WAIT: Duration = Duration::from_secs(10);
const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];
const MAK: &str = "0123456789ABCDEF";

/// Journal segments of the tests: small, so no test writes a 64 MiB zeroed segment.
const SEGMENT_BYTES: u64 = 256 * 1024;
/// The PAN-hash key of the tests, also written where `serve` looks for it on a restart.
const PAN_KEY: [u8; 16] = [7; 16];

struct Running {
    listeners: Vec<Arc<ListenerInfo>>,
    admin: SocketAddr,
    gateway: Arc<Gateway>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dir: Arc<tempfile::TempDir>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the server stops within its grace")
            .unwrap();
        // Connection tasks may still hold the gateway (and so the journal's directory lock)
        // for a moment after the server returned: wait until this is the last handle.
        let started = std::time::Instant::now();
        while Arc::strong_count(&self.gateway) > 1 {
            assert!(started.elapsed() < WAIT, "the gateway is still held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The sample merchant's funds as the ledger holds them now.
    fn funds(&self) -> Funds {
        self.gateway.ledger().funds("MERCHANT 000001").unwrap()
    }

    /// Stops this gateway and starts `refundgate serve`'s recovery (`serve::prepare`: journal
    /// replay on the real file system) on the same journal directory, as a restart would.
    async fn restart(self) -> Running {
        let dir = Arc::clone(&self.dir);
        self.stop().await;
        let path = dir.path().join("refundgate.toml");
        let mac = format!("mac = {{ algorithm = \"cup_ecb\", key = \"{MAK}\" }}");
        let toml = format!(
            "[admin]\naddr = \"127.0.0.1:0\"\n\
             [journal]\ndir = \"{}\"\nsegment_bytes = {SEGMENT_BYTES}\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"ascii1987\"\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"cup_pos\"\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"cup_pos\"\n{mac}\n",
            dir.path().join("journal").display()
        );
        std::fs::write(&path, toml).unwrap();
        let prepared = serve::prepare(&serve::ServeArgs {
            config: Some(path),
            merchants: None,
            journal_dir: None,
        })
        .map_err(|e| e.message)
        .unwrap();
        serve_gateway(prepared.config, prepared.gateway, dir).await
    }
}

/// Starts the gateway: listener 0 ascii1987, 1 cup_pos, 2 cup_pos with a MAC key.
async fn start() -> Running {
    start_with(journal::Options::default()).await
}

async fn start_with(options: journal::Options) -> Running {
    start_configured(
        options,
        Duration::from_millis(refundgate::limits::REQUEST_DEADLINE_DEFAULT_MS),
    )
    .await
}

/// [`start_with`] with a request deadline.
async fn start_configured(options: journal::Options, deadline: Duration) -> Running {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = Config::default();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    config.admin.addr = addr;
    let mut cup_mac = ListenerConfig::new(addr, &CUP_POS, Framing::Binary2);
    cup_mac.mac = Some(MacConfig {
        algorithm: "cup_ecb".into(),
        key: MAK.into(),
    });
    config.listeners = vec![
        ListenerConfig::new(addr, &ASCII1987, Framing::Binary2),
        ListenerConfig::new(addr, &CUP_POS, Framing::Binary2),
        cup_mac,
    ];
    let merchants = MerchantSet::embedded().unwrap();
    let ledger = Ledger::new(&merchants, PanKey::new(&PAN_KEY));
    let journal_dir = dir.path().join("journal");
    // Data 0700, the PAN hash key beside it (DOMAIN §10), as `serve` wants them on restart.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&journal_dir)
            .unwrap();
        let keys = dir.path().join("journal-keys");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&keys)
            .unwrap();
        refundgate::at_rest::write_new_private(&keys.join("pan-hash.key"), &PAN_KEY).unwrap();
    }
    let options = journal::Options {
        segment_bytes: SEGMENT_BYTES,
        ..options
    };
    let (journal, _) = Journal::open(&journal_dir, options).unwrap();
    let mut mac_link = Link::plain(&CUP_POS);
    mac_link.mac = Some(MacKey::from_hex(MacAlgorithm::CupPosEcb, MAK).unwrap());
    let links = vec![Link::plain(&ASCII1987), Link::plain(&CUP_POS), mac_link];
    let gateway = Gateway::new(
        Arc::new(ledger),
        Some(Arc::new(journal)),
        Arc::new(SystemClock),
        links,
    )
    .with_request_deadline(deadline);
    serve_gateway(config, gateway, dir).await
}

async fn serve_gateway(config: Config, gateway: Gateway, dir: Arc<tempfile::TempDir>) -> Running {
    let server = Server::bind(config).await.unwrap();
    server.readiness().set_merchants_loaded(true);
    let listeners = server.listeners();
    let admin = server.admin_addr();
    let gateway = Arc::new(gateway);
    let (stop, stopped) = oneshot::channel::<()>();
    let g = Arc::clone(&gateway);
    let task = tokio::spawn(async move {
        let _ = server
            .run(g, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        listeners,
        admin,
        gateway,
        stop: Some(stop),
        task,
        dir,
    }
}

/// The value of the `/metrics` sample `name` (labels included, as rendered), 0 when absent.
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    metric_value(&scrape(admin).await, name)
}

/// The value of the sample `name` (with its labels, if any) in a `/metrics` text; 0 if absent.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// One `/metrics` scrape: samples read from it together are consistent with each other.
async fn scrape(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// The amount of the DE54 block of `amount_type` (90: still refundable on the original).
fn de54_amount(de54: &str, amount_type: &str) -> Option<u64> {
    de54.as_bytes()
        .chunks(20)
        .filter_map(|b| std::str::from_utf8(b).ok())
        .find(|b| b.len() == 20 && &b[2..4] == amount_type)
        .and_then(|b| b[8..].parse().ok())
}

type Client = common::client::Client;

async fn connect(info: &ListenerInfo) -> Client {
    common::client::connect_listener(info).await
}

/// Sends one message and returns the answer's bytes (MTI onward).
async fn exchange(client: &mut Client, cup: bool, body: &[u8]) -> Bytes {
    let frame = Frame::Message {
        tpdu: cup.then_some(CUP_TPDU),
        header: cup.then_some(CUP_HEADER),
        body: Bytes::copy_from_slice(body),
    };
    client.send(frame).await.unwrap();
    match tokio::time::timeout(WAIT, client.next())
        .await
        .expect("answer in time")
    {
        Some(Ok(Frame::Message { body, tpdu, .. })) => {
            if cup {
                assert_eq!(tpdu, Some([0x60, 0x00, 0x00, 0x00, 0x03]), "TPDU swapped");
            }
            body
        }
        other => panic!("no answer: {other:?}"),
    }
}

fn encode(dialect: &str, doc: &Json) -> Vec<u8> {
    let spec = iso8583::Spec::builtin(dialect).unwrap();
    let mut out = BytesMut::new();
    json::from_json(spec, doc, &mut out).unwrap();
    out.to_vec()
}

fn decode<'a>(dialect: &str, bytes: &'a [u8]) -> Message<'a> {
    iso8583::decode(iso8583::Spec::builtin(dialect).unwrap(), bytes).unwrap()
}

/// What a terminal reads off an answer.
#[derive(Debug, Clone)]
struct Answer {
    mti: u16,
    code: String,
    reason: String,
    rrn: Option<String>,
    auth: Option<String>,
    de54: Option<String>,
    stan: Option<u32>,
    network_code: Option<u16>,
    batch: Option<u32>,
    mac_ok: Option<bool>,
}

impl Answer {
    fn code_reason(&self) -> (String, String) {
        (self.code.clone(), self.reason.clone())
    }
}

fn answer(dialect: &str, bytes: &[u8]) -> Answer {
    let m = decode(dialect, bytes);
    let key = MacKey::from_hex(MacAlgorithm::CupPosEcb, MAK).unwrap();
    Answer {
        mti: m.mti().0,
        code: m.response_code().unwrap_or("").to_string(),
        reason: m.reason().unwrap_or("").to_string(),
        rrn: m.rrn().map(str::to_string),
        auth: m.auth_code().map(str::to_string),
        de54: m.text(54).map(str::to_string),
        stan: m.stan(),
        network_code: m.network_code(),
        batch: m.cup60().map(|c| c.batch),
        mac_ok: m.mac().map(|(mab, v)| mac::verify(&key, mab, v)),
    }
}

/// `/metrics` before and after five approved sales, sent one at a time on one connection.
async fn scrapes_around_five_sales() -> (String, String) {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let before = scrape(gw.admin).await;
    for stan in 1..=5 {
        let sale = ascii("0200", "000000", 1000, stan, &[]);
        let a = answer(
            "ascii1987",
            &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
        );
        assert_eq!(a.code.as_str(), "00");
    }
    (before, scrape(gw.admin).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_counts_its_batches_and_the_records_they_wrote() {
    const RECORDS: &str = "refundgate_journal_records_total";
    const BATCHES: &str = "refundgate_journal_batches_total";
    // Other tests of this binary journal too: the counters move at least by these sales.
    // Both read from one scrape each, so another test's batch counts in both or in neither.
    let (before, after) = scrapes_around_five_sales().await;
    let records = metric_value(&after, RECORDS) - metric_value(&before, RECORDS);
    let batches = metric_value(&after, BATCHES) - metric_value(&before, BATCHES);
    assert!(records >= 5.0, "{records} records for 5 approved sales");
    // Sent one at a time, each approval waited for a batch of its own.
    assert!(
        (5.0..=records).contains(&batches),
        "{batches} batches for {records} records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_reports_how_long_its_syncs_take_in_buckets() {
    const COUNT: &str = "refundgate_journal_sync_seconds_count";
    const SUM: &str = "refundgate_journal_sync_seconds_sum";
    const ALL: &str = "refundgate_journal_sync_seconds_bucket{le=\"+Inf\"}";
    // Sent one at a time: each approval waited for a sync of its own (other tests of this
    // binary journal too, so at least these five).
    let (before, after) = scrapes_around_five_sales().await;
    let count = metric_value(&after, COUNT) - metric_value(&before, COUNT);
    assert!(count >= 5.0, "{count} syncs timed for 5 approved sales");
    let sum = metric_value(&after, SUM) - metric_value(&before, SUM);
    assert!(sum > 0.0, "the syncs took {sum} s in all");
    // Buckets, not a summary: the alert's histogram_quantile needs them.
    let in_buckets = metric_value(&after, ALL);
    assert_eq!(
        in_buckets,
        metric_value(&after, COUNT),
        "+Inf bucket holds every sync"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ascii_sale_refund_over_limit_refund_void_and_reversal_get_the_domain_codes() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;

    let sale = ascii("0200", "000000", 600_000, 1, &[]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.mti, 210);
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    assert_eq!(a.stan, Some(1));
    let rrn = a.rrn.clone().unwrap();
    assert_eq!(rrn.len(), 12);
    assert_eq!(a.auth.as_ref().map(String::len), Some(6));

    let refund = ascii(
        "0200",
        "200000",
        1500,
        2,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &refund)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let de54 = a.de54.clone().expect("refund answers carry DE54");
    assert!(
        de54.contains(&format!("{:012}", 600_000 - 1500)),
        "DE54 {de54}"
    );

    // 550000 is within what is left of the sale but over the single-refund cap of 500000.
    // No other test of this binary declines 61 on ascii1987, so the counter moves by one.
    const CAP_DECLINES: &str = "refundgate_requests_total{dialect=\"ascii1987\",mti=\"0200\",code=\"61\",reason=\"SINGLE_REFUND_CAP\"}";
    let cap_declines = metric(gw.admin, CAP_DECLINES).await;
    let over = ascii(
        "0200",
        "200000",
        550_000,
        3,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &over)).await,
    );
    assert_eq!(a.code_reason(), ("61".into(), "SINGLE_REFUND_CAP".into()));
    assert_eq!(
        metric(gw.admin, CAP_DECLINES).await - cap_declines,
        1.0,
        "the decline is counted once with its code and reason"
    );

    // More than is left of the sale: 64.
    let too_much = ascii(
        "0200",
        "200000",
        700_000,
        4,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &too_much)).await,
    );
    assert_eq!(
        a.code_reason(),
        ("64".into(), "AMOUNT_EXCEEDS_REMAINING".into())
    );

    // A second sale, voided the same day for its full amount.
    let sale2 = ascii("0200", "000000", 4200, 5, &[]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale2)).await,
    );
    assert_eq!(a.code.as_str(), "00");
    let rrn2 = a.rrn.clone().unwrap();
    let void = ascii(
        "0200",
        "020000",
        4200,
        6,
        &[("37", rrn2.clone()), ("90", de90(&sale2))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &void)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    // A refund of the voided sale is refused with its reason.
    let refund_voided = ascii(
        "0200",
        "200000",
        100,
        7,
        &[("37", rrn2), ("90", de90(&sale2))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &refund_voided)).await,
    );
    assert_eq!(a.reason, "ORIGINAL_VOIDED");

    // Reversal of the first refund gives its amount back to the merchant's funds and to the
    // sale (DOMAIN §9). A bare 00 would prove nothing: an unknown original is answered 00 too.
    let before = gw.funds();
    let mut reversal = ascii(
        "0400",
        "200000",
        1500,
        2,
        &[(
            "90",
            format!(
                "0200{:06}{}{:022}",
                2,
                refund["fields"]["7"].as_str().unwrap(),
                0
            ),
        )],
    );
    reversal["fields"]["37"] = Json::String(rrn.clone());
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &reversal)).await,
    );
    assert_eq!(a.mti, 410);
    assert_eq!(a.code.as_str(), "00");
    let reversed = gw.funds();
    assert_eq!(
        reversed.refunds_committed + 1500,
        before.refunds_committed,
        "the reversed refund no longer counts: {before:?} -> {reversed:?}"
    );
    assert_eq!(reversed.available, before.available + 1500);
    // So the same amount can be refunded again, and the sale's remainder is back to 600000
    // less this one refund only.
    let again = ascii(
        "0200",
        "200000",
        1500,
        8,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &again)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let de54 = a.de54.clone().expect("refund answers carry DE54");
    assert_eq!(
        de54_amount(&de54, "90"),
        Some(600_000 - 1500),
        "DE54 {de54}"
    );
    let refunded_again = gw.funds();
    assert_eq!(
        refunded_again.refunds_committed, before.refunds_committed,
        "{refunded_again:?}"
    );
    // The repeat of the reversal is answered 00 again and moves nothing.
    reversal["mti"] = json!("0401");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &reversal)).await,
    );
    assert_eq!(a.code.as_str(), "00");
    assert_eq!(
        gw.funds(),
        refunded_again,
        "a repeated reversal moves nothing"
    );

    // Repeat of the sale (0201): same answer, same RRN, nothing moved.
    let mut repeat = sale.clone();
    repeat["mti"] = json!("0201");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &repeat)).await,
    );
    assert_eq!(a.code.as_str(), "00");
    assert_eq!(a.rrn.as_deref(), Some(rrn.as_str()));
    assert_eq!(gw.funds(), refunded_again, "a repeated sale moves nothing");
    // A different request reusing the sale's key: 94.
    let reuse = ascii("0200", "000000", 999, 1, &[]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &reuse)).await,
    );
    assert_eq!(a.code_reason(), ("94".into(), "DUPLICATE".into()));
    gw.stop().await;
}

/// DOMAIN §6: a repeat gets the stored answer, declines included, never a new decision; a
/// different request reusing the key of a declined one gets 94.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_refund_keeps_its_answer_for_its_repeat_and_its_key() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    // The refund names a sale that does not exist yet: 25.
    let sale = ascii("0200", "000000", 9000, 71, &[]);
    let refund = ascii("0200", "200000", 3000, 72, &[("90", de90(&sale))]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &refund)).await,
    );
    assert_eq!(a.code_reason(), ("25".into(), "ORIGINAL_NOT_FOUND".into()));
    // Then the sale arrives, so deciding the refund again would approve it.
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let funds = gw.funds();
    // The terminal's repeat (0201) gets the decline it may already have shown.
    let mut repeat = refund.clone();
    repeat["mti"] = json!("0201");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &repeat)).await,
    );
    assert_eq!(
        a.code_reason(),
        ("25".into(), "ORIGINAL_NOT_FOUND".into()),
        "a repeat of a declined refund was decided anew"
    );
    // A different refund reusing the declined one's key (terminal, STAN, date): 94.
    let reuse = ascii("0200", "200000", 1000, 72, &[("90", de90(&sale))]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &reuse)).await,
    );
    assert_eq!(a.code_reason(), ("94".into(), "DUPLICATE".into()));
    assert_eq!(gw.funds(), funds, "neither moved money");
    gw.stop().await;
}

/// DOMAIN §6: stored answers survive restarts, declines included: a repeat after a restart
/// gets the decline the terminal may already have shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_refund_keeps_its_answer_across_a_restart() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let sale = ascii("0200", "000000", 9000, 81, &[]);
    let refund = ascii("0200", "200000", 3000, 82, &[("90", de90(&sale))]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &refund)).await,
    );
    assert_eq!(a.code_reason(), ("25".into(), "ORIGINAL_NOT_FOUND".into()));
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.code.as_str(), "00");
    drop(c);
    let gw = gw.restart().await;
    let funds = gw.funds();
    let mut c = connect(&gw.listeners[0]).await;
    let mut repeat = refund.clone();
    repeat["mti"] = json!("0201");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &repeat)).await,
    );
    assert_eq!(
        a.code_reason(),
        ("25".into(), "ORIGINAL_NOT_FOUND".into()),
        "after a restart a repeat of a declined refund was decided anew"
    );
    assert_eq!(gw.funds(), funds, "the repeat moved money");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unsupported_messages_get_30_and_40_and_the_connection_stays_usable() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    for name in [
        "a_non_digit_in_numeric",
        "a_truncated_mid_field",
        "a_extra_trailing_bytes",
    ] {
        let framed = malformed_frame(name);
        let a = exchange(&mut c, false, &framed[2..]).await;
        let a = answer("ascii1987", &a);
        assert_eq!(
            a.code_reason(),
            ("30".into(), "FORMAT_ERROR".into()),
            "{name}"
        );
    }
    let framed = malformed_frame("a_unknown_mti_0600");
    let a = exchange(&mut c, false, &framed[2..]).await;
    let a = answer("ascii1987", &a);
    assert_eq!(a.mti, 610);
    assert_eq!(
        a.code_reason(),
        ("40".into(), "FUNCTION_NOT_SUPPORTED".into())
    );
    // Still usable: an echo.
    let echo = json!({"mti": "0800", "fields": {"7": "1125093015", "11": "000009", "70": "301"}});
    let a = exchange(&mut c, false, &encode("ascii1987", &echo)).await;
    let a = answer("ascii1987", &a);
    assert_eq!(
        (a.mti, a.code.as_str(), a.network_code),
        (810, "00", Some(301))
    );
    gw.stop().await;
}

/// The framed bytes (length prefix included) of a malformed shared vector.
fn malformed_frame(name: &str) -> Vec<u8> {
    let v = vector("malformed", name);
    hex::decode(v["framed_hex"].as_str().unwrap()).unwrap()
}

fn vector(dir: &str, name: &str) -> Json {
    serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/../shared/vectors/{dir}/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap()
}

fn vector_message(dir: &str, name: &str) -> Vec<u8> {
    let bytes = hex::decode(vector(dir, name)["hex"].as_str().unwrap()).unwrap();
    if dir == "cup_bcd" {
        bytes[11..].to_vec()
    } else {
        bytes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_terminal_signs_on_then_its_maced_sale_is_approved_with_a_valid_mac() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[2]).await;
    let a = exchange(&mut c, true, &vector_message("cup_bcd", "signon_0800")).await;
    let a = answer("cup_pos", &a);
    assert_eq!(a.mti, 810);
    assert_eq!(a.code.as_str(), "00");
    assert_eq!(
        a.batch.unwrap(),
        123,
        "sign-on answers the batch number in 60.2"
    );

    let a_bytes = exchange(&mut c, true, &vector_message("cup_bcd", "sale_0200")).await;
    let a = answer("cup_pos", &a_bytes);
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    assert_eq!(
        a.mac_ok,
        Some(true),
        "approvals on a MAC link carry a valid MAC"
    );

    // The same sale with its last MAC character changed: A0, no MAC on the decline.
    let framed = malformed_frame("c_mac_wrong");
    let a_bytes = exchange(&mut c, true, &framed[13..]).await;
    let a = answer("cup_pos", &a_bytes);
    assert_eq!(a.code_reason(), ("A0".into(), "MAC_INVALID".into()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_message_with_a_mac_on_a_link_without_key_is_answered_a0() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[1]).await;
    let a = exchange(&mut c, true, &vector_message("cup_bcd", "sale_0200")).await;
    let a = answer("cup_pos", &a);
    assert_eq!(a.code_reason(), ("A0".into(), "MAC_INVALID".into()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_refund_advice_follows_the_sale_and_overdraw_is_refused_64() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[1]).await;
    let signon = exchange(&mut c, true, &vector_message("cup_bcd", "signon_0800")).await;
    assert_eq!(answer("cup_pos", &signon).code, "00");
    // The vectors' sale without its MAC (this listener has no key).
    let mut sale = vector("cup_bcd", "sale_0200");
    sale["fields"].as_object_mut().unwrap().remove("64");
    let a_bytes = exchange(&mut c, true, &encode("cup_pos", &sale)).await;
    let a = answer("cup_pos", &a_bytes);
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let rrn = a.rrn.clone().unwrap();
    // Refund advice 0220 of 3000 against the sale (batch 123, trace 45).
    let mut refund = vector("cup_bcd", "refund_0220");
    let f = refund["fields"].as_object_mut().unwrap();
    f.remove("64");
    f.insert("37".into(), json!(rrn));
    let mmdd = now_mmdd_local_plus8();
    f.insert("61".into(), json!(format!("000123000045{mmdd}")));
    let a = answer(
        "cup_pos",
        &exchange(&mut c, true, &encode("cup_pos", &refund)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    // A refund above what is left (10000 - 3000): 64.
    let mut over = refund.clone();
    over["fields"]["11"] = json!("000053");
    over["fields"]["4"] = json!("000000008000");
    let a_bytes = exchange(&mut c, true, &encode("cup_pos", &over)).await;
    let a = answer("cup_pos", &a_bytes);
    assert_eq!(
        a.code_reason(),
        ("64".into(), "AMOUNT_EXCEEDS_REMAINING".into())
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_answers_96_acknowledges_nothing_and_recovers_with_the_storage() {
    let (storage, faults) = journal::FaultyStorage::new();
    let options = journal::Options {
        storage: Arc::new(storage),
        ..journal::Options::default()
    };
    let gw = start_with(options).await;
    let initial = gw.funds();
    let mut c = connect(&gw.listeners[0]).await;
    faults.set_fail_syncs(true);
    let sale = ascii("0200", "000000", 2500, 41, &[]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.code_reason(), ("96".into(), "STORE_UNAVAILABLE".into()));
    faults.set_fail_writes(true);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.code_reason(), ("96".into(), "STORE_UNAVAILABLE".into()));
    assert_eq!(gw.funds(), initial, "a 96 moved money");
    // The storage is back: the same sale (nothing of it was kept) is approved now, once.
    faults.set_fail_syncs(false);
    faults.set_fail_writes(false);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let rrn = a.rrn.clone().unwrap();
    let funds = gw.funds();
    assert_eq!(
        funds.unsettled_sales,
        initial.unsettled_sales + 2500,
        "the sale is held exactly once: {funds:?}"
    );
    // A refund of 1000 passes and leaves 1500 of the sale (DE54 type 90).
    let refund = ascii(
        "0200",
        "200000",
        1000,
        42,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &refund)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    assert_eq!(de54_amount(a.de54.as_deref().unwrap(), "90"), Some(1500));
    let after = gw.funds();
    assert_eq!(after.refunds_committed, initial.refunds_committed + 1000);

    // After a restart (journal replayed on the real file system) the ledger is exactly what
    // was acknowledged: the sale once, the refund once, nothing of the two 96s.
    drop(c);
    let gw = gw.restart().await;
    assert_eq!(gw.funds(), after, "the ledger after replay");
    let mut c = connect(&gw.listeners[0]).await;
    let over = ascii(
        "0200",
        "200000",
        1501,
        43,
        &[("37", rrn.clone()), ("90", de90(&sale))],
    );
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &over)).await,
    );
    assert_eq!(
        a.code_reason(),
        ("64".into(), "AMOUNT_EXCEEDS_REMAINING".into())
    );
    let mut repeat = sale.clone();
    repeat["mti"] = json!("0201");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &repeat)).await,
    );
    assert_eq!(a.code.as_str(), "00");
    assert_eq!(a.rrn.as_deref(), Some(rrn.as_str()));
    assert_eq!(gw.funds(), after, "probes after the restart moved nothing");
    gw.stop().await;
}

/// Today's MMDD in the cup merchant's time zone (+08:00), as a terminal would send in 61.3.
fn now_mmdd_local_plus8() -> String {
    common::mmdd(refundgate::clock::Clock::now_unix_s(&SystemClock) + 8 * 3600)
}

/// Sends an ascii1987 request and reads the answer.
async fn ascii_answer(c: &mut Client, req: &Json) -> Answer {
    answer(
        "ascii1987",
        &exchange(c, false, &encode("ascii1987", req)).await,
    )
}

/// An ascii1987 0500 of `terminal` (None: without DE41) of the sample merchant, with `extra`.
fn settlement(terminal: Option<&str>, stan: u32, extra: &[(&str, String)]) -> Json {
    let (_, _, de7) = common::now_de7();
    let mut fields = json!({"7": de7, "11": format!("{stan:06}"), "42": "MERCHANT 000001"});
    if let Some(t) = terminal {
        fields["41"] = json!(t);
    }
    for (k, v) in extra {
        fields[*k] = Json::String(v.clone());
    }
    json!({"mti": "0500", "fields": fields})
}

/// An ascii1987 sign-on (0800 DE70 001) of TERM0001.
fn ascii_sign_on(stan: u32) -> Json {
    let (_, _, de7) = common::now_de7();
    json!({"mti": "0800", "fields": {"7": de7, "11": format!("{stan:06}"), "41": "TERM0001",
        "42": "MERCHANT 000001", "70": "001"}})
}

/// Batch totals as ascii1987 DE 74/76/86/88: (debits count, amount), (credits count, amount).
fn ascii_totals(debits: (u64, u64), credits: (u64, u64)) -> Vec<(&'static str, String)> {
    vec![
        ("74", format!("{:010}", credits.0)),
        ("76", format!("{:010}", debits.0)),
        ("86", format!("{:016}", credits.1)),
        ("88", format!("{:016}", debits.1)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_by_an_unknown_or_absent_terminal_is_answered_03_ascii_and_97_cup_and_settles_nothing(
) {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let sale = ascii("0200", "000000", 2500, 1, &[]);
    assert_eq!(ascii_answer(&mut c, &sale).await.code, "00");
    for (terminal, stan) in [(Some("ZZZZ9999"), 2), (None, 3)] {
        let a = ascii_answer(&mut c, &settlement(terminal, stan, &[])).await;
        assert_eq!(a.mti, 510);
        assert_eq!(
            a.code_reason(),
            ("03".into(), "UNKNOWN_TERMINAL".into()),
            "{terminal:?}"
        );
    }
    // A configured terminal that never signed on may not settle either.
    let a = ascii_answer(&mut c, &settlement(Some("TERM0001"), 4, &[])).await;
    assert_eq!(a.code_reason(), ("03".into(), "UNKNOWN_TERMINAL".into()));
    let funds = gw.gateway.ledger().funds("MERCHANT 000001").unwrap();
    assert_eq!(funds.unsettled_sales, 2500, "nothing was paid out");
    // The same sale can still be voided: its batch is open.
    let void = ascii("0200", "020000", 2500, 5, &[("90", de90(&sale))]);
    assert_eq!(ascii_answer(&mut c, &void).await.code, "00");

    let mut cup = connect(&gw.listeners[1]).await;
    let stranger = json!({"mti": "0500", "fields": {"11": "000061", "41": "99999999",
        "42": "898310048990001", "60": "00000123201"}});
    let a = answer(
        "cup_pos",
        &exchange(&mut cup, true, &encode("cup_pos", &stranger)).await,
    );
    assert_eq!(a.code_reason(), ("97".into(), "UNKNOWN_TERMINAL".into()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_with_wrong_totals_is_answered_95_and_the_batch_stays_open_until_they_agree() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    assert_eq!(ascii_answer(&mut c, &ascii_sign_on(1)).await.code, "00");
    let sale = ascii("0200", "000000", 2500, 2, &[]);
    assert_eq!(ascii_answer(&mut c, &sale).await.code, "00");
    let wrong = settlement(Some("TERM0001"), 3, &ascii_totals((1, 2600), (0, 0)));
    let a = ascii_answer(&mut c, &wrong).await;
    assert_eq!(a.code_reason(), ("95".into(), "RECONCILE_ERROR".into()));
    // Still open: another sale joins the batch.
    let sale2 = ascii("0200", "000000", 1000, 4, &[]);
    assert_eq!(ascii_answer(&mut c, &sale2).await.code, "00");
    let funds = gw.gateway.ledger().funds("MERCHANT 000001").unwrap();
    assert_eq!(funds.unsettled_sales, 3500);
    let right = settlement(Some("TERM0001"), 5, &ascii_totals((2, 3500), (0, 0)));
    let a = ascii_answer(&mut c, &right).await;
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    // Its repeat gets the same answer, and the batch is closed: a void is a refund now.
    let mut again = right.clone();
    again["mti"] = json!("0501");
    assert_eq!(ascii_answer(&mut c, &again).await.code, "00");
    let void = ascii("0200", "020000", 2500, 6, &[("90", de90(&sale))]);
    let a = ascii_answer(&mut c, &void).await;
    assert_eq!(a.code_reason(), ("12".into(), "USE_REFUND".into()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversal_after_refund_is_answered_00_reversal_not_applied_and_the_funds_are_unchanged() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let sale = ascii("0200", "000000", 10_000, 1, &[]);
    let a = ascii_answer(&mut c, &sale).await;
    let rrn = a.rrn.unwrap();
    let refund = ascii(
        "0200",
        "200000",
        10_000,
        2,
        &[("37", rrn), ("90", de90(&sale))],
    );
    assert_eq!(ascii_answer(&mut c, &refund).await.code, "00");
    let before = gw.gateway.ledger().funds("MERCHANT 000001").unwrap();
    let reversal = ascii("0400", "000000", 10_000, 3, &[("90", de90(&sale))]);
    let a = ascii_answer(&mut c, &reversal).await;
    assert_eq!(a.mti, 410);
    assert_eq!(
        a.code_reason(),
        ("00".into(), "REVERSAL_NOT_APPLIED".into())
    );
    let after = gw.gateway.ledger().funds("MERCHANT 000001").unwrap();
    assert_eq!(after, before, "the card does not get its money back twice");
    assert_eq!(
        gw.gateway
            .ledger()
            .reversals_not_applied("MERCHANT 000001")
            .len(),
        1
    );
    gw.stop().await;
}

/// A request of the "strict" sample merchant (share 50 %, CNY) from its terminal 20000001.
fn strict(mti: &str, pc: &str, amount: u64, stan: u32, extra: &[(&str, String)]) -> Json {
    let mut r = ascii(mti, pc, amount, stan, extra);
    r["fields"]["41"] = json!("20000001");
    r["fields"]["42"] = json!("898310048990002");
    r["fields"]["49"] = json!("156");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_50_percent_share_de54_says_20_00_would_pass_and_20_01_is_declined_while_20_00_passes(
) {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let sale = strict("0200", "000000", 10_000, 1, &[]);
    let a = ascii_answer(&mut c, &sale).await;
    assert_eq!(a.code, "00");
    let rrn = a.rrn.unwrap();
    let refund = |stan: u32, amount: u64| {
        strict(
            "0200",
            "200000",
            amount,
            stan,
            &[("37", rrn.clone()), ("90", de90(&sale))],
        )
    };
    let a = ascii_answer(&mut c, &refund(2, 3_000)).await;
    assert_eq!(a.code, "00");
    let a = ascii_answer(&mut c, &refund(3, 6_000)).await;
    assert_eq!(a.code_reason(), ("61".into(), "REFUNDABLE_SHARE".into()));
    assert_eq!(
        a.de54.as_deref(),
        Some("0090156C0000000020000091156C0000000070000092156C000000002000")
    );
    let a = ascii_answer(&mut c, &refund(4, 2_001)).await;
    assert_eq!(a.code_reason(), ("61".into(), "REFUNDABLE_SHARE".into()));
    let a = ascii_answer(&mut c, &refund(5, 2_000)).await;
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    assert!(
        a.de54.unwrap().contains("0092156C000000000000"),
        "nothing more would pass"
    );
    // Another card naming the sale learns nothing of it.
    let mut other = refund(6, 100);
    other["fields"]["2"] = json!("4761739001010010");
    let a = ascii_answer(&mut c, &other).await;
    assert_eq!(a.code_reason(), ("14".into(), "PAN_MISMATCH".into()));
    assert_eq!(a.de54, None);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_settlement_compares_the_de48_totals_and_closes_only_this_terminals_batch() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[1]).await;
    let signon = exchange(&mut c, true, &vector_message("cup_bcd", "signon_0800")).await;
    assert_eq!(answer("cup_pos", &signon).code, "00");
    let mut sale = vector("cup_bcd", "sale_0200");
    sale["fields"].as_object_mut().unwrap().remove("64");
    let a = answer(
        "cup_pos",
        &exchange(&mut c, true, &encode("cup_pos", &sale)).await,
    );
    assert_eq!(a.code, "00");
    let amount: u64 = sale["fields"]["4"].as_str().unwrap().parse().unwrap();
    // DE48: domestic debits amount n12, count n3, credits amount n12, count n3, code n1,
    // then the same for foreign cards.
    let de48 = |debits: u64| format!("{debits:012}001{:012}000{}{:030}0", 0, 0, 0);
    let settle = |stan: &str, debits: u64| {
        json!({"mti": "0500", "fields": {"11": stan, "41": "10000001",
            "42": "898310048990001", "48": de48(debits), "60": "00000123201"}})
    };
    let a = answer(
        "cup_pos",
        &exchange(
            &mut c,
            true,
            &encode("cup_pos", &settle("000070", amount + 1)),
        )
        .await,
    );
    assert_eq!(a.code_reason(), ("95".into(), "RECONCILE_ERROR".into()));
    let a = answer(
        "cup_pos",
        &exchange(&mut c, true, &encode("cup_pos", &settle("000071", amount))).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let funds = gw.gateway.ledger().funds("898310048990001").unwrap();
    assert_eq!(funds.unsettled_sales, 0);
    // The settled terminal is on the next batch; its old batch number gets 77.
    let a = answer(
        "cup_pos",
        &exchange(&mut c, true, &encode("cup_pos", &settle("000072", 0))).await,
    );
    assert_eq!(a.code_reason(), ("77".into(), "BATCH_MISMATCH".into()));
    gw.stop().await;
}

/// One merchant whose batch is cut over daily at 23:00 UTC, with its ledger, a journal opened
/// with `options` and a gateway on them whose clock starts at `now`.
struct CutOverMerchant {
    _dir: tempfile::TempDir,
    merchants: MerchantSet,
    ledger: Arc<Ledger>,
    journal: Arc<Journal>,
    clock: Arc<refundgate::clock::ManualClock>,
    gateway: Gateway,
}

fn cut_over_merchant(options: journal::Options, now: i64) -> CutOverMerchant {
    let dir = tempfile::tempdir().unwrap();
    let merchants = MerchantSet::from_toml_str(
        "[[merchants]]\nid = \"MERCHANT 000001\"\nutc_offset = \"+00:00\"\ncutover_at = \"23:00\"\nterminals = [{ id = \"TERM0001\" }]\n",
    )
    .unwrap();
    let ledger = Arc::new(Ledger::new(&merchants, PanKey::new(&[7; 16])));
    let (journal, _) = Journal::open(dir.path().join("journal"), options).unwrap();
    let journal = Arc::new(journal);
    let clock = Arc::new(refundgate::clock::ManualClock::new(now));
    let gateway = Gateway::new(
        Arc::clone(&ledger),
        Some(Arc::clone(&journal)),
        clock.clone(),
        vec![Link::plain(&ASCII1987)],
    );
    CutOverMerchant {
        _dir: dir,
        merchants,
        ledger,
        journal,
        clock,
        gateway,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_off_the_connection_threads_does_not_wait_for_their_idle_hint() {
    use refundgate::server::Dispatch;
    // Light load throughout, and a gather nobody would sit out.
    let options = journal::Options {
        gather: journal::GatherConfig {
            wait: Duration::from_secs(60),
            above_per_s: u64::MAX,
        },
        ..journal::Options::default()
    };
    // 2026-11-25 23:00:00 UTC: the cut-over is due.
    let m = cut_over_merchant(options, 1_795_647_600);
    // Connection threads have said they were idle once: from now on a record at light load
    // waits for their next hint, which a cut-over (run by its own loop) never gives.
    m.gateway.idle();
    let ran = tokio::time::timeout(Duration::from_secs(10), m.gateway.run_cutovers()).await;
    assert_eq!(
        ran.expect("the cut-over waited for a connection thread's idle hint"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_cut_over_runs_from_the_injected_clock_and_is_journaled_before_it_counts() {
    // 2026-11-25 22:59:00 UTC.
    let CutOverMerchant {
        _dir,
        merchants,
        ledger,
        journal,
        clock,
        gateway,
    } = cut_over_merchant(journal::Options::default(), 1_795_647_540);
    let sale = ascii("0200", "000000", 2500, 1, &[]);
    let (outcome, summary) = gateway.handle(0, &encode("ascii1987", &sale)).await;
    assert!(matches!(outcome, refundgate::flow::Outcome::Reply(_)));
    assert_eq!(summary.code, Some("00"));
    assert_eq!(gateway.run_cutovers().await, 0, "22:59: not yet");
    clock.advance(60);
    assert_eq!(gateway.run_cutovers().await, 1);
    assert_eq!(gateway.run_cutovers().await, 0, "once a day");
    assert_eq!(ledger.funds("MERCHANT 000001").unwrap().unsettled_sales, 0);
    // The journal holds it: a ledger rebuilt from it has the batch settled too.
    drop(gateway);
    let mut recovered = journal.reread().unwrap();
    let (rebuilt, _) =
        refundgate::flow::recover_ledger(&merchants, PanKey::new(&[7; 16]), &mut recovered, None)
            .unwrap();
    assert_eq!(
        rebuilt.funds("MERCHANT 000001"),
        ledger.funds("MERCHANT 000001")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_of_a_host_declined_refund_gets_the_hosts_code_again_with_de54() {
    use refundgate::host_sim::{Faults, Host, HostListener, HostOptions};
    use refundgate::serve::{self, ServeArgs};
    let dir = tempfile::tempdir().unwrap();
    let host = Host::bind(HostOptions {
        listeners: vec![HostListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            dialect: &ASCII1987,
            framing: Framing::Binary2,
        }],
        admin: None,
        faults: Faults::default(),
    })
    .await
    .unwrap();
    let host_addr = host.listeners()[0].addr;
    let control = host.control();
    let (host_stop, host_stopped) = oneshot::channel::<()>();
    let host_task = tokio::spawn(host.run(async move {
        let _ = host_stopped.await;
    }));
    let config = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\n[journal]\ndir = \"{}\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"ascii1987\"\n\
         [[upstreams]]\nname = \"bank\"\naddrs = [\"{host_addr}\"]\ndialect = \"ascii1987\"\nframing = \"binary2\"\ntimeout_ms = 5000\n\
         tls = {{ insecure_skip_verify = true }}\n[routes]\nmerchants = {{ \"MERCHANT 000001\" = \"bank\" }}\n",
        dir.path().join("journal").display()
    );
    let path = dir.path().join("refundgate.toml");
    std::fs::write(&path, config).unwrap();
    let prepared = serve::prepare(&ServeArgs {
        config: Some(path),
        merchants: None,
        journal_dir: None,
    })
    .map_err(|e| e.message)
    .unwrap();
    let server = Server::bind(prepared.config).await.unwrap();
    server.readiness().set_merchants_loaded(true);
    let listeners = server.listeners();
    let upstreams = Arc::new(prepared.upstreams.unwrap().start());
    let gateway = Arc::new(prepared.gateway.with_upstreams(Arc::clone(&upstreams)));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = server
            .run(gateway, async move {
                let _ = stopped.await;
            })
            .await;
    });
    let started = std::time::Instant::now();
    while !upstreams.link("bank").is_some_and(|l| l.is_up()) {
        assert!(started.elapsed() < WAIT, "link up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = connect(&listeners[0]).await;
    let sale = ascii("0200", "000000", 10_000, 1, &[]);
    let a = ascii_answer(&mut c, &sale).await;
    assert_eq!(a.code, "00");
    control
        .set_faults(Faults {
            decline: Some("N7".into()),
            ..Faults::default()
        })
        .unwrap();
    let refund = ascii(
        "0200",
        "200000",
        4_000,
        2,
        &[("37", a.rrn.unwrap()), ("90", de90(&sale))],
    );
    let first = ascii_answer(&mut c, &refund).await;
    assert_eq!(first.code_reason(), ("N7".into(), "HOST_DECLINED".into()));
    let de54 = first.de54.clone().expect("the original was found: DE54");
    assert!(de54.contains("0092840C000000010000"), "{de54}");
    control.set_faults(Faults::default()).unwrap();
    let mut repeat = refund.clone();
    repeat["mti"] = json!("0201");
    let again = ascii_answer(&mut c, &repeat).await;
    assert_eq!(
        again.code_reason(),
        first.code_reason(),
        "the host's code, not 05"
    );
    assert_eq!(again.de54, first.de54);
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    upstreams.shutdown().await;
    let _ = host_stop.send(());
    let _ = tokio::time::timeout(WAIT, host_task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_before_its_sale_makes_the_late_sale_and_a_refund_of_it_22() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    let sale = ascii("0200", "000000", 2500, 1, &[]);
    let reversal = ascii("0400", "000000", 2500, 2, &[("90", de90(&sale))]);
    let a = ascii_answer(&mut c, &reversal).await;
    assert_eq!(
        a.code_reason(),
        ("00".into(), "REVERSAL_NOTHING_TO_UNDO".into())
    );
    let a = ascii_answer(&mut c, &sale).await;
    assert_eq!(a.code_reason(), ("22".into(), "ORIGINAL_REVERSED".into()));
    let refund = ascii("0200", "200000", 100, 3, &[("90", de90(&sale))]);
    let a = ascii_answer(&mut c, &refund).await;
    assert_eq!(a.code_reason(), ("22".into(), "ORIGINAL_REVERSED".into()));
    assert_eq!(
        gw.gateway
            .ledger()
            .funds("MERCHANT 000001")
            .unwrap()
            .unsettled_sales,
        0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_void_is_answered_when_the_whole_same_day_sale_could_be_voided_and_a_partial_refund_passes(
) {
    let gw = start().await;
    let mut c = connect(&gw.listeners[0]).await;
    // The "strict" merchant takes same-day refunds of a whole sale as voids.
    let sale = strict("0200", "000000", 10_000, 1, &[]);
    let a = ascii_answer(&mut c, &sale).await;
    assert_eq!(a.code, "00");
    let rrn = a.rrn.unwrap();
    let refund = |stan: u32, amount: u64| {
        strict(
            "0200",
            "200000",
            amount,
            stan,
            &[("37", rrn.clone()), ("90", de90(&sale))],
        )
    };
    // The whole sale from its own terminal, the same day: the void would pass, so USE_VOID,
    // and DE54 92 says what a refund may be instead (its 50 % share).
    let a = ascii_answer(&mut c, &refund(2, 10_000)).await;
    assert_eq!(a.code_reason(), ("12".into(), "USE_VOID".into()));
    assert!(a.de54.unwrap().contains("0092156C000000005000"));
    // A partial refund cannot be a void: it is decided on its merits (on main: USE_VOID).
    let a = ascii_answer(&mut c, &refund(3, 1_000)).await;
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_without_a_valid_mac_on_a_mac_link_is_answered_a0_and_settles_nothing() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[2]).await;
    let signon = exchange(&mut c, true, &vector_message("cup_bcd", "signon_0800")).await;
    assert_eq!(answer("cup_pos", &signon).code, "00");
    let a_bytes = exchange(&mut c, true, &vector_message("cup_bcd", "sale_0200")).await;
    assert_eq!(answer("cup_pos", &a_bytes).code, "00");
    let settle = json!({"mti": "0500", "fields": {"11": "000080", "41": "10000001",
        "42": "898310048990001", "60": "00000123201"}});
    let a = answer(
        "cup_pos",
        &exchange(&mut c, true, &encode("cup_pos", &settle)).await,
    );
    assert_eq!(a.code_reason(), ("A0".into(), "MAC_INVALID".into()));
    let funds = gw.gateway.ledger().funds("898310048990001").unwrap();
    assert!(funds.unsettled_sales > 0, "nothing was paid out");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_answers_96_within_the_request_deadline_and_keeps_the_connection_usable() {
    let (storage, faults) = journal::FaultyStorage::new();
    let options = journal::Options {
        storage: Arc::new(storage),
        ..journal::Options::default()
    };
    let deadline = Duration::from_millis(500);
    let gw = start_configured(options, deadline).await;
    let mut c = connect(&gw.listeners[0]).await;
    faults.set_hang_syncs(true);
    let sale = ascii("0200", "000000", 2500, 61, &[]);
    let sent = std::time::Instant::now();
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &sale)).await,
    );
    let waited = sent.elapsed();
    assert_eq!(a.code_reason(), ("96".into(), "STORE_UNAVAILABLE".into()));
    assert!(
        waited >= deadline && waited <= deadline * 3,
        "answered after {waited:?} with a deadline of {deadline:?}"
    );
    // The connection is not held by the hung disk: an echo on it is answered.
    let echo = json!({"mti": "0800", "fields": {"7": "1204093015", "11": "000062", "70": "301"}});
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &echo)).await,
    );
    assert_eq!(a.code, "00");
    // The disk comes back: the sale's record became durable after all (the outcome the 96
    // left open), and its repeat gets the stored answer.
    faults.set_hang_syncs(false);
    let mut again = sale.clone();
    again["mti"] = json!("0201");
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &again)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    gw.stop().await;
}

/// `doc` (a `cup_pos` message) with DE64 set to the CUP MAC under `key`: DE64 is the last
/// element, so the MAB is everything before its 8 bytes.
fn cup_maced(doc: &Json, key: &MacKey) -> Vec<u8> {
    let mut doc = doc.clone();
    doc["fields"]["64"] = json!("00000000");
    let mut bytes = encode("cup_pos", &doc);
    let n = bytes.len();
    let value = mac::compute(key, &bytes[..n - 8]);
    bytes[n - 8..].copy_from_slice(&value);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_sign_on_with_a_wrong_mac_on_a_mac_link_is_declined_a0() {
    let gw = start().await;
    let mut c = connect(&gw.listeners[2]).await;
    let wrong = MacKey::from_hex(MacAlgorithm::CupPosEcb, "FEDCBA9876543210").unwrap();
    let signon = cup_maced(&vector("cup_bcd", "signon_0800"), &wrong);
    let a = answer("cup_pos", &exchange(&mut c, true, &signon).await);
    assert_eq!(a.code_reason(), ("A0".into(), "MAC_INVALID".into()));
    // Under the link's key it is approved.
    let right = MacKey::from_hex(MacAlgorithm::CupPosEcb, MAK).unwrap();
    let signon = cup_maced(&vector("cup_bcd", "signon_0800"), &right);
    let a = answer("cup_pos", &exchange(&mut c, true, &signon).await);
    assert_eq!(a.code.as_str(), "00");
    gw.stop().await;
}

/// Starts a gateway without a journal on `listeners` (MAC keys and identities as configured),
/// with `keys` as the terminal master keys.
async fn start_on(listeners: Vec<ListenerConfig>, keys: TerminalKeys) -> Running {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = Config::default();
    config.admin.addr = "127.0.0.1:0".parse().unwrap();
    let links = listeners
        .iter()
        .map(|l| {
            let mut link = Link::plain(l.dialect);
            link.mac = l
                .mac
                .as_ref()
                .map(|m| MacKey::from_hex(MacAlgorithm::CupPosEcb, &m.key).unwrap());
            link.identities = Identities::from_config(&l.identities);
            link
        })
        .collect();
    config.listeners = listeners;
    let merchants = MerchantSet::embedded().unwrap();
    let ledger = Ledger::new(&merchants, PanKey::new(&PAN_KEY));
    let gateway =
        Gateway::new(Arc::new(ledger), None, Arc::new(SystemClock), links).with_terminal_keys(keys);
    serve_gateway(config, gateway, dir).await
}

/// The vectors' TMK of terminal 10000001 of merchant 898310048990001.
const TMK: &str = "11223344556677888877665544332211";

/// Signs on and returns the MAK recovered from DE62 under [`TMK`], checking the answer.
async fn sign_on_for_mak(c: &mut Client) -> MacKey {
    let bytes = exchange(c, true, &vector_message("cup_bcd", "signon_0800")).await;
    let m = decode("cup_pos", &bytes);
    assert_eq!(m.response_code(), Some("00"));
    let de62 = m.field_bytes(62).expect("working keys in DE62");
    assert_eq!(de62.len(), 24, "PIK 8 + check 4 + MAK 8 + check 4");
    let tmk = DesKey::from_hex(TMK).unwrap();
    // Decryption checks each key against the check value that follows it.
    let (pik, mak) = mac::decrypt_cup_signon_keys(&tmk, de62).unwrap();
    assert_eq!(de62[8..12], pik.check_value());
    assert_eq!(de62[20..24], mak.check_value());
    assert_eq!(
        m.mac().map(|(mab, v)| mac::verify(&mak, mab, v)),
        Some(true),
        "the sign-on answer is MACed with the new MAK"
    );
    mak
}

fn cup_sale(stan: u32) -> Json {
    let mut sale = vector("cup_bcd", "sale_0200");
    sale["fields"]["11"] = json!(format!("{stan:06}"));
    sale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_sign_on_returns_working_keys_under_the_tmk_and_only_the_newest_mak_is_accepted() {
    let mut keys = TerminalKeys::empty();
    assert!(keys.insert(
        "898310048990001",
        "10000001",
        DesKey::from_hex(TMK).unwrap()
    ));
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut cup_mac = ListenerConfig::new(addr, &CUP_POS, Framing::Binary2);
    cup_mac.mac = Some(MacConfig {
        algorithm: "cup_ecb".into(),
        key: MAK.into(),
    });
    let gw = start_on(vec![cup_mac], keys).await;
    let mut c = connect(&gw.listeners[0]).await;
    let link_key = MacKey::from_hex(MacAlgorithm::CupPosEcb, MAK).unwrap();
    let code = |bytes: &[u8]| {
        decode("cup_pos", bytes)
            .response_code()
            .unwrap()
            .to_string()
    };

    // Before its first sign-on the terminal has no working key; the link's key is not its.
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(101), &link_key)).await;
    assert_eq!(code(&a), "A0");

    let first = sign_on_for_mak(&mut c).await;
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(102), &first)).await;
    assert_eq!(code(&a), "00");
    let m = decode("cup_pos", &a);
    assert_eq!(
        m.mac().map(|(mab, v)| mac::verify(&first, mab, v)),
        Some(true),
        "the approval carries a MAC under the terminal's MAK"
    );

    // A new sign-on rotates the keys: the old MAK (and the link's key) are refused.
    let second = sign_on_for_mak(&mut c).await;
    assert_ne!(first.check_value(), second.check_value());
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(103), &first)).await;
    assert_eq!(code(&a), "A0");
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(104), &link_key)).await;
    assert_eq!(code(&a), "A0");
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(105), &second)).await;
    assert_eq!(code(&a), "00");

    // Sign-on on a MAC link is rate-limited per terminal: 5 a minute, then 58.
    for _ in 2..5 {
        sign_on_for_mak(&mut c).await;
    }
    let a = exchange(&mut c, true, &vector_message("cup_bcd", "signon_0800")).await;
    let a = answer("cup_pos", &a);
    assert_eq!(
        a.code_reason(),
        ("58".into(), "TERMINAL_NOT_PERMITTED".into())
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_terminal_a_sending_as_terminal_b_gets_58() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "refundgate test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["terminal-a.example".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "terminal A");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut mtls = ListenerConfig::new(addr, &ASCII1987, Framing::Binary2);
    mtls.tls = TlsConfig {
        client_ca: Some(ca_path),
        ..TlsConfig::default()
    };
    mtls.identities = vec![IdentityConfig {
        subject: Some("CN=terminal A".into()),
        san: None,
        sha256: None,
        merchant: "MERCHANT 000001".into(),
        terminals: vec!["TERM0001".into()],
    }];
    let gw = start_on(vec![mtls], TerminalKeys::empty()).await;
    let identity = (
        client_cert.der().clone(),
        PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
    );
    let mut c = connect_as(&gw.listeners[0], Some(identity)).await;
    let before = metric(
        gw.admin,
        "refundgate_terminal_not_permitted_total{dialect=\"ascii1987\"}",
    )
    .await;

    let own = ascii("0200", "000000", 1_000, 1, &[]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &own)).await,
    );
    assert_eq!(a.code_reason(), ("00".into(), "APPROVED".into()));
    let other = ascii("0200", "000000", 1_000, 2, &[("41", "TERM0002".into())]);
    let a = answer(
        "ascii1987",
        &exchange(&mut c, false, &encode("ascii1987", &other)).await,
    );
    assert_eq!(
        a.code_reason(),
        ("58".into(), "TERMINAL_NOT_PERMITTED".into())
    );
    let after = metric(
        gw.admin,
        "refundgate_terminal_not_permitted_total{dialect=\"ascii1987\"}",
    )
    .await;
    assert!(after >= before + 1.0, "counted: {before} → {after}");
    gw.stop().await;
}

async fn connect_as(
    info: &ListenerInfo,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(info.cert_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
    };
    let tcp = TcpStream::connect(info.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    Framed::new(tls, FrameCodec::new(info.framing, false, 8192))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_terminal_keys_from_a_private_file_and_refuses_a_loose_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key_file = keys.join("terminal-keys.toml");
    refundgate::at_rest::write_new_private(
        &key_file,
        format!(
            "[[terminal]]\nmerchant = \"898310048990001\"\nterminal = \"10000001\"\ntmk = \"{TMK}\"\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let path = dir.path().join("refundgate.toml");
    let toml = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\n\
         [journal]\ndir = \"{}\"\nsegment_bytes = {SEGMENT_BYTES}\n\
         [security]\nterminal_keys = \"{}\"\n\
         [[listeners]]\naddr = \"127.0.0.1:0\"\ndialect = \"cup_pos\"\n",
        dir.path().join("journal").display(),
        key_file.display()
    );
    std::fs::write(&path, toml).unwrap();
    let args = serve::ServeArgs {
        config: Some(path),
        merchants: None,
        journal_dir: None,
    };

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = serve::prepare(&args)
        .err()
        .expect("a key file others may read");
    assert_eq!(refused.code, 74, "{}", refused.message);
    assert!(refused.message.contains("chmod 600"), "{}", refused.message);
    assert!(!refused.message.contains(TMK));

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let prepared = serve::prepare(&args).map_err(|e| e.message).unwrap();
    let gw = serve_gateway(prepared.config, prepared.gateway, dir).await;
    let mut c = connect(&gw.listeners[0]).await;
    let mak = sign_on_for_mak(&mut c).await;
    let a = exchange(&mut c, true, &cup_maced(&cup_sale(201), &mak)).await;
    assert_eq!(answer("cup_pos", &a).code.as_str(), "00");
    gw.stop().await;
}

/// Two merchants (each with one terminal), a journal and a gateway on them.
fn two_merchant_gateway(dir: &tempfile::TempDir) -> Gateway {
    let merchants = MerchantSet::from_toml_str(
        "[[merchants]]\nid = \"MERCHANT 000001\"\nterminals = [{ id = \"TERM0001\" }]\n\
         [[merchants]]\nid = \"MERCHANT 000002\"\nterminals = [{ id = \"TERM0002\" }]\n",
    )
    .unwrap();
    let ledger = Arc::new(Ledger::new(&merchants, PanKey::new(&PAN_KEY)));
    let (journal, _) =
        Journal::open(dir.path().join("journal"), journal::Options::default()).unwrap();
    Gateway::new(
        ledger,
        Some(Arc::new(journal)),
        Arc::new(SystemClock),
        vec![Link::plain(&ASCII1987)],
    )
}

/// `req` as sent by merchant 000002's terminal.
fn of_merchant_2(mut req: Json) -> Json {
    req["fields"]["41"] = json!("TERM0002");
    req["fields"]["42"] = json!("MERCHANT 000002");
    req
}

/// What a terminal acts on in an answer: MTI, DE39, DE44, DE54.
fn answered(out: &refundgate::flow::Outcome) -> (u16, String, String, Option<String>) {
    match out {
        refundgate::flow::Outcome::Reply(bytes) => {
            let a = answer("ascii1987", bytes);
            (a.mti, a.code, a.reason, a.de54)
        }
        refundgate::flow::Outcome::Drop => (0, String::new(), String::new(), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_frames_gets_the_answers_its_messages_get_one_by_one() {
    let sale_a = ascii("0200", "000000", 10_000, 1, &[]);
    let sale_b = of_merchant_2(ascii("0200", "000000", 20_000, 2, &[]));
    let echo = json!({"mti": "0800", "fields": {"7": "1125093015", "11": "000009", "70": "301"}});
    let refund_a = ascii("0200", "200000", 4_000, 3, &[("90", de90(&sale_a))]);
    // With 4,000 refunded, 7,000 more is over what is left of the 10,000 sale.
    let refund_a_over = ascii("0200", "200000", 7_000, 4, &[("90", de90(&sale_a))]);
    let mut sale_b_other_body = sale_b.clone();
    sale_b_other_body["fields"]["4"] = json!("000000020001");
    let batch: Vec<Vec<u8>> = [
        &sale_a,
        &sale_b,
        &refund_a,
        &echo,
        &refund_a_over,
        &sale_a,            // a repeat: the stored answer
        &sale_b_other_body, // the same key with another body: 94
        &refund_a,          // a repeat of the refund
    ]
    .iter()
    .map(|doc| encode("ascii1987", doc))
    .collect();

    let dir = tempfile::tempdir().unwrap();
    let together = two_merchant_gateway(&dir);
    let mut out = Vec::new();
    together.handle_batch(0, &batch, &mut out).await;
    let together: Vec<_> = out.iter().map(|(o, _)| answered(o)).collect();

    let dir = tempfile::tempdir().unwrap();
    let alone = two_merchant_gateway(&dir);
    let mut one_by_one = Vec::new();
    for body in &batch {
        one_by_one.push(answered(&alone.handle(0, body).await.0));
    }

    assert_eq!(together, one_by_one);
    let codes: Vec<&str> = together.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(
        codes,
        ["00", "00", "00", "00", "64", "00", "94", "00"],
        "{together:?}"
    );
    assert_eq!(together[3].0, 810, "the echo keeps its place in the batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_naming_two_merchants_in_opposite_orders_at_once_all_complete() {
    // Each batch takes one merchant's shard, then the other's: with the journal's queue
    // held from one merchant into the next, two such batches in opposite orders would wait
    // on each other for ever.
    let dir = tempfile::tempdir().unwrap();
    let gateway = Arc::new(two_merchant_gateway(&dir));
    let batches = |first_b: bool, stan0: u32| -> Vec<Vec<Vec<u8>>> {
        (0..150u32)
            .map(|i| {
                (0..4u32)
                    .map(|j| {
                        let sale = ascii("0200", "000000", 100, stan0 + i * 4 + j, &[]);
                        let sale = if (j % 2 == 0) == first_b {
                            of_merchant_2(sale)
                        } else {
                            sale
                        };
                        encode("ascii1987", &sale)
                    })
                    .collect()
            })
            .collect()
    };
    // Each on a thread of its own, so that a deadlock (which blocks the threads, not just
    // their tasks) fails this test instead of hanging it.
    let (done, results) = std::sync::mpsc::channel();
    for (first_b, stan0) in [(false, 1), (true, 100_001)] {
        let gateway = Arc::clone(&gateway);
        let batches = batches(first_b, stan0);
        let done = done.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let approved = rt.block_on(async {
                let mut approved = 0;
                for b in batches {
                    let mut out = Vec::new();
                    gateway.handle_batch(0, &b, &mut out).await;
                    approved += out.iter().filter(|(o, _)| answered(o).1 == "00").count();
                }
                approved
            });
            let _ = done.send(approved);
        });
    }
    let mut both = Vec::new();
    for _ in 0..2 {
        both.push(
            results
                .recv_timeout(Duration::from_secs(30))
                .expect("two batches in opposite merchant orders waited on each other"),
        );
    }
    assert_eq!(both, [600, 600]);
}
