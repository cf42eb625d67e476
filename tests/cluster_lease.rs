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

use common::nats_cluster::{need_nats, runtime, sample_sale, NatsCluster};
use refundgate::journal::jetstream::Replica;
use refundgate::ledger::{Ledger, Logged, MerchantSet, PanKey};

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
    let settings = nats.replica_settings("CHASE", 1);
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

/// Issue #20 step 4: a node whose lease lapsed (its renewals stopped, the bucket's TTL
/// expired, another node took the merchant and appended) and that still appends on what it
/// decided before is refused by the stream's expected-sequence check: it catches up and
/// decides again. Here it sends the request the new owner already decided, with another
/// body under the same key: the new owner approved it, so the lapsed holder must not (94),
/// where without the fence it would approve on its stale ledger.
#[test]
fn a_lease_that_lapsed_while_its_holder_still_appends_is_refused_by_the_fence() {
    use refundgate::journal::lease::Leases;
    let Some(bin) = need_nats() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&bin, dir.path(), 1);
    let settings = nats.replica_settings("LAPSE", 1);
    let merchants = MerchantSet::embedded().unwrap();
    let key = PanKey::new(&[7; 16]);
    let now = 1_790_000_000;
    let ttl = Duration::from_millis(600);
    let merchant = refundgate::ledger::MerchantId::new("MERCHANT 000001").unwrap();
    runtime().block_on(async {
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let ledger = Arc::new(Ledger::new(&merchants, key.clone()));
            let (r, _) = Replica::connect(&settings, ledger).await.unwrap();
            let r = Arc::new(r);
            let leases = Leases::start(&r, &settings, ttl, Duration::from_secs(10))
                .await
                .unwrap();
            nodes.push((r, leases));
        }
        let (a, a_leases) = (&nodes[0].0, &nodes[0].1);
        let (b, b_leases) = (&nodes[1].0, &nodes[1].1);
        // A takes the merchant with its first decision; B's next one is forwarded to A.
        let first = a.decide(&sample_sale(1), now).await;
        assert!(matches!(first, Logged::Applied { seq: 1, .. }), "{first:?}");
        assert!(a_leases.owns(&merchant));
        let second = b.decide(&sample_sale(2), now).await;
        assert!(matches!(second, Logged::Applied { .. }), "{second:?}");
        assert_eq!(b_leases.counters.forwarded.load(Ordering::Relaxed), 1);
        assert_eq!(a_leases.counters.served.load(Ordering::Relaxed), 1);

        // A stalls: no renewal, no forwards answered. Its lease lapses here at 0.9 TTL and in
        // the bucket at the TTL; then B takes the merchant with its next decision.
        a_leases.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while a_leases.owner(&merchant).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the lease did not expire");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!a_leases.owns(&merchant));
        let third = b.decide(&sample_sale(3), now).await;
        assert!(matches!(third, Logged::Applied { .. }), "{third:?}");
        assert_eq!(b_leases.counters.taken.load(Ordering::Relaxed), 1);
        let (owner, _) = b_leases.owner(&merchant).await.unwrap().unwrap();
        assert_eq!(owner, b_leases.node());

        // A's append, decided on what it knew (no tail here: STAN 3 unseen), another body
        // under STAN 3's key.
        let mut stale = sample_sale(3);
        stale.amount_minor = 9_900;
        stale.body_fingerprint = 999;
        let conflicts = a.counters.conflicts.load(Ordering::Relaxed);
        let late = a.decide_here(&stale, now).await;
        let decision = late.decision().copied();
        assert!(
            decision.is_some_and(|d| !d.is_approved()),
            "the lapsed holder approved a request the new owner had decided: {late:?}"
        );
        assert!(
            a.counters.conflicts.load(Ordering::Relaxed) > conflicts,
            "the stream did not refuse the lapsed holder's append"
        );
        // A merchant id nobody configured takes no lease (the bucket stays bounded by the
        // merchant file) and is refused.
        let mut stranger = sample_sale(50);
        stranger.merchant = "NOBODY 00000001";
        let taken = b_leases.counters.taken.load(Ordering::Relaxed);
        let refused = b.decide(&stranger, now).await;
        assert!(
            refused.decision().is_none_or(|d| !d.is_approved()),
            "{refused:?}"
        );
        assert_eq!(b_leases.counters.taken.load(Ordering::Relaxed), taken);
        let nobody = refundgate::ledger::MerchantId::new("NOBODY 00000001").unwrap();
        assert!(b_leases.owner(&nobody).await.unwrap().is_none());
        for (_, l) in &nodes {
            l.stop();
        }
    });
}

