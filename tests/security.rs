//! Hostile-network and data-at-rest behaviour of the real `refundgate serve` binary (issue 18):
//! connection admission under silent sockets, file modes, keys outside the data directory,
//! the self-signed certificate on a non-loopback address.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use refundgate::frame::{Frame, FrameCodec, Framing};
use refundgate::iso8583::{self, json};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value as Json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

mod common;
use common::{ascii_request, de90};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    listener: SocketAddr,
    admin: SocketAddr,
    cert: CertificateDer<'static>,
}

/// A temporary directory with a certificate, and a configuration with `extra` appended
/// (`[limits]` and the like) and `listener_extra` inside the listener table.
fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = dir.path().display();
    let config = format!(
        r#"[admin]
addr = "{admin}"
[journal]
dir = "{d}/data/journal"
durability = "unsafe_no_fsync"
[log]
filter = "warn"
[[listeners]]
addr = "{listener}"
dialect = "ascii1987"
framing = "binary2"
tls = {{ cert = "{d}/server.pem", key = "{d}/server.key" }}
{extra}
"#
    );
    std::fs::write(dir.path().join("refundgate.toml"), config).unwrap();
    Setup {
        dir,
        listener,
        admin,
        cert: cert.der().clone(),
    }
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(setup: &Setup) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["serve", "--config"])
        .arg(setup.dir.path().join("refundgate.toml"))
        .current_dir(setup.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("gateway exited at start: {status}");
        }
        if http_get(setup.admin, "/readyz").starts_with("HTTP/1.1 200") {
            return Gateway(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("gateway did not become ready");
}

fn http_get(admin: SocketAddr, path: &str) -> String {
    let Ok(mut s) = StdTcpStream::connect_timeout(&admin, Duration::from_millis(500)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// The sum of every `/metrics` sample whose line starts with `prefix`.
fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    http_get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

type Client = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

async fn connect(setup: &Setup) -> std::io::Result<Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(setup.listener).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Ok(Framed::new(
        tls,
        FrameCodec::new(Framing::Binary2, false, 8192),
    ))
}

/// Sends one request and returns the answer's DE39, `None` when no answer came.
async fn ask(c: &mut Client, doc: &Json) -> Option<String> {
    let mut out = BytesMut::new();
    json::from_json(&iso8583::ASCII1987, doc, &mut out).unwrap();
    let frame = Frame::Message {
        tpdu: None,
        header: None,
        body: Bytes::from(out.to_vec()),
    };
    c.send(frame).await.ok()?;
    match c.next().await {
        Some(Ok(Frame::Message { body, .. })) => {
            let m = iso8583::decode(&iso8583::ASCII1987, &body).ok()?;
            Some(m.response_code().unwrap_or("").to_string())
        }
        _ => None,
    }
}

fn echo(stan: u32) -> Json {
    json!({"mti": "0800", "fields": {"7": "1125093015", "11": format!("{stan:06}"), "70": "301"}})
}

/// One attempt of a real terminal: connect, handshake, one echo, its answer, within `within`.
async fn echo_on_a_new_connection(setup: &Setup, stan: u32, within: Duration) -> bool {
    let attempt = async {
        let mut c = connect(setup).await.ok()?;
        ask(&mut c, &echo(stan)).await
    };
    matches!(tokio::time::timeout(within, attempt).await, Ok(Some(code)) if code == "00")
}

/// Keeps one plain TCP connection open that never says anything; reconnects as soon as the
/// gateway closes it, until `stop`.
async fn silent_socket(addr: SocketAddr, stop: Arc<AtomicBool>, connects: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut tcp) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        connects.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                read = tcp.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
    }
}

