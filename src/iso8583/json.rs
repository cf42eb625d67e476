//! The `decode` / `encode` command-line view: one JSON object in the shape of the shared
//! vector files, sensitive elements masked unless asked otherwise.

use bytes::BytesMut;
use serde_json::{json, Map, Value as Json};

use super::encode::{encode, Value};
use super::error::{Element, EncodeError, Fault};
use super::message::Message;
use super::mti::Mti;
use super::sensitive::mask_pan_text;
use super::spec::{Encoding, Sensitivity, Spec};
use super::tlv;

/// Prefix of a text element shown as hex because it is not ASCII.
pub const HEX_TEXT_PREFIX: &str = "hex:";

/// The text form of element `n` as the vector files write it: digits for numerics (`D` for a
/// BCD track separator), upper-case hex for binary-encoded elements, text otherwise.
pub fn field_text(msg: &Message<'_>, n: usize) -> Option<String> {
    let f = msg.field(n)?;
    if let Some(d) = f.digits() {
        return Some(d.to_string_lossy());
    }
    match f.spec.encoding {
        Encoding::Binary => Some(hex::encode_upper(f.bytes)),
        Encoding::Ebcdic(page) => {
            let ascii: Option<Vec<u8>> = f.bytes.iter().map(|&b| page.to_ascii(b)).collect();
            match ascii {
                Some(text) if !text.starts_with(HEX_TEXT_PREFIX.as_bytes()) => {
                    Some(String::from_utf8_lossy(&text).into_owned())
                }
                _ => Some(format!("{HEX_TEXT_PREFIX}{}", hex::encode_upper(f.bytes))),
            }
        }
        // Text that is not ASCII (a terminal putting binary or GBK bytes in an `ans` element)
        // is shown as `hex:` + its bytes, so the view stays lossless; `from_json` reads it back.
        // So is text that itself starts with `hex:` (fuzzing found DE41 `hex:` + NULs shown
        // as is, which `from_json` then refused as bad hex).
        _ if !f.bytes.is_ascii() || f.bytes.starts_with(HEX_TEXT_PREFIX.as_bytes()) => {
            Some(format!("{HEX_TEXT_PREFIX}{}", hex::encode_upper(f.bytes)))
        }
        _ => Some(String::from_utf8_lossy(f.bytes).into_owned()),
    }
}

/// The JSON view of a decoded message. `unmask` shows sensitive elements as they are.
pub fn to_json(msg: &Message<'_>, unmask: bool) -> Json {
    let spec = msg.spec();
    let mut fields = Map::new();
    for n in msg.present() {
        let Some(text) = field_text(msg, usize::from(n)) else {
            continue;
        };
        let sensitivity = spec.field(usize::from(n)).map(|f| f.sensitivity);
        let shown = match (unmask, sensitivity) {
            (true, _) | (false, Some(Sensitivity::Public)) | (false, None) => text,
            (false, Some(Sensitivity::Pan)) => mask_pan_text(&text),
            (false, Some(_)) => "*".repeat(text.len()),
        };
        fields.insert(n.to_string(), Json::String(shown));
    }
    let mut out = Map::new();
    out.insert("dialect".into(), json!(spec.name()));
    out.insert("mti".into(), json!(msg.mti().to_string()));
    out.insert("fields".into(), Json::Object(fields));
    let mut subfields = subfields(msg);
    for n in msg.present() {
        if let Some(list) = msg.field(usize::from(n)).and_then(|f| f.tlv()) {
            subfields.insert(n.to_string(), tlv_json(list, unmask, 0));
        }
    }
    if !subfields.is_empty() {
        out.insert("subfields".into(), Json::Object(subfields));
    }
    Json::Object(out)
}

/// Templates nested deeper than this are shown as one masked value.
const TLV_DEPTH_SHOWN_MAX: usize = 4;

/// A BER-TLV list as `[{"tag", "len", "value"}]`, constructed objects with their `objects`;
/// card data tags masked unless `unmask` (the PAN as 6 + 4, the rest as `*`).
fn tlv_json(list: tlv::TlvIter<'_>, unmask: bool, depth: usize) -> Json {
    let mut out = Vec::new();
    for item in list {
        let Ok(t) = item else {
            out.push(json!({ "error": "not a well-formed BER-TLV list" }));
            break;
        };
        let mut obj = Map::new();
        obj.insert("tag".into(), json!(t.tag_hex()));
        obj.insert("len".into(), json!(t.value.len()));
        let value = hex::encode_upper(t.value);
        if t.constructed && depth < TLV_DEPTH_SHOWN_MAX {
            obj.insert(
                "objects".into(),
                tlv_json(tlv::objects(t.value), unmask, depth + 1),
            );
        } else if unmask || (!tlv::card_data(t.tag) && !t.constructed) {
            obj.insert("value".into(), json!(value));
        } else if t.tag == 0x5A {
            // The application PAN: BCD digits, an odd count padded with F.
            obj.insert(
                "value".into(),
                json!(mask_pan_text(value.trim_end_matches('F'))),
            );
        } else {
            obj.insert("value".into(), json!("*".repeat(value.len())));
        }
        out.push(Json::Object(obj));
    }
    Json::Array(out)
}

