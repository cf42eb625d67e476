//! Retrieval reference numbers and authorisation codes the switch assigns.
//!
//! Both are derived from the request, so a repeat (0201) that reaches the stored answer gets
//! the same RRN and auth code without the ledger storing them: RRN = DE12 local time
//! `hhmmss` + DE11 STAN, as many acquirers build it (unique per terminal and day, because the
//! STAN is); the auth code is a hash of RRN, STAN, terminal and merchant in base 36.

/// The RRN (DE37, n12 as an12) of a sale: `hhmmss` of DE12 (or of `now` when absent) + STAN.
pub fn rrn(local_time_hhmmss: u32, stan: u32) -> [u8; 12] {
    let mut out = [b'0'; 12];
    let mut v = u64::from(local_time_hhmmss % 1_000_000) * 1_000_000 + u64::from(stan % 1_000_000);
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out
}

/// The authorisation code (DE38, an6) of an approval.
pub fn auth_code(rrn: &[u8], stan: &[u8], terminal: &[u8], merchant: &[u8]) -> [u8; 6] {
    const DIGITS: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in rrn.iter().chain(stan).chain(terminal).chain(merchant) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(h % 36) as usize];
        h /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrn_is_local_time_and_stan() {
        assert_eq!(&rrn(154_500, 100), b"154500000100");
        let a = auth_code(b"154500000100", b"000100", b"T1", b"M1");
        assert_eq!(a, auth_code(b"154500000100", b"000100", b"T1", b"M1"));
        assert_ne!(
            a,
            auth_code(b"154500000100", b"000101", b"T1", b"M1"),
            "a refund of the sale gets its own code"
        );
    }
}
