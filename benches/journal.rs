//! Journal bench (custom harness, prints a table): durable appends/s with group commit and
//! concurrent writers vs one `fdatasync` per append, and replay speed of 10M records.
//!
//! `cargo bench --bench journal`. Environment: `JOURNAL_BENCH_DIR` (default
//! `target/bench-journal`, on the disk the journal would use), `JOURNAL_BENCH_SECS` (3),
//! `JOURNAL_BENCH_WRITERS` (`64,512`), `JOURNAL_BENCH_THREADS`
//! (tokio workers, 2), `JOURNAL_BENCH_ONLY_GROUP` (skip the per-append shapes), `JOURNAL_BENCH_REPLAY_RECORDS` (10000000).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These benches measure real elapsed time; the product reads `clock::monotonic()`.

use std::fs;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refundgate::journal::record;
use refundgate::journal::segment::{self, SEGMENT_BYTES_DEFAULT};
use refundgate::journal::{Durability, Journal, Options};

const PAYLOAD_BYTES: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    appends: u64,
    batches: u64,
    secs: f64,
    latencies_us: Vec<u64>,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.appends as f64 / self.secs
    }

    fn percentile(&mut self, p: f64) -> u64 {
        self.latencies_us.sort_unstable();
        let at = ((self.latencies_us.len() as f64 - 1.0) * p) as usize;
        self.latencies_us.get(at).copied().unwrap_or(0)
    }
}

/// `writers` tokio tasks append 64-byte payloads in a closed loop for `secs`.
fn appends(
    dir: &Path,
    writers: usize,
    batch_records_max: usize,
    durability: Durability,
    secs: u64,
) -> Run {
    let _ = fs::remove_dir_all(dir);
    let options = Options {
        batch_records_max,
        durability,
        ..Options::default()
    };
    let (journal, _) = Journal::open(dir, options).unwrap();
    let journal = Arc::new(journal);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("JOURNAL_BENCH_THREADS", 2usize))
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let batches_before = journal.batches();
    let latencies_us = runtime.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let (journal, stop) = (Arc::clone(&journal), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(1 << 16);
                    let mut payload = [b'p'; PAYLOAD_BYTES];
                    payload[..8].copy_from_slice(&(w as u64).to_le_bytes());
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        journal.append(payload.to_vec()).await.unwrap();
                        latencies.push(t.elapsed().as_micros() as u64);
                    }
                    latencies
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    let secs = start.elapsed().as_secs_f64();
    let run = Run {
        appends: latencies_us.len() as u64,
        batches: journal.batches() - batches_before,
        secs,
        latencies_us,
    };
    drop(journal);
    let _ = fs::remove_dir_all(dir);
    run
}

/// Writes `records` records of 64-byte payloads as 64 MiB segments, straight from the format.
fn write_segments(dir: &Path, records: u64) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let payload = [b'r'; PAYLOAD_BYTES];
    let mut seq = 1;
    let mut index = 0;
    let mut buf = Vec::with_capacity(SEGMENT_BYTES_DEFAULT as usize);
    while seq <= records {
        buf.clear();
        buf.extend_from_slice(&segment::encode_header(index));
        while seq <= records
            && buf.len() + record::encoded_len(PAYLOAD_BYTES) <= SEGMENT_BYTES_DEFAULT as usize
        {
            record::encode(seq, &payload, &mut buf);
            seq += 1;
        }
        buf.resize(SEGMENT_BYTES_DEFAULT as usize, 0);
        let mut file = fs::File::create(dir.join(segment::segment_file_name(index))).unwrap();
        file.write_all(&buf).unwrap();
        index += 1;
    }
}

fn replay(dir: &Path, records: u64) -> (f64, f64, u64) {
    let start = Instant::now();
    let (journal, recovered) = Journal::open(dir, Options::default()).unwrap();
    let opened = start.elapsed().as_secs_f64();
    let mut bytes = 0u64;
    let applied = recovered
        .replay(|seq, payload| {
            bytes += black_box(payload).len() as u64 + black_box(seq) % 2;
        })
        .unwrap();
    let total = start.elapsed().as_secs_f64();
    assert_eq!(applied, records);
    black_box(bytes);
    drop(journal);
    (opened, total - opened, applied)
}

