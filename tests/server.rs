//! Behaviour of the TLS gateway transport, over real TLS on 127.0.0.1:0, with a trivial echo
//! `Dispatch` standing in for the message layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::config::{Config, Dialect, ListenerConfig, TlsConfig};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::server::{Dispatch, Handled, ListenerInfo, Readiness, RequestCtx, Server};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(5);
const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
const CUP_TPDU_SWAPPED: [u8; 5] = [0x60, 0x00, 0x00, 0x00, 0x03];
const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

/// Echoes the body after `R:`. `SLEEP<ms>:…` sleeps first; `DROP` answers nothing; `WHO`
/// answers the client certificate subject.
struct Echo;

impl Dispatch for Echo {
    async fn handle(&self, ctx: &RequestCtx, body: Bytes) -> Handled {
        if let Some(rest) = body.strip_prefix(b"SLEEP") {
            let ms: String = rest
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|&b| b as char)
                .collect();
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        if &body[..] == b"DROP" {
            return Handled::Drop;
        }
        if &body[..] == b"WHO" {
            let who = ctx.client_cert_subject.clone().unwrap_or_default();
            return Handled::Reply(BytesMut::from(who.as_bytes()));
        }
        let mut reply = BytesMut::from(&b"R:"[..]);
        reply.extend_from_slice(&body);
        Handled::Reply(reply)
    }
}

struct Running {
    listeners: Vec<Arc<ListenerInfo>>,
    admin: SocketAddr,
    readiness: Readiness,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), refundgate::server::ServerError>>,
}

impl Running {
    fn addr(&self, i: usize) -> SocketAddr {
        self.listeners[i].addr
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT * 2, self.task)
            .await
            .expect("run returns within its grace")
            .unwrap()
            .unwrap();
    }
}

fn listener(dialect: Dialect, framing: Framing) -> ListenerConfig {
    ListenerConfig::new("127.0.0.1:0".parse().unwrap(), dialect, framing)
}

fn config(listeners: Vec<ListenerConfig>) -> Config {
    let mut config = Config::default();
    config.admin.addr = "127.0.0.1:0".parse().unwrap();
    config.listeners = listeners;
    config
}

async fn start(config: Config) -> Running {
    let server = Server::bind(config).await.unwrap();
    let listeners = server.listeners();
    let admin = server.admin_addr();
    let readiness = server.readiness();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::new(Echo), async move {
        let _ = stopped.await;
    }));
    Running {
        listeners,
        admin,
        readiness,
        stop: Some(stop),
        task,
    }
}

fn client_config(
    trust: &CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
    }
}

async fn tls_connect(
    info: &ListenerInfo,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(client_config(&info.cert_der, identity)));
    let tcp = TcpStream::connect(info.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

async fn framed_client(info: &ListenerInfo) -> Framed<TlsStream<TcpStream>, FrameCodec> {
    let tls = tls_connect(info, None).await.unwrap();
    Framed::new(
        tls,
        FrameCodec::new(info.framing, info.dialect.has_cup_header(), 8192),
    )
}

fn request(info: &ListenerInfo, body: &[u8]) -> Frame {
    let cup = info.dialect.has_cup_header();
    Frame::Message {
        tpdu: cup.then_some(CUP_TPDU),
        header: cup.then_some(CUP_HEADER),
        body: Bytes::copy_from_slice(body),
    }
}

async fn next_frame(client: &mut Framed<TlsStream<TcpStream>, FrameCodec>) -> Frame {
    tokio::time::timeout(WAIT, client.next())
        .await
        .expect("answer in time")
        .expect("connection open")
        .expect("well framed")
}

fn body_of(frame: &Frame) -> &[u8] {
    match frame {
        Frame::Message { body, .. } => body,
        other => panic!("not a message: {other:?}"),
    }
}

/// Reads until the server closes; true when it closed (EOF or reset) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, out)
}

