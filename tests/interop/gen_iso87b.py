#!/usr/bin/env python3
"""Write the iso87b, EBCDIC and DE55 BER-TLV vectors in fixtures/iso87b/ with pyiso8583 4.0.1.

Usage:
    target/ci-venv/bin/python tests/interop/gen_iso87b.py fixtures/iso87b          # write
    target/ci-venv/bin/python tests/interop/gen_iso87b.py fixtures/iso87b --check  # compare

The spec dicts below are written from jPOS's ISO87BPackager field list (IFB_NUMERIC,
IFB_LLNUM with left padding, IF_CHAR, IFB_LLCHAR, IFB_LLLCHAR, IFB_BINARY), not from
refundgate's specs/iso87b.toml, and every message is encoded by pyiso8583, decoded back
and compared; the BER-TLV listing of DE55 is made by the small parser here. Deterministic:
no clock, no randomness. Each vector is NAME.hex (wire bytes from the MTI on, lower-case hex)
and NAME.json ({dialect, mti, fields, subfields?, note}); values as refundgate's JSON view
writes them: digits for numerics (track separator `D` in BCD, `=` in text), upper-case hex
for binary, text otherwise, `hex:` + wire bytes for EBCDIC text without an ASCII form.
"""

import copy
import json
import pathlib
import sys

import iso8583
from iso8583 import specs

# ---------------------------------------------------------------------------------------------
# Field builders in pyiso8583 terms.
# ---------------------------------------------------------------------------------------------


def ifb_numeric(digits):
    """IFB_NUMERIC(n, pad=true): BCD, odd counts right-justified (pad nibble 0 on the left)."""
    f = {"data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": digits, "len_count": "nibbles"}
    if digits % 2:
        f["left_pad"] = "0"
    return f


def ifb_llnum(max_digits):
    """IFB_LLNUM(n, pad=true): 1 BCD length byte counting digits, BCD data, pad on the left."""
    return {"data_enc": "b", "len_enc": "bcd", "len_type": 1, "max_len": max_digits,
            "len_count": "nibbles", "left_pad": "0"}


def if_char(n, enc="ascii"):
    return {"data_enc": enc, "len_enc": "bcd", "len_type": 0, "max_len": n}


def ifb_llchar(n, enc="ascii"):
    return {"data_enc": enc, "len_enc": "bcd", "len_type": 1, "max_len": n}


def ifb_lllchar(n, enc="ascii"):
    return {"data_enc": enc, "len_enc": "bcd", "len_type": 2, "max_len": n}


def ifb_binary(n):
    return {"data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": n}


def ifb_lllbinary(n):
    return {"data_enc": "b", "len_enc": "bcd", "len_type": 2, "max_len": n}


# ISO87BPackager, the fields these vectors use (all others are never set).
ISO87B = copy.deepcopy(specs.default)
ISO87B.update({
    "t": {"data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": 2},
    "p": {"data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": 8},
    "1": {"data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": 8},
    "2": ifb_llnum(19), "3": ifb_numeric(6), "4": ifb_numeric(12), "7": ifb_numeric(10),
    "11": ifb_numeric(6), "12": ifb_numeric(6), "13": ifb_numeric(4), "14": ifb_numeric(4),
    "15": ifb_numeric(4), "18": ifb_numeric(4), "19": ifb_numeric(3), "22": ifb_numeric(3),
    "23": ifb_numeric(3), "25": ifb_numeric(2), "32": ifb_llnum(11), "35": ifb_llnum(37),
    "37": if_char(12), "38": if_char(6), "39": if_char(2), "41": if_char(8), "42": if_char(15),
    "43": if_char(40), "44": ifb_llchar(25), "49": if_char(3), "52": ifb_binary(8),
    "54": ifb_lllchar(120), "55": ifb_lllbinary(999), "64": ifb_binary(8),
    "70": ifb_numeric(3), "74": ifb_numeric(10), "76": ifb_numeric(10), "86": ifb_numeric(16),
    "88": ifb_numeric(16), "90": ifb_numeric(42), "128": ifb_binary(8),
})
ISO87B_NUMERIC = {"2", "3", "4", "7", "11", "12", "13", "14", "15", "18", "19", "22", "23", "25",
                  "32", "70", "74", "76", "86", "88", "90"}

