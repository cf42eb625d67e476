//! The command line: one binary, one subcommand per job.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::BytesMut;
use clap::{Parser, Subcommand};

use crate::dialect::{Dialect, Header};
use crate::iso8583::{self, json, Spec};

pub use crate::exit::{EXIT_DATAERR, EXIT_IOERR, EXIT_USAGE};

/// refundgate: an ISO 8583 refund/void switch that tells the terminal why.
#[derive(Debug, Parser)]
#[command(name = "refundgate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode one message given as hex on stdin and print it as JSON.
    Decode(DecodeArgs),
    /// Encode one message given as JSON on stdin and print its hex.
    Encode(EncodeArgs),
    /// Run the gateway (embedded defaults without --config).
    Serve(crate::serve::ServeArgs),
    /// Replay a scenario against a gateway over TLS and verify every answer.
    Load(crate::load::LoadArgs),
    /// Explain a decline reason in English and Chinese.
    Explain(ExplainArgs),
    /// Journal tools.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Store-and-forward tools.
    #[command(subcommand)]
    Saf(SafCommand),
    /// Run a stand-in bank host over TLS (approves by default; faults by flag or admin HTTP).
    Host(crate::host_sim::HostArgs),
    /// Deterministic simulation of the decision core with crashes and disk faults.
    Sim(crate::sim::SimArgs),
    /// Policy what-if replay: re-decides a journal's requests under another merchant file
    /// (read-only) and prints the answers that would change.
    Replay(crate::replay::ReplayArgs),
}

/// Arguments of `explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// A reason code as sent in DE44, e.g. MERCHANT_DAY_AMOUNT.
    pub reason: String,
    /// Print JSON instead of two sentences.
    #[arg(long)]
    pub json: bool,
    /// The requested amount, minor units.
    #[arg(long)]
    pub amount: Option<u64>,
    /// Currency (ISO 4217 numeric) of the amounts.
    #[arg(long, default_value_t = 0)]
    pub currency: u16,
    /// The limit that decided.
    #[arg(long)]
    pub limit: Option<u64>,
    /// How much of the limit was already used.
    #[arg(long)]
    pub used: Option<u64>,
    /// What was left of the limit before this request.
    #[arg(long)]
    pub remaining: Option<u64>,
    /// The refund window in days.
    #[arg(long)]
    pub window_days: Option<u32>,
    /// The original sale's amount.
    #[arg(long)]
    pub original_amount: Option<u64>,
    /// Still refundable on the original.
    #[arg(long)]
    pub original_remaining: Option<u64>,
    /// The merchant's refund allowance left (DE54 type 91).
    #[arg(long)]
    pub day_allowance_remaining: Option<u64>,
    /// The largest refund that would be approved now (DE54 type 92).
    #[arg(long)]
    pub would_pass: Option<u64>,
}

/// `journal` subcommands.
#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// Check a journal directory offline and print counts.
    Verify {
        /// The journal directory.
        dir: PathBuf,
    },
}

/// `saf` subcommands.
#[derive(Debug, Subcommand)]
pub enum SafCommand {
    /// List pending store-and-forward entries and dead letters.
    List {
        /// The gateway's journal directory (the queue is in its `saf` subdirectory).
        #[arg(long, default_value = "data/journal")]
        journal_dir: PathBuf,
    },
}

/// Arguments of `decode`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Dialect: ascii1987, cup_pos or iso87b.
    #[arg(long, default_value = "ascii1987")]
    pub dialect: String,
    /// A dialect file to use instead of the embedded ones: an element spec (`NAME.toml`) or
    /// a whole dialect (`NAME.dialect.toml`, which names its spec beside it).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// The input starts with the 2-byte length prefix.
    #[arg(long)]
    pub framed: bool,
    /// Show card numbers, track data, keys and MACs as they are.
    #[arg(long)]
    pub unmask: bool,
}

/// Arguments of `encode`.
#[derive(Debug, clap::Args)]
pub struct EncodeArgs {
    /// Dialect: ascii1987, cup_pos or iso87b.
    #[arg(long, default_value = "ascii1987")]
    pub dialect: String,
    /// A dialect file to use instead of the embedded ones: an element spec (`NAME.toml`) or
    /// a whole dialect (`NAME.dialect.toml`, which names its spec beside it).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Prefix the output with the 2-byte length.
    #[arg(long)]
    pub framed: bool,
}

/// Runs the command line and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Decode(args) => decode(&args),
        Command::Encode(args) => encode(&args),
        Command::Serve(args) => return crate::serve::run(&args),
        Command::Load(args) => return crate::load::run_blocking(args),
        Command::Explain(args) => explain(&args),
        Command::Journal(JournalCommand::Verify { dir }) => verify(&dir),
        Command::Saf(SafCommand::List { journal_dir }) => saf_list(&journal_dir),
        Command::Host(args) => return crate::host_sim::run(&args),
        Command::Sim(args) => return crate::sim::main(&args),
        Command::Replay(args) => return crate::replay::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("refundgate: {message}");
            ExitCode::from(code)
        }
    }
}

type CliResult = Result<(), (u8, String)>;

