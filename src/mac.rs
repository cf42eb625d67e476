//! Message authentication codes for DE64/DE128 (DOMAIN §11) and CUP sign-on key delivery.
//!
//! Three algorithms, all on top of RustCrypto block ciphers (no hand-written ciphers):
//!
//! | [`MacAlgorithm`] | key | [`compute`] returns |
//! |---|---|---|
//! | [`CupPosEcb`](MacAlgorithm::CupPosEcb) | 8-byte DES (16/24-byte 3DES accepted) | 8 ASCII upper-case hex chars, exactly the `cup_pos` DE64 |
//! | [`AnsiX919`](MacAlgorithm::AnsiX919) | 16 bytes, K1 ‖ K2 | 8 raw bytes; [`to_field_hex`] gives the 16-char `ascii1987` form |
//! | [`AesCmac`](MacAlgorithm::AesCmac) | 16-byte AES-128 (RFC 4493) | the leftmost 8 bytes of the 16-byte tag; [`to_field_hex`] as above |
//!
//! AES-CMAC is truncated to 64 bits because DE64 and DE128 are 8-byte fields; RFC 4493 §2.4 and
//! NIST SP 800-38B §5.1 allow truncation to the leftmost bits, and 64 bits is the SP 800-38B
//! lower bound for general use. In `ascii1987` the 8 bytes are written as 16 upper-case hex
//! characters, like the X9.19 MAC.
//!
//! Key bytes live in fixed-size arrays inside [`DesKey`] and [`MacKey`]; their `Debug` shows
//! only the length and a key check value, errors never echo key material, and `Drop` zeroises
//! the bytes with the `zeroize` crate (volatile writes the compiler may not remove). The
//! ciphers' own key schedules, built per call on the stack, are not wiped.

use aes::Aes128;
use cmac::{Cmac, Mac};
use des::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use des::{Des, TdesEde2, TdesEde3};
use std::fmt;

/// The MAC algorithms a link or terminal can be configured with (DOMAIN §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacAlgorithm {
    /// China UnionPay POS "ECB" MAC: XOR of the blocks, hex, two DES encryptions; the field is
    /// the first 8 hex characters of the result.
    CupPosEcb,
    /// ANSI X9.19 retail MAC (ISO 9797-1 MAC algorithm 3, padding method 1, zero IV).
    AnsiX919,
    /// AES-128 CMAC (RFC 4493), truncated to its leftmost 8 bytes.
    AesCmac,
}

/// A single-, double- or triple-length DES key (8, 16 or 24 bytes): a TMK, PIK or MAK.
///
/// 16 bytes means 2-key 3DES EDE (K1 K2 K1) and 24 bytes 3-key 3DES EDE. `Debug` prints only the
/// length and the 4-byte check value.
#[derive(Clone)]
pub struct DesKey(DesMaterial);

/// A key bound to the MAC algorithm it may be used with.
///
/// Built with [`MacKey::from_hex`] or [`MacKey::from_bytes`], which check the length for the
/// algorithm, so [`compute`] cannot fail. `Debug` prints the algorithm, the length and the
/// 4-byte check value, never the key.
#[derive(Clone)]
pub struct MacKey {
    algorithm: MacAlgorithm,
    material: MacMaterial,
}

/// Why a key could not be built. No variant carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The hex text has an odd number of digits.
    #[error("key hex has an odd number of digits ({digits})")]
    OddHexDigits {
        /// How many characters the text had.
        digits: usize,
    },
    /// The hex text contains a character that is not a hex digit (the character is not shown).
    #[error("key hex has a non-hex character at offset {offset}")]
    NotHex {
        /// Zero-based offset of the first bad character.
        offset: usize,
    },
    /// The key has the wrong number of bytes for its use.
    #[error("{what} key must be {expected} bytes, got {actual}")]
    WrongLength {
        /// What the key is for, e.g. "CUP POS MAC".
        what: &'static str,
        /// The accepted lengths, e.g. "8, 16 or 24".
        expected: &'static str,
        /// The length given.
        actual: usize,
    },
}

/// Why the working keys in a CUP sign-on response (0810 DE62) could not be recovered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignOnKeyError {
    /// DE62 is not the 24-byte single-length layout (PIK 8 + check 4 + MAK 8 + check 4).
    #[error("sign-on DE62 must be {SIGNON_DE62_BYTES} bytes, got {actual}")]
    WrongLength {
        /// The DE62 length received.
        actual: usize,
    },
    /// The decrypted PIK does not match its check value: wrong TMK or corrupted DE62.
    #[error("sign-on PIK does not match its check value")]
    PikCheckValue,
    /// The decrypted MAK does not match its check value: wrong TMK or corrupted DE62.
    #[error("sign-on MAK does not match its check value")]
    MakCheckValue,
}

/// Length of a CUP sign-on DE62 with single-length PIK and MAK: (8 + 4) × 2 bytes.
pub const SIGNON_DE62_BYTES: usize = 24;

/// Bytes of a MAC field on the wire for the `cup_pos` dialect, and of the raw X9.19/AES-CMAC MAC.
pub const MAC_BYTES: usize = 8;

/// Bytes of a MAC written as hex characters in the `ascii1987` dialect.
pub const MAC_HEX_BYTES: usize = 2 * MAC_BYTES;

const DES_BLOCK_BYTES: usize = 8;
const KEY_BYTES_MAX: usize = 24;
const CHECK_VALUE_BYTES: usize = 4;

const _: () = assert!(MAC_BYTES == DES_BLOCK_BYTES);
const _: () = assert!(SIGNON_DE62_BYTES == 2 * (DES_BLOCK_BYTES + CHECK_VALUE_BYTES));

#[derive(Clone)]
enum DesMaterial {
    Single([u8; 8]),
    Double([u8; 16]),
    Triple([u8; 24]),
}

#[derive(Clone)]
enum MacMaterial {
    /// CUP POS: any DES key length.
    Des(DesKey),
    /// X9.19: K1 and K2, each a single DES key.
    Retail([u8; 8], [u8; 8]),
    /// AES-CMAC with AES-128.
    Aes128([u8; 16]),
}

