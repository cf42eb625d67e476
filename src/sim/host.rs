//! The core simulator's upstream world (issue 17 (d)): a bank host in process, deterministic
//! from the seed, and the network between it and the gateway's real upstream link.
//!
//! A connection is a `tokio::io::duplex` pipe opened by the link's [`Connector`]: the gateway
//! side is the real [`crate::upstream::Link`] (sign-on, echo, multiplexing, timeouts, reconnect),
//! the host side a task of the same current-thread runtime that reads real frames, decides at
//! once and answers after a delay the seed picks (tokio's paused clock: a delay is virtual
//! time, and the runtime jumps to the next timer when nothing else can run). The weather,
//! set by the driver from the seed, makes the host slow (answers after the link's timeout),
//! silent (reads, answers nothing), down (refuses connections), partitioned (what is sent
//! either way is lost) or flapping (closes connections after reading a request).
//!
//! The host keeps the books the invariant needs: every financial request it approved (a
//! posting) and, per posting, the reversals it got: built by the gateway (DE11 is the
//! original's, as [`crate::upstream::reversal_of`] builds it) or sent by the terminal (its own
//! STAN), first sends (0400) and repeats (0401). It reverses a posting once; a repeat or a
//! second reversal of a reversed posting is answered 00 and changes nothing, a reversal of a
//! request it never approved 25.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::frame::{Frame, FrameCodec, Framing};
use crate::iso8583::{self, FieldList, Message, Mti, Value, ASCII1987};
use crate::limits::UPSTREAM_FRAME_BYTES_MAX;
use crate::upstream::link::{Connector, HostIo};

/// The upstream's name in the gateway's routes.
pub(super) const UPSTREAM: &str = "simbank";
/// The link's timeout: a slow host's answers fall on both sides of it.
pub(super) const LINK_TIMEOUT_MS: u64 = 2_000;

/// What the network and the host do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Weather {
    /// Answers within a fraction of the link's timeout; a few answers are lost.
    Healthy,
    /// Answers up to 1.5 timeouts late: some after the gateway gave up.
    Slow,
    /// Reads and decides, answers nothing.
    Silent,
    /// Refuses connections.
    Down,
    /// Connections open; what either side sends is lost.
    Partitioned,
    /// Closes a connection after reading some request (its answer is lost).
    Flapping,
}

/// (DE41, DE42, DE11, DE7, DE13) of a financial request: a STAN is unique per terminal and
/// transmission time, as a host keeps it (a terminal may use a STAN again on another day; the
/// gateway keys by local date, DOMAIN §6). A reversal names its original by DE90 (MTI, STAN,
/// DE7).
pub(super) type PostingKey = (String, String, u32, String, String);

/// A financial request the host approved, and what it got about it since.
#[derive(Debug, Clone, Default)]
pub(super) struct Posting {
    /// DE4.
    pub amount: u64,
    /// Reversed (once, by the first reversal that reached the host).
    pub reversed: bool,
    /// Reversals built by the gateway that reached the host, and of those the ones not
    /// marked as repeats (0400).
    pub gateway_sends: u32,
    pub gateway_first_sends: u32,
    /// Reversals the terminal sent (its own STAN).
    pub terminal_sends: u32,
}

/// The host's books; shared by its connections and the driver, kept across gateway crashes.
#[derive(Debug)]
pub(super) struct HostState {
    pub weather: Weather,
    rng: u64,
    pub postings: BTreeMap<PostingKey, Posting>,
    /// Financial requests declined (DE39 05).
    pub declined: u64,
    /// Reversals of nothing the host approved (answered 25).
    pub reversals_of_nothing: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Answers sent after the link's timeout, and answers lost.
    pub late_answers: u64,
    pub lost_answers: u64,
}

/// The host, shared.
pub(super) type Host = Arc<Mutex<HostState>>;

/// What the host does with one frame it read.
struct Reply {
    answer: Option<Bytes>,
    delay_ms: u64,
    close: bool,
}

