//! Dialects as data: a [`Spec`] says, for every data element, its kind, encoding, length prefix,
//! maximum length, pad side and sensitivity. The two shipped dialects are embedded from `specs/`;
//! a custom dialect can be loaded from a TOML file of the same shape.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use serde::Deserialize;

use super::ebcdic::CodePage;

/// The content kind of a data element (ISO 8583 notation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `n`: decimal digits only.
    Numeric,
    /// `an`: letters and digits (not checked beyond the encoding).
    Alphanumeric,
    /// `ans`: letters, digits and specials (not checked beyond the encoding).
    AlphanumericSpecial,
    /// `b`: binary data.
    Binary,
    /// `z`: track data, digits and the `=` separator (`D` nibble in BCD).
    Track,
}

/// How a data element's content sits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One byte per character. A `b` element in ASCII is written as upper-case hex characters.
    Ascii,
    /// Two digits per byte.
    Bcd,
    /// Raw bytes.
    Binary,
    /// One EBCDIC byte per character (`n`, `an`, `ans`, `z` elements).
    Ebcdic(CodePage),
}

/// The length prefix of a data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// Fixed length, no prefix.
    Fixed,
    /// One length digit.
    L,
    /// Two length digits.
    Ll,
    /// Three length digits.
    Lll,
    /// Four length digits.
    Llll,
}

impl Prefix {
    /// Number of decimal digits in the prefix (0 for fixed).
    pub const fn digits(self) -> usize {
        match self {
            Prefix::Fixed => 0,
            Prefix::L => 1,
            Prefix::Ll => 2,
            Prefix::Lll => 3,
            Prefix::Llll => 4,
        }
    }
}

/// How a length prefix is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthEncoding {
    /// ASCII decimal digits (`"19"`).
    Ascii,
    /// BCD, one byte per two digits (`0x19`; LLL and LLLL take two bytes).
    Bcd,
    /// Unsigned big-endian binary (L and LL one byte, LLL and LLLL two bytes).
    Binary,
    /// EBCDIC decimal digits (`0xF1 0xF9`), the same in every code page.
    Ebcdic,
}

impl LengthEncoding {
    /// Bytes taken on the wire by a prefix of `prefix`.
    pub const fn prefix_bytes(self, prefix: Prefix) -> usize {
        let digits = prefix.digits();
        match self {
            LengthEncoding::Ascii | LengthEncoding::Ebcdic => digits,
            LengthEncoding::Bcd | LengthEncoding::Binary => digits.div_ceil(2),
        }
    }
}

/// Which side the pad nibble of an odd digit count goes on (BCD only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    /// Pad `0` on the left: right-justified digits.
    Left,
    /// Pad `0` on the right: left-justified digits ("左靠").
    Right,
}

/// How much of a data element may be shown in logs and `decode` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    /// Shown as is.
    Public,
    /// A card number: first 6 and last 4 digits shown.
    Pan,
    /// Track data: never shown.
    Track,
    /// Keys, PIN blocks, MACs, ICC data: never shown.
    Secret,
}

/// One data element of a dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Content kind.
    pub kind: Kind,
    /// Content encoding.
    pub encoding: Encoding,
    /// Length prefix.
    pub prefix: Prefix,
    /// How the prefix is written.
    pub length_encoding: LengthEncoding,
    /// Maximum (or fixed) length in [`FieldSpec::counts_digits`] units.
    pub max: u16,
    /// Pad side for odd digit counts in BCD.
    pub pad: Pad,
    /// Whether lengths count digits (BCD numerics) rather than bytes.
    pub counts_digits: bool,
    /// What may be shown of it.
    pub sensitivity: Sensitivity,
    /// Whether the content is a BER-TLV list (EMV ICC data): checked on decode and encode,
    /// listed tag by tag in the JSON view.
    pub tlv: bool,
}

impl FieldSpec {
    /// Bytes on the wire for a content of `units` length units (digits or bytes).
    pub const fn content_bytes(&self, units: usize) -> usize {
        if self.counts_digits {
            units.div_ceil(2)
        } else {
            units
        }
    }
}

/// How the MTI is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtiEncoding {
    /// Four ASCII digits.
    Ascii,
    /// Two BCD bytes.
    Bcd,
    /// Four EBCDIC digits.
    Ebcdic,
}

/// How bitmaps are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapEncoding {
    /// 16 hex characters per bitmap (any case read, upper case written).
    Hex,
    /// 8 raw bytes per bitmap.
    Binary,
    /// 16 hex characters per bitmap written in EBCDIC (`F0`–`F9`, `C1`–`C6`; any case read).
    HexEbcdic,
}

