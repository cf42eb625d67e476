//! Replay scenarios: the TOML shape of `fixtures/replay/*.toml`, compiled once into templates
//! that the connection tasks render without parsing anything on the hot path.
//!
//! A scenario holds optional `setup` steps (run once per run, on one connection, before the
//! load starts: a `cup_pos` sign-on, say) and weighted `session`s. A session is a list of steps
//! run in order on one pipeline slot; sessions are independent and repeated. Each step is a
//! request (MTI + fields in the shared vectors' JSON text form) and what its answer must say.
//!
//! Field values are templates. Placeholders, each written `{...}`:
//!
//! | placeholder | value |
//! |---|---|
//! | `{stan}` | this request's STAN (n6), unique in the run (one counter for all terminals) |
//! | `{rrn}` | a retrieval reference number (an12), unique in the run |
//! | `{de7}` | transmission date and time MMDDhhmmss, UTC, now |
//! | `{time}` / `{date}` | local time hhmmss / local date MMDD, now, at the scenario's `utc_offset` |
//! | `{STEP.req.N}` | field N of the request of earlier step STEP (same session, or a setup step) |
//! | `{STEP.ans.N}` | field N of the answer to earlier step STEP |
//! | `{STEP.ans.N[a..b]}` | characters a..b of that value (e.g. the batch in DE60) |
//!
//! `copy = "STEP"` starts a step from every request field of STEP as it was sent (same STAN,
//! same DE7), `remove = [N, …]` drops some, and `fields` overrides or adds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use serde::Deserialize;

use crate::iso8583::{self, FieldList, Message, Mti, Spec, Value};

/// Most sessions a scenario may hold.
pub const SESSIONS_MAX: usize = 64;
/// Most steps in one session (and in the setup).
pub const STEPS_MAX: usize = 32;
/// Largest sum of session weights (the length of the selection wheel).
pub const WEIGHT_SUM_MAX: u32 = 10_000;
/// Most fields one request may carry.
pub const REQUEST_FIELDS_MAX: usize = 64;
/// Largest scenario file read.
pub const SCENARIO_BYTES_MAX: u64 = 1 << 20;
/// Number of distinct STANs (000001..=999999).
pub const STAN_SPACE: u64 = 999_999;

/// The dialect a scenario speaks: one of the registry's (`src/dialect.rs`).
pub type Dialect = &'static crate::dialect::Dialect;

/// A scenario file that cannot be used; the message names the file and the step or key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(pub String);

/// A compiled scenario, ready to render requests and verify answers.
#[derive(Debug)]
pub struct Scenario {
    /// The scenario's name (file `name`, else the file stem).
    pub name: String,
    /// Its dialect.
    pub dialect: Dialect,
    /// TPDU + header written before each message of a dialect with a CUP header (else empty).
    pub(crate) head: Vec<u8>,
    /// Offset of local time from UTC, in seconds, for `{time}` and `{date}`.
    pub(crate) utc_offset_s: i64,
    /// Steps run once per run before the load; an empty session when there are none.
    pub(crate) setup: Session,
    /// The weighted sessions.
    pub(crate) sessions: Vec<Session>,
    /// Session indices in smooth weighted round-robin order; slots walk it.
    pub(crate) wheel: Vec<u16>,
}

/// One session: steps in order, and which request/answer values later steps need.
#[derive(Debug)]
pub(crate) struct Session {
    pub name: String,
    pub steps: Vec<Step>,
    /// Values captured while the session runs; templates refer to them by index.
    pub captures: Vec<Capture>,
}

/// One request and what its answer must say.
#[derive(Debug)]
pub(crate) struct Step {
    pub name: String,
    pub mti: Mti,
    pub fields: Vec<FieldTemplate>,
    pub expect: Expect,
    /// (field, capture index) to keep from the rendered request.
    pub keep_req: Vec<(u8, usize)>,
    /// (field, capture index) to keep from the answer.
    pub keep_ans: Vec<(u8, usize)>,
    /// The encoded message to copy and patch, when the step allows it.
    pub prebuilt: Option<Prebuilt>,
}

/// What an answer must carry.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    pub mti: Mti,
    /// Acceptable DE39 values (any of them).
    pub codes: Vec<String>,
    /// DE44 when set.
    pub reason: Option<String>,
}

/// A value kept for later steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capture {
    pub step: usize,
    pub side: Side,
    pub field: u8,
}

/// Request or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Req,
    Ans,
}

/// One field's template.
#[derive(Debug)]
pub(crate) struct FieldTemplate {
    pub field: u8,
    pub pieces: Vec<Piece>,
    /// The field is binary: the rendered text is hex to decode.
    pub hex: bool,
}

/// A part of a template.
#[derive(Debug)]
pub(crate) enum Piece {
    Lit(Box<[u8]>),
    Stan,
    Rrn,
    De7,
    Time,
    Date,
    Ref {
        scope: Scope,
        capture: usize,
        range: Option<(usize, usize)>,
    },
}

/// Where a reference's value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Captured by this session (or by the setup while the setup runs).
    Session,
    /// Captured by the setup, shared read-only by every session.
    Setup,
}

/// Run-wide generators of unique identifiers.
#[derive(Debug)]
pub(crate) struct Ids {
    stan_next: AtomicU64,
    stan_base: u64,
    rrn_next: AtomicU64,
    rrn_base: u64,
}

impl Ids {
    /// Counters starting at random points, so two runs on one day are unlikely to reuse a
    /// STAN (the duplicate key is terminal + STAN + date, DOMAIN §6); `stan_first` (1..=999999)
    /// fixes the first STAN instead, so a harness can chain runs without overlap.
    pub fn new(stan_first: Option<u32>) -> Self {
        let stan_base = match stan_first {
            Some(first) => u64::from(first.clamp(1, STAN_SPACE as u32)) - 1,
            None => rand::random::<u64>() % STAN_SPACE,
        };
        Ids {
            stan_next: AtomicU64::new(0),
            stan_base,
            rrn_next: AtomicU64::new(0),
            rrn_base: rand::random::<u64>() % 10_000_000,
        }
    }

