//! The dialect-neutral request the codec produces and the decision the flow layer renders.

use std::fmt;

use serde::Serialize;

use super::money::CardType;
use super::reason::{response_code, Dialect, Reason, ResponseCode};

/// What a request asks the ledger to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A purchase: records an original and adds it to the merchant's unsettled funds.
    Sale,
    /// A (partial) refund of a sale found through [`Request::original`].
    Refund,
    /// A void (same day, open batch, full amount) of a sale found through [`Request::original`].
    Void,
    /// A reversal of a sale, refund or void (ascii: DE90; cup: terminal + own STAN + DE60.2,
    /// plus DE61 for a void). Idempotent; always approved once rows 1–6 pass.
    Reversal,
    /// A batch settlement (0500) of the terminal's open batch (DOMAIN §9a); see
    /// [`super::Ledger::settle_batch_logged`].
    Settlement,
}

/// How a refund, void or reversal names the transaction it refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalRef<'a> {
    /// `ascii1987` DE90: original MTI, STAN, DE7 (MMDDhhmmss as a number), plus DE37 when present.
    /// The acquirer and forwarding ids of DE90 are not used for matching.
    Iso {
        /// Original MTI as a number (e.g. 200).
        mti: u16,
        /// Original STAN (DE11).
        stan: u32,
        /// Original DE7, MMDDhhmmss as a number.
        transmission: u64,
        /// DE37 of the request (the original's RRN), if present.
        rrn: Option<&'a str>,
    },
    /// `cup_pos` DE61 batch / trace (/ date MMDD for refunds) and DE37.
    Cup {
        /// DE61.1 original batch.
        batch: u32,
        /// DE61.2 original trace (STAN).
        trace: u32,
        /// DE61.3 original date MMDD (refunds).
        date_mmdd: Option<u16>,
        /// DE37 of the request (the original's RRN), if present.
        rrn: Option<&'a str>,
    },
}

/// One request, as the codec and the flow layer hand it to the ledger. Borrowed from the frame.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The dialect of the terminal (sign-on and batch checks apply to `CupPos` only).
    pub dialect: Dialect,
    /// What to do.
    pub op: Operation,
    /// MTI origin digit 1 (0201, 0221, 0401, 0421).
    pub repeat: bool,
    /// DE42.
    pub merchant: &'a str,
    /// DE41.
    pub terminal: &'a str,
    /// DE11.
    pub stan: u32,
    /// DE13, or the MMDD of DE7 (idempotency key part).
    /// 0 when the request carries neither: the merchant-local date of `now` is used.
    pub local_date_mmdd: u16,
    /// MTI class (idempotency key part): 2 for 02xx, 4 for 04xx, 5 for 05xx.
    pub mti_class: u8,
    /// DE7 as MMDDhhmmss; how an ascii sale, refund or void is remembered for DE90 lookups.
    pub transmission: Option<u64>,
    /// DE37. For a **sale** this is the RRN the switch assigns in the response (the flow layer
    /// picks it before calling); for refunds and voids the original's RRN.
    pub rrn: Option<&'a str>,
    /// `cup_pos` DE60.2 batch.
    pub batch: Option<u32>,
    /// DE2 digits. Only a masked form and a keyed hash are kept.
    pub pan: &'a str,
    /// DE4 in minor units.
    pub amount_minor: u64,
    /// DE49 numeric.
    pub currency: u16,
    /// Card scheme; use [`CardType::from_pan`].
    pub card_type: CardType,
    /// The transaction this one refers to (refund, void, reversal).
    pub original: Option<OriginalRef<'a>>,
    /// Hash of the request's identifying fields (excluding the MTI origin digit and DE7), to
    /// tell a retransmission from a different request reusing the key (94).
    pub body_fingerprint: u64,
}

