#!/usr/bin/env python3
"""Fires /api/v1/latest requests at tally serve at a fixed rate, measures latency.

    scripts/api_latency.py PORT METRIC RATE SECONDS [CONNECTIONS]

Keys are the metric's top 1000 by its first listed measure (/api/v1/top).
CONNECTIONS keep-alive connections (default 4) share RATE requests/s, each
sending on its own schedule (a late request is sent at once, and its
latency counts from when it was due, so a stall shows). Prints one JSON
line: requests, errors, achieved rate, p50/p90/p99/max milliseconds.
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse


def main():
    port, metric, rate, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    conns = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    by = "uv"
    c.request("GET", f"/api/v1/top?metric={urllib.parse.quote(metric)}&by={by}&n=1000")
    top = json.loads(c.getresponse().read())
    keys = [json.dumps(r["dims"], separators=(",", ":")) for r in top["rows"]]
    if not keys:
        sys.exit("api_latency: no keys yet")
    paths = [f"/api/v1/latest?metric={urllib.parse.quote(metric)}&dims={urllib.parse.quote(k)}" for k in keys]
    lat, errors = [], [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        every = conns / rate
        i, mine = 0, []
        while True:
            due = start + w / rate + i * every
            if due - start > seconds:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            try:
                conn.request("GET", paths[(i * conns + w) % len(paths)])
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine.append(time.perf_counter() - due)
            if not ok:
                with lock:
                    errors[0] += 1
            i += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 3)
    print(json.dumps({"requests": len(lat), "errors": errors[0], "rate": round(len(lat) / seconds),
                      "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": round(lat[-1] * 1e3, 3)}))


if __name__ == "__main__":
    main()
