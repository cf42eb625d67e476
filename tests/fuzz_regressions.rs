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

/// `codec_cup_pos`: a text element whose bytes start with `hex:` (here DE41 `hex:` + four
/// NULs) was shown as is in the JSON view, and `from_json` then read it as hex and refused
/// it (`NotHex`): `decode --unmask | encode` did not give the message back. Such text is now
/// shown in the `hex:` form too.
#[test]
fn text_that_starts_with_the_hex_prefix_survives_the_json_view() {
    use refundgate::iso8583::json::to_json;
    let wire = hex::decode(
        "02003020048000c0800d0000800000800012330000020300006865783a00000000393532373138313832\
         323137383735313536001926000001000600000000003334353637383930313233345f03063136303033\
         365f04063230303832365c0230314233413039324145",
    )
    .unwrap();
    let msg = decode(&CUP_POS, &wire).unwrap();
    let view = to_json(&msg, true);
    assert_eq!(view["fields"]["41"], "hex:6865783A00000000");
    let mut out = BytesMut::new();
    from_json(&CUP_POS, &view, &mut out).unwrap();
    let again = decode(&CUP_POS, &out).unwrap();
    assert_eq!(again.field_bytes(41), Some(&b"hex:\0\0\0\0"[..]));
    assert_eq!(to_json(&again, true), view);
    // The same in ascii1987, with printable text after the prefix.
    let doc = serde_json::json!({"mti": "0200", "fields": {"11": "000001", "41": "hex:6865783A41424344"}});
    let mut out = BytesMut::new();
    from_json(&ASCII1987, &doc, &mut out).unwrap();
    let msg = decode(&ASCII1987, &out).unwrap();
    assert_eq!(msg.field_bytes(41), Some(&b"hex:ABCD"[..]));
    assert_eq!(to_json(&msg, true)["fields"]["41"], "hex:6865783A41424344");
}

/// `saf_reader`: a store-and-forward journal record adding an entry with id `u64::MAX` makes
/// `StoreForward::open` panic ("attempt to add with overflow", `State::apply`: `next_id =
/// next_id.max(entry.id + 1)`); release builds wrap instead. Fixed with `saturating_add`.
#[test]
fn a_saf_entry_with_the_largest_id_does_not_overflow() {
    use std::sync::Arc;
    use std::time::Duration;

    use refundgate::clock::SystemClock;
    use refundgate::journal::{Durability, Journal, Options};
    use refundgate::upstream::store_forward::{SafOptions, StoreForward};

    let body = hex::decode(
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/vectors/ascii1987/reversal_sale_0400.hex"),
        )
        .unwrap()
        .trim(),
    )
    .unwrap();
    // The SAF "added" record: 1, id, created, dialect, upstream, body (big-endian lengths).
    let mut payload = vec![1];
    payload.extend_from_slice(&u64::MAX.to_be_bytes());
    payload.extend_from_slice(&1_769_871_600i64.to_be_bytes());
    payload.extend_from_slice(&[0, 6]);
    payload.extend_from_slice(b"bank_a");
    payload.extend_from_slice(&(body.len() as u16).to_be_bytes());
    payload.extend_from_slice(&body);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("saf");
    let options = Options {
        durability: Durability::UnsafeNoFsync,
        segment_bytes: 1024 * 1024,
        ..Options::default()
    };
    {
        let (journal, _) = Journal::open(&dir, options).unwrap();
        journal.append_blocking(payload).unwrap();
    }
    let saf = StoreForward::open(
        &dir,
        SafOptions {
            max_retries: 3,
            expiry_s: 3600,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(100),
            durability: Durability::UnsafeNoFsync,
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    assert_eq!(saf.pending().len(), 1);
}
