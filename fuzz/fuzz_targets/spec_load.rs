//! The dialect-file loader (`--spec FILE`): arbitrary TOML; a spec that loads drives the codec
//! over the message bytes after the first NUL byte (decode, re-encode, JSON view).
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::iso8583::Spec;

fuzz_target!(|data: &[u8]| {
    let (text, message) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    match Spec::from_toml("fuzz.toml", text) {
        Ok(spec) => {
            for n in 0..=130u8 {
                let _ = spec.field_name(n);
            }
            refundgate_fuzz::codec_round_trip(&spec, message);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