/// What a key is for; decides the accepted lengths and names the key in errors.
#[derive(Clone, Copy)]
enum KeyUse {
    Des,
    Mac(MacAlgorithm),
}

impl KeyUse {
    fn accepts(self, len: usize) -> bool {
        match self {
            KeyUse::Des | KeyUse::Mac(MacAlgorithm::CupPosEcb) => matches!(len, 8 | 16 | 24),
            KeyUse::Mac(MacAlgorithm::AnsiX919 | MacAlgorithm::AesCmac) => len == 16,
        }
    }

    fn wrong_length(self, actual: usize) -> KeyError {
        let (what, expected) = match self {
            KeyUse::Des => ("DES", "8, 16 or 24"),
            KeyUse::Mac(MacAlgorithm::CupPosEcb) => ("CUP POS MAC", "8, 16 or 24"),
            KeyUse::Mac(MacAlgorithm::AnsiX919) => ("ANSI X9.19 MAC", "16"),
            KeyUse::Mac(MacAlgorithm::AesCmac) => ("AES-CMAC", "16"),
        };
        KeyError::WrongLength {
            what,
            expected,
            actual,
        }
    }
}

impl DesKey {
    /// Builds a DES key from 16, 32 or 48 hex digits (either case).
    pub fn from_hex(hex_text: &str) -> Result<Self, KeyError> {
        with_decoded_hex(hex_text, KeyUse::Des, Self::from_bytes)
    }

    /// Builds a DES key from 8, 16 or 24 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        des_key(bytes).ok_or_else(|| KeyUse::Des.wrong_length(bytes.len()))
    }

    /// Key length in bytes: 8, 16 or 24.
    pub fn len_bytes(&self) -> usize {
        match &self.0 {
            DesMaterial::Single(k) => k.len(),
            DesMaterial::Double(k) => k.len(),
            DesMaterial::Triple(k) => k.len(),
        }
    }

    /// The key check value: the first 4 bytes of the key's (3)DES encryption of eight zero bytes.
    pub fn check_value(&self) -> [u8; 4] {
        first_bytes(self.encrypt_block([0; DES_BLOCK_BYTES]))
    }

    /// ECB-encrypts one block with this key (DES, or 3DES EDE for 16/24-byte keys).
    pub(crate) fn encrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut block = block;
        match &self.0 {
            DesMaterial::Single(k) => Des::new(k.into()).encrypt_block((&mut block).into()),
            DesMaterial::Double(k) => TdesEde2::new(k.into()).encrypt_block((&mut block).into()),
            DesMaterial::Triple(k) => TdesEde3::new(k.into()).encrypt_block((&mut block).into()),
        }
        block
    }

    /// ECB-decrypts one block with this key (DES, or 3DES EDE for 16/24-byte keys).
    pub(crate) fn decrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut block = block;
        match &self.0 {
            DesMaterial::Single(k) => Des::new(k.into()).decrypt_block((&mut block).into()),
            DesMaterial::Double(k) => TdesEde2::new(k.into()).decrypt_block((&mut block).into()),
            DesMaterial::Triple(k) => TdesEde3::new(k.into()).decrypt_block((&mut block).into()),
        }
        block
    }

    /// Whether the key bytes equal `other`, without printing them.
    #[cfg(test)]
    fn ct_eq_bytes(&self, other: &[u8]) -> bool {
        match &self.0 {
            DesMaterial::Single(k) => ct_eq(k, other),
            DesMaterial::Double(k) => ct_eq(k, other),
            DesMaterial::Triple(k) => ct_eq(k, other),
        }
    }
}

impl fmt::Debug for DesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DesKey")
            .field("len_bytes", &self.len_bytes())
            .field("kcv", &hex::encode_upper(self.check_value()))
            .finish()
    }
}

impl Drop for DesKey {
    fn drop(&mut self) {
        match &mut self.0 {
            DesMaterial::Single(k) => wipe(k),
            DesMaterial::Double(k) => wipe(k),
            DesMaterial::Triple(k) => wipe(k),
        }
    }
}

impl MacKey {
    /// Builds a key for `algorithm` from hex digits (either case).
    ///
    /// Lengths: CUP POS 8 bytes (16 or 24 accepted as 3DES), X9.19 16 bytes (K1 ‖ K2),
    /// AES-CMAC 16 bytes.
    pub fn from_hex(algorithm: MacAlgorithm, hex_text: &str) -> Result<Self, KeyError> {
        with_decoded_hex(hex_text, KeyUse::Mac(algorithm), |bytes| {
            Self::from_bytes(algorithm, bytes)
        })
    }

    /// Builds a key for `algorithm` from raw bytes; lengths as in [`MacKey::from_hex`].
    pub fn from_bytes(algorithm: MacAlgorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        let key_use = KeyUse::Mac(algorithm);
        if !key_use.accepts(bytes.len()) {
            return Err(key_use.wrong_length(bytes.len()));
        }
        let material = match algorithm {
            MacAlgorithm::CupPosEcb => des_key(bytes).map(MacMaterial::Des),
            MacAlgorithm::AnsiX919 => {
                let (k1, k2) = bytes.split_at(DES_BLOCK_BYTES);
                Some(MacMaterial::Retail(copy_array(k1), copy_array(k2)))
            }
            MacAlgorithm::AesCmac => Some(MacMaterial::Aes128(copy_array(bytes))),
        }
        .ok_or_else(|| key_use.wrong_length(bytes.len()))?;
        Ok(MacKey {
            algorithm,
            material,
        })
    }

    /// The algorithm this key is for.
    pub fn algorithm(&self) -> MacAlgorithm {
        self.algorithm
    }

    /// Key length in bytes.
    pub fn len_bytes(&self) -> usize {
        match &self.material {
            MacMaterial::Des(k) => k.len_bytes(),
            MacMaterial::Retail(k1, k2) => k1.len() + k2.len(),
            MacMaterial::Aes128(k) => k.len(),
        }
    }

