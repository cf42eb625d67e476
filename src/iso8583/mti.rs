//! The message type indicator.

/// A message type indicator such as `0200`, kept as its four digits' value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mti(pub u16);

impl Mti {
    /// Builds an MTI from four ASCII digits.
    pub fn from_ascii(digits: &[u8]) -> Option<Mti> {
        if digits.len() != 4 {
            return None;
        }
        let mut v = 0u16;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u16::from(d - b'0');
        }
        Some(Mti(v))
    }

    /// The four ASCII digits.
    pub fn to_ascii(self) -> [u8; 4] {
        let v = self.0;
        [
            b'0' + (v / 1000 % 10) as u8,
            b'0' + (v / 100 % 10) as u8,
            b'0' + (v / 10 % 10) as u8,
            b'0' + (v % 10) as u8,
        ]
    }

    /// Message class digit (2 = financial, 4 = reversal, 8 = network management, …).
    pub fn class(self) -> u8 {
        (self.0 / 100 % 10) as u8
    }

    /// Function digit (0 request, 1 request response, 2 advice, 3 advice response, …).
    pub fn function(self) -> u8 {
        (self.0 / 10 % 10) as u8
    }

    /// Origin digit (0 acquirer, 1 acquirer repeat, …).
    pub fn origin(self) -> u8 {
        (self.0 % 10) as u8
    }

    /// Whether this is a repeat (origin digit odd: 0201, 0221, 0401, 0421).
    pub fn is_repeat(self) -> bool {
        self.origin() % 2 == 1
    }

    /// Whether this is a request or advice (function digit even), i.e. something to answer.
    pub fn is_request(self) -> bool {
        self.function().is_multiple_of(2)
    }

    /// The response MTI: function digit + 1, origin cleared (0200/0201→0210, 0420/0421→0430).
    pub fn response(self) -> Mti {
        let base = self.0 - self.0 % 10;
        if self.function().is_multiple_of(2) {
            Mti(base + 10)
        } else {
            Mti(base)
        }
    }
}

impl std::fmt::Debug for Mti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

impl std::fmt::Display for Mti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_mti_sets_function_and_clears_origin() {
        for (req, resp) in [
            (200, 210),
            (201, 210),
            (220, 230),
            (221, 230),
            (400, 410),
            (401, 410),
            (420, 430),
            (421, 430),
            (800, 810),
            (820, 830),
            (500, 510),
            (600, 610),
        ] {
            assert_eq!(Mti(req).response(), Mti(resp), "{req:04}");
        }
    }

    #[test]
    fn mti_digits_round_trip() {
        assert_eq!(Mti::from_ascii(b"0421"), Some(Mti(421)));
        assert_eq!(Mti(421).to_ascii(), *b"0421");
        assert_eq!(Mti::from_ascii(b"02X0"), None);
        assert!(Mti(421).is_repeat());
        assert!(!Mti(420).is_repeat());
    }
}
