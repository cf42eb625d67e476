//! The encoder: builds a message from typed or raw element values into a reusable `BytesMut`.
//! Nothing here allocates once the buffer has grown to the message size.

use bytes::{BufMut, BytesMut};

use super::bcd::all_ascii_digits;
use super::ebcdic::{CodePage, DIGIT_ZERO};
use super::error::{Element, EncodeError, Fault};
use super::message::{FieldRef, Message};
use super::mti::Mti;
use super::spec::{
    BitmapEncoding, Encoding, FieldSpec, Kind, LengthEncoding, MtiEncoding, Pad, Prefix, Spec,
};

/// The value of one element to encode.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// The element's text form: digits for numerics (`=` or `D` separators for track data),
    /// characters for `an`/`ans`, hex characters for ASCII-written binary, raw bytes for
    /// binary-encoded elements.
    Text(&'a [u8]),
    /// A number for an `n` element; fixed elements are zero-padded on the left.
    Number(u64),
    /// An element copied as it sits in another message of the same dialect.
    Wire(FieldRef<'a>),
    /// Content bytes exactly as on the wire (after the length prefix), for an element that is
    /// not BCD: how the JSON view's `hex:` values come back. Checked like decoded content.
    Raw(&'a [u8]),
}

/// Up to `N` elements, kept in ascending element order, on the stack.
#[derive(Debug, Clone)]
pub struct FieldList<'a, const N: usize> {
    items: [(u8, Value<'a>); N],
    len: usize,
}

impl<const N: usize> Default for FieldList<'_, N> {
    #[inline]
    fn default() -> Self {
        FieldList {
            items: [(0, Value::Number(0)); N],
            len: 0,
        }
    }
}

impl<'a, const N: usize> FieldList<'a, N> {
    /// An empty list.
    #[inline]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets element `n`, replacing an earlier value. Fails when the list is full.
    #[inline]
    pub fn set(&mut self, n: u8, value: Value<'a>) -> Result<(), EncodeError> {
        // Elements usually come in ascending order: append without searching.
        let ascending = self.len == 0 || self.items[self.len - 1].0 < n;
        if (2..=128).contains(&n) && self.len < N && ascending {
            self.items[self.len] = (n, value);
            self.len += 1;
            return Ok(());
        }
        self.insert(n, value)
    }

    /// [`FieldList::set`] for an element out of order, already present, or not allowed.
    #[inline(never)]
    fn insert(&mut self, n: u8, value: Value<'a>) -> Result<(), EncodeError> {
        let full = EncodeError {
            element: Element::Field(n),
            fault: Fault::BadValue,
        };
        if !(2..=128).contains(&n) {
            return Err(full);
        }
        let pos = self.items[..self.len].partition_point(|(k, _)| *k < n);
        if pos < self.len && self.items[pos].0 == n {
            self.items[pos].1 = value;
            return Ok(());
        }
        if self.len == N {
            return Err(full);
        }
        self.items.copy_within(pos..self.len, pos + 1);
        self.items[pos] = (n, value);
        self.len += 1;
        Ok(())
    }

    /// Copies element `n` from `msg` when it is present.
    #[inline]
    pub fn echo(&mut self, msg: &Message<'a>, n: u8) -> Result<(), EncodeError> {
        match msg.field(usize::from(n)) {
            Some(f) => self.set(n, Value::Wire(f)),
            None => Ok(()),
        }
    }

    /// Removes element `n`.
    pub fn remove(&mut self, n: u8) {
        if let Some(pos) = self.items[..self.len].iter().position(|(k, _)| *k == n) {
            self.items.copy_within(pos + 1..self.len, pos);
            self.len -= 1;
        }
    }

    /// The elements, ascending.
    #[inline]
    pub fn as_slice(&self) -> &[(u8, Value<'a>)] {
        &self.items[..self.len]
    }
}

/// Encodes a message: MTI, bitmap(s), then `fields` (ascending, unique) into `out`.
pub fn encode(
    spec: &Spec,
    mti: Mti,
    fields: &[(u8, Value<'_>)],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    // Elements 1..=64 in map[0], 65..=128 in map[1], element 1 + i at bit 63 - i % 64.
    let mut map = [0u64; 2];
    let mut last = 1u8;
    for &(n, _) in fields {
        if n <= last || n > 128 {
            return Err(EncodeError {
                element: Element::Field(n),
                fault: Fault::BadValue,
            });
        }
        last = n;
        let i = usize::from(n - 1);
        map[i / 64] |= 1u64 << (63 - i % 64);
    }
    let secondary = map[1] != 0;
    if secondary {
        map[0] |= 1 << 63;
    }
    match spec.mti {
        MtiEncoding::Ascii => out.put_slice(&mti.to_ascii()),
        MtiEncoding::Bcd => {
            let d = mti.to_ascii();
            out.put_u8((d[0] - b'0') << 4 | (d[1] - b'0'));
            out.put_u8((d[2] - b'0') << 4 | (d[3] - b'0'));
        }
        MtiEncoding::Ebcdic => {
            for d in mti.to_ascii() {
                out.put_u8(d - b'0' + DIGIT_ZERO);
            }
        }
    }
    put_bitmap(spec, map[0], out);
    if secondary {
        put_bitmap(spec, map[1], out);
    }
    for &(n, value) in fields {
        let err = |fault| EncodeError {
            element: Element::Field(n),
            fault,
        };
        let fs = spec.field(usize::from(n)).ok_or(err(Fault::NotInSpec))?;
        put_field(fs, value, out).map_err(err)?;
    }
    Ok(())
}

#[inline]
fn put_bitmap(spec: &Spec, v: u64, out: &mut BytesMut) {
    match spec.bitmap {
        BitmapEncoding::Binary => out.put_u64(v),
        BitmapEncoding::Hex => {
            out.put_slice(&hex8((v >> 32) as u32));
            out.put_slice(&hex8(v as u32));
        }
        BitmapEncoding::HexEbcdic => {
            for half in [(v >> 32) as u32, v as u32] {
                for c in hex8(half) {
                    // Upper-case hex characters always have an EBCDIC form.
                    out.put_u8(CodePage::Cp037.from_ascii(c).unwrap_or(DIGIT_ZERO));
                }
            }
        }
    }
}

/// The eight upper-case hex characters of `v`, most significant first, computed a word at a
/// time: each nibble is spread into its own byte, then `0`–`9` / `A`–`F` added per byte.
#[inline(always)]
fn hex8(v: u32) -> [u8; 8] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut x = u64::from(v);
    x = (x | x << 16) & 0x0000_ffff_0000_ffff;
    x = (x | x << 8) & 0x00ff_00ff_00ff_00ff;
    x = (x | x << 4) & (0x0f * ONES);
    // Byte k (from the least significant) now holds nibble k of v. Letters get 7 more than
    // digits ('A' - '9' - 1); x + 6 reaches 16 exactly for the nibbles 10..=15.
    let letters = ((x + 0x06 * ONES) >> 4) & ONES;
    (x + 0x30 * ONES + letters * 7).to_be_bytes()
}

#[inline(always)]
fn put_field(fs: &FieldSpec, value: Value<'_>, out: &mut BytesMut) -> Result<(), Fault> {
    match value {
        Value::Wire(f) => {
            if f.spec != fs {
                return Err(Fault::BadValue);
            }
            put_prefix(fs, usize::from(f.units), out)?;
            out.put_slice(f.bytes);
            Ok(())
        }
        Value::Number(v) => {
            if fs.kind != Kind::Numeric {
                return Err(Fault::BadValue);
            }
            let mut buf = [b'0'; 20];
            let mut i = buf.len();
            let mut x = v;
            loop {
                i -= 1;
                buf[i] = b'0' + (x % 10) as u8;
                x /= 10;
                if x == 0 {
                    break;
                }
            }
            let digits = &buf[i..];
            if fs.prefix == Prefix::Fixed {
                let width = usize::from(fs.max);
                if digits.len() > width || width > 64 {
                    return Err(Fault::LengthOverMax);
                }
                let mut padded = [b'0'; 64];
                padded[width - digits.len()..width].copy_from_slice(digits);
                return put_text(fs, &padded[..width], out);
            }
            put_text(fs, digits, out)
        }
        Value::Text(t) => put_text(fs, t, out),
        Value::Raw(bytes) => put_raw(fs, bytes, out),
    }
}

/// Writes wire content bytes of a non-BCD element after the checks the decoder makes, so
/// nothing is written that the decoder would refuse.
fn put_raw(fs: &FieldSpec, bytes: &[u8], out: &mut BytesMut) -> Result<(), Fault> {
    let units = bytes.len();
    if fs.encoding == Encoding::Bcd {
        return Err(Fault::BadValue);
    }
    if units > usize::from(fs.max) {
        return Err(Fault::LengthOverMax);
    }
    if fs.prefix == Prefix::Fixed && units != usize::from(fs.max) {
        return Err(Fault::BadValue);
    }
    super::parse::check_content(fs, bytes, units).map_err(|(_, fault)| fault)?;
    put_prefix(fs, units, out)?;
    out.put_slice(bytes);
    Ok(())
}

#[inline(always)]
fn put_text(fs: &FieldSpec, text: &[u8], out: &mut BytesMut) -> Result<(), Fault> {
    let units = text.len();
    if units > usize::from(fs.max) {
        return Err(Fault::LengthOverMax);
    }
    if fs.prefix == Prefix::Fixed && units != usize::from(fs.max) {
        return Err(Fault::BadValue);
    }
    match (fs.encoding, fs.kind) {
        (Encoding::Ascii | Encoding::Ebcdic(_), Kind::Numeric) if !all_ascii_digits(text) => {
            return Err(Fault::NotNumeric)
        }
        (Encoding::Ascii, Kind::Binary) if !text.iter().all(u8::is_ascii_hexdigit) => {
            return Err(Fault::NotHex)
        }
        // What the decoder accepts in an ASCII track element (fuzzing found `A` written and
        // then refused on decode).
        (Encoding::Ascii | Encoding::Ebcdic(_), Kind::Track)
            if !text
                .iter()
                .all(|&b| b.is_ascii_digit() || b == b'=' || b == b'D') =>
        {
            return Err(Fault::NotNumeric)
        }
        _ if fs.tlv => {
            super::tlv::validate(text).map_err(|_| Fault::BadTlv)?;
        }
        _ => {}
    }
    match fs.encoding {
        Encoding::Bcd => {
            put_prefix(fs, units, out)?;
            put_bcd(fs, text, out)
        }
        Encoding::Ebcdic(page) => {
            if !text.is_ascii() {
                return Err(Fault::BadValue);
            }
            put_prefix(fs, units, out)?;
            for &c in text {
                out.put_u8(page.from_ascii(c).ok_or(Fault::BadValue)?);
            }
            Ok(())
        }
        Encoding::Ascii | Encoding::Binary => {
            put_prefix(fs, units, out)?;
            out.put_slice(text);
            Ok(())
        }
    }
}

/// Packs `text` (digits, or track separators for `z`) two digits a byte.
fn put_bcd(fs: &FieldSpec, text: &[u8], out: &mut BytesMut) -> Result<(), Fault> {
    let units = text.len();
    let track = fs.kind == Kind::Track;
    let nibble = |c: u8| -> Result<u8, Fault> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'=' | b'D' | b'd' if track => Ok(0x0d),
            _ => Err(Fault::NotNumeric),
        }
    };
    let left_pad = units % 2 == 1 && fs.pad == Pad::Left;
    let mut iter = text.iter();
    let mut first = true;
    loop {
        let hi = if first && left_pad {
            0
        } else {
            match iter.next() {
                Some(&c) => nibble(c)?,
                None => break,
            }
        };
        first = false;
        let lo = match iter.next() {
            Some(&c) => nibble(c)?,
            None => 0,
        };
        out.put_u8(hi << 4 | lo);
    }
    Ok(())
}

#[inline(always)]
fn put_prefix(fs: &FieldSpec, units: usize, out: &mut BytesMut) -> Result<(), Fault> {
    let digits = fs.prefix.digits();
    if digits == 0 {
        return Ok(());
    }
    if units > usize::from(fs.max) {
        return Err(Fault::LengthOverMax);
    }
    match fs.length_encoding {
        LengthEncoding::Ascii | LengthEncoding::Ebcdic => {
            let zero = if fs.length_encoding == LengthEncoding::Ascii {
                b'0'
            } else {
                DIGIT_ZERO
            };
            let mut buf = [zero; 4];
            let mut x = units;
            for i in (0..digits).rev() {
                buf[i] = zero + (x % 10) as u8;
                x /= 10;
            }
            out.put_slice(&buf[..digits]);
        }
        LengthEncoding::Bcd => {
            let bytes = digits.div_ceil(2);
            let v = units % 10_000;
            if bytes == 2 {
                out.put_u8(((v / 1000 % 10) << 4 | (v / 100 % 10)) as u8);
            }
            out.put_u8(((v / 10 % 10) << 4 | (v % 10)) as u8);
        }
        LengthEncoding::Binary => {
            if digits <= 2 {
                out.put_u8(units as u8);
            } else {
                out.put_u16(units as u16);
            }
        }
    }
    Ok(())
}
