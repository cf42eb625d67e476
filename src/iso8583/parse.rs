//! The decoder: nom 8 `complete` parsers, one small parser per element, over a whole message.

use nom::bytes::complete::take;
use nom::error::{ErrorKind, ParseError};
use nom::{IResult, Parser};

use super::bcd::{ascii_number, bcd_number, valid_bcd, BcdFault};
use super::error::{DecodeError, Element, Fault};
use super::message::{Message, Span};
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

/// One bitmap as 16 hex characters (any case).
fn bitmap_hex(input: &[u8]) -> PResult<'_, u64> {
    let (rest, chars) = take(16usize).parse(input)?;
    let mut v = 0u64;
    for &c in chars {
        let nibble = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            b'a'..=b'f' => c - b'a' + 10,
            _ => return fail(input, Fault::NotHex),
        };
        v = v << 4 | u64::from(nibble);
    }
    Ok((rest, v))
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

/// A length prefix, checked against the element's maximum.
fn length_prefix<'a>(input: &'a [u8], spec: &FieldSpec) -> PResult<'a, usize> {
    if spec.prefix == Prefix::Fixed {
        return Ok((input, usize::from(spec.max)));
    }
    let (rest, raw) = take(spec.length_encoding.prefix_bytes(spec.prefix)).parse(input)?;
    let units = match spec.length_encoding {
        LengthEncoding::Ascii => ascii_number(raw),
        LengthEncoding::Bcd => bcd_number(raw),
        LengthEncoding::Binary => Some(raw.iter().fold(0usize, |v, &b| v << 8 | usize::from(b))),
    };
    match units {
        None => fail(input, Fault::BadLength),
        Some(u) if u > usize::from(spec.max) => fail(input, Fault::LengthOverMax),
        Some(u) => Ok((rest, u)),
    }
}

/// The content of an element of `units` length units.
fn content<'a>(input: &'a [u8], spec: &FieldSpec, units: usize) -> PResult<'a, &'a [u8]> {
    take(spec.content_bytes(units)).parse(input)
}

/// Checks an element's content against its kind; returns the offset within it of the fault.
fn check_content(spec: &FieldSpec, bytes: &[u8], units: usize) -> Result<(), (usize, Fault)> {
    match (spec.encoding, spec.kind) {
        (Encoding::Ascii, Kind::Numeric) => match bytes.iter().position(|b| !b.is_ascii_digit()) {
            Some(i) => Err((i, Fault::NotNumeric)),
            None => Ok(()),
        },
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
pub fn decode<'a>(spec: &'a Spec, bytes: &'a [u8]) -> Result<Message<'a>, DecodeError> {
    let (msg, err) = decode_partial(spec, bytes);
    match err {
        None => Ok(msg),
        Some(e) => Err(e),
    }
}

/// Decodes as much as can be read. The message holds every element that was read and valid;
/// the error, if any, is the first fault found. A content fault does not stop reading (so the
/// STAN can still be located); a structural fault does.
pub fn decode_partial<'a>(spec: &'a Spec, bytes: &'a [u8]) -> (Message<'a>, Option<DecodeError>) {
    let mut msg = Message {
        spec,
        bytes,
        mti: Mti(0),
        present: 0,
        spans: [Span::default(); 129],
    };
    let total = bytes.len();
    let at = |remaining: usize| total - remaining;
    let err = |element, offset, fault, mti, stan| {
        Some(DecodeError {
            element,
            offset,
            fault,
            mti,
            stan,
        })
    };
    if total > usize::from(u16::MAX) {
        return (msg, err(Element::Mti, 0, Fault::TooLong, None, None));
    }
    let mti = match spec.mti {
        MtiEncoding::Ascii => mti_ascii(bytes),
        MtiEncoding::Bcd => mti_bcd(bytes),
    };
    let (mut input, mti) = match mti {
        Ok(v) => v,
        Err(e) => return (msg, err(Element::Mti, 0, pfault(&e).fault, None, None)),
    };
    msg.mti = mti;
    let bitmap = |i| match spec.bitmap {
        BitmapEncoding::Hex => bitmap_hex(i),
        BitmapEncoding::Binary => bitmap_binary(i),
    };
    let (rest, primary) = match bitmap(input) {
        Ok(v) => v,
        Err(e) => {
            return (
                msg,
                err(
                    Element::Bitmap(1),
                    at(input.len()),
                    pfault(&e).fault,
                    Some(mti),
                    None,
                ),
            )
        }
    };
    input = rest;
    let mut present = u128::from(primary) << 64;
    if primary & (1 << 63) != 0 {
        let (rest, secondary) = match bitmap(input) {
            Ok(v) => v,
            Err(e) => {
                return (
                    msg,
                    err(
                        Element::Bitmap(2),
                        at(input.len()),
                        pfault(&e).fault,
                        Some(mti),
                        None,
                    ),
                )
            }
        };
        input = rest;
        present |= u128::from(secondary);
    }
    let mut first: Option<DecodeError> = None;
    let mut stan: Option<u32> = None;
    let mut bits = present & !(1u128 << 127);
    while bits != 0 {
        let n = bits.leading_zeros() as usize + 1;
        bits &= !(1u128 << (128 - n));
        let element = Element::Field(n as u8);
        let prefix_start = at(input.len());
        let Some(fs) = spec.field(n) else {
            let e = first.unwrap_or(DecodeError {
                element,
                offset: prefix_start,
                fault: Fault::NotInSpec,
                mti: Some(mti),
                stan,
            });
            return (msg, Some(DecodeError { stan, ..e }));
        };
        let parsed = length_prefix(input, fs).and_then(|(rest, units)| {
            content(rest, fs, units).map(|(rest, value)| (rest, units, value))
        });
        let (rest, units, value) = match parsed {
            Ok(v) => v,
            Err(e) => {
                let f = pfault(&e);
                let e = first.unwrap_or(DecodeError {
                    element,
                    offset: at(f.remaining),
                    fault: f.fault,
                    mti: Some(mti),
                    stan,
                });
                return (msg, Some(DecodeError { stan, ..e }));
            }
        };
        let start = at(rest.len()) - value.len();
        input = rest;
        if let Err((i, fault)) = check_content(fs, value, units) {
            if first.is_none() {
                first = err(element, start + i, fault, Some(mti), None);
            }
            continue;
        }
        msg.present |= 1u128 << (128 - n);
        msg.spans[n] = Span {
            start: start as u16,
            len: value.len() as u16,
            units: units as u16,
            prefix_start: prefix_start as u16,
        };
        if n == 11 {
            stan = msg.stan();
        }
    }
    if present & (1u128 << 127) != 0 {
        msg.present |= 1u128 << 127;
    }
    if first.is_none() && !input.is_empty() {
        first = err(
            Element::Trailer,
            at(input.len()),
            Fault::TrailingBytes,
            Some(mti),
            stan,
        );
    }
    (msg, first.map(|e| DecodeError { stan, ..e }))
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
