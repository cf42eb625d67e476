//! BER-TLV as used by EMV in DE 55 (ICC data): read without copying, every object checked.
//!
//! A tag is one byte, or more when its low five bits are all set (then each following byte
//! with its top bit set announces another). A length is one byte below 0x80, or 0x81–0x83
//! followed by one to three length bytes. `00` bytes between objects are padding (EMV Book 3
//! annex B) and skipped. Card data tags ([`card_data`]) are never shown in `Debug` or the JSON
//! view unless asked.

/// One data object: its tag (the tag bytes read as a big-endian number, e.g. `0x9F26`) and
/// value, borrowed from the element.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag bytes as a number (`0x5A`, `0x9F26`, `0x9F6B`).
    pub tag: u32,
    /// Whether the object is constructed (its value is itself TLV).
    pub constructed: bool,
    /// The value bytes.
    pub value: &'a [u8],
}

/// A malformed TLV list: the byte offset within the element where it went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("BER-TLV at offset {offset}: {what}")]
pub struct TlvError {
    /// Offset within the element.
    pub offset: usize,
    /// What is wrong.
    pub what: &'static str,
}

/// Tag bytes allowed in one tag (EMV uses at most 3; BER allows more, nobody sends them).
pub const TAG_BYTES_MAX: usize = 4;

/// Iterates the data objects of a TLV list; stops after the first error.
#[derive(Debug, Clone)]
pub struct TlvIter<'a> {
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Reads the TLV list in `bytes`.
pub fn objects(bytes: &[u8]) -> TlvIter<'_> {
    TlvIter {
        bytes,
        pos: 0,
        failed: false,
    }
}

/// Checks that `bytes` is a well-formed TLV list (constructed objects checked inside too, up
/// to a small depth). Returns the offset and kind of the first fault.
pub fn validate(bytes: &[u8]) -> Result<(), TlvError> {
    validate_at(bytes, 0, 0)
}

/// Nesting depth checked by [`validate`]; deeper templates are taken as opaque.
const DEPTH_MAX: usize = 4;

fn validate_at(bytes: &[u8], base: usize, depth: usize) -> Result<(), TlvError> {
    let mut it = objects(bytes);
    while let Some(item) = it.next() {
        let tlv = item.map_err(|e| TlvError {
            offset: base + e.offset,
            ..e
        })?;
        if tlv.constructed && depth < DEPTH_MAX {
            let start = base + it.pos - tlv.value.len();
            validate_at(tlv.value, start, depth + 1)?;
        }
    }
    Ok(())
}

/// Whether a tag holds card data (PCI DSS: PAN, track equivalents, cardholder name,
/// expiry, PIN data): masked wherever the list is shown.
pub fn card_data(tag: u32) -> bool {
    matches!(
        tag,
        0x5A      // Application PAN
        | 0x57    // Track 2 Equivalent Data
        | 0x56    // Track 1 Data
        | 0x9F6B  // Track 2 Data (contactless)
        | 0x9F1F  // Track 1 Discretionary Data
        | 0x9F20  // Track 2 Discretionary Data
        | 0x5F20  // Cardholder Name
        | 0x5F24  // Application Expiration Date
        | 0x99 // Transaction PIN Data
    )
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>, TlvError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        while self.bytes.get(self.pos) == Some(&0x00) {
            self.pos += 1;
        }
        if self.pos >= self.bytes.len() {
            return None;
        }
        let item = self.read();
        self.failed = item.is_err();
        Some(item)
    }
}

