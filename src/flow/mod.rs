//! The message flows: decoded request → ledger decision → response bytes.
//!
//! [`Gateway::handle`] is what a connection calls for each framed message. It answers format
//! errors (30), MAC failures (63/A0), unsupported functions (40) and network management
//! itself, turns sales, refunds, voids, reversals and settlements into ledger requests, makes
//! every approval durable in the journal before it is answered (DOMAIN §7), and renders the
//! decision: DE39 per dialect, the reason in DE44, the remaining allowance in DE54.

pub mod classify;
pub mod ids;
mod render;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use crate::clock::Clock;
use crate::iso8583::{self, Message, Spec};
use crate::journal::Journal;
use crate::ledger::{
    self, CardType, Decision, Dialect, Ledger, LedgerEvent, Operation, OriginalRef, Reason,
};
use crate::mac::{self, MacKey};
use crate::server::{Dispatch, Handled, RequestCtx};
use crate::telemetry;
use crate::upstream::{Upstreams, Verdict};
pub use classify::{classify, Kind, Shape};

/// How one listener's messages are read and protected.
#[derive(Debug)]
pub struct Link {
    /// The dialect's spec.
    pub spec: &'static Spec,
    /// Which dialect it is (response codes differ).
    pub dialect: Dialect,
    /// The MAC key of the link, when it uses MACs (DOMAIN §11).
    pub mac: Option<MacKey>,
}

impl Link {
    /// A link of a built-in dialect without MACs.
    pub fn plain(dialect: Dialect) -> Link {
        let spec = match dialect {
            Dialect::Ascii1987 => &*iso8583::ASCII1987,
            Dialect::CupPos => &*iso8583::CUP_POS,
        };
        Link {
            spec,
            dialect,
            mac: None,
        }
    }

    fn shape(&self) -> Shape {
        match self.dialect {
            Dialect::Ascii1987 => Shape::Ascii,
            Dialect::CupPos => Shape::Cup,
        }
    }
}

/// What to do with one framed message.
#[derive(Debug)]
pub enum Outcome {
    /// Send these message bytes.
    Reply(BytesMut),
    /// Send nothing (a message whose MTI or STAN could not be read).
    Drop,
}

/// The decision engine behind every listener.
pub struct Gateway {
    ledger: Arc<Ledger>,
    /// Held shared from a journal append until its commit, exclusively while a snapshot is
    /// taken: a snapshot then holds exactly the records up to the journal's durable seq.
    commit_gate: tokio::sync::RwLock<()>,
    journal: Option<Arc<Journal>>,
    clock: Arc<dyn Clock>,
    links: Vec<Link>,
    upstreams: Option<Arc<Upstreams>>,
}

/// What the gateway tells the log and metrics about one request.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Response code sent (DE39), or `None` when the message was dropped.
    pub code: Option<&'static str>,
    /// Reason sent (DE44).
    pub reason: &'static str,
}

impl Gateway {
    /// A gateway deciding with `ledger`, journaling to `journal` (none: decisions are not
    /// durable, for tests and `unsafe` runs), reading time from `clock`, one [`Link`] per
    /// listener index.
    pub fn new(
        ledger: Arc<Ledger>,
        journal: Option<Arc<Journal>>,
        clock: Arc<dyn Clock>,
        links: Vec<Link>,
    ) -> Gateway {
        Gateway {
            ledger,
            commit_gate: tokio::sync::RwLock::new(()),
            journal,
            clock,
            links,
            upstreams: None,
        }
    }

    /// Takes a consistent snapshot of the ledger: waits for every journaled change to be
    /// committed, then returns the journal seq it covers and the ledger's bytes. Requests
    /// wait for the gate only while the ledger is serialised.
    pub async fn snapshot(&self) -> Option<(u64, Vec<u8>)> {
        let journal = self.journal.as_ref()?;
        let _exclusive = self.commit_gate.write().await;
        let seq = journal.durable_seq();
        let mut bytes = Vec::with_capacity(1 << 20);
        self.ledger.snapshot(&mut bytes);
        Some((seq, bytes))
    }

    /// The same gateway forwarding routed merchants' requests to `upstreams` (DOMAIN §8).
    pub fn with_upstreams(mut self, upstreams: Arc<Upstreams>) -> Gateway {
        self.upstreams = Some(upstreams);
        self
    }