fn subfields(msg: &Message<'_>) -> Map<String, Json> {
    let mut out = Map::new();
    if let Some(v) = msg
        .digits(90)
        .map(|d| d.to_string_lossy())
        .filter(|v| v.len() == 42)
    {
        out.insert(
            "90".into(),
            json!({
                "90.1 original MTI": &v[0..4],
                "90.2 original STAN": &v[4..10],
                "90.3 original DE7": &v[10..20],
                "90.4 original acquirer id": &v[20..31],
                "90.5 original forwarding id": &v[31..42],
            }),
        );
    }
    if msg.spec().name() == "cup_pos" {
        if let Some(v) = msg.digits(60).map(|d| d.to_string_lossy()) {
            let mut m = Map::new();
            let names = [
                ("60.1", 2),
                ("60.2", 6),
                ("60.3", 3),
                ("60.4", 1),
                ("60.5", 1),
                ("60.6", 1),
                ("60.7", 3),
            ];
            let mut i = 0;
            for (name, len) in names {
                if i >= v.len() {
                    break;
                }
                let end = (i + len).min(v.len());
                m.insert(name.into(), json!(&v[i..end]));
                i = end;
            }
            if i < v.len() {
                m.insert("60.rest".into(), json!(&v[i..]));
            }
            out.insert("60".into(), Json::Object(m));
        }
        if let Some(v) = msg
            .digits(61)
            .map(|d| d.to_string_lossy())
            .filter(|v| v.len() >= 12)
        {
            let mut m = Map::new();
            m.insert("61.1".into(), json!(&v[0..6]));
            m.insert("61.2".into(), json!(&v[6..12]));
            if v.len() >= 16 {
                m.insert("61.3".into(), json!(&v[12..16]));
            }
            if v.len() > 16 {
                m.insert("61.rest".into(), json!(&v[16..]));
            }
            out.insert("61".into(), Json::Object(m));
        }
    }
    out
}

/// A JSON document that cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum JsonEncodeError {
    /// The document's shape is wrong (missing `mti`, a field value that is not a string…).
    #[error("{0}")]
    Shape(String),
    /// An element does not fit the dialect.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Encodes the JSON view (unmasked) back into message bytes. `subfields` is ignored.
pub fn from_json(spec: &Spec, doc: &Json, out: &mut BytesMut) -> Result<(), JsonEncodeError> {
    let mti = doc
        .get("mti")
        .and_then(Json::as_str)
        .and_then(|s| Mti::from_ascii(s.as_bytes()))
        .ok_or_else(|| JsonEncodeError::Shape("key `mti`: expected four digits".into()))?;
    let empty = Map::new();
    let fields = match doc.get("fields") {
        None => &empty,
        Some(Json::Object(m)) => m,
        Some(_) => {
            return Err(JsonEncodeError::Shape(
                "key `fields`: expected an object".into(),
            ))
        }
    };
    let mut owned: Vec<(u8, Vec<u8>, bool)> = Vec::with_capacity(fields.len());
    for (k, v) in fields {
        let n: u8 = match k.parse() {
            Ok(n) if (2..=128).contains(&n) => n,
            _ => {
                return Err(JsonEncodeError::Shape(format!(
                    "fields.{k}: not a field number 2..128"
                )))
            }
        };
        let text = v
            .as_str()
            .ok_or_else(|| JsonEncodeError::Shape(format!("fields.{k}: expected a string")))?;
        let fs = spec.field(usize::from(n)).ok_or(EncodeError {
            element: Element::Field(n),
            fault: Fault::NotInSpec,
        })?;
        let not_hex = EncodeError {
            element: Element::Field(n),
            fault: Fault::NotHex,
        };
        // EBCDIC `hex:` values are wire bytes; everything else is the element's text form.
        let (bytes, raw) = if fs.encoding == Encoding::Binary {
            (hex::decode(text).map_err(|_| not_hex)?, false)
        } else if let Some(h) = text.strip_prefix(HEX_TEXT_PREFIX) {
            let raw = matches!(fs.encoding, Encoding::Ebcdic(_));
            (hex::decode(h).map_err(|_| not_hex)?, raw)
        } else {
            (text.as_bytes().to_vec(), false)
        };
        owned.push((n, bytes, raw));
    }
    owned.sort_by_key(|(n, _, _)| *n);
    let values: Vec<(u8, Value<'_>)> = owned
        .iter()
        .map(|(n, b, raw)| (*n, if *raw { Value::Raw(b) } else { Value::Text(b) }))
        .collect();
    encode(spec, mti, &values, out)?;
    Ok(())
}