# A host in EBCDIC cp500 throughout: EBCDIC MTI, hex bitmaps in EBCDIC, EBCDIC length digits,
# EBCDIC characters (fixtures/iso87b/ebcdic500.toml).
EBCDIC500 = copy.deepcopy(specs.default)
EBCDIC500.update({
    "t": {"data_enc": "cp500", "len_enc": "cp500", "len_type": 0, "max_len": 4},
    "p": {"data_enc": "cp500", "len_enc": "cp500", "len_type": 0, "max_len": 16},
    "1": {"data_enc": "cp500", "len_enc": "cp500", "len_type": 0, "max_len": 16},
})
for k, (lt, n) in {"2": (2, 19), "3": (0, 6), "4": (0, 12), "11": (0, 6), "35": (2, 37),
                   "37": (0, 12), "39": (0, 2), "41": (0, 8), "42": (0, 15), "43": (0, 40),
                   "44": (2, 25), "49": (0, 3), "70": (0, 3)}.items():
    EBCDIC500[k] = {"data_enc": "cp500", "len_enc": "cp500", "len_type": lt, "max_len": n}
EBCDIC500["55"] = {"data_enc": "b", "len_enc": "cp500", "len_type": 3, "max_len": 999}

# A host with binary bitmaps and BCD numerics but cp037 characters and BCD lengths
# (fixtures/iso87b/ebcdic037.toml).
EBCDIC037 = copy.deepcopy(ISO87B)
for k, n in {"37": 12, "38": 6, "39": 2, "41": 8, "42": 15, "43": 40, "49": 3}.items():
    EBCDIC037[k] = if_char(n, "cp037")
EBCDIC037["44"] = ifb_llchar(25, "cp037")
EBCDIC037["54"] = ifb_lllchar(120, "cp037")

SPECS = {"iso87b": ISO87B, "ebcdic500": EBCDIC500, "ebcdic037": EBCDIC037}
TEXT_ENC = {"iso87b": "ascii", "ebcdic500": "cp500", "ebcdic037": "cp037"}

# ---------------------------------------------------------------------------------------------
# DE55: EMV data objects, and an independent BER-TLV reader for the expected listing.
# ---------------------------------------------------------------------------------------------


def tlv(tag, value_hex):
    value = bytes.fromhex(value_hex)
    n = len(value)
    length = bytes([n]) if n < 0x80 else (bytes([0x81, n]) if n < 0x100 else bytes([0x82]) + n.to_bytes(2, "big"))
    return bytes.fromhex(tag) + length + value


def read_tlv(data):
    out, i = [], 0
    while i < len(data):
        if data[i] == 0:
            i += 1
            continue
        start = i
        i += 1
        if data[start] & 0x1F == 0x1F:
            while data[i] & 0x80:
                i += 1
            i += 1
        tag = data[start:i].hex().upper()
        n = data[i]
        i += 1
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(data[i:i + k], "big")
            i += k
        value = data[i:i + n]
        assert len(value) == n, "TLV value runs past the end"
        i += n
        obj = {"tag": tag, "len": n}
        if data[start] & 0x20:
            obj["objects"] = read_tlv(value)
        else:
            obj["value"] = value.hex().upper()
        out.append(obj)
    return out


