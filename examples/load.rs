//! `refundgate load` as a stand-alone binary, until the `load` subcommand is wired into
//! `src/cli.rs` (then `benches/e2e.sh` uses the subcommand and this file can go):
//! `cargo build --release --example load && target/release/examples/load --help`.
use clap::Parser;

/// Replay a scenario over TLS against an ISO 8583 endpoint and verify every answer.
#[derive(Debug, Parser)]
#[command(name = "refundgate-load", version)]
struct Cli {
    #[command(flatten)]
    args: refundgate::load::LoadArgs,
}

fn main() -> std::process::ExitCode {
    refundgate::load::run_blocking(Cli::parse().args)
}
