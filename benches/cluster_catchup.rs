//! How long a gateway node takes to rebuild its ledger from cold out of a replicated journal
//! (`journal.backend = "jetstream"`) holding N events (default 1,000,000).
//!
//! `REFUNDGATE_NATS_URL=nats://127.0.0.1:4222 [EVENTS=N] [REPLICAS=3] cargo bench --bench
//! cluster_catchup` (benches/cluster.sh starts a three-server cluster and runs it). The events
//! are real ledger decisions (sales of the embedded sample merchants), published to a fresh
//! stream; then a new node's `Replica::load`, the path `refundgate serve` takes at start, is
//! timed. Without `REFUNDGATE_NATS_URL` it says so and exits (so `cargo bench --no-run` and a
//! plain `cargo bench` need no cluster).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These benches measure real elapsed time; the product reads `clock::monotonic()`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use refundgate::journal::jetstream::{
    encode_group, snapshot_bucket, snapshot_object_name, Replica, Settings,
};
use refundgate::ledger::{Ledger, LedgerEvent, MerchantSet, PanKey, Request};

#[path = "../tests/common/nats.rs"]
#[allow(dead_code)] // Only `nats_cluster` needs it.
mod nats;
#[path = "../tests/common/nats_cluster.rs"]
#[allow(dead_code)] // Only its sample sale.
mod nats_cluster;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let Ok(url) = std::env::var("REFUNDGATE_NATS_URL") else {
        eprintln!("cluster_catchup: set REFUNDGATE_NATS_URL (benches/cluster.sh does) to run it");
        return;
    };
    let events = env_u64("EVENTS", 1_000_000);
    let replicas = env_u64("REPLICAS", 3) as usize;
    let merchants = MerchantSet::embedded().unwrap();
    let key = PanKey::new(&[7; 16]);
    let stream = format!("CATCHUP{}", std::process::id());
    let settings = Settings {
        servers: vec![url],
        stream: stream.clone(),
        subject_prefix: format!("catchup{}", std::process::id()),
        replicas,
        ack_timeout: Duration::from_secs(10),
    };
    let rt = nats_cluster::runtime();

    // The events: sales decided by a ledger, as a node would journal them.
    let writer = Ledger::new(&merchants, key.clone());
    let mut payloads: Vec<(String, Vec<u8>)> = Vec::with_capacity(events as usize);
    let now = 1_790_000_000i64;
    for i in 0..events {
        let req = Request {
            transmission: Some(101_000_000 + i / 999_999),
            body_fingerprint: i,
            ..nats_cluster::sample_sale((i % 999_999) as u32 + 1)
        };
        let mut captured = None;
        let _ = writer.decide_logged(&req, now, |e: &LedgerEvent| {
            // One decision per message, in the stream's payload format.
            captured = Some(encode_group(std::iter::once(e)));
            Ok::<u64, std::convert::Infallible>(i + 1)
        });
        if let Some(b) = captured {
            payloads.push((
                format!(
                    "{}.{}",
                    settings.subject_prefix,
                    hex::encode("MERCHANT 000001")
                ),
                b,
            ));
        }
    }
    let n = payloads.len() as u64;

    rt.block_on(async {
        // Publish them, pipelined (no expected sequence: one writer).
        let client = async_nats::connect(settings.servers[0].as_str())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let started = Instant::now();
        let (replica, _) =
            Replica::connect(&settings, Arc::new(Ledger::new(&merchants, key.clone())))
                .await
                .unwrap();
        drop(replica);
        let mut acks = Vec::with_capacity(4096);
        for (subject, payload) in payloads {
            acks.push(js.publish(subject, payload.into()).await.unwrap());
            if acks.len() == 4096 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks.drain(..) {
            a.await.unwrap();
        }
        let published = started.elapsed();
        println!(
            "published {n} events (replicas {replicas}) in {:.2} s: {:.0} events/s",
            published.as_secs_f64(),
            n as f64 / published.as_secs_f64()
        );

        // A new node from cold.
        let started = Instant::now();
        let ledger = Arc::new(Ledger::new(&merchants, key.clone()));
        let (replica, state) = Replica::connect(&settings, Arc::clone(&ledger))
            .await
            .unwrap();
        let applied = replica.load(state.last_sequence).await.unwrap();
        let took = started.elapsed();
        assert_eq!(applied, n, "every event applied");
        assert_eq!(
            ledger.entries(),
            writer.entries(),
            "same originals as the writer"
        );
        println!(
            "catch-up from cold: {applied} events in {:.2} s: {:.0} events/s",
            took.as_secs_f64(),
            applied as f64 / took.as_secs_f64()
        );

        // The same from a ledger snapshot covering the whole stream (what a restarted node
        // loads when one was written lately): the snapshot, then nothing left to read.
        // The tail marks the stream read up to where the load stopped.
        let replica = Arc::new(replica);
        let tail = tokio::spawn(Arc::clone(&replica).tail(state.last_sequence));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let snapshot = replica.snapshot().await;
        tail.abort();
        assert_eq!(
            snapshot.seq, state.last_sequence,
            "the snapshot covers the stream"
        );
        let bytes = snapshot.encode();
        let store = js.get_object_store(snapshot_bucket(&stream)).await.unwrap();
        let name = snapshot_object_name(snapshot.seq);
        store
            .put(name.as_str(), &mut bytes.as_slice())
            .await
            .unwrap();
        let started = Instant::now();
        let ledger = Arc::new(Ledger::new(&merchants, key.clone()));
        let (replica, state) = Replica::connect(&settings, Arc::clone(&ledger))
            .await
            .unwrap();
        replica.load(state.last_sequence).await.unwrap();
        let took = started.elapsed();
        assert_eq!(ledger.entries(), writer.entries(), "same originals");
        println!(
            "start from a snapshot at seq {} ({} bytes): {:.2} s",
            snapshot.seq,
            bytes.len(),
            took.as_secs_f64()
        );
        let _ = js.delete_stream(&stream).await;
        let _ = js.delete_object_store(snapshot_bucket(&stream)).await;
    });
}
