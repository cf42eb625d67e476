//! Translation on host links (issue #19): a terminal's request in its dialect, written as the
//! same request in the dialect of the host it is routed to, and the host's DE39 read back in
//! the terminal's code column. Everything it needs is in the two dialect files: how each writes
//! the operation (MTI, DE3 positions 1-2, DE60.1), where each keeps the original's keys (DE90
//! or DE61 + DE37) and which response-code column each answers with.
//!
//! Mapped element by element, by value (so ASCII digits become BCD and back): DE 2, 4, 7, 11,
//! 12, 13, 14, 22, 25, 32, 37, 41, 42, 49 where both dialects define the element with the same
//! kind; DE3 with positions 1-2 from the host's rule; DE60.1 (+ the batch in 60.2) where the
//! host's rule fixes it. The original: DE90 (MTI, STAN, DE7) ↔ DE61 (batch, trace, date):
//! trace = STAN, date = DE7's MMDD, batch `000000` (an ascii1987 terminal has none), and DE7
//! of a DE61 original = its MMDD with time `000000`; DE37 (the original's RRN) goes across
//! unchanged, so a host can match on it where the rest is approximate. Track (35, 36, 45), PIN
//! (52), chip (55) and key (62, 96) data are not translated: they would need re-encryption
//! under the host's keys, so a host that requires them must speak the terminal's dialect.
//! MACs are the link's own (`super::link`), never carried over.

use bytes::{Bytes, BytesMut};

use crate::dialect::Kind;
use crate::dialect::{Dialect, OriginalKeys};
use crate::iso8583::spec::Kind as ElementKind;
use crate::iso8583::{self, json, FieldList, Message, Mti, Value};
use crate::ledger::Reason;

/// Elements copied by value when both dialects define them with the same kind.
const COPIED: &[u8] = &[2, 4, 7, 11, 12, 13, 14, 22, 25, 32, 37, 41, 42, 49];

/// `msg`, a request of `from` asking for `kind`, as the same request of `to`; `None` when `to`
/// has no such request or a value does not fit its element there.
pub fn request(from: &Dialect, to: &Dialect, msg: &Message<'_>, kind: Kind) -> Option<Bytes> {
    let form = to.request_form(kind)?;
    let function = msg.mti().function();
    let function = match form.functions.contains(&function) {
        true => function,
        false => *form.functions.first()?,
    };
    let mti = Mti(u16::from(form.class) * 100 + u16::from(function) * 10);
    let mut texts: Vec<(u8, String)> = Vec::with_capacity(COPIED.len() + 4);
    for &n in COPIED {
        let (Some(a), Some(b)) = (from.spec().field(n.into()), to.spec().field(n.into())) else {
            continue;
        };
        if a.kind != b.kind || matches!(a.kind, ElementKind::Binary | ElementKind::Track) {
            continue;
        }
        if let Some(text) = json::field_text(msg, n.into()) {
            texts.push((n, text));
        }
    }
    if let Some(pc) = msg.field(3).and_then(|_| json::field_text(msg, 3)) {
        let rest = pc.get(2..6).unwrap_or("0000");
        let pc = match form.processing {
            Some(p) => format!("{p:02}{rest}"),
            None => pc,
        };
        texts.push((3, pc));
    }
    if let Some(t) = form.de60_1 {
        let batch = msg.cup60().map_or(0, |c| c.batch);
        texts.push((60, format!("{t:02}{batch:06}")));
    }
    if let Some((n, text)) = original(from, to, msg) {
        texts.push((n, text));
    }
    texts.sort_by_key(|(n, _)| *n);
    let mut fields: FieldList<'_, 24> = FieldList::new();
    for (n, text) in &texts {
        fields.set(*n, Value::Text(text.as_bytes())).ok()?;
    }
    let mut out = BytesMut::with_capacity(msg.bytes().len() + 16);
    iso8583::encode(to.spec(), mti, fields.as_slice(), &mut out).ok()?;
    Some(out.freeze())
}

/// The element naming the original in `to`, from where `from` keeps it.
fn original(from: &Dialect, to: &Dialect, msg: &Message<'_>) -> Option<(u8, String)> {
    match (from.original, to.original) {
        (OriginalKeys::De90, OriginalKeys::De90) => Some((90, json::field_text(msg, 90)?)),
        (OriginalKeys::De61, OriginalKeys::De61) => Some((61, json::field_text(msg, 61)?)),
        (OriginalKeys::De90, OriginalKeys::De61) => {
            let od = msg.original_data()?;
            let mmdd = od.transmission / 1_000_000;
            // The original's batch is unknown to a DE90 terminal: 0.
            Some((61, format!("{:06}{:06}{mmdd:04}", 0, od.stan)))
        }
        (OriginalKeys::De61, OriginalKeys::De90) => {
            let c = msg.cup61()?;
            let mmdd = c.date_mmdd.unwrap_or(0);
            Some((90, format!("0200{:06}{mmdd:04}000000{:022}", c.trace, 0)))
        }
    }
}