    /// The next STAN, 1..=999999.
    pub fn stan(&self) -> u32 {
        let n = self.stan_next.fetch_add(1, Ordering::Relaxed);
        ((self.stan_base + n) % STAN_SPACE + 1) as u32
    }

    /// How many STANs were handed out (more than [`STAN_SPACE`] means some repeated).
    pub fn stans_used(&self) -> u64 {
        self.stan_next.load(Ordering::Relaxed)
    }

    /// The first STAN of the run.
    pub fn stan_first(&self) -> u32 {
        (self.stan_base + 1) as u32
    }

    /// The STAN the next run should start at to follow this one without overlap.
    pub fn stan_after(&self) -> u32 {
        ((self.stan_base + self.stans_used()) % STAN_SPACE + 1) as u32
    }

    /// Counters at fixed points (STAN `stan_first`, RRN serial `rrn_first`), for checks.
    fn at(stan_first: u32, rrn_first: u64) -> Self {
        Ids {
            stan_next: AtomicU64::new(0),
            stan_base: u64::from(stan_first.clamp(1, STAN_SPACE as u32)) - 1,
            rrn_next: AtomicU64::new(0),
            rrn_base: rrn_first % 10_000_000,
        }
    }

    fn rrn_serial(&self) -> u64 {
        let n = self.rrn_next.fetch_add(1, Ordering::Relaxed);
        (self.rrn_base + n) % 10_000_000
    }
}

/// Date and time fields for one second, computed once per second per connection.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stamp {
    unix_s: i64,
    de7: [u8; 10],
    time: [u8; 6],
    date: [u8; 4],
    /// Julian day (3) + hour (2), UTC: the first five characters of `{rrn}`.
    rrn_head: [u8; 5],
}

impl Stamp {
    /// The stamp of `unix_s` (UTC) with local fields at `utc_offset_s`.
    pub fn at(unix_s: i64, utc_offset_s: i64) -> Stamp {
        let utc = Civil::from_unix(unix_s);
        let local = Civil::from_unix(unix_s + utc_offset_s);
        let mut s = Stamp {
            unix_s,
            ..Stamp::default()
        };
        put_digits(&mut s.de7[0..2], u64::from(utc.month));
        put_digits(&mut s.de7[2..4], u64::from(utc.day));
        put_digits(&mut s.de7[4..6], u64::from(utc.hour));
        put_digits(&mut s.de7[6..8], u64::from(utc.minute));
        put_digits(&mut s.de7[8..10], u64::from(utc.second));
        put_digits(&mut s.time[0..2], u64::from(local.hour));
        put_digits(&mut s.time[2..4], u64::from(local.minute));
        put_digits(&mut s.time[4..6], u64::from(local.second));
        put_digits(&mut s.date[0..2], u64::from(local.month));
        put_digits(&mut s.date[2..4], u64::from(local.day));
        put_digits(&mut s.rrn_head[0..3], u64::from(utc.day_of_year));
        put_digits(&mut s.rrn_head[3..5], u64::from(utc.hour));
        s
    }

    /// Refreshes the stamp when the second changed.
    pub fn refresh(&mut self, unix_s: i64, utc_offset_s: i64) {
        if self.unix_s != unix_s || self.de7[0] == 0 {
            *self = Stamp::at(unix_s, utc_offset_s);
        }
    }
}

/// Per-request generated values: STAN and RRN are drawn once per step even when several
/// fields use them.
#[derive(Debug, Default)]
pub(crate) struct Drawn {
    /// The `{stan}` drawn for this request, if any field used it.
    stan: Option<u32>,
    rrn: Option<[u8; 12]>,
    /// DE11 as sent (a `copy` of an earlier step keeps that step's STAN).
    pub de11: Option<u32>,
}

/// Where a rendered request's field values sit in the scratch buffer.
#[derive(Debug, Default)]
pub(crate) struct Rendered {
    /// (field, text start, text end, wire start, wire end); text and wire differ for binary
    /// fields, whose text is hex.
    spans: Vec<(u8, usize, usize, usize, usize)>,
}

impl Scenario {
    /// Reads and compiles a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| ScenarioError(format!("{name}: {e}")))?;
        if meta.len() > SCENARIO_BYTES_MAX {
            return Err(ScenarioError(format!(
                "{name}: larger than {SCENARIO_BYTES_MAX} bytes"
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError(format!("{name}: {e}")))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("scenario");
        load_dialect_file(path, &text).map_err(|e| ScenarioError(format!("{name}: {e}")))?;
        Scenario::from_toml(stem, &text).map_err(|e| ScenarioError(format!("{name}: {}", e.0)))
    }

    /// Compiles scenario TOML text; `default_name` is used when the file has no `name`.
    pub fn from_toml(default_name: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        compile(default_name, doc)
    }

    /// The names of the scenario's sessions, in file order.
    pub fn session_names(&self) -> impl Iterator<Item = &str> {
        self.sessions.iter().map(|s| s.name.as_str())
    }

    /// The codec spec.
    pub(crate) fn spec(&self) -> &'static Spec {
        self.dialect.spec()
    }

    /// Renders `step` into `out` (head + encoded message, no length prefix). `values` are the
    /// running session's captures, `shared` the setup's. Keeps the request values later steps
    /// need in `values`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn render(
        &self,
        step: &Step,
        values: &mut [Vec<u8>],
        shared: &[Vec<u8>],
        ids: &Ids,
        stamp: &Stamp,
        scratch: &mut Vec<u8>,
        rendered: &mut Rendered,
        out: &mut BytesMut,
    ) -> Result<Drawn, String> {
        match &step.prebuilt {
            Some(pb) => Ok(pb.render(step, values, ids, stamp, scratch, out)),
            None => render_fields(
                self.spec(),
                &self.head,
                step,
                values,
                shared,
                ids,
                stamp,
                scratch,
                rendered,
                out,
            ),
        }
    }
}

