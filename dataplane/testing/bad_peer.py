"""A misbehaving peer of a channel listener, for isolation tests: ``python -m
dataplane.testing.bad_peer HOST PORT``, until killed.

At once it opens :data:`STALLED` connections that never say anything (handshakes that stall), and
one that sends random bytes one at a time, slowly (a slow talker). Then, :data:`RATE` times a
second, it connects, writes 4 KiB of random bytes (garbage where a TLS handshake belongs) and
closes. Every line it prints on stdout counts what it did so far (JSON).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

STALLED = 48
RATE = 100


def _connect(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=2)
    except OSError:
        return None


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    held = [s for s in (_connect(host, port) for _ in range(STALLED)) if s is not None]
    slow = _connect(host, port)
    sent = refused = 0
    last_print = time.monotonic()
    while True:
        t = time.monotonic()
        s = _connect(host, port)
        if s is None:
            refused += 1
        else:
            try:
                s.sendall(os.urandom(4096))
                sent += 1
            except OSError:
                refused += 1
            finally:
                s.close()
        if slow is not None:
            try:
                slow.send(os.urandom(1))
            except OSError:
                slow = _connect(host, port)
        if t - last_print >= 1.0:
            last_print = t
            print(json.dumps({"event": "bad-peer", "garbage": sent, "failed": refused, "stalled": len(held)}),
                  flush=True)
        time.sleep(max(0.0, 1.0 / RATE - (time.monotonic() - t)))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
