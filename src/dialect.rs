//! A dialect as one value loaded from data: its element spec plus everything refundgate does
//! with it beyond the elements (issue #19): default framing and header, how a request is
//! classified (MTI and DE3, DE60.1 or the network code → operation), where an original's keys
//! live, which response-code column answers, and which fields a response echoes.
//!
//! Each dialect is `specs/NAME.dialect.toml` next to its element spec `specs/NAME.toml`; the
//! built-in ones are embedded. Adding a dialect is one such pair of files. The older per-module
//! enums (`config::Dialect`, `ledger::Dialect`, `load::scenario::Dialect`, `flow::Shape`) are
//! bridged by [`Dialect::shape`] and [`Dialect::code_column`] until their users take this
//! value directly.

use std::path::Path;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::flow::{Kind, Shape};
use crate::frame::Framing;
use crate::iso8583::{Message, Spec};
use crate::ledger::reason::CodeColumn;

/// A dialect: element spec and behaviour.
#[derive(Debug, Clone)]
pub struct Dialect {
    name: String,
    spec: Spec,
    /// The length header a listener of this dialect uses unless configured otherwise.
    pub framing: Framing,
    /// What sits between the length header and the MTI.
    pub header: Header,
    /// The reason table's column of DE39 codes.
    pub code_column: CodeColumn,
    /// Where a refund, void or reversal names its original.
    pub original: OriginalKeys,
    /// Where network management messages carry their code.
    pub network_code: NetworkCode,
    /// Elements a response copies from its request, ascending.
    pub echo: Vec<u8>,
    rules: Vec<Rule>,
}

/// What precedes the MTI inside a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Nothing: the MTI follows the length header.
    None,
    /// The CUP 5-byte TPDU (`60 dest src`, swapped in replies) and a 6-byte message header.
    CupTpdu,
}

/// Where a message names the original transaction (DOMAIN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalKeys {
    /// DE90: original MTI, STAN, DE7, acquirer and forwarding ids.
    De90,
    /// DE61 batch, trace (and date) with DE37; a sale's reversal by DE11 + DE60.2.
    De61,
}

/// Where 08xx messages carry their network management code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkCode {
    /// DE70.
    De70,
    /// DE60.3 (`cup_pos`).
    De60_3,
}

/// One classification rule: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    class: u8,
    functions: Vec<u8>,
    processing: Option<u8>,
    de60_1: Option<u8>,
    network: Option<u16>,
    operation: Kind,
}

/// A dialect file that cannot be used; the message names the file and key.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct DialectError {
    source_name: String,
    message: String,
}

/// The embedded `ascii1987` dialect.
pub static ASCII1987: LazyLock<Dialect> = LazyLock::new(|| {
    embedded(
        include_str!("../specs/ascii1987.dialect.toml"),
        &crate::iso8583::ASCII1987,
    )
});
/// The embedded `cup_pos` dialect.
pub static CUP_POS: LazyLock<Dialect> = LazyLock::new(|| {
    embedded(
        include_str!("../specs/cup_pos.dialect.toml"),
        &crate::iso8583::CUP_POS,
    )
});
/// The embedded `iso87b` dialect.
pub static ISO87B: LazyLock<Dialect> = LazyLock::new(|| {
    embedded(
        include_str!("../specs/iso87b.dialect.toml"),
        &crate::iso8583::ISO87B,
    )
});

