//! The durability seam: every committed change is a [`LedgerEvent`] that the journal stores
//! and [`super::Ledger::apply`] replays to the same state.
//!
//! Encoding (version [`EVENT_VERSION`]): one version byte, one tag byte, then the fields in
//! order; integers are LEB128 varints (signed ones zig-zag), identifiers are a length byte and
//! their ASCII bytes. A PAN is never stored in clear: only the masked form (first 6 + last 4,
//! packed) and the keyed 64-bit hash.

use super::decision::{Decision, Figures, Operation};
use super::merchants::{Policy, SameDayRefund};
use super::money::{CardType, MaskedPan, UtcOffset};
use super::reason::Reason;
use crate::clock::UnixSeconds;

/// Version byte written first in every event. 2 added DE54 type 92 (`would_pass`) to the
/// decisions a `Declined` event carries; 3 added the declined request's summary
/// ([`RequestSummary`], for policy what-if replay). Version 1 and 2 events still decode
/// (without a summary).
pub const EVENT_VERSION: u8 = 3;

/// An ASCII identifier of at most `N` bytes, stored inline (DE42: 15, DE41: 8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortId<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

/// A merchant id (DE42).
pub type MerchantId = ShortId<15>;
/// A terminal id (DE41).
pub type TerminalId = ShortId<8>;

