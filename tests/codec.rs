//! The codec against the independent vectors in `../shared/vectors` (pyiso8583 4.0.1): every
//! message decodes to exactly its fields and encodes back to exactly its bytes; every malformed
//! message gets its documented handling.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, non_snake_case)]

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
    assert_eq!(hex::encode(&out), hex::encode(&expected), "{name}: encoded bytes");
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
                assert!(src.contains(&format!(" {stem},")) || src.contains(&format!(" {stem})")), "{dir}/{stem} has no test");
            }
        }
    }
}

/// Malformed messages: what the codec says decides the handling (DOMAIN §2).
mod malformed {
    use super::*;

    fn handling(name: &str) -> (String, Option<iso8583::DecodeError>) {
        let v = load("malformed", name);
        let dir = v["dialect"].as_str().unwrap();
        let spec = spec_for(dir);
        let framed = hex::decode(v["framed_hex"].as_str().unwrap()).unwrap();
        let body = &framed[2..];
        let msg = if dir == "cup_bcd" {
            if body.len() < 11 {
                return (v["expected"].as_str().unwrap().to_string(), None);
            }
            &body[11..]
        } else {
            body
        };
        (v["expected"].as_str().unwrap().to_string(), iso8583::decode(spec, msg).err())
    }

    macro_rules! malformed_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    let (expected, err) = handling(stringify!($name));
                    match expected.as_str() {
                        "message_error_respond_30" => {
                            let e = err.expect("must be a message error");
                            assert!(e.answerable(), "{e:?} must have MTI and STAN");
                        }
                        "message_error_drop" => {
                            if let Some(e) = err {
                                assert!(!e.answerable(), "{e:?} must not have MTI and STAN");
                            }
                        }
                        "respond_40" | "mac_invalid" | "mac_unverifiable" => {
                            assert!(err.is_none(), "{err:?}: must decode");
                        }
                        other => panic!("unexpected handling {other}"),
                    }
                }
            )*
        };
    }

    malformed_tests!(a_bitmap_claims_absent_field, a_bitmap_non_hex, a_de128_bit_without_mac,
        a_de128_mac_no_key, a_extra_trailing_bytes, a_llvar_beyond_end, a_llvar_exceeds_max, a_mac_wrong,
        a_mti_non_numeric, a_non_digit_in_numeric, a_secondary_bitmap_missing, a_truncated_mid_field,
        a_unknown_mti_0600, c_bad_pad_nibble_de22, c_bcd_nibble_A_in_de14, c_bcd_nibble_F_in_de4,
        c_bitmap_claims_absent_field, c_de64_bit_without_mac, c_de64_mac_no_key, c_extra_trailing_bytes,
        c_lllvar_beyond_end, c_llvar_bad_bcd_length, c_llvar_exceeds_max, c_mac_wrong, c_mti_bad_bcd,
        c_secondary_bitmap_missing, c_shorter_than_tpdu_header, c_truncated_mid_field, c_unknown_mti_0600);

    #[test]
    fn errors_name_field_and_offset_and_carry_no_card_data() {
        let (_, err) = handling("a_non_digit_in_numeric");
        let e = err.unwrap();
        let text = e.to_string();
        assert!(text.starts_with("field 4 at offset"), "{text}");
        assert!(!text.contains("4761"), "{text}");
        assert_eq!(e.stan, Some(100));
    }
}