/// The host's DE39 as the terminal's dialect writes it: the same code unless the two use
/// different code columns and every reason with `code` in the host's column has one and the
/// same other code in the terminal's (CUP 98 → ISO 91, A0 → 63, 97 → 03); a code no reason
/// decides one way passes unchanged.
pub fn answer_code(host: &Dialect, terminal: &Dialect, code: [u8; 2]) -> [u8; 2] {
    if host.code_column == terminal.code_column {
        return code;
    }
    let mut mapped: Option<&'static str> = None;
    for r in Reason::all().filter(|r| r.code(host.code_column).as_bytes() == code) {
        let theirs = r.code(terminal.code_column);
        match mapped {
            None => mapped = Some(theirs),
            Some(m) if m == theirs => {}
            Some(_) => return code,
        }
    }
    match mapped.map(str::as_bytes) {
        Some(&[a, b]) => [a, b],
        _ => code,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dialect::{ASCII1987, CUP_POS, ISO87B};
    use crate::ledger::Operation;

    fn ascii_refund() -> BytesMut {
        let mut f: FieldList<'_, 16> = FieldList::new();
        for (n, v) in [
            (2u8, &b"4761739001010119"[..]),
            (3, b"200000"),
            (4, b"000000001500"),
            (7, b"1125093100"),
            (11, b"000101"),
            (12, b"093100"),
            (13, b"1125"),
            (22, b"051"),
            (37, b"093015000100"),
            (41, b"TERM0001"),
            (42, b"MERCHANT 000001"),
            (49, b"840"),
            (52, b"0123456789ABCDEF"),
            (90, b"020000010011250930150000000000000000000000"),
        ] {
            f.set(n, Value::Text(v)).unwrap();
        }
        let mut out = BytesMut::new();
        iso8583::encode(ASCII1987.spec(), Mti(200), f.as_slice(), &mut out).unwrap();
        out
    }

    #[test]
    fn an_ascii1987_refund_becomes_a_cup_pos_refund_with_its_original_in_de61() {
        let bytes = ascii_refund();
        let msg = iso8583::decode(ASCII1987.spec(), &bytes).unwrap();
        let out = request(&ASCII1987, &CUP_POS, &msg, Kind::Op(Operation::Refund)).unwrap();
        let cup = iso8583::decode(CUP_POS.spec(), &out).unwrap();
        assert_eq!(CUP_POS.classify(&cup), Some(Kind::Op(Operation::Refund)));
        assert_eq!(cup.mti(), Mti(200));
        assert_eq!(cup.amount().unwrap().0, 1500);
        assert_eq!(cup.stan(), Some(101));
        assert_eq!(
            (cup.terminal(), cup.merchant(), cup.rrn()),
            (
                Some("TERM0001"),
                Some("MERCHANT 000001"),
                Some("093015000100")
            )
        );
        let c61 = cup.cup61().unwrap();
        assert_eq!((c61.trace, c61.date_mmdd), (100, Some(1125)));
        assert_eq!(
            cup.pan().unwrap().digits().to_string_lossy(),
            "4761739001010119"
        );
        // The PIN block is not carried into another dialect.
        assert!(!cup.has(52));
    }

    #[test]
    fn a_cup_pos_original_comes_back_as_de90_and_the_round_trip_keeps_the_request() {
        let bytes = ascii_refund();
        let msg = iso8583::decode(ASCII1987.spec(), &bytes).unwrap();
        let cup = request(&ASCII1987, &CUP_POS, &msg, Kind::Op(Operation::Refund)).unwrap();
        let cup = iso8583::decode(CUP_POS.spec(), &cup).unwrap();
        let back = request(&CUP_POS, &ISO87B, &cup, Kind::Op(Operation::Refund)).unwrap();
        let back = iso8583::decode(ISO87B.spec(), &back).unwrap();
        assert_eq!(ISO87B.classify(&back), Some(Kind::Op(Operation::Refund)));
        let od = back.original_data().unwrap();
        assert_eq!((od.mti, od.stan), (Mti(200), 100));
        assert_eq!(od.transmission / 1_000_000, 1125);
        assert_eq!(back.amount().unwrap().0, 1500);
        assert_eq!(
            back.field_bytes(3),
            msg.field_bytes(3).map(|_| &[0x20, 0, 0][..])
        );
    }

    #[test]
    fn a_void_takes_the_hosts_processing_code_and_message_type() {
        let mut f: FieldList<'_, 8> = FieldList::new();
        f.set(3, Value::Text(b"020000")).unwrap();
        f.set(4, Value::Number(2500)).unwrap();
        f.set(11, Value::Number(7)).unwrap();
        f.set(41, Value::Text(b"TERM0001")).unwrap();
        f.set(42, Value::Text(b"MERCHANT 000001")).unwrap();
        f.set(
            90,
            Value::Text(b"020000010011250930150000000000000000000000"),
        )
        .unwrap();
        let mut bytes = BytesMut::new();
        iso8583::encode(ASCII1987.spec(), Mti(200), f.as_slice(), &mut bytes).unwrap();
        let msg = iso8583::decode(ASCII1987.spec(), &bytes).unwrap();
        let out = request(&ASCII1987, &CUP_POS, &msg, Kind::Op(Operation::Void)).unwrap();
        let cup = iso8583::decode(CUP_POS.spec(), &out).unwrap();
        assert_eq!(CUP_POS.classify(&cup), Some(Kind::Op(Operation::Void)));
        assert_eq!(cup.processing_code().unwrap().tx_type, 20);
        assert_eq!(cup.cup60().unwrap().message_type, 23);
    }

    #[test]
    fn host_codes_are_read_in_the_terminals_column_where_the_table_is_unambiguous() {
        assert_eq!(answer_code(&CUP_POS, &ASCII1987, *b"A0"), *b"63");
        assert_eq!(answer_code(&CUP_POS, &ASCII1987, *b"98"), *b"91");
        assert_eq!(answer_code(&ASCII1987, &CUP_POS, *b"63"), *b"A0");
        // 51 means the same in both columns; 05 is no reason's code: both pass unchanged.
        assert_eq!(answer_code(&CUP_POS, &ASCII1987, *b"51"), *b"51");
        assert_eq!(answer_code(&CUP_POS, &ASCII1987, *b"05"), *b"05");
        // Same column: never changed.
        assert_eq!(answer_code(&ISO87B, &ASCII1987, *b"63"), *b"63");
    }
}
