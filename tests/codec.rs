//! The codec against the independent vectors in `../shared/vectors` (pyiso8583 4.0.1): every
//! message decodes to exactly its fields and encodes back to exactly its bytes; every malformed
//! message gets its documented handling.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, non_snake_case)]

#[path = "codec/dialect.rs"]
mod dialect;
#[path = "codec/iso87b_vectors.rs"]
mod iso87b_vectors;
#[path = "codec/public_vectors.rs"]
mod public_vectors;

use std::path::PathBuf;

use bytes::BytesMut;
use refundgate::iso8583::{self, json, Spec};
use serde_json::Value as Json;

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors")
}

fn load(dir: &str, name: &str) -> Json {
    let path = vectors().join(dir).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Splits a vector's bytes into (tpdu+header, message) for its dialect.
fn message_bytes(dir: &str, hex_text: &str) -> (Vec<u8>, Vec<u8>) {
    let bytes = hex::decode(hex_text).unwrap();
    if dir == "cup_bcd" {
        (bytes[..11].to_vec(), bytes[11..].to_vec())
    } else {
        (Vec::new(), bytes)
    }
}

fn spec_for(dir: &str) -> &'static Spec {
    Spec::builtin(dir).unwrap()
}

fn check_vector(dir: &str, name: &str) {
    let v = load(dir, name);
    let spec = spec_for(dir);
    let (head, msg_bytes) = message_bytes(dir, v["hex"].as_str().unwrap());
    if dir == "cup_bcd" {
        assert_eq!(hex::encode(&head[..5]), v["tpdu"].as_str().unwrap());
        assert_eq!(hex::encode(&head[5..]), v["header"].as_str().unwrap());
    }
    // Decode: exactly the MTI and fields of the vector, nothing more.
    let msg = iso8583::decode(spec, &msg_bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let shown = json::to_json(&msg, true);
    assert_eq!(shown["mti"], v["mti"], "{name}: mti");
    assert_eq!(shown["fields"], v["fields"], "{name}: fields");
    if let Some(sub) = v.get("subfields").and_then(Json::as_object) {
        for (k, expected) in sub {
            assert_eq!(&shown["subfields"][k], expected, "{name}: subfields {k}");
        }
    }
    // Encode: exactly the vector's bytes (or its canonical form for decode-only vectors).
    let expected_hex = v
        .get("canonical_hex")
        .and_then(Json::as_str)
        .unwrap_or_else(|| v["hex"].as_str().unwrap());
    let (_, expected) = message_bytes(dir, expected_hex);
    let mut out = BytesMut::new();
    json::from_json(spec, &v, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        hex::encode(&out),
        hex::encode(&expected),
        "{name}: encoded bytes"
    );
}

macro_rules! vector_tests {
    ($dir:literal: $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_vector($dir, stringify!($name));
            }
        )*
    };
}

mod ascii1987 {
    use super::check_vector;
    vector_tests!("ascii1987": echo_0800, echo_0810, refund_0200, refund_0210, refund_0210_decline_12,
        refund_0210_decline_25, refund_0210_decline_30, refund_0210_decline_61, refund_0210_decline_65,
        reversal_sale_0400, reversal_sale_0410, reversal_void_0400, reversal_void_0410, sale2_0200,
        sale2_0210, sale_0200, sale_0210, void_0200, void_0210, void_0210_decline_94);
}

mod cup_bcd {
    use super::check_vector;
    vector_tests!("cup_bcd": echo_0820, echo_0830, refund_0220, refund_0230, refund_0230_decline_12,
        refund_0230_decline_25, refund_0230_decline_30, refund_0230_decline_61, refund_0230_decline_65,
        reversal_sale_0400, reversal_sale_0410, reversal_void_0400, reversal_void_0410, sale2_0200,
        sale2_0210, sale_0200, sale_0210, signon_0800, signon_0810, v8_real_qr_sale_0200, void_0200,
        void_0210, void_0210_decline_94);
}

/// Every vector directory entry has a test above (so a new vector cannot be silently skipped).
#[test]
fn every_shared_vector_has_a_named_test() {
    let src = include_str!("codec.rs");
    for dir in ["ascii1987", "cup_bcd"] {
        for entry in std::fs::read_dir(vectors().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if let Some(stem) = name.strip_suffix(".json") {
                assert!(
                    src.contains(&format!(" {stem},")) || src.contains(&format!(" {stem})")),
                    "{dir}/{stem} has no test"
                );
            }
        }
    }
}

