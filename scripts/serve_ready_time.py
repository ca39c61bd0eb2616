#!/usr/bin/env python3
"""Seconds from starting `tally serve` until /readyz answers 200 (a job of
files: its input read to the end), with a fresh state directory.

    scripts/serve_ready_time.py BINARY JOB.toml HTTP_PORT [STATE_DIR]

The job's [serve] http must be 127.0.0.1:HTTP_PORT. Polls every 10 ms on a
fresh connection; SIGTERMs the daemon after.
"""
import http.client, subprocess, sys, time, shutil
binary, job, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = sys.argv[4] if len(sys.argv) > 4 else "/tmp/tally-ready-state"
shutil.rmtree(state, ignore_errors=True)
t0 = time.monotonic()
p = subprocess.Popen([binary, "serve", "--job", job, "--workers", "2", "--state-dir", state], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port); c.request("GET", "/readyz"); r = c.getresponse(); r.read()
        if r.status == 200: break
    except OSError: pass
    time.sleep(0.01)
t = time.monotonic() - t0
p.terminate(); p.wait()
print(f"{t:.3f}")
