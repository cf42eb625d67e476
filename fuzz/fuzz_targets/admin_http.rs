//! The admin API's request handling ([`AdminApi::handle`]) without sockets.
//!
//! Input: byte 0 picks the method (GET, POST, PUT, HEAD, or a made-up one), bit 2 adds the
//! right bearer token, bit 3 a wrong one, bit 4 an `Idempotency-Key`; the rest is split at
//! newlines into the request target, the key and the body. The ledger (embedded merchants,
//! one sale and one refund, no journal) is fresh for every input. Properties: never a panic;
//! every answer is a known status with a JSON object body; without the right token a `/v1/`
//! call is 401 and changes nothing; the PAN of the sale never appears in clear.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use refundgate::admin::{AdminApi, Tokens};
use refundgate::clock::ManualClock;
use refundgate::flow::{Gateway, Link};
use refundgate::ledger::{
    CardType, Dialect, Ledger, MerchantSet, Operation, OriginalRef, PanKey, Reason, Request,
};

const PAN: &str = "4761739001010119";
const TOKEN: &str = "ops:0123456789abcdef0123";
const NOW: i64 = 1_769_871_600;

fn merchants() -> &'static MerchantSet {
    static SET: OnceLock<MerchantSet> = OnceLock::new();
    SET.get_or_init(|| MerchantSet::embedded().unwrap_or_default())
}

fn request(op: Operation, stan: u32, amount: u64, original: Option<u32>) -> Request<'static> {
    Request {
        dialect: Dialect::Ascii1987,
        op,
        repeat: false,
        merchant: "MERCHANT 000001",
        terminal: "TERM0001",
        stan,
        local_date_mmdd: 131,
        mti_class: 2,
        transmission: Some(131_000_000 + u64::from(stan)),
        rrn: (op == Operation::Sale).then_some("000000000001"),
        batch: None,
        pan: PAN,
        amount_minor: amount,
        currency: 840,
        card_type: CardType::from_pan(PAN),
        original: original.map(|stan| OriginalRef::Iso {
            mti: 200,
            stan,
            transmission: 131_000_000 + u64::from(stan),
            rrn: None,
        }),
        body_fingerprint: u64::from(stan) * 7919 + amount,
    }
}

fn api() -> AdminApi {
    let ledger = Ledger::new(merchants(), PanKey::new(&[7; 16]));
    let sale = ledger.decide(&request(Operation::Sale, 1, 60_000, None), NOW);
    assert_eq!(sale.reason, Reason::APPROVED);
    let refund = ledger.decide(&request(Operation::Refund, 2, 1_000, Some(1)), NOW + 60);
    assert_eq!(refund.reason, Reason::APPROVED);
    let gateway = Gateway::new(
        Arc::new(ledger),
        None,
        Arc::new(ManualClock::new(NOW + 120)),
        vec![Link::plain(&refundgate::dialect::ASCII1987)],
    );
    let tokens = Tokens::parse(TOKEN).unwrap_or_default();
    AdminApi::new(Arc::new(gateway), tokens)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "POST", "PUT", "HEAD", "G\u{e9}T"][usize::from(flags & 3) % 5];
    let method = if flags & 0x80 != 0 {
        method_of(flags)
    } else {
        method
    };
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let key = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let mut headers = Vec::new();
    let right = flags & 4 != 0;
    if right {
        headers.push(("Authorization", "Bearer 0123456789abcdef0123"));
    }
    if flags & 8 != 0 {
        headers.push(("authorization", "Bearer 0123456789abcdef0124"));
    }
    if flags & 16 != 0 {
        headers.push(("Idempotency-Key", key.as_str()));
    }
    let api = api();
    let reply = futures_lite_block_on(api.handle(method, &target, &headers, body, None));
    assert!(
        [200, 201, 400, 401, 403, 404, 405, 409, 413, 422, 503].contains(&reply.status),
        "status {}",
        reply.status
    );
    let json: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
    assert!(json.is_object());
    assert!(!reply.body.contains(PAN), "PAN in clear");
    let path = target.split('?').next().unwrap_or("");
    let v1 = path == "/v1" || path.starts_with("/v1/");
    if v1 && !right {
        assert_eq!(reply.status, 401, "{target} without the token");
    }
    // Nothing but a successful POST changes the merchant.
    if reply.status != 201 {
        let again = futures_lite_block_on(api.handle(
            "GET",
            "/v1/merchants/MERCHANT%20000001",
            &[("Authorization", "Bearer 0123456789abcdef0123")],
            b"",
            None,
        ));
        let m: serde_json::Value = serde_json::from_str(&again.body).expect("JSON body");
        assert_eq!(m["funds"]["reserve"], 100_000);
        assert!(m["admin_changes"].as_array().is_some_and(|a| a.is_empty()));
    }
});

fn method_of(flags: u8) -> &'static str {
    match flags % 3 {
        0 => "DELETE",
        1 => "PATCH",
        _ => "OPTIONS",
    }
}

/// Polls `f` to completion on this thread: with no journal the API never waits on I/O.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