/// Malformed messages: what the codec says decides the handling (DOMAIN §2).
mod malformed {
    use super::*;

    /// What the codec makes of a malformed vector's message bytes.
    enum Decoded {
        /// A cup_pos frame too short to hold the TPDU and header: no message to decode.
        ShorterThanHead,
        /// The message decoded.
        Ok,
        /// The message did not decode.
        Err(iso8583::DecodeError),
    }

    fn handling(name: &str) -> (String, Decoded) {
        let v = load("malformed", name);
        let dir = v["dialect"].as_str().unwrap();
        let spec = spec_for(dir);
        let framed = hex::decode(v["framed_hex"].as_str().unwrap()).unwrap();
        let body = &framed[2..];
        let expected = v["expected"].as_str().unwrap().to_string();
        let msg = if dir == "cup_bcd" {
            if body.len() < 11 {
                return (expected, Decoded::ShorterThanHead);
            }
            &body[11..]
        } else {
            body
        };
        let decoded = match iso8583::decode(spec, msg) {
            Ok(_) => Decoded::Ok,
            Err(e) => Decoded::Err(e),
        };
        (expected, decoded)
    }

    macro_rules! malformed_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    let (expected, decoded) = handling(stringify!($name));
                    match (expected.as_str(), decoded) {
                        ("message_error_respond_30", Decoded::Err(e)) => {
                            assert!(e.answerable(), "{e:?} must have MTI and STAN");
                        }
                        ("message_error_drop", Decoded::Err(e)) => {
                            assert!(!e.answerable(), "{e:?} must not have MTI and STAN");
                        }
                        // Dropped by the frame codec before any decoding (tests/server.rs).
                        ("message_error_drop", Decoded::ShorterThanHead) => {}
                        ("respond_40" | "mac_invalid" | "mac_unverifiable", Decoded::Ok) => {}
                        (expected, Decoded::Ok) => panic!("decoded, but must be {expected}"),
                        (expected, Decoded::Err(e)) => panic!("{e:?}, but must be {expected}"),
                        (expected, Decoded::ShorterThanHead) => {
                            panic!("shorter than TPDU + header, but must be {expected}")
                        }
                    }
                }
            )*
        };
    }

    malformed_tests!(
        a_bitmap_claims_absent_field,
        a_bitmap_non_hex,
        a_de128_bit_without_mac,
        a_de128_mac_no_key,
        a_extra_trailing_bytes,
        a_llvar_beyond_end,
        a_llvar_exceeds_max,
        a_mac_wrong,
        a_mti_non_numeric,
        a_non_digit_in_numeric,
        a_secondary_bitmap_missing,
        a_truncated_mid_field,
        a_unknown_mti_0600,
        c_bad_pad_nibble_de22,
        c_bcd_nibble_A_in_de14,
        c_bcd_nibble_F_in_de4,
        c_bitmap_claims_absent_field,
        c_de64_bit_without_mac,
        c_de64_mac_no_key,
        c_extra_trailing_bytes,
        c_lllvar_beyond_end,
        c_llvar_bad_bcd_length,
        c_llvar_exceeds_max,
        c_mac_wrong,
        c_mti_bad_bcd,
        c_secondary_bitmap_missing,
        c_shorter_than_tpdu_header,
        c_truncated_mid_field,
        c_unknown_mti_0600
    );

    #[test]
    fn errors_name_field_and_offset_and_carry_no_card_data() {
        let (_, Decoded::Err(e)) = handling("a_non_digit_in_numeric") else {
            panic!("a_non_digit_in_numeric decoded");
        };
        let text = e.to_string();
        assert!(text.starts_with("field 4 at offset"), "{text}");
        assert!(!text.contains("4761"), "{text}");
        assert_eq!(e.stan, Some(100));
    }
}

/// Decoders accept lower and mixed case hex bitmaps; encoders write upper case.
#[test]
fn lower_case_bitmap_decodes_and_encodes_upper_case() {
    let v = load("ascii1987", "refund_0200");
    let mut bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
    for b in &mut bytes[4..36] {
        b.make_ascii_lowercase();
    }
    let spec = spec_for("ascii1987");
    let msg = iso8583::decode(spec, &bytes).unwrap();
    assert_eq!(json::to_json(&msg, true)["fields"], v["fields"]);
    let mut out = BytesMut::new();
    json::from_json(spec, &v, &mut out).unwrap();
    assert_eq!(hex::encode(&out), v["hex"].as_str().unwrap());
}