impl HostState {
    pub(super) fn new(seed: u64) -> Host {
        Arc::new(Mutex::new(HostState {
            weather: Weather::Healthy,
            rng: seed.wrapping_mul(0xd134_2543_de82_ef95) | 1,
            postings: BTreeMap::new(),
            declined: 0,
            reversals_of_nothing: 0,
            connections: 0,
            late_answers: 0,
            lost_answers: 0,
        }))
    }

    fn next(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// The delay of an answer in this weather; `None`: it is lost.
    fn answer_delay(&mut self, lossy: u64) -> Option<u64> {
        match self.weather {
            Weather::Healthy => {
                if self.next(100) < lossy {
                    self.lost_answers += 1;
                    return None;
                }
                Some(self.next(LINK_TIMEOUT_MS / 3))
            }
            Weather::Slow => {
                let d = self.next(LINK_TIMEOUT_MS * 3 / 2);
                if d >= LINK_TIMEOUT_MS {
                    self.late_answers += 1;
                }
                Some(d)
            }
            Weather::Flapping => Some(self.next(LINK_TIMEOUT_MS / 2)),
            Weather::Silent | Weather::Down | Weather::Partitioned => {
                self.lost_answers += 1;
                None
            }
        }
    }

    fn handle(&mut self, body: &[u8]) -> Reply {
        let lost = Reply {
            answer: None,
            delay_ms: 0,
            close: false,
        };
        if self.weather == Weather::Partitioned {
            return lost;
        }
        let Ok(msg) = iso8583::decode(&ASCII1987, body) else {
            return lost;
        };
        let mti = msg.mti().0;
        let close = self.weather == Weather::Flapping && self.next(3) == 0;
        let (answer, delay) = match mti {
            800 => {
                // Sign-on and echo: at once, unless the host answers nothing at all.
                let delay = match self.weather {
                    Weather::Silent => None,
                    _ => Some(0),
                };
                (answer_to(&msg, 810, b"00", None), delay)
            }
            200 => {
                let code = self.financial(&msg);
                let auth = (code == b"00").then_some(&b"SIMOK1"[..]);
                let delay = self.answer_delay(3);
                (answer_to(&msg, 210, code, auth), delay)
            }
            400 | 401 => {
                let code = self.reversal(&msg, mti == 401);
                let delay = self.answer_delay(15);
                (answer_to(&msg, 410, code, None), delay)
            }
            _ => (None, None),
        };
        match (answer, delay) {
            (Some(a), Some(d)) => Reply {
                answer: Some(a),
                delay_ms: d,
                close,
            },
            _ => Reply { close, ..lost },
        }
    }

    /// A sale, refund or void: approved (a posting) or declined 05; the same key again gets
    /// the same answer and posts nothing.
    fn financial(&mut self, msg: &Message<'_>) -> &'static [u8; 2] {
        let Some(key) = posting_key(msg) else {
            return b"30";
        };
        if let Some(p) = self.postings.get(&key) {
            return if p.reversed { b"12" } else { b"00" };
        }
        if self.next(100) < 12 {
            self.declined += 1;
            return b"05";
        }
        let amount = msg
            .field_bytes(4)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.postings.insert(
            key,
            Posting {
                amount,
                ..Posting::default()
            },
        );
        b"00"
    }

    /// A reversal, by the original DE90 names (MTI n4, STAN n6, …).
    fn reversal(&mut self, msg: &Message<'_>, repeat: bool) -> &'static [u8; 2] {
        let de90 = msg
            .field_bytes(90)
            .and_then(|b| std::str::from_utf8(b).ok());
        let original_stan = de90
            .and_then(|s| s.get(4..10))
            .and_then(|s| s.parse::<u32>().ok());
        let original_de7 = de90.and_then(|s| s.get(10..20));
        let (Some(terminal), Some(merchant), Some(stan), Some(de7)) =
            (msg.terminal(), msg.merchant(), original_stan, original_de7)
        else {
            self.reversals_of_nothing += 1;
            return b"25";
        };
        let (terminal, merchant) = (terminal.trim_end(), merchant.trim_end());
        let by_gateway = msg.stan() == original_stan;
        // The original by DE90; of two postings under it (another DE13), one not yet reversed.
        let mut named = self
            .postings
            .iter_mut()
            .filter(|(k, _)| k.0 == terminal && k.1 == merchant && k.2 == stan && k.3 == de7)
            .map(|(_, p)| p);
        let Some(first) = named.next() else {
            self.reversals_of_nothing += 1;
            return b"25";
        };
        let p = if first.reversed {
            named.find(|p| !p.reversed).unwrap_or(first)
        } else {
            first
        };
        p.reversed = true;
        if by_gateway {
            p.gateway_sends += 1;
            if !repeat {
                p.gateway_first_sends += 1;
            }
        } else {
            p.terminal_sends += 1;
        }
        b"00"
    }
}

/// The [`PostingKey`] of a financial request.
pub(super) fn posting_key(msg: &Message<'_>) -> Option<PostingKey> {
    let text = |n: usize| {
        msg.field_bytes(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    Some((
        msg.terminal()?.trim_end().to_string(),
        msg.merchant()?.trim_end().to_string(),
        msg.stan()?,
        text(7),
        text(13),
    ))
}

/// The answer (`mti`) to `msg` with DE39 `code`: the request's keys echoed.
fn answer_to(msg: &Message<'_>, mti: u16, code: &[u8], auth: Option<&[u8]>) -> Option<Bytes> {
    let mut fields: FieldList<'_, 16> = FieldList::new();
    for n in [3u8, 4, 7, 11, 12, 13, 37, 41, 42, 49, 70, 90] {
        if msg.has(usize::from(n)) {
            fields.echo(msg, n).ok()?;
        }
    }
    if let Some(auth) = auth {
        fields.set(38, Value::Text(auth)).ok()?;
    }
    fields.set(39, Value::Text(code)).ok()?;
    let mut out = BytesMut::with_capacity(160);
    iso8583::encode(&ASCII1987, Mti(mti), fields.as_slice(), &mut out).ok()?;
    Some(out.freeze())
}

/// Locks the host's books (a panic elsewhere leaves plain data behind).
pub(super) fn lock(host: &Host) -> MutexGuard<'_, HostState> {
    host.lock().unwrap_or_else(|p| p.into_inner())
}

/// The link's way to the host: a refused connection while the host is down, else a pipe
/// served by a host task on the caller's runtime.
pub(super) fn connector(host: Host) -> Connector {
    Arc::new(move |_addr: SocketAddr| {
        let host = Arc::clone(&host);
        Box::pin(async move {
            {
                let mut h = lock(&host);
                if h.weather == Weather::Down {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "simulated host down",
                    ));
                }
                h.connections += 1;
            }
            let (client, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve(host, server));
            Ok(Box::new(client) as Box<dyn HostIo>)
        })
    })
}

/// One connection, host side: reads frames, decides each at once, answers after its delay.
async fn serve(host: Host, io: tokio::io::DuplexStream) {
    let (r, w) = tokio::io::split(io);
    let codec = || FrameCodec::new(Framing::Binary2, false, UPSTREAM_FRAME_BYTES_MAX);
    let mut reader = FramedRead::new(r, codec());
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(async move {
        let mut writer = FramedWrite::new(w, codec());
        while let Some(body) = rx.recv().await {
            let frame = Frame::Message {
                tpdu: None,
                header: None,
                body,
            };
            if writer.send(frame).await.is_err() {
                break;
            }
        }
    });
    let mut answers = tokio::task::JoinSet::new();
    while let Some(Ok(frame)) = reader.next().await {
        let Frame::Message { body, .. } = frame else {
            continue;
        };
        let reply = lock(&host).handle(&body);
        if let Some(answer) = reply.answer {
            let tx = tx.clone();
            let delay = Duration::from_millis(reply.delay_ms);
            answers.spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(answer);
            });
        }
        if reply.close {
            break;
        }
    }
    // The connection ends: answers not sent yet are lost with it.
    answers.shutdown().await;
    writer.abort();
}