impl Dialect {
    /// One of the embedded dialects by name (`cup_bcd` is the vectors' name for `cup_pos`).
    pub fn builtin(name: &str) -> Option<&'static Dialect> {
        match name {
            "ascii1987" => Some(&ASCII1987),
            "cup_pos" | "cup_bcd" => Some(&CUP_POS),
            "iso87b" => Some(&ISO87B),
            _ => None,
        }
    }

    /// Loads `NAME.dialect.toml`; its `spec` file is read from the same directory.
    pub fn from_path(path: &Path) -> Result<Dialect, DialectError> {
        let source_name = path.display().to_string();
        let err = |message: String| DialectError {
            source_name: source_name.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw = parse_raw(&source_name, &text)?;
        let spec_path = path.with_file_name(&raw.spec);
        let spec = Spec::from_path(&spec_path).map_err(|e| err(format!("key `spec`: {e}")))?;
        Dialect::from_raw(&source_name, raw, spec)
    }

    /// Builds a dialect from the text of a dialect file and its already loaded element spec.
    pub fn from_toml(source_name: &str, text: &str, spec: Spec) -> Result<Dialect, DialectError> {
        let raw = parse_raw(source_name, text)?;
        Dialect::from_raw(source_name, raw, spec)
    }

    /// The dialect's name, as configuration files and metric labels write it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element spec.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The `flow::Shape` this dialect reads its originals and network codes like.
    pub fn shape(&self) -> Shape {
        match self.original {
            OriginalKeys::De90 => Shape::Ascii,
            OriginalKeys::De61 => Shape::Cup,
        }
    }

    /// What a request asks for, by the dialect's rules; `None`: unsupported (answered 40).
    /// Only ISO 8583:1987 requests and advices (version digit 0, even function digit) qualify.
    pub fn classify(&self, msg: &Message<'_>) -> Option<Kind> {
        let mti = msg.mti();
        if !mti.is_request() || mti.0 / 1000 != 0 {
            return None;
        }
        self.rules
            .iter()
            .find(|r| self.matches(r, msg))
            .map(|r| r.operation)
    }

    fn matches(&self, rule: &Rule, msg: &Message<'_>) -> bool {
        let mti = msg.mti();
        if mti.class() != rule.class || !rule.functions.contains(&mti.function()) {
            return false;
        }
        if let Some(p) = rule.processing {
            if msg.processing_code().map(|pc| pc.tx_type) != Some(p) {
                return false;
            }
        }
        if let Some(t) = rule.de60_1 {
            if msg.cup60().map(|c| c.message_type) != Some(t) {
                return false;
            }
        }
        if let Some(n) = rule.network {
            let code = match self.network_code {
                NetworkCode::De70 => msg.network_code(),
                NetworkCode::De60_3 => msg.cup60().and_then(|c| c.network_code),
            };
            if code != Some(n) {
                return false;
            }
        }
        true
    }

    fn from_raw(source_name: &str, raw: RawDialect, spec: Spec) -> Result<Dialect, DialectError> {
        let err = |message: String| DialectError {
            source_name: source_name.to_string(),
            message,
        };
        if spec.name() != raw.name {
            return Err(err(format!(
                "key `spec`: the element spec is named {:?}, not {:?}",
                spec.name(),
                raw.name
            )));
        }
        let header = match raw.header.as_str() {
            "none" => Header::None,
            "cup_tpdu" => Header::CupTpdu,
            other => {
                return Err(err(format!(
                    "key `header`: expected none or cup_tpdu, got {other:?}"
                )))
            }
        };
        let code_column = CodeColumn::from_name(&raw.response_codes).ok_or_else(|| {
            err(format!(
                "key `response_codes`: expected iso or cup, got {:?}",
                raw.response_codes
            ))
        })?;
        let original = match raw.original.as_str() {
            "de90" => OriginalKeys::De90,
            "de61" => OriginalKeys::De61,
            other => {
                return Err(err(format!(
                    "key `original`: expected de90 or de61, got {other:?}"
                )))
            }
        };
        let network_code = match raw.network_code.as_str() {
            "de70" => NetworkCode::De70,
            "de60.3" => NetworkCode::De60_3,
            other => {
                return Err(err(format!(
                    "key `network_code`: expected de70 or de60.3, got {other:?}"
                )))
            }
        };
        let mut echo = raw.echo;
        echo.sort_unstable();
        echo.dedup();
        if let Some(n) = echo.iter().find(|&&n| spec.field(usize::from(n)).is_none()) {
            return Err(err(format!(
                "key `echo`: field {n} is not in the element spec"
            )));
        }
        let rules = raw
            .classify
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.validate().map_err(|m| err(format!("classify[{i}]: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dialect {
            name: raw.name,
            spec,
            framing: raw.framing,
            header,
            code_column,
            original,
            network_code,
            echo,
            rules,
        })
    }
}

fn embedded(text: &str, spec: &Spec) -> Dialect {
    match Dialect::from_toml("embedded dialect", text, spec.clone()) {
        Ok(d) => d,
        // The embedded files are checked by a unit test; reaching this is a build defect.
        Err(e) => panic!("embedded dialect is invalid: {e}"),
    }
}

fn parse_raw(source_name: &str, text: &str) -> Result<RawDialect, DialectError> {
    toml::from_str(text).map_err(|e| DialectError {
        source_name: source_name.to_string(),
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDialect {
    name: String,
    spec: String,
    framing: Framing,
    header: String,
    response_codes: String,
    original: String,
    network_code: String,
    echo: Vec<u8>,
    classify: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    class: u8,
    functions: Vec<u8>,
    processing: Option<u8>,
    de60_1: Option<u8>,
    network: Option<u16>,
    operation: String,
}

impl RawRule {
    fn validate(self) -> Result<Rule, String> {
        let operation = match self.operation.as_str() {
            "sale" => Kind::Sale,
            "refund" => Kind::Refund,
            "void" => Kind::Void,
            "reversal" => Kind::Reversal,
            "settlement" => Kind::Settlement,
            "echo" => Kind::Echo,
            "sign_on" => Kind::SignOn,
            "sign_off" => Kind::SignOff,
            other => {
                return Err(format!(
                    "key `operation`: expected sale, refund, void, reversal, settlement, echo, \
                     sign_on or sign_off, got {other:?}"
                ))
            }
        };
        if self.class > 9 {
            return Err(format!("key `class`: {} is not an MTI digit", self.class));
        }
        if self.functions.is_empty() || self.functions.iter().any(|&f| f > 9 || f % 2 == 1) {
            return Err(
                "key `functions`: expected request or advice digits (0, 2, 4, 6, 8)".into(),
            );
        }
        Ok(Rule {
            class: self.class,
            functions: self.functions,
            processing: self.processing,
            de60_1: self.de60_1,
            network: self.network,
            operation,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_dialects_load_with_their_specs() {
        for (name, column, header) in [
            ("ascii1987", CodeColumn::Iso, Header::None),
            ("cup_pos", CodeColumn::Cup, Header::CupTpdu),
            ("iso87b", CodeColumn::Iso, Header::None),
        ] {
            let d = Dialect::builtin(name).unwrap();
            assert_eq!((d.name(), d.spec().name()), (name, name));
            assert_eq!((d.code_column, d.header), (column, header), "{name}");
            assert_eq!(d.echo, [3, 4, 11, 12, 13, 37, 41, 42]);
        }
    }

    #[test]
    fn a_dialect_file_on_disk_reads_its_spec_next_to_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
        let d = Dialect::from_path(&dir.join("iso87b.dialect.toml")).unwrap();
        assert_eq!(d.spec().name(), "iso87b");
        assert_eq!(d.original, OriginalKeys::De90);
    }

    #[test]
    fn bad_dialect_files_name_the_key() {
        let good = include_str!("../specs/iso87b.dialect.toml");
        let spec = || crate::iso8583::ISO87B.clone();
        let cases = [
            (
                good.replace("\"refund\" }", "\"refnud\" }"),
                "classify[3]: key `operation`: expected sale",
            ),
            (
                good.replace("response_codes = \"iso\"", "response_codes = \"visa\""),
                "key `response_codes`: expected iso or cup, got \"visa\"",
            ),
            (
                good.replace("original = \"de90\"", "original = \"de62\""),
                "key `original`: expected de90 or de61",
            ),
            (
                good.replace("[3, 4, 11,", "[3, 4, 1,"),
                "key `echo`: field 1 is not in the element spec",
            ),
            (
                good.replace(
                    "functions = [0], network = 301",
                    "functions = [1], network = 301",
                ),
                "classify[5]: key `functions`",
            ),
            (
                good.replace("name = \"iso87b\"", "name = \"x\""),
                "key `spec`",
            ),
            (
                format!("{good}\ncolour = \"red\"\n"),
                "unknown field `colour`",
            ),
        ];
        for (text, expected) in cases {
            let e = Dialect::from_toml("d.toml", &text, spec())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("d.toml: ") && e.contains(expected),
                "{e} lacks {expected}"
            );
        }
    }
}