/// `decode` masks card data unless asked not to.
#[test]
fn json_view_masks_pan_track_and_mac_by_default() {
    let v = load("cup_bcd", "sale_0200");
    let (_, bytes) = message_bytes("cup_bcd", v["hex"].as_str().unwrap());
    let msg = iso8583::decode(spec_for("cup_bcd"), &bytes).unwrap();
    let text = json::to_json(&msg, false).to_string();
    assert!(text.contains("622202******0123"), "{text}");
    assert!(!text.contains("6222021234567890123"), "{text}");
    assert!(!text.contains("55FA04BF"), "PIN block shown: {text}");
    assert!(!text.contains("5EDDA19A"), "MAC shown: {text}");
    let pan = msg.pan().unwrap();
    assert_eq!(format!("{pan:?}"), "Pan(622202******0123)");
}

/// Typed accessors give the values the flows need.
#[test]
fn typed_accessors_read_refund_fields() {
    let v = load("ascii1987", "refund_0200");
    let (_, bytes) = message_bytes("ascii1987", v["hex"].as_str().unwrap());
    let msg = iso8583::decode(spec_for("ascii1987"), &bytes).unwrap();
    assert_eq!(msg.amount(), Some(iso8583::Amount(1500)));
    assert_eq!(msg.stan(), Some(123));
    assert_eq!(msg.processing_code().unwrap().tx_type, 20);
    let od = msg.original_data().unwrap();
    assert_eq!(
        (od.mti.0, od.stan, od.transmission, od.acquirer),
        (200, 100, 1_121_154_500, 12345)
    );
    assert_eq!(msg.terminal(), Some("TERM0001"));
    assert_eq!(msg.currency(), Some(840));

    let v = load("cup_bcd", "refund_0220");
    let (_, bytes) = message_bytes("cup_bcd", v["hex"].as_str().unwrap());
    let msg = iso8583::decode(spec_for("cup_bcd"), &bytes).unwrap();
    let c60 = msg.cup60().unwrap();
    assert_eq!(
        (c60.message_type, c60.batch, c60.network_code),
        (25, 123, Some(0))
    );
    let c61 = msg.cup61().unwrap();
    assert_eq!((c61.batch, c61.trace, c61.date_mmdd), (123, 45, Some(1121)));
    assert_eq!(msg.amount(), Some(iso8583::Amount(3000)));
    let (mab, mac) = msg.mac().unwrap();
    assert_eq!(hex::encode(mab), v["mac"]["mab_hex"].as_str().unwrap());
    assert_eq!(mac, b"1016EC98");
}

/// Zero heap allocations per decode, and none for an encode into a reused buffer.
mod allocations {
    #![allow(unsafe_code)]
    use super::*;
    use refundgate::iso8583::{FieldList, Value};
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;
    thread_local! {
        static ALLOCS: Cell<usize> = const { Cell::new(0) };
    }
    // SAFETY: forwards to the system allocator; only counts calls on the current thread.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCS.with(|c| c.set(c.get() + 1));
            // SAFETY: same layout contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: ptr came from System.alloc with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocations_in(f: impl FnOnce()) -> usize {
        let before = ALLOCS.with(Cell::get);
        f();
        ALLOCS.with(Cell::get) - before
    }

    #[test]
    fn decode_and_encode_of_a_refund_do_not_allocate() {
        for (dir, name) in [("ascii1987", "refund_0200"), ("cup_bcd", "refund_0220")] {
            let v = load(dir, name);
            let (_, bytes) = message_bytes(dir, v["hex"].as_str().unwrap());
            let spec = spec_for(dir);
            let _ = iso8583::decode(spec, &bytes).unwrap();
            let mut out = BytesMut::with_capacity(1024);
            let n = allocations_in(|| {
                let msg = iso8583::decode(spec, &bytes).unwrap();
                assert!(msg.amount().is_some());
                let mut fields: FieldList<'_, 24> = FieldList::new();
                for n in [3u8, 4, 11, 12, 13, 37, 41, 42] {
                    fields.echo(&msg, n).unwrap();
                }
                fields.set(39, Value::Text(b"00")).unwrap();
                fields.set(44, Value::Text(b"APPROVED")).unwrap();
                out.clear();
                iso8583::encode(spec, msg.mti().response(), fields.as_slice(), &mut out).unwrap();
            });
            assert_eq!(n, 0, "{dir}/{name}: {n} allocations");
        }
    }
}

/// Property tests: generated messages round-trip; arbitrary and mutated bytes never panic.
mod properties {
    use super::*;
    use proptest::prelude::*;
    use refundgate::iso8583::spec::{Encoding, Kind, Prefix};
    use refundgate::iso8583::{Mti, Value};

