//! The ledger snapshot loader (`Ledger::restore`, run at every start from the newest
//! snapshot): a restored ledger must survive traffic (refunds, voids, reversals, repeats,
//! settlements) without panicking, and snapshot to bytes that restore again.
//!
//! Input byte 0 picks the mode. Raw: the rest is snapshot bytes. Built: a workload builds a
//! ledger, its snapshot is patched at positions the input names (checksums are the journal's
//! business; this is a snapshot whose checksum was valid), restored, and driven by the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::ledger::{Ledger, PanKey};
use refundgate_fuzz::ledger_ops::{fresh, merchants, probe, run, seeded, KEY};
use refundgate_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let set = merchants();
    let bytes = if mode & 1 == 0 {
        input.bytes(usize::MAX).to_vec()
    } else {
        let ledger = fresh();
        if mode & 2 != 0 {
            seeded(&ledger);
        }
        let n = usize::from(input.u8() % 32);
        let ops = input.bytes(3 * n);
        run(&ledger, &mut Input(ops), n);
        let mut snap = Vec::new();
        ledger.snapshot(&mut snap);
        let patches = input.u8() % 8;
        for _ in 0..patches {
            let at = usize::from(input.u16());
            let v = input.u8();
            if !snap.is_empty() {
                let len = snap.len();
                snap[at % len] = v;
            }
        }
        snap
    };
    let Ok(ledger) = Ledger::restore(&set, PanKey::new(&KEY), &bytes) else {
        return;
    };
    let mut first = Vec::new();
    ledger.snapshot(&mut first);
    let again = Ledger::restore(&set, PanKey::new(&KEY), &first)
        .expect("the snapshot of a restored ledger restores");
    let mut second = Vec::new();
    again.snapshot(&mut second);
    assert_eq!(first, second, "snapshot → restore → snapshot differs");
    probe(&ledger);
    run(&ledger, &mut input, 64);
});
