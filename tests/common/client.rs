//! An ascii1987 terminal over TLS (binary2 frames), as the behaviour tests drive a gateway.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
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

/// A server certificate for `localhost` and its key, both PEM, with the DER to trust.
pub fn localhost_cert() -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

/// One terminal connection.
pub type Client = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

/// Connects to `addr`, trusting `cert`.
pub async fn connect(cert: &CertificateDer<'static>, addr: SocketAddr) -> Client {
    try_connect(cert, addr).await.unwrap()
}

/// Connects to `addr`, trusting `cert`; `Err` when the gateway is not there.
pub async fn try_connect(
    cert: &CertificateDer<'static>,
    addr: SocketAddr,
) -> std::io::Result<Client> {
    connect_framed(cert, addr, FrameCodec::new(Framing::Binary2, false, 8192)).await
}

/// Connects to an in-process gateway's listener, with its framing (and cup TPDU + header).
pub async fn connect_listener(info: &refundgate::server::ListenerInfo) -> Client {
    let codec = FrameCodec::new(info.framing, info.dialect.has_tpdu(), 8192);
    connect_framed(&info.cert_der, info.addr, codec)
        .await
        .unwrap()
}

async fn connect_framed(
    cert: &CertificateDer<'static>,
    addr: SocketAddr,
    codec: FrameCodec,
) -> std::io::Result<Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Ok(Framed::new(tls, codec))
}

/// What a terminal sees of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: String,
    pub reason: String,
    pub rrn: Option<String>,
    pub de54: Option<String>,
}

pub async fn send(c: &mut Client, doc: &Json) {
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

/// The next answer; `None` when the connection closed or nothing came within 30 s.
pub async fn try_receive(c: &mut Client) -> Option<Answer> {
    match tokio::time::timeout(Duration::from_secs(30), c.next()).await {
        Ok(Some(Ok(Frame::Message { body, .. }))) => {
            let m = iso8583::decode(&iso8583::ASCII1987, &body).unwrap();
            Some(Answer {
                code: m.response_code().unwrap_or("").to_string(),
                reason: m.text(44).unwrap_or("").to_string(),
                rrn: m.rrn().map(str::to_string),
                de54: m.text(54).map(str::to_string),
            })
        }
        _ => None,
    }
}

pub async fn receive(c: &mut Client) -> Answer {
    match try_receive(c).await {
        Some(a) => a,
        None => panic!("no answer"),
    }
}

pub async fn ask(c: &mut Client, doc: &Json) -> Answer {
    send(c, doc).await;
    receive(c).await
}

/// The repeat (MTI origin digit 1) of `doc`.
pub fn repeat(doc: &Json) -> Json {
    let mut d = doc.clone();
    let mti = d["mti"].as_str().unwrap().to_string();
    d["mti"] = json!(format!("{}1", &mti[..3]));
    d
}

/// The amount of DE54 block `kind` (e.g. "91").
pub fn de54_amount(de54: &str, kind: &str) -> Option<u64> {
    de54.as_bytes()
        .chunks(20)
        .filter_map(|b| std::str::from_utf8(b).ok())
        .find(|b| b.len() == 20 && &b[2..4] == kind)
        .and_then(|b| b[8..].parse().ok())
}
