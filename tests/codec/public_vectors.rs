//! The codec against the public ISO 8583 vectors of the research notes (§7), shipped in
//! `fixtures/public/` with their provenance in `fixtures/README.md`: each `.hex` decodes to exactly
//! the `mti` and `fields` of its `.json`, and both that `.json` and the decoded view encode back to
//! exactly the `.hex`. A vector whose `dialect` is not built in is read with the custom dialect
//! `fixtures/public/<dialect>.toml`.

use std::path::PathBuf;

use bytes::BytesMut;
use refundgate::iso8583::{self, json, Spec};
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/public")
}

fn read(name: &str) -> String {
    let path = fixtures().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A built-in dialect, or the custom one in `fixtures/public/<name>.toml`.
fn spec_named(name: &str) -> Spec {
    match Spec::builtin(name) {
        Some(spec) => spec.clone(),
        None => {
            let file = format!("{name}.toml");
            Spec::from_toml(&file, &read(&file)).unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

/// Decodes `name.hex` and compares with `name.json`; encodes both the `.json` and the decoded view
/// back and compares with the `.hex`. Returns the decoded view.
fn check_public(name: &str) -> Json {
    let doc: Json = serde_json::from_str(&read(&format!("{name}.json"))).unwrap();
    let wire = hex::decode(read(&format!("{name}.hex")).trim()).unwrap();
    let dialect = doc["dialect"].as_str().unwrap();
    let spec = spec_named(dialect);
    assert_eq!(spec.name(), dialect, "{name}: dialect");

    // A vector with `tpdu` (cup_pos frames) carries the 5-byte TPDU and 6-byte header before the MTI.
    let framed = doc.get("tpdu").is_some();
    let (head, body) = wire.split_at(if framed { 11 } else { 0 });
    if framed {
        assert_eq!(
            hex::encode(&head[..5]),
            doc["tpdu"].as_str().unwrap(),
            "{name}: tpdu"
        );
        assert_eq!(
            hex::encode(&head[5..]),
            doc["header"].as_str().unwrap(),
            "{name}: header"
        );
    }

    // Decode: exactly the MTI and fields of the vector, nothing more.
    let msg = iso8583::decode(&spec, body).unwrap_or_else(|e| panic!("{name}: decode: {e}"));
    let shown = json::to_json(&msg, true);
    assert_eq!(shown["dialect"], doc["dialect"], "{name}: dialect shown");
    assert_eq!(shown["mti"], doc["mti"], "{name}: mti");
    assert_eq!(shown["fields"], doc["fields"], "{name}: fields");

    // Encode: the expected fields give exactly the vector's bytes, and so does the decoded view.
    for (what, source) in [("expected json", &doc), ("decoded view", &shown)] {
        let mut out = BytesMut::new();
        json::from_json(&spec, source, &mut out)
            .unwrap_or_else(|e| panic!("{name}: encode {what}: {e}"));
        assert_eq!(
            hex::encode(&out),
            hex::encode(body),
            "{name}: bytes encoded from the {what}"
        );
    }
    shown
}

/// V4: moov-io ASCII 0400 reversal, DE32 with LL `00`, DE55 as LLL text, DE90 original data.
#[test]
fn v4_moov_reversal_0400() {
    let shown = check_public("v4_moov_reversal_0400");
    let de90 = &shown["subfields"]["90"];
    assert_eq!(de90["90.1 original MTI"], "0200");
    assert_eq!(de90["90.2 original STAN"], "003316");
    assert_eq!(de90["90.3 original DE7"], "0908064519");
    assert_eq!(de90["90.4 original acquirer id"], "00000000200");
    assert_eq!(de90["90.5 original forwarding id"], "00000000000");
}

/// V5: moov-io ASCII sign-on request (DE70 `001`, secondary bitmap).
#[test]
fn v5_moov_signon_0800() {
    check_public("v5_moov_signon_0800");
}

/// V5: moov-io ASCII sign-on response (DE39 `00`, DE70 `001`, DE73).
#[test]
fn v5_moov_signon_0810() {
    check_public("v5_moov_signon_0810");
}

/// V6: moov-io minimal ASCII 0100 with only DE2, DE3 and DE4.
#[test]
fn v6_moov_minimal_0100() {
    check_public("v6_moov_minimal_0100");
}

/// V7: moov-io BCD odd length: MTI `1234`, DE3 `890` with an LLLL BCD digit count and left pad,
/// read with a custom dialect file.
#[test]
fn v7_moov_bcd_odd_1234() {
    check_public("v7_moov_bcd_odd_1234");
}

/// V8: real CUP POS QR sale (cup_pos, TPDU + header, DE60 BCD digits, DE62 TLV, DE64 ASCII MAC).
#[test]
fn v8_cup_real_qr_sale_0200() {
    check_public("v8_cup_real_qr_sale_0200");
}

/// V10: BCD 0800 without TPDU/header, DE63 binary: read with a custom dialect file.
#[test]
fn v10_bcd_0800_binary63() {
    check_public("v10_bcd_0800_binary63");
}

/// V11: pyiso8583 README request (DE2 only).
#[test]
fn v11_pyiso_readme_0200() {
    check_public("v11_pyiso_readme_0200");
}

/// V11: pyiso8583 README response (DE39 only, bitmap bit 39).
#[test]
fn v11_pyiso_readme_0210() {
    check_public("v11_pyiso_readme_0210");
}

/// V11: pyiso8583 howto PAN `121200000002121` with a BCD length: `15` then right-padded BCD. Only
/// the DE2 bytes come from the source; the MTI and bitmap around them were checked with pyiso8583.
#[test]
fn v11_pyiso_howto_bcd_pan_0200() {
    check_public("v11_pyiso_howto_bcd_pan_0200");
    let wire = hex::decode(read("v11_pyiso_howto_bcd_pan_0200.hex").trim()).unwrap();
    assert_eq!(&wire[10..], b"\x15\x12\x12\x00\x00\x00\x02\x12\x10");
}

/// Every `fixtures/public/*.json` has a named test above (so a new vector cannot be skipped).
#[test]
fn every_public_vector_has_a_named_test() {
    let src = include_str!("public_vectors.rs");
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".json") {
            assert!(
                src.contains(&format!("fn {stem}()")),
                "fixtures/public/{stem} has no test"
            );
            assert!(
                fixtures().join(format!("{stem}.hex")).is_file(),
                "{stem}.hex missing"
            );
        }
    }
}

/// The V10 bytes do not fit the built-in cup_pos dialect: DE63 there is ASCII text, and the
/// custom dialect is what makes the vector decode to its binary value.
#[test]
fn v10_needs_its_custom_dialect() {
    let wire = hex::decode(read("v10_bcd_0800_binary63.hex").trim()).unwrap();
    let cup = Spec::builtin("cup_pos").unwrap();
    let via_cup =
        iso8583::decode(cup, &wire).map(|m| json::to_json(&m, true)["fields"]["63"].clone());
    assert_ne!(via_cup.ok(), Some(Json::from("010008B9F3F723CA3CD2F8")));
}