    /// The ledger, for admin calls and tests.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Decides one message received on listener `link` and renders the answer.
    pub async fn handle(&self, link: usize, body: &[u8]) -> (Outcome, Summary) {
        let started = Instant::now();
        let Some(l) = self.links.get(link) else {
            return (
                Outcome::Drop,
                Summary {
                    code: None,
                    reason: "INTERNAL_ERROR",
                },
            );
        };
        let (msg, err) = iso8583::decode_partial(l.spec, body);
        let result = match err {
            Some(e) if e.answerable() => {
                tracing::info!(dialect = l.spec.name(), mti = %msg.mti(), stan = ?e.stan, error = %e, "message error");
                telemetry::count_message_error(dialect_label(l.dialect));
                self.answer(
                    l,
                    &msg,
                    Kind::Sale,
                    &Decision::bare(Reason::FORMAT_ERROR),
                    None,
                )
            }
            Some(e) => {
                tracing::info!(dialect = l.spec.name(), error = %e, "message error, dropped");
                telemetry::count_message_error(dialect_label(l.dialect));
                return (
                    Outcome::Drop,
                    Summary {
                        code: None,
                        reason: "FORMAT_ERROR",
                    },
                );
            }
            None => self.decide(l, &msg).await,
        };
        let (bytes, decision) = result;
        let code = decision.de39(l.dialect);
        let reason = decision.reason.as_str();
        let micros = started.elapsed().as_micros() as u64;
        telemetry::record_request(
            dialect_label(l.dialect),
            mti_label(msg.mti().0),
            code,
            reason,
        );
        telemetry::record_decision_seconds(dialect_label(l.dialect), micros as f64 / 1e6);
        let masked = msg.pan().map(|p| p.masked());
        tracing::info!(
            dialect = l.spec.name(),
            mti = %msg.mti(),
            pan = masked.as_ref().map_or("", |m| m.as_str()),
            stan = msg.stan().unwrap_or(0),
            terminal = msg.terminal().unwrap_or(""),
            code,
            reason,
            us = micros,
            "request"
        );
        (
            Outcome::Reply(bytes),
            Summary {
                code: Some(code),
                reason,
            },
        )
    }

    async fn decide(&self, l: &Link, msg: &Message<'_>) -> (BytesMut, Decision) {
        let Some(kind) = classify(msg, l.shape()) else {
            return self.answer(
                l,
                msg,
                Kind::Sale,
                &Decision::bare(Reason::FUNCTION_NOT_SUPPORTED),
                None,
            );
        };
        let now = self.clock.now_unix_s();
        if matches!(kind, Kind::Echo | Kind::SignOff) {
            return self.answer(l, msg, kind, &Decision::bare(Reason::APPROVED), None);
        }
        if kind == Kind::SignOn {
            return self.sign_on(l, msg, now).await;
        }
        if !self.mac_ok(l, msg) {
            return self.answer(l, msg, kind, &Decision::bare(Reason::MAC_INVALID), None);
        }
        if kind == Kind::Settlement {
            return self.settle(l, msg, now).await;
        }
        let mut pan_buf = [0u8; 19];
        let rrn_buf = sale_rrn(msg, now);
        let Some(req) = self.ledger_request(l, msg, kind, now, &mut pan_buf, &rrn_buf) else {
            return self.answer(l, msg, kind, &Decision::bare(Reason::FORMAT_ERROR), None);
        };
        let rrn = (kind == Kind::Sale).then_some(rrn_buf);
        let reservation = match self.ledger.reserve(&req, now) {
            Ok(r) => r,
            Err(d) => return self.answer(l, msg, kind, &d, rrn),
        };
        let (reservation, forwarded) = match self.forward(l, msg, kind, reservation).await {
            Ok(r) => r,
            Err(answered) => return answered,
        };
        let _gate = self.commit_gate.read().await;
        if let Err(e) = self.journal_event(reservation.event()).await {
            tracing::warn!(error = %e, "journal append failed; answering 96");
            self.ledger.release(reservation);
            self.reverse_forwarded(l, msg, forwarded).await;
            return self.answer(
                l,
                msg,
                kind,
                &Decision::bare(Reason::STORE_UNAVAILABLE),
                None,
            );
        }
        let d = self.ledger.commit(reservation);
        if !d.is_approved() {
            self.reverse_forwarded(l, msg, forwarded).await;
        }
        self.answer(l, msg, kind, &d, rrn)
    }