/// The value of the first sample line of `/metrics` starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn round_trip_in_every_framing_with_cup_tpdu_swapped() {
    let running = start(config(vec![
        listener(Dialect::Ascii1987, Framing::Binary2),
        listener(Dialect::CupPos, Framing::Binary2),
        listener(Dialect::Ascii1987, Framing::Ascii4),
        listener(Dialect::CupPos, Framing::Bcd2),
    ]))
    .await;
    for info in &running.listeners {
        let mut client = framed_client(info).await;
        client.send(request(info, b"0200HELLO")).await.unwrap();
        let answer = next_frame(&mut client).await;
        assert_eq!(body_of(&answer), b"R:0200HELLO", "{}", info.name);
        if let Frame::Message { tpdu, header, .. } = &answer {
            if info.dialect.has_cup_header() {
                assert_eq!(*tpdu, Some(CUP_TPDU_SWAPPED), "{}", info.name);
                assert_eq!(*header, Some(CUP_HEADER), "{}", info.name);
            } else {
                assert_eq!((*tpdu, *header), (None, None));
            }
        }
    }
    running.stop().await;
}

#[tokio::test]
async fn ascii4_keep_alive_is_echoed_and_drop_answers_nothing() {
    let running = start(config(vec![listener(Dialect::Ascii1987, Framing::Ascii4)])).await;
    let info = &running.listeners[0];
    let mut client = framed_client(info).await;
    client.feed(Frame::KeepAlive).await.unwrap();
    client.feed(request(info, b"DROP")).await.unwrap();
    client.feed(request(info, b"0800")).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(next_frame(&mut client).await, Frame::KeepAlive);
    assert_eq!(body_of(&next_frame(&mut client).await), b"R:0800");
    running.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_request_order() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_in_flight_per_connection = 8;
    let running = start(cfg).await;
    let info = &running.listeners[0];
    let mut client = framed_client(info).await;
    // Earlier requests take longer, so completion order is the reverse of request order.
    let bodies: Vec<String> = (0..40)
        .map(|i| format!("SLEEP{}:{i:03}", (40 - i) % 9 * 5))
        .collect();
    for body in &bodies {
        client.feed(request(info, body.as_bytes())).await.unwrap();
    }
    client.flush().await.unwrap();
    for body in &bodies {
        let answer = next_frame(&mut client).await;
        assert_eq!(body_of(&answer), format!("R:{body}").as_bytes());
    }
    running.stop().await;
}

#[tokio::test]
async fn garbage_instead_of_a_tls_hello_is_closed() {
    let running = start(config(vec![listener(Dialect::Ascii1987, Framing::Binary2)])).await;
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not tls at all")
        .await
        .unwrap();
    assert!(closed_within(&mut tcp, WAIT).await);
    running.stop().await;
}

#[tokio::test]
async fn plaintext_iso_frame_to_the_tls_port_is_closed() {
    let running = start(config(vec![listener(Dialect::Ascii1987, Framing::Binary2)])).await;
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    let frame = hex::decode("00143038303038323230303030303030303030303030").unwrap();
    tcp.write_all(&frame).await.unwrap();
    assert!(closed_within(&mut tcp, WAIT).await);
    running.stop().await;
}

#[tokio::test]
async fn half_a_frame_then_silence_is_closed_by_the_idle_timeout() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.idle_timeout_ms = 300;
    let running = start(cfg).await;
    let mut tls = tls_connect(&running.listeners[0], None).await.unwrap();
    tls.write_all(&[0x00, 0x40, b'0', b'2']).await.unwrap();
    tls.flush().await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut tls, WAIT).await);
    assert!(started.elapsed() >= Duration::from_millis(200));
    running.stop().await;
}

