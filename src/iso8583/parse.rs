//! The decoder: nom 8 `complete` parsers for the MTI and bitmaps, then a walk over the elements
//! by offset (one bounds check per element, digit checks eight bytes at a time).

use nom::bytes::complete::take;
use nom::error::{ErrorKind, ParseError};
use nom::{IResult, Parser};

use super::bcd::{all_ascii_digits, ascii_number, bcd_number, hex_word, valid_bcd, BcdFault};
use super::ebcdic::{self, CodePage};
use super::error::{DecodeError, Element, Fault};
use super::message::Message;
use super::mti::Mti;
use super::spec::{
    BitmapEncoding, Encoding, FieldSpec, Kind, LengthEncoding, MtiEncoding, Pad, Prefix, Spec,
};

/// A parser failure: what went wrong and how much input was left where it happened (so the
/// byte offset can be computed without keeping the bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PFault {
    fault: Fault,
    remaining: usize,
}

impl<'a> ParseError<&'a [u8]> for PFault {
    fn from_error_kind(input: &'a [u8], kind: ErrorKind) -> Self {
        let fault = match kind {
            ErrorKind::Eof => Fault::Truncated,
            _ => Fault::BadValue,
        };
        PFault {
            fault,
            remaining: input.len(),
        }
    }

    fn append(_: &'a [u8], _: ErrorKind, other: Self) -> Self {
        other
    }
}

type PResult<'a, T> = IResult<&'a [u8], T, PFault>;

fn fail<T>(input: &[u8], fault: Fault) -> PResult<'_, T> {
    Err(nom::Err::Error(PFault {
        fault,
        remaining: input.len(),
    }))
}

/// MTI as four ASCII digits.
fn mti_ascii(input: &[u8]) -> PResult<'_, Mti> {
    let (rest, digits) = take(4usize).parse(input)?;
    match Mti::from_ascii(digits) {
        Some(mti) => Ok((rest, mti)),
        None => fail(input, Fault::NotNumeric),
    }
}

/// MTI as two BCD bytes.
fn mti_bcd(input: &[u8]) -> PResult<'_, Mti> {
    let (rest, digits) = take(2usize).parse(input)?;
    match bcd_number(digits) {
        Some(v) => Ok((rest, Mti(v as u16))),
        None => fail(input, Fault::NotNumeric),
    }
}

/// MTI as four EBCDIC digits.
fn mti_ebcdic(input: &[u8]) -> PResult<'_, Mti> {
    let (rest, digits) = take(4usize).parse(input)?;
    match ebcdic::number(digits) {
        Some(v) => Ok((rest, Mti(v as u16))),
        None => fail(input, Fault::NotNumeric),
    }
}

/// One bitmap as 16 hex characters written in EBCDIC (any case).
fn bitmap_hex_ebcdic(input: &[u8]) -> PResult<'_, u64> {
    let (rest, chars) = take(16usize).parse(input)?;
    let mut ascii = [0u8; 16];
    for (a, &e) in ascii.iter_mut().zip(chars) {
        // Hex digits and letters sit at the same code points in cp037 and cp500; anything
        // without an ASCII form becomes a byte `hex_word` refuses.
        *a = CodePage::Cp037.to_ascii(e).unwrap_or(b'?');
    }
    match (hex_word(&ascii[..8]), hex_word(&ascii[8..])) {
        (Some(hi), Some(lo)) => Ok((rest, u64::from(hi) << 32 | u64::from(lo))),
        _ => fail(input, Fault::NotHex),
    }
}

/// One bitmap as 16 hex characters (any case).
fn bitmap_hex(input: &[u8]) -> PResult<'_, u64> {
    let (rest, chars) = take(16usize).parse(input)?;
    match (hex_word(&chars[..8]), hex_word(&chars[8..])) {
        (Some(hi), Some(lo)) => Ok((rest, u64::from(hi) << 32 | u64::from(lo))),
        _ => fail(input, Fault::NotHex),
    }
}

/// One bitmap as 8 raw bytes.
fn bitmap_binary(input: &[u8]) -> PResult<'_, u64> {
    let (rest, bytes) = take(8usize).parse(input)?;
    let mut v = 0u64;
    for &b in bytes {
        v = v << 8 | u64::from(b);
    }
    Ok((rest, v))
}

/// The length, in units, that the prefix bytes `raw` of a variable element say.
#[inline(always)]
pub(crate) fn prefix_units(spec: &FieldSpec, raw: &[u8]) -> Option<usize> {
    match spec.length_encoding {
        LengthEncoding::Ascii => ascii_number(raw),
        LengthEncoding::Bcd => bcd_number(raw),
        LengthEncoding::Binary => Some(raw.iter().fold(0usize, |v, &b| v << 8 | usize::from(b))),
        LengthEncoding::Ebcdic => ebcdic::number(raw),
    }
}

