#!/usr/bin/env python3
"""Watches tally serve's dashboard in headless Chromium (DevTools protocol).

    scripts/dashboard_probe.py URL SECONDS [--screenshot PNG]

Opens URL and, every half second for SECONDS, prints one JSON line:
{"points": [points drawn per metric chart], "rows": text of the rows figure,
 "errors": [console errors and uncaught exceptions so far]}.
With --screenshot, saves the page as PNG at the end. Needs `chromium` and
the `websocket-client` package.
"""

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    url, seconds = sys.argv[1], float(sys.argv[2])
    shot = sys.argv[sys.argv.index("--screenshot") + 1] if "--screenshot" in sys.argv else None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("dashboard_probe: chromium is not installed (apt-get install chromium)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="tally-chromium-")
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", "--remote-allow-origins=*", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    target = pages[0]
                    break
            except OSError:
                pass
            time.sleep(0.1)
        if target is None:
            sys.exit("dashboard_probe: chromium did not start")
        ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=10)
        next_id = [0]
        errors = []

        def call(method, **params):
            next_id[0] += 1
            ws.send(json.dumps({"id": next_id[0], "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == next_id[0]:
                    return msg.get("result", {})
                note(msg)

        def note(msg):
            m, p = msg.get("method"), msg.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append(d.get("exception", {}).get("description") or d.get("text"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text"))

        call("Runtime.enable")
        call("Log.enable")
        call("Page.enable")
        call("Page.navigate", url=url)
        probe = ("JSON.stringify({points: [...document.querySelectorAll('svg[data-points]')]"
                 ".map(s => +s.dataset.points), rows: document.getElementById('rows').textContent})")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.5)
            r = call("Runtime.evaluate", expression=probe, returnByValue=True)
            state = json.loads(r.get("result", {}).get("value") or "{}")
            state["errors"] = errors
            print(json.dumps(state), flush=True)
        if shot:
            png = call("Page.captureScreenshot", format="png")["data"]
            with open(shot, "wb") as f:
                f.write(base64.b64decode(png))
        ws.close()
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