impl<const N: usize> ShortId<N> {
    /// `None` when `s` is longer than `N` bytes or not ASCII.
    pub fn new(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() > N || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; N];
        bytes[..b.len()].copy_from_slice(b);
        Some(ShortId {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The identifier.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl<const N: usize> Default for ShortId<N> {
    fn default() -> Self {
        ShortId {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> std::fmt::Debug for ShortId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// How a transaction is found again (see the request's `transmission` / `batch`):
/// terminal, STAN and DE7 (ascii) or batch with the top bit set (cup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnKey {
    /// DE41.
    pub terminal: TerminalId,
    /// DE11.
    pub stan: u32,
    /// DE7 MMDDhhmmss, or DE60.2 batch | 2^31.
    pub tag: u32,
}

/// The idempotency key of the request an event answers, and its body fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerKey {
    /// DE41.
    pub terminal: TerminalId,
    /// DE11.
    pub stan: u32,
    /// Local date MMDD.
    pub mmdd: u16,
    /// MTI class.
    pub class: u8,
    /// Body fingerprint.
    pub fingerprint: u64,
}

/// A transaction as remembered (sale, refund or void).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnRecord {
    /// Its own key.
    pub key: TxnKey,
    /// RRN packed by `rrn_key` (sales only).
    pub rrn: Option<u64>,
    /// Masked PAN.
    pub pan: MaskedPan,
    /// Keyed PAN hash.
    pub pan_hash: u64,
    /// Card scheme.
    pub card: CardType,
    /// Amount in minor units.
    pub amount: u64,
    /// `cup_pos` batch (0 for ascii).
    pub batch: u32,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// An approved sale.
    Sale {
        /// The request answered.
        answer: AnswerKey,
        /// The sale.
        txn: TxnRecord,
    },
    /// An approved refund of `original`.
    Refund {
        /// The request answered.
        answer: AnswerKey,
        /// The refund itself.
        txn: TxnRecord,
        /// The sale refunded.
        original: TxnKey,
    },
    /// An approved void of `original`.
    Void {
        /// The request answered.
        answer: AnswerKey,
        /// The void itself.
        txn: TxnRecord,
        /// The sale voided.
        original: TxnKey,
    },
    /// A reversal of the transaction with key `target` (idempotent).
    Reversal {
        /// The request answered.
        answer: AnswerKey,
        /// The reversed transaction's key.
        target: TxnKey,
    },
    /// A request declined after its reservation (e.g. upstream); a declined sale is kept
    /// so that a refund of it is answered 12.
    Declined {
        /// The request answered.
        answer: AnswerKey,
        /// The decision given.
        decision: Decision,
        /// The declined sale, if it was one.
        sale: Option<TxnRecord>,
        /// What the request asked, so that replay can decide it again under another policy
        /// (`None` in events written before version 3). Boxed: declines are the rarer path
        /// and the hot-path bodies stay small.
        request: Option<Box<RequestSummary>>,
    },
    /// A `cup_pos` terminal signed on.
    SignOn {
        /// The terminal.
        terminal: TerminalId,
    },
    /// A cut-over started: requests get 90 until the settlement.
    CutoverBegin,
    /// The merchant topped up its prefunded reserve.
    TopUp {
        /// Added to the reserve.
        amount: u64,
    },
    /// A terminal's settlement of its open batch (DOMAIN §9a): `payout` of the batch's net
    /// sales paid out, or `reserve_used` taken from the reserve when its refunds exceeded its
    /// sales; the terminal moves to the next batch.
    SettleBatch {
        /// The 0500 answered (its terminal is the one settled).
        answer: AnswerKey,
        /// Paid out.
        payout: u64,
        /// Taken from the reserve.
        reserve_used: u64,
    },
    /// The merchant's scheduled cut-over of local day `day` ran (DOMAIN §9a): a settlement of
    /// the whole merchant, as [`EventBody::Settle`], that runs once a day.
    ScheduledCutover {
        /// Merchant-local day number (days since 1970-01-01).
        day: i32,
        /// Paid out.
        payout: u64,
        /// Taken from the reserve.
        reserve_used: u64,
    },
    /// A settlement of the whole merchant: `payout` of net unsettled sales paid out, `reserve_used` taken from the
    /// reserve when refunds exceeded sales; batches move on.
    Settle {
        /// Paid out.
        payout: u64,
        /// Taken from the reserve.
        reserve_used: u64,
    },
    /// An operator's change through the admin API (issue 22), with who asked and the request
    /// id a repeat is recognised by. Boxed: it is rare and larger than the hot-path bodies.
    Admin(Box<AdminChange>),
    /// The merchant's policy from here on (issue 22, hot reload): journaled at the first
    /// start and whenever a reload changes it, so that replay applies every later event
    /// under the policy that was in force when it was decided.
    PolicySet(Box<PolicyChange>),
}

/// A declined request as far as deciding it again needs (issue 22, policy what-if replay):
/// the operation, its own key and amount, the card (masked PAN, keyed hash, scheme, never the
/// PAN in clear) and the original it named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSummary {
    /// Sale, refund, void, reversal or settlement.
    pub op: Operation,
    /// `cup_pos` (sign-on and batch checks apply) rather than `ascii1987`.
    pub cup: bool,
    /// The request as a transaction: its own key, the sale's RRN, the card and the amount.
    pub txn: TxnRecord,
    /// DE49 numeric.
    pub currency: u16,
    /// The transaction it names (refund, void, reversal).
    pub original: Option<OriginalSummary>,
}

/// How a declined request named its original: as it came (DE90 or DE61, RRN packed by
/// `rrn_key`), or the key the ledger had already found (a decline after the reservation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalSummary {
    /// `ascii1987` DE90 (+ DE37).
    Iso {
        /// Original MTI as a number.
        mti: u16,
        /// Original STAN.
        stan: u32,
        /// Original DE7 MMDDhhmmss.
        transmission: u64,
        /// DE37 packed.
        rrn: Option<u64>,
    },
    /// `cup_pos` DE61 (+ DE37).
    Cup {
        /// DE61.1.
        batch: u32,
        /// DE61.2.
        trace: u32,
        /// DE61.3 MMDD.
        date_mmdd: Option<u16>,
        /// DE37 packed.
        rrn: Option<u64>,
    },
    /// The original the ledger found.
    Found(TxnKey),
}

/// The summary of a request that was reserved and is now declined (upstream, or on a
/// recheck at commit): rebuilt from the event its reservation would have committed.
pub(crate) fn summary_of_reserved(body: &EventBody, currency: u16) -> Option<Box<RequestSummary>> {
    let (op, txn, original) = match body {
        EventBody::Sale { txn, .. } => (Operation::Sale, txn, None),
        EventBody::Refund { txn, original, .. } => (
            Operation::Refund,
            txn,
            Some(OriginalSummary::Found(*original)),
        ),
        EventBody::Void { txn, original, .. } => (
            Operation::Void,
            txn,
            Some(OriginalSummary::Found(*original)),
        ),
        _ => return None,
    };
    Some(Box::new(RequestSummary {
        op,
        cup: txn.key.tag & super::originals::TAG_CUP != 0,
        txn: *txn,
        currency,
        original,
    }))
}

/// A merchant's policy as of one journal position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    /// 1 for the first policy journaled, then one more per change.
    pub version: u32,
    /// Who loaded it (`startup`, `sighup`, or an admin token identity and peer).
    pub who: AdminId,
    /// The policy.
    pub policy: Policy,
}

