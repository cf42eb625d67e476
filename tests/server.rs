//! Behaviour of the TLS gateway transport, over real TLS on 127.0.0.1:0, with a trivial echo
//! `Dispatch` standing in for the message layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::config::{Config, Dialect, ListenerConfig, TlsConfig};
use refundgate::dialect::{ASCII1987, CUP_POS};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::server::{Dispatch, Handled, ListenerInfo, Readiness, RequestCtx, Server};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(5);
const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
const CUP_TPDU_SWAPPED: [u8; 5] = [0x60, 0x00, 0x00, 0x00, 0x03];
const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

/// Metric counters are process-global and tests run in parallel: a test that asserts a
/// counter's change holds this gate exclusively (so no other server of this binary runs
/// meanwhile), every other test shares it.
static METRICS_GATE: RwLock<()> = RwLock::const_new(());

enum Gate {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Echoes the body after `R:`. `SLEEP<ms>:…` sleeps first; `DROP` answers nothing; `WHO`
/// answers the client certificate subject. Counts the requests it was handed.
struct Echo {
    entered: Arc<AtomicU64>,
}

impl Dispatch for Echo {
    async fn handle(&self, ctx: &RequestCtx, body: Bytes) -> Handled {
        self.entered.fetch_add(1, Ordering::SeqCst);
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
        if &body[..] == b"THREAD" {
            let name = std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string();
            return Handled::Reply(BytesMut::from(name.as_bytes()));
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
    entered: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), refundgate::server::ServerError>>,
    _gate: Gate,
}

impl Running {
    fn addr(&self, i: usize) -> SocketAddr {
        self.listeners[i].addr
    }

