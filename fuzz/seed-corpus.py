#!/usr/bin/env python3
"""Builds the seed corpora of the fuzz targets in fuzz/corpus/<target>/ (not committed).

Sources: ../shared/vectors (ascii1987, cup_bcd, malformed), fixtures/, specs/, deploy/ and the
configuration defaults in src/config.rs. Each seed is written in the input layout its target
reads (see the doc comment at the top of each fuzz_targets/*.rs). Standard library only.

    python3 fuzz/seed-corpus.py [--shared DIR]
"""

import argparse
import glob
import hashlib
import json
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")

# --- CRC32C (Castagnoli), as the journal uses -------------------------------------------
_TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    _TABLE.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def journal_record(seq, payload):
    length = struct.pack("<I", len(payload))
    seqb = struct.pack("<Q", seq)
    crc = crc32c(length + seqb + payload)
    return length + struct.pack("<I", crc) + seqb + payload


# --- helpers ----------------------------------------------------------------------------
counts = {}


def put(target, data, name=None):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = name or hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    counts[target] = counts.get(target, 0) + 1


def read(path):
    with open(path, "rb") as f:
        return f.read()


def frame(body, framing):
    n = len(body)
    if framing == "binary2":
        return struct.pack(">H", n) + body
    if framing == "ascii4":
        return b"%04d" % n + body
    return bytes([int(("%04d" % n)[:2], 16), int(("%04d" % n)[2:], 16)]) + body  # bcd2