fn main() {
    let dir: PathBuf = std::env::var_os("JOURNAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-journal"));
    let secs = env_or("JOURNAL_BENCH_SECS", 3u64);
    let writers: Vec<usize> = std::env::var("JOURNAL_BENCH_WRITERS")
        .unwrap_or_else(|_| "64,512".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .filter(|&w| w > 0)
        .collect();
    let writers = if writers.is_empty() {
        vec![64]
    } else {
        writers
    };
    let replay_records = env_or("JOURNAL_BENCH_REPLAY_RECORDS", 10_000_000u64);
    println!(
        "journal bench: dir {}, {PAYLOAD_BYTES}-byte payloads, {secs} s per shape, fdatasync",
        dir.display()
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10} {:>9} {:>9}",
        "shape", "appends/s", "syncs/s", "rec/sync", "p50 us", "p99 us"
    );
    // Group commit at each writer count, then one fdatasync per append (batch of 1) at the
    // first writer count and with a single writer.
    let mut shapes: Vec<(String, usize, usize, Durability)> = writers
        .iter()
        .map(|&w| {
            (
                format!("group commit, {w} writers"),
                w,
                1024,
                Durability::Fdatasync,
            )
        })
        .collect();
    let w0 = writers[0];
    shapes.push((
        format!("fsync per append, {w0} writers"),
        w0,
        1,
        Durability::Fdatasync,
    ));
    shapes.push((
        "fsync per append, 1 writer".into(),
        1,
        1,
        Durability::Fdatasync,
    ));
    // The journal's own capacity (channel, encode, pwrite, wakeups) with the disk taken out.
    shapes.push((
        format!("no fsync (unsafe), {w0} writers"),
        w0,
        1024,
        Durability::UnsafeNoFsync,
    ));
    let only_group = std::env::var_os("JOURNAL_BENCH_ONLY_GROUP").is_some();
    let mut rates = Vec::new();
    for (name, writers, batch, durability) in shapes
        .into_iter()
        .filter(|(_, _, batch, _)| secs > 0 && (!only_group || *batch > 1))
    {
        let mut run = appends(&dir.join("appends"), writers, batch, durability, secs);
        let (p50, p99) = (run.percentile(0.5), run.percentile(0.99));
        println!(
            "{:<34} {:>12.0} {:>10.0} {:>10.1} {:>9} {:>9}",
            name,
            run.per_sec(),
            run.batches as f64 / run.secs,
            run.appends as f64 / run.batches.max(1) as f64,
            p50,
            p99
        );
        rates.push(run.per_sec());
    }
    if !only_group && rates.len() >= 4 {
        let (per_append_n, per_append_1) = (rates[rates.len() - 3], rates[rates.len() - 2]);
        println!(
            "ratio group commit / fsync per append ({} writers): {:.1}x; / 1 writer: {:.1}x",
            writers[0],
            rates[0] / per_append_n,
            rates[0] / per_append_1
        );
    }

    let replay_dir = dir.join("replay");
    let t = Instant::now();
    write_segments(&replay_dir, replay_records);
    println!(
        "replay: wrote {replay_records} records ({} MiB of segments) in {:.1} s",
        (fs::read_dir(&replay_dir).unwrap().count() as u64 * SEGMENT_BYTES_DEFAULT) >> 20,
        t.elapsed().as_secs_f64()
    );
    for round in 1..=2 {
        let (open_s, replay_s, applied) = replay(&replay_dir, replay_records);
        println!(
            "replay round {round}: open+verify {open_s:.2} s, replay {replay_s:.2} s, total {:.2} s = {:.1} M records/s",
            open_s + replay_s,
            applied as f64 / (open_s + replay_s) / 1e6
        );
    }
    let _ = fs::remove_dir_all(&replay_dir);
}