/// An operator's request id (`Idempotency-Key`) or identity: printable ASCII, 1–64 bytes.
pub type AdminId = ShortId<64>;

/// What an operator changed, who asked and under which request id (issue 22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminChange {
    /// The caller's request id: a repeat gets the stored result and changes nothing.
    pub request: AdminId,
    /// The token identity and peer of the caller, e.g. `ops@127.0.0.1`.
    pub who: AdminId,
    /// The change.
    pub action: AdminAction,
}

/// An operator's change of one merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// Adds `amount` to the prefunded reserve.
    TopUp {
        /// Added to the reserve.
        amount: u64,
    },
    /// Settles the whole merchant, as [`EventBody::Settle`] (ends a cut-over).
    Settle {
        /// Paid out.
        payout: u64,
        /// Taken from the reserve.
        reserve_used: u64,
    },
    /// Closes one terminal's open batch whatever its totals (DOMAIN §9a: "until the totals
    /// agree or an operator closes it").
    SettleTerminal {
        /// The terminal.
        terminal: TerminalId,
        /// Paid out.
        payout: u64,
        /// Taken from the reserve.
        reserve_used: u64,
    },
    /// Enables or disables refunds on one terminal.
    TerminalRefunds {
        /// The terminal.
        terminal: TerminalId,
        /// Refunds allowed.
        enabled: bool,
    },
}

/// One committed change of one merchant, at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    /// DE42.
    pub merchant: MerchantId,
    /// When the request was decided (merchant days and windows use it on replay).
    pub at: UnixSeconds,
    /// What changed.
    pub body: EventBody,
}

/// An event or snapshot that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Ended early.
    #[error("truncated")]
    Truncated,
    /// Unknown version byte.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A field has a value no encoder writes.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Bytes left after the end.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