/// A dialect: MTI and bitmap encodings and the 127 data elements 2..=128.
#[derive(Debug, Clone)]
pub struct Spec {
    name: String,
    /// How the MTI is written.
    pub mti: MtiEncoding,
    /// How bitmaps are written.
    pub bitmap: BitmapEncoding,
    fields: [Option<FieldSpec>; 129],
    /// The per-element plan the encoder follows, derived from `fields` once.
    steps: [Step; 129],
    names: Vec<(u8, String)>,
}

/// What the codec does with one element's content, decided once per dialect from kind,
/// encoding and `tlv` so that the encoder dispatches on one small value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content {
    /// The element is not in the dialect.
    Undefined,
    /// ASCII `n`: digits only.
    AsciiDigits,
    /// ASCII `z`: digits, `=` and `D`.
    AsciiTrack,
    /// ASCII-written `b`: hex characters.
    AsciiHex,
    /// Copied as is: ASCII `an`/`ans`, binary-encoded elements that are not TLV.
    Plain,
    /// A BER-TLV list (binary).
    Tlv,
    /// BCD `n`.
    BcdDigits,
    /// BCD `z`: digits and the `D` separator nibble.
    BcdTrack,
    /// EBCDIC `n`.
    EbcdicDigits(CodePage),
    /// EBCDIC `z`.
    EbcdicTrack(CodePage),
    /// EBCDIC `an`/`ans`.
    EbcdicText(CodePage),
}

/// One element's plan: everything the hot paths read, in a few bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// How the content is checked, read and written.
    pub(crate) content: Content,
    /// How the length prefix is written.
    pub(crate) length: LengthEncoding,
    /// Bytes of the length prefix; 0 for a fixed element.
    pub(crate) prefix_bytes: u8,
    /// Digits of the length prefix; 0 for a fixed element.
    pub(crate) prefix_digits: u8,
    /// Maximum (or fixed) length in units.
    pub(crate) max: u16,
    /// Whether lengths count digits (BCD numerics) rather than bytes.
    pub(crate) counts_digits: bool,
    /// Whether an odd BCD digit count is padded on the left.
    pub(crate) left_pad: bool,
    /// Whether the element is `n` (takes [`super::Value::Number`]).
    pub(crate) numeric: bool,
}

impl Step {
    const UNDEFINED: Step = Step {
        content: Content::Undefined,
        length: LengthEncoding::Ascii,
        prefix_bytes: 0,
        prefix_digits: 0,
        max: 0,
        counts_digits: false,
        left_pad: true,
        numeric: false,
    };

    fn of(fs: &FieldSpec) -> Step {
        let content = match (fs.encoding, fs.kind) {
            _ if fs.tlv => Content::Tlv,
            (Encoding::Ascii, Kind::Numeric) => Content::AsciiDigits,
            (Encoding::Ascii, Kind::Track) => Content::AsciiTrack,
            (Encoding::Ascii, Kind::Binary) => Content::AsciiHex,
            (Encoding::Bcd, Kind::Track) => Content::BcdTrack,
            (Encoding::Bcd, _) => Content::BcdDigits,
            (Encoding::Ebcdic(p), Kind::Numeric) => Content::EbcdicDigits(p),
            (Encoding::Ebcdic(p), Kind::Track) => Content::EbcdicTrack(p),
            (Encoding::Ebcdic(p), _) => Content::EbcdicText(p),
            (Encoding::Ascii | Encoding::Binary, _) => Content::Plain,
        };
        Step {
            content,
            length: fs.length_encoding,
            prefix_bytes: fs.length_encoding.prefix_bytes(fs.prefix) as u8,
            prefix_digits: fs.prefix.digits() as u8,
            max: fs.max,
            counts_digits: fs.counts_digits,
            left_pad: fs.pad == Pad::Left,
            numeric: fs.kind == Kind::Numeric,
        }
    }

    /// Bytes on the wire for a content of `units` length units.
    #[inline(always)]
    pub(crate) const fn content_bytes(&self, units: usize) -> usize {
        if self.counts_digits {
            units.div_ceil(2)
        } else {
            units
        }
    }
}

/// A spec file that cannot be used; the message names the file, field and key.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SpecError {
    source_name: String,
    message: String,
}

