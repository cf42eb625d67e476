//! The JSON view (`refundgate encode` input): arbitrary JSON through `from_json` for both
//! dialects. Whatever encodes must decode, and its JSON view must encode to the same bytes
//! again (the view is lossless).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use refundgate::iso8583::json::{from_json, to_json};
use refundgate::iso8583::{decode, ASCII1987, CUP_POS};

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for spec in [&*ASCII1987, &*CUP_POS] {
        let mut out = BytesMut::new();
        if let Err(e) = from_json(spec, &doc, &mut out) {
            let _ = e.to_string();
            continue;
        }
        let msg = match decode(spec, &out) {
            Ok(msg) => msg,
            Err(e) => panic!(
                "{}: from_json wrote bytes that do not decode: {e} ({})",
                spec.name(),
                hex_of(&out)
            ),
        };
        let view = to_json(&msg, true);
        let _ = to_json(&msg, false);
        let mut again = BytesMut::new();
        from_json(spec, &view, &mut again).expect("the view of an encoded message encodes");
        assert_eq!(
            out,
            again,
            "{}: JSON view round trip changed the bytes",
            spec.name()
        );
    }
});

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