/// Renders every field template of `step` as text, then encodes the message after `head`:
/// the general path, for steps that refer to earlier values or carry generated binary fields.
#[allow(clippy::too_many_arguments)]
fn render_fields(
    spec: &Spec,
    head: &[u8],
    step: &Step,
    values: &mut [Vec<u8>],
    shared: &[Vec<u8>],
    ids: &Ids,
    stamp: &Stamp,
    scratch: &mut Vec<u8>,
    rendered: &mut Rendered,
    out: &mut BytesMut,
) -> Result<Drawn, String> {
    scratch.clear();
    rendered.spans.clear();
    let mut drawn = Drawn::default();
    for t in &step.fields {
        let start = scratch.len();
        for p in &t.pieces {
            render_piece(p, values, shared, ids, stamp, &mut drawn, scratch)
                .map_err(|e| format!("step {}: DE{}: {e}", step.name, t.field))?;
        }
        let end = scratch.len();
        let mut span = (t.field, start, end, start, end);
        if t.hex {
            let bin = hex::decode(&scratch[start..]).map_err(|_| {
                format!("step {}: DE{}: binary field is not hex", step.name, t.field)
            })?;
            scratch.extend_from_slice(&bin);
            span = (t.field, start, end, end, scratch.len());
        }
        rendered.spans.push(span);
    }
    for &(field, capture) in &step.keep_req {
        let text = rendered
            .spans
            .iter()
            .find(|span| span.0 == field)
            .and_then(|&(_, s, e, _, _)| scratch.get(s..e));
        if let (Some(text), Some(slot)) = (text, values.get_mut(capture)) {
            slot.clear();
            slot.extend_from_slice(text);
        }
    }
    drawn.de11 = rendered
        .spans
        .iter()
        .find(|span| span.0 == 11)
        .and_then(|&(_, s, e, _, _)| scratch.get(s..e))
        .and_then(parse_stan);
    let mut list: FieldList<'_, REQUEST_FIELDS_MAX> = FieldList::new();
    for &(field, _, _, s, e) in &rendered.spans {
        let bytes = scratch.get(s..e).unwrap_or_default();
        list.set(field, Value::Text(bytes))
            .map_err(|e| format!("step {}: {e}", step.name))?;
    }
    out.extend_from_slice(head);
    iso8583::encode(spec, step.mti, list.as_slice(), out)
        .map_err(|e| format!("step {}: {e}", step.name))?;
    Ok(drawn)
}

fn parse_stan(text: &[u8]) -> Option<u32> {
    std::str::from_utf8(text).ok().and_then(|t| t.parse().ok())
}

/// A value generated per request, written at a fixed place of a [`Prebuilt`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generated {
    Stan,
    Rrn,
    De7,
    Time,
    Date,
}

impl Generated {
    fn of(p: &Piece) -> Option<Generated> {
        match p {
            Piece::Stan => Some(Generated::Stan),
            Piece::Rrn => Some(Generated::Rrn),
            Piece::De7 => Some(Generated::De7),
            Piece::Time => Some(Generated::Time),
            Piece::Date => Some(Generated::Date),
            Piece::Lit(_) | Piece::Ref { .. } => None,
        }
    }

    /// Characters it renders to (always the same).
    fn len(self) -> usize {
        match self {
            Generated::Stan | Generated::Time => 6,
            Generated::Rrn => 12,
            Generated::De7 => 10,
            Generated::Date => 4,
        }
    }
}

/// DE11 of a prebuilt step's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum De11 {
    /// Absent, or a literal (parsed once).
    Fixed(Option<u32>),
    /// Exactly `{stan}`.
    Stan,
    /// Anything else: rendered and parsed per request.
    Render,
}

/// A step whose every field is literal text or a fixed-width generated value (`{stan}`,
/// `{rrn}`, `{de7}`, `{time}`, `{date}`) in a field the dialect carries as the characters
/// themselves: encoded once at compile time, then copied and patched in place per request,
/// the way a hand-written client resends one message with a new STAN.
#[derive(Debug)]
pub(crate) struct Prebuilt {
    /// Head + message with placeholder characters where generated values go.
    bytes: Vec<u8>,
    /// Where each generated value goes in `bytes`.
    patches: Vec<(usize, Generated)>,
    stan: bool,
    rrn: bool,
    de11: De11,
}

impl Prebuilt {
    /// The template of `step`, when it has one: every generated value must land as its own
    /// characters at one place of the encoding (found by encoding with different placeholder
    /// characters), and the result must equal the general path's for sample values.
    fn build(spec: &Spec, head: &[u8], step: &Step) -> Option<Prebuilt> {
        let mut generated = Vec::new();
        for t in &step.fields {
            for p in &t.pieces {
                match (Generated::of(p), p) {
                    (_, Piece::Ref { .. }) => return None,
                    (Some(_), _) if t.hex => return None,
                    (Some(g), _) => generated.push(g),
                    (None, _) => {}
                }
            }
        }
        let base = encode_filled(spec, head, step, None)?;
        let mut patches = Vec::with_capacity(generated.len());
        for (j, &g) in generated.iter().enumerate() {
            let other = encode_filled(spec, head, step, Some(j))?;
            if other.len() != base.len() {
                return None;
            }
            let first = base.iter().zip(&other).position(|(a, b)| a != b)?;
            let last = base.iter().zip(&other).rposition(|(a, b)| a != b)?;
            let differing = base.iter().zip(&other).filter(|(a, b)| a != b).count();
            if last + 1 - first != g.len() || differing != g.len() {
                return None;
            }
            patches.push((first, g));
        }
        let de11 = match step.fields.iter().find(|t| t.field == 11) {
            None => De11::Fixed(None),
            Some(t) => match t.pieces.as_slice() {
                [Piece::Stan] => De11::Stan,
                [Piece::Lit(text)] => De11::Fixed(parse_stan(text)),
                _ => De11::Render,
            },
        };
        let pb = Prebuilt {
            bytes: base,
            stan: generated.contains(&Generated::Stan),
            rrn: generated.contains(&Generated::Rrn),
            patches,
            de11,
        };
        // The template must say exactly what the general path says.
        for (stan, rrn, unix_s) in [
            (123_456, 9_876_543, 1_795_618_903),
            (999_999, 1, 1_709_251_259),
        ] {
            let stamp = Stamp::at(unix_s, 0);
            let (a, b) = (Ids::at(stan, rrn), Ids::at(stan, rrn));
            let (mut out_a, mut out_b) = (BytesMut::new(), BytesMut::new());
            let (mut scratch, mut rendered) = (Vec::new(), Rendered::default());
            let slow = render_fields(
                spec,
                head,
                step,
                &mut [],
                &[],
                &a,
                &stamp,
                &mut scratch,
                &mut rendered,
                &mut out_a,
            )
            .ok()?;
            let fast = pb.render(step, &mut [], &b, &stamp, &mut scratch, &mut out_b);
            if out_a != out_b || slow.de11 != fast.de11 || slow.stan != fast.stan {
                return None;
            }
        }
        Some(pb)
    }