#[cfg(test)]
impl Request<'static> {
    /// A test request of terminal T1 of merchant `M` on local date `mmdd`, card VISA
    /// 4761739001010119; `original` is the STAN of the sale it refers to (DE7 =
    /// `mmdd` 00:00 + its STAN seconds, as for every request here).
    pub(crate) fn test_ascii(
        op: Operation,
        stan: u32,
        amount: u64,
        original: Option<u32>,
        mmdd: u16,
    ) -> Request<'static> {
        const VISA: &str = "4761739001010119";
        let day = u64::from(mmdd) * 1_000_000;
        Request {
            dialect: Dialect::Ascii1987,
            op,
            repeat: false,
            merchant: "M",
            terminal: "T1",
            stan,
            local_date_mmdd: mmdd,
            mti_class: if op == Operation::Reversal { 4 } else { 2 },
            transmission: Some(day + u64::from(stan)),
            rrn: None,
            batch: None,
            pan: VISA,
            amount_minor: amount,
            currency: 840,
            card_type: CardType::from_pan(VISA),
            original: original.map(|stan| OriginalRef::Iso {
                mti: 200,
                stan,
                transmission: day + u64::from(stan),
                rrn: None,
            }),
            body_fingerprint: u64::from(stan) * 7919 + amount,
        }
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("repeat", &self.repeat)
            .field("merchant", &self.merchant)
            .field("terminal", &self.terminal)
            .field("stan", &self.stan)
            .field("pan", &super::money::MaskedPan::new(self.pan))
            .field("amount_minor", &self.amount_minor)
            .field("currency", &self.currency)
            .field("original", &self.original)
            .finish_non_exhaustive()
    }
}

/// The totals of one terminal batch (DOMAIN §9a): ascii1987 DE 76/88 (debits) and 74/86
/// (credits), `cup_pos` DE 48. Debits are approved sales still standing (not voided or
/// reversed), credits approved refunds still standing; amounts in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BatchTotals {
    /// Number of debits (sales).
    pub debit_count: u64,
    /// Amount of debits.
    pub debit_amount: u64,
    /// Number of credits (refunds).
    pub credit_count: u64,
    /// Amount of credits.
    pub credit_amount: u64,
}

/// The numbers behind a decision, for DE54 and `explain`. Absent means "not relevant".
///
/// For the count reasons (`*_COUNT`) `limit`, `used` and `remaining` are counts; otherwise
/// they are minor units of `currency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Figures {
    /// Requested amount (DE4).
    pub amount: u64,
    /// Currency of the amounts (ISO 4217 numeric).
    pub currency: u16,
    /// The limit that decided.
    pub limit: Option<u64>,
    /// How much of it was already used (committed and in flight).
    pub used: Option<u64>,
    /// What is left of it before this request.
    pub remaining: Option<u64>,
    /// The refund window in days.
    pub window_days: Option<u32>,
    /// The original sale's amount.
    pub original_amount: Option<u64>,
    /// DE54 type 90: still refundable on the original, the refundable share of the sale less
    /// refunds approved and in flight (after this request when approved).
    pub original_remaining: Option<u64>,
    /// DE54 type 91: the merchant's refund allowance left in the binding period, the smallest
    /// of what the day and month amount caps and the funds still allow (after this request
    /// when approved).
    pub day_allowance_remaining: Option<u64>,
    /// DE54 type 92: the largest refund of this original, on this card and terminal, that
    /// would be approved now (every row-12 limit and the funds considered); 0 when a rule no
    /// smaller amount can satisfy binds (count, window, permission, state).
    pub would_pass: Option<u64>,
    /// `HOST_DECLINED`: the host's DE39, two ASCII characters packed big-endian, so that a
    /// repeat gets the host's code again.
    pub host_code: Option<u16>,
}