impl LedgerEvent {
    /// Appends the binary form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let w = &mut Writer(out);
        w.u8(EVENT_VERSION);
        let tag = match &self.body {
            EventBody::Sale { .. } => 1,
            EventBody::Refund { .. } => 2,
            EventBody::Void { .. } => 3,
            EventBody::Reversal { .. } => 4,
            EventBody::Declined { .. } => 5,
            EventBody::SignOn { .. } => 6,
            EventBody::CutoverBegin => 7,
            EventBody::Settle { .. } => 8,
            EventBody::TopUp { .. } => 9,
            EventBody::SettleBatch { .. } => 10,
            EventBody::ScheduledCutover { .. } => 11,
            EventBody::Admin(_) => 12,
            EventBody::PolicySet(_) => 13,
        };
        w.u8(tag);
        w.id(&self.merchant);
        w.i64(self.at);
        match &self.body {
            EventBody::Sale { answer, txn } => {
                w.answer(answer);
                w.txn(txn);
            }
            EventBody::Refund {
                answer,
                txn,
                original,
            }
            | EventBody::Void {
                answer,
                txn,
                original,
            } => {
                w.answer(answer);
                w.txn(txn);
                w.key(original);
            }
            EventBody::Reversal { answer, target } => {
                w.answer(answer);
                w.key(target);
            }
            EventBody::Declined {
                answer,
                decision,
                sale,
                request,
            } => {
                w.answer(answer);
                w.decision(decision);
                match sale {
                    Some(t) => {
                        w.u8(1);
                        w.txn(t);
                    }
                    None => w.u8(0),
                }
                match request {
                    Some(r) => {
                        w.u8(1);
                        w.summary(r);
                    }
                    None => w.u8(0),
                }
            }
            EventBody::SignOn { terminal } => w.id(terminal),
            EventBody::CutoverBegin => {}
            EventBody::TopUp { amount } => w.u64(*amount),
            EventBody::Settle {
                payout,
                reserve_used,
            } => {
                w.u64(*payout);
                w.u64(*reserve_used);
            }
            EventBody::SettleBatch {
                answer,
                payout,
                reserve_used,
            } => {
                w.answer(answer);
                w.u64(*payout);
                w.u64(*reserve_used);
            }
            EventBody::ScheduledCutover {
                day,
                payout,
                reserve_used,
            } => {
                w.i64(i64::from(*day));
                w.u64(*payout);
                w.u64(*reserve_used);
            }
            EventBody::Admin(change) => w.admin(change),
            EventBody::PolicySet(change) => {
                w.u64(u64::from(change.version));
                w.id(&change.who);
                w.policy(&change.policy);
            }
        }
    }

    /// Decodes exactly one event from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<LedgerEvent, DecodeError> {
        let r = &mut Reader(bytes);
        let v = r.u8()?;
        if !(1..=EVENT_VERSION).contains(&v) {
            return Err(DecodeError::Version(v));
        }
        let tag = r.u8()?;
        let merchant = r.id()?;
        let at = r.i64()?;
        let body = match tag {
            1 => EventBody::Sale {
                answer: r.answer()?,
                txn: r.txn()?,
            },
            2 => EventBody::Refund {
                answer: r.answer()?,
                txn: r.txn()?,
                original: r.key()?,
            },
            3 => EventBody::Void {
                answer: r.answer()?,
                txn: r.txn()?,
                original: r.key()?,
            },
            4 => EventBody::Reversal {
                answer: r.answer()?,
                target: r.key()?,
            },
            5 => EventBody::Declined {
                answer: r.answer()?,
                decision: r.decision_v(v)?,
                sale: match r.u8()? {
                    0 => None,
                    1 => Some(r.txn()?),
                    _ => return Err(DecodeError::Invalid("declined sale flag")),
                },
                request: match if v >= 3 { r.u8()? } else { 0 } {
                    0 => None,
                    1 => Some(Box::new(r.summary()?)),
                    _ => return Err(DecodeError::Invalid("declined request flag")),
                },
            },
            6 => EventBody::SignOn { terminal: r.id()? },
            7 => EventBody::CutoverBegin,
            8 => EventBody::Settle {
                payout: r.u64()?,
                reserve_used: r.u64()?,
            },
            9 => EventBody::TopUp { amount: r.u64()? },
            10 => EventBody::SettleBatch {
                answer: r.answer()?,
                payout: r.u64()?,
                reserve_used: r.u64()?,
            },
            11 => EventBody::ScheduledCutover {
                day: i32::try_from(r.i64()?).map_err(|_| DecodeError::Invalid("day"))?,
                payout: r.u64()?,
                reserve_used: r.u64()?,
            },
            12 => EventBody::Admin(Box::new(r.admin()?)),
            13 => EventBody::PolicySet(Box::new(PolicyChange {
                version: r.u32()?,
                who: r.id()?,
                policy: r.policy()?,
            })),
            _ => return Err(DecodeError::Invalid("event tag")),
        };
        r.end()?;
        Ok(LedgerEvent { merchant, at, body })
    }
}