/// Locates the element starting at `pos`: its content offset and length units. A fault is
/// reported at the prefix for a bad or too long length, at the content when it is cut short.
#[inline(always)]
fn element(bytes: &[u8], pos: usize, spec: &FieldSpec) -> Result<(usize, usize), (usize, Fault)> {
    let (start, units) = if spec.prefix == Prefix::Fixed {
        (pos, usize::from(spec.max))
    } else {
        let prefix_bytes = spec.length_encoding.prefix_bytes(spec.prefix);
        let Some(raw) = bytes.get(pos..pos + prefix_bytes) else {
            return Err((pos, Fault::Truncated));
        };
        match prefix_units(spec, raw) {
            None => return Err((pos, Fault::BadLength)),
            Some(u) if u > usize::from(spec.max) => return Err((pos, Fault::LengthOverMax)),
            Some(u) => (pos + prefix_bytes, u),
        }
    };
    if bytes.len() - start < spec.content_bytes(units) {
        return Err((start, Fault::Truncated));
    }
    Ok((start, units))
}

/// Checks an element's content against its kind; returns the offset within it of the fault.
#[inline(always)]
pub(crate) fn check_content(
    spec: &FieldSpec,
    bytes: &[u8],
    units: usize,
) -> Result<(), (usize, Fault)> {
    if spec.tlv {
        return super::tlv::validate(bytes).map_err(|e| (e.offset, Fault::BadTlv));
    }
    match (spec.encoding, spec.kind) {
        (Encoding::Ascii, Kind::Numeric) => {
            if all_ascii_digits(bytes) {
                return Ok(());
            }
            match bytes.iter().position(|b| !b.is_ascii_digit()) {
                Some(i) => Err((i, Fault::NotNumeric)),
                None => Ok(()),
            }
        }
        (Encoding::Ascii, Kind::Track) => {
            match bytes
                .iter()
                .position(|&b| !(b.is_ascii_digit() || b == b'=' || b == b'D'))
            {
                Some(i) => Err((i, Fault::NotNumeric)),
                None => Ok(()),
            }
        }
        (Encoding::Ascii, Kind::Binary) => {
            match bytes.iter().position(|b| !b.is_ascii_hexdigit()) {
                Some(i) => Err((i, Fault::NotHex)),
                None => Ok(()),
            }
        }
        (Encoding::Ebcdic(_), Kind::Numeric) => {
            match bytes.iter().position(|b| !(0xF0..=0xF9).contains(b)) {
                Some(i) => Err((i, Fault::NotNumeric)),
                None => Ok(()),
            }
        }
        (Encoding::Ebcdic(_), Kind::Track) => {
            // EBCDIC digits, `=` (7E) and `D` (C4), as in the ASCII track check.
            match bytes
                .iter()
                .position(|&b| !((0xF0..=0xF9).contains(&b) || b == 0x7E || b == 0xC4))
            {
                Some(i) => Err((i, Fault::NotNumeric)),
                None => Ok(()),
            }
        }
        (Encoding::Bcd, kind) => {
            let left_pad = spec.pad == Pad::Left;
            match valid_bcd(bytes, units, left_pad, kind == Kind::Track) {
                Ok(()) => Ok(()),
                Err(BcdFault::Digit(i)) => Err((i, Fault::NotNumeric)),
                Err(BcdFault::Pad(i)) => Err((i, Fault::BadPad)),
            }
        }
        _ => Ok(()),
    }
}

/// Decodes a whole message (MTI onward). Every element must be valid and nothing may follow
/// the last one.
#[inline]
pub fn decode<'a>(spec: &'a Spec, bytes: &'a [u8]) -> Result<Message<'a>, DecodeError> {
    // Built in the result itself (and inlined), so the message is not copied on the way out.
    let mut out = Ok(Message::empty(spec, bytes));
    if let Ok(msg) = &mut out {
        if let Some(e) = fill(msg) {
            out = Err(e);
        }
    }
    out
}

/// Decodes as much as can be read. The message holds every element that was read and valid;
/// the error, if any, is the first fault found. A content fault does not stop reading (so the
/// STAN can still be located); a structural fault does.
pub fn decode_partial<'a>(spec: &'a Spec, bytes: &'a [u8]) -> (Message<'a>, Option<DecodeError>) {
    let mut out = (Message::empty(spec, bytes), None);
    out.1 = fill(&mut out.0);
    out
}

