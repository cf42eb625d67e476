//! Inputs the fuzz targets (`fuzz/`, see README "How we test") found, kept as plain tests so
//! `cargo test` guards them without a nightly toolchain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use refundgate::iso8583::json::from_json;
use refundgate::iso8583::{decode, EncodeError, Fault, ASCII1987, CUP_POS};

/// `json_view`: an ascii1987 DE35 (track 2, `z`) with a letter other than the `D`
/// separator was written by the encoder and then refused by the decoder ("field 35: not
/// numeric"), so `refundgate encode` produced a message the gateway itself rejects.
#[test]
fn a_track_element_the_decoder_refuses_is_not_encoded() {
    let doc: serde_json::Value = serde_json::from_str(
        r#"{"mti": "0200", "fields": {"2": "6222021234567890123", "3": "000000",
            "4": "000000010000", "11": "000045", "14": "2812", "22": "021", "25": "00",
            "26": "12", "35": "6222021234567A19A"}}"#,
    )
    .unwrap();
    let mut out = BytesMut::new();
    let err = from_json(&ASCII1987, &doc, &mut out).expect_err("track with `A` encoded");
    assert!(
        matches!(
            err,
            refundgate::iso8583::json::JsonEncodeError::Encode(EncodeError {
                fault: Fault::NotNumeric,
                ..
            })
        ),
        "{err}"
    );
    // The separators the decoder accepts still encode, and decode back.
    for track in ["6222021234567=1912", "6222021234567D1912"] {
        let doc = serde_json::json!({"mti": "0200", "fields": {"11": "000045", "35": track}});
        let mut out = BytesMut::new();
        from_json(&ASCII1987, &doc, &mut out).unwrap();
        decode(&ASCII1987, &out).unwrap();
        let mut out = BytesMut::new();
        from_json(&CUP_POS, &doc, &mut out).unwrap();
        decode(&CUP_POS, &out).unwrap();
    }
}