    /// DOMAIN §5 row 14: a routed merchant's request goes to its host between reserve and
    /// commit. `Ok` gives the reservation back to commit, and whether the host approved it
    /// (then a failure to commit must reverse it at the host); `Err` is the answer (the
    /// reservation released or declined). The logic is in [`crate::upstream`].
    async fn forward(
        &self,
        l: &Link,
        msg: &Message<'_>,
        kind: Kind,
        r: ledger::Reservation,
    ) -> Result<(ledger::Reservation, bool), (BytesMut, Decision)> {
        let Some(upstreams) = &self.upstreams else {
            return Ok((r, false));
        };
        let reason = match upstreams.forward(l.dialect, msg, kind).await {
            Verdict::Local => return Ok((r, false)),
            Verdict::Approved => return Ok((r, true)),
            Verdict::Declined(code) => {
                let _gate = self.commit_gate.read().await;
                let (d, event) = self.ledger.decline(r, Reason::HOST_DECLINED);
                if let Err(e) = self.journal_event(&event).await {
                    tracing::warn!(error = %e, "journal append of a host decline failed");
                }
                let mut out = BytesMut::with_capacity(256);
                render::host_declined(l, msg, kind, &d, &code, &mut out);
                return Err((out, d));
            }
            Verdict::Unreachable => Reason::HOST_UNREACHABLE,
            Verdict::Timeout => Reason::HOST_TIMEOUT,
            Verdict::NoRoute => Reason::NO_ROUTE,
        };
        self.ledger.release(r);
        Err(self.answer(l, msg, kind, &Decision::bare(reason), None))
    }

    /// A request the host approved but that is not answered 00 (journal failure, or a decline
    /// at commit) is reversed at the host through the SAF queue.
    async fn reverse_forwarded(&self, l: &Link, msg: &Message<'_>, forwarded: bool) {
        if let (true, Some(upstreams)) = (forwarded, &self.upstreams) {
            upstreams.reverse(l.dialect, msg).await;
        }
    }

    async fn journal_event(&self, event: &LedgerEvent) -> Result<(), String> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let mut payload = Vec::with_capacity(128);
        event.encode(&mut payload);
        journal
            .append(payload)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn sign_on(&self, l: &Link, msg: &Message<'_>, now: i64) -> (BytesMut, Decision) {
        let (Some(merchant), Some(terminal)) = (msg.merchant(), msg.terminal()) else {
            // ascii1987 sign-on of a host link carries no merchant: nothing to record.
            return self.answer(
                l,
                msg,
                Kind::SignOn,
                &Decision::bare(Reason::APPROVED),
                None,
            );
        };
        let _gate = self.commit_gate.read().await;
        match self.ledger.sign_on(merchant, terminal, now) {
            Ok((batch, event)) => {
                if self.journal_event(&event).await.is_err() {
                    return self.answer(
                        l,
                        msg,
                        Kind::SignOn,
                        &Decision::bare(Reason::STORE_UNAVAILABLE),
                        None,
                    );
                }
                let mut out = BytesMut::with_capacity(256);
                let d = Decision::bare(Reason::APPROVED);
                render::response(l, msg, Kind::SignOn, &d, None, Some(batch), &mut out);
                (out, d)
            }
            Err(refused) => self.answer(l, msg, Kind::SignOn, &Decision::bare(refused.0), None),
        }
    }

    async fn settle(&self, l: &Link, msg: &Message<'_>, now: i64) -> (BytesMut, Decision) {
        let Some(merchant) = msg.merchant() else {
            return self.answer(
                l,
                msg,
                Kind::Settlement,
                &Decision::bare(Reason::FORMAT_ERROR),
                None,
            );
        };
        let _gate = self.commit_gate.read().await;
        match self.ledger.settle(merchant, now) {
            Ok((d, event)) => {
                if self.journal_event(&event).await.is_err() {
                    return self.answer(
                        l,
                        msg,
                        Kind::Settlement,
                        &Decision::bare(Reason::STORE_UNAVAILABLE),
                        None,
                    );
                }
                self.answer(l, msg, Kind::Settlement, &d, None)
            }
            Err(refused) => self.answer(l, msg, Kind::Settlement, &Decision::bare(refused.0), None),
        }
    }