    /// A valid text value for element `n` of `spec`.
    fn value_for(spec: &Spec, n: usize) -> BoxedStrategy<Vec<u8>> {
        let fs = *spec.field(n).unwrap();
        let max = usize::from(fs.max).min(40);
        let len = if fs.prefix == Prefix::Fixed {
            usize::from(fs.max)..=usize::from(fs.max)
        } else {
            0..=max
        };
        let chars: Vec<u8> = match (fs.kind, fs.encoding) {
            (Kind::Numeric, _) => b"0123456789".to_vec(),
            (Kind::Track, Encoding::Bcd) => b"0123456789D".to_vec(),
            (Kind::Track, _) => b"0123456789=".to_vec(),
            (Kind::Binary, Encoding::Ascii) => b"0123456789ABCDEF".to_vec(),
            (Kind::Binary, _) => (0..=255u8).collect(),
            _ => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -.".to_vec(),
        };
        proptest::collection::vec(proptest::sample::select(chars), len).boxed()
    }

    fn message(spec: &'static Spec) -> impl Strategy<Value = (u16, Vec<(u8, Vec<u8>)>)> {
        let fields: Vec<usize> = (2..=128)
            .filter(|&n| n != 65 && spec.field(n).map(|f| f.max <= 200).unwrap_or(false))
            .collect();
        let mti = proptest::sample::select(vec![200u16, 210, 220, 400, 410, 800, 810]);
        let chosen = proptest::sample::subsequence(fields, 0..12);
        (mti, chosen).prop_flat_map(move |(mti, chosen)| {
            let values: Vec<_> = chosen.iter().map(|&n| value_for(spec, n)).collect();
            let chosen2 = chosen.clone();
            values.prop_map(move |vals| (mti, chosen2.iter().map(|&n| n as u8).zip(vals).collect()))
        })
    }

    fn round_trip(spec: &'static Spec, mti: u16, fields: &[(u8, Vec<u8>)]) {
        let values: Vec<(u8, Value<'_>)> =
            fields.iter().map(|(n, v)| (*n, Value::Text(v))).collect();
        let mut first = BytesMut::new();
        iso8583::encode(spec, Mti(mti), &values, &mut first).unwrap();
        let msg = iso8583::decode(spec, &first).unwrap();
        let mut again: iso8583::FieldList<'_, 128> = iso8583::FieldList::new();
        for n in msg.present() {
            again.echo(&msg, n).unwrap();
        }
        let mut second = BytesMut::new();
        iso8583::encode(spec, msg.mti(), again.as_slice(), &mut second).unwrap();
        assert_eq!(first, second);
        let shown = json::to_json(&msg, true);
        let mut third = BytesMut::new();
        json::from_json(spec, &shown, &mut third).unwrap();
        assert_eq!(first, third);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn ascii1987_encode_decode_encode_is_identity((mti, fields) in message(&iso8583::ASCII1987)) {
            round_trip(&iso8583::ASCII1987, mti, &fields);
        }

        #[test]
        fn cup_pos_encode_decode_encode_is_identity((mti, fields) in message(&iso8583::CUP_POS)) {
            round_trip(&iso8583::CUP_POS, mti, &fields);
        }

        #[test]
        fn iso87b_encode_decode_encode_is_identity((mti, fields) in message(&iso8583::ISO87B)) {
            round_trip(&iso8583::ISO87B, mti, &fields);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = iso8583::decode_partial(&iso8583::ASCII1987, &bytes);
            let _ = iso8583::decode_partial(&iso8583::CUP_POS, &bytes);
            let _ = iso8583::decode_partial(&iso8583::ISO87B, &bytes);
        }

        #[test]
        fn mutated_vectors_never_panic(which in 0usize..4, pos in any::<proptest::sample::Index>(), byte in any::<u8>(), cut in any::<proptest::sample::Index>()) {
            let (dir, name) = [("ascii1987", "refund_0200"), ("ascii1987", "echo_0800"), ("cup_bcd", "refund_0220"), ("cup_bcd", "signon_0810")][which];
            let v = load(dir, name);
            let (_, mut bytes) = message_bytes(dir, v["hex"].as_str().unwrap());
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let end = cut.index(bytes.len() + 1);
            let spec = spec_for(dir);
            if let Ok(msg) = iso8583::decode(spec, &bytes[..end]) {
                let _ = json::to_json(&msg, false);
                let _ = msg.pan().map(|p| p.to_string());
            }
        }
    }
}