/// The element spec of `--dialect NAME` or `--spec FILE`, and whether frames carry the CUP
/// TPDU and header. A `NAME.dialect.toml` file brings its own spec and header; a plain spec
/// file takes the header of the built-in dialect of its name (none for a custom one).
fn spec(dialect: &str, path: &Option<PathBuf>) -> Result<(Spec, bool), (u8, String)> {
    let cup = |d: &Dialect| d.header == Header::CupTpdu;
    if let Some(path) = path {
        if path.to_string_lossy().ends_with(".dialect.toml") {
            let d = Dialect::from_path(path).map_err(|e| (EXIT_USAGE, e.to_string()))?;
            return Ok((d.spec().clone(), cup(&d)));
        }
        let spec = Spec::from_path(path).map_err(|e| (EXIT_USAGE, e.to_string()))?;
        let header = Dialect::builtin(spec.name()).is_some_and(cup);
        return Ok((spec, header));
    }
    Dialect::builtin(dialect)
        .map(|d| (d.spec().clone(), cup(d)))
        .ok_or_else(|| {
            (
                EXIT_USAGE,
                format!(
                    "--dialect: unknown dialect {dialect:?} ({})",
                    iso8583::spec::BUILTIN_NAMES.join(", ")
                ),
            )
        })
}

fn read_stdin() -> Result<String, (u8, String)> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| (EXIT_DATAERR, format!("stdin: {e}")))?;
    Ok(text)
}

fn decode(args: &DecodeArgs) -> CliResult {
    let (spec, cup_header) = spec(&args.dialect, &args.spec)?;
    let text = read_stdin()?;
    let compact: String = text.split_whitespace().collect();
    let bytes =
        hex::decode(&compact).map_err(|e| (EXIT_DATAERR, format!("input is not hex: {e}")))?;
    let mut body: &[u8] = &bytes;
    if args.framed {
        if body.len() < 2 {
            return Err((
                EXIT_DATAERR,
                "length prefix at offset 0: input shorter than 2 bytes".into(),
            ));
        }
        let announced = usize::from(u16::from_be_bytes([body[0], body[1]]));
        body = &body[2..];
        if announced != body.len() {
            return Err((
                EXIT_DATAERR,
                format!(
                    "length prefix at offset 0: announces {announced} bytes, {} follow",
                    body.len()
                ),
            ));
        }
    }
    let mut head: Option<(&[u8], &[u8])> = None;
    if cup_header {
        if body.len() < 11 {
            return Err((
                EXIT_DATAERR,
                "TPDU and header at offset 0: shorter than 11 bytes".into(),
            ));
        }
        head = Some((&body[..5], &body[5..11]));
        body = &body[11..];
    }
    let msg = iso8583::decode(&spec, body).map_err(|e| (EXIT_DATAERR, e.to_string()))?;
    let mut doc = json::to_json(&msg, args.unmask);
    if let (Some((tpdu, header)), Some(obj)) = (head, doc.as_object_mut()) {
        obj.insert("tpdu".into(), hex::encode(tpdu).into());
        obj.insert("header".into(), hex::encode(header).into());
    }
    println!("{doc}");
    Ok(())
}

fn encode(args: &EncodeArgs) -> CliResult {
    let (spec, cup_header) = spec(&args.dialect, &args.spec)?;
    let text = read_stdin()?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| (EXIT_DATAERR, format!("input is not JSON: {e}")))?;
    let mut out = BytesMut::with_capacity(512);
    if cup_header {
        for (key, len) in [("tpdu", 5), ("header", 6)] {
            let v = doc
                .get(key)
                .and_then(|v| v.as_str())
                .and_then(|s| hex::decode(s).ok())
                .filter(|b| b.len() == len)
                .ok_or_else(|| {
                    (
                        EXIT_DATAERR,
                        format!("key `{key}`: expected {len} bytes of hex"),
                    )
                })?;
            out.extend_from_slice(&v);
        }
    }
    json::from_json(&spec, &doc, &mut out).map_err(|e| (EXIT_DATAERR, e.to_string()))?;
    let mut hex_out = String::with_capacity(out.len() * 2 + 4);
    if args.framed {
        let len = u16::try_from(out.len())
            .map_err(|_| (EXIT_DATAERR, "message longer than 65535 bytes".to_string()))?;
        hex_out.push_str(&hex::encode(len.to_be_bytes()));
    }
    hex_out.push_str(&hex::encode(&out));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{hex_out}").map_err(|e| (EXIT_DATAERR, format!("stdout: {e}")))?;
    Ok(())
}

fn explain(args: &ExplainArgs) -> CliResult {
    let figures = crate::ledger::Figures {
        amount: args.amount.unwrap_or(0),
        currency: args.currency,
        limit: args.limit,
        used: args.used,
        remaining: args.remaining,
        window_days: args.window_days,
        original_amount: args.original_amount,
        original_remaining: args.original_remaining,
        day_allowance_remaining: args.day_allowance_remaining,
        would_pass: args.would_pass,
        host_code: None,
    };
    let none = crate::ledger::Figures {
        currency: args.currency,
        ..Default::default()
    };
    let given = (figures != none).then_some(&figures);
    let text = crate::explain::run_explain_with(&args.reason, given, args.json)
        .map_err(|e| (EXIT_DATAERR, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn verify(dir: &std::path::Path) -> CliResult {
    let text = crate::journal::run_verify(dir).map_err(|e| (e.exit_code() as u8, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn saf_list(journal_dir: &std::path::Path) -> CliResult {
    let dir = crate::upstream::saf_dir(journal_dir);
    let text = crate::upstream::store_forward::run_list(&dir).map_err(|e| (EXIT_IOERR, e))?;
    print!("{text}");
    Ok(())
}
