//! Rendering a decision as a response message (DOMAIN §3, §5, §11).

use bytes::BytesMut;

use super::{ids, Kind, Link};
use crate::dialect::NetworkCode;
use crate::iso8583::{self, FieldList, Message, Value};
use crate::ledger::Operation;
use crate::ledger::{Decision, Reason};
use crate::mac::{self, MacKey};

/// Elements echoed when the request was malformed: only what identifies it.
const ECHO_FORMAT_ERROR: &[u8] = &[3, 11, 41, 42];

/// The keys of one answer: the MAC key of the terminal (its MAK, or the link's key) and, for a
/// sign-on, the working keys in DE62.
#[derive(Clone, Copy, Default)]
pub(super) struct Keys<'a> {
    /// Key of the MAC an approval carries; `None`: no MAC.
    pub mac: Option<&'a MacKey>,
    /// DE62 of a `cup_pos` sign-on answer (PIK and MAK under the TMK with check values).
    pub de62: Option<&'a [u8]>,
}

/// Writes the response to `req` carrying `d` into `out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn response(
    l: &Link,
    req: &Message<'_>,
    kind: Kind,
    d: &Decision,
    sale_rrn: Option<[u8; 12]>,
    batch: Option<u32>,
    keys: Keys<'_>,
    out: &mut BytesMut,
) {
    // A repeat of a host's decline gets the host's code again (DOMAIN §6).
    let host = d.host_code();
    let code = match &host {
        Some(c) => &c[..],
        None => d.reason.code(l.dialect.code_column).as_bytes(),
    };
    render(l, req, kind, d, code, sale_rrn, batch, keys, out);
}

/// Writes the decline of `req` by an upstream host into `out`: DE39 is the host's `code`
/// (the reason table cannot carry it), DE44 `HOST_DECLINED`.
pub(super) fn host_declined(
    l: &Link,
    req: &Message<'_>,
    kind: Kind,
    d: &Decision,
    code: &[u8; 2],
    out: &mut BytesMut,
) {
    // A decline: no MAC, no keys.
    render(l, req, kind, d, code, None, None, Keys::default(), out);
}

// One private renderer behind the two entry points; the arguments are the parts of a response.
#[allow(clippy::too_many_arguments)]
fn render(
    l: &Link,
    req: &Message<'_>,
    kind: Kind,
    d: &Decision,
    code: &[u8],
    sale_rrn: Option<[u8; 12]>,
    batch: Option<u32>,
    keys: Keys<'_>,
    out: &mut BytesMut,
) {
    let mut fields: FieldList<'_, 32> = FieldList::new();
    // A full list cannot happen: 32 slots, a dialect file echoes at most
    // `dialect::ECHO_FIELDS_MAX` (16) elements and at most 8 more are set here.
    let echo = match d.reason == Reason::FORMAT_ERROR {
        true => ECHO_FORMAT_ERROR,
        false => &l.dialect.echo[..],
    };
    for &n in echo {
        let _ = fields.echo(req, n);
    }
    let approved = d.is_approved();
    let rrn_bytes;
    let auth;
    if approved
        && matches!(
            kind,
            Kind::Op(Operation::Sale | Operation::Refund | Operation::Void)
        )
    {
        rrn_bytes = sale_rrn.unwrap_or_else(|| {
            let mut r = [b'0'; 12];
            if let Some(x) = req.rrn().map(str::as_bytes).filter(|x| x.len() == 12) {
                r.copy_from_slice(x);
            }
            r
        });
        if sale_rrn.is_some() {
            let _ = fields.set(37, Value::Text(&rrn_bytes));
        }
        auth = ids::auth_code(
            &rrn_bytes,
            req.field_bytes(11).unwrap_or(&[]),
            req.terminal().unwrap_or("").as_bytes(),
            req.merchant().unwrap_or("").as_bytes(),
        );
        let _ = fields.set(38, Value::Text(&auth));
    }
    let _ = fields.set(39, Value::Text(code));
    let reason = d.reason.as_str();
    let _ = fields.set(44, Value::Text(reason.as_bytes()));
    let de54 = if matches!(kind, Kind::Op(Operation::Refund | Operation::Void)) {
        d.de54()
    } else {
        None
    };
    if let Some(text) = &de54 {
        let _ = fields.set(54, Value::Text(text.as_bytes()));
    }
    let de60;
    if let (Some(b), NetworkCode::De60_3) = (batch, l.dialect.network_code) {
        de60 = cup_signon_60(b);
        let _ = fields.set(60, Value::Text(&de60));
    }
    if let (Some(de62), true) = (keys.de62, approved) {
        let _ = fields.set(62, Value::Text(de62));
    }
    let mac_field = mac_field(keys.mac, approved, &fields, l.spec);
    let placeholder = [b'0'; 16];
    if let Some((n, len)) = mac_field {
        let _ = fields.set(n, Value::Text(&placeholder[..len]));
    }
    let start = out.len();
    if iso8583::encode(l.spec, req.mti().response(), fields.as_slice(), out).is_err() {
        // Only an echoed element could fail, and those came from a valid message of the same
        // dialect: answer with the bare minimum rather than nothing.
        out.truncate(start);
        let mut minimal: FieldList<'_, 4> = FieldList::new();
        let _ = minimal.set(39, Value::Text(b"96"));
        let _ = iso8583::encode(l.spec, req.mti().response(), minimal.as_slice(), out);
        return;
    }
    if let (Some((_, len)), Some(key)) = (mac_field, keys.mac) {
        mac::seal(key, &mut out[start..], len);
    }
}

/// Approvals on a MAC link carry a MAC (DE64, or DE128 when a secondary bitmap is present);
/// declines do not (DOMAIN §11). Returns the element and its length in characters.
fn mac_field(
    key: Option<&MacKey>,
    approved: bool,
    fields: &FieldList<'_, 32>,
    spec: &iso8583::Spec,
) -> Option<(u8, usize)> {
    let key = key?;
    if !approved {
        return None;
    }
    let secondary = fields.as_slice().iter().any(|(n, _)| *n > 64);
    mac::field_for(key, spec, secondary)
}

/// DE60 of a `cup_pos` sign-on answer: 60.1 `00`, 60.2 the batch, 60.3 `001`.
fn cup_signon_60(batch: u32) -> [u8; 11] {
    let mut out = *b"00000000001";
    let mut b = batch % 1_000_000;
    for i in (2..8).rev() {
        out[i] = b'0' + (b % 10) as u8;
        b /= 10;
    }
    out
}