// --- three gateway processes with leases on ------------------------------------------------

use common::client::{self, ask, de54_amount, receive, repeat, send, Answer, Client};
use common::{
    ascii_request, de90, race_two, spawn_serve, write_cluster_gateway_files, ServeProcess,
    SERVE_LOG_TOML,
};
use rustls_pki_types::CertificateDer;
use serde_json::Value as Json;

/// Lease TTL of the gateway processes.
const TTL_MS: u64 = 1_000;

/// Three gateway nodes' configurations on one stream (three NATS servers, replicas 3), leases
/// on, sharing the merchants and the PAN hash key.
struct Gateways {
    dir: tempfile::TempDir,
    cert: CertificateDer<'static>,
    nats: NatsCluster,
}

impl Gateways {
    fn new(bin: &std::path::Path) -> Gateways {
        let dir = tempfile::tempdir().unwrap();
        let cert = write_cluster_gateway_files(dir.path());
        let nats = NatsCluster::start(bin, dir.path(), 3);
        let g = Gateways { dir, cert, nats };
        for node in 0..3 {
            let d = g.dir.path().display();
            let config = format!(
                r#"merchants = "{d}/merchants.toml"
[admin]
addr = "127.0.0.1:0"
[journal]
dir = "{d}/node{node}/journal"
backend = "jetstream"
[journal.jetstream]
servers = [{urls}]
replicas = 3
ack_timeout_ms = 1500
lease_ttl_ms = {TTL_MS}
[security]
pan_hash_key = "{d}/keys/pan-hash.key"
[[listeners]]
addr = "127.0.0.1:0"
dialect = "ascii1987"
framing = "binary2"
tls = {{ cert = "{d}/server.pem", key = "{d}/server.key" }}
{SERVE_LOG_TOML}"#,
                urls = g.nats.urls_toml(),
            );
            std::fs::create_dir_all(g.dir.path().join(format!("node{node}"))).unwrap();
            std::fs::write(g.config(node), config).unwrap();
        }
        g
    }

    fn config(&self, node: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("node{node}.toml"))
    }

    fn start(&self, node: usize) -> ServeProcess {
        spawn_serve(&self.config(node), 1)
    }

    async fn connect(&self, node: &ServeProcess) -> Client {
        client::connect(&self.cert, node.listeners[0]).await
    }

    /// The node id the lease bucket names as the owner of the sample merchant, if any.
    async fn owner(&self) -> Option<String> {
        let client = async_nats::connect(self.nats.urls()[0].as_str())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let bucket = refundgate::journal::lease::lease_bucket("REFUNDGATE");
        let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
        let key = format!("$KV.{bucket}.m{}", hex::encode("MERCHANT 000001"));
        match stream.direct_get_last_for_subject(key).await {
            Ok(m) => Some(String::from_utf8(m.payload.to_vec()).unwrap()),
            Err(_) => None,
        }
    }
}

fn amount(doc: &Json) -> u64 {
    doc["fields"]["4"].as_str().unwrap().parse().unwrap()
}