#[test]
fn fifty_silent_reconnecting_sockets_do_not_lock_out_a_real_terminal() {
    // 50 slots and the default handshake timeout (5 s), as measured in issue 18.
    let setup = setup("[limits]\nmax_connections = 50\n");
    let gateway = start(&setup);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (answered, refused) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let silent: Vec<_> = (0..50)
            .map(|_| {
                tokio::spawn(silent_socket(
                    setup.listener,
                    stop.clone(),
                    connects.clone(),
                ))
            })
            .collect();
        // Every silent socket is connected before the terminal starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while connects.load(Ordering::Relaxed) < 50 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            connects.load(Ordering::Relaxed) >= 50,
            "silent sockets connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut answered = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for stan in 1..=15 {
            tick.tick().await;
            if echo_on_a_new_connection(&setup, stan, Duration::from_secs(2)).await {
                answered += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for task in silent {
            let _ = task.await;
        }
        (answered, connects.load(Ordering::Relaxed))
    });
    eprintln!("answered {answered} of 15; silent connects {refused}");
    assert!(answered >= 12, "only {answered} of 15 echoes answered");
    // The silent sockets were closed by the handshake timeout, never holding a slot.
    let timed_out = metric(
        setup.admin,
        "refundgate_connections_refused_total{cause=\"handshake_timeout\"}",
    );
    assert!(timed_out >= 50.0, "handshake timeouts counted: {timed_out}");
    drop(gateway);
}

const PAN: &str = "4761739001010119";
const TRACK2: &str = "4761739001010119=25121011000012345678";

/// Paths with their permission bits.
type Modes = Vec<(std::path::PathBuf, u32)>;

/// Every file below `dir` (recursively), with its mode; directories' modes too.
fn tree(dir: &std::path::Path) -> (Modes, Modes) {
    use std::os::unix::fs::PermissionsExt;
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        dirs.push((d.clone(), mode));
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                files.push((path, meta.permissions().mode() & 0o777));
            }
        }
    }
    (files, dirs)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_pan_or_track_data_in_clear_in_any_data_file_after_a_routed_timeout_and_reversal() {
    use refundgate::host_sim::{Faults, Host, HostListener, HostOptions};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A bank host that never answers: every routed request times out.
    let host = rt
        .block_on(Host::bind(HostOptions {
            listeners: vec![HostListener {
                addr: "127.0.0.1:0".parse().unwrap(),
                dialect: &refundgate::dialect::ASCII1987,
                framing: Framing::Binary2,
            }],
            admin: None,
            faults: Faults {
                drop_percent: 100,
                ..Faults::default()
            },
        }))
        .unwrap();
    let host_addr = host.listeners()[0].addr;
    let (stop_host, host_stopped) = tokio::sync::oneshot::channel::<()>();
    let host_task = rt.spawn(host.run(async move {
        let _ = host_stopped.await;
    }));
    let setup = setup(&format!(
        r#"
[[upstreams]]
name = "bank"
addrs = ["{host_addr}"]
dialect = "ascii1987"
timeout_ms = 300
reconnect_min_ms = 20
reconnect_max_ms = 200
tls = {{ insecure_skip_verify = true }}
[routes]
default = "bank"
"#
    ));
    let gateway = start(&setup);
    rt.block_on(async {
        let mut c = None;
        for _ in 0..100 {
            if let Ok(client) = connect(&setup).await {
                c = Some(client);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = c.expect("connected");
        // Wait for the link (a sale before it is up is refused 91 HOST_UNREACHABLE without
        // anything queued); then a sale with track 2 times out at the host...
        let mut stan = 10;
        let sale = loop {
            stan += 1;
            let sale = ascii_request("0200", "000000", 2_500, stan, &[("35", TRACK2.to_string())]);
            let code = ask(&mut c, &sale).await.expect("answered");
            assert_eq!(code, "91");
            let saf = metric(setup.admin, "refundgate_saf_pending");
            if saf >= 1.0 {
                break sale;
            }
            assert!(stan < 200, "no reversal was ever queued");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // ...and the terminal sends a reversal of its own (another STAN, so it is not the
        // queued one), with PAN and track 2: queued for the host as it came.
        let before = metric(setup.admin, "refundgate_saf_pending");
        let reversal = ascii_request(
            "0400",
            "000000",
            2_500,
            stan + 500,
            &[("35", TRACK2.to_string()), ("90", de90(&sale))],
        );
        assert!(ask(&mut c, &reversal).await.is_some());
        assert!(
            metric(setup.admin, "refundgate_saf_pending") > before,
            "terminal reversal queued"
        );
    });
    drop(gateway);
    let data = setup.dir.path().join("data/journal");
    let (files, dirs) = tree(&data);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("saf")),
        "the SAF journal is there: {files:?}"
    );
    for (path, mode) in &files {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !contains(&bytes, PAN.as_bytes()),
            "PAN in clear in {}",
            path.display()
        );
        assert!(
            !contains(&bytes, b"=2512101100"),
            "track 2 in {}",
            path.display()
        );
        assert_eq!(*mode, 0o600, "mode of {}", path.display());
    }
    for (path, mode) in &dirs {
        assert_eq!(*mode, 0o700, "mode of {}", path.display());
    }
    // The keys live beside the data directory, not in it.
    let keys = setup.dir.path().join("data/journal-keys");
    let (key_files, _) = tree(&keys);
    let mut names: Vec<_> = key_files
        .iter()
        .map(|(p, mode)| (p.file_name().unwrap().to_string_lossy().to_string(), *mode))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("pan-hash.key".to_string(), 0o600),
            ("saf-pan.key".to_string(), 0o600)
        ]
    );
    let _ = stop_host.send(());
    let _ = rt.block_on(host_task);
}

