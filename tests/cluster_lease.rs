//! Several gateway nodes on one replicated journal (NATS JetStream) with one writer per
//! merchant: the bounded catch-up of a node chasing another node's appends, and the lease
//! design of issue #20 (deploy/cluster/README.md, "Why optimistic appends (or leases)").
//!
//! Needs `nats-server` (`REFUNDGATE_NATS_SERVER`, `target/ci-venv/bin/nats-server`, or the
//! PATH). Without it the tests say so and pass, except under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats_cluster::{need_nats, NatsCluster};
use refundgate::journal::jetstream::{Replica, Settings};
use refundgate::ledger::{Ledger, Logged, MerchantSet, PanKey, Request};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A sale of 25.00 on the embedded sample merchant, STAN `stan`.
fn sample_sale(stan: u32) -> Request<'static> {
    use refundgate::ledger::{CardType, Dialect, Operation};
    let pan = "4761739001010119";
    Request {
        dialect: Dialect::Ascii1987,
        op: Operation::Sale,
        repeat: false,
        merchant: "MERCHANT 000001",
        terminal: "TERM0001",
        stan,
        local_date_mmdd: 101,
        mti_class: 2,
        transmission: Some(101_000_000),
        rrn: None,
        batch: None,
        pan,
        amount_minor: 2_500,
        currency: 840,
        card_type: CardType::from_pan(pan),
        original: None,
        body_fingerprint: u64::from(stan),
    }
}

fn settings(nats: &NatsCluster, stream: &str, replicas: usize) -> Settings {
    Settings {
        servers: nats.urls(),
        stream: stream.into(),
        subject_prefix: stream.to_lowercase(),
        replicas,
        ack_timeout: Duration::from_secs(5),
    }
}

/// Issue #20 step 1: a node reading the events another node keeps appending for a merchant
/// reads up to the subject's last sequence when it started, then returns (and releases the
/// merchant), instead of chasing the other node's tail for as long as it appends. Here
/// "another node" publishes copies of a stored event as fast as the server takes them, far
/// faster than one direct get at a time reads them; the catch-up must be back while it still
/// publishes. (Before the bound, `refresh` returned only once the publisher stopped.)
#[test]
fn catch_up_behind_a_node_that_keeps_appending_returns() {
    let Some(bin) = need_nats() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&bin, dir.path(), 1);
    let settings = settings(&nats, "CHASE", 1);
    let merchants = MerchantSet::embedded().unwrap();
    let key = PanKey::new(&[7; 16]);
    runtime().block_on(async {
        let ledger = Arc::new(Ledger::new(&merchants, key.clone()));
        let (a, _) = Replica::connect(&settings, Arc::clone(&ledger))
            .await
            .unwrap();
        let a = Arc::new(a);
        let logged = a.decide(&sample_sale(1), 1_790_000_000).await;
        assert!(
            matches!(logged, Logged::Applied { seq: 1, .. }),
            "{logged:?}"
        );
        let client = async_nats::connect(settings.servers[0].as_str())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let stream = js.get_stream("CHASE").await.unwrap();
        let first = stream.direct_get(1).await.unwrap();
        let subject = first.subject.to_string();
        let payload = first.payload.clone();

        // The other node: appends (copies of event 1: applying one again changes nothing
        // that matters here) for at most `RUN`, or until told to stop.
        const RUN: Duration = Duration::from_secs(12);
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (stop, ended, published) = (
                Arc::clone(&stop),
                Arc::clone(&ended),
                Arc::clone(&published),
            );
            let (client, subject, payload) = (client.clone(), subject.clone(), payload.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                while !stop.load(Ordering::Acquire) && start.elapsed() < RUN {
                    for _ in 0..100 {
                        client
                            .publish(subject.clone(), payload.clone())
                            .await
                            .unwrap();
                    }
                    client.flush().await.unwrap();
                    published.fetch_add(100, Ordering::Relaxed);
                }
                ended.store(true, Ordering::Release);
            })
        };
        // A backlog first.
        let deadline = Instant::now() + Duration::from_secs(10);
        while published.load(Ordering::Relaxed) < 2_000 {
            assert!(Instant::now() < deadline, "publisher too slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        let last = a.refresh("MERCHANT 000001").await.unwrap();
        let took = started.elapsed();
        let still_publishing = !ended.load(Ordering::Acquire);
        stop.store(true, Ordering::Release);
        publisher.await.unwrap();
        assert!(
            still_publishing,
            "catch-up returned only after the other node stopped appending ({took:?}, \
             read up to {last}, {} published)",
            published.load(Ordering::Relaxed)
        );
        assert!(last > 1, "read nothing of the backlog");
    });
}