impl Figures {
    /// The optional figures, widened, in the order the journal, snapshots and lease
    /// forwards write them (after `amount` and `currency`).
    pub(crate) fn optionals(&self) -> [Option<u64>; 9] {
        // Destructured so that a new field cannot be left out unnoticed.
        let Figures {
            amount: _,
            currency: _,
            limit,
            used,
            remaining,
            window_days,
            original_amount,
            original_remaining,
            day_allowance_remaining,
            would_pass,
            host_code,
        } = *self;
        [
            limit,
            used,
            remaining,
            window_days.map(u64::from),
            original_amount,
            original_remaining,
            day_allowance_remaining,
            would_pass,
            host_code.map(u64::from),
        ]
    }
}

/// The answer: a dialect-neutral code, the reason (DE44) and the figures (DE54, `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The ISO 8583:1987 code of `reason`; use [`Decision::de39`] for a dialect.
    pub code: ResponseCode,
    /// Why.
    pub reason: Reason,
    /// The figures that decided.
    pub figures: Figures,
}

impl Decision {
    /// A decision for `reason` with `figures`.
    pub fn new(reason: Reason, figures: Figures) -> Decision {
        Decision {
            code: ResponseCode::of(reason),
            reason,
            figures,
        }
    }

    /// A decision without figures.
    pub fn bare(reason: Reason) -> Decision {
        Decision::new(reason, Figures::default())
    }

    /// True when DE39 is `00`.
    pub fn is_approved(&self) -> bool {
        self.code.is_approved()
    }

    /// The upstream host's DE39 of a `HOST_DECLINED`, when it was kept.
    pub fn host_code(&self) -> Option<[u8; 2]> {
        let c = self.figures.host_code?;
        let b = c.to_be_bytes();
        (self.reason == Reason::HOST_DECLINED && b.iter().all(u8::is_ascii_alphanumeric))
            .then_some(b)
    }

    /// DE39 for `dialect` (a host decline's own code is [`Decision::host_code`]).
    pub fn de39(&self, dialect: Dialect) -> &'static str {
        response_code(self.reason, dialect)
    }

    /// DE44 text: the reason code.
    pub fn de44(&self) -> &'static str {
        self.reason.as_str()
    }

    /// DE54 text, or `None` when there is nothing to say (see [`format_de54`]).
    pub fn de54(&self) -> Option<String> {
        format_de54(&self.figures)
    }
}

/// Amount type of "still refundable on the original" in DE54 (private-use range).
pub const DE54_TYPE_ORIGINAL_REMAINING: &str = "90";
/// Amount type of "merchant's refund allowance left in the binding period" in DE54.
pub const DE54_TYPE_DAY_ALLOWANCE: &str = "91";
/// Amount type of "largest refund that would be approved now" in DE54 (private-use range).
pub const DE54_TYPE_WOULD_PASS: &str = "92";

/// Formats DE54 as ISO 8583 additional-amount blocks of 20 characters each:
/// account type `00`, amount type (`90` still refundable on the original, `91` merchant's
/// refund allowance left, `92` the largest refund that would be approved now), currency n3,
/// sign `C`, amount n12. At most three blocks (60 characters, within the 120 of ISO); `None`
/// when no figure is known.
pub fn format_de54(f: &Figures) -> Option<String> {
    let mut out = String::new();
    for (ty, v) in [
        (DE54_TYPE_ORIGINAL_REMAINING, f.original_remaining),
        (DE54_TYPE_DAY_ALLOWANCE, f.day_allowance_remaining),
        (DE54_TYPE_WOULD_PASS, f.would_pass),
    ] {
        if let Some(v) = v {
            out.push_str(&format!(
                "00{ty}{:03}C{:012}",
                f.currency % 1000,
                v.min(999_999_999_999)
            ));
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn de54_is_two_twenty_character_blocks() {
        let f = Figures {
            currency: 840,
            original_remaining: Some(1000),
            day_allowance_remaining: Some(500_000),
            ..Figures::default()
        };
        let s = format_de54(&f).unwrap();
        assert_eq!(s, "0090840C0000000010000091840C000000500000");
        assert_eq!(s.len(), 40);
        assert_eq!(format_de54(&Figures::default()), None);
    }
}
