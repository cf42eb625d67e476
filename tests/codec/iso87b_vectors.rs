//! The `iso87b` dialect (jPOS `ISO87BPackager`), EBCDIC character elements and BER-TLV DE55
//! against the vectors in `fixtures/iso87b/`, written by pyiso8583 4.0.1 through
//! `tests/interop/gen_iso87b.py`: each `.hex` decodes to exactly the `mti`, `fields` and DE55
//! TLV listing of its `.json`, and both the `.json` and the decoded view encode back to exactly
//! the `.hex`. `ebcdic500` and `ebcdic037` are test dialects in `fixtures/iso87b/*.toml`.

use std::path::PathBuf;

use bytes::BytesMut;
use refundgate::iso8583::{self, json, DecodeError, Element, Fault, Spec};
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/iso87b")
}

fn read(name: &str) -> String {
    let path = fixtures().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn spec_named(name: &str) -> Spec {
    match Spec::builtin(name) {
        Some(spec) => spec.clone(),
        None => {
            let file = format!("{name}.toml");
            Spec::from_toml(&file, &read(&file)).unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

fn wire(name: &str) -> Vec<u8> {
    hex::decode(read(&format!("{name}.hex")).trim()).unwrap()
}

/// Checks one vector both ways; returns the spec, the bytes and the unmasked view.
fn check(name: &str) -> (Spec, Vec<u8>, Json) {
    let doc: Json = serde_json::from_str(&read(&format!("{name}.json"))).unwrap();
    let spec = spec_named(doc["dialect"].as_str().unwrap());
    let body = wire(name);
    let msg = iso8583::decode(&spec, &body).unwrap_or_else(|e| panic!("{name}: decode: {e}"));
    let shown = json::to_json(&msg, true);
    assert_eq!(shown["dialect"], doc["dialect"], "{name}: dialect");
    assert_eq!(shown["mti"], doc["mti"], "{name}: mti");
    assert_eq!(shown["fields"], doc["fields"], "{name}: fields");
    assert_eq!(
        shown["subfields"].get("55"),
        doc["subfields"].get("55"),
        "{name}: DE55 TLV listing"
    );
    for (what, source) in [("expected json", &doc), ("decoded view", &shown)] {
        let mut out = BytesMut::new();
        json::from_json(&spec, source, &mut out)
            .unwrap_or_else(|e| panic!("{name}: encode {what}: {e}"));
        assert_eq!(
            hex::encode(&out),
            hex::encode(&body),
            "{name}: bytes from {what}"
        );
    }
    (spec, body, shown)
}

macro_rules! vector_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

vector_tests!(
    sale_0210,
    refund_0210_decline_61,
    reversal_0400,
    echo_0810,
    settlement_0500,
    ebcdic500_echo_0810,
);

/// Sale with chip data: odd fixed numerics right-justified, track 2 with a `D` separator, and
/// DE55 listed tag by tag.
#[test]
fn sale_0200() {
    let (spec, body, shown) = check("sale_0200");
    assert_eq!(shown["fields"]["22"], "051");
    let msg = iso8583::decode(&spec, &body).unwrap();
    assert_eq!(msg.field_bytes(22), Some(&[0x00, 0x51][..]));
    assert_eq!(msg.field_bytes(23), Some(&[0x00, 0x01][..]));
    let tags: Vec<String> = msg
        .field(55)
        .unwrap()
        .tlv()
        .unwrap()
        .map(|t| t.unwrap().tag_hex())
        .collect();
    assert_eq!(
        tags,
        [
            "5A", "5F34", "57", "82", "95", "9A", "9C", "9F02", "9F10", "9F26", "9F27", "9F36",
            "9F37", "9F6B"
        ]
    );
}

/// A 19-digit PAN and a 5-digit DE32 carry their pad nibble on the left, as jPOS's IFB_LLNUM
/// with `pad = true` writes them (cup_pos pads these on the right); typed accessors read them.
#[test]
fn refund_0200() {
    let (spec, body, _) = check("refund_0200");
    let msg = iso8583::decode(&spec, &body).unwrap();
    let pan = msg.field(2).unwrap();
    assert_eq!(pan.units, 19);
    assert_eq!(pan.bytes[0], 0x06, "left pad nibble");
    assert_eq!(msg.field_bytes(32), Some(&[0x01, 0x23, 0x45][..]));
    let od = msg.original_data().unwrap();
    assert_eq!((od.mti.0, od.stan, od.acquirer), (200, 100, 12345));
    assert_eq!(msg.amount(), Some(iso8583::Amount(700)));
    assert_eq!(msg.terminal(), Some("TERM0001"));
    assert_eq!(msg.processing_code().unwrap().tx_type, 20);
}

/// Echo: a secondary bitmap for DE70, written `03 01` (n3 right-justified).
#[test]
fn echo_0800() {
    let (spec, body, _) = check("echo_0800");
    let msg = iso8583::decode(&spec, &body).unwrap();
    assert_eq!(msg.network_code(), Some(301));
    assert_eq!(msg.field_bytes(70), Some(&[0x03, 0x01][..]));
}

/// EBCDIC cp500 throughout, with `[ ] | ! ^` (which sit elsewhere in cp037) and track 2 `=`.
#[test]
fn ebcdic500_sale_0200() {
    let (spec, body, shown) = check("ebcdic500_sale_0200");
    assert_eq!(&body[..4], &[0xF0, 0xF2, 0xF0, 0xF0], "MTI in EBCDIC");
    let msg = iso8583::decode(&spec, &body).unwrap();
    assert_eq!(msg.stan(), Some(100));
    assert_eq!(msg.amount(), Some(iso8583::Amount(1500)));
    let de43 = msg.field_bytes(43).unwrap();
    assert_eq!(&de43[5..8], &[0x4A, 0xF1, 0x5A], "[1] in cp500");
    assert!(shown["fields"]["43"]
        .as_str()
        .unwrap()
        .contains("[1] | NO!"));
}

/// cp037 characters: an É has no ASCII form, so it is shown (and read back) as `hex:`.
#[test]
fn ebcdic037_sale_0210() {
    let (spec, body, shown) = check("ebcdic037_sale_0210");
    let msg = iso8583::decode(&spec, &body).unwrap();
    let de43 = msg.field_bytes(43).unwrap();
    assert_eq!(&de43[5..7], &[0xBA, 0xD5], "[N in cp037");
    assert!(shown["fields"]["43"].as_str().unwrap().starts_with("hex:"));
    assert_eq!(shown["fields"]["41"], "TERM0001");
}

/// The same cp500 bytes read as cp037 give other characters: the code page is a property
/// of the spec, not a guess.
#[test]
fn ebcdic_code_page_comes_from_the_spec() {
    let text500 = read("ebcdic500.toml");
    let as037 = text500.replace("cp500", "cp037");
    let spec037 = Spec::from_toml("as037", &as037).unwrap();
    let body = wire("ebcdic500_sale_0200");
    let msg = iso8583::decode(&spec037, &body).unwrap();
    let de43 = json::to_json(&msg, true)["fields"]["43"].clone();
    assert!(!de43.as_str().unwrap().contains("[1] | NO!"), "{de43}");
}

/// `decode` masks DE55 as a whole and, in its tag listing, the card data tags (PAN as 6 + 4,
/// track 2 equivalents fully) while other tags stay readable.
#[test]
fn de55_listing_masks_card_data_tags() {
    let spec = spec_named("iso87b");
    let body = wire("sale_0200");
    let msg = iso8583::decode(&spec, &body).unwrap();
    let masked = json::to_json(&msg, false);
    let text = masked.to_string();
    for secret in [
        "4761739001010119",
        "476173900101011",
        "D22122011143804400000",
    ] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    let list = masked["subfields"]["55"].as_array().unwrap();
    let value = |tag: &str| {
        list.iter()
            .find(|o| o["tag"] == tag)
            .map(|o| o["value"].clone())
            .unwrap()
    };
    assert_eq!(value("5A"), "476173******0119");
    assert!(value("57").as_str().unwrap().chars().all(|c| c == '*'));
    assert!(value("9F6B").as_str().unwrap().chars().all(|c| c == '*'));
    assert_eq!(value("9F26"), "8E19C2B3A1D4F507");
    assert!(masked["fields"]["55"]
        .as_str()
        .unwrap()
        .chars()
        .all(|c| c == '*'));
    // Debug output of the message, the element and its objects shows no card data either.
    let f55 = msg.field(55).unwrap();
    let debug = format!(
        "{msg:?} {f55:?} {:?} {:?}",
        f55.tlv().unwrap().collect::<Vec<_>>(),
        msg.field(2)
    );
    assert!(!debug.contains("4761739001010119"), "{debug}");
    assert!(!debug.contains("[71, 97, 115"), "{debug}");
    assert!(!debug.contains("0x47, 0x61"), "{debug}");
}

/// A constructed template (72) is listed with its inner objects; a long-form length is read.
#[test]
fn de55_constructed_template_is_listed_inside() {
    let (_, _, shown) = check("sale_0210");
    let list = shown["subfields"]["55"].as_array().unwrap();
    assert_eq!(list[1]["tag"], "72");
    assert_eq!(list[1]["objects"][0]["tag"], "9F18");
    assert_eq!(list[2]["tag"], "9F5B");
    assert_eq!(list[2]["len"], 130);
}

/// A DE55 whose TLV is cut short is a message error at DE55 (answered 30: the STAN was read),
/// and the encoder refuses to write one.
#[test]
fn broken_de55_tlv_is_a_message_error_not_a_panic() {
    let spec = spec_named("iso87b");
    let good = wire("sale_0200");
    let msg = iso8583::decode(&spec, &good).unwrap();
    let f55 = msg.field(55).unwrap();
    let start = f55.bytes.as_ptr() as usize - good.as_ptr() as usize;
    let mut bad = good.clone();
    // The first object is 5A 08 …: claim 0x7F bytes instead.
    bad[start + 1] = 0x7F;
    let e: DecodeError = iso8583::decode(&spec, &bad).unwrap_err();
    assert_eq!((e.element, e.fault), (Element::Field(55), Fault::BadTlv));
    assert_eq!(e.offset, start + 1);
    assert!(e.answerable(), "{e:?}");

    let mut doc: Json = serde_json::from_str(&read("sale_0200.json")).unwrap();
    doc["fields"]["55"] = Json::from("5A7F4761");
    let err = json::from_json(&spec, &doc, &mut BytesMut::new()).unwrap_err();
    assert!(err.to_string().contains("field 55"), "{err}");
}

/// A non-digit byte in an EBCDIC numeric element, or a bad EBCDIC length, is a clean error.
#[test]
fn bad_ebcdic_digits_are_message_errors() {
    let spec = spec_named("ebcdic500");
    let good = wire("ebcdic500_sale_0200");
    // MTI (4) + bitmap (16): DE2's EBCDIC LL prefix comes next.
    let mut bad = good.clone();
    bad[20] = 0x31;
    let e = iso8583::decode(&spec, &bad).unwrap_err();
    assert_eq!((e.element, e.fault), (Element::Field(2), Fault::BadLength));
    let mut bad = good.clone();
    bad[22] = 0xC1; // first PAN digit becomes `A`
    let e = iso8583::decode(&spec, &bad).unwrap_err();
    assert_eq!((e.element, e.fault), (Element::Field(2), Fault::NotNumeric));
    let mut bad = good;
    bad[4] = 0x47; // not a hex character in the bitmap
    let e = iso8583::decode(&spec, &bad).unwrap_err();
    assert_eq!((e.element, e.fault), (Element::Bitmap(1), Fault::NotHex));
}

/// Every `fixtures/iso87b/*.json` has a named test here.
#[test]
fn every_iso87b_vector_has_a_named_test() {
    let src = include_str!("iso87b_vectors.rs");
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".json") {
            assert!(
                src.contains(&format!("fn {stem}()")) || src.contains(&format!("    {stem},")),
                "fixtures/iso87b/{stem} has no test"
            );
        }
    }
}

/// The generator, run again with pyiso8583, reproduces every fixture byte for byte (skipped
/// when pyiso8583 is not installed, unless CI=true).
#[test]
fn generator_reproduces_the_fixtures() {
    let python = std::env::var("REFUNDGATE_PYTHON").unwrap_or_else(|_| {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python");
        if venv.is_file() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let has_lib = std::process::Command::new(&python)
        .args(["-c", "import iso8583"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_lib {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "pyiso8583 is required in CI"
        );
        eprintln!("skipped: pyiso8583 not installed for {python}");
        return;
    }
    let out = std::process::Command::new(&python)
        .arg(root.join("tests/interop/gen_iso87b.py"))
        .arg(fixtures())
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Mutated and cut iso87b, EBCDIC and TLV vectors decode or fail cleanly, and whatever
        /// decodes can be shown (masked and not) and encoded again.
        #[test]
        fn mutated_iso87b_and_ebcdic_vectors_never_panic(
            which in 0usize..4,
            pos in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let name = ["sale_0200", "sale_0210", "ebcdic500_sale_0200", "ebcdic037_sale_0210"][which];
            let doc: Json = serde_json::from_str(&read(&format!("{name}.json"))).unwrap();
            let spec = spec_named(doc["dialect"].as_str().unwrap());
            let mut bytes = wire(name);
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let end = cut.index(bytes.len() + 1);
            if let Ok(msg) = iso8583::decode(&spec, &bytes[..end]) {
                let _ = json::to_json(&msg, false);
                let shown = json::to_json(&msg, true);
                let mut out = BytesMut::new();
                json::from_json(&spec, &shown, &mut out).unwrap();
                prop_assert_eq!(&out[..], &bytes[..end]);
            }
        }
    }
}

/// `refundgate decode --dialect iso87b` prints the masked view with the DE55 listing, and
/// `refundgate encode --dialect iso87b` turns the vector's JSON back into its bytes.
#[test]
fn cli_decodes_and_encodes_the_iso87b_dialect_by_name() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let run = |args: &[&str], input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_refundgate"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let hex_text = read("sale_0200.hex");
    let shown: Json =
        serde_json::from_str(&run(&["decode", "--dialect", "iso87b"], &hex_text)).unwrap();
    assert_eq!(shown["dialect"], "iso87b");
    assert_eq!(shown["fields"]["2"], "476173******0119");
    assert_eq!(shown["subfields"]["55"][0]["value"], "476173******0119");
    let encoded = run(&["encode", "--dialect", "iso87b"], &read("sale_0200.json"));
    assert_eq!(encoded.trim(), hex_text.trim());
    let listed = Command::new(env!("CARGO_BIN_EXE_refundgate"))
        .args(["decode", "--dialect", "nope"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stderr).contains("iso87b"));
    // cup_pos keeps its TPDU and header, now taken from its dialect file.
    let cup = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/cup_bcd/refund_0220.hex"),
    )
    .unwrap();
    let shown: Json =
        serde_json::from_str(&run(&["decode", "--dialect", "cup_pos"], &cup)).unwrap();
    assert_eq!(shown["tpdu"], "6000030000");
    assert_eq!(shown["mti"], "0220");
}

/// `--spec` takes a whole dialect file (`*.dialect.toml`, spec beside it) or a plain element
/// spec such as the EBCDIC test dialect.
#[test]
fn cli_takes_a_dialect_file_or_an_element_spec_by_path() {
    use std::process::{Command, Stdio};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (spec, vector) in [
        (root.join("specs/iso87b.dialect.toml"), "refund_0200"),
        (fixtures().join("ebcdic500.toml"), "ebcdic500_sale_0200"),
    ] {
        let hex_path = fixtures().join(format!("{vector}.hex"));
        let out = Command::new(env!("CARGO_BIN_EXE_refundgate"))
            .arg("decode")
            .arg("--spec")
            .arg(&spec)
            .stdin(Stdio::from(std::fs::File::open(&hex_path).unwrap()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown: Json = serde_json::from_slice(&out.stdout).unwrap();
        let doc: Json = serde_json::from_str(&read(&format!("{vector}.json"))).unwrap();
        assert_eq!(shown["mti"], doc["mti"], "{vector}");
        assert_eq!(shown["fields"]["11"], doc["fields"]["11"], "{vector}");
        assert_eq!(
            shown["fields"]["2"].as_str().map(|s| s.contains("******")),
            Some(true)
        );
    }
}