impl<'a> TlvIter<'a> {
    fn read(&mut self) -> Result<Tlv<'a>, TlvError> {
        let err = |offset, what| TlvError { offset, what };
        let start = self.pos;
        let first = self.byte(start, "tag cut short")?;
        let mut tag = u32::from(first);
        let mut pos = start + 1;
        if first & 0x1F == 0x1F {
            loop {
                let b = self.byte(pos, "tag cut short")?;
                pos += 1;
                if pos - start > TAG_BYTES_MAX {
                    return Err(err(start, "tag longer than 4 bytes"));
                }
                tag = tag << 8 | u32::from(b);
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        let len_at = pos;
        let l0 = self.byte(pos, "length missing")?;
        pos += 1;
        let len = match l0 {
            0..=0x7F => usize::from(l0),
            0x81..=0x83 => {
                let n = usize::from(l0 & 0x7F);
                let raw = self
                    .bytes
                    .get(pos..pos + n)
                    .ok_or(err(len_at, "length cut short"))?;
                pos += n;
                raw.iter().fold(0usize, |v, &b| v << 8 | usize::from(b))
            }
            _ => return Err(err(len_at, "length form not allowed")),
        };
        let value = self
            .bytes
            .get(pos..pos + len)
            .ok_or(err(len_at, "value runs past the end"))?;
        self.pos = pos + len;
        Ok(Tlv {
            tag,
            constructed: first & 0x20 != 0,
            value,
        })
    }

    fn byte(&self, at: usize, what: &'static str) -> Result<u8, TlvError> {
        self.bytes
            .get(at)
            .copied()
            .ok_or(TlvError { offset: at, what })
    }
}

impl Tlv<'_> {
    /// The tag as upper-case hex, as EMV writes it (`9F26`).
    pub fn tag_hex(&self) -> String {
        let bytes = self.tag.to_be_bytes();
        let skip = bytes.iter().take(3).take_while(|&&b| b == 0).count();
        hex::encode_upper(&bytes[skip..])
    }
}

impl std::fmt::Debug for Tlv<'_> {
    /// Tag and length always; the value only when it is not card data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Tlv");
        d.field("tag", &format_args!("{}", self.tag_hex()))
            .field("len", &self.value.len());
        if card_data(self.tag) || self.constructed {
            d.field("value", &"<masked>");
        } else {
            d.field("value", &format_args!("{}", hex::encode_upper(self.value)));
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emv_list_is_read_with_two_byte_tags_and_long_lengths() {
        let mut bytes =
            hex::decode("9F2608A1B2C3D4E5F60718 5A084761739001010119".replace(' ', "")).unwrap();
        bytes.extend_from_slice(&[0x00, 0x00, 0x9F, 0x10, 0x81, 0x02, 0xAB, 0xCD]);
        let got: Vec<_> = objects(&bytes).map(Result::unwrap).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].tag, 0x9F26);
        assert_eq!(got[0].value.len(), 8);
        assert_eq!(got[1].tag, 0x5A);
        assert_eq!(got[2].tag_hex(), "9F10");
        assert_eq!(got[2].value, &[0xAB, 0xCD]);
        assert!(validate(&bytes).is_ok());
    }

    #[test]
    fn bad_lists_are_errors_with_offsets_not_panics() {
        let cases: [(&[u8], usize, &str); 5] = [
            (&[0x9F], 1, "tag cut short"),
            (&[0x5A], 1, "length missing"),
            (&[0x5A, 0x05, 0x01], 1, "value runs past the end"),
            (&[0x5A, 0x84, 0, 0, 0, 1], 1, "length form not allowed"),
            (
                &[0x9F, 0xFF, 0xFF, 0xFF, 0x01, 0x00],
                0,
                "tag longer than 4 bytes",
            ),
        ];
        for (bytes, offset, what) in cases {
            assert_eq!(
                validate(bytes),
                Err(TlvError { offset, what }),
                "{bytes:02x?}"
            );
        }
        // Inside a constructed template, offsets count from the start of the element.
        assert_eq!(
            validate(&[0x70, 0x03, 0x5A, 0x05, 0x01]),
            Err(TlvError {
                offset: 3,
                what: "value runs past the end"
            })
        );
    }

    #[test]
    fn debug_masks_card_data_tags() {
        let bytes =
            hex::decode("5A0847617390010101199F02060000000015005708476173900101011D").unwrap();
        let text = format!("{:?}", objects(&bytes).collect::<Vec<_>>());
        assert!(!text.contains("4761739001010119"), "{text}");
        assert!(!text.contains("476173900101011D"), "{text}");
        assert!(text.contains("000000001500"), "{text}");
        assert!(text.contains("<masked>"), "{text}");
    }
}
