//! Codec benchmarks: refundgate's zero-copy ISO 8583 codec against the `iso8583_rs` crate on the
//! same refund 0200, plus the other refund messages of both dialects.
//!
//! Run with `cargo bench --bench codec`. Every message is read from `../shared/vectors` at start
//! and every benchmarked operation is checked once (byte-exact where a vector exists) before it
//! is timed. The table printed at the end comes from this run's criterion medians.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The benchmarks whose medians make the summary table: (group, name).
const TABLE: [(&str, &str); 6] = [
    ("decode", "ascii1987_refund_0200"),
    ("encode", "ascii1987_refund_0200"),
    ("decode", "ascii1987_binary_bitmap_refund_0200"),
    ("encode", "ascii1987_binary_bitmap_refund_0200"),
    ("iso8583_rs", "decode_refund_0200"),
    ("iso8583_rs", "encode_refund_0200"),
];

use bytes::BytesMut;
use criterion::Criterion;
use iso8583_rs::iso8583::iso_spec::{self as rs_spec, MessageSegment as RsSegment, Spec as RsSpec};
use refundgate::iso8583::{self, FieldList, Message, Mti, Spec, Value, ASCII1987, CUP_POS};

/// The iso8583_rs spec (its own YAML format), read through the `SPEC_FILE` variable.
const RS_SPEC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/iso8583_rs_spec.yaml");
/// Bytes before the MTI in a `cup_bcd` vector: TPDU (5) + header (6).
const CUP_HEAD: usize = 11;
/// Elements the 0210 echoes from the 0200 (38 and 39 are set).
const ECHO_0210: [u8; 8] = [3, 4, 11, 12, 13, 37, 41, 42];
/// Elements the 0230 echoes from the 0220 (12, 13, 15, 32, 37, 39, 64 are set).
const ECHO_0230: [u8; 10] = [2, 3, 4, 11, 25, 41, 42, 49, 60, 61];

