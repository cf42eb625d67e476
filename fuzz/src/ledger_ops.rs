//! A small ledger workload driven by fuzz bytes: sales, refunds, voids, reversals, repeats,
//! settlements and sign-ons on two merchants (ascii `M`, cup `C`), so a restored snapshot is
//! exercised the way traffic would exercise it.

use refundgate::ledger::{
    CardType, Dialect, Ledger, MerchantSet, Operation, OriginalRef, PanKey, Request,
};

use crate::Input;

/// The PAN key every workload uses.
pub const KEY: [u8; 16] = *b"fuzz-pan-key-16b";
/// 2026-01-31T15:00:00Z.
pub const T0: i64 = 1_769_871_600;
const VISA: &str = "4761739001010119";
const CUP_PAN: &str = "6222021234567890123";

/// The merchant set of every workload.
pub fn merchants() -> MerchantSet {
    MerchantSet::from_toml_str(
        "[profiles.p]\nreserve = 1000000\nutc_offset = \"+08:00\"\ncurrency = 840\n\
         refund_day_count_max = 50\noriginal_refund_count_max = 5\n\
         [[merchants]]\nid = \"M\"\nprofile = \"p\"\n\
         terminals = [{ id = \"T1\" }, { id = \"T2\", refund_enabled = false }]\n\
         [[merchants]]\nid = \"C\"\nprofile = \"p\"\ncurrency = 156\n\
         terminals = [{ id = \"C1\", batch = 7 }]\n",
    )
    .expect("the fuzz merchant set parses")
}

/// An owned request.
#[derive(Clone, Debug)]
pub struct Msg {
    pub cup: bool,
    pub op: Operation,
    pub repeat: bool,
    pub terminal: &'static str,
    pub stan: u32,
    pub class: u8,
    pub transmission: Option<u64>,
    pub rrn: Option<String>,
    pub batch: Option<u32>,
    pub amount: u64,
    pub original: Option<(u32, u64, Option<String>)>,
}

impl Msg {
    /// The request as the codec would hand it over.
    pub fn req(&self) -> Request<'_> {
        let original = self.original.as_ref().map(|(stan, tag, rrn)| {
            if self.cup {
                OriginalRef::Cup {
                    batch: *tag as u32,
                    trace: *stan,
                    date_mmdd: None,
                    rrn: rrn.as_deref(),
                }
            } else {
                OriginalRef::Iso {
                    mti: 200,
                    stan: *stan,
                    transmission: *tag,
                    rrn: rrn.as_deref(),
                }
            }
        });
        let pan = if self.cup { CUP_PAN } else { VISA };
        Request {
            dialect: if self.cup {
                Dialect::CupPos
            } else {
                Dialect::Ascii1987
            },
            op: self.op,
            repeat: self.repeat,
            merchant: if self.cup { "C" } else { "M" },
            terminal: self.terminal,
            stan: self.stan,
            local_date_mmdd: 131,
            mti_class: self.class,
            transmission: self.transmission,
            rrn: self.rrn.as_deref(),
            batch: self.batch,
            pan,
            amount_minor: self.amount,
            currency: if self.cup { 156 } else { 840 },
            card_type: CardType::from_pan(pan),
            original,
            body_fingerprint: u64::from(self.stan) << 32 ^ self.amount ^ (self.op as u64) << 60,
        }
    }
}

/// The DE7 of a STAN.
pub fn tx(stan: u32) -> u64 {
    131_000_000 + u64::from(stan % 1_000_000)
}

/// An ascii sale.
pub fn sale(stan: u32, amount: u64, terminal: &'static str) -> Msg {
    Msg {
        cup: false,
        op: Operation::Sale,
        repeat: false,
        terminal,
        stan,
        class: 2,
        transmission: Some(tx(stan)),
        rrn: Some(format!("6332{stan:08}")),
        batch: None,
        amount,
        original: None,
    }
}

/// A cup sale in `batch`.
pub fn cup_sale(stan: u32, amount: u64, batch: u32) -> Msg {
    Msg {
        cup: true,
        terminal: "C1",
        transmission: None,
        batch: Some(batch),
        rrn: Some(format!("1121{stan:08}")),
        ..sale(stan, amount, "C1")
    }
}

/// A refund, void or reversal of `of` with its own STAN.
pub fn child(of: &Msg, op: Operation, stan: u32, amount: u64) -> Msg {
    let mut m = of.clone();
    m.op = op;
    m.stan = stan;
    m.amount = amount;
    m.repeat = false;
    m.rrn = None;
    m.class = if op == Operation::Reversal { 4 } else { 2 };
    if m.cup {
        m.original = Some((of.stan, u64::from(of.batch.unwrap_or(0)), of.rrn.clone()));
        if op == Operation::Reversal {
            // cup reversals carry the reversed message's own STAN and batch.
            m.stan = of.stan;
            m.original = None;
        }
    } else {
        m.transmission = Some(tx(stan));
        m.original = Some((of.stan, tx(of.stan), of.rrn.clone()));
    }
    m
}