#[tokio::test]
async fn oversized_and_zero_length_frames_close_the_connection() {
    let running = start(config(vec![
        listener(Dialect::Ascii1987, Framing::Binary2),
        listener(Dialect::CupPos, Framing::Binary2),
    ]))
    .await;
    // vectors/malformed: a_length_65535_short, a_length_8193_over_max, a_zero_length_frame,
    // c_length_65535_short, c_zero_length_frame.
    let cases = [
        (0, "ffff30323030373233433034"),
        (0, "200130323030373233433034"),
        (0, "0000"),
        (1, "ffff60000300006031003100"),
        (1, "0000"),
    ];
    for (listener, framed_hex) in cases {
        let mut tls = tls_connect(&running.listeners[listener], None)
            .await
            .unwrap();
        // A good request first: answered even though the stream breaks right after it.
        let mut wire = hex::decode(if listener == 0 {
            "000430383030"
        } else {
            "000f600003000060310031000030383030"
        })
        .unwrap();
        wire.extend(hex::decode(framed_hex).unwrap());
        tls.write_all(&wire).await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "{framed_hex}: not closed");
        assert!(buf.ends_with(b"R:0800"), "{framed_hex}: {buf:02x?}");
    }
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "refundgate_framing_errors_total{dialect=\"ascii1987\"}"
        ) >= 3.0
    );
    assert!(
        sample(
            &metrics,
            "refundgate_framing_errors_total{dialect=\"cup_pos\"}"
        ) >= 2.0
    );
    running.stop().await;
}

#[tokio::test]
async fn cup_frame_shorter_than_tpdu_and_header_is_dropped_and_the_connection_stays() {
    let running = start(config(vec![listener(Dialect::CupPos, Framing::Binary2)])).await;
    let info = &running.listeners[0];
    let mut tls = tls_connect(info, None).await.unwrap();
    // vectors/malformed/c_shorter_than_tpdu_header (expected: message_error_drop).
    tls.write_all(&hex::decode("00086000030000603100").unwrap())
        .await
        .unwrap();
    let mut client = Framed::new(tls, FrameCodec::new(Framing::Binary2, true, 8192));
    client.send(request(info, b"0800")).await.unwrap();
    assert_eq!(body_of(&next_frame(&mut client).await), b"R:0800");
    running.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_while_the_others_keep_working() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_connections = 2;
    let running = start(cfg).await;
    let info = &running.listeners[0];
    let mut first = framed_client(info).await;
    let mut second = framed_client(info).await;
    for client in [&mut first, &mut second] {
        client.send(request(info, b"0800")).await.unwrap();
        assert_eq!(body_of(&next_frame(client).await), b"R:0800");
    }
    let third = tls_connect(info, None).await;
    match third {
        Err(_) => {}
        Ok(mut tls) => {
            // TLS 1.3 may finish the client side before the server's close is seen.
            let _ = tls.write_all(b"\x00\x040800").await;
            assert!(
                closed_within(&mut tls, WAIT).await,
                "third connection served"
            );
        }
    }
    for client in [&mut first, &mut second] {
        client.send(request(info, b"0200")).await.unwrap();
        assert_eq!(body_of(&next_frame(client).await), b"R:0200");
    }
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(sample(&metrics, "refundgate_connections_refused_total") >= 1.0);
    drop(first);
    drop(second);
    running.stop().await;
}