/// Appends the compact binary forms used by events and snapshots.
pub(crate) struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    /// A policy, every knob in the order of [`Policy`]'s fields.
    pub fn policy(&mut self, p: &Policy) {
        self.u8(u8::from(p.refund_enabled));
        self.u8(u8::from(p.void_enabled));
        self.u64(u64::from(p.refund_window_days));
        self.opt(p.refund_single_max);
        self.opt(p.refund_day_amount_max);
        self.opt(p.refund_month_amount_max);
        self.opt(p.refund_day_count_max.map(u64::from));
        self.opt(p.refund_month_count_max.map(u64::from));
        self.opt(p.card_refund_day_amount_max);
        self.opt(p.card_refund_day_count_max.map(u64::from));
        self.opt(p.original_refund_count_max.map(u64::from));
        self.u8(p.refundable_share_percent);
        self.u8(match p.same_day_refund {
            SameDayRefund::Allow => 0,
            SameDayRefund::UseVoid => 1,
        });
        self.u64(p.denied_card_types.len() as u64);
        for c in &p.denied_card_types {
            self.u8(c.to_u8());
        }
        self.u64(p.reserve);
        self.i64(i64::from(p.utc_offset.seconds()));
        self.u64(u64::from(p.currency));
        self.opt(p.cutover_at.map(u64::from));
    }

    /// An operator's change: request id, who, action tag and its fields.
    pub fn admin(&mut self, c: &AdminChange) {
        self.id(&c.request);
        self.id(&c.who);
        match c.action {
            AdminAction::TopUp { amount } => {
                self.u8(1);
                self.u64(amount);
            }
            AdminAction::Settle {
                payout,
                reserve_used,
            } => {
                self.u8(2);
                self.u64(payout);
                self.u64(reserve_used);
            }
            AdminAction::SettleTerminal {
                terminal,
                payout,
                reserve_used,
            } => {
                self.u8(3);
                self.id(&terminal);
                self.u64(payout);
                self.u64(reserve_used);
            }
            AdminAction::TerminalRefunds { terminal, enabled } => {
                self.u8(4);
                self.id(&terminal);
                self.u8(u8::from(enabled));
            }
        }
    }

    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }

    pub fn opt(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
            None => self.u8(0),
        }
    }

    pub fn id<const N: usize>(&mut self, id: &ShortId<N>) {
        self.u8(id.len);
        self.0.extend_from_slice(&id.bytes[..usize::from(id.len)]);
    }

    fn key(&mut self, k: &TxnKey) {
        self.id(&k.terminal);
        self.u64(u64::from(k.stan));
        self.u64(u64::from(k.tag));
    }

    fn answer(&mut self, a: &AnswerKey) {
        self.id(&a.terminal);
        self.u64(u64::from(a.stan));
        self.u64(u64::from(a.mmdd));
        self.u8(a.class);
        self.0.extend_from_slice(&a.fingerprint.to_le_bytes());
    }

    fn txn(&mut self, t: &TxnRecord) {
        self.key(&t.key);
        self.opt(t.rrn);
        self.u64(t.pan.to_u64());
        self.0.extend_from_slice(&t.pan_hash.to_le_bytes());
        self.u8(t.card.to_u8());
        self.u64(t.amount);
        self.u64(u64::from(t.batch));
    }

    fn summary(&mut self, s: &RequestSummary) {
        self.u8(match s.op {
            Operation::Sale => 1,
            Operation::Refund => 2,
            Operation::Void => 3,
            Operation::Reversal => 4,
            Operation::Settlement => 5,
        });
        self.u8(u8::from(s.cup));
        self.txn(&s.txn);
        self.u64(u64::from(s.currency));
        match s.original {
            None => self.u8(0),
            Some(OriginalSummary::Iso {
                mti,
                stan,
                transmission,
                rrn,
            }) => {
                self.u8(1);
                self.u64(u64::from(mti));
                self.u64(u64::from(stan));
                self.u64(transmission);
                self.opt(rrn);
            }
            Some(OriginalSummary::Cup {
                batch,
                trace,
                date_mmdd,
                rrn,
            }) => {
                self.u8(2);
                self.u64(u64::from(batch));
                self.u64(u64::from(trace));
                self.opt(date_mmdd.map(u64::from));
                self.opt(rrn);
            }
            Some(OriginalSummary::Found(key)) => {
                self.u8(3);
                self.key(&key);
            }
        }
    }

    pub fn decision(&mut self, d: &Decision) {
        let f = &d.figures;
        self.u8(d.reason.to_u8());
        self.u64(f.amount);
        self.u64(u64::from(f.currency));
        for v in f.optionals() {
            self.opt(v);
        }
    }
}

