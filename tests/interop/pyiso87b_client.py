#!/usr/bin/env python3
"""Independent iso87b terminal: pyiso8583 + ssl, with the ISO87BPackager spec dict of
gen_iso87b.py (written from jPOS's field list, not from refundgate's specs/iso87b.toml).

Usage: pyiso87b_client.py HOST PORT CAFILE STAN
Sends a sale, a refund larger than the sale and a refund that fits, decodes every answer with
the same spec and prints one line per answer: `NAME: MTI DE39 DE44 DE54` (`-` when absent).
Exit 0 when every answer decoded, 1 otherwise, 77 when pyiso8583 is not installed.
"""
import os
import socket
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import iso8583
    from gen_iso87b import ISO87B as spec
    import framing
except ImportError:
    print("pyiso8583 not installed")
    sys.exit(77)


def exchange(sock, doc):
    return framing.exchange(sock, doc, spec)


def show(name, a):
    print("%s: %s %s %s %s" % (name, a.get("t"), a.get("39", "-"), a.get("44", "-"), a.get("54", "-")))


def main():
    host, port, cafile, stan = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    ctx = ssl.create_default_context(cafile=cafile)
    de7 = "1125120000"
    with socket.create_connection((host, port)) as tcp, ctx.wrap_socket(tcp, server_hostname="localhost") as s:
        sale = {"t": "0200", "2": "4761739001010119", "3": "000000", "4": "000000002500", "7": de7,
                "11": "%06d" % stan, "12": "120000", "13": "1125", "22": "051", "25": "00",
                "41": "TERM0001", "42": "MERCHANT 000001", "49": "840"}
        a = exchange(s, sale)
        show("sale", a)
        refund = dict(sale)
        refund.update({"3": "200000", "4": "000000003000", "11": "%06d" % (stan + 1), "37": a.get("37", "0" * 12),
                       "90": "0200%06d%s%011d%011d" % (stan, de7, 0, 0)})
        show("refund_too_large", exchange(s, refund))
        refund.update({"4": "000000001500", "11": "%06d" % (stan + 2)})
        show("refund", exchange(s, refund))
    return 0


if __name__ == "__main__":
    sys.exit(main())
