//! Digits of numeric elements, whether written as ASCII or packed BCD, read without copying.

/// The digits of a numeric or track element, borrowed from the message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digits<'a> {
    bytes: &'a [u8],
    form: Form,
    /// Index of the first digit nibble (1 when a left pad nibble precedes it).
    first_nibble: u8,
    len: u16,
}

/// How the digits of a [`Digits`] are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    Ascii,
    Bcd,
    Ebcdic,
}

impl<'a> Digits<'a> {
    /// ASCII digits.
    pub fn ascii(bytes: &'a [u8]) -> Self {
        Digits {
            bytes,
            form: Form::Ascii,
            first_nibble: 0,
            len: bytes.len() as u16,
        }
    }

    /// EBCDIC digits (`F0`–`F9`; a track separator `=` is `7E`, `D` is `C4`).
    pub fn ebcdic(bytes: &'a [u8]) -> Self {
        Digits {
            bytes,
            form: Form::Ebcdic,
            first_nibble: 0,
            len: bytes.len() as u16,
        }
    }

    /// `len` BCD digits in `bytes`, after a left pad nibble when `left_pad`.
    pub fn bcd(bytes: &'a [u8], len: u16, left_pad: bool) -> Self {
        Digits {
            bytes,
            form: Form::Bcd,
            first_nibble: u8::from(left_pad),
            len,
        }
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are no digits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Digit `i` as an ASCII character (`0`–`9`, `D` for a BCD track separator, `=` as written
    /// in ASCII or EBCDIC). Out of range gives `0`; an EBCDIC byte that is not a digit or a
    /// separator gives `?`.
    #[inline]
    pub fn char_at(&self, i: usize) -> u8 {
        match self.form {
            Form::Ascii => return self.bytes.get(i).copied().unwrap_or(b'0'),
            Form::Ebcdic => {
                return match self.bytes.get(i).copied() {
                    None => b'0',
                    Some(b @ 0xF0..=0xF9) => b'0' + (b - 0xF0),
                    Some(0x7E) => b'=',
                    Some(0xC4) => b'D',
                    Some(_) => b'?',
                }
            }
            Form::Bcd => {}
        }
        let n = i + usize::from(self.first_nibble);
        let byte = self.bytes.get(n / 2).copied().unwrap_or(0);
        let nibble = if n.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        if nibble < 10 {
            b'0' + nibble
        } else {
            b'A' + nibble - 10
        }
    }

    /// The number formed by digits `start..end`, if they are all decimal and at most 19.
    #[inline]
    pub fn number(&self, start: usize, end: usize) -> Option<u64> {
        if end > self.len() || start > end || end - start > 19 {
            return None;
        }
        if self.form == Form::Ascii {
            return self.bytes.get(start..end).and_then(|d| {
                d.iter().try_fold(0u64, |v, &c| {
                    c.is_ascii_digit().then(|| v * 10 + u64::from(c - b'0'))
                })
            });
        }
        let mut v = 0u64;
        for i in start..end {
            let c = self.char_at(i);
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u64::from(c - b'0');
        }
        Some(v)
    }

    /// The whole value as a number.
    pub fn value(&self) -> Option<u64> {
        self.number(0, self.len())
    }

    /// Iterates the digits as ASCII characters.
    pub fn chars(&self) -> impl Iterator<Item = u8> + 'a {
        let d = *self;
        (0..d.len()).map(move |i| d.char_at(i))
    }

    /// Whether the digits equal `other` (ASCII; `=` and `D` are the same separator).
    pub fn eq_ascii(&self, other: &[u8]) -> bool {
        other.len() == self.len()
            && self
                .chars()
                .zip(other.iter())
                .all(|(a, &b)| a == b || (a == b'D' && b == b'=') || (a == b'=' && b == b'D'))
    }

    /// The digits as a `String` (for output; not on the hot path).
    pub fn to_string_lossy(&self) -> String {
        self.chars().map(char::from).collect()
    }
}

/// Whether every nibble in `bytes` that holds a digit is 0–9 (or `D` when `track`) and the pad
/// nibble, if any, is 0. `units` digits are stored; `left_pad` says where an odd count's pad is.
pub fn valid_bcd(bytes: &[u8], units: usize, left_pad: bool, track: bool) -> Result<(), BcdFault> {
    if !track && all_bcd_digits(bytes, units, left_pad) {
        return Ok(());
    }
    let pad = units % 2 == 1;
    let nibbles = bytes.len() * 2;
    for n in 0..nibbles {
        let byte = bytes[n / 2];
        let nibble = if n % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        let is_pad = pad && ((left_pad && n == 0) || (!left_pad && n == nibbles - 1));
        if is_pad {
            if nibble != 0 {
                return Err(BcdFault::Pad(n / 2));
            }
        } else if nibble > 9 && !(track && nibble == 0x0d) {
            return Err(BcdFault::Digit(n / 2));
        }
    }
    Ok(())
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// Eight bytes as a little-endian word (`chunk` is exactly eight bytes long).
#[inline(always)]
fn word(chunk: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    u64::from_le_bytes(w)
}

/// Non-zero when a byte of `x` is not an ASCII digit: each byte must have high nibble 3 and a
/// low nibble that does not carry when 6 is added (no carry crosses a byte: 0x0f + 6 < 0x100).
#[inline(always)]
fn non_digit_bytes(x: u64) -> u64 {
    ((x & (0xf0 * ONES)) ^ (0x30 * ONES)) | (((x & (0x0f * ONES)) + 0x06 * ONES) & (0xf0 * ONES))
}

/// Non-zero when a nibble of `x` is above 9.
#[inline(always)]
fn non_bcd_nibbles(x: u64) -> u64 {
    let lo = x & (0x0f * ONES);
    let hi = (x >> 4) & (0x0f * ONES);
    ((lo + 0x06 * ONES) | (hi + 0x06 * ONES)) & (0xf0 * ONES)
}

/// A byte of 0x80 where the byte of `x` is non-zero, else 0.
#[inline(always)]
fn nonzero_bytes(x: u64) -> u64 {
    (((x & (0x7f * ONES)) + 0x7f * ONES) | x) & (0x80 * ONES)
}

/// Eight hex characters (any case; `chars` is exactly eight bytes) as the number they write,
/// first character most significant; `None` if one is not a hex digit. A word at a time.
#[inline]
pub(crate) fn hex_word(chars: &[u8]) -> Option<u32> {
    let x = word(chars);
    // Per byte: non-zero unless a digit; non-zero unless a letter A-F / a-f (case folded).
    let not_digit = non_digit_bytes(x);
    let folded = x & (0xdf * ONES);
    let low = folded & (0x0f * ONES);
    let not_letter = ((folded & (0xf0 * ONES)) ^ (0x40 * ONES))
        | ((low + 0x09 * ONES) & (0xf0 * ONES))
        | (((low + 0x0f * ONES) & (0x10 * ONES)) ^ (0x10 * ONES));
    if nonzero_bytes(not_digit) & nonzero_bytes(not_letter) != 0 {
        return None;
    }
    // Nibble per byte: the low four bits, plus 9 for letters (bit 0x40 set).
    let nibbles = (x & (0x0f * ONES)) + ((x >> 6) & ONES) * 9;
    // Pack: byte pairs into 16-bit lanes (first << 4 | second), then lanes into 32 bits.
    let pairs = ((nibbles & 0x00ff_00ff_00ff_00ff) << 4) | ((nibbles >> 8) & 0x00ff_00ff_00ff_00ff);
    let quads = (pairs | pairs >> 8) & 0x0000_ffff_0000_ffff;
    let packed = (quads | quads >> 16) as u32;
    Some(packed.swap_bytes())
}

/// Whether every byte is an ASCII digit; eight bytes at a time.
#[inline]
pub fn all_ascii_digits(bytes: &[u8]) -> bool {
    let len = bytes.len();
    if len < 4 {
        return bytes.iter().all(u8::is_ascii_digit);
    }
    if len < 8 {
        // One word of the first four and the last four bytes (they overlap below 8).
        let four = |b: &[u8]| {
            let mut w = [0u8; 8];
            w[..4].copy_from_slice(b);
            u64::from_le_bytes(w)
        };
        return non_digit_bytes(four(&bytes[..4]) | four(&bytes[len - 4..]) << 32) == 0;
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut bad = 0u64;
    for chunk in &mut chunks {
        bad |= non_digit_bytes(word(chunk));
    }
    if !chunks.remainder().is_empty() {
        // The last eight bytes, overlapping the chunks already checked.
        bad |= non_digit_bytes(word(&bytes[bytes.len() - 8..]));
    }
    bad == 0
}

/// The fast form of [`valid_bcd`] without track separators: every nibble 0–9 and the pad
/// nibble, if any, 0. `false` means "look closer", not where the fault is.
#[inline]
fn all_bcd_digits(bytes: &[u8], units: usize, left_pad: bool) -> bool {
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return true;
    };
    if units % 2 == 1 && (if left_pad { first >> 4 } else { last & 0x0f }) != 0 {
        return false;
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut bad = 0u64;
    for chunk in &mut chunks {
        bad |= non_bcd_nibbles(word(chunk));
    }
    for &b in chunks.remainder() {
        bad |= non_bcd_nibbles(u64::from(b));
    }
    bad == 0
}

/// A bad nibble and the byte index it sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BcdFault {
    /// A digit nibble above 9.
    Digit(usize),
    /// A pad nibble other than 0.
    Pad(usize),
}

/// Reads a BCD number from whole bytes (no pad), e.g. a length prefix.
pub fn bcd_number(bytes: &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for &b in bytes {
        let (hi, lo) = (b >> 4, b & 0x0f);
        if hi > 9 || lo > 9 {
            return None;
        }
        v = v * 100 + usize::from(hi) * 10 + usize::from(lo);
    }
    Some(v)
}

/// Reads ASCII decimal digits.
pub fn ascii_number(bytes: &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + usize::from(b - b'0');
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_digits_with_left_pad_read_as_written() {
        let d = Digits::bcd(&[0x02, 0x10], 3, false);
        assert_eq!(d.to_string_lossy(), "021");
        let d = Digits::bcd(&[0x00, 0x01], 3, true);
        assert_eq!(d.to_string_lossy(), "001");
        assert_eq!(d.value(), Some(1));
    }

    #[test]
    fn bad_nibbles_are_found() {
        assert_eq!(
            valid_bcd(&[0x02, 0x1f], 3, false, false),
            Err(BcdFault::Pad(1))
        );
        assert_eq!(
            valid_bcd(&[0x2a, 0x12], 4, true, false),
            Err(BcdFault::Digit(0))
        );
        assert_eq!(valid_bcd(&[0x12, 0xd4], 4, true, true), Ok(()));
        assert_eq!(bcd_number(&[0x1a]), None);
        assert_eq!(bcd_number(&[0x01, 0x23]), Some(123));
    }

    #[test]
    fn word_checks_agree_with_byte_checks() {
        for len in 0..=20 {
            for i in 0..len {
                for b in [0u8, b'/', b'0', b'9', b':', 0x39 + 0x80, 0xb0, b'A', 0xff] {
                    let mut v = vec![b'5'; len];
                    v[i] = b;
                    assert_eq!(
                        all_ascii_digits(&v),
                        v.iter().all(u8::is_ascii_digit),
                        "{v:?}"
                    );
                }
            }
        }
        for units in 0..=20usize {
            let len = units.div_ceil(2);
            for i in 0..len {
                for b in [
                    0x00u8, 0x99, 0x9a, 0xa9, 0x0f, 0xf0, 0x12, 0x10, 0x01, 0xd0, 0xff,
                ] {
                    for left_pad in [false, true] {
                        let mut v = vec![0x00u8; len];
                        v[i] = b;
                        let slow = valid_bcd_slow(&v, units, left_pad, false);
                        assert_eq!(
                            valid_bcd(&v, units, left_pad, false),
                            slow,
                            "{v:02x?} {units}"
                        );
                        assert_eq!(
                            all_bcd_digits(&v, units, left_pad),
                            slow.is_ok(),
                            "{v:02x?} {units}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn hex_words_agree_with_a_table() {
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'A'..=b'F' => Some(c - b'A' + 10),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let slow = |w: &[u8]| {
            w.iter()
                .try_fold(0u32, |v, &c| nibble(c).map(|n| v << 4 | u32::from(n)))
        };
        for base in [b"F238048a", b"00000040", b"9aBcDeF1", b"ffffffff"] {
            for i in 0..8 {
                for c in 0..=255u8 {
                    let mut w = base.to_vec();
                    w[i] = c;
                    assert_eq!(hex_word(&w), slow(&w), "{w:?}");
                }
            }
        }
    }

    /// The nibble-by-nibble check alone, to compare the fast path against.
    fn valid_bcd_slow(
        bytes: &[u8],
        units: usize,
        left_pad: bool,
        track: bool,
    ) -> Result<(), BcdFault> {
        let pad = units % 2 == 1;
        let nibbles = bytes.len() * 2;
        for n in 0..nibbles {
            let byte = bytes[n / 2];
            let nibble = if n % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            let is_pad = pad && ((left_pad && n == 0) || (!left_pad && n == nibbles - 1));
            if is_pad {
                if nibble != 0 {
                    return Err(BcdFault::Pad(n / 2));
                }
            } else if nibble > 9 && !(track && nibble == 0x0d) {
                return Err(BcdFault::Digit(n / 2));
            }
        }
        Ok(())
    }
}