    /// The key check value: the first 4 bytes of the key's block cipher (DES, 2-key 3DES for
    /// X9.19, AES-128) applied to a zero block. Safe to log and compare with a key ceremony sheet.
    pub fn check_value(&self) -> [u8; 4] {
        match &self.material {
            MacMaterial::Des(k) => k.check_value(),
            MacMaterial::Retail(k1, k2) => {
                let mut double = [0u8; 16];
                double[..8].copy_from_slice(k1);
                double[8..].copy_from_slice(k2);
                let mut block = [0u8; DES_BLOCK_BYTES];
                TdesEde2::new((&double).into()).encrypt_block((&mut block).into());
                wipe(&mut double);
                first_bytes(block)
            }
            MacMaterial::Aes128(k) => first_bytes(aes_zero_block(k)),
        }
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MacKey")
            .field("algorithm", &self.algorithm)
            .field("len_bytes", &self.len_bytes())
            .field("kcv", &hex::encode_upper(self.check_value()))
            .finish()
    }
}

impl Drop for MacKey {
    fn drop(&mut self) {
        // The `Des` variant wipes itself in `DesKey::drop`.
        match &mut self.material {
            MacMaterial::Des(_) => {}
            MacMaterial::Retail(k1, k2) => {
                wipe(k1);
                wipe(k2);
            }
            MacMaterial::Aes128(k) => wipe(k),
        }
    }
}

/// Computes the MAC of `mab` (the bytes from the MTI to the end of the field before the MAC).
///
/// Returns the bytes that go on the wire for the key's algorithm: for CUP POS the 8 ASCII
/// upper-case hex characters of DE64; for X9.19 and AES-CMAC the 8 raw MAC bytes (binary
/// dialects), which [`to_field_hex`] turns into the 16 characters used by `ascii1987`.
pub fn compute(key: &MacKey, mab: &[u8]) -> [u8; 8] {
    match &key.material {
        MacMaterial::Des(k) => cup_pos_ecb(k, mab),
        MacMaterial::Retail(k1, k2) => ansi_x919(k1, k2, mab),
        MacMaterial::Aes128(k) => first_bytes(aes_cmac(k, mab)),
    }
}

/// The MAC element of a message in `spec` and its length on the wire: DE128 when the message
/// has a secondary bitmap (`secondary`), else DE64. `None` when the dialect's element cannot
/// carry the key's MAC: CUP POS needs 8 characters; X9.19 and AES-CMAC 8 raw bytes (a binary
/// element) or 16 hex characters.
pub fn field_for(
    key: &MacKey,
    spec: &crate::iso8583::Spec,
    secondary: bool,
) -> Option<(u8, usize)> {
    use crate::iso8583::spec::{Encoding, Prefix};
    let n = if secondary { 128 } else { 64 };
    let f = spec.field(usize::from(n))?;
    if f.prefix != Prefix::Fixed || f.counts_digits {
        return None;
    }
    let len = usize::from(f.max);
    let fits = match (key.algorithm, len, f.encoding) {
        (MacAlgorithm::CupPosEcb, MAC_BYTES, _) => true,
        (MacAlgorithm::CupPosEcb, _, _) => false,
        (_, MAC_BYTES, Encoding::Binary) => true,
        (_, MAC_HEX_BYTES, Encoding::Ascii) => true,
        _ => false,
    };
    fits.then_some((n, len))
}

/// Fills the last `len` bytes of `message` (an encoded message ending with its MAC element,
/// as [`field_for`] sized it) with the MAC of the bytes before them.
pub fn seal(key: &MacKey, message: &mut [u8], len: usize) {
    let Some(end) = message.len().checked_sub(len) else {
        return;
    };
    let value = compute(key, &message[..end]);
    match len {
        MAC_HEX_BYTES => message[end..].copy_from_slice(&to_field_hex(&value)),
        MAC_BYTES => message[end..].copy_from_slice(&value),
        _ => {}
    }
}

/// `body` (a message of `spec`, MTI first) with its MAC element (DE128 when a secondary bitmap
/// is present, else DE64) set to its MAC under `key`, any MAC it had replaced. `None` when it
/// does not decode or the dialect cannot carry the key's MAC ([`field_for`]).
pub fn sign_message(
    spec: &crate::iso8583::Spec,
    key: &MacKey,
    body: &[u8],
) -> Option<bytes::Bytes> {
    use crate::iso8583::{self, FieldList, Value};
    let msg = iso8583::decode(spec, body).ok()?;
    let mut fields: FieldList<'_, 128> = FieldList::new();
    for n in msg.present().filter(|&n| n > 1 && n != 64 && n != 128) {
        fields.echo(&msg, n).ok()?;
    }
    let secondary = fields.as_slice().iter().any(|(n, _)| *n > 64);
    let (n, len) = field_for(key, spec, secondary)?;
    let placeholder = [b'0'; MAC_HEX_BYTES];
    fields.set(n, Value::Text(&placeholder[..len])).ok()?;
    let mut out = bytes::BytesMut::with_capacity(body.len() + len + 8);
    iso8583::encode(spec, msg.mti(), fields.as_slice(), &mut out).ok()?;
    seal(key, &mut out, len);
    Some(out.freeze())
}

/// A key from a configuration's `mac = { algorithm, key }`; the error names neither the key
/// nor any of its digits.
pub fn key_from_config(algorithm: &str, key_hex: &str) -> Result<MacKey, String> {
    let algorithm = match algorithm {
        "x919" | "ansi_x919" => MacAlgorithm::AnsiX919,
        "cup_ecb" | "cup_pos" => MacAlgorithm::CupPosEcb,
        "aes_cmac" => MacAlgorithm::AesCmac,
        other => {
            return Err(format!(
                "algorithm: expected x919, cup_ecb or aes_cmac, got {other:?}"
            ))
        }
    };
    MacKey::from_hex(algorithm, key_hex).map_err(|e| format!("key: {e}"))
}

