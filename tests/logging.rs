//! The gateway's log when its output is not a terminal: plain text without ANSI escape
//! sequences, INFO lines through the lossy writer and WARN lines through the one that never
//! drops, all written out by the time a SIGTERM'd gateway exits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_redirected_log_has_no_escape_sequences_and_keeps_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let (listener, admin) = (free_port(), free_port());
    // unsafe_no_fsync makes the gateway warn at start.
    let config = format!(
        r#"[admin]
addr = "127.0.0.1:{admin}"
[journal]
dir = "{d}/journal"
durability = "unsafe_no_fsync"
[log]
filter = "info"
[[listeners]]
addr = "127.0.0.1:{listener}"
dialect = "ascii1987"
framing = "binary2"
"#
    );
    std::fs::write(dir.path().join("refundgate.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["serve", "--config"])
        .arg(dir.path().join("refundgate.toml"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    let _ = tx.send(all.clone());
                }
            }
        }
        all
    });
    // Wait for the last start-up line, then stop the gateway the way an operator would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut started = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(text) if String::from_utf8_lossy(&text).contains("admin http listening") => {
                started = true;
                break;
            }
            _ => {}
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(started, "gateway did not start: {text}\n{err}");
    assert!(status.success(), "exit {status:?}: {text}\n{err}");
    assert!(
        !out.contains(&0x1b) && !err.as_bytes().contains(&0x1b),
        "escape sequences in a redirected log:\n{text:?}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(" WARN ") && l.contains("unsafe_no_fsync")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains(" INFO ")), "{text}");
    // Written out before exit, after the signal.
    assert!(text.contains("shutdown: done"), "{text}");
}