/// Runs `serve` expecting it to refuse to start: (exit code, stderr).
fn refused(setup: &Setup) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["serve", "--config"])
        .arg(setup.dir.path().join("refundgate.toml"))
        .current_dir(setup.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started although it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_pan_hash_key_is_never_silently_recreated_and_loose_modes_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let setup = setup("");
    let gateway = start(&setup);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = connect(&setup).await.unwrap();
        let sale = ascii_request("0200", "000000", 2_500, 1, &[]);
        assert_eq!(ask(&mut c, &sale).await.as_deref(), Some("00"));
    });
    drop(gateway);
    let journal = setup.dir.path().join("data/journal");
    let key = setup.dir.path().join("data/journal-keys/pan-hash.key");
    assert!(key.is_file() && !journal.join("pan-hash.key").exists());
    // The approved sale is journaled without its PAN in clear.
    let (files, _) = tree(&journal);
    assert!(!files.is_empty());
    for (path, mode) in &files {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !contains(&bytes, PAN.as_bytes()),
            "PAN in clear in {}",
            path.display()
        );
        assert_eq!(*mode, 0o600, "mode of {}", path.display());
    }

    // The journal has data: a missing key is refused, not recreated.
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let (code, err) = refused(&setup);
    assert_eq!(code, 74, "{err}");
    assert!(
        err.contains("security.pan_hash_key") && err.contains("journal already has records"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!key.exists(), "not recreated");

    // A key left in the data directory by an earlier version is moved out of it.
    std::fs::write(journal.join("pan-hash.key"), &saved).unwrap();
    std::fs::set_permissions(
        journal.join("pan-hash.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    drop(start(&setup));
    assert_eq!(std::fs::read(&key).unwrap(), saved);
    assert!(!journal.join("pan-hash.key").exists());

    // A data directory others may enter is refused, naming it and the fix.
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, err) = refused(&setup);
    assert_eq!(code, 74, "{err}");
    assert!(err.contains("0755") && err.contains("chmod"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(start(&setup));
}

/// A plain TCP connection that sends a genuine TLS ClientHello and then never answers the
/// server's flight (a stalled handshake); held open until `stop`.
async fn stalled_handshake(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return;
    };
    if tcp.write_all(&hello).await.is_err() {
        return;
    }
    sent.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            read = tcp.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return },
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

#[test]
fn sockets_that_stall_after_their_client_hello_do_not_hold_connection_slots() {
    // 4 slots, 8 stalled handshakes (well inside the default handshake timeout of 5 s).
    let setup = setup("[limits]\nmax_connections = 4\n");
    let gateway = start(&setup);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let answered = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let stalled: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(stalled_handshake(
                    setup.listener,
                    stop.clone(),
                    sent.clone(),
                ))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sent.load(Ordering::Relaxed) < 8 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            sent.load(Ordering::Relaxed),
            8,
            "stalled handshakes started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answered = echo_on_a_new_connection(&setup, 1, Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        for task in stalled {
            let _ = task.await;
        }
        answered
    });
    assert!(
        answered,
        "a real terminal was locked out by handshakes that stalled after their ClientHello"
    );
    drop(gateway);
}