/// Issue #20 step 4: 32 requests at once on one original (and one merchant), spread over
/// three gateways that forward to the merchant's lease owner: exactly what the limits allow
/// is approved, and nothing is answered 96.
#[test]
fn a_32_way_race_over_three_leased_gateways_approves_what_the_limits_allow() {
    let Some(bin) = need_nats() else { return };
    let g = Gateways::new(&bin);
    let nodes: Vec<ServeProcess> = (0..3).map(|n| g.start(n)).collect();
    runtime().block_on(async {
        let mut c = g.connect(&nodes[1]).await;
        let sale = ascii_request("0200", "000000", 10_000, 1, &[]);
        let sa = ask(&mut c, &sale).await;
        assert_eq!(sa.code, "00");
        assert!(g.owner().await.is_some(), "no lease taken");
        let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
        let refunds: Vec<Json> = (0..32)
            .map(|i| ascii_request("0200", "200000", 1_000, 100 + i, &original))
            .collect();
        let mut clients = Vec::new();
        for i in 0..32 {
            clients.push(g.connect(&nodes[i % 3]).await);
        }
        for (c, d) in clients.iter_mut().zip(&refunds) {
            send(c, d).await;
        }
        let mut answers = Vec::new();
        for c in &mut clients {
            answers.push(receive(c).await);
        }
        let approved = answers.iter().filter(|a| a.code == "00").count();
        assert_eq!(approved, 10, "refunds of one 100.00 sale: {answers:?}");
        assert!(answers.iter().all(|a| a.code != "96"), "{answers:?}");
        let refunded: u64 = refunds
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.code == "00")
            .map(|(d, _)| amount(d))
            .sum();
        assert_eq!(refunded, 10_000);
        // Every node tells the same remainder of the original (DE54 90): nothing left.
        for (n, node) in nodes.iter().enumerate() {
            let mut c = g.connect(node).await;
            let probe = ascii_request("0200", "200000", 1, 500 + n as u32, &original);
            let pa = ask(&mut c, &probe).await;
            assert_ne!(pa.code, "00", "node {n}: {pa:?}");
            assert_eq!(
                de54_amount(pa.de54.as_deref().unwrap_or(""), "90"),
                Some(0),
                "node {n}: {pa:?}"
            );
        }
    });
}

/// Issue #20 step 4: kill -9 of the merchant's lease owner while two other gateways forward
/// it a steady load. The merchant resumes on a surviving node within the TTL plus a margin
/// (the dead owner's lease expires, the next decision takes it), every answer of the load is
/// 00 (a decision in flight at the kill is retried at the new owner, which answers it anew
/// or with its stored answer), every acknowledged approval is still there (each repeat, on
/// both survivors, gets its stored answer) and a refund race afterwards still sees them.
#[test]
fn kill_9_of_the_lease_owner_mid_load_resumes_within_the_ttl_and_loses_nothing() {
    owner_lost_mid_load(Loss::Kill);
}

/// The same with an owner that hangs instead of dying (SIGSTOP: its connections stay open,
/// forwards reach it and are never answered, its renewals stop): the forwarders stop waiting
/// once its lease expired and go to the next owner. Resumed, SIGCONT: its lease is gone, it
/// decides nothing as owner any more (its answers are checked like the others').
#[test]
fn a_hung_lease_owner_is_left_once_its_lease_expires() {
    owner_lost_mid_load(Loss::Stop);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    Kill,
    Stop,
}

