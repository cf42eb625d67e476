//! Decode and encode errors. They name the element and the byte offset, never carry raw bytes,
//! and say whether the MTI and STAN were readable (which decides between answering 30 and
//! dropping the frame, DOMAIN §2).

use super::mti::Mti;

/// Where in the message a fault sits: the MTI, a bitmap, or a data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// The message type indicator.
    Mti,
    /// The primary (1) or secondary (2) bitmap.
    Bitmap(u8),
    /// Data element 2..=128.
    Field(u8),
    /// Bytes after the last element.
    Trailer,
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Element::Mti => f.write_str("MTI"),
            Element::Bitmap(1) => f.write_str("primary bitmap"),
            Element::Bitmap(_) => f.write_str("secondary bitmap"),
            Element::Field(n) => write!(f, "field {n}"),
            Element::Trailer => f.write_str("end of message"),
        }
    }
}

/// What is wrong with an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The message ends inside the element.
    Truncated,
    /// The length prefix is not a valid number.
    BadLength,
    /// The length prefix exceeds the element's maximum.
    LengthOverMax,
    /// A numeric element holds something other than digits (or a BCD nibble A–F).
    NotNumeric,
    /// A BCD pad nibble is not `0`.
    BadPad,
    /// A hex element (bitmap, ASCII-written binary) holds a non-hex character.
    NotHex,
    /// The bitmap announces an element the dialect does not define.
    NotInSpec,
    /// Bytes are left after the last element.
    TrailingBytes,
    /// The message is longer than any frame may be.
    TooLong,
    /// A BER-TLV element (DE55 ICC data) is not a well-formed TLV list.
    BadTlv,
    /// Encoding: the value does not fit the element (length, kind) or fields are out of order.
    BadValue,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::Truncated => "message ends inside it",
            Fault::BadLength => "length prefix is not a number",
            Fault::LengthOverMax => "length exceeds its maximum",
            Fault::NotNumeric => "not numeric",
            Fault::BadPad => "pad nibble is not 0",
            Fault::NotHex => "not hex",
            Fault::NotInSpec => "not defined by the dialect",
            Fault::TrailingBytes => "bytes after the last field",
            Fault::TooLong => "message longer than 65535 bytes",
            Fault::BadTlv => "not a well-formed BER-TLV list",
            Fault::BadValue => "value does not fit the element",
        }
    }
}

/// A message that could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{element} at offset {offset}: {}", fault.describe())]
pub struct DecodeError {
    /// The element at fault.
    pub element: Element,
    /// Byte offset of the element (or of the fault inside it) from the start of the message.
    pub offset: usize,
    /// What is wrong.
    pub fault: Fault,
    /// The MTI, when it was readable.
    pub mti: Option<Mti>,
    /// The STAN (DE11), when every element before it had a valid length and it was 6 digits.
    pub stan: Option<u32>,
}

impl DecodeError {
    /// A well-framed message whose MTI and STAN were readable is answered 30 (DOMAIN §2);
    /// otherwise it is dropped.
    pub fn answerable(&self) -> bool {
        self.mti.is_some() && self.stan.is_some()
    }
}

/// A message that could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{element}: {}", fault.describe())]
pub struct EncodeError {
    /// The element at fault.
    pub element: Element,
    /// What is wrong.
    pub fault: Fault,
}
