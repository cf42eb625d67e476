//! Card numbers and other secrets: what may be shown of them.

use super::bcd::Digits;

/// A card number. `Debug` and `Display` show the first 6 and last 4 digits only.
#[derive(Clone, Copy)]
pub struct Pan<'a> {
    digits: Digits<'a>,
}

impl<'a> Pan<'a> {
    /// Wraps the digits of DE2.
    pub fn new(digits: Digits<'a>) -> Self {
        Pan { digits }
    }

    /// The digits themselves; for hashing and comparison, never for logs.
    pub fn digits(&self) -> Digits<'a> {
        self.digits
    }

    /// The masked form as a fixed buffer: first 6, `******`, last 4 (shorter PANs: all masked).
    pub fn masked(&self) -> MaskedPan {
        let n = self.digits.len().min(19);
        let mut out = MaskedPan {
            bytes: [b'*'; 19],
            len: n as u8,
        };
        if n >= 13 {
            for i in 0..6 {
                out.bytes[i] = self.digits.char_at(i);
            }
            for k in 0..4 {
                out.bytes[12 + k] = self.digits.char_at(n - 4 + k);
            }
            out.len = 16;
        }
        out
    }
}

/// A masked card number held on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MaskedPan {
    bytes: [u8; 19],
    len: u8,
}

impl MaskedPan {
    /// The masked text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("****")
    }
}

impl std::fmt::Display for MaskedPan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for MaskedPan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Pan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.masked().as_str())
    }
}

impl std::fmt::Debug for Pan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pan({})", self.masked().as_str())
    }
}

/// Masks a PAN given as text: first 6, `******`, last 4.
pub fn mask_pan_text(pan: &str) -> String {
    Pan::new(Digits::ascii(pan.as_bytes()))
        .masked()
        .as_str()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pan_is_masked_in_display_and_debug() {
        let p = Pan::new(Digits::ascii(b"4761739001010119"));
        assert_eq!(p.to_string(), "476173******0119");
        assert_eq!(format!("{p:?}"), "Pan(476173******0119)");
        let p = Pan::new(Digits::ascii(b"6222021234567890123"));
        assert_eq!(p.to_string(), "622202******0123");
    }

    #[test]
    fn short_pan_is_fully_masked() {
        assert_eq!(mask_pan_text("123456789012"), "************");
    }
}