/// The embedded `ascii1987` dialect.
pub static ASCII1987: LazyLock<Spec> = LazyLock::new(|| embedded("ascii1987", ASCII1987_TOML));
/// The embedded `cup_pos` dialect.
pub static CUP_POS: LazyLock<Spec> = LazyLock::new(|| embedded("cup_pos", CUP_POS_TOML));
/// The embedded `iso87b` dialect (ISO 8583:1987, binary bitmaps, BCD numerics: jPOS
/// `ISO87BPackager`).
pub static ISO87B: LazyLock<Spec> = LazyLock::new(|| embedded("iso87b", ISO87B_TOML));

const ASCII1987_TOML: &str = include_str!("../../specs/ascii1987.toml");
const CUP_POS_TOML: &str = include_str!("../../specs/cup_pos.toml");
const ISO87B_TOML: &str = include_str!("../../specs/iso87b.toml");

/// Names of the embedded dialects, for messages that list them.
pub const BUILTIN_NAMES: &[&str] = &["ascii1987", "cup_pos", "iso87b"];

impl Spec {
    /// The dialect's name (`ascii1987`, `cup_pos`, or a custom one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The spec of data element `field` (2..=128), if the dialect defines it.
    #[inline]
    pub fn field(&self, field: usize) -> Option<&FieldSpec> {
        self.fields.get(field).and_then(Option::as_ref)
    }

    /// The plan of data element `n` (0..=128; [`Content::Undefined`] where the dialect has
    /// none).
    #[inline(always)]
    pub(crate) fn step(&self, n: usize) -> &Step {
        self.steps.get(n).unwrap_or(&Step::UNDEFINED)
    }

    /// The human name of a data element, for `describe` output.
    pub fn field_name(&self, field: u8) -> Option<&str> {
        self.names
            .iter()
            .find(|(n, _)| *n == field)
            .map(|(_, s)| s.as_str())
    }

    /// One of the embedded dialects by name.
    pub fn builtin(name: &str) -> Option<&'static Spec> {
        match name {
            "ascii1987" => Some(&ASCII1987),
            "cup_pos" | "cup_bcd" => Some(&CUP_POS),
            "iso87b" => Some(&ISO87B),
            _ => None,
        }
    }

    /// Loads a dialect from a TOML file.
    pub fn from_path(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            source_name: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        Spec::from_toml(&path.display().to_string(), &text)
    }

    /// Parses a dialect from TOML text; `source_name` names it in errors.
    pub fn from_toml(source_name: &str, text: &str) -> Result<Spec, SpecError> {
        let err = |message: String| SpecError {
            source_name: source_name.to_string(),
            message,
        };
        let raw: RawSpec = toml::from_str(text).map_err(|e| err(one_line(&e.to_string())))?;
        let mti = match raw.mti.as_str() {
            "ascii" => MtiEncoding::Ascii,
            "bcd" => MtiEncoding::Bcd,
            "ebcdic" => MtiEncoding::Ebcdic,
            other => {
                return Err(err(format!(
                    "key `mti`: expected ascii, bcd or ebcdic, got {other:?}"
                )))
            }
        };
        let bitmap = match raw.bitmap.as_str() {
            "hex" => BitmapEncoding::Hex,
            "binary" => BitmapEncoding::Binary,
            "hex_ebcdic" => BitmapEncoding::HexEbcdic,
            other => {
                return Err(err(format!(
                    "key `bitmap`: expected hex, binary or hex_ebcdic, got {other:?}"
                )))
            }
        };
        let length_encoding = parse_length_encoding(&raw.length_encoding).ok_or_else(|| {
            err(format!(
                "key `length_encoding`: expected ascii, bcd, binary or ebcdic, got {:?}",
                raw.length_encoding
            ))
        })?;
        let mut fields = [None; 129];
        let mut names = Vec::with_capacity(raw.fields.len());
        for (key, f) in &raw.fields {
            let n: usize = match key.parse() {
                Ok(n) if (2..=128).contains(&n) => n,
                _ => {
                    return Err(err(format!(
                        "fields.{key}: field numbers run from 2 to 128"
                    )))
                }
            };
            let spec = f
                .validate(length_encoding)
                .map_err(|(k, m)| err(format!("field {n}: key `{k}`: {m}")))?;
            fields[n] = Some(spec);
            if let Some(name) = &f.name {
                names.push((n as u8, name.clone()));
            }
        }
        let steps = fields.map(|f| f.as_ref().map_or(Step::UNDEFINED, Step::of));
        Ok(Spec {
            name: raw.name,
            mti,
            bitmap,
            fields,
            steps,
            names,
        })
    }
}