#[tokio::test]
async fn a_full_handshake_budget_evicts_the_oldest_silent_socket_not_the_terminal() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_handshakes = 4;
    let running = start(cfg).await;
    let info = &running.listeners[0];
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(info.addr).await.unwrap());
    }
    // A real client beyond the budget: the oldest silent socket makes room for it, and it
    // holds no connection slot while it waited.
    let mut client = framed_client(info).await;
    client.send(request(info, b"0800")).await.unwrap();
    assert_eq!(body_of(&next_frame(&mut client).await), b"R:0800");
    assert!(closed_within(&mut silent[0], WAIT).await, "oldest evicted");
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "refundgate_connections_refused_total{cause=\"handshake_budget\"}"
        ) >= 1.0,
        "{metrics}"
    );
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn connections_per_source_address_are_limited() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_connections_per_ip = 1;
    cfg.limits.per_ip_exempt_loopback = false;
    let running = start(cfg).await;
    let info = &running.listeners[0];
    let mut first = framed_client(info).await;
    first.send(request(info, b"0800")).await.unwrap();
    assert_eq!(body_of(&next_frame(&mut first).await), b"R:0800");
    match tls_connect(info, None).await {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls.write_all(b"\x00\x040800").await;
            assert!(
                closed_within(&mut tls, WAIT).await,
                "second connection served"
            );
        }
    }
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "refundgate_connections_refused_total{cause=\"ip_connections\"}"
        ) >= 1.0,
        "{metrics}"
    );
    // Once the first is gone, the address may connect again.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(tls) = tls_connect(info, None).await {
            let mut again = Framed::new(tls, FrameCodec::new(info.framing, false, 8192));
            if again.send(request(info, b"0800")).await.is_ok() {
                if let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, again.next()).await {
                    assert_eq!(body_of(&frame), b"R:0800");
                    break;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "address never admitted again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clients_that_pipeline_and_never_read_lose_their_slot_at_the_deadline() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.admin.connection_timeout_ms = 300;
    let running = start(cfg).await;
    let admin = running.admin;
    // Every admin slot (16) held by a client that pipelines requests and reads nothing.
    let mut hogs = Vec::new();
    for _ in 0..16 {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        hogs.push(tokio::spawn(async move {
            let batch = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
            let _ = tcp.write_all(batch.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tcp);
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // An operator still gets /healthz once the deadline freed the slots.
    let started = std::time::Instant::now();
    let mut served = false;
    while started.elapsed() < Duration::from_millis(3 * 300 + 2000) {
        let attempt = async {
            let mut tcp = TcpStream::connect(admin).await.ok()?;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = String::new();
            tcp.read_to_string(&mut out).await.ok()?;
            out.starts_with("HTTP/1.1 200").then_some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "admin slots never freed");
    for hog in hogs {
        hog.abort();
    }
    running.stop().await;
}

#[tokio::test]
async fn mtls_listener_requires_a_client_certificate_signed_by_its_ca() {
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
    let mut client_params = CertificateParams::new(vec!["terminal-1".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "terminal 10000001");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let mut mtls = listener(Dialect::Ascii1987, Framing::Binary2);
    mtls.tls = TlsConfig {
        client_ca: Some(ca_path),
        ..TlsConfig::default()
    };
    let running = start(config(vec![mtls])).await;
    let info = &running.listeners[0];
    assert!(info.client_auth);

    // Without a certificate: the handshake fails (in TLS 1.3 it shows on the first read).
    match tls_connect(info, None).await {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls.write_all(b"\x00\x03WHO").await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(WAIT, tls.read(&mut buf))
                .await
                .unwrap();
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "served without a certificate"
            );
        }
    }

    let identity = (
        client_cert.der().clone(),
        PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
    );
    let tls = tls_connect(info, Some(identity)).await.unwrap();
    let mut client = Framed::new(tls, FrameCodec::new(Framing::Binary2, false, 8192));
    client.send(request(info, b"WHO")).await.unwrap();
    let subject = next_frame(&mut client).await;
    assert_eq!(body_of(&subject), b"CN=terminal 10000001");
    running.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_answers_the_request_in_flight() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.shutdown_grace_ms = 3000;
    let running = start(cfg).await;
    let info = running.listeners[0].clone();
    let mut client = framed_client(&info).await;
    client.send(request(&info, b"SLEEP600:0200")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(running.stop());
    let answer = next_frame(&mut client).await;
    assert_eq!(body_of(&answer), b"R:SLEEP600:0200");
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    // Then the connection is closed and the port no longer accepts.
    assert!(closed_within(client.get_mut(), WAIT).await);
    assert!(TcpStream::connect(info.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_closes_what_is_still_in_flight_after_the_grace_period() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.shutdown_grace_ms = 200;
    let running = start(cfg).await;
    let info = running.listeners[0].clone();
    let mut client = framed_client(&info).await;
    client
        .send(request(&info, b"SLEEP4000:0200"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    running.stop().await;
    assert!(started.elapsed() < Duration::from_millis(3000));
    assert!(closed_within(client.get_mut(), WAIT).await);
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    let running = start(config(vec![listener(Dialect::Ascii1987, Framing::Binary2)])).await;
    refundgate::telemetry::record_request("ascii1987", "0200", "00", "APPROVED");
    // One TLS handshake failure, so its counter exists.
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    tcp.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    assert!(closed_within(&mut tcp, WAIT).await);

    assert_eq!(http_get(running.admin, "/healthz").await.0, 200);
    assert_eq!(http_get(running.admin, "/readyz").await.0, 503);
    running.readiness.set_merchants_loaded(true);
    assert_eq!(http_get(running.admin, "/readyz").await.0, 200);
    assert_eq!(http_get(running.admin, "/nope").await.0, 404);
    let (status, metrics) = http_get(running.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        sample(
            &metrics,
            "refundgate_requests_total{dialect=\"ascii1987\",mti=\"0200\",code=\"00\",reason=\"APPROVED\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "refundgate_tls_handshake_failures_total{dialect=\"ascii1987\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(metrics.contains("refundgate_connections_open"), "{metrics}");
    running.stop().await;
}

#[tokio::test]
async fn bad_config_is_an_error_naming_the_key_before_anything_is_bound() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_frame_bytes = 70_000;
    let err = Server::bind(cfg).await.err().unwrap();
    assert!(err.to_string().contains("limits.max_frame_bytes"), "{err}");
    assert_eq!(err.exit_code(), 64);

    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.listeners[0].tls.cert = Some("/nonexistent/server.pem".into());
    cfg.listeners[0].tls.key = Some("/nonexistent/server.key".into());
    let err = Server::bind(cfg).await.err().unwrap();
    assert!(err.to_string().contains("listeners[0].tls.cert"), "{err}");

    let err = Config::from_toml("[limits]\nmax_in_flight_per_connection = 0\n").unwrap_err();
    assert_eq!(err.key, "limits.max_in_flight_per_connection");
}

#[tokio::test]
async fn the_generated_certificate_is_refused_on_a_non_loopback_address() {
    let cfg = config(vec![ListenerConfig::new(
        "0.0.0.0:0".parse().unwrap(),
        Dialect::Ascii1987,
        Framing::Binary2,
    )]);
    let err = Server::bind(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("listeners[0].tls"), "{err}");
    assert!(err.to_string().contains("self_signed = true"), "{err}");
    assert_eq!(err.exit_code(), 64);
    // Written out, it is accepted.
    let mut cfg = config(vec![ListenerConfig::new(
        "0.0.0.0:0".parse().unwrap(),
        Dialect::Ascii1987,
        Framing::Binary2,
    )]);
    cfg.listeners[0].tls.self_signed = true;
    let running = start(cfg).await;
    running.stop().await;
    let both = Config::from_toml(
        "[[listeners]]\naddr = \"0.0.0.0:8583\"\ntls = { cert = \"Cargo.toml\", key = \"Cargo.toml\", self_signed = true }\n",
    )
    .unwrap_err();
    assert_eq!(both.key, "listeners[0].tls.self_signed");
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_closed_by_the_handshake_timeout() {
    let mut cfg = config(vec![listener(Dialect::CupPos, Framing::Binary2)]);
    cfg.limits.handshake_timeout_ms = 200;
    let running = start(cfg).await;
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut tcp, WAIT).await);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "refundgate_tls_handshake_failures_total{dialect=\"cup_pos\"}"
        ) >= 1.0
    );
    running.stop().await;
}

#[tokio::test]
async fn eof_in_the_middle_of_a_frame_is_a_framing_error() {
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Ascii4)]);
    cfg.limits.idle_timeout_ms = 200;
    let running = start(cfg).await;
    let mut tls = tls_connect(&running.listeners[0], None).await.unwrap();
    // Announces 140 bytes, sends 4, then closes its side (like a_truncated_frame_eof).
    tls.write_all(b"01400200").await.unwrap();
    tls.shutdown().await.unwrap();
    assert!(closed_within(&mut tls, WAIT).await);
    // And a silent one is counted as an idle timeout.
    let mut idle = tls_connect(&running.listeners[0], None).await.unwrap();
    assert!(closed_within(&mut idle, WAIT).await);
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "refundgate_idle_timeouts_total{dialect=\"ascii1987\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &metrics,
            "refundgate_framing_errors_total{dialect=\"ascii1987\"}"
        ) >= 1.0
    );
    running.stop().await;
}

#[tokio::test]
async fn certificate_and_key_from_pem_files_are_presented() {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut from_files = listener(Dialect::Ascii1987, Framing::Bcd2);
    from_files.tls.cert = Some(cert_path);
    from_files.tls.key = Some(key_path);
    let running = start(config(vec![from_files])).await;
    let info = &running.listeners[0];
    assert_eq!(info.cert_der.as_ref(), cert.der().as_ref());
    let mut client = framed_client(info).await;
    client.send(request(info, b"0800")).await.unwrap();
    assert_eq!(body_of(&next_frame(&mut client).await), b"R:0800");
    running.stop().await;
}

/// Rough throughput ratio of the gateway against a trivial TLS responder that batches answers
/// per read (the shape of `shared/bench/ceiling`), same client, same process. Ignored by
/// default: run with `cargo test --test server -- --ignored --nocapture` (release for figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_against_a_trivial_batching_responder() {
    const CONNECTIONS: usize = 8;
    const DEPTH: usize = 8;
    const SECS: f64 = 2.0;
    let mut cfg = config(vec![listener(Dialect::Ascii1987, Framing::Binary2)]);
    cfg.limits.max_in_flight_per_connection = DEPTH;
    let running = start(cfg).await;
    let info = running.listeners[0].clone();

    // The trivial responder, with the same certificate.
    let tls = refundgate::server::tls::listener_tls(&TlsConfig::default(), 0, &mut None).unwrap();
    let trivial = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trivial_info = Arc::new(ListenerInfo {
        addr: trivial.local_addr().unwrap(),
        cert_der: tls.cert_der.clone(),
        ..clone_info(&info)
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = trivial.accept().await else {
                return;
            };
            let acceptor = tls.acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut rbuf = vec![0u8; 70_000];
                let (mut filled, mut wbuf) = (0usize, Vec::with_capacity(16 * 1024));
                loop {
                    let Ok(n) = s.read(&mut rbuf[filled..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    filled += n;
                    let mut pos = 0;
                    while filled - pos >= 2 {
                        let len = u16::from_be_bytes([rbuf[pos], rbuf[pos + 1]]) as usize;
                        if filled - pos - 2 < len {
                            break;
                        }
                        wbuf.extend_from_slice(&((len + 2) as u16).to_be_bytes());
                        wbuf.extend_from_slice(b"R:");
                        wbuf.extend_from_slice(&rbuf[pos + 2..pos + 2 + len]);
                        pos += 2 + len;
                    }
                    if s.write_all(&wbuf).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    wbuf.clear();
                    rbuf.copy_within(pos..filled, 0);
                    filled -= pos;
                }
            });
        }
    });

    async fn drive(info: Arc<ListenerInfo>) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(SECS);
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let info = info.clone();
            clients.push(tokio::spawn(async move {
                let mut client = framed_client(&info).await;
                let body = Bytes::from_static(&[b'0'; 120]);
                let mut answered = 0u64;
                for _ in 0..DEPTH {
                    client.feed(request(&info, &body)).await.unwrap();
                }
                client.flush().await.unwrap();
                while tokio::time::Instant::now() < deadline {
                    next_frame(&mut client).await;
                    answered += 1;
                    client.send(request(&info, &body)).await.unwrap();
                }
                answered
            }));
        }
        let mut total = 0;
        for c in clients {
            total += c.await.unwrap();
        }
        total as f64 / SECS
    }

    let trivial_rate = drive(trivial_info).await;
    let gateway_rate = drive(info.clone()).await;
    println!(
        "gateway {gateway_rate:.0}/s = {:.2} of trivial {trivial_rate:.0}/s ({CONNECTIONS}x{DEPTH})",
        gateway_rate / trivial_rate
    );
    running.stop().await;
}

fn clone_info(info: &ListenerInfo) -> ListenerInfo {
    ListenerInfo {
        index: info.index,
        name: info.name.clone(),
        addr: info.addr,
        dialect: info.dialect,
        framing: info.framing,
        mac: info.mac.clone(),
        client_auth: info.client_auth,
        cert_der: info.cert_der.clone(),
        cert_sha256: info.cert_sha256.clone(),
    }
}
