//! The encoder: builds a message from typed or raw element values into a reusable `BytesMut`.
//! Nothing here allocates once the buffer has grown to the message size.

use bytes::BytesMut;

use super::bcd::all_ascii_digits;
use super::ebcdic::{CodePage, DIGIT_ZERO};
use super::error::{Element, EncodeError, Fault};
use super::message::{FieldRef, Message};
use super::mti::Mti;
use super::spec::{BitmapEncoding, Content, LengthEncoding, MtiEncoding, Spec, Step};

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
    #[inline(always)]
    pub fn set(&mut self, n: u8, value: Value<'a>) -> Result<(), EncodeError> {
        if self.len == N {
            let i = self.position_when_full(n)?;
            self.items[i].1 = value;
            return Ok(());
        }
        // Elements usually come in ascending order: the value is appended as it comes and
        // moved only when it is not. The value never goes to an out-of-line call: that made
        // the compiler build every value in a stack slot (an 8-byte tag and a 16-byte payload
        // store) and copy it in 16-byte loads straddling those stores, which the CPU cannot
        // forward (about 13 cycles per call, a third of a refund's encode in `perf`).
        let ascending = self.len == 0 || self.items[self.len - 1].0 < n;
        self.items[self.len] = (n, value);
        self.len += 1;
        if ascending && (2..=128).contains(&n) {
            return Ok(());
        }
        self.place_last()
    }

    /// Puts the element just appended where it belongs: dropped when its number is not
    /// allowed, replacing an earlier value of the same element, or moved into order.
    #[inline(never)]
    fn place_last(&mut self) -> Result<(), EncodeError> {
        let last = self.len - 1;
        let n = self.items[last].0;
        if !(2..=128).contains(&n) {
            self.len = last;
            return Err(EncodeError {
                element: Element::Field(n),
                fault: Fault::BadValue,
            });
        }
        let pos = self.items[..last].partition_point(|(k, _)| *k < n);
        if pos < last && self.items[pos].0 == n {
            self.items[pos].1 = self.items[last].1;
            self.len = last;
        } else {
            self.items[pos..self.len].rotate_right(1);
        }
        Ok(())
    }

    /// Where element `n` sits in a full list, in which only an element already present may
    /// be set; the error for any other.
    #[cold]
    #[inline(never)]
    fn position_when_full(&self, n: u8) -> Result<usize, EncodeError> {
        match self.items.iter().position(|(k, _)| *k == n) {
            Some(i) if (2..=128).contains(&n) => Ok(i),
            _ => Err(EncodeError {
                element: Element::Field(n),
                fault: Fault::BadValue,
            }),
        }
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

/// Encodes a message: MTI, bitmap(s), then `fields` (ascending, unique) appended to `out`.
///
/// Length first: one pass checks every value against the dialect's plan and adds up the
/// message length, then `out` grows once and a second pass writes into that space. On an error
/// `out` is left as it was.
pub fn encode(
    spec: &Spec,
    mti: Mti,
    fields: &[(u8, Value<'_>)],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    // Element n at bit 128 - n: element 1 (the secondary bitmap bit) is the top bit.
    let mut map = 0u128;
    let mut last = 1u8;
    let mut body = 0usize;
    for &(n, value) in fields {
        let err = |fault| EncodeError {
            element: Element::Field(n),
            fault,
        };
        if n <= last || n > 128 {
            return Err(err(Fault::BadValue));
        }
        last = n;
        map |= 1u128 << (128 - u32::from(n));
        body += measure(spec, n, value).map_err(err)?;
    }
    let secondary = map as u64 != 0;
    if secondary {
        map |= 1 << 127;
    }
    let mti_bytes = match spec.mti {
        MtiEncoding::Bcd => 2,
        MtiEncoding::Ascii | MtiEncoding::Ebcdic => 4,
    };
    let bitmap_bytes = match spec.bitmap {
        BitmapEncoding::Binary => 8,
        BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => 16,
    };
    let head = mti_bytes + bitmap_bytes * (1 + usize::from(secondary));
    let start = out.len();
    out.resize(start + head + body, 0);
    let buf = &mut out[start..];
    let (head_buf, mut rest) = buf.split_at_mut(head);
    put_mti(spec.mti, mti, &mut head_buf[..mti_bytes]);
    put_bitmap(
        spec.bitmap,
        (map >> 64) as u64,
        &mut head_buf[mti_bytes..mti_bytes + bitmap_bytes],
    );
    if secondary {
        put_bitmap(
            spec.bitmap,
            map as u64,
            &mut head_buf[mti_bytes + bitmap_bytes..],
        );
    }
    for &(n, value) in fields {
        // `measure` accepted every value, so writing cannot fail unless the two passes
        // disagree; that is answered as a bad value rather than a panic.
        let written = write(spec.step(usize::from(n)), value, rest);
        match written {
            Some(len) => rest = &mut rest[len..],
            None => {
                out.truncate(start);
                return Err(EncodeError {
                    element: Element::Field(n),
                    fault: Fault::BadValue,
                });
            }
        }
    }
    Ok(())
}

/// The bytes element `n` takes on the wire with `value` (length prefix included), after every
/// check the decoder makes, so nothing is written that the decoder would refuse.
#[inline(always)]
fn measure(spec: &Spec, n: u8, value: Value<'_>) -> Result<usize, Fault> {
    let step = spec.step(usize::from(n));
    if step.content == Content::Undefined {
        return Err(Fault::NotInSpec);
    }
    let prefix = usize::from(step.prefix_bytes);
    let max = usize::from(step.max);
    let fixed = step.prefix_bytes == 0;
    match value {
        Value::Wire(f) => {
            let same = std::ptr::eq(f.spec, spec.field(usize::from(n)).ok_or(Fault::NotInSpec)?)
                || Some(f.spec) == spec.field(usize::from(n));
            if !same {
                return Err(Fault::BadValue);
            }
            if !fixed && usize::from(f.units) > max {
                return Err(Fault::LengthOverMax);
            }
            Ok(prefix + f.bytes.len())
        }
        Value::Number(v) => {
            if !step.numeric {
                return Err(Fault::BadValue);
            }
            let digits = decimal_digits(v);
            let units = if fixed {
                if digits > max || max > NUMBER_WIDTH_MAX {
                    return Err(Fault::LengthOverMax);
                }
                max
            } else if digits > max {
                return Err(Fault::LengthOverMax);
            } else {
                digits
            };
            Ok(prefix + step.content_bytes(units))
        }
        Value::Text(text) => {
            let units = text.len();
            if units > max {
                return Err(Fault::LengthOverMax);
            }
            if fixed && units != max {
                return Err(Fault::BadValue);
            }
            check_text(step.content, text)?;
            Ok(prefix + step.content_bytes(units))
        }
        Value::Raw(bytes) => {
            let units = bytes.len();
            if matches!(step.content, Content::BcdDigits | Content::BcdTrack) {
                return Err(Fault::BadValue);
            }
            if units > max {
                return Err(Fault::LengthOverMax);
            }
            if fixed && units != max {
                return Err(Fault::BadValue);
            }
            let fs = spec.field(usize::from(n)).ok_or(Fault::NotInSpec)?;
            super::parse::check_content(fs, bytes, units).map_err(|(_, fault)| fault)?;
            Ok(prefix + units)
        }
    }
}

/// Widest fixed numeric element a [`Value::Number`] may fill.
const NUMBER_WIDTH_MAX: usize = 64;

/// Number of decimal digits of `v` (1 for 0).
#[inline(always)]
fn decimal_digits(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Whether `text` is a valid text form of an element with `content`.
#[inline(always)]
fn check_text(content: Content, text: &[u8]) -> Result<(), Fault> {
    let track = |b: &u8| b.is_ascii_digit() || *b == b'=' || *b == b'D';
    let ok = match content {
        Content::AsciiDigits | Content::EbcdicDigits(_) | Content::BcdDigits => {
            all_ascii_digits(text)
        }
        // What the decoder accepts in a track element (fuzzing found `A` written and then
        // refused on decode); BCD also takes `d`, packed as the same separator nibble.
        Content::AsciiTrack | Content::EbcdicTrack(_) => text.iter().all(track),
        Content::BcdTrack => text.iter().all(|b| track(b) || *b == b'd'),
        Content::AsciiHex => {
            if !text.iter().all(u8::is_ascii_hexdigit) {
                return Err(Fault::NotHex);
            }
            true
        }
        Content::Tlv => {
            super::tlv::validate(text).map_err(|_| Fault::BadTlv)?;
            true
        }
        Content::EbcdicText(page) => {
            if !text.iter().all(|&c| page.from_ascii(c).is_some()) {
                return Err(Fault::BadValue);
            }
            true
        }
        Content::Plain | Content::Undefined => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Fault::NotNumeric)
    }
}

/// Writes one element, measured and checked by [`measure`], at the start of `dst`; returns
/// the bytes written, `None` if `dst` is too short.
#[inline(always)]
fn write(step: &Step, value: Value<'_>, dst: &mut [u8]) -> Option<usize> {
    let prefix = usize::from(step.prefix_bytes);
    match value {
        Value::Wire(f) => put_units(step, usize::from(f.units), f.bytes, dst),
        Value::Raw(bytes) => put_units(step, bytes.len(), bytes, dst),
        Value::Text(text) => put_text(step, text, dst),
        Value::Number(v) => {
            let units = if prefix == 0 {
                usize::from(step.max)
            } else {
                decimal_digits(v)
            };
            if step.content == Content::AsciiDigits {
                // The common case: digits straight into place, right to left.
                put_prefix(step, units, dst)?;
                put_decimal(v, dst.get_mut(prefix..prefix + units)?);
                return Some(prefix + units);
            }
            let mut digits = [b'0'; NUMBER_WIDTH_MAX];
            let digits = digits.get_mut(..units)?;
            put_decimal(v, digits);
            put_text(step, digits, dst)
        }
    }
}

/// Writes `v` right-justified in `dst`, zero-filled on the left (`dst` holds every digit).
#[inline(always)]
fn put_decimal(mut v: u64, dst: &mut [u8]) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Prefix for `units`, then `bytes` as they are.
#[inline(always)]
fn put_units(step: &Step, units: usize, bytes: &[u8], dst: &mut [u8]) -> Option<usize> {
    let prefix = usize::from(step.prefix_bytes);
    put_prefix(step, units, dst)?;
    copy_short(dst.get_mut(prefix..prefix + bytes.len())?, bytes);
    Some(prefix + bytes.len())
}

/// `dst.copy_from_slice(src)` (same lengths), without a `memcpy` call for the short contents
/// most elements have: two overlapping fixed-size moves cover 4..=16 bytes.
#[inline(always)]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    let len = src.len();
    if len != dst.len() {
        return;
    }
    if (8..=16).contains(&len) {
        dst[..8].copy_from_slice(&src[..8]);
        dst[len - 8..].copy_from_slice(&src[len - 8..]);
    } else if (4..8).contains(&len) {
        dst[..4].copy_from_slice(&src[..4]);
        dst[len - 4..].copy_from_slice(&src[len - 4..]);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Prefix, then the content of a checked text form in the element's encoding.
#[inline(always)]
fn put_text(step: &Step, text: &[u8], dst: &mut [u8]) -> Option<usize> {
    let prefix = usize::from(step.prefix_bytes);
    match step.content {
        Content::BcdDigits | Content::BcdTrack => {
            put_prefix(step, text.len(), dst)?;
            let bytes = step.content_bytes(text.len());
            put_bcd(text, step.left_pad, dst.get_mut(prefix..prefix + bytes)?);
            Some(prefix + bytes)
        }
        Content::EbcdicDigits(page) | Content::EbcdicTrack(page) | Content::EbcdicText(page) => {
            put_prefix(step, text.len(), dst)?;
            let content = dst.get_mut(prefix..prefix + text.len())?;
            for (d, &c) in content.iter_mut().zip(text) {
                *d = page.from_ascii(c)?;
            }
            Some(prefix + text.len())
        }
        _ => put_units(step, text.len(), text, dst),
    }
}

/// Packs checked digits (or track separators) two a byte into `dst` (exactly their bytes).
fn put_bcd(text: &[u8], left_pad: bool, dst: &mut [u8]) {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        _ => 0x0d,
    };
    let pad = text.len() % 2 == 1;
    // The nibbles in order, with the pad nibble in front for a left-padded odd count.
    let lead = usize::from(pad && left_pad);
    let at = |i: usize| -> u8 {
        match i.checked_sub(lead).and_then(|i| text.get(i)) {
            Some(&c) => nibble(c),
            None => 0,
        }
    };
    for (k, d) in dst.iter_mut().enumerate() {
        *d = at(2 * k) << 4 | at(2 * k + 1);
    }
}

/// Writes the length prefix for `units` at the start of `dst` (nothing for a fixed element).
#[inline(always)]
fn put_prefix(step: &Step, units: usize, dst: &mut [u8]) -> Option<()> {
    let digits = usize::from(step.prefix_digits);
    if digits == 0 {
        return Some(());
    }
    let out = dst.get_mut(..usize::from(step.prefix_bytes))?;
    match step.length {
        LengthEncoding::Ascii | LengthEncoding::Ebcdic => {
            let zero = if step.length == LengthEncoding::Ascii {
                b'0'
            } else {
                DIGIT_ZERO
            };
            let mut x = units;
            for d in out.iter_mut().rev() {
                *d = zero + (x % 10) as u8;
                x /= 10;
            }
        }
        LengthEncoding::Bcd => {
            let v = units % 10_000;
            let low = ((v / 10 % 10) << 4 | (v % 10)) as u8;
            match out {
                [hi, lo] => {
                    *hi = ((v / 1000 % 10) << 4 | (v / 100 % 10)) as u8;
                    *lo = low;
                }
                [lo] => *lo = low,
                _ => return None,
            }
        }
        LengthEncoding::Binary => match out {
            [hi, lo] => [*hi, *lo] = (units as u16).to_be_bytes(),
            [lo] => *lo = units as u8,
            _ => return None,
        },
    }
    Some(())
}

/// Writes the MTI into `dst` (its exact size for `encoding`).
#[inline(always)]
fn put_mti(encoding: MtiEncoding, mti: Mti, dst: &mut [u8]) {
    let d = mti.to_ascii();
    match encoding {
        MtiEncoding::Ascii => dst.copy_from_slice(&d),
        MtiEncoding::Bcd => dst.copy_from_slice(&[
            (d[0] - b'0') << 4 | (d[1] - b'0'),
            (d[2] - b'0') << 4 | (d[3] - b'0'),
        ]),
        MtiEncoding::Ebcdic => {
            for (o, c) in dst.iter_mut().zip(d) {
                *o = c - b'0' + DIGIT_ZERO;
            }
        }
    }
}

/// Writes one bitmap into `dst` (its exact size for `encoding`).
#[inline(always)]
fn put_bitmap(encoding: BitmapEncoding, v: u64, dst: &mut [u8]) {
    match encoding {
        BitmapEncoding::Binary => dst.copy_from_slice(&v.to_be_bytes()),
        BitmapEncoding::Hex => {
            dst[..8].copy_from_slice(&hex8((v >> 32) as u32));
            dst[8..].copy_from_slice(&hex8(v as u32));
        }
        BitmapEncoding::HexEbcdic => {
            let mut chars = [0u8; 16];
            chars[..8].copy_from_slice(&hex8((v >> 32) as u32));
            chars[8..].copy_from_slice(&hex8(v as u32));
            for (o, c) in dst.iter_mut().zip(chars) {
                // Upper-case hex characters always have an EBCDIC form.
                *o = CodePage::Cp037.from_ascii(c).unwrap_or(DIGIT_ZERO);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers<const N: usize>(list: &FieldList<'_, N>) -> Vec<u8> {
        list.as_slice().iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn field_list_keeps_elements_ascending_unique_and_bounded() {
        let mut list: FieldList<'_, 4> = FieldList::new();
        list.set(11, Value::Number(1)).unwrap();
        list.set(3, Value::Text(b"200000")).unwrap();
        list.set(41, Value::Text(b"TERM0001")).unwrap();
        list.set(4, Value::Number(5)).unwrap();
        assert_eq!(numbers(&list), [3, 4, 11, 41]);
        // A repeat replaces, also out of order and on a full list.
        list.set(11, Value::Number(2)).unwrap();
        list.set(3, Value::Text(b"000000")).unwrap();
        assert_eq!(numbers(&list), [3, 4, 11, 41]);
        assert!(matches!(list.as_slice()[2].1, Value::Number(2)));
        assert!(matches!(list.as_slice()[0].1, Value::Text(b"000000")));
        // Full: a new element is refused and nothing changes.
        assert!(list.set(42, Value::Text(b"M")).is_err());
        assert!(list.set(2, Value::Text(b"4")).is_err());
        assert_eq!(numbers(&list), [3, 4, 11, 41]);
        // Numbers outside 2..=128 are refused whether they come in order or not.
        list.remove(41);
        assert!(list.set(129, Value::Number(0)).is_err());
        assert!(list.set(1, Value::Number(0)).is_err());
        assert!(list.set(0, Value::Number(0)).is_err());
        assert_eq!(numbers(&list), [3, 4, 11]);
        list.set(7, Value::Number(0)).unwrap();
        assert_eq!(numbers(&list), [3, 4, 7, 11]);
    }

    #[test]
    fn a_failed_encode_leaves_the_buffer_as_it_was() {
        let spec = &*super::super::ASCII1987;
        let mut out = BytesMut::from(&b"head"[..]);
        let fields = [
            (3u8, Value::Text(b"200000")),
            (4, Value::Text(b"00000000150X")),
        ];
        let e = encode(spec, Mti(200), &fields, &mut out).unwrap_err();
        assert_eq!(e.element, Element::Field(4));
        assert_eq!(e.fault, Fault::NotNumeric);
        assert_eq!(&out[..], b"head");
        encode(spec, Mti(200), &fields[..1], &mut out).unwrap();
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..8], b"0200");
    }
}
