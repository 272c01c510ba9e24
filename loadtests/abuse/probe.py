#!/usr/bin/env python3
"""Measures two of the gateway's abuse defences against a running gateway (stdlib only,
loopback only):

  probe.py slow  URL PID [N]   opens N (3000) connections that trickle their headers and prints
                               the gateway's open descriptors and how many of ours it still
                               holds, every second for 15 s
  probe.py rate  URL KEY [S]   sends GET /v1/account as fast as one client can for S (3) seconds
                               and prints per second how many got 200 and how many 429
"""
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse


def loopback_only(url):
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"probe.py: refusing to probe {host}: loopback only")


def slow(url, pid, n):
    target = urlparse(url)
    socks, waiting = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection((target.hostname, target.port), timeout=1)
        except OSError:
            # The cap is reached and the listen backlog is full: the client waits.
            waiting += 1
            continue
        s.setblocking(False)
        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    print(f"{len(socks)} connections opened, {waiting} could not connect within 1 s")
    start = time.time()
    for _ in range(16):
        held = 0
        for s in socks:
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    continue
                held += 1
            except BlockingIOError:
                held += 1
            except OSError:
                pass
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        print(f"t={time.time() - start:5.1f}s gateway fds={fds} our connections still open={held}")
        time.sleep(1)


def rate(url, key, seconds):
    end = time.time() + seconds
    buckets = {}
    while time.time() < end:
        second = int(time.time())
        req = urllib.request.Request(url.rstrip("/") + "/v1/account",
                                     headers={"Authorization": f"Bearer {key}"})
        try:
            code = urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            code = e.code
        ok, limited = buckets.get(second, (0, 0))
        buckets[second] = (ok + (code == 200), limited + (code == 429))
    for second, (ok, limited) in sorted(buckets.items()):
        print(f"second {second}: 200={ok} 429={limited}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    mode, url, arg = sys.argv[1:4]
    loopback_only(url)
    extra = sys.argv[4:]
    if mode == "slow":
        slow(url, int(arg), int(extra[0]) if extra else 3000)
    elif mode == "rate":
        rate(url, arg, float(extra[0]) if extra else 3.0)
    else:
        sys.exit(__doc__)
