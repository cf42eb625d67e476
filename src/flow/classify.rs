//! What a decoded message asks for, per dialect (DOMAIN §3).

use crate::iso8583::Message;

/// The kind of work a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A purchase.
    Sale,
    /// A (partial) refund of a sale.
    Refund,
    /// A same-day cancellation of a sale.
    Void,
    /// A reversal of a sale, refund or void.
    Reversal,
    /// Batch settlement (0500).
    Settlement,
    /// Echo test (ascii 0800 DE70 301, cup 0820 60.3 301).
    Echo,
    /// Sign-on (ascii 0800 DE70 001, cup 0800 60.3 001).
    SignOn,
    /// Sign-off (ascii 0800 DE70 002).
    SignOff,
}

/// Whether a message is `cup_pos` shaped (BCD MTI, DE60/DE61).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `ascii1987`: DE3 decides, DE90 names the original, DE70 for network management.
    Ascii,
    /// `cup_pos`: DE3 with DE60.1 decides, DE61 names the original, DE60.3 for network management.
    Cup,
}

/// Classifies a request; `None` means unsupported (answered 40 `FUNCTION_NOT_SUPPORTED`).
pub fn classify(msg: &Message<'_>, shape: Shape) -> Option<Kind> {
    let mti = msg.mti();
    if !mti.is_request() || mti.0 / 1000 != 0 {
        return None;
    }
    let tx_type = msg.processing_code().map(|p| p.tx_type);
    match (shape, mti.class(), mti.function()) {
        (_, 4, 0 | 2) => Some(Kind::Reversal),
        (_, 5, 0 | 2) => Some(Kind::Settlement),
        (Shape::Ascii, 2, 0 | 2) => match tx_type? {
            0 => Some(Kind::Sale),
            20 => Some(Kind::Refund),
            2 => Some(Kind::Void),
            _ => None,
        },
        (Shape::Ascii, 8, 0) => match msg.network_code()? {
            301 => Some(Kind::Echo),
            1 => Some(Kind::SignOn),
            2 => Some(Kind::SignOff),
            _ => None,
        },
        (Shape::Cup, 2, f) => {
            let c60 = msg.cup60()?;
            match (f, tx_type?, c60.message_type) {
                (0, 0, 22) => Some(Kind::Sale),
                (0, 20, 23) => Some(Kind::Void),
                (2 | 0, 20, 25) => Some(Kind::Refund),
                _ => None,
            }
        }
        (Shape::Cup, 8, 0 | 2) => match msg.cup60()?.network_code? {
            1 => Some(Kind::SignOn),
            301 => Some(Kind::Echo),
            2 => Some(Kind::SignOff),
            _ => None,
        },
        _ => None,
    }
}