    /// Copies the message into `out` and writes this request's generated values into it.
    fn render(
        &self,
        step: &Step,
        values: &mut [Vec<u8>],
        ids: &Ids,
        stamp: &Stamp,
        scratch: &mut Vec<u8>,
        out: &mut BytesMut,
    ) -> Drawn {
        let mut drawn = Drawn::default();
        let mut stan_digits = [0u8; 6];
        if self.stan {
            let stan = ids.stan();
            put_digits(&mut stan_digits, u64::from(stan));
            drawn.stan = Some(stan);
        }
        let mut rrn = [0u8; 12];
        if self.rrn {
            rrn[..5].copy_from_slice(&stamp.rrn_head);
            put_digits(&mut rrn[5..], ids.rrn_serial());
            drawn.rrn = Some(rrn);
        }
        let at = out.len();
        out.extend_from_slice(&self.bytes);
        let msg = &mut out[at..];
        for &(off, g) in &self.patches {
            let value: &[u8] = match g {
                Generated::Stan => &stan_digits,
                Generated::Rrn => &rrn,
                Generated::De7 => &stamp.de7,
                Generated::Time => &stamp.time,
                Generated::Date => &stamp.date,
            };
            if let Some(dst) = msg.get_mut(off..off + value.len()) {
                dst.copy_from_slice(value);
            }
        }
        drawn.de11 = match self.de11 {
            De11::Fixed(v) => v,
            De11::Stan => drawn.stan,
            De11::Render => {
                field_text(step, 11, ids, stamp, &mut drawn, scratch);
                parse_stan(scratch)
            }
        };
        for &(field, capture) in &step.keep_req {
            field_text(step, field, ids, stamp, &mut drawn, scratch);
            if let Some(slot) = values.get_mut(capture) {
                slot.clear();
                slot.extend_from_slice(scratch);
            }
        }
        drawn
    }
}

/// The text of request field `field` of a prebuilt step (no references) into `scratch`, with
/// the values already drawn for this request.
fn field_text(
    step: &Step,
    field: u8,
    ids: &Ids,
    stamp: &Stamp,
    drawn: &mut Drawn,
    scratch: &mut Vec<u8>,
) {
    scratch.clear();
    if let Some(t) = step.fields.iter().find(|t| t.field == field) {
        for p in &t.pieces {
            // Without references rendering cannot fail.
            let _ = render_piece(p, &[], &[], ids, stamp, drawn, scratch);
        }
    }
}

/// Encodes `step` with every generated value written as `1`s, except the `varied`-th, written
/// as `2`s; `None` when it does not encode.
fn encode_filled(spec: &Spec, head: &[u8], step: &Step, varied: Option<usize>) -> Option<Vec<u8>> {
    let mut scratch = Vec::new();
    let mut spans = Vec::with_capacity(step.fields.len());
    let mut k = 0usize;
    for t in &step.fields {
        let start = scratch.len();
        for p in &t.pieces {
            match (p, Generated::of(p)) {
                (Piece::Lit(b), _) => scratch.extend_from_slice(b),
                (_, Some(g)) => {
                    let c = if varied == Some(k) { b'2' } else { b'1' };
                    scratch.extend(std::iter::repeat_n(c, g.len()));
                    k += 1;
                }
                _ => return None,
            }
        }
        if t.hex {
            let bin = hex::decode(&scratch[start..]).ok()?;
            scratch.truncate(start);
            scratch.extend_from_slice(&bin);
        }
        spans.push((t.field, start, scratch.len()));
    }
    let mut list: FieldList<'_, REQUEST_FIELDS_MAX> = FieldList::new();
    for &(field, s, e) in &spans {
        list.set(field, Value::Text(scratch.get(s..e)?)).ok()?;
    }
    let mut out = BytesMut::from(head);
    iso8583::encode(spec, step.mti, list.as_slice(), &mut out).ok()?;
    Some(out.to_vec())
}

impl Step {
    /// Checks an answer against the expectation. `stan` is the request's DE11. Returns a
    /// description of the first difference.
    pub(crate) fn verify(&self, msg: &Message<'_>, stan: Option<u32>) -> Result<(), Difference> {
        let code = msg.response_code().unwrap_or("--");
        let reason = msg.reason();
        let diff = |what: &'static str| Difference {
            what,
            expected_mti: self.expect.mti,
            got_mti: msg.mti(),
            expected_codes: self.expect.codes.clone(),
            got_code: code.to_string(),
            expected_reason: self.expect.reason.clone(),
            got_reason: reason.map(str::to_string),
        };
        if msg.mti() != self.expect.mti {
            return Err(diff("response MTI"));
        }
        if stan.is_some() && msg.stan() != stan {
            return Err(diff("DE11 echo"));
        }
        if !self.expect.codes.iter().any(|c| c == code) {
            return Err(diff("DE39"));
        }
        if let Some(want) = &self.expect.reason {
            if reason.map(str::trim_end) != Some(want.as_str()) {
                return Err(diff("DE44"));
            }
        }
        Ok(())
    }

    /// Keeps the answer values later steps need; names the first field the answer lacks.
    pub(crate) fn keep_answer(&self, msg: &Message<'_>, values: &mut [Vec<u8>]) -> Result<(), u8> {
        for &(field, capture) in &self.keep_ans {
            let text = iso8583::json::field_text(msg, usize::from(field)).ok_or(field)?;
            if let Some(slot) = values.get_mut(capture) {
                slot.clear();
                slot.extend_from_slice(text.as_bytes());
            }
        }
        Ok(())
    }
}