fn embedded(name: &str, text: &str) -> Spec {
    match Spec::from_toml(name, text) {
        Ok(spec) => spec,
        // The embedded files are checked by a unit test; reaching this is a build defect.
        Err(e) => panic!("embedded spec {name} is invalid: {e}"),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_length_encoding(s: &str) -> Option<LengthEncoding> {
    match s {
        "ascii" => Some(LengthEncoding::Ascii),
        "bcd" => Some(LengthEncoding::Bcd),
        "binary" => Some(LengthEncoding::Binary),
        "ebcdic" => Some(LengthEncoding::Ebcdic),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    mti: String,
    bitmap: String,
    length_encoding: String,
    fields: BTreeMap<String, RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: Option<String>,
    kind: String,
    encoding: String,
    prefix: String,
    max: i64,
    pad: Option<String>,
    count: Option<String>,
    length_encoding: Option<String>,
    sensitive: Option<String>,
    tlv: Option<String>,
}

impl RawField {
    fn validate(
        &self,
        default_length: LengthEncoding,
    ) -> Result<FieldSpec, (&'static str, String)> {
        let kind = match self.kind.as_str() {
            "n" => Kind::Numeric,
            "an" | "a" => Kind::Alphanumeric,
            "ans" => Kind::AlphanumericSpecial,
            "b" => Kind::Binary,
            "z" => Kind::Track,
            other => {
                return Err((
                    "kind",
                    format!("expected n, an, ans, b or z, got {other:?}"),
                ))
            }
        };
        let encoding = match self.encoding.as_str() {
            "ascii" => Encoding::Ascii,
            "bcd" => Encoding::Bcd,
            "binary" => Encoding::Binary,
            "cp037" => Encoding::Ebcdic(CodePage::Cp037),
            "cp500" => Encoding::Ebcdic(CodePage::Cp500),
            other => {
                return Err((
                    "encoding",
                    format!("expected ascii, bcd, binary, cp037 or cp500, got {other:?}"),
                ))
            }
        };
        if encoding == Encoding::Bcd && !matches!(kind, Kind::Numeric | Kind::Track) {
            return Err(("encoding", "bcd holds only n or z elements".into()));
        }
        if matches!(encoding, Encoding::Ebcdic(_)) && kind == Kind::Binary {
            return Err((
                "encoding",
                "EBCDIC holds characters; a b element is binary or ascii".into(),
            ));
        }
        let tlv = match self.tlv.as_deref() {
            None => false,
            Some("ber") if kind == Kind::Binary && encoding == Encoding::Binary => true,
            Some("ber") => {
                return Err(("tlv", "BER-TLV needs a b element in binary encoding".into()))
            }
            Some(other) => return Err(("tlv", format!("expected ber, got {other:?}"))),
        };
        let prefix = match self.prefix.as_str() {
            "fixed" => Prefix::Fixed,
            "l" => Prefix::L,
            "ll" => Prefix::Ll,
            "lll" => Prefix::Lll,
            "llll" => Prefix::Llll,
            other => {
                return Err((
                    "prefix",
                    format!("expected fixed, l, ll, lll or llll, got {other:?}"),
                ))
            }
        };
        let length_encoding = match &self.length_encoding {
            None => default_length,
            Some(s) => parse_length_encoding(s).ok_or((
                "length_encoding",
                format!("expected ascii, bcd or binary, got {s:?}"),
            ))?,
        };
        let counts_digits = match self.count.as_deref() {
            None => encoding == Encoding::Bcd,
            Some("digits") if encoding == Encoding::Bcd => true,
            Some("digits") => {
                return Err(("count", "digits are counted only for bcd elements".into()))
            }
            Some("bytes") => false,
            Some(other) => {
                return Err(("count", format!("expected digits or bytes, got {other:?}")))
            }
        };
        let pad = match self.pad.as_deref() {
            None | Some("left") => Pad::Left,
            Some("right") => Pad::Right,
            Some(other) => return Err(("pad", format!("expected left or right, got {other:?}"))),
        };
        let sensitivity = match self.sensitive.as_deref() {
            None | Some("public") => Sensitivity::Public,
            Some("pan") => Sensitivity::Pan,
            Some("track") => Sensitivity::Track,
            Some("secret") => Sensitivity::Secret,
            Some(other) => {
                return Err((
                    "sensitive",
                    format!("expected pan, track or secret, got {other:?}"),
                ))
            }
        };
        let prefix_max = match (prefix, length_encoding) {
            (Prefix::Fixed, _) => 9999,
            (Prefix::L, LengthEncoding::Binary) | (Prefix::Ll, LengthEncoding::Binary) => 255,
            (_, LengthEncoding::Binary) => 9999,
            (p, _) => 10i64.pow(p.digits() as u32) - 1,
        };
        if self.max < 1 || self.max > prefix_max {
            return Err(("max", format!("{} does not fit 1..={prefix_max}", self.max)));
        }
        let spec = FieldSpec {
            kind,
            encoding,
            prefix,
            length_encoding,
            max: self.max as u16,
            pad,
            counts_digits,
            sensitivity,
            tlv,
        };
        if spec.content_bytes(self.max as usize) > crate::limits::FRAME_BYTES_HARD_MAX {
            return Err(("max", "longer than the largest frame".into()));
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_dialects_define_every_field_from_2_to_128() {
        for spec in [&*ASCII1987, &*CUP_POS, &*ISO87B] {
            for n in 2..=128 {
                assert!(spec.field(n).is_some(), "{} lacks field {n}", spec.name());
            }
        }
    }

    #[test]
    fn bad_spec_names_the_field_and_key() {
        let text = "name = \"x\"\nmti = \"ascii\"\nbitmap = \"hex\"\nlength_encoding = \"ascii\"\n[fields]\n35 = { kind = \"z\", encoding = \"ascii\", prefix = \"ll\", max = 37, pad = \"middle\" }\n";
        let e = Spec::from_toml("custom.toml", text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "custom.toml: field 35: key `pad`: expected left or right, got \"middle\""
        );
    }

    #[test]
    fn unknown_key_in_spec_is_rejected_with_its_name() {
        let text = "name = \"x\"\nmti = \"ascii\"\nbitmap = \"hex\"\nlength_encoding = \"ascii\"\n[fields]\n2 = { kind = \"n\", encoding = \"ascii\", prefix = \"ll\", max = 19, colour = \"red\" }\n";
        let e = Spec::from_toml("custom.toml", text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn ebcdic_and_tlv_are_spec_properties_checked_at_load() {
        let head = "name = \"x\"\nmti = \"ebcdic\"\nbitmap = \"hex_ebcdic\"\nlength_encoding = \"ebcdic\"\n[fields]\n";
        let ok = format!("{head}43 = {{ kind = \"ans\", encoding = \"cp500\", prefix = \"ll\", max = 40 }}\n55 = {{ kind = \"b\", encoding = \"binary\", prefix = \"lll\", max = 255, tlv = \"ber\" }}\n");
        let spec = Spec::from_toml("e.toml", &ok).unwrap();
        assert_eq!(spec.mti, MtiEncoding::Ebcdic);
        assert_eq!(spec.bitmap, BitmapEncoding::HexEbcdic);
        let f43 = spec.field(43).unwrap();
        assert_eq!(f43.encoding, Encoding::Ebcdic(CodePage::Cp500));
        assert_eq!(f43.length_encoding, LengthEncoding::Ebcdic);
        assert_eq!(f43.length_encoding.prefix_bytes(f43.prefix), 2);
        assert!(spec.field(55).unwrap().tlv);
        for (field, message) in [
            (
                "52 = { kind = \"b\", encoding = \"cp037\", prefix = \"fixed\", max = 8 }",
                "e.toml: field 52: key `encoding`: EBCDIC holds characters; a b element is binary or ascii",
            ),
            (
                "55 = { kind = \"ans\", encoding = \"ascii\", prefix = \"lll\", max = 255, tlv = \"ber\" }",
                "e.toml: field 55: key `tlv`: BER-TLV needs a b element in binary encoding",
            ),
            (
                "55 = { kind = \"b\", encoding = \"binary\", prefix = \"lll\", max = 255, tlv = \"der\" }",
                "e.toml: field 55: key `tlv`: expected ber, got \"der\"",
            ),
        ] {
            let e = Spec::from_toml("e.toml", &format!("{head}{field}\n")).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn max_beyond_the_prefix_is_rejected() {
        let text = "name = \"x\"\nmti = \"ascii\"\nbitmap = \"hex\"\nlength_encoding = \"ascii\"\n[fields]\n2 = { kind = \"n\", encoding = \"ascii\", prefix = \"ll\", max = 100 }\n";
        let e = Spec::from_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(e, "c.toml: field 2: key `max`: 100 does not fit 1..=99");
    }
}