FRAMINGS = {"binary2": 0, "ascii4": 1, "bcd2": 2}
MAX_8192 = 3 << 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared"))
    args = ap.parse_args()
    vectors = os.path.join(args.shared, "vectors")

    ascii_bodies, cup_frames = [], []  # cup frames: TPDU + header + message
    for path in sorted(glob.glob(os.path.join(vectors, "ascii1987", "*.hex"))):
        ascii_bodies.append(bytes.fromhex(read(path).decode().strip()))
    for path in sorted(glob.glob(os.path.join(vectors, "cup_bcd", "*.hex"))):
        cup_frames.append(bytes.fromhex(read(path).decode().strip()))
    malformed = []
    for path in sorted(glob.glob(os.path.join(vectors, "malformed", "*.json"))):
        malformed.append(json.loads(read(path)))

    # frame_decode: [mode, ncuts, cuts..., stream]
    for body in ascii_bodies[:8]:
        for framing, f in FRAMINGS.items():
            put("frame_decode", bytes([MAX_8192 | f, 2, 40, 200]) + frame(body, framing))
    two = frame(ascii_bodies[0], "ascii4") + b"0000" + frame(ascii_bodies[1], "ascii4")
    put("frame_decode", bytes([MAX_8192 | 1, 3, 3, 90, 180]) + two)
    for fr in cup_frames[:8]:
        for framing, f in FRAMINGS.items():
            put("frame_decode", bytes([MAX_8192 | 4 | f, 1, 128]) + frame(fr, framing))
    for v in malformed:
        cup = 4 if v["dialect"] == "cup_bcd" else 0
        put("frame_decode", bytes([MAX_8192 | cup, 1, 100]) + bytes.fromhex(v["framed_hex"]))
        put("frame_decode", bytes([(0 << 3) | cup, 0]) + bytes.fromhex(v["framed_hex"]))

    # codec targets: the message from the MTI on.
    for body in ascii_bodies:
        put("codec_ascii1987", body)
    for fr in cup_frames:
        put("codec_cup_pos", fr[11:])
    # codec_iso87b: fixtures/iso87b (iso87b and the EBCDIC test dialect run on every input).
    for path in sorted(glob.glob(os.path.join(REPO, "fixtures", "iso87b", "*.hex"))):
        put("codec_iso87b", bytes.fromhex(read(path).decode().strip()))
    for v in malformed:
        wire = bytes.fromhex(v["framed_hex"])[2:]
        if v["dialect"] == "cup_bcd":
            put("codec_cup_pos", wire[11:])
        else:
            put("codec_ascii1987", wire)

    # json_view: the vector files themselves (mti + fields are what from_json reads).
    for path in sorted(glob.glob(os.path.join(vectors, "*", "*.json"))):
        doc = json.loads(read(path))
        if "mti" in doc and "fields" in doc:
            put("json_view", json.dumps({"mti": doc["mti"], "fields": doc["fields"]}))
    put("json_view", '{"mti":"0800","fields":{"7":"1125093015","11":"000001","70":"301"}}')
    put("json_view", '{"mti":"0200","fields":{"41":"hex:00FF","62":"0A0B"}}')

    # spec_load: a dialect file, NUL, a message of that dialect.
    ascii_spec = read(os.path.join(REPO, "specs", "ascii1987.toml"))
    cup_spec = read(os.path.join(REPO, "specs", "cup_pos.toml"))
    for body in ascii_bodies[:6]:
        put("spec_load", ascii_spec + b"\0" + body)
    for fr in cup_frames[:6]:
        put("spec_load", cup_spec + b"\0" + fr[11:])
    # iso87b and the EBCDIC test dialects (cp037/cp500, ebcdic lengths, hex_ebcdic, tlv = "ber").
    for spec_path, prefix in [(os.path.join(REPO, "specs", "iso87b.toml"), ""),
                              (os.path.join(REPO, "fixtures", "iso87b", "ebcdic500.toml"), "ebcdic500_"),
                              (os.path.join(REPO, "fixtures", "iso87b", "ebcdic037.toml"), "ebcdic037_")]:
        if not os.path.exists(spec_path):
            continue
        text = read(spec_path)
        for path in sorted(glob.glob(os.path.join(REPO, "fixtures", "iso87b", prefix + "*.hex"))):
            name = os.path.basename(path)
            if prefix or not name.startswith("ebcdic"):
                put("spec_load", text + b"\0" + bytes.fromhex(read(path).decode().strip()))

    # config_parse: the documented defaults and every configuration file of the repo.
    src = read(os.path.join(REPO, "src", "config.rs")).decode()
    m = re.search(r'DOCUMENTED_DEFAULTS: &str = r#"(.*?)"#;', src, re.S)
    if m:
        put("config_parse", m.group(1))
    for path in [os.path.join(REPO, "fixtures", "serve-with-host.toml"),
                 os.path.join(REPO, "deploy", "refundgate.toml")]:
        if os.path.exists(path):
            put("config_parse", read(path))
    put("config_parse", "")

    # merchants_parse: the sample merchants and every TOML fixture.
    for path in sorted(glob.glob(os.path.join(REPO, "fixtures", "*.toml"))):
        put("merchants_parse", read(path))
    put("merchants_parse",
        '[profiles.p]\nreserve = 1000000\nutc_offset = "+08:00"\ncurrency = 840\n'
        '[[merchants]]\nid = "M"\nprofile = "p"\n'
        'terminals = [{ id = "T1" }, { id = "T2", refund_enabled = false }]\n'
        '[[merchants]]\nid = "C"\nprofile = "p"\ncurrency = 156\n'
        'terminals = [{ id = "C1", batch = 7 }]\n')

    # journal_record: raw segment bodies and built directories.
    recs = b"".join(journal_record(s, b"payload-%d" % s) for s in range(1, 6))
    put("journal_record", b"\0" + recs + b"\0" * 64)
    put("journal_record", b"\0" + recs + b"\xab" * 40 + b"\0" * 24)  # torn tail
    put("journal_record", b"\0" + recs[:30] + b"\xff" * 8 + recs[60:])  # middle damage
    built = bytes([1, 5, 0]) + b"".join(bytes([0, 8]) + b"record%02d" % i for i in range(5))
    put("journal_record", built + bytes([0, 0, 0, 0, 4, 0]))
    put("journal_record", built + bytes([0, 20, 0xFF, 16]) + b"\xcd" * 16 + bytes([8, 1]))
    put("journal_record", built + bytes([0, 0, 0, 0, 4, 2, 3, 8]) + b"RGLSsnap")

    # snapshot_restore: built mode (workload, patches, more traffic), seeded and not.
    for seeded in (1, 3):
        for n in (0, 4, 12):
            ops = bytes([1, 2, 30, 0, 60, 1, 3, 1, 0, 4, 0, 0, 7, 9, 0, 2, 5, 7] * 4)[: 3 * n]
            put("snapshot_restore", bytes([seeded, n]) + ops + bytes([0]) + bytes([1, 1, 40, 2, 3, 0]))
            put("snapshot_restore", bytes([seeded, n]) + ops + bytes([2, 0, 40, 7, 0, 90, 1]))
    put("snapshot_restore", b"\0RGLS\x01\x00")

    # ledger_event: built mode (sales, some refunded; patches), and a raw byte.
    put("ledger_event", bytes([1, 4, 50, 1, 60, 0, 70, 1, 80, 1, 0]))
    put("ledger_event", bytes([1, 2, 50, 1, 60, 1, 2, 1, 0, 9, 7, 0, 0, 20, 0]))
    put("ledger_event", bytes([0, 1]))

    # admin_http: flags (4 = token, 16 = Idempotency-Key), then target, key and body lines.
    m = b"/v1/merchants/MERCHANT%20000001"
    for flags, target, key, body in [
        (4, m, b"", b""),
        (0, m, b"", b""),
        (4, m + b"/transactions?rrn=000000000001", b"", b""),
        (4, m + b"/transactions?terminal=TERM0001&stan=2&date=0131", b"", b""),
        (4, m + b"/would-pass?terminal=TERM0001&stan=1&transmission=0131000001", b"", b""),
        (21, m + b"/top-up", b"k1", b'{"amount": 500}'),
        (21, m + b"/settle", b"k2", b'{"terminal": "TERM0001"}'),
        (21, m + b"/terminals/TERM0001/refunds", b"k3", b'{"enabled": false}'),
        (4, b"/v1/exceptions", b"", b""),
    ]:
        put("admin_http", bytes([flags]) + target + b"\n" + key + b"\n" + body)

    # saf_reader: SAF records (added, delivered, dead) around real reversal bodies.
    def saf_add(i, dialect, body, upstream=b"bank_a"):
        return (bytes([1]) + struct.pack(">Q", i) + struct.pack(">q", 1_769_871_600)
                + bytes([dialect, len(upstream)]) + upstream + struct.pack(">H", len(body)) + body)

    reversals = [(0, b) for b in ascii_bodies[-6:]] + [(1, f[11:]) for f in cup_frames[-6:]]
    payloads = [saf_add(i + 1, d, b) for i, (d, b) in enumerate(reversals)]
    payloads.append(bytes([2]) + struct.pack(">Q", 1))
    payloads.append(bytes([3]) + struct.pack(">Q", 2) + bytes([1]) + struct.pack(">q", 1_769_871_700)
                    + struct.pack(">I", 5))

    def saf_input(flags, ps, tail=b""):
        out = bytes([flags, len(ps)])
        for p in ps:
            out += struct.pack(">H", len(p)) + p
        return out + tail

    put("saf_reader", saf_input(0, payloads[:14]))
    put("saf_reader", saf_input(0, payloads[-3:]))
    snap = b"SAF1" + struct.pack(">Q", 9) + struct.pack(">Q", 1)
    for p in payloads[:3]:
        snap += struct.pack(">I", len(p)) + p
    put("saf_reader", saf_input(1, payloads[3:6], snap))

    for target in sorted(counts):
        print(f"{target}: {counts[target]} seeds")


if __name__ == "__main__":
    main()