/// How an answer differed from what its step expected.
#[derive(Debug, Clone)]
pub(crate) struct Difference {
    pub what: &'static str,
    pub expected_mti: Mti,
    pub got_mti: Mti,
    pub expected_codes: Vec<String>,
    pub got_code: String,
    pub expected_reason: Option<String>,
    pub got_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The file shape.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    name: Option<String>,
    #[allow(dead_code)] // Read by people; kept so a typo in the key is still rejected.
    description: Option<String>,
    dialect: String,
    /// A dialect file (relative to the scenario) loaded before `dialect` is looked up; read
    /// by [`Scenario::load`] only.
    #[allow(dead_code)]
    dialect_file: Option<PathBuf>,
    tpdu: Option<String>,
    header: Option<String>,
    utc_offset: Option<String>,
    #[serde(default)]
    setup: Vec<StepDoc>,
    #[serde(default)]
    session: Vec<SessionDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionDoc {
    name: String,
    #[serde(default = "one")]
    weight: u32,
    step: Vec<StepDoc>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDoc {
    name: String,
    mti: String,
    copy: Option<String>,
    #[serde(default)]
    remove: Vec<u8>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    expect: ExpectDoc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectDoc {
    code: Codes,
    reason: Option<String>,
    mti: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Codes {
    One(String),
    Any(Vec<String>),
}

// ---------------------------------------------------------------------------------------------
// Compilation.

/// Loads the scenario's `dialect_file` (relative to the scenario file) into the registry.
fn load_dialect_file(scenario: &std::path::Path, text: &str) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Listed {
        dialect_file: Option<PathBuf>,
    }
    let Ok(Listed {
        dialect_file: Some(file),
    }) = toml::from_str::<Listed>(text)
    else {
        return Ok(()); // None listed; or the full parse names the error.
    };
    let path = scenario
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(file);
    crate::dialect::Dialect::load_file(&path)
        .map(|_| ())
        .map_err(|e| format!("dialect_file: {e}"))
}

/// Names and field texts of steps compiled so far, for references and `copy`.
struct Known<'d> {
    /// (name, request field numbers) of the setup steps.
    setup: Vec<(&'d str, Vec<u8>)>,
    /// (name, request field numbers) of the earlier steps of the session being compiled.
    session: Vec<(&'d str, Vec<u8>)>,
}

fn compile(default_name: &str, doc: FileDoc) -> Result<Scenario, ScenarioError> {
    let err = |m: String| ScenarioError(m);
    let dialect =
        crate::dialect::Dialect::named(&doc.dialect).map_err(|e| err(format!("dialect: {e}")))?;
    let head = head(dialect, doc.tpdu.as_deref(), doc.header.as_deref())?;
    let utc_offset_s = match doc.utc_offset.as_deref() {
        None => 0,
        Some(s) => {
            parse_offset(s).ok_or_else(|| err(format!("utc_offset: {s:?} is not ±HH:MM")))?
        }
    };
    if doc.session.is_empty() || doc.session.len() > SESSIONS_MAX {
        return Err(err(format!("want 1..={SESSIONS_MAX} [[session]] tables")));
    }
    let spec = dialect.spec();
    let mut setup = Session {
        name: "setup".into(),
        steps: Vec::new(),
        captures: Vec::new(),
    };
    let mut known = Known {
        setup: Vec::new(),
        session: Vec::new(),
    };
    check_steps(&doc.setup, "setup")?;
    for s in &doc.setup {
        let step = compile_step(spec, s, &mut known, &mut setup.captures, None)?;
        known.session.push((
            s.name.as_str(),
            step.fields.iter().map(|f| f.field).collect(),
        ));
        setup.steps.push(step);
    }
    known.setup = std::mem::take(&mut known.session);
    let mut sessions = Vec::with_capacity(doc.session.len());
    for sd in &doc.session {
        if sd.weight == 0 {
            return Err(err(format!(
                "session {}: weight must be at least 1",
                sd.name
            )));
        }
        check_steps(&sd.step, &sd.name)?;
        known.session.clear();
        let mut session = Session {
            name: sd.name.clone(),
            steps: Vec::new(),
            captures: Vec::new(),
        };
        for s in &sd.step {
            if known.setup.iter().any(|(n, _)| *n == s.name) {
                return Err(err(format!(
                    "session {}: step {}: name used by a setup step",
                    sd.name, s.name
                )));
            }
            let step = compile_step(
                spec,
                s,
                &mut known,
                &mut session.captures,
                Some(&mut setup.captures),
            )
            .map_err(|e| err(format!("session {}: {}", sd.name, e.0)))?;
            known.session.push((
                s.name.as_str(),
                step.fields.iter().map(|f| f.field).collect(),
            ));
            session.steps.push(step);
        }
        link_captures(&mut session);
        sessions.push(session);
    }
    link_captures(&mut setup);
    for step in setup
        .steps
        .iter_mut()
        .chain(sessions.iter_mut().flat_map(|s| s.steps.iter_mut()))
    {
        step.prebuilt = Prebuilt::build(spec, &head, step);
    }
    let weights: Vec<u32> = doc.session.iter().map(|s| s.weight).collect();
    let wheel = wheel(&weights)?;
    Ok(Scenario {
        name: doc.name.unwrap_or_else(|| default_name.to_string()),
        dialect,
        head,
        utc_offset_s,
        setup,
        sessions,
        wheel,
    })
}

fn check_steps(steps: &[StepDoc], owner: &str) -> Result<(), ScenarioError> {
    if steps.len() > STEPS_MAX || (owner != "setup" && steps.is_empty()) {
        return Err(ScenarioError(format!(
            "{owner}: want 1..={STEPS_MAX} steps"
        )));
    }
    for (i, s) in steps.iter().enumerate() {
        if steps[..i].iter().any(|o| o.name == s.name) {
            return Err(ScenarioError(format!(
                "{owner}: step name {} used twice",
                s.name
            )));
        }
    }
    Ok(())
}

fn head(
    dialect: Dialect,
    tpdu: Option<&str>,
    header: Option<&str>,
) -> Result<Vec<u8>, ScenarioError> {
    if !dialect.has_tpdu() {
        if tpdu.is_some() || header.is_some() {
            return Err(ScenarioError(format!(
                "tpdu/header: {} frames carry none",
                dialect.name()
            )));
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(11);
    for (key, text, len) in [
        ("tpdu", tpdu.unwrap_or("6000030000"), 5),
        ("header", header.unwrap_or("603100310000"), 6),
    ] {
        let bytes = hex::decode(text)
            .ok()
            .filter(|b| b.len() == len)
            .ok_or_else(|| ScenarioError(format!("{key}: want {len} bytes of hex")))?;
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

fn compile_step(
    spec: &Spec,
    s: &StepDoc,
    known: &mut Known<'_>,
    captures: &mut Vec<Capture>,
    mut setup_captures: Option<&mut Vec<Capture>>,
) -> Result<Step, ScenarioError> {
    let err = |m: String| ScenarioError(format!("step {}: {m}", s.name));
    let mti = Mti::from_ascii(s.mti.as_bytes())
        .ok_or_else(|| err(format!("mti {:?}: want 4 digits", s.mti)))?;
    let mut texts: BTreeMap<u8, Vec<Piece>> = BTreeMap::new();
    if let Some(from) = &s.copy {
        let fields = known
            .session
            .iter()
            .chain(known.setup.iter())
            .find(|(n, _)| n == from)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| err(format!("copy: no earlier step {from:?}")))?;
        for f in fields {
            let reference = format!("{from}.req.{f}");
            let piece = reference_piece(&reference, known, captures, setup_captures.as_deref_mut())
                .map_err(|m| err(format!("copy: {m}")))?;
            texts.insert(f, vec![piece]);
        }
    }
    for f in &s.remove {
        texts.remove(f);
    }
    for (k, v) in &s.fields {
        let field: u8 = k
            .parse()
            .ok()
            .filter(|n| (2..=128).contains(n))
            .ok_or_else(|| err(format!("fields.{k}: not a field number 2..128")))?;
        let pieces = parse_template(v, known, captures, setup_captures.as_deref_mut())
            .map_err(|m| err(format!("fields.{k}: {m}")))?;
        texts.insert(field, pieces);
    }
    if texts.len() > REQUEST_FIELDS_MAX {
        return Err(err(format!("more than {REQUEST_FIELDS_MAX} fields")));
    }
    let mut fields = Vec::with_capacity(texts.len());
    for (field, pieces) in texts {
        let fs = spec
            .field(usize::from(field))
            .ok_or_else(|| err(format!("DE{field} is not in the {} dialect", spec.name())))?;
        let hex = fs.encoding == iso8583::spec::Encoding::Binary;
        fields.push(FieldTemplate { field, pieces, hex });
    }
    Ok(Step {
        name: s.name.clone(),
        mti,
        fields,
        expect: expect(&s.expect, mti).map_err(err)?,
        keep_req: Vec::new(),
        keep_ans: Vec::new(),
        prebuilt: None,
    })
}

fn expect(e: &ExpectDoc, request: Mti) -> Result<Expect, String> {
    let codes = match &e.code {
        Codes::One(c) => vec![c.clone()],
        Codes::Any(cs) => cs.clone(),
    };
    if codes.is_empty() || codes.iter().any(|c| c.len() != 2) {
        return Err("expect.code: want a two-character DE39 value or a list of them".into());
    }
    if let Some(r) = &e.reason {
        if r.is_empty() || r.len() > crate::limits::REASON_BYTES_MAX {
            return Err("expect.reason: want 1..=25 characters".into());
        }
    }
    let mti = match &e.mti {
        None => request.response(),
        Some(m) => Mti::from_ascii(m.as_bytes())
            .ok_or_else(|| format!("expect.mti {m:?}: want 4 digits"))?,
    };
    Ok(Expect {
        mti,
        codes,
        reason: e.reason.clone(),
    })
}

/// Splits a template into literal text and placeholders.
fn parse_template(
    text: &str,
    known: &Known<'_>,
    captures: &mut Vec<Capture>,
    mut setup_captures: Option<&mut Vec<Capture>>,
) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Lit(rest.as_bytes()[..open].into()));
        }
        let close = rest[open..].find('}').ok_or("`{` without `}`")? + open;
        let name = &rest[open + 1..close];
        let piece = match name {
            "stan" => Piece::Stan,
            "rrn" => Piece::Rrn,
            "de7" => Piece::De7,
            "time" => Piece::Time,
            "date" => Piece::Date,
            _ => reference_piece(name, known, captures, setup_captures.as_deref_mut())?,
        };
        pieces.push(piece);
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err("`}` without `{`".into());
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.as_bytes().into()));
    }
    Ok(pieces)
}

/// `STEP.req.N`, `STEP.ans.N`, optionally followed by `[a..b]`.
fn reference_piece(
    text: &str,
    known: &Known<'_>,
    captures: &mut Vec<Capture>,
    setup_captures: Option<&mut Vec<Capture>>,
) -> Result<Piece, String> {
    let (body, range) = match text.find('[') {
        None => (text, None),
        Some(i) => {
            let r = text[i + 1..]
                .strip_suffix(']')
                .ok_or_else(|| format!("{{{text}}}: `[` without `]`"))?;
            let (a, b) = r
                .split_once("..")
                .ok_or_else(|| format!("{{{text}}}: want [a..b]"))?;
            let a: usize = a
                .parse()
                .map_err(|_| format!("{{{text}}}: bad range start"))?;
            let b: usize = b
                .parse()
                .map_err(|_| format!("{{{text}}}: bad range end"))?;
            if a >= b {
                return Err(format!("{{{text}}}: empty range"));
            }
            (&text[..i], Some((a, b)))
        }
    };
    let mut parts = body.split('.');
    let (Some(step), Some(side), Some(field), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "{{{text}}}: unknown placeholder (stan, rrn, de7, time, date, STEP.req.N, STEP.ans.N)"
        ));
    };
    let side = match side {
        "req" => Side::Req,
        "ans" => Side::Ans,
        _ => return Err(format!("{{{text}}}: want req or ans")),
    };
    let field: u8 = field
        .parse()
        .ok()
        .filter(|n| (2..=128).contains(n))
        .ok_or_else(|| format!("{{{text}}}: bad field number"))?;
    let (scope, index, list) = if let Some(i) = known.session.iter().position(|(n, _)| *n == step) {
        (Scope::Session, i, captures)
    } else if let Some(i) = known.setup.iter().position(|(n, _)| *n == step) {
        let list = setup_captures
            .ok_or_else(|| format!("{{{text}}}: setup steps refer to earlier setup steps"))?;
        (Scope::Setup, i, list)
    } else {
        return Err(format!("{{{text}}}: no earlier step {step:?}"));
    };
    let wanted = Capture {
        step: index,
        side,
        field,
    };
    let capture = match list.iter().position(|c| *c == wanted) {
        Some(i) => i,
        None => {
            list.push(wanted);
            list.len() - 1
        }
    };
    Ok(Piece::Ref {
        scope,
        capture,
        range,
    })
}

