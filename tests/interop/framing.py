"""The 2-byte big-endian length framing both interoperability clients speak (pyiso8583 does
the ISO 8583 encoding; this file only frames it)."""
import struct

import iso8583


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    return data


def exchange(sock, doc, spec):
    """Sends `doc` encoded with `spec` in one frame and returns the decoded answer."""
    raw, _ = iso8583.encode(doc, spec)
    sock.sendall(struct.pack(">H", len(raw)) + bytes(raw))
    (length,) = struct.unpack(">H", read_exactly(sock, 2))
    answer, _ = iso8583.decode(bytearray(read_exactly(sock, length)), spec)
    return answer
