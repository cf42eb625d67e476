//! The data-driven dialect description (`specs/*.dialect.toml`) classifies every vector as its
//! name says (the vectors were written by an independent library and named by what they are),
//! and classifies the iso87b fixtures from data alone.

use std::path::PathBuf;

use refundgate::dialect::Dialect;
use refundgate::dialect::Kind;
use refundgate::iso8583;
use refundgate::ledger::Operation;

/// (dialect, directory, message bytes offset) of every vector set.
fn sets() -> Vec<(&'static Dialect, PathBuf, usize)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    vec![
        (
            Dialect::builtin("ascii1987").unwrap(),
            root.join("../shared/vectors/ascii1987"),
            0,
        ),
        (
            Dialect::builtin("cup_pos").unwrap(),
            root.join("../shared/vectors/cup_bcd"),
            11,
        ),
        (
            Dialect::builtin("iso87b").unwrap(),
            root.join("fixtures/iso87b"),
            0,
        ),
    ]
}

/// What a vector named `name` asks for: its operation prefix for a request, none for an answer.
fn named_kind(name: &str, msg: &iso8583::Message<'_>) -> Option<Kind> {
    if !msg.mti().is_request() {
        return None;
    }
    if name.starts_with("v8_real_qr_") {
        // A real terminal's QR sale (DE60.1 26): not an operation refundgate supports (40).
        return None;
    }
    let stem = name;
    let stem = stem.split_once('_').map_or(stem, |(a, _)| a);
    match stem.trim_end_matches(|c: char| c.is_ascii_digit()) {
        "sale" => Some(Kind::Op(Operation::Sale)),
        "refund" => Some(Kind::Op(Operation::Refund)),
        "void" => Some(Kind::Op(Operation::Void)),
        "reversal" => Some(Kind::Op(Operation::Reversal)),
        "settlement" => Some(Kind::Op(Operation::Settlement)),
        "echo" => Some(Kind::Echo),
        "signon" => Some(Kind::SignOn),
        other => panic!("vector {name}: unknown operation {other:?}"),
    }
}

#[test]
fn dialect_data_classifies_every_vector_as_its_name_says() {
    let mut checked = 0;
    for (dialect, dir, offset) in sets() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".hex") || name.starts_with("ebcdic") {
                continue;
            }
            let bytes = hex::decode(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
            let msg = iso8583::decode(dialect.spec(), &bytes[offset..]).unwrap();
            assert_eq!(
                dialect.classify(&msg),
                named_kind(&name, &msg),
                "{}/{name}",
                dialect.name()
            );
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} vectors");
}

#[test]
fn iso87b_requests_are_classified_from_its_dialect_file() {
    let d = Dialect::builtin("iso87b").unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/iso87b");
    for (name, kind) in [
        ("sale_0200", Some(Kind::Op(Operation::Sale))),
        ("refund_0200", Some(Kind::Op(Operation::Refund))),
        ("reversal_0400", Some(Kind::Op(Operation::Reversal))),
        ("echo_0800", Some(Kind::Echo)),
        ("settlement_0500", Some(Kind::Op(Operation::Settlement))),
        ("sale_0210", None),
        ("echo_0810", None),
    ] {
        let bytes = hex::decode(
            std::fs::read_to_string(dir.join(format!("{name}.hex")))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let msg = iso8583::decode(d.spec(), &bytes).unwrap();
        assert_eq!(d.classify(&msg), kind, "{name}");
    }
}

/// A rule changed in the data changes the answer: the rules are not decoration.
#[test]
fn a_changed_rule_changes_the_classification() {
    let text = include_str!("../../specs/iso87b.dialect.toml").replace(
        "processing = 20, operation = \"refund\"",
        "processing = 21, operation = \"refund\"",
    );
    let d = Dialect::from_toml("edited", &text, iso8583::ISO87B.clone()).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/iso87b");
    let bytes = hex::decode(
        std::fs::read_to_string(dir.join("refund_0200.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let msg = iso8583::decode(d.spec(), &bytes).unwrap();
    assert_eq!(d.classify(&msg), None);
}