    /// Waits until the dispatcher was handed `n` requests in all.
    async fn wait_entered(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.entered.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "request never dispatched"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `refundgate_connections_open{dialect="ascii1987"}` is `n`.
    async fn wait_open(&self, n: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while sample(&self.metrics().await, OPEN_ASCII) != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections_open never reached {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The current `/metrics` text.
    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
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

/// Starts a server sharing the metrics gate with other tests.
async fn start(config: Config) -> Running {
    let gate = Gate::Shared(METRICS_GATE.read().await);
    start_gated(config, gate).await
}

/// Starts a server alone in this test binary, so its counters move only by what the test does.
async fn start_alone(config: Config) -> Running {
    let gate = Gate::Exclusive(METRICS_GATE.write().await);
    start_gated(config, gate).await
}

async fn start_gated(config: Config, gate: Gate) -> Running {
    let server = Server::bind(config).await.unwrap();
    let listeners = server.listeners();
    let admin = server.admin_addr();
    let readiness = server.readiness();
    let entered = Arc::new(AtomicU64::new(0));
    let echo = Echo {
        entered: Arc::clone(&entered),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::new(echo), async move {
        let _ = stopped.await;
    }));
    Running {
        listeners,
        admin,
        readiness,
        entered,
        stop: Some(stop),
        task,
        _gate: gate,
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
        FrameCodec::new(info.framing, info.dialect.has_tpdu(), 8192),
    )
}

fn request(info: &ListenerInfo, body: &[u8]) -> Frame {
    let cup = info.dialect.has_tpdu();
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
        listener(&ASCII1987, Framing::Binary2),
        listener(&CUP_POS, Framing::Binary2),
        listener(&ASCII1987, Framing::Ascii4),
        listener(&CUP_POS, Framing::Bcd2),
    ]))
    .await;
    for info in &running.listeners {
        let mut client = framed_client(info).await;
        client.send(request(info, b"0200HELLO")).await.unwrap();
        let answer = next_frame(&mut client).await;
        assert_eq!(body_of(&answer), b"R:0200HELLO", "{}", info.name);
        if let Frame::Message { tpdu, header, .. } = &answer {
            if info.dialect.has_tpdu() {
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
    let running = start(config(vec![listener(&ASCII1987, Framing::Ascii4)])).await;
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
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
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
async fn connections_are_served_on_the_connection_threads_round_robin() {
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.connection_threads = 3;
    let running = start(cfg).await;
    let info = &running.listeners[0];
    let mut threads = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut client = framed_client(info).await;
        client.send(request(info, b"THREAD")).await.unwrap();
        let answer = next_frame(&mut client).await;
        threads.push(String::from_utf8(body_of(&answer).to_vec()).unwrap());
        clients.push(client);
    }
    // Round-robin over the three, never on the test's (accepting) runtime.
    let mut distinct = threads.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        [
            "refundgate-conn-0",
            "refundgate-conn-1",
            "refundgate-conn-2"
        ],
        "{threads:?}"
    );
    assert_eq!(threads[0..3], threads[3..6], "{threads:?}");
    // Every connection still answers pipelined requests in order, on its thread.
    for client in &mut clients {
        for i in 0..8 {
            client
                .feed(request(
                    info,
                    format!("SLEEP{}:{i}", (8 - i) * 2).as_bytes(),
                ))
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
    }
    for client in &mut clients {
        for i in 0..8 {
            let answer = next_frame(client).await;
            assert_eq!(
                body_of(&answer),
                format!("R:SLEEP{}:{i}", (8 - i) * 2).as_bytes()
            );
        }
    }
    running.stop().await;
}

#[tokio::test]
async fn garbage_instead_of_a_tls_hello_is_closed() {
    let running = start(config(vec![listener(&ASCII1987, Framing::Binary2)])).await;
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not tls at all")
        .await
        .unwrap();
    assert!(closed_within(&mut tcp, WAIT).await);
    running.stop().await;
}

#[tokio::test]
async fn plaintext_iso_frame_to_the_tls_port_is_closed() {
    let running = start(config(vec![listener(&ASCII1987, Framing::Binary2)])).await;
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    let frame = hex::decode("00143038303038323230303030303030303030303030").unwrap();
    tcp.write_all(&frame).await.unwrap();
    assert!(closed_within(&mut tcp, WAIT).await);
    running.stop().await;
}

#[tokio::test]
async fn half_a_frame_then_silence_is_closed_by_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(500);
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.idle_timeout_ms = IDLE.as_millis() as u64;
    let running = start_alone(cfg).await;
    let idle_before = sample(&running.metrics().await, IDLE_ASCII);
    let mut tls = tls_connect(&running.listeners[0], None).await.unwrap();
    // Taken before the half frame is sent, so the server cannot have seen it earlier.
    let started = std::time::Instant::now();
    tls.write_all(&[0x00, 0x40, b'0', b'2']).await.unwrap();
    tls.flush().await.unwrap();
    assert!(
        closed_within(&mut tls, 3 * IDLE).await,
        "not closed within 3 x the idle timeout"
    );
    assert!(
        started.elapsed() >= IDLE,
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
    let idle_after = sample(&running.metrics().await, IDLE_ASCII);
    assert_eq!(idle_after - idle_before, 1.0, "counted as one idle timeout");
    running.stop().await;
}

const IDLE_ASCII: &str = "refundgate_idle_timeouts_total{dialect=\"ascii1987\"}";
const FRAMING_ASCII: &str = "refundgate_framing_errors_total{dialect=\"ascii1987\"}";
const FRAMING_CUP: &str = "refundgate_framing_errors_total{dialect=\"cup_pos\"}";
const HANDSHAKE_ASCII: &str = "refundgate_tls_handshake_failures_total{dialect=\"ascii1987\"}";
const HANDSHAKE_CUP: &str = "refundgate_tls_handshake_failures_total{dialect=\"cup_pos\"}";
const REFUSED: &str = "refundgate_connections_refused_total{cause=\"max_connections\"}";
const OPEN_ASCII: &str = "refundgate_connections_open{dialect=\"ascii1987\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_that_pipelines_and_never_reads_is_closed_once_its_answers_back_up() {
    const IDLE: Duration = Duration::from_millis(400);
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.idle_timeout_ms = IDLE.as_millis() as u64;
    let running = start_alone(cfg).await;
    let info = Arc::clone(&running.listeners[0]);
    let (mut requests, _never_read) = framed_client(&info).await.split();
    // Sends until the socket fills: the answers (2 kB each) are never read, so they back up
    // until the gateway's write cannot complete.
    let writer = tokio::spawn(async move {
        let body = vec![b'x'; 2000];
        for _ in 0..100_000 {
            if requests.send(request(&info, &body)).await.is_err() {
                break;
            }
        }
    });
    running.wait_open(1.0).await;
    // The write that cannot complete is bounded by the idle timeout: the slot is freed.
    running.wait_open(0.0).await;
    writer.abort();
    running.stop().await;
}

#[tokio::test]
async fn oversized_and_zero_length_frames_close_the_connection() {
    let running = start_alone(config(vec![
        listener(&ASCII1987, Framing::Binary2),
        listener(&CUP_POS, Framing::Binary2),
    ]))
    .await;
    let before = running.metrics().await;
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
    let after = running.metrics().await;
    let delta = |name| sample(&after, name) - sample(&before, name);
    assert_eq!(delta(FRAMING_ASCII), 3.0, "{after}");
    assert_eq!(delta(FRAMING_CUP), 2.0, "{after}");
    running.stop().await;
}

#[tokio::test]
async fn cup_frame_shorter_than_tpdu_and_header_is_dropped_and_the_connection_stays() {
    let running = start(config(vec![listener(&CUP_POS, Framing::Binary2)])).await;
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
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.max_connections = 2;
    let running = start_alone(cfg).await;
    let refused_before = sample(&running.metrics().await, REFUSED);
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
    let refused = sample(&running.metrics().await, REFUSED) - refused_before;
    assert_eq!(refused, 1.0, "the third connection is counted as refused");
    drop(first);
    drop(second);
    running.stop().await;
}

#[tokio::test]
async fn a_full_handshake_budget_evicts_the_oldest_silent_socket_not_the_terminal() {
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
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
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
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
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
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
    let mut mtls = listener(&ASCII1987, Framing::Binary2);
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
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.shutdown_grace_ms = 3000;
    let running = start(cfg).await;
    let info = running.listeners[0].clone();
    let mut client = framed_client(&info).await;
    client.send(request(&info, b"SLEEP600:0200")).await.unwrap();
    running.wait_entered(1).await;
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
    const GRACE: Duration = Duration::from_millis(500);
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.shutdown_grace_ms = GRACE.as_millis() as u64;
    let running = start(cfg).await;
    let info = running.listeners[0].clone();
    let mut client = framed_client(&info).await;
    // Far longer than the grace: waiting for it would be plain to see.
    client
        .send(request(&info, b"SLEEP60000:0200"))
        .await
        .unwrap();
    running.wait_entered(1).await;
    let started = std::time::Instant::now();
    running.stop().await;
    assert!(
        started.elapsed() <= 3 * GRACE,
        "stopped in {:?}, grace {GRACE:?}",
        started.elapsed()
    );
    assert!(closed_within(client.get_mut(), WAIT).await);
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    // The request counter is the message layer's: tests/gateway.rs checks it.
    let running = start_alone(config(vec![listener(&ASCII1987, Framing::Binary2)])).await;
    let before = running.metrics().await;
    // One TLS handshake failure.
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
    let delta = |name| sample(&metrics, name) - sample(&before, name);
    assert_eq!(delta(HANDSHAKE_ASCII), 1.0, "{metrics}");
    // A connection is open in the gauge while it lasts, and only then. Nothing else of this
    // binary runs meanwhile, so the gauge goes to 0 once the failed handshake's connection
    // is gone on the server side too.
    running.wait_open(0.0).await;
    let info = &running.listeners[0];
    let mut client = framed_client(info).await;
    client.send(request(info, b"0800")).await.unwrap();
    assert_eq!(body_of(&next_frame(&mut client).await), b"R:0800");
    let open = sample(&running.metrics().await, OPEN_ASCII);
    assert_eq!(open, 1.0, "the connection is open in the gauge");
    drop(client);
    running.wait_open(0.0).await;
    running.stop().await;
}

#[tokio::test]
async fn bad_config_is_an_error_naming_the_key_before_anything_is_bound() {
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
    cfg.limits.max_frame_bytes = 70_000;
    let err = Server::bind(cfg).await.err().unwrap();
    assert!(err.to_string().contains("limits.max_frame_bytes"), "{err}");
    assert_eq!(err.exit_code(), 64);

    let mut cfg = config(vec![listener(&ASCII1987, Framing::Binary2)]);
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
        &ASCII1987,
        Framing::Binary2,
    )]);
    let err = Server::bind(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("listeners[0].tls"), "{err}");
    assert!(err.to_string().contains("self_signed = true"), "{err}");
    assert_eq!(err.exit_code(), 64);
    // Written out, it is accepted.
    let mut cfg = config(vec![ListenerConfig::new(
        "0.0.0.0:0".parse().unwrap(),
        &ASCII1987,
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
    const HANDSHAKE: Duration = Duration::from_millis(500);
    let mut cfg = config(vec![listener(&CUP_POS, Framing::Binary2)]);
    cfg.limits.handshake_timeout_ms = HANDSHAKE.as_millis() as u64;
    let running = start_alone(cfg).await;
    let before = sample(&running.metrics().await, HANDSHAKE_CUP);
    // Taken before connecting: the server's timer cannot start earlier.
    let started = std::time::Instant::now();
    let mut tcp = TcpStream::connect(running.addr(0)).await.unwrap();
    assert!(
        closed_within(&mut tcp, 3 * HANDSHAKE).await,
        "not closed within 3 x the handshake timeout"
    );
    assert!(
        started.elapsed() >= HANDSHAKE,
        "closed before the handshake timeout: {:?}",
        started.elapsed()
    );
    let after = sample(&running.metrics().await, HANDSHAKE_CUP);
    assert_eq!(after - before, 1.0);
    running.stop().await;
}

#[tokio::test]
async fn eof_in_the_middle_of_a_frame_is_a_framing_error() {
    let mut cfg = config(vec![listener(&ASCII1987, Framing::Ascii4)]);
    cfg.limits.idle_timeout_ms = 200;
    let running = start_alone(cfg).await;
    let before = running.metrics().await;
    let mut tls = tls_connect(&running.listeners[0], None).await.unwrap();
    // Announces 140 bytes, sends 4, then closes its side (like a_truncated_frame_eof).
    tls.write_all(b"01400200").await.unwrap();
    tls.shutdown().await.unwrap();
    assert!(closed_within(&mut tls, WAIT).await);
    // And a silent one is counted as an idle timeout.
    let mut idle = tls_connect(&running.listeners[0], None).await.unwrap();
    assert!(closed_within(&mut idle, WAIT).await);
    let after = running.metrics().await;
    let delta = |name| sample(&after, name) - sample(&before, name);
    assert_eq!(delta(IDLE_ASCII), 1.0, "{after}");
    assert_eq!(delta(FRAMING_ASCII), 1.0, "{after}");
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
    let mut from_files = listener(&ASCII1987, Framing::Bcd2);
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