/// Fills each step's `keep_req`/`keep_ans` from the session's capture list.
fn link_captures(session: &mut Session) {
    for (i, c) in session.captures.iter().enumerate() {
        if let Some(step) = session.steps.get_mut(c.step) {
            match c.side {
                Side::Req => step.keep_req.push((c.field, i)),
                Side::Ans => step.keep_ans.push((c.field, i)),
            }
        }
    }
}

/// Smooth weighted round-robin order of session indices: a session of weight w appears w
/// times, spread out.
fn wheel(weights: &[u32]) -> Result<Vec<u16>, ScenarioError> {
    let total: u32 = weights.iter().sum();
    if total > WEIGHT_SUM_MAX {
        return Err(ScenarioError(format!(
            "session weights add up to more than {WEIGHT_SUM_MAX}"
        )));
    }
    let mut current: Vec<i64> = vec![0; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        current[best] -= i64::from(total);
        out.push(best as u16);
    }
    Ok(out)
}

fn parse_offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

fn render_piece(
    p: &Piece,
    values: &[Vec<u8>],
    shared: &[Vec<u8>],
    ids: &Ids,
    stamp: &Stamp,
    drawn: &mut Drawn,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    match p {
        Piece::Lit(b) => out.extend_from_slice(b),
        Piece::Stan => {
            let stan = *drawn.stan.get_or_insert_with(|| ids.stan());
            let mut d = [0u8; 6];
            put_digits(&mut d, u64::from(stan));
            out.extend_from_slice(&d);
        }
        Piece::Rrn => {
            let rrn = drawn.rrn.get_or_insert_with(|| {
                let mut r = [0u8; 12];
                r[..5].copy_from_slice(&stamp.rrn_head);
                put_digits(&mut r[5..], ids.rrn_serial());
                r
            });
            out.extend_from_slice(rrn);
        }
        Piece::De7 => out.extend_from_slice(&stamp.de7),
        Piece::Time => out.extend_from_slice(&stamp.time),
        Piece::Date => out.extend_from_slice(&stamp.date),
        Piece::Ref {
            scope,
            capture,
            range,
        } => {
            let list = match scope {
                Scope::Session => values,
                Scope::Setup => shared,
            };
            let v = list
                .get(*capture)
                .ok_or("reference to a value never captured")?;
            let v = match range {
                None => v.as_slice(),
                Some((a, b)) => v.get(*a..*b).ok_or_else(|| {
                    format!("range {a}..{b} outside a value of {} characters", v.len())
                })?,
            };
            out.extend_from_slice(v);
        }
    }
    Ok(())
}