ICC_SALE = b"".join([
    tlv("5A", "4761739001010119"),                       # application PAN (card data)
    tlv("5F34", "01"),
    tlv("57", "4761739001010119D22122011143804400000F"),  # track 2 equivalent (card data)
    tlv("82", "5800"),
    tlv("95", "0080008000"),
    tlv("9A", "261121"),
    tlv("9C", "00"),
    tlv("9F02", "000000001500"),
    tlv("9F10", "06010A03A0B800"),
    tlv("9F26", "8E19C2B3A1D4F507"),
    tlv("9F27", "80"),
    tlv("9F36", "0042"),
    tlv("9F37", "1A2B3C4D"),
    tlv("9F6B", "4761739001010119D2212201"),             # contactless track 2 (card data)
])
# Issuer response: authentication data and a script template (constructed 72 with 9F18, 86),
# and a 0x81 long-form length.
ICC_RESPONSE = b"".join([
    tlv("91", "0A1B2C3D4E5F60710012"),
    tlv("72", (tlv("9F18", "00000001") + tlv("86", "84DA00CB0A" + "11" * 10)).hex()),
    tlv("9F5B", "AB" * 130),
])

# ---------------------------------------------------------------------------------------------
# Messages.
# ---------------------------------------------------------------------------------------------
PAN16 = "4761739001010119"
PAN19 = "6222021234567890123"
DE90_SALE = "0200" + "000100" + "1121154500" + "00000012345" + "00000000000"

VECTORS = [
    ("iso87b", "sale_0200", "0200", {
        "2": PAN16, "3": "000000", "4": "000000001500", "7": "1121154500", "11": "000100",
        "12": "154500", "13": "1121", "14": "2212", "22": "051", "23": "001", "25": "00",
        "35": "4761739001010119D22122011143804400000", "41": "TERM0001",
        "42": "MERCHANT0000001", "49": "840", "52": "55FA04BF0E1D2C3B", "55": ICC_SALE.hex().upper(),
        "64": "1A2B3C4D5E6F7081"},
     "sale with chip data: odd DE22/23/35 left-padded, DE55 BER-TLV with card data tags 5A, 57, 9F6B"),
    ("iso87b", "sale_0210", "0210", {
        "3": "000000", "4": "000000001500", "11": "000100", "12": "154500", "13": "1121",
        "37": "000000000100", "38": "A1B2C3", "39": "00", "41": "TERM0001",
        "42": "MERCHANT0000001", "55": ICC_RESPONSE.hex().upper()},
     "approval: DE55 with a constructed issuer script template and a long-form length"),
    ("iso87b", "refund_0200", "0200", {
        "2": PAN19, "3": "200000", "4": "000000000700", "7": "1122101500", "11": "000123",
        "12": "101500", "13": "1122", "22": "012", "32": "12345", "37": "000000000100",
        "41": "TERM0001", "42": "MERCHANT0000001", "49": "840", "90": DE90_SALE},
     "refund: 19-digit PAN and 5-digit DE32 left-padded (jPOS IFB_LLNUM pad=true); DE90 n42"),
    ("iso87b", "refund_0210_decline_61", "0210", {
        "3": "200000", "4": "000000000700", "11": "000123", "12": "101500", "13": "1122",
        "39": "61", "41": "TERM0001", "42": "MERCHANT0000001", "44": "MERCHANT_DAY_AMOUNT",
        "54": "0090840C0000000008000091840C0000000000000092840C000000000000"},
     "decline 61 with the reason in DE44 and DE54 additional amounts (LLL BCD length)"),
    ("iso87b", "reversal_0400", "0400", {
        "2": PAN16, "3": "000000", "4": "000000001500", "7": "1121154600", "11": "000101",
        "12": "154600", "13": "1121", "25": "00", "39": "98", "41": "TERM0001",
        "42": "MERCHANT0000001", "49": "840", "90": DE90_SALE},
     "reversal of the sale: secondary bitmap for DE90"),
    ("iso87b", "echo_0800", "0800", {"7": "1121154500", "11": "000001", "70": "301"},
     "echo: secondary bitmap, DE70 n3 left-padded (03 01)"),
    ("iso87b", "echo_0810", "0810", {"7": "1121154500", "11": "000001", "39": "00", "70": "301"},
     "echo response"),
    ("iso87b", "settlement_0500", "0500", {
        "11": "000200", "15": "1121", "41": "TERM0001", "42": "MERCHANT0000001",
        "74": "0000000003", "76": "0000000012", "86": "0000000000002200",
        "88": "0000000000045000", "128": "0102030405060708"},
     "batch totals DE74/76/86/88 and a DE128 binary MAC"),
    ("ebcdic500", "ebcdic500_sale_0200", "0200", {
        "2": PAN16, "3": "000000", "4": "000000001500", "11": "000100",
        "35": "4761739001010119=22122011143804400000", "41": "TERM0001", "42": "MERCHANT0000001",
        "43": "SHOP [1] | NO! ^CAPS^  BERLIN         DE", "49": "840",
        "55": ICC_SALE.hex().upper()},
     "EBCDIC cp500 throughout: MTI, hex bitmap, length digits, track 2 with '=', `[ ] | ! ^`"),
    ("ebcdic500", "ebcdic500_echo_0810", "0810", {"11": "000001", "39": "00", "70": "301"},
     "EBCDIC cp500 with a secondary bitmap"),
    ("ebcdic037", "ebcdic037_sale_0210", "0210", {
        "3": "000000", "4": "000000001500", "11": "000100", "37": "000000000100",
        "38": "A1B2C3", "39": "00", "41": "TERM0001", "42": "MERCHANT0000001",
        "43": "CAF\u00c9 [NORD] | ZUERICH!                CH", "44": "APPROVED"},
     "cp037 characters with binary bitmap and BCD numerics; DE43 holds an E-acute, which has no "
     "ASCII form and is shown as hex: + wire bytes"),
]