/// Runs the workload the input describes (at most `max_ops` operations) against `ledger`.
/// Every answer must be rendered without panicking.
pub fn run(ledger: &Ledger, input: &mut Input<'_>, max_ops: usize) {
    let mut now = T0;
    let mut sent: Vec<Msg> = Vec::new();
    let mut sales: Vec<Msg> = (1..=4).map(|s| sale(s, 10_000, "T1")).collect();
    sales.extend((1..=2).map(|s| cup_sale(s, 10_000, 7)));
    let mut stan = 1000;
    let mut cup_batch = 7;
    for _ in 0..max_ops {
        if input.is_empty() {
            break;
        }
        let (op, a, b) = (input.u8(), input.u8(), input.u8());
        stan += 1;
        let pick = |v: &Vec<Msg>, i: u8| v.get(usize::from(i) % v.len().max(1)).cloned();
        let msg = match op % 10 {
            0 => sale(
                stan,
                u64::from(a) * 100 + 1,
                if b & 1 == 0 { "T1" } else { "T2" },
            ),
            1 | 2 => {
                let Some(s) = pick(&sales, a) else { continue };
                let mut m = child(&s, Operation::Refund, stan, u64::from(b) * 10 + 1);
                if op & 0x80 != 0 {
                    // Found by RRN only: the DE90 names nothing.
                    if let Some(o) = m.original.as_mut() {
                        o.0 = 999_999;
                    }
                }
                m
            }
            3 => {
                let Some(s) = pick(&sales, a) else { continue };
                child(&s, Operation::Void, stan, s.amount)
            }
            4 => {
                let Some(s) = pick(&sent, a) else { continue };
                child(&s, Operation::Reversal, stan, s.amount)
            }
            5 => {
                let Some(mut s) = pick(&sent, a) else {
                    continue;
                };
                s.repeat = true;
                s
            }
            6 => {
                let merchant = if a & 1 == 0 { "M" } else { "C" };
                let _ = ledger.settle(merchant, now);
                if merchant == "C" {
                    cup_batch += 1;
                }
                continue;
            }
            7 => {
                if let Ok((batch, _)) = ledger.sign_on("C", "C1", now) {
                    cup_batch = batch;
                }
                cup_sale(stan, u64::from(a) * 100 + 1, cup_batch)
            }
            8 => {
                now += i64::from(a) * 3600;
                continue;
            }
            _ => {
                // Reserve, then commit or release: the two-phase path of upstream routing.
                let Some(s) = pick(&sales, a) else { continue };
                let m = child(&s, Operation::Refund, stan, u64::from(b) + 1);
                match ledger.reserve(&m.req(), now) {
                    Ok(r) if b & 1 == 0 => {
                        let _ = ledger.commit(r);
                    }
                    Ok(r) => ledger.release(r),
                    Err(d) => render(&d),
                }
                continue;
            }
        };
        let d = ledger.decide(&msg.req(), now);
        render(&d);
        if msg.op == Operation::Sale && d.reason.as_str() == "APPROVED" {
            sales.push(msg.clone());
        }
        sent.push(msg);
        if sent.len() > 64 {
            sent.remove(0);
        }
    }
    for m in ["M", "C"] {
        let _ = ledger.funds(m);
        let _ = ledger.usage(m, now);
    }
    let _ = ledger.entries();
}

fn render(d: &refundgate::ledger::Decision) {
    let _ = d.de39(Dialect::Ascii1987);
    let _ = d.de39(Dialect::CupPos);
    let _ = d.de54();
    let _ = d.reason.as_str();
}

/// Refunds, voids and reversals of every sale the fixed seed workload makes: what a restored
/// ledger must survive whatever its snapshot said.
pub fn probe(ledger: &Ledger) {
    let script: Vec<u8> = (0..6u8)
        .flat_map(|i| [1, i, 3, 1 | 0x80, i, 1, 3, i, 0, 4, i, 0, 9, i, 2, 9, i, 3])
        .collect();
    run(ledger, &mut Input(&script), 200);
}

/// The ledger the seed workload builds: sales on both merchants, some refunded or voided.
pub fn seeded(ledger: &Ledger) {
    let script: Vec<u8> = [
        [0u8, 50, 0],
        [0, 60, 0],
        [0, 70, 1],
        [0, 80, 0],
        [7, 90, 0],
        [7, 95, 0],
        [1, 6, 20],
        [1, 7, 3],
        [3, 8, 0],
        [4, 2, 0],
        [1, 10, 5],
    ]
    .concat();
    let mut input = Input(&script);
    // The first four sales of `run` are the ones it knows without sending them: send them.
    for s in 1..=4 {
        let _ = ledger.decide(&sale(s, 10_000, "T1").req(), T0);
    }
    let _ = ledger.sign_on("C", "C1", T0);
    for s in 1..=2 {
        let _ = ledger.decide(&cup_sale(s, 10_000, 7).req(), T0);
    }
    run(ledger, &mut input, 100);
}

/// A fresh ledger of the fuzz merchant set.
pub fn fresh() -> Ledger {
    Ledger::new(&merchants(), PanKey::new(&KEY))
}
