//! The journal payload decoder of ledger events (`LedgerEvent::decode`, run on every record
//! at replay) and replay itself (`Ledger::apply`).
//!
//! Input byte 0 picks the mode. Raw: the rest is one payload. Built: a workload's events
//! (taken from its reservations) are encoded, patched at input-chosen bytes, decoded and
//! replayed into a second ledger. Properties: decode never panics; what decodes re-encodes to
//! bytes that decode to the same event; replaying any event, then traffic, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::ledger::LedgerEvent;
use refundgate_fuzz::ledger_ops::{fresh, probe, sale, T0};
use refundgate_fuzz::Input;

fn check(payload: &[u8], replica: &refundgate::ledger::Ledger) {
    let Ok(event) = LedgerEvent::decode(payload) else {
        return;
    };
    let mut again = Vec::new();
    event.encode(&mut again);
    assert_eq!(
        LedgerEvent::decode(&again).as_ref(),
        Ok(&event),
        "event re-encode round trip"
    );
    let _ = replica.apply(&event);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let replica = fresh();
    if mode & 1 == 0 {
        check(input.bytes(usize::MAX), &replica);
    } else {
        // Events of a few sales and refunds of them, as the flow layer would journal them.
        let ledger = fresh();
        let mut payloads = Vec::new();
        let n = usize::from(input.u8() % 8) + 1;
        for i in 0..n {
            let stan = i as u32 + 1;
            let amount = u64::from(input.u8()) * 100 + 1;
            let s = sale(stan, amount, "T1");
            let mut msgs = vec![s.clone()];
            if input.u8() & 1 == 1 {
                msgs.push(refundgate_fuzz::ledger_ops::child(
                    &s,
                    refundgate::ledger::Operation::Refund,
                    stan + 100,
                    amount / 2 + 1,
                ));
            }
            for m in msgs {
                if let Ok(r) = ledger.reserve(&m.req(), T0 + 86_400 * i64::from(i as u8)) {
                    let mut p = Vec::new();
                    r.event().encode(&mut p);
                    payloads.push(p);
                    let _ = ledger.commit(r);
                }
            }
        }
        let patches = input.u8() % 4;
        for _ in 0..patches {
            let which = usize::from(input.u8());
            let at = usize::from(input.u16());
            let v = input.u8();
            if let Some(p) = payloads.get_mut(which % n.max(1)) {
                if !p.is_empty() {
                    let len = p.len();
                    p[at % len] = v;
                }
            }
        }
        for p in &payloads {
            check(p, &replica);
        }
    }
    probe(&replica);
});
