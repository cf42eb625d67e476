//! The upstream side over real TLS on 127.0.0.1:0: the host simulator.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::config::Dialect as ConfigDialect;
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::host_sim::{Faults, Host, HostControl, HostListener, HostOptions};
use refundgate::iso8583::{self, json, Message};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value as Json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(10);
const CUP_TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
const CUP_HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x31, 0x00, 0x00];

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct RunningHost {
    listeners: Vec<HostListener>,
    admin: SocketAddr,
    cert: CertificateDer<'static>,
    control: HostControl,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningHost {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

async fn start_host_at(addrs: [SocketAddr; 2], faults: Faults) -> RunningHost {
    let host = Host::bind(HostOptions {
        listeners: vec![
            HostListener {
                addr: addrs[0],
                dialect: ConfigDialect::Ascii1987,
                framing: Framing::Binary2,
            },
            HostListener {
                addr: addrs[1],
                dialect: ConfigDialect::CupPos,
                framing: Framing::Binary2,
            },
        ],
        admin: Some(any_port()),
        faults,
    })
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = RunningHost {
        listeners: host.listeners(),
        admin: host.admin_addr().unwrap(),
        cert: host.cert_der(),
        control: host.control(),
        stop: Some(stop),
        task: tokio::spawn(async {}),
    };
    let task = tokio::spawn(host.run(async move {
        let _ = stopped.await;
    }));
    RunningHost { task, ..running }
}

async fn start_host(faults: Faults) -> RunningHost {
    start_host_at([any_port(), any_port()], faults).await
}

type Client = Framed<TlsStream<TcpStream>, FrameCodec>;

async fn connect_raw(addr: SocketAddr, cert: &CertificateDer<'static>, cup: bool) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    Framed::new(tls, FrameCodec::new(Framing::Binary2, cup, 8192))
}

fn frame(cup: bool, body: Vec<u8>) -> Frame {
    Frame::Message {
        tpdu: cup.then_some(CUP_TPDU),
        header: cup.then_some(CUP_HEADER),
        body: Bytes::from(body),
    }
}

async fn next_body(client: &mut Client) -> Bytes {
    match tokio::time::timeout(WAIT, client.next())
        .await
        .expect("answer in time")
    {
        Some(Ok(Frame::Message { body, .. })) => body,
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

fn host_sale(stan: u32) -> Json {
    json!({ "mti": "0200", "fields": {
        "2": "4761739001010119", "3": "000000", "4": "000000001000", "7": "1125093015",
        "11": format!("{stan:06}"), "12": "093015", "13": "1125", "41": "TERM0001",
        "42": "MERCHANT 000001", "49": "840"
    }})
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

mod host {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_approves_echoes_fields_and_answers_network_management_in_both_dialects() {
        let host = start_host(Faults::default()).await;
        let mut c = connect_raw(host.listeners[0].addr, &host.cert, false).await;
        c.send(frame(false, encode("ascii1987", &host_sale(7))))
            .await
            .unwrap();
        let a = next_body(&mut c).await;
        let m = decode("ascii1987", &a);
        assert_eq!(m.mti().0, 210);
        assert_eq!(m.response_code(), Some("00"));
        assert_eq!(m.stan(), Some(7));
        assert_eq!(m.terminal(), Some("TERM0001"));
        assert_eq!(m.auth_code().map(str::len), Some(6));
        assert!(m.pan().is_none(), "the host does not echo the PAN");
        let echo =
            json!({"mti": "0800", "fields": {"7": "1125093015", "11": "000009", "70": "301"}});
        c.send(frame(false, encode("ascii1987", &echo)))
            .await
            .unwrap();
        let a = next_body(&mut c).await;
        let m = decode("ascii1987", &a);
        assert_eq!((m.mti().0, m.response_code()), (810, Some("00")));

        let mut cup = connect_raw(host.listeners[1].addr, &host.cert, true).await;
        let signon = json!({"mti": "0800", "fields": {"11": "000001", "41": "TERM0001",
            "42": "MERCHANT 000001", "60": "00000001001"}});
        cup.send(frame(true, encode("cup_pos", &signon)))
            .await
            .unwrap();
        let a = next_body(&mut cup).await;
        let m = decode("cup_pos", &a);
        assert_eq!((m.mti().0, m.response_code()), (810, Some("00")));
        let stats = host.control.stats();
        assert_eq!((stats.approved, stats.echoes, stats.sign_ons), (1, 1, 1));
        host.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_with_random_latency_answers_pipelined_requests_out_of_order() {
        let host = start_host(Faults {
            latency_ms: 1,
            latency_max_ms: 60,
            ..Faults::default()
        })
        .await;
        let mut c = connect_raw(host.listeners[0].addr, &host.cert, false).await;
        for stan in 1..=40 {
            c.feed(frame(false, encode("ascii1987", &host_sale(stan))))
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
        let mut order = Vec::new();
        for _ in 1..=40 {
            let a = next_body(&mut c).await;
            order.push(decode("ascii1987", &a).stan().unwrap());
        }
        let distinct: HashSet<u32> = order.iter().copied().collect();
        assert_eq!(distinct.len(), 40, "every request answered once");
        assert!(
            order.windows(2).any(|w| w[0] > w[1]),
            "random latency reorders answers: {order:?}"
        );
        host.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_faults_change_at_run_time_through_the_admin_endpoint() {
        let host = start_host(Faults::default()).await;
        let set = http(host.admin, "POST", "/faults", r#"{"decline":"05"}"#).await;
        assert!(set.contains(r#""decline":"05""#), "{set}");
        let mut c = connect_raw(host.listeners[0].addr, &host.cert, false).await;
        c.send(frame(false, encode("ascii1987", &host_sale(1))))
            .await
            .unwrap();
        let a = next_body(&mut c).await;
        let m = decode("ascii1987", &a);
        assert_eq!(m.response_code(), Some("05"));
        assert!(m.auth_code().is_none());
        // A reversal is still approved and counted per (DE41, DE11).
        let mut rev = host_sale(1);
        rev["mti"] = json!("0400");
        c.send(frame(false, encode("ascii1987", &rev)))
            .await
            .unwrap();
        let a = next_body(&mut c).await;
        assert_eq!(decode("ascii1987", &a).response_code(), Some("00"));
        let stats = http(host.admin, "GET", "/stats", "").await;
        assert!(
            stats.contains(r#""terminal":"TERM0001","stan":1,"answered":1"#),
            "{stats}"
        );
        let bad = http(host.admin, "POST", "/faults", r#"{"drop_percent":101}"#).await;
        assert!(bad.contains("above 100"), "{bad}");
        assert_eq!(host.control.faults().decline.as_deref(), Some("05"));
        // close_after: the third request on a connection closes it.
        host.control
            .set_faults(Faults {
                close_after: Some(2),
                ..Faults::default()
            })
            .unwrap();
        let mut c = connect_raw(host.listeners[0].addr, &host.cert, false).await;
        for stan in 10..13 {
            c.send(frame(false, encode("ascii1987", &host_sale(stan))))
                .await
                .unwrap();
        }
        let mut answered = 0;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, c.next()).await {
            answered += 1;
        }
        assert_eq!(answered, 2);
        host.stop().await;
    }
}