    fn mac_ok(&self, l: &Link, msg: &Message<'_>) -> bool {
        let present = msg.mac();
        match (&l.mac, present) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(_), None) => false,
            (Some(key), Some((mab, value))) => mac::verify(key, mab, value),
        }
    }

    fn answer(
        &self,
        l: &Link,
        msg: &Message<'_>,
        kind: Kind,
        d: &Decision,
        rrn: Option<[u8; 12]>,
    ) -> (BytesMut, Decision) {
        let mut out = BytesMut::with_capacity(256);
        render::response(l, msg, kind, d, rrn, None, &mut out);
        (out, *d)
    }

    fn ledger_request<'m>(
        &self,
        l: &Link,
        msg: &Message<'m>,
        kind: Kind,
        now: i64,
        pan_buf: &'m mut [u8; 19],
        rrn_buf: &'m [u8; 12],
    ) -> Option<ledger::Request<'m>> {
        let op = match kind {
            Kind::Sale => Operation::Sale,
            Kind::Refund => Operation::Refund,
            Kind::Void => Operation::Void,
            Kind::Reversal => Operation::Reversal,
            _ => Operation::Settlement,
        };
        let pan_digits = msg.pan()?.digits();
        let n = pan_digits.len().min(19);
        for (i, slot) in pan_buf.iter_mut().enumerate().take(n) {
            *slot = pan_digits.char_at(i);
        }
        let pan = std::str::from_utf8(&pan_buf[..n]).ok()?;
        let shape = l.shape();
        let original = match (kind, shape) {
            (Kind::Sale, _) => None,
            (_, Shape::Ascii) => msg.original_data().map(|od| OriginalRef::Iso {
                mti: od.mti.0,
                stan: od.stan,
                transmission: od.transmission,
                rrn: msg.rrn(),
            }),
            (_, Shape::Cup) => msg.cup61().map(|c| OriginalRef::Cup {
                batch: c.batch,
                trace: c.trace,
                date_mmdd: c.date_mmdd,
                rrn: msg.rrn(),
            }),
        };
        let rrn = if kind == Kind::Sale {
            std::str::from_utf8(&rrn_buf[..]).ok()
        } else {
            msg.rrn()
        };
        // DE13, else the date of DE7, else (cup sales carry neither) today's UTC date.
        let local_date_mmdd = msg
            .local_date()
            .or_else(|| msg.transmission().map(|t| (t / 1_000_000) as u16))
            .unwrap_or_else(|| utc_mmdd(now));
        Some(ledger::Request {
            dialect: l.dialect,
            op,
            repeat: msg.mti().is_repeat(),
            merchant: msg.merchant()?,
            terminal: msg.terminal()?,
            stan: msg.stan()?,
            local_date_mmdd,
            mti_class: msg.mti().class(),
            transmission: msg.transmission(),
            rrn,
            batch: msg.cup60().map(|c| c.batch),
            pan,
            amount_minor: msg.amount().map_or(0, |a| a.0),
            currency: msg.currency().unwrap_or(0),
            card_type: CardType::from_pan(pan),
            original,
            body_fingerprint: fingerprint(msg),
        })
    }
}

/// MMDD of the UTC date at `now` (civil-from-days, H. Hinnant).
fn utc_mmdd(now: i64) -> u16 {
    let z = now.div_euclid(86_400) + 719_468;
    let doe = z - z.div_euclid(146_097) * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (m * 100 + d) as u16
}

/// The RRN a sale gets: DE12 `hhmmss` (or the UTC time of day) and the STAN.
fn sale_rrn(msg: &Message<'_>, now: i64) -> [u8; 12] {
    let hhmmss = msg.number(12).map_or_else(
        || {
            let s = now.rem_euclid(86_400);
            (s / 3600 * 10_000 + s % 3600 / 60 * 100 + s % 60) as u32
        },
        |t| t as u32,
    );
    ids::rrn(hhmmss, msg.stan().unwrap_or(0))
}

/// A hash of what identifies a request, without the MTI's origin digit and DE7 (which a
/// terminal changes on a retransmission): an identical retransmission gets the stored answer,
/// a different request reusing the key gets 94.
fn fingerprint(msg: &Message<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(&[msg.mti().class(), msg.mti().function()]);
    for n in [2usize, 3, 4, 41, 42, 49, 61, 90] {
        eat(msg.field_bytes(n).unwrap_or(&[]));
    }
    h
}

/// Metric label of a dialect.
pub fn dialect_label(d: Dialect) -> &'static str {
    match d {
        Dialect::Ascii1987 => "ascii1987",
        Dialect::CupPos => "cup_pos",
    }
}

/// Metric label of an MTI: known ones by name, anything else `other` (labels stay bounded).
pub fn mti_label(mti: u16) -> &'static str {
    match mti {
        200 => "0200",
        201 => "0201",
        220 => "0220",
        221 => "0221",
        400 => "0400",
        401 => "0401",
        420 => "0420",
        421 => "0421",
        500 => "0500",
        800 => "0800",
        820 => "0820",
        _ => "other",
    }
}

impl Dispatch for Gateway {
    fn handle(
        &self,
        ctx: &RequestCtx,
        body: bytes::Bytes,
    ) -> impl std::future::Future<Output = Handled> + Send {
        let link = ctx.listener.index;
        async move {
            match Gateway::handle(self, link, &body).await.0 {
                Outcome::Reply(bytes) => Handled::Reply(bytes),
                Outcome::Drop => Handled::Drop,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_mmdd_follows_the_calendar() {
        assert_eq!(utc_mmdd(0), 101);
        assert_eq!(utc_mmdd(1_709_164_800), 229); // 2024-02-29
        assert_eq!(utc_mmdd(1_798_761_599), 1231); // 2026-12-31 23:59:59
    }
}
