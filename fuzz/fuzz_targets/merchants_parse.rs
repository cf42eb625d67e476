//! The merchant file (`serve --merchants FILE`): arbitrary TOML; a set that loads must give a
//! ledger whose snapshot restores to the same snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::ledger::{Ledger, MerchantSet, PanKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let set = match MerchantSet::from_toml_str(text) {
        Ok(set) => set,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let key = PanKey::new(b"fuzz-pan-key-16b");
    let ledger = Ledger::new(&set, key.clone());
    let mut snap = Vec::new();
    ledger.snapshot(&mut snap);
    let restored = Ledger::restore(&set, key, &snap).expect("a fresh ledger's snapshot restores");
    let mut again = Vec::new();
    restored.snapshot(&mut again);
    assert_eq!(snap, again, "snapshot → restore → snapshot differs");
});