def shown(dialect, spec, key, value, enc_data):
    """What refundgate's JSON view shows for one decoded field."""
    f = spec[key]
    if f["data_enc"] == "b":
        return value.upper()
    if TEXT_ENC[dialect] != "ascii" and f["data_enc"] != "ascii":
        if not value.isascii():
            return "hex:" + enc_data.hex().upper()
        return value
    return value


def build(dialect, mti, fields):
    spec = SPECS[dialect]
    doc = {"t": mti}
    doc.update(fields)
    raw, _ = iso8583.encode(doc, spec)
    raw = bytes(raw)
    dec, enc = iso8583.decode(raw, spec)
    assert dec["t"] == mti, (dec["t"], mti)
    out = {}
    for k in sorted((k for k in dec if k.isdigit() and k != "1"), key=int):
        if k in ISO87B_NUMERIC and spec[k]["data_enc"] == "b":
            assert dec[k].isdigit(), (k, dec[k])  # pyiso8583 does not check digits; we do
        expected = fields[k].upper() if spec[k]["data_enc"] == "b" else fields[k]
        assert dec[k] == expected, (k, dec[k], expected)
        out[k] = shown(dialect, spec, k, dec[k], enc[k]["data"])
    assert set(out) == set(fields), (set(out) ^ set(fields))
    again, _ = iso8583.encode(dict(dec), spec)
    assert bytes(again) == raw
    return raw, out


def vectors():
    for dialect, name, mti, fields, note in VECTORS:
        raw, shown_fields = build(dialect, mti, fields)
        doc = {"dialect": dialect, "mti": mti, "fields": shown_fields}
        if "55" in fields:
            doc["subfields"] = {"55": read_tlv(bytes.fromhex(fields["55"]))}
        doc["note"] = note
        doc["generator"] = "pyiso8583 " + iso8583.__version__ + " (tests/interop/gen_iso87b.py)"
        yield name, raw.hex(), json.dumps(doc, indent=2, ensure_ascii=True) + "\n"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = pathlib.Path(sys.argv[1])
    check = "--check" in sys.argv[2:]
    bad = 0
    for name, hex_text, json_text in vectors():
        for path, text in [(out / f"{name}.hex", hex_text + "\n"), (out / f"{name}.json", json_text)]:
            if check:
                if not path.exists() or path.read_text() != text:
                    print(f"differs: {path}")
                    bad += 1
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if bad:
        sys.exit(1)
    print(("checked" if check else "wrote"), len(VECTORS), "vectors in", out)


if __name__ == "__main__":
    main()
