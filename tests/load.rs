//! The load generator against a small in-process TLS responder that answers like
//! `ceiling serve` (response MTI, DE 3, 4, 11, 12, 13, 37, 41, 42 echoed, DE38 and DE39 added),
//! in both dialects. The integrator points the same kind of test at the real gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use refundgate::dialect::{ASCII1987, CUP_POS, ISO87B};
use refundgate::iso8583::{self, FieldList, Value};
use refundgate::load::{self, Dialect, LoadArgs, LoadError};
use rustls::pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// A running responder: its address, the PEM of its self-signed certificate, and how many
/// request frames it has read.
struct Responder {
    addr: std::net::SocketAddr,
    ca: PathBuf,
    frames: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

/// Starts a responder on 127.0.0.1:0 answering every request with DE39 `code`.
async fn responder(dialect: Dialect, code: &'static str) -> Responder {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frames = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&frames);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let codec = LengthDelimitedCodec::builder()
                    .length_field_length(2)
                    .new_codec();
                let mut framed = Framed::new(tls, codec);
                let mut rrn = 0u64;
                while let Some(Ok(frame)) = framed.next().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    rrn += 1;
                    let Some(answer) = answer(dialect, &frame, code, rrn) else {
                        return;
                    };
                    if framed.send(answer.freeze()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Responder {
        addr,
        ca,
        frames,
        _dir: dir,
    }
}

/// The answer to one request frame body, like the ceiling's (plus DE60 for `cup_pos`, so a
/// sign-on answer carries the batch).
fn answer(dialect: Dialect, frame: &[u8], code: &'static str, rrn: u64) -> Option<BytesMut> {
    let head = dialect.header_bytes();
    let msg = iso8583::decode(dialect.spec(), frame.get(head..)?).ok()?;
    let mut f: FieldList<'_, 32> = FieldList::new();
    for n in [3, 4, 11, 12, 13, 37, 41, 42, 60] {
        f.echo(&msg, n).ok()?;
    }
    let rrn_text = format!("{rrn:012}");
    if !msg.has(37) {
        f.set(37, Value::Text(rrn_text.as_bytes())).ok()?;
    }
    if msg.mti().class() == 2 {
        f.set(38, Value::Text(b"000001")).ok()?;
    }
    f.set(39, Value::Text(code.as_bytes())).ok()?;
    let mut out = BytesMut::new();
    if dialect.has_tpdu() {
        out.extend_from_slice(&hex::decode("6000000003603100310000").ok()?);
    }
    iso8583::encode(dialect.spec(), msg.mti().response(), f.as_slice(), &mut out).ok()?;
    Some(out)
}

fn write_scenario(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const ASCII_SCENARIO: &str = r#"
dialect = "ascii1987"

[[session]]
name = "sale"
weight = 3
[[session.step]]
name = "sale"
mti = "0200"
expect = { code = "00" }
fields = { 2 = "4761739001010119", 3 = "000000", 4 = "000000002500", 7 = "{de7}", 11 = "{stan}", 12 = "{time}", 13 = "{date}", 41 = "TERM0001", 42 = "MERCHANT 000001", 49 = "840" }

[[session]]
name = "sale-refund-void"
[[session.step]]
name = "sale"
mti = "0200"
expect = { code = "00" }
fields = { 2 = "4761739001010119", 3 = "000000", 4 = "000000002500", 7 = "{de7}", 11 = "{stan}", 41 = "TERM0001", 42 = "MERCHANT 000001", 49 = "840" }
[[session.step]]
name = "refund"
mti = "0200"
expect = { code = "00" }
fields = { 3 = "200000", 4 = "000000001500", 7 = "{de7}", 11 = "{stan}", 37 = "{sale.ans.37}", 41 = "TERM0001", 42 = "MERCHANT 000001", 90 = "0200{sale.req.11}{sale.req.7}0000001234500000000000" }
[[session.step]]
name = "repeat"
mti = "0201"
copy = "refund"
expect = { code = "00" }
"#;

fn args(r: &Responder, scenario: PathBuf) -> LoadArgs {
    let mut a = LoadArgs::new(r.addr.to_string(), scenario);
    a.ca = Some(r.ca.clone());
    a.server_name = Some("localhost".into());
    a.timeout = 5.0;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_a_correct_responder_is_verified() {
    let r = responder(&ASCII1987, "00").await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(&r, write_scenario(dir.path(), "s.toml", ASCII_SCENARIO));
    a.connections = 2;
    a.in_flight = 4;
    a.count = Some(300);
    let report = load::run(a).await.unwrap();
    assert_eq!(report.mismatches, 0, "{report}");
    assert_eq!(report.sent, 300, "{report}");
    assert_eq!(report.answered, 300, "{report}");
    assert_eq!(report.verified, 300, "{report}");
    assert_eq!(report.codes.get("00"), Some(&300));
    assert!(report.sessions_completed > 0);
    assert!(report.is_clean(), "{report}");
    assert!(report.latency_us.max >= report.latency_us.p50);
    assert!(
        report.send_lag_us.is_none(),
        "a closed loop has no send schedule"
    );
}

/// A dialect that is only data: the scenario names it, requests go out in its bytes (binary
/// bitmaps, BCD) and answers are read with it; the responder decodes with the iso87b spec, so
/// a request in any other form would go unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iso87b_scenario_is_sent_and_verified_in_iso87b() {
    let r = responder(&ISO87B, "00").await;
    let dir = tempfile::tempdir().unwrap();
    let text = ASCII_SCENARIO.replace("dialect = \"ascii1987\"", "dialect = \"iso87b\"");
    let path = write_scenario(dir.path(), "iso87b.toml", &text);
    let mut a = args(&r, path.clone());
    a.dialect = Some(&ISO87B);
    a.count = Some(40);
    let report = load::run(a).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!((report.verified, report.codes.get("00")), (40, Some(&40)));
    let mut wrong = args(&r, path);
    wrong.dialect = Some(&ASCII1987);
    let Err(LoadError::Usage(e)) = load::run(wrong).await else {
        panic!("a --dialect other than the scenario's was accepted");
    };
    assert!(e.contains("iso87b"), "{e}");
}

/// A scenario can bring its dialect as a file: `dialect_file` beside it is loaded first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_brings_a_dialect_that_is_only_a_file() {
    let r = responder(&ISO87B, "00").await;
    let dir = tempfile::tempdir().unwrap();
    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let spec = std::fs::read_to_string(specs.join("iso87b.toml"))
        .unwrap()
        .replace("name = \"iso87b\"", "name = \"iso87y\"");
    std::fs::write(dir.path().join("iso87y.toml"), spec).unwrap();
    let dialect = std::fs::read_to_string(specs.join("iso87b.dialect.toml"))
        .unwrap()
        .replace("name = \"iso87b\"", "name = \"iso87y\"")
        .replace("spec = \"iso87b.toml\"", "spec = \"iso87y.toml\"");
    std::fs::write(dir.path().join("iso87y.dialect.toml"), dialect).unwrap();
    let text = ASCII_SCENARIO.replace(
        "dialect = \"ascii1987\"",
        "dialect = \"iso87y\"\ndialect_file = \"iso87y.dialect.toml\"",
    );
    let mut a = args(&r, write_scenario(dir.path(), "scenario.toml", &text));
    a.count = Some(20);
    let report = load::run(a).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!((report.verified, report.codes.get("00")), (20, Some(&20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_response_code_is_counted_as_a_mismatch() {
    let r = responder(&ASCII1987, "05").await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(&r, write_scenario(dir.path(), "s.toml", ASCII_SCENARIO));
    a.in_flight = 2;
    a.count = Some(40);
    let report = load::run(a).await.unwrap();
    assert_eq!(report.answered, 40, "{report}");
    assert_eq!(report.mismatches, 40, "{report}");
    assert_eq!(report.verified, 0);
    assert_eq!(report.codes.get("05"), Some(&40));
    let first = &report.mismatch_examples[0];
    assert_eq!(first.what, "DE39");
    assert!(
        first.expected.contains("DE39 00") && first.got.contains("DE39 05"),
        "{first:?}"
    );
    assert!(!report.is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cup_pos_sessions_use_the_batch_of_the_setup_sign_on() {
    let r = responder(&CUP_POS, "00").await;
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
        dialect = "cup_pos"
        utc_offset = "+08:00"
        [[setup]]
        name = "signon"
        mti = "0800"
        expect = { code = "00" }
        fields = { 11 = "{stan}", 41 = "10000001", 42 = "898310048990001", 60 = "00000123001" }
        [[session]]
        name = "sale-refund"
        [[session.step]]
        name = "sale"
        mti = "0200"
        expect = { code = "00" }
        fields = { 2 = "6222021234567890123", 3 = "000000", 4 = "000000010000", 11 = "{stan}", 22 = "021", 41 = "10000001", 42 = "898310048990001", 49 = "156", 60 = "22{signon.ans.60[2..8]}000" }
        [[session.step]]
        name = "refund"
        mti = "0220"
        expect = { code = "00", mti = "0230" }
        fields = { 2 = "{sale.req.2}", 3 = "200000", 4 = "000000003000", 11 = "{stan}", 37 = "{sale.ans.37}", 41 = "10000001", 42 = "898310048990001", 49 = "156", 60 = "25{signon.ans.60[2..8]}000", 61 = "{sale.req.60[2..8]}{sale.req.11}{date}" }
    "#;
    let mut a = args(&r, write_scenario(dir.path(), "cup.toml", text));
    a.dialect = Some(&CUP_POS);
    a.in_flight = 3;
    a.count = Some(60);
    let report = load::run(a).await.unwrap();
    assert!(report.is_clean(), "{report}");
    // --count counts requests: when the three slots claim the last of the 60 in an unlucky
    // order, one two-step session is cut after its sale.
    assert!((29..=30).contains(&report.sessions_completed), "{report}");
    assert_eq!(report.verified, 60, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_sign_on_stops_the_run_before_the_load() {
    let r = responder(&CUP_POS, "05").await;
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
        dialect = "cup_pos"
        [[setup]]
        name = "signon"
        mti = "0800"
        expect = { code = "00" }
        fields = { 11 = "{stan}", 41 = "10000001", 42 = "898310048990001", 60 = "00000123001" }
        [[session]]
        name = "sale"
        [[session.step]]
        name = "sale"
        mti = "0200"
        expect = { code = "00" }
        fields = { 3 = "000000", 4 = "000000010000", 11 = "{stan}", 41 = "10000001", 60 = "22{signon.ans.60[2..8]}000" }
    "#;
    let mut a = args(&r, write_scenario(dir.path(), "cup.toml", text));
    a.count = Some(10);
    let e = load::run(a).await.unwrap_err();
    assert!(
        matches!(e, LoadError::Setup(ref m) if m.contains("DE39 05")),
        "{e}"
    );
    assert_eq!(e.exit_code(), load::EXIT_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_at_the_rate_asked() {
    const RATE: f64 = 200.0;
    const DURATION_S: f64 = 1.0;
    const CONNECTIONS: u32 = 2;
    let r = responder(&ASCII1987, "00").await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(&r, write_scenario(dir.path(), "s.toml", ASCII_SCENARIO));
    a.connections = CONNECTIONS;
    a.rate = Some(RATE);
    a.duration = Some(DURATION_S);
    let report = load::run(a).await.unwrap();
    assert_eq!(report.mode, "open");
    // The schedule, not the machine's speed: every request due in the run was either sent or
    // counted as not sent in time (a busy machine moves requests from one to the other).
    // Each connection's due count rounds up, so the total is within one per connection.
    let due = report.sent + report.backlog_unsent;
    let nominal = (RATE * DURATION_S) as u64;
    assert!(
        due.abs_diff(nominal) <= u64::from(CONNECTIONS),
        "sent {} + not sent {} against {nominal} due: {report}",
        report.sent,
        report.backlog_unsent
    );
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.mismatches, 0, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    // The generator's own lateness is reported, and is part of every latency (which counts
    // from the intended send time), so it can never exceed it at any percentile.
    let lag = report
        .send_lag_us
        .expect("an open loop reports its send lag");
    let l = report.latency_us;
    assert!(
        lag.p50 <= l.p50 && lag.p99 <= l.p99 && lag.max <= l.max,
        "send lag {lag:?} against latency {l:?}"
    );
}

#[tokio::test]
async fn a_remote_target_is_refused_without_allow_remote() {
    let mut a = LoadArgs::new("192.0.2.1:8583", "fixtures/replay/ceiling-echo.toml");
    a.insecure_skip_verify = true;
    let e = load::run(a).await.unwrap_err();
    assert!(
        matches!(e, LoadError::Usage(ref m) if m.contains("--allow-remote")),
        "{e}"
    );
}

#[tokio::test]
async fn a_certificate_is_verified_unless_told_otherwise() {
    let a = LoadArgs::new("127.0.0.1:1", "fixtures/replay/ceiling-echo.toml");
    let e = load::run(a).await.unwrap_err();
    assert!(
        matches!(e, LoadError::Usage(ref m) if m.contains("--insecure-skip-verify")),
        "{e}"
    );
    assert_eq!(e.exit_code(), load::EXIT_USAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_not_signed_by_the_given_ca_is_refused() {
    let r = responder(&ASCII1987, "00").await;
    let dir = tempfile::tempdir().unwrap();
    // Another self-signed certificate for the same name: a CA that did not sign the server's.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_ca, other.cert.pem()).unwrap();
    let mut a = args(&r, write_scenario(dir.path(), "s.toml", ASCII_SCENARIO));
    a.ca = Some(wrong_ca);
    a.count = Some(10);
    let refused = load::run(a).await;
    // The same run with the right CA goes through: the refusal is the certificate's.
    let mut good = args(&r, write_scenario(dir.path(), "s.toml", ASCII_SCENARIO));
    good.count = Some(10);
    let report = load::run(good).await.unwrap();
    assert_eq!(report.verified, 10, "{report}");
    let answered_with_right_ca = r.frames.load(Ordering::SeqCst);
    assert_eq!(
        answered_with_right_ca, 10,
        "only the second run reached the responder"
    );
    match refused {
        Err(e) => assert_eq!(e.exit_code(), load::EXIT_UNAVAILABLE, "{e}"),
        Ok(report) => {
            assert_eq!(
                report.sent, 0,
                "sent over an unverified connection: {report}"
            );
            assert!(report.errors.connect > 0, "{report}");
        }
    }
}

#[tokio::test]
async fn nobody_listening_is_a_connect_error() {
    // Bound but not listening: connections are refused, and no other test can take the port.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let mut a = LoadArgs::new(addr.to_string(), "fixtures/replay/ceiling-echo.toml");
    a.insecure_skip_verify = true;
    let e = load::run(a).await.unwrap_err();
    assert_eq!(e.exit_code(), load::EXIT_UNAVAILABLE, "{e}");
}