fn signal(node: &ServeProcess, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(sig)
        .arg(node.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
}

fn owner_lost_mid_load(loss: Loss) {
    let Some(bin) = need_nats() else { return };
    let g = Gateways::new(&bin);
    // Node 0 alone first: it takes the merchant's lease with the first sale.
    let mut node0 = Some(g.start(0));
    let rt = runtime();
    let first = ascii_request("0200", "000000", 10_000, 1, &[]);
    let (first_answer, owner0) = rt.block_on(async {
        let mut c = g.connect(node0.as_ref().unwrap()).await;
        let a = ask(&mut c, &first).await;
        assert_eq!(a.code, "00", "node 0's first sale: {a:?}");
        (a, g.owner().await.expect("node 0 took no lease"))
    });
    let nodes: Vec<ServeProcess> = (1..3).map(|n| g.start(n)).collect();
    let kill_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, resumed) = rt.block_on(async {
        // One closed-loop terminal on each of nodes 1 and 2: sales, one at a time.
        let mut loads = Vec::new();
        for (t, node) in nodes.iter().enumerate() {
            let mut c = g.connect(node).await;
            let (stop, kill_at) = (Arc::clone(&stop), Arc::clone(&kill_at));
            loads.push(tokio::spawn(async move {
                let mut sent: Vec<(Json, Answer, Instant)> = Vec::new();
                let mut first_after_kill: Option<Duration> = None;
                let mut stan = 10_000 * (t as u32 + 1);
                while !stop.load(Ordering::Acquire) {
                    stan += 1;
                    let sale =
                        ascii_request("0200", "000000", 100 + u64::from(stan % 97), stan, &[]);
                    let started = Instant::now();
                    let a = ask(&mut c, &sale).await;
                    let killed = *kill_at.lock().unwrap();
                    if let (Some(k), None) = (killed, first_after_kill) {
                        if started > k && a.code == "00" {
                            first_after_kill = Some(Instant::now() - k);
                        }
                    }
                    sent.push((sale, a, started));
                }
                (sent, first_after_kill)
            }));
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        // kill -9 (or SIGSTOP) of the owner, mid-load.
        match loss {
            Loss::Kill => drop(node0.take()),
            Loss::Stop => signal(node0.as_ref().unwrap(), "-STOP"),
        }
        *kill_at.lock().unwrap() = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(TTL_MS + 3_000)).await;
        stop.store(true, Ordering::Release);
        let mut sent = Vec::new();
        let mut resumed = Vec::new();
        for l in loads {
            let (s, r) = l.await.unwrap();
            sent.extend(s);
            resumed.push(r);
        }
        (sent, resumed)
    });
    let kill = kill_at.lock().unwrap().unwrap();
    let before = sent.iter().filter(|(_, _, t)| *t < kill).count();
    let after = sent.len() - before;
    eprintln!(
        "lease owner lost ({loss:?}): {before} sales before, {after} after; first approval started after the kill on each survivor: {resumed:?}"
    );
    assert!(before > 0, "no load before the kill");
    let bad: Vec<_> = sent.iter().filter(|(_, a, _)| a.code != "00").collect();
    assert!(bad.is_empty(), "answers other than 00: {bad:?}");
    for r in &resumed {
        let r = r.expect("a survivor approved nothing after the kill");
        assert!(
            r <= Duration::from_millis(TTL_MS + 2_000),
            "resumed {r:?} after the kill (TTL {TTL_MS} ms + 2 s margin)"
        );
    }
    rt.block_on(async {
        let owner = g.owner().await;
        assert!(
            owner.as_ref().is_some_and(|o| *o != owner0),
            "the lease did not move: {owner:?}, was {owner0}"
        );
        // Every acknowledged answer, on both survivors (and on the hung owner, resumed): its
        // repeat gets the stored answer.
        let mut asked: Vec<&ServeProcess> = nodes.iter().collect();
        if let Some(hung) = &node0 {
            signal(hung, "-CONT");
            asked.push(hung);
        }
        for node in asked {
            let mut c = g.connect(node).await;
            let a = ask(&mut c, &repeat(&first)).await;
            assert_eq!((&a.code, &a.rrn), (&first_answer.code, &first_answer.rrn));
            for (doc, before, _) in &sent {
                let a = ask(&mut c, &repeat(doc)).await;
                assert_eq!(
                    (&a.code, &a.reason, &a.rrn),
                    (&before.code, &before.reason, &before.rrn),
                    "repeat of {doc}"
                );
            }
        }
        // The first sale (decided by the dead owner) is still refundable exactly once in
        // full: two refunds of 60 % at once on the two survivors, one passes.
        let original = [
            ("37", first_answer.rrn.clone().unwrap()),
            ("90", de90(&first)),
        ];
        let r1 = ascii_request("0200", "200000", 6_000, 900, &original);
        let r2 = ascii_request("0200", "200000", 6_000, 901, &original);
        let mut a = g.connect(&nodes[0]).await;
        let mut b = g.connect(&nodes[1]).await;
        race_two(&mut a, &r1, &mut b, &r2).await;
    });
}