/// Writes an 8-byte binary MAC as 16 upper-case ASCII hex characters, the `ascii1987` form of
/// an X9.19 or AES-CMAC DE64/DE128. (A CUP POS MAC from [`compute`] is already ASCII.)
pub fn to_field_hex(mac: &[u8; 8]) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [0u8; MAC_HEX_BYTES];
    for (i, byte) in mac.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(byte >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

/// Checks a received MAC field against the MAC of `mab`, in constant time for a given length.
///
/// `received_field_bytes` is the MAC field as it came off the wire: for CUP POS the 8 hex
/// characters; for X9.19 and AES-CMAC either 8 raw bytes or 16 hex characters. Hex letters are
/// accepted in either case, since the case carries no MAC information. Any other length is
/// rejected.
pub fn verify(key: &MacKey, mab: &[u8], received_field_bytes: &[u8]) -> bool {
    let expected = compute(key, mab);
    match (key.algorithm, received_field_bytes.len()) {
        (MacAlgorithm::CupPosEcb, MAC_BYTES) => ct_eq_hex_text(&expected, received_field_bytes),
        (MacAlgorithm::CupPosEcb, _) => false,
        (_, MAC_BYTES) => ct_eq(&expected, received_field_bytes),
        (_, MAC_HEX_BYTES) => ct_eq_hex_text(&to_field_hex(&expected), received_field_bytes),
        _ => false,
    }
}

/// The CUP key check value: the first 4 bytes of (3)DES(key, 0⁸), as carried in sign-on DE62.
pub fn cup_pos_check_value(key: &DesKey) -> [u8; 4] {
    key.check_value()
}

/// Recovers the working keys from a CUP sign-on response (0810) DE62.
///
/// DE62 = PIK under TMK (8) ‖ PIK check value (4) ‖ MAK under TMK (8) ‖ MAK check value (4);
/// each key is decrypted with the TMK in ECB mode (2-key 3DES for the usual 16-byte TMK) and
/// checked against its check value before use. Returns `(pik, mak)`, the MAK ready for
/// [`MacAlgorithm::CupPosEcb`].
pub fn decrypt_cup_signon_keys(
    tmk: &DesKey,
    de62: &[u8],
) -> Result<(DesKey, MacKey), SignOnKeyError> {
    if de62.len() != SIGNON_DE62_BYTES {
        return Err(SignOnKeyError::WrongLength { actual: de62.len() });
    }
    let (pik_part, mak_part) = de62.split_at(SIGNON_DE62_BYTES / 2);
    let pik = unwrap_checked_key(tmk, pik_part).ok_or(SignOnKeyError::PikCheckValue)?;
    let mak = unwrap_checked_key(tmk, mak_part).ok_or(SignOnKeyError::MakCheckValue)?;
    Ok((
        pik,
        MacKey {
            algorithm: MacAlgorithm::CupPosEcb,
            material: MacMaterial::Des(mak),
        },
    ))
}

/// Builds the DE62 of a CUP sign-on answer (0810) from fresh working keys: PIK under `tmk`
/// (8) ‖ PIK check value (4) ‖ MAK under `tmk` (8) ‖ MAK check value (4), the layout
/// [`decrypt_cup_signon_keys`] reads. `None` unless both keys are single-length.
pub fn encrypt_cup_signon_keys(
    tmk: &DesKey,
    pik: &DesKey,
    mak: &DesKey,
) -> Option<[u8; SIGNON_DE62_BYTES]> {
    let mut out = [0u8; SIGNON_DE62_BYTES];
    for (part, key) in out.chunks_mut(SIGNON_DE62_BYTES / 2).zip([pik, mak]) {
        let DesMaterial::Single(clear) = &key.0 else {
            return None;
        };
        part[..DES_BLOCK_BYTES].copy_from_slice(&tmk.encrypt_block(*clear));
        part[DES_BLOCK_BYTES..].copy_from_slice(&key.check_value());
    }
    Some(out)
}

impl DesKey {
    /// A fresh single-length key from the operating system's CSPRNG, with odd parity in each
    /// byte (the DES convention; the cipher ignores the parity bits).
    pub fn random_single() -> DesKey {
        let mut bytes = [0u8; DES_BLOCK_BYTES];
        rand::fill(&mut bytes[..]);
        for b in &mut bytes {
            let high = *b & 0xfe;
            *b = high | u8::from(high.count_ones() % 2 == 0);
        }
        let key = DesKey(DesMaterial::Single(bytes));
        wipe(&mut bytes);
        key
    }
}

impl MacKey {
    /// A CUP POS MAC key (the MAK delivered at sign-on) from a DES key.
    pub fn cup_pos(key: DesKey) -> MacKey {
        MacKey {
            algorithm: MacAlgorithm::CupPosEcb,
            material: MacMaterial::Des(key),
        }
    }
}

/// A DES key of 8, 16 or 24 bytes; `None` for any other length.
fn des_key(bytes: &[u8]) -> Option<DesKey> {
    let material = match bytes.len() {
        8 => DesMaterial::Single(copy_array(bytes)),
        16 => DesMaterial::Double(copy_array(bytes)),
        24 => DesMaterial::Triple(copy_array(bytes)),
        _ => return None,
    };
    Some(DesKey(material))
}

/// Decrypts `encrypted key (8) ‖ check value (4)` under `tmk`; `None` if the check value differs.
fn unwrap_checked_key(tmk: &DesKey, part: &[u8]) -> Option<DesKey> {
    let (encrypted, check) = part.split_at(DES_BLOCK_BYTES);
    let mut clear = tmk.decrypt_block(copy_array(encrypted));
    let key = DesKey(DesMaterial::Single(clear));
    wipe(&mut clear);
    ct_eq(&key.check_value(), check).then_some(key)
}

/// CUP POS "ECB" MAC → 8 ASCII upper-case hex characters.
fn cup_pos_ecb(key: &DesKey, mab: &[u8]) -> [u8; 8] {
    let hex_text = to_field_hex(&xor_blocks(mab));
    let (left, right) = hex_text.split_at(DES_BLOCK_BYTES);
    let first = key.encrypt_block(copy_array(left));
    let second = key.encrypt_block(xor8(&first, right));
    let hex_result = to_field_hex(&second);
    copy_array(&hex_result[..MAC_BYTES])
}

/// XOR of all 8-byte blocks of `data`, the last one zero-padded.
fn xor_blocks(data: &[u8]) -> [u8; 8] {
    let mut acc = [0u8; DES_BLOCK_BYTES];
    for block in data.chunks(DES_BLOCK_BYTES) {
        for (a, b) in acc.iter_mut().zip(block) {
            *a ^= b;
        }
    }
    acc
}

/// ISO 9797-1 MAC algorithm 3 with DES, padding method 1 (zeros; an empty MAB is one zero
/// block), IV 0: CBC with K1, then decrypt with K2 and encrypt with K1.
fn ansi_x919(k1: &[u8; 8], k2: &[u8; 8], mab: &[u8]) -> [u8; 8] {
    let first = Des::new(k1.into());
    let second = Des::new(k2.into());
    let mut acc = [0u8; DES_BLOCK_BYTES];
    let mut blocks = mab.chunks(DES_BLOCK_BYTES).peekable();
    if blocks.peek().is_none() {
        first.encrypt_block((&mut acc).into());
    }
    for block in blocks {
        acc = xor8(&acc, block);
        first.encrypt_block((&mut acc).into());
    }
    second.decrypt_block((&mut acc).into());
    first.encrypt_block((&mut acc).into());
    acc
}

/// The full 16-byte AES-128 CMAC tag (RFC 4493).
fn aes_cmac(key: &[u8; 16], message: &[u8]) -> [u8; 16] {
    let mut mac = <Cmac<Aes128> as Mac>::new(key.into());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// AES-128 ECB encryption of a zero block, the source of the AES key check value.
fn aes_zero_block(key: &[u8; 16]) -> [u8; 16] {
    let mut block = [0u8; 16];
    Aes128::new(key.into()).encrypt_block((&mut block).into());
    block
}

/// `a XOR b`, where `b` may be shorter than 8 bytes (zero padding).
fn xor8(a: &[u8; 8], b: &[u8]) -> [u8; 8] {
    let mut out = *a;
    for (o, x) in out.iter_mut().zip(b) {
        *o ^= x;
    }
    out
}

/// Equality whose running time depends only on the lengths, not on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// [`ct_eq`] for upper-case hex `expected` against received text whose ASCII letters may be
/// lower case. Folding every byte with `& !0x20` when it is a letter is branch-free on the data.
fn ct_eq_hex_text(expected: &[u8], received: &[u8]) -> bool {
    if expected.len() != received.len() {
        return false;
    }
    let diff = expected.iter().zip(received).fold(0u8, |acc, (x, y)| {
        let is_lower = u8::from(y.is_ascii_lowercase());
        let folded = y & !(is_lower << 5);
        acc | (x ^ folded)
    });
    std::hint::black_box(diff) == 0
}

/// Decodes a key's hex text into a stack buffer, hands the bytes to `build`, then wipes the
/// buffer. Errors name the position or length of the problem, never the text.
fn with_decoded_hex<T>(
    hex_text: &str,
    key_use: KeyUse,
    build: impl FnOnce(&[u8]) -> Result<T, KeyError>,
) -> Result<T, KeyError> {
    let digits = hex_text.len();
    if !digits.is_multiple_of(2) {
        return Err(KeyError::OddHexDigits { digits });
    }
    if let Some(offset) = hex_text.bytes().position(|c| !c.is_ascii_hexdigit()) {
        return Err(KeyError::NotHex { offset });
    }
    let mut buffer = [0u8; KEY_BYTES_MAX];
    let Some(out) = buffer.get_mut(..digits / 2) else {
        return Err(key_use.wrong_length(digits / 2));
    };
    let result = match hex::decode_to_slice(hex_text, out) {
        Ok(()) => build(out),
        // Unreachable after the checks above; still reported without the text.
        Err(_) => Err(KeyError::NotHex { offset: 0 }),
    };
    wipe(&mut buffer);
    result
}

/// Overwrites key bytes with zeros (volatile writes: not optimised away).
fn wipe(bytes: &mut [u8]) {
    zeroize::Zeroize::zeroize(bytes);
}

fn copy_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

fn first_bytes<const N: usize, const M: usize>(bytes: [u8; M]) -> [u8; N] {
    copy_array(&bytes[..N])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const CUP_MAK: &str = "0123456789ABCDEF";
    const CUP_TMK: &str = "11223344556677888877665544332211";
    const X919_KEY: &str = "0123456789ABCDEFFEDCBA9876543210";
    const RFC4493_KEY: &str = "2b7e151628aed2a6abf7158809cf4f3c";
    const RFC4493_M64: &str = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51\
                               30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";

    #[test]
    fn a_message_signed_in_each_dialect_verifies_and_fails_under_another_key() {
        use crate::iso8583::{self, FieldList, Mti, Value};
        let cases = [
            (
                "ascii1987",
                MacKey::from_hex(MacAlgorithm::AnsiX919, X919_KEY).unwrap(),
                16,
            ),
            (
                "iso87b",
                MacKey::from_hex(MacAlgorithm::AesCmac, RFC4493_KEY).unwrap(),
                8,
            ),
            (
                "cup_pos",
                MacKey::from_hex(MacAlgorithm::CupPosEcb, CUP_MAK).unwrap(),
                8,
            ),
        ];
        let other = |k: &MacKey| match k.algorithm() {
            MacAlgorithm::CupPosEcb => MacKey::from_hex(k.algorithm(), "FEDCBA9876543210"),
            MacAlgorithm::AnsiX919 => {
                MacKey::from_hex(k.algorithm(), "00112233445566778899AABBCCDDEEFF")
            }
            MacAlgorithm::AesCmac => {
                MacKey::from_hex(k.algorithm(), "000102030405060708090a0b0c0d0e0f")
            }
        };
        for (name, key, len) in cases {
            let spec = iso8583::Spec::builtin(name).unwrap();
            let mut f: FieldList<'_, 4> = FieldList::new();
            f.set(3, Value::Number(0)).unwrap();
            f.set(4, Value::Number(2500)).unwrap();
            f.set(11, Value::Number(7)).unwrap();
            let mut plain = bytes::BytesMut::new();
            iso8583::encode(spec, Mti(200), f.as_slice(), &mut plain).unwrap();
            let signed = sign_message(spec, &key, &plain).unwrap();
            let msg = iso8583::decode(spec, &signed).unwrap();
            let (mab, value) = msg.mac().unwrap();
            assert_eq!(value.len(), len, "{name}");
            assert!(verify(&key, mab, value), "{name}");
            assert!(!verify(&other(&key).unwrap(), mab, value), "{name}");
        }
        // An X9.19 MAC has no room in cup_pos's 8-character DE64.
        let x919 = MacKey::from_hex(MacAlgorithm::AnsiX919, X919_KEY).unwrap();
        assert_eq!(field_for(&x919, &crate::iso8583::CUP_POS, false), None);
        assert!(key_from_config("des", X919_KEY)
            .unwrap_err()
            .starts_with("algorithm:"));
        let e = key_from_config("x919", "0123").unwrap_err();
        assert!(e.starts_with("key:") && !e.contains("0123"), "{e}");
    }

    fn vectors_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors")
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn text<'a>(value: &'a serde_json::Value, name: &str) -> &'a str {
        value[name]
            .as_str()
            .unwrap_or_else(|| panic!("no string {name}"))
    }

    fn bytes(hex_text: &str) -> Vec<u8> {
        hex::decode(hex_text).unwrap()
    }

    fn mac_key(algorithm: MacAlgorithm, hex_text: &str) -> MacKey {
        MacKey::from_hex(algorithm, hex_text).unwrap()
    }

    /// Every vector JSON with a `mac` block, sorted so failures name files stably.
    fn vectors_with_mac() -> Vec<(PathBuf, serde_json::Value)> {
        let mut found = Vec::new();
        for dialect in ["ascii1987", "cup_bcd"] {
            for entry in std::fs::read_dir(vectors_dir().join(dialect)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "json") {
                    let json = read_json(&path);
                    if json.get("mac").is_some() {
                        found.push((path, json));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// The MAB of a message: `ascii1987` all but the trailing 16 hex characters; `cup_bcd` the
    /// bytes after TPDU (5) and header (6), all but the trailing 8 characters.
    fn mab_and_field(dialect: &str, message: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (start, field_len) = match dialect {
            "ascii1987" => (0, MAC_HEX_BYTES),
            "cup_bcd" => (11, MAC_BYTES),
            other => panic!("unknown dialect {other}"),
        };
        let split = message.len() - field_len;
        (message[start..split].to_vec(), message[split..].to_vec())
    }

    #[test]
    fn every_mac_block_in_the_shared_vectors_verifies() {
        let vectors = vectors_with_mac();
        let (mut cup, mut x919) = (0, 0);
        for (path, json) in &vectors {
            let mac = &json["mac"];
            let name = path.display();
            let algorithm = match text(mac, "algorithm") {
                a if a.starts_with("CUP POS") => MacAlgorithm::CupPosEcb,
                a if a.starts_with("ANSI X9.19") => MacAlgorithm::AnsiX919,
                other => panic!("{name}: unknown algorithm {other}"),
            };
            let key = mac_key(algorithm, text(mac, "key"));
            let mab = bytes(text(mac, "mab_hex"));
            let value = text(mac, "value").as_bytes();
            let computed = compute(&key, &mab);
            match algorithm {
                MacAlgorithm::CupPosEcb => {
                    assert_eq!(&computed[..], value, "{name}");
                    cup += 1;
                }
                _ => {
                    assert_eq!(&to_field_hex(&computed)[..], value, "{name}");
                    assert!(verify(&key, &mab, &bytes(text(mac, "value"))), "{name} raw");
                    x919 += 1;
                }
            }
            assert!(verify(&key, &mab, value), "{name}");
            // The stated MAB is the message itself, MTI up to the MAC field.
            let (wire_mab, wire_field) =
                mab_and_field(text(json, "dialect"), &bytes(text(json, "hex")));
            assert_eq!(wire_mab, mab, "{name}: mab_hex is not the wire MAB");
            assert_eq!(wire_field, value, "{name}: MAC field on the wire");
        }
        assert!(
            cup >= 13 && x919 >= 2,
            "found {cup} CUP and {x919} X9.19 vectors"
        );
    }

    #[test]
    fn malformed_vectors_with_a_wrong_mac_fail_verification() {
        let cases = [
            (
                "a_mac_wrong.json",
                MacAlgorithm::AnsiX919,
                "ascii1987/sale_0200.json",
            ),
            (
                "c_mac_wrong.json",
                MacAlgorithm::CupPosEcb,
                "cup_bcd/sale_0200.json",
            ),
        ];
        for (file, algorithm, original) in cases {
            let json = read_json(&vectors_dir().join("malformed").join(file));
            assert_eq!(text(&json, "expected"), "mac_invalid");
            let key = mac_key(algorithm, text(&json, "mac_key"));
            let (mab, field) = mab_and_field(text(&json, "dialect"), &bytes(text(&json, "hex")));
            assert!(!verify(&key, &mab, &field), "{file} verified");
            // Control: the same MAB with the original's MAC does verify, so the failure is the MAC.
            let good = read_json(&vectors_dir().join(original));
            assert!(
                verify(&key, &mab, text(&good["mac"], "value").as_bytes()),
                "{file} control"
            );
        }
    }

    #[test]
    fn research_v8_real_cup_message_has_mac_b3a092ae_and_x99_would_differ() {
        let mab = bytes(text(
            &read_json(&vectors_dir().join("cup_bcd/v8_real_qr_sale_0200.json"))["mac"],
            "mab_hex",
        ));
        let tak = "0723C80DB5F4CD3D0723C80DB5F4CD3D";
        assert_eq!(
            xor_blocks(&mab),
            <[u8; 8]>::try_from(bytes("3761343619AC6492")).unwrap()
        );
        assert_eq!(
            &compute(&mac_key(MacAlgorithm::CupPosEcb, tak), &mab),
            b"B3A092AE"
        );
        // Equal halves make 3DES single DES: the 8-byte key gives the same MAC.
        assert_eq!(
            &compute(&mac_key(MacAlgorithm::CupPosEcb, &tak[..16]), &mab),
            b"B3A092AE"
        );
        // X9.19 with K1 = K2 is plain X9.9 CBC-MAC, which the note gives as D3CED761…: wrong MAC.
        let x99 = compute(&mac_key(MacAlgorithm::AnsiX919, tak), &mab);
        assert_eq!(&to_field_hex(&x99)[..8], b"D3CED761");
        assert!(!verify(
            &mac_key(MacAlgorithm::CupPosEcb, tak),
            &mab,
            &to_field_hex(&x99)[..8]
        ));
    }

    #[test]
    fn research_v9_tak_decrypts_under_tmk_and_gives_mac_8a9e91b8() {
        let tmk = DesKey::from_hex("70F2A84CCBC2AE8625CBB0F2C22AB923").unwrap();
        let clear = tmk.decrypt_block(copy_array(&bytes("96D605EA176B7E9E")));
        assert_eq!(hex::encode_upper(clear), "C24A8FB57AA20123");
        let mab = bytes(
            "0200302004C020C0981100000000000000005100183402100006324392260009942820D131210112\
             0084393136363838303134303030303030303030303030303031313536ACF46E73838A82F926000000\
             00000000000822000001",
        );
        // Published intermediate XORs: block 1 ⊕ 2, then ⊕ 3, then ⊕ 4.
        for (blocks, expected) in [
            (2, "9A11302004C020C0"),
            (3, "9A1161201CF422D0"),
            (4, "9A1753638ED222D9"),
        ] {
            assert_eq!(hex::encode_upper(xor_blocks(&mab[..8 * blocks])), expected);
        }
        assert_eq!(hex::encode_upper(xor_blocks(&mab)), "4D08F434464FE7BF");
        let tak = MacKey::from_bytes(MacAlgorithm::CupPosEcb, &clear).unwrap();
        assert_eq!(&compute(&tak, &mab), b"8A9E91B8");
    }

    #[test]
    fn research_v9_tak_encrypted_under_the_tmk_gives_the_published_block() {
        // The other direction of V9: what the gateway sends at sign-on.
        let tmk = DesKey::from_hex("70F2A84CCBC2AE8625CBB0F2C22AB923").unwrap();
        let tak = DesKey::from_hex("C24A8FB57AA20123").unwrap();
        let pik = DesKey::random_single();
        let de62 = encrypt_cup_signon_keys(&tmk, &pik, &tak).unwrap();
        assert_eq!(hex::encode_upper(&de62[12..20]), "96D605EA176B7E9E");
        assert_eq!(de62[20..], tak.check_value());
        let (pik_back, mak) = decrypt_cup_signon_keys(&tmk, &de62).unwrap();
        assert_eq!(pik_back.check_value(), pik.check_value());
        assert_eq!(mak.check_value(), tak.check_value());
        let mab = bytes(
            "0200302004C020C0981100000000000000005100183402100006324392260009942820D131210112\
             0084393136363838303134303030303030303030303030303031313536ACF46E73838A82F926000000\
             00000000000822000001",
        );
        assert_eq!(&compute(&mak, &mab), b"8A9E91B8");
    }

    #[test]
    fn random_keys_differ_have_odd_parity_and_only_single_length_keys_are_sent() {
        let a = DesKey::random_single();
        let b = DesKey::random_single();
        assert_ne!(a.check_value(), b.check_value());
        let DesMaterial::Single(bytes) = &a.0 else {
            panic!("single length");
        };
        assert!(bytes.iter().all(|b| b.count_ones() % 2 == 1));
        let tmk = DesKey::from_hex(CUP_TMK).unwrap();
        assert!(encrypt_cup_signon_keys(&tmk, &a, &tmk).is_none());
    }

    #[test]
    fn x919_matches_the_psec_hello_world_vectors_for_both_paddings() {
        let key = mac_key(MacAlgorithm::AnsiX919, "41414141414141414242424242424242");
        assert_eq!(
            &to_field_hex(&compute(&key, b"hello world")),
            b"3DDE5C5511661CBF"
        );
        // Padding method 2 is the caller appending 0x80; zero padding then adds nothing.
        assert_eq!(
            &to_field_hex(&compute(&key, b"hello world\x80")),
            b"E16941032C3BC7D4"
        );
    }

    #[test]
    fn aes_cmac_matches_the_rfc_4493_examples() {
        let key: [u8; 16] = copy_array(&bytes(RFC4493_KEY));
        let m = bytes(RFC4493_M64);
        let examples = [
            (0, "bb1d6929e95937287fa37d129b756746"),
            (16, "070a16b46b4d4144f79bdd9dd04a287c"),
            (40, "dfa66747de9ae63030ca32611497c827"),
            (64, "51f0bebf7e3b9d92fc49741779363cfe"),
        ];
        let mac = mac_key(MacAlgorithm::AesCmac, RFC4493_KEY);
        for (len, tag) in examples {
            assert_eq!(hex::encode(aes_cmac(&key, &m[..len])), tag, "length {len}");
            assert_eq!(
                hex::encode(compute(&mac, &m[..len])),
                tag[..16],
                "length {len}"
            );
            let field = to_field_hex(&compute(&mac, &m[..len]));
            assert!(verify(&mac, &m[..len], &field));
            assert!(verify(
                &mac,
                &m[..len],
                field.to_ascii_lowercase().as_slice()
            ));
        }
    }

    #[test]
    fn signon_0810_de62_yields_the_dev_pik_and_mak() {
        let json = read_json(&vectors_dir().join("cup_bcd/signon_0810.json"));
        let de62 = bytes(text(&json["fields"], "62"));
        let tmk = DesKey::from_hex(CUP_TMK).unwrap();
        let (pik, mak) = decrypt_cup_signon_keys(&tmk, &de62).unwrap();
        assert!(pik.ct_eq_bytes(&bytes("2233445566778899")));
        assert_eq!(mak.algorithm(), MacAlgorithm::CupPosEcb);
        let MacMaterial::Des(mak_des) = &mak.material else {
            panic!("MAK is not DES")
        };
        assert!(mak_des.ct_eq_bytes(&bytes(CUP_MAK)));
        assert_eq!(cup_pos_check_value(&pik)[..], de62[8..12]);
        assert_eq!(cup_pos_check_value(mak_des)[..], de62[20..24]);
    }

    #[test]
    fn signon_de62_with_a_bad_check_value_or_length_is_rejected() {
        let json = read_json(&vectors_dir().join("cup_bcd/signon_0810.json"));
        let de62 = bytes(text(&json["fields"], "62"));
        let tmk = DesKey::from_hex(CUP_TMK).unwrap();
        let mut bad_pik = de62.clone();
        bad_pik[11] ^= 1;
        assert_eq!(
            decrypt_cup_signon_keys(&tmk, &bad_pik).unwrap_err(),
            SignOnKeyError::PikCheckValue
        );
        let mut bad_mak = de62.clone();
        bad_mak[12] ^= 1;
        assert_eq!(
            decrypt_cup_signon_keys(&tmk, &bad_mak).unwrap_err(),
            SignOnKeyError::MakCheckValue
        );
        let wrong_tmk = DesKey::from_hex(X919_KEY).unwrap();
        assert!(decrypt_cup_signon_keys(&wrong_tmk, &de62).is_err());
        assert_eq!(
            decrypt_cup_signon_keys(&tmk, &de62[..23]).unwrap_err(),
            SignOnKeyError::WrongLength { actual: 23 }
        );
    }

    #[test]
    fn debug_and_errors_never_show_key_material() {
        let key = mac_key(MacAlgorithm::AnsiX919, X919_KEY);
        let shown = format!("{key:?}");
        assert!(
            shown.contains("AnsiX919") && shown.contains("kcv"),
            "{shown}"
        );
        for part in ["0123456789", "FEDCBA98", "0123456789abcdef"] {
            assert!(
                !shown.to_uppercase().contains(&part.to_uppercase()),
                "{shown}"
            );
        }
        let tmk = format!("{:?}", DesKey::from_hex(CUP_TMK).unwrap());
        assert!(
            !tmk.contains("11223344") && tmk.contains("len_bytes: 16"),
            "{tmk}"
        );

        let secret = "0123456789ABCDEFFEDCBA987654321Z";
        let error = MacKey::from_hex(MacAlgorithm::AnsiX919, secret).unwrap_err();
        assert_eq!(error, KeyError::NotHex { offset: 31 });
        for text in [error.to_string(), format!("{error:?}")] {
            assert!(!text.contains("0123") && !text.contains('Z'), "{text}");
        }
    }

    #[test]
    fn keys_of_the_wrong_length_or_form_are_refused_with_a_named_reason() {
        let cases = [
            (
                MacAlgorithm::AnsiX919,
                CUP_MAK,
                "ANSI X9.19 MAC key must be 16 bytes, got 8",
            ),
            (
                MacAlgorithm::AesCmac,
                CUP_MAK,
                "AES-CMAC key must be 16 bytes, got 8",
            ),
            (
                MacAlgorithm::CupPosEcb,
                "0123456789ABCD",
                "CUP POS MAC key must be 8, 16 or 24 bytes, got 7",
            ),
            (
                MacAlgorithm::CupPosEcb,
                &"00".repeat(40),
                "CUP POS MAC key must be 8, 16 or 24 bytes, got 40",
            ),
            (
                MacAlgorithm::CupPosEcb,
                "012",
                "key hex has an odd number of digits (3)",
            ),
            (
                MacAlgorithm::CupPosEcb,
                "",
                "CUP POS MAC key must be 8, 16 or 24 bytes, got 0",
            ),
        ];
        for (algorithm, hex_text, message) in cases {
            assert_eq!(
                MacKey::from_hex(algorithm, hex_text)
                    .unwrap_err()
                    .to_string(),
                message
            );
        }
        assert!(DesKey::from_bytes(&[0; 12]).is_err());
        assert!(MacKey::from_hex(MacAlgorithm::CupPosEcb, "0123456789abcdef").is_ok());
    }

    #[test]
    fn verify_rejects_other_lengths_and_accepts_lower_case_hex() {
        let key = mac_key(MacAlgorithm::CupPosEcb, CUP_MAK);
        let mab = b"0200 anything";
        let good = compute(&key, mab);
        assert!(verify(&key, mab, &good));
        assert!(verify(&key, mab, good.to_ascii_lowercase().as_slice()));
        assert!(!verify(&key, mab, &good[..7]));
        assert!(!verify(&key, mab, &to_field_hex(&good)));
        assert!(!verify(&key, mab, b""));
        let x919 = mac_key(MacAlgorithm::AnsiX919, X919_KEY);
        assert!(!verify(&x919, mab, &[0; 12]));
    }

    #[test]
    fn an_empty_mab_is_one_zero_block() {
        let key = mac_key(MacAlgorithm::AnsiX919, X919_KEY);
        assert_eq!(compute(&key, b""), compute(&key, &[0; 8]));
        let cup = mac_key(MacAlgorithm::CupPosEcb, CUP_MAK);
        assert_eq!(compute(&cup, b""), compute(&cup, &[0; 8]));
    }

    #[test]
    fn check_values_follow_the_des_convention() {
        // CUP check value of the dev MAK, from signon_0810 DE62.
        let mak = DesKey::from_hex(CUP_MAK).unwrap();
        assert_eq!(hex::encode_upper(cup_pos_check_value(&mak)), "D5D44FF7");
        let mac = mac_key(MacAlgorithm::CupPosEcb, CUP_MAK);
        assert_eq!(mac.check_value(), mak.check_value());
        // X9.19: the double-length key's 3DES check value, as key ceremony sheets print it.
        let x919 = mac_key(MacAlgorithm::AnsiX919, X919_KEY);
        let double = DesKey::from_hex(X919_KEY).unwrap();
        assert_eq!(x919.check_value(), double.check_value());
    }

    #[test]
    fn fixture_keys_match_the_vectors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys.toml");
        let keys: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cup = keys["cup_pos"].as_table().unwrap();
        assert_eq!(cup["mak"].as_str(), Some(CUP_MAK));
        assert_eq!(cup["tmk"].as_str(), Some(CUP_TMK));
        let ascii = keys["ascii1987"].as_table().unwrap();
        assert_eq!(ascii["x919"].as_str(), Some(X919_KEY));
        assert_eq!(ascii["aes_cmac"].as_str(), Some(RFC4493_KEY));
        for table in [cup, ascii] {
            for value in table.values().filter_map(|v| v.as_str()) {
                assert!(
                    DesKey::from_hex(value).is_ok() || value.len() == 32,
                    "{value}"
                );
            }
        }
    }
}
