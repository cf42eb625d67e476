#!/usr/bin/env python3
"""Independent client: pyiso8583 + ssl sends a sale and a refund to refundgate and checks DE39.

Usage: pyiso_client.py HOST PORT CAFILE
Exit 0 when both answers are 00, 1 otherwise, 77 when pyiso8583 is not installed.
"""
import socket
import ssl
import sys
import time

try:
    import iso8583
    from iso8583.specs import default_ascii as spec
    import framing
except ImportError:
    print("pyiso8583 not installed")
    sys.exit(77)


def exchange(sock, doc):
    return framing.exchange(sock, doc, spec)


def main():
    host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctx = ssl.create_default_context(cafile=cafile)
    stan = int(time.time()) % 900000 + 1000
    with socket.create_connection((host, port)) as tcp, ctx.wrap_socket(tcp, server_hostname="localhost") as s:
        de7 = "1125" + time.strftime("%H%M%S", time.gmtime())
        sale = {"t": "0200", "2": "4761739001010119", "3": "000000", "4": "000000002500", "7": de7,
                "11": "%06d" % stan, "12": de7[4:], "13": "1125", "22": "051", "25": "00",
                "41": "TERM0001", "42": "MERCHANT 000001", "49": "840"}
        a = exchange(s, sale)
        print("sale:", a.get("t"), a.get("39"), a.get("44"))
        if a.get("39") != "00":
            return 1
        refund = dict(sale)
        refund.update({"3": "200000", "4": "000000001500", "11": "%06d" % (stan + 1), "37": a["37"],
                       "90": "0200%06d%s%011d%011d" % (stan, de7, 0, 0)})
        a = exchange(s, refund)
        print("refund:", a.get("t"), a.get("39"), a.get("44"), a.get("54"))
        return 0 if a.get("39") == "00" else 1


if __name__ == "__main__":
    sys.exit(main())
