//! ISO 8583 codec driven by dialect files (sans-IO).
//!
//! - [`spec`]: dialects as data (`specs/*.toml`, embedded or loaded from a path).
//! - [`parse`]: the zero-copy decoder producing a [`Message`] that borrows the frame.
//! - [`encode`]: the encoder writing into a reusable `BytesMut`.
//! - [`json`]: the `decode`/`encode` command-line view, in the shape of the shared vectors.
//! - [`ebcdic`], [`tlv`], [`bcd`]: encodings a spec can name (EBCDIC characters, BER-TLV ICC
//!   data, packed digits).

pub mod bcd;
pub mod ebcdic;
pub mod encode;
pub mod error;
pub mod json;
pub mod message;
pub mod mti;
pub mod parse;
pub mod sensitive;
pub mod spec;
pub mod tlv;

pub use bcd::Digits;
pub use encode::{encode, FieldList, Value};
pub use error::{DecodeError, Element, EncodeError, Fault};
pub use message::{Amount, Cup60, Cup61, FieldRef, Message, OriginalData, ProcessingCode};
pub use mti::Mti;
pub use parse::{decode, decode_partial};
pub use sensitive::Pan;
pub use spec::{Spec, ASCII1987, CUP_POS, ISO87B};