/// Writes `v` as zero-left-padded decimal digits filling `out` (higher digits dropped).
fn put_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// A UTC calendar date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    day_of_year: u32,
}

impl Civil {
    fn from_unix(unix_s: i64) -> Civil {
        let secs = unix_s.rem_euclid(86_400) as u32;
        let date = crate::date::Civil::from_unix(unix_s);
        Civil {
            month: date.month,
            day: date.day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            day_of_year: date.day_of_year(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
mod tests {
    use super::*;

    #[test]
    fn civil_time_matches_known_dates() {
        // 2026-11-25 15:01:43 UTC
        let c = Civil::from_unix(1_795_618_903);
        assert_eq!(
            (c.month, c.day, c.hour, c.minute, c.second),
            (11, 25, 15, 1, 43)
        );
        assert_eq!(c.day_of_year, 329);
        // 2024-03-01 00:00:00 UTC, a leap year
        let c = Civil::from_unix(1_709_251_200);
        assert_eq!((c.month, c.day, c.day_of_year), (3, 1, 61));
    }

    #[test]
    fn stamp_writes_de7_and_local_fields() {
        let s = Stamp::at(1_795_618_903, 8 * 3600);
        assert_eq!(&s.de7, b"1125150143");
        assert_eq!(&s.time, b"230143");
        assert_eq!(&s.date, b"1125");
        assert_eq!(&s.rrn_head, b"32915");
    }

    #[test]
    fn wheel_spreads_sessions_by_weight() {
        let w = wheel(&[3, 1]).unwrap();
        assert_eq!(w.len(), 4);
        assert_eq!(w.iter().filter(|&&i| i == 1).count(), 1);
    }

    #[test]
    fn stans_stay_in_range_and_differ() {
        let ids = Ids::new(None);
        let a = ids.stan();
        let b = ids.stan();
        assert!((1..=999_999).contains(&a) && (1..=999_999).contains(&b));
        assert_ne!(a, b);
        let ids = Ids::new(Some(999_999));
        assert_eq!((ids.stan(), ids.stan(), ids.stan_after()), (999_999, 1, 2));
    }

    #[test]
    fn unknown_reference_is_rejected_with_the_step_name() {
        let text = r#"
            dialect = "ascii1987"
            [[session]]
            name = "s"
            [[session.step]]
            name = "refund"
            mti = "0200"
            fields = { 11 = "{stan}", 37 = "{sale.ans.37}" }
            expect = { code = "00" }
        "#;
        let e = Scenario::from_toml("x", text).unwrap_err();
        assert!(e.0.contains("refund") && e.0.contains("sale"), "{e}");
    }

    #[test]
    fn every_replay_fixture_compiles() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/replay");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 11, "only {n} fixtures");
    }

    #[test]
    fn plain_steps_are_prebuilt_and_steps_with_references_are_not() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/replay");
        let sc = Scenario::load(&dir.join("ceiling-echo.toml")).unwrap();
        assert!(sc.sessions[0].steps[0].prebuilt.is_some());
        let sc = Scenario::load(&dir.join("mixed-day-ascii1987.toml")).unwrap();
        let steps = sc.sessions.iter().flat_map(|s| &s.steps);
        let with_refs = |s: &&Step| {
            s.fields
                .iter()
                .any(|t| t.pieces.iter().any(|p| matches!(p, Piece::Ref { .. })))
        };
        assert!(steps
            .clone()
            .filter(with_refs)
            .all(|s| s.prebuilt.is_none()));
        assert!(steps.clone().any(|s| s.prebuilt.is_some()));
    }

    #[test]
    fn a_prebuilt_step_patches_fresh_values_into_every_request() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/replay");
        let sc = Scenario::load(&dir.join("ceiling-echo.toml")).unwrap();
        let step = &sc.sessions[0].steps[0];
        let ids = Ids::new(Some(41));
        let (mut scratch, mut rendered) = (Vec::new(), Rendered::default());
        let mut seen = Vec::new();
        for (i, unix_s) in [1_795_618_903, 1_795_618_904].into_iter().enumerate() {
            let stamp = Stamp::at(unix_s, 0);
            let mut out = BytesMut::new();
            let d = sc
                .render(
                    step,
                    &mut [],
                    &[],
                    &ids,
                    &stamp,
                    &mut scratch,
                    &mut rendered,
                    &mut out,
                )
                .unwrap();
            let msg = iso8583::decode(&iso8583::ASCII1987, &out).unwrap();
            assert_eq!(msg.stan(), Some(41 + i as u32));
            assert_eq!(d.de11, msg.stan());
            assert_eq!(
                iso8583::json::field_text(&msg, 7).unwrap(),
                std::str::from_utf8(&stamp.de7).unwrap()
            );
            seen.push(out);
        }
        assert_ne!(seen[0], seen[1]);
    }

    #[test]
    fn references_render_earlier_values_and_copy_keeps_the_stan() {
        let text = r#"
            dialect = "ascii1987"
            [[session]]
            name = "s"
            [[session.step]]
            name = "sale"
            mti = "0200"
            fields = { 3 = "000000", 4 = "000000001000", 7 = "{de7}", 11 = "{stan}", 41 = "TERM0001" }
            expect = { code = "00" }
            [[session.step]]
            name = "rev"
            mti = "0400"
            copy = "sale"
            remove = [41]
            fields = { 90 = "0200{sale.req.11}{sale.req.7}0000001234500000000000", 37 = "{sale.ans.37[0..12]}" }
            expect = { code = "00" }
        "#;
        let sc = Scenario::from_toml("x", text).unwrap();
        let session = &sc.sessions[0];
        // The sale is copied and patched; the reversal, with references, is rendered.
        assert!(session.steps[0].prebuilt.is_some() && session.steps[1].prebuilt.is_none());
        let ids = Ids::new(None);
        let stamp = Stamp::at(1_795_618_903, 0);
        let mut values = vec![Vec::new(); session.captures.len()];
        let (mut scratch, mut rendered, mut out) =
            (Vec::new(), Rendered::default(), BytesMut::new());
        let d = sc
            .render(
                &session.steps[0],
                &mut values,
                &[],
                &ids,
                &stamp,
                &mut scratch,
                &mut rendered,
                &mut out,
            )
            .unwrap();
        let stan = d.de11.unwrap();
        assert_eq!(d.stan, d.de11);
        // Pretend the answer carried an RRN.
        let rrn_capture = session
            .captures
            .iter()
            .position(|c| c.side == Side::Ans)
            .unwrap();
        values[rrn_capture] = b"633209000123".to_vec();
        out.clear();
        sc.render(
            &session.steps[1],
            &mut values,
            &[],
            &ids,
            &stamp,
            &mut scratch,
            &mut rendered,
            &mut out,
        )
        .unwrap();
        let msg = iso8583::decode(&iso8583::ASCII1987, &out).unwrap();
        assert_eq!(msg.stan(), Some(stan));
        assert_eq!(msg.rrn(), Some("633209000123"));
        assert_eq!(msg.terminal(), None);
        let od = msg.original_data().unwrap();
        assert_eq!(od.stan, stan);
        assert_eq!(od.transmission, 1_125_150_143);
    }
}