impl<'a> Message<'a> {
    /// No MTI, no elements: what [`fill`] starts from.
    #[inline(always)]
    fn empty(spec: &'a Spec, bytes: &'a [u8]) -> Message<'a> {
        Message {
            spec,
            bytes,
            mti: Mti(0),
            present: 0,
            starts: [0; 129],
        }
    }
}

/// Reads `msg.bytes` with `msg.spec` into the empty `msg`; returns the first fault.
fn fill(msg: &mut Message<'_>) -> Option<DecodeError> {
    let (spec, bytes) = (msg.spec, msg.bytes);
    let total = bytes.len();
    let at = |remaining: usize| total - remaining;
    let err = |element, offset, fault, mti| {
        Some(DecodeError {
            element,
            offset,
            fault,
            mti,
            stan: None,
        })
    };
    if total > usize::from(u16::MAX) {
        return err(Element::Mti, 0, Fault::TooLong, None);
    }
    let mti = match spec.mti {
        MtiEncoding::Ascii => mti_ascii(bytes),
        MtiEncoding::Bcd => mti_bcd(bytes),
        MtiEncoding::Ebcdic => mti_ebcdic(bytes),
    };
    let (mut input, mti) = match mti {
        Ok(v) => v,
        Err(e) => return err(Element::Mti, 0, pfault(&e).fault, None),
    };
    msg.mti = mti;
    let bitmap = |i| match spec.bitmap {
        BitmapEncoding::Hex => bitmap_hex(i),
        BitmapEncoding::Binary => bitmap_binary(i),
        BitmapEncoding::HexEbcdic => bitmap_hex_ebcdic(i),
    };
    let (rest, primary) = match bitmap(input) {
        Ok(v) => v,
        Err(e) => {
            return err(
                Element::Bitmap(1),
                at(input.len()),
                pfault(&e).fault,
                Some(mti),
            )
        }
    };
    input = rest;
    let mut secondary = 0u64;
    if primary & (1 << 63) != 0 {
        let (rest, bits) = match bitmap(input) {
            Ok(v) => v,
            Err(e) => {
                return err(
                    Element::Bitmap(2),
                    at(input.len()),
                    pfault(&e).fault,
                    Some(mti),
                )
            }
        };
        input = rest;
        secondary = bits;
    }
    // The STAN of an error is the message's STAN as far as it was read: `msg.stan()` when the
    // error is returned (DE11 is in `msg` once it was read and valid).
    let mut first: Option<DecodeError> = None;
    let mut pos = at(input.len());
    // Elements 2..=64 from the primary bitmap, then 65..=128 from the secondary, each bitmap
    // walked from its top bit down; `read` collects the bits of the elements read and valid.
    let mut read = [primary & (1 << 63), 0u64];
    for (half, mut bits) in [primary & !(1 << 63), secondary].into_iter().enumerate() {
        while bits != 0 {
            let zeros = bits.leading_zeros() as usize;
            let n = 64 * half + zeros + 1;
            let bit = 1u64 << (63 - zeros);
            bits ^= bit;
            let element_at = |offset, fault| DecodeError {
                element: Element::Field(n as u8),
                offset,
                fault,
                mti: Some(mti),
                stan: None,
            };
            let found = match spec.field(n) {
                Some(fs) => element(bytes, pos, fs).map(|v| (fs, v)),
                None => Err((pos, Fault::NotInSpec)),
            };
            let (fs, (start, units)) = match found {
                Ok(v) => v,
                Err((offset, fault)) => {
                    let e = first.unwrap_or(element_at(offset, fault));
                    msg.present = u128::from(read[0]) << 64 | u128::from(read[1]);
                    return Some(DecodeError {
                        stan: msg.stan(),
                        ..e
                    });
                }
            };
            let end = start + fs.content_bytes(units);
            pos = end;
            if let Err((i, fault)) = check_content(fs, &bytes[start..end], units) {
                if first.is_none() {
                    first = Some(element_at(start + i, fault));
                }
                continue;
            }
            read[half] |= bit;
            msg.starts[n] = start as u16;
        }
    }
    msg.present = u128::from(read[0]) << 64 | u128::from(read[1]);
    if first.is_none() && pos != total {
        first = err(Element::Trailer, pos, Fault::TrailingBytes, Some(mti));
    }
    first.map(|e| DecodeError {
        stan: msg.stan(),
        ..e
    })
}

fn pfault(e: &nom::Err<PFault>) -> PFault {
    match e {
        nom::Err::Error(f) | nom::Err::Failure(f) => *f,
        nom::Err::Incomplete(_) => PFault {
            fault: Fault::Truncated,
            remaining: 0,
        },
    }
}
