//! A decoded message: every element borrowed from the frame, typed accessors for what the
//! flows need.

use super::bcd::Digits;
use super::mti::Mti;
use super::parse::prefix_units;
use super::sensitive::Pan;
use super::spec::{Encoding, FieldSpec, Kind, Pad, Prefix, Sensitivity, Spec};
use super::tlv::{self, TlvIter};

/// A decoded ISO 8583 message borrowing every element from the frame; no copies, no heap.
#[derive(Clone)]
pub struct Message<'a> {
    pub(crate) spec: &'a Spec,
    pub(crate) bytes: &'a [u8],
    pub(crate) mti: Mti,
    /// Bit `127 - (n - 1)` set when element `n` is present (bit 127 = secondary bitmap).
    pub(crate) present: u128,
    /// Offset of element `n`'s content (after its length prefix), valid when it is present.
    /// Two bytes each, so a whole message stays small to initialise and move: the length
    /// follows from the spec (fixed) or the prefix just before the content (variable).
    pub(crate) starts: [u16; 129],
}

/// One element as it sits in the message. `Debug` shows the bytes of public elements only.
#[derive(Clone, Copy)]
pub struct FieldRef<'a> {
    /// The element's spec.
    pub spec: &'a FieldSpec,
    /// Content bytes as on the wire (after the length prefix).
    pub bytes: &'a [u8],
    /// Content length units (digits for BCD numerics, else bytes).
    pub units: u16,
}

impl<'a> FieldRef<'a> {
    /// The digits of a numeric or track element.
    pub fn digits(&self) -> Option<Digits<'a>> {
        match (self.spec.kind, self.spec.encoding) {
            (Kind::Numeric | Kind::Track, Encoding::Bcd) => {
                let left_pad = self.units % 2 == 1 && self.spec.pad == Pad::Left;
                Some(Digits::bcd(self.bytes, self.units, left_pad))
            }
            (Kind::Numeric | Kind::Track, Encoding::Ascii) => Some(Digits::ascii(self.bytes)),
            (Kind::Numeric | Kind::Track, Encoding::Ebcdic(_)) => Some(Digits::ebcdic(self.bytes)),
            _ => None,
        }
    }

    /// The data objects of a BER-TLV element (the spec says `tlv = "ber"`, as for DE55).
    pub fn tlv(&self) -> Option<TlvIter<'a>> {
        self.spec.tlv.then(|| tlv::objects(self.bytes))
    }

    /// The content as text, when it is ASCII-encoded.
    pub fn text(&self) -> Option<&'a str> {
        if self.spec.encoding != Encoding::Ascii {
            return None;
        }
        std::str::from_utf8(self.bytes).ok()
    }
}

/// DE3 processing code: transaction type, from account, to account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessingCode {
    /// Transaction type: 00 purchase, 02 void, 20 refund.
    pub tx_type: u8,
    /// From-account type.
    pub from_account: u8,
    /// To-account type.
    pub to_account: u8,
}

/// A money amount in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(pub u64);

impl Amount {
    /// Sum, or `None` on overflow.
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    /// Difference, or `None` when it would go below zero.
    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }
}

/// DE90 original data elements (ascii1987 refunds, voids and reversals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalData {
    /// 90.1 original MTI.
    pub mti: Mti,
    /// 90.2 original STAN.
    pub stan: u32,
    /// 90.3 original DE7, MMDDhhmmss.
    pub transmission: u64,
    /// 90.4 original acquiring institution id.
    pub acquirer: u64,
    /// 90.5 original forwarding institution id.
    pub forwarding: u64,
}

/// DE60 of `cup_pos`: 60.1 message type, 60.2 batch, 60.3 network management code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cup60 {
    /// 60.1: 22 sale, 23 void, 25 refund, 00 network management.
    pub message_type: u8,
    /// 60.2 batch number.
    pub batch: u32,
    /// 60.3 network management code (000, 001 sign-on, 301 echo), when present.
    pub network_code: Option<u16>,
}

/// DE61 of `cup_pos`: the original transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cup61 {
    /// 61.1 original batch.
    pub batch: u32,
    /// 61.2 original trace (STAN).
    pub trace: u32,
    /// 61.3 original date MMDD (refunds).
    pub date_mmdd: Option<u16>,
}