fn vector(dir: &str, name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/vectors")
        .join(dir)
        .join(format!("{name}.hex"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `ascii1987` with raw 8-byte bitmaps: the wire form iso8583_rs reads, for a same-bytes run.
fn ascii1987_binary_bitmap() -> Spec {
    let text = include_str!("../specs/ascii1987.toml");
    assert!(text.contains("\nbitmap = \"hex\"\n"));
    let text = text.replace("\nbitmap = \"hex\"\n", "\nbitmap = \"binary\"\n");
    Spec::from_toml("ascii1987_binary_bitmap", &text).unwrap()
}

/// Everything the benchmarks read, loaded and checked once.
struct Fixtures {
    req_0200: Vec<u8>,
    resp_0210: Vec<u8>,
    /// `refund_0220` from the MTI on.
    cup_0220: Vec<u8>,
    /// `refund_0230` from the MTI on.
    cup_0230: Vec<u8>,
    /// The refund 0200 with 8+8 raw bitmap bytes instead of 32 hex characters.
    req_0200_binary: Vec<u8>,
    binary_spec: Spec,
    rs: &'static RsSpec,
    rs_seg: &'static RsSegment,
}

impl Fixtures {
    fn load() -> Fixtures {
        let req_0200 = vector("ascii1987", "refund_0200");
        let resp_0210 = vector("ascii1987", "refund_0210");
        let cup_0220 = vector("cup_bcd", "refund_0220")[CUP_HEAD..].to_vec();
        let cup_0230 = vector("cup_bcd", "refund_0230")[CUP_HEAD..].to_vec();
        assert_eq!(req_0200.len(), 183);

        // The same message with binary bitmaps: MTI, the two bitmaps' 32 hex characters as
        // 16 raw bytes, then the fields unchanged.
        let mut req_0200_binary = req_0200[..4].to_vec();
        req_0200_binary.extend(hex::decode(&req_0200[4..36]).unwrap());
        req_0200_binary.extend_from_slice(&req_0200[36..]);
        assert_eq!(req_0200_binary.len(), 167);

        let rs = rs_spec::spec("RefundgateBench");
        let rs_seg = rs.get_message_from_header("0200").unwrap();
        Fixtures {
            req_0200,
            resp_0210,
            cup_0220,
            cup_0230,
            req_0200_binary,
            binary_spec: ascii1987_binary_bitmap(),
            rs,
            rs_seg,
        }
    }
}

/// Decode and read amount and STAN: the work of every decode benchmark.
#[inline]
fn decode_amount_stan(spec: &Spec, bytes: &[u8]) -> (u64, u32) {
    let msg = iso8583::decode(spec, bytes).unwrap();
    (msg.amount().unwrap().0, msg.stan().unwrap())
}

/// The refund 0200 built from its fields: DE4 and DE11 as numbers, the rest as text.
#[inline]
fn encode_0200(
    spec: &Spec,
    mti: Mti,
    text: &[(u8, &[u8])],
    amount: u64,
    stan: u32,
    out: &mut BytesMut,
) {
    out.clear();
    let mut fields: FieldList<'_, 24> = FieldList::new();
    for &(n, t) in text {
        let value = match n {
            4 => Value::Number(amount),
            11 => Value::Number(u64::from(stan)),
            _ => Value::Text(t),
        };
        fields.set(n, value).unwrap();
    }
    iso8583::encode(spec, mti, fields.as_slice(), out).unwrap();
}

/// Decode the 0200 and build its approved 0210: echo `echo`, set 38 and 39.
#[inline]
fn respond_0210(req: &[u8], echo: &[u8], out: &mut BytesMut) {
    out.clear();
    let msg = iso8583::decode(&ASCII1987, req).unwrap();
    let mut fields: FieldList<'_, 24> = FieldList::new();
    for &n in echo {
        fields.echo(&msg, n).unwrap();
    }
    fields.set(38, Value::Text(b"AB1234")).unwrap();
    fields.set(39, Value::Text(b"00")).unwrap();
    iso8583::encode(&ASCII1987, msg.mti().response(), fields.as_slice(), out).unwrap();
}

/// Decode the CUP 0220 and build the 0230 of the vectors (the MAC value is given, not computed).
#[inline]
fn respond_0230(req: &[u8], out: &mut BytesMut) {
    out.clear();
    let msg = iso8583::decode(&CUP_POS, req).unwrap();
    let mut fields: FieldList<'_, 24> = FieldList::new();
    for n in ECHO_0230 {
        fields.echo(&msg, n).unwrap();
    }
    fields.set(12, Value::Text(b"091200")).unwrap();
    fields.set(13, Value::Text(b"1122")).unwrap();
    fields.set(15, Value::Text(b"1122")).unwrap();
    fields.set(32, Value::Text(b"48020000")).unwrap();
    fields.set(37, Value::Text(b"112209000052")).unwrap();
    fields.set(39, Value::Text(b"00")).unwrap();
    fields.set(64, Value::Text(b"04640BDD")).unwrap();
    iso8583::encode(&CUP_POS, msg.mti().response(), fields.as_slice(), out).unwrap();
}

/// iso8583_rs: parse and read amount and STAN as numbers.
#[inline]
fn rs_decode(rs: &'static RsSpec, bytes: &mut Vec<u8>) -> (u64, u32) {
    let msg = rs.parse(bytes).unwrap();
    let amount: u64 = msg.bmp_child_value(4).unwrap().parse().unwrap();
    let stan: u32 = msg.bmp_child_value(11).unwrap().parse().unwrap();
    (amount, stan)
}

/// iso8583_rs: build the 0200 from its fields (all given as ready strings, its only form) and
/// assemble it.
#[inline]
fn rs_encode(rs_seg: &'static RsSegment, rs: &'static RsSpec, fields: &[(u32, &str)]) -> Vec<u8> {
    let mut msg = rs_spec::new_msg(rs, rs_seg);
    msg.set("message_type", "0200").unwrap();
    for &(n, v) in fields {
        msg.set_on(n, v).unwrap();
    }
    msg.assemble().unwrap()
}

/// The 0200's fields as (element, text) from a decoded message.
fn text_fields<'a>(msg: &Message<'a>) -> Vec<(u8, &'a [u8])> {
    msg.present()
        .map(|n| (n, msg.field_bytes(usize::from(n)).unwrap()))
        .collect()
}

fn decode_benches(c: &mut Criterion, fx: &Fixtures) {
    assert_eq!(decode_amount_stan(&ASCII1987, &fx.req_0200), (1500, 123));
    assert_eq!(decode_amount_stan(&ASCII1987, &fx.resp_0210), (1500, 123));
    assert_eq!(decode_amount_stan(&CUP_POS, &fx.cup_0220), (3000, 52));
    assert_eq!(
        decode_amount_stan(&fx.binary_spec, &fx.req_0200_binary),
        (1500, 123)
    );

    let mut g = c.benchmark_group("decode");
    g.bench_function("ascii1987_refund_0200", |b| {
        b.iter(|| decode_amount_stan(&ASCII1987, black_box(&fx.req_0200)))
    });
    g.bench_function("ascii1987_refund_0210", |b| {
        b.iter(|| decode_amount_stan(&ASCII1987, black_box(&fx.resp_0210)))
    });
    g.bench_function("cup_pos_refund_0220", |b| {
        b.iter(|| decode_amount_stan(&CUP_POS, black_box(&fx.cup_0220)))
    });
    g.bench_function("ascii1987_binary_bitmap_refund_0200", |b| {
        b.iter(|| decode_amount_stan(&fx.binary_spec, black_box(&fx.req_0200_binary)))
    });
    g.finish();
}

fn encode_benches(c: &mut Criterion, fx: &Fixtures) {
    let req = iso8583::decode(&ASCII1987, &fx.req_0200).unwrap();
    let text = text_fields(&req);
    let (amount, stan) = (req.amount().unwrap().0, req.stan().unwrap());
    let mut out = BytesMut::with_capacity(512);

    encode_0200(&ASCII1987, req.mti(), &text, amount, stan, &mut out);
    assert_eq!(
        &out[..],
        &fx.req_0200[..],
        "encoded 0200 differs from the vector"
    );
    encode_0200(&fx.binary_spec, req.mti(), &text, amount, stan, &mut out);
    assert_eq!(
        &out[..],
        &fx.req_0200_binary[..],
        "binary-bitmap 0200 differs"
    );
    // Without 12 and 13 the response is exactly the refund_0210 vector.
    let vector_echo: Vec<u8> = ECHO_0210
        .iter()
        .copied()
        .filter(|n| ![12, 13].contains(n))
        .collect();
    respond_0210(&fx.req_0200, &vector_echo, &mut out);
    assert_eq!(&out[..], &fx.resp_0210[..], "0210 differs from the vector");
    respond_0210(&fx.req_0200, &ECHO_0210, &mut out);
    let resp = iso8583::decode(&ASCII1987, &out).unwrap();
    assert_eq!(
        resp.present().collect::<Vec<_>>(),
        [3, 4, 11, 12, 13, 37, 38, 39, 41, 42]
    );
    respond_0230(&fx.cup_0220, &mut out);
    assert_eq!(&out[..], &fx.cup_0230[..], "0230 differs from the vector");

    let mut g = c.benchmark_group("encode");
    g.bench_function("ascii1987_refund_0200", |b| {
        b.iter(|| {
            encode_0200(
                &ASCII1987,
                req.mti(),
                black_box(&text),
                black_box(amount),
                black_box(stan),
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.bench_function("ascii1987_refund_0210_from_request", |b| {
        b.iter(|| {
            respond_0210(black_box(&fx.req_0200), &ECHO_0210, &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("cup_pos_refund_0230", |b| {
        b.iter(|| {
            respond_0230(black_box(&fx.cup_0220), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("ascii1987_binary_bitmap_refund_0200", |b| {
        b.iter(|| {
            encode_0200(
                &fx.binary_spec,
                req.mti(),
                black_box(&text),
                black_box(amount),
                black_box(stan),
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.finish();
}

fn iso8583_rs_benches(c: &mut Criterion, fx: &Fixtures) {
    let mut wire = fx.req_0200_binary.clone();
    assert_eq!(
        rs_decode(fx.rs, &mut wire),
        (1500, 123),
        "iso8583_rs reads other values"
    );
    let req = iso8583::decode(&ASCII1987, &fx.req_0200).unwrap();
    let strings: Vec<(u32, &str)> = req
        .present()
        .map(|n| (u32::from(n), req.text(usize::from(n)).unwrap()))
        .collect();
    assert_eq!(strings.len(), 14);
    assert_eq!(
        rs_encode(fx.rs_seg, fx.rs, &strings),
        fx.req_0200_binary,
        "iso8583_rs assembles other bytes"
    );

    let mut g = c.benchmark_group("iso8583_rs");
    g.bench_function("decode_refund_0200", |b| {
        b.iter(|| rs_decode(fx.rs, black_box(&mut wire)))
    });
    g.bench_function("encode_refund_0200", |b| {
        b.iter(|| rs_encode(fx.rs_seg, fx.rs, black_box(&strings)))
    });
    g.finish();
}

/// Criterion's output directory, found the way criterion finds it (without `cargo metadata`).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("criterion"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion"),
    }
}

fn estimates_path(group: &str, name: &str) -> PathBuf {
    criterion_dir()
        .join(group)
        .join(name)
        .join("new/estimates.json")
}

/// When each table benchmark's estimates were last written (before this run).
fn snapshot() -> Vec<Option<SystemTime>> {
    TABLE
        .iter()
        .map(|(g, n)| {
            std::fs::metadata(estimates_path(g, n))
                .ok()?
                .modified()
                .ok()
        })
        .collect()
}

/// This run's median (ns) of table entry `i`: `None` when its estimates were not rewritten by
/// this run (filtered out, `--test`, `--list`), so a stale number is never shown.
fn median_ns(i: usize, before: &[Option<SystemTime>]) -> Option<f64> {
    let (group, name) = TABLE[i];
    let path = estimates_path(group, name);
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if before[i].is_some_and(|b| modified <= b) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// CPU time this thread has run, in ns (Linux `schedstat`; it lags by at most a scheduler
/// tick, so it is only read around runs of a quarter second or more).
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPU ns per call of `f`: the median of three runs of at least 250 ms of this thread's CPU
/// time each. Unlike criterion's wall-clock samples it does not count the time the thread
/// waits for a core, which on a shared machine can be half of the wall time or more.
fn cpu_ns_per_iter(mut f: impl FnMut()) -> Option<f64> {
    const BATCH: u64 = 2_000;
    let mut runs = Vec::with_capacity(3);
    for _ in 0..3 {
        let start = thread_cpu_ns()?;
        let mut iters = 0u64;
        let mut now = start;
        while now - start < 250_000_000 {
            for _ in 0..BATCH {
                f();
            }
            iters += BATCH;
            now = thread_cpu_ns()?;
        }
        runs.push((now - start) as f64 / iters as f64);
    }
    runs.sort_by(f64::total_cmp);
    Some(runs[1])
}

/// CPU ns per iteration of the six table benchmarks, in `TABLE` order.
fn cpu_table(fx: &Fixtures) -> Vec<Option<f64>> {
    let req = iso8583::decode(&ASCII1987, &fx.req_0200).unwrap();
    let text = text_fields(&req);
    let (amount, stan) = (req.amount().unwrap().0, req.stan().unwrap());
    let strings: Vec<(u32, &str)> = req
        .present()
        .map(|n| (u32::from(n), req.text(usize::from(n)).unwrap()))
        .collect();
    let mut wire = fx.req_0200_binary.clone();
    let mut out = BytesMut::with_capacity(512);
    vec![
        cpu_ns_per_iter(|| {
            black_box(decode_amount_stan(&ASCII1987, black_box(&fx.req_0200)));
        }),
        cpu_ns_per_iter(|| {
            encode_0200(
                &ASCII1987,
                req.mti(),
                black_box(&text),
                black_box(amount),
                black_box(stan),
                &mut out,
            );
            black_box(out.len());
        }),
        cpu_ns_per_iter(|| {
            black_box(decode_amount_stan(
                &fx.binary_spec,
                black_box(&fx.req_0200_binary),
            ));
        }),
        cpu_ns_per_iter(|| {
            encode_0200(
                &fx.binary_spec,
                req.mti(),
                black_box(&text),
                black_box(amount),
                black_box(stan),
                &mut out,
            );
            black_box(out.len());
        }),
        cpu_ns_per_iter(|| {
            black_box(rs_decode(fx.rs, black_box(&mut wire)));
        }),
        cpu_ns_per_iter(|| {
            black_box(rs_encode(fx.rs_seg, fx.rs, black_box(&strings)));
        }),
    ]
}

fn print_table(wall: &[Option<f64>], cpu: &[Option<f64>]) {
    let ns = |v: Option<f64>| v.map_or(format!("{:>9}", "n/a"), |v| format!("{v:>9.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:>8.1}x", a / b),
        _ => format!("{:>9}", "n/a"),
    };
    let rows = [
        ("refundgate ascii1987 (hex bitmaps, 183 B)", 0, 1),
        ("refundgate, binary bitmaps (167 B)", 2, 3),
        ("iso8583_rs 0.1.10, binary bitmaps (167 B)", 4, 5),
    ];
    println!();
    println!("refund 0200, this run: criterion wall-clock medians and thread CPU time (ns/iter)");
    println!(
        "{:<44} {:>9} {:>9}   {:>9} {:>9}",
        "", "decode", "encode", "cpu dec", "cpu enc"
    );
    for (name, d, e) in rows {
        println!(
            "{name:<44} {} {}   {} {}",
            ns(wall[d]),
            ns(wall[e]),
            ns(cpu[d]),
            ns(cpu[e])
        );
    }
    for (name, ours_d, ours_e) in [
        ("ratio iso8583_rs / refundgate ascii1987", 0, 1),
        ("ratio iso8583_rs / refundgate same bytes", 2, 3),
    ] {
        println!(
            "{name:<44} {} {}   {} {}",
            ratio(wall[4], wall[ours_d]),
            ratio(wall[5], wall[ours_e]),
            ratio(cpu[4], cpu[ours_d]),
            ratio(cpu[5], cpu[ours_e])
        );
    }
    println!("targets (issue 19): decode <= 180 ns, encode <= 200 ns, ratio >= 18x");
}

fn main() {
    // iso8583_rs reads its spec from SPEC_FILE in a lazy static, on first use.
    std::env::set_var("SPEC_FILE", RS_SPEC_FILE);
    let before = snapshot();
    let fx = Fixtures::load();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    decode_benches(&mut c, &fx);
    encode_benches(&mut c, &fx);
    iso8583_rs_benches(&mut c, &fx);
    c.final_summary();
    let wall: Vec<Option<f64>> = (0..TABLE.len()).map(|i| median_ns(i, &before)).collect();
    // CPU times only when criterion measured the whole table in this run (not for --test,
    // --list or a filter that leaves some of it out).
    let cpu = if wall.iter().all(Option::is_some) {
        cpu_table(&fx)
    } else {
        vec![None; TABLE.len()]
    };
    print_table(&wall, &cpu);
}