/// Reads what [`Writer`] wrote.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    /// What [`Writer::policy`] wrote.
    pub fn policy(&mut self) -> Result<Policy, DecodeError> {
        let flag = |v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("policy flag")),
        };
        let small = |v: Option<u64>| {
            v.map(u32::try_from)
                .transpose()
                .map_err(|_| DecodeError::Invalid("policy count"))
        };
        let refund_enabled = flag(self.u8()?)?;
        let void_enabled = flag(self.u8()?)?;
        let refund_window_days = self.u32()?;
        let refund_single_max = self.opt()?;
        let refund_day_amount_max = self.opt()?;
        let refund_month_amount_max = self.opt()?;
        let refund_day_count_max = small(self.opt()?)?;
        let refund_month_count_max = small(self.opt()?)?;
        let card_refund_day_amount_max = self.opt()?;
        let card_refund_day_count_max = small(self.opt()?)?;
        let original_refund_count_max = small(self.opt()?)?;
        let refundable_share_percent = self.u8()?;
        let same_day_refund = match self.u8()? {
            0 => SameDayRefund::Allow,
            1 => SameDayRefund::UseVoid,
            _ => return Err(DecodeError::Invalid("same_day_refund")),
        };
        let n = self.u64()?;
        if n > 16 {
            return Err(DecodeError::Invalid("denied card types"));
        }
        let mut denied_card_types = Vec::with_capacity(n as usize);
        for _ in 0..n {
            denied_card_types
                .push(CardType::from_u8(self.u8()?).ok_or(DecodeError::Invalid("card type"))?);
        }
        let reserve = self.u64()?;
        let offset = i32::try_from(self.i64()?).map_err(|_| DecodeError::Invalid("utc offset"))?;
        let currency = u16::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("currency"))?;
        let cutover_at = small(self.opt()?)?;
        Ok(Policy {
            refund_enabled,
            void_enabled,
            refund_window_days,
            refund_single_max,
            refund_day_amount_max,
            refund_month_amount_max,
            refund_day_count_max,
            refund_month_count_max,
            card_refund_day_amount_max,
            card_refund_day_count_max,
            original_refund_count_max,
            refundable_share_percent,
            same_day_refund,
            denied_card_types,
            reserve,
            utc_offset: UtcOffset::from_seconds(offset),
            currency,
            cutover_at,
        })
    }

    /// What [`Writer::admin`] wrote.
    pub fn admin(&mut self) -> Result<AdminChange, DecodeError> {
        let request = self.id()?;
        let who = self.id()?;
        let action = match self.u8()? {
            1 => AdminAction::TopUp {
                amount: self.u64()?,
            },
            2 => AdminAction::Settle {
                payout: self.u64()?,
                reserve_used: self.u64()?,
            },
            3 => AdminAction::SettleTerminal {
                terminal: self.id()?,
                payout: self.u64()?,
                reserve_used: self.u64()?,
            },
            4 => AdminAction::TerminalRefunds {
                terminal: self.id()?,
                enabled: match self.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("enabled flag")),
                },
            },
            _ => return Err(DecodeError::Invalid("admin action")),
        };
        Ok(AdminChange {
            request,
            who,
            action,
        })
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.0.split_first().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid("varint"))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("u32"))
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub fn opt(&mut self) -> Result<Option<u64>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(DecodeError::Invalid("option flag")),
        }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    pub fn fixed_u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn id<const N: usize>(&mut self) -> Result<ShortId<N>, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > N {
            return Err(DecodeError::Invalid("identifier length"));
        }
        let b = self.bytes(n)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Invalid("identifier"))?;
        ShortId::new(s).ok_or(DecodeError::Invalid("identifier"))
    }

    fn key(&mut self) -> Result<TxnKey, DecodeError> {
        Ok(TxnKey {
            terminal: self.id()?,
            stan: self.u32()?,
            tag: self.u32()?,
        })
    }

    fn answer(&mut self) -> Result<AnswerKey, DecodeError> {
        Ok(AnswerKey {
            terminal: self.id()?,
            stan: self.u32()?,
            mmdd: u16::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("mmdd"))?,
            class: self.u8()?,
            fingerprint: self.fixed_u64()?,
        })
    }

    fn txn(&mut self) -> Result<TxnRecord, DecodeError> {
        Ok(TxnRecord {
            key: self.key()?,
            rrn: self.opt()?,
            pan: MaskedPan::from_u64(self.u64()?),
            pan_hash: self.fixed_u64()?,
            card: CardType::from_u8(self.u8()?).ok_or(DecodeError::Invalid("card type"))?,
            amount: self.u64()?,
            batch: self.u32()?,
        })
    }

    /// What [`Writer::summary`] wrote.
    fn summary(&mut self) -> Result<RequestSummary, DecodeError> {
        let op = match self.u8()? {
            1 => Operation::Sale,
            2 => Operation::Refund,
            3 => Operation::Void,
            4 => Operation::Reversal,
            5 => Operation::Settlement,
            _ => return Err(DecodeError::Invalid("request operation")),
        };
        let cup = match self.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("request dialect")),
        };
        let txn = self.txn()?;
        let currency = u16::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("currency"))?;
        let original = match self.u8()? {
            0 => None,
            1 => Some(OriginalSummary::Iso {
                mti: u16::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("mti"))?,
                stan: self.u32()?,
                transmission: self.u64()?,
                rrn: self.opt()?,
            }),
            2 => Some(OriginalSummary::Cup {
                batch: self.u32()?,
                trace: self.u32()?,
                date_mmdd: self
                    .opt()?
                    .map(u16::try_from)
                    .transpose()
                    .map_err(|_| DecodeError::Invalid("mmdd"))?,
                rrn: self.opt()?,
            }),
            3 => Some(OriginalSummary::Found(self.key()?)),
            _ => return Err(DecodeError::Invalid("request original")),
        };
        Ok(RequestSummary {
            op,
            cup,
            txn,
            currency,
            original,
        })
    }

    /// A decision as written by event/snapshot `version` (1 had no `would_pass`).
    pub fn decision_v(&mut self, version: u8) -> Result<Decision, DecodeError> {
        let reason = Reason::from_u8(self.u8()?).ok_or(DecodeError::Invalid("reason"))?;
        let figures = Figures {
            amount: self.u64()?,
            currency: u16::try_from(self.u64()?).map_err(|_| DecodeError::Invalid("currency"))?,
            limit: self.opt()?,
            used: self.opt()?,
            remaining: self.opt()?,
            window_days: self
                .opt()?
                .map(u32::try_from)
                .transpose()
                .map_err(|_| DecodeError::Invalid("window"))?,
            original_amount: self.opt()?,
            original_remaining: self.opt()?,
            day_allowance_remaining: self.opt()?,
            would_pass: if version >= 2 { self.opt()? } else { None },
            host_code: if version >= 2 {
                self.opt()?
                    .map(u16::try_from)
                    .transpose()
                    .map_err(|_| DecodeError::Invalid("host code"))?
            } else {
                None
            },
        };
        Ok(Decision::new(reason, figures))
    }

    pub fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.0.len()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_admin_action_round_trips_and_a_bad_action_tag_is_refused() {
        let t = TerminalId::new("T1").unwrap();
        let actions = [
            AdminAction::TopUp { amount: 5 },
            AdminAction::Settle {
                payout: 7,
                reserve_used: 0,
            },
            AdminAction::SettleTerminal {
                terminal: t,
                payout: 0,
                reserve_used: 9,
            },
            AdminAction::TerminalRefunds {
                terminal: t,
                enabled: false,
            },
        ];
        for action in actions {
            let e = LedgerEvent {
                merchant: MerchantId::new("M").unwrap(),
                at: 1_700_000_000,
                body: EventBody::Admin(Box::new(AdminChange {
                    request: AdminId::new("req-1").unwrap(),
                    who: AdminId::new("ops@127.0.0.1").unwrap(),
                    action,
                })),
            };
            let mut bytes = Vec::new();
            e.encode(&mut bytes);
            assert_eq!(LedgerEvent::decode(&bytes).unwrap(), e);
        }
        let mut bytes = Vec::new();
        LedgerEvent {
            merchant: MerchantId::new("M").unwrap(),
            at: 0,
            body: EventBody::Admin(Box::new(AdminChange {
                request: AdminId::new("r").unwrap(),
                who: AdminId::new("w").unwrap(),
                action: AdminAction::TopUp { amount: 1 },
            })),
        }
        .encode(&mut bytes);
        // version, tag, merchant (2), at (1), request (2), who (2), then the action tag.
        bytes[9] = 77;
        assert_eq!(
            LedgerEvent::decode(&bytes),
            Err(DecodeError::Invalid("admin action"))
        );
    }
}