impl<'a> Message<'a> {
    /// The dialect this message was decoded with.
    pub fn spec(&self) -> &'a Spec {
        self.spec
    }

    /// The message bytes (MTI onward).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The message type indicator.
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Whether element `n` (1..=128) is present.
    #[inline]
    pub fn has(&self, n: usize) -> bool {
        (1..=128).contains(&n) && self.present & (1u128 << (128 - n)) != 0
    }

    /// Present element numbers, ascending (2..=128).
    pub fn present(&self) -> impl Iterator<Item = u8> + '_ {
        (2..=128u8).filter(|&n| self.has(usize::from(n)))
    }

    /// Element `n` as it sits in the message.
    #[inline]
    pub fn field(&self, n: usize) -> Option<FieldRef<'a>> {
        if !self.has(n) || n < 2 {
            return None;
        }
        let spec = self.spec.field(n)?;
        let start = usize::from(self.starts[n]);
        let units = match spec.prefix {
            Prefix::Fixed => usize::from(spec.max),
            prefix => {
                let prefix_start = start.checked_sub(spec.length_encoding.prefix_bytes(prefix))?;
                prefix_units(spec, self.bytes.get(prefix_start..start)?)?
            }
        };
        let bytes = self.bytes.get(start..start + spec.content_bytes(units))?;
        Some(FieldRef {
            spec,
            bytes,
            units: units as u16,
        })
    }

    /// Content bytes of element `n` as on the wire.
    pub fn field_bytes(&self, n: usize) -> Option<&'a [u8]> {
        self.field(n).map(|f| f.bytes)
    }

    /// The text of an ASCII element.
    pub fn text(&self, n: usize) -> Option<&'a str> {
        self.field(n).and_then(|f| f.text())
    }

    /// The digits of a numeric element.
    pub fn digits(&self, n: usize) -> Option<Digits<'a>> {
        self.field(n).and_then(|f| f.digits())
    }

    /// The value of a numeric element.
    pub fn number(&self, n: usize) -> Option<u64> {
        self.digits(n).and_then(|d| d.value())
    }

    /// DE2, the card number (masked in `Debug` and `Display`).
    pub fn pan(&self) -> Option<Pan<'a>> {
        self.digits(2).map(Pan::new)
    }

    /// DE3.
    pub fn processing_code(&self) -> Option<ProcessingCode> {
        let d = self.digits(3)?;
        Some(ProcessingCode {
            tx_type: d.number(0, 2)? as u8,
            from_account: d.number(2, 4)? as u8,
            to_account: d.number(4, 6)? as u8,
        })
    }

    /// DE4, the transaction amount in minor units.
    pub fn amount(&self) -> Option<Amount> {
        self.number(4).map(Amount)
    }

    /// DE7, transmission date and time MMDDhhmmss.
    pub fn transmission(&self) -> Option<u64> {
        self.number(7)
    }

    /// DE11, the system trace audit number.
    pub fn stan(&self) -> Option<u32> {
        self.number(11).map(|v| v as u32)
    }

    /// DE13, local date MMDD.
    pub fn local_date(&self) -> Option<u16> {
        self.number(13).map(|v| v as u16)
    }

    /// DE25, POS condition code.
    pub fn pos_condition(&self) -> Option<u8> {
        self.number(25).map(|v| v as u8)
    }

    /// DE37, retrieval reference number.
    pub fn rrn(&self) -> Option<&'a str> {
        self.text(37)
    }

    /// DE38, authorisation code.
    pub fn auth_code(&self) -> Option<&'a str> {
        self.text(38)
    }

    /// DE39, response code.
    pub fn response_code(&self) -> Option<&'a str> {
        self.text(39)
    }

    /// DE41, terminal id.
    pub fn terminal(&self) -> Option<&'a str> {
        self.text(41)
    }

    /// DE42, merchant id.
    pub fn merchant(&self) -> Option<&'a str> {
        self.text(42)
    }

    /// DE44, additional response data (refundgate's reason code).
    pub fn reason(&self) -> Option<&'a str> {
        self.text(44)
    }

    /// DE49, currency code (numeric).
    pub fn currency(&self) -> Option<u16> {
        let f = self.field(49)?;
        match f.digits() {
            Some(d) => d.value().map(|v| v as u16),
            None => super::bcd::ascii_number(f.bytes).map(|v| v as u16),
        }
    }

    /// DE70, network management information code.
    pub fn network_code(&self) -> Option<u16> {
        self.number(70).map(|v| v as u16)
    }

    /// DE90, original data elements.
    pub fn original_data(&self) -> Option<OriginalData> {
        let d = self.digits(90)?;
        if d.len() != 42 {
            return None;
        }
        Some(OriginalData {
            mti: Mti(d.number(0, 4)? as u16),
            stan: d.number(4, 10)? as u32,
            transmission: d.number(10, 20)?,
            acquirer: d.number(20, 31)?,
            forwarding: d.number(31, 42)?,
        })
    }

    /// DE60 sub-fields (`cup_pos`).
    pub fn cup60(&self) -> Option<Cup60> {
        let d = self.digits(60)?;
        Some(Cup60 {
            message_type: d.number(0, 2)? as u8,
            batch: d.number(2, 8)? as u32,
            network_code: d.number(8, 11).map(|v| v as u16),
        })
    }

    /// DE61 sub-fields (`cup_pos`).
    pub fn cup61(&self) -> Option<Cup61> {
        let d = self.digits(61)?;
        Some(Cup61 {
            batch: d.number(0, 6)? as u32,
            trace: d.number(6, 12)? as u32,
            date_mmdd: d.number(12, 16).map(|v| v as u16),
        })
    }

    /// The MAC element (DE128 when a secondary bitmap is present and DE128 is, else DE64)
    /// and the MAC input block: the bytes from the MTI up to the MAC element.
    pub fn mac(&self) -> Option<(&'a [u8], &'a [u8])> {
        let n = if self.has(128) { 128 } else { 64 };
        let f = self.field(n)?;
        let prefix = f.spec.length_encoding.prefix_bytes(f.spec.prefix);
        let mab = self
            .bytes
            .get(..usize::from(self.starts[n]).checked_sub(prefix)?)?;
        Some((mab, f.bytes))
    }
}

impl std::fmt::Debug for FieldRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("FieldRef");
        d.field("spec", self.spec).field("units", &self.units);
        if self.spec.sensitivity == Sensitivity::Public {
            d.field("bytes", &self.bytes);
        } else {
            d.field("bytes", &"<masked>");
        }
        d.finish()
    }
}

impl std::fmt::Debug for Message<'_> {
    /// Lists the MTI and present elements; sensitive contents never appear.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present: Vec<u8> = self.present().collect();
        f.debug_struct("Message")
            .field("dialect", &self.spec.name())
            .field("mti", &self.mti)
            .field("fields", &present)
            .finish()
    }
}
