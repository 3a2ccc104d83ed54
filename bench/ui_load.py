#!/usr/bin/env python3
"""The dashboard's load time at fleet scale, in headless Chromium (bench/ui.sh runs it).

Drives /usr/bin/chromedriver over the W3C WebDriver protocol (plain HTTP, standard library
only). Each run is a new browser (empty cache, new profile): it logs in with a one-time link
from `drover ui`, then opens the page afresh and reads the `drover:PAGE:rendered` mark the
dashboard sets once the page first shows its data. The mark's time counts from the start of
the navigation: HTML, script, style, the session and data requests, and drawing.

usage: ui_load.py URL DROVER_BIN DATA_DIR RUNS OUT.json
"""
import json, os, socket, statistics, subprocess, sys, time, urllib.request

URL, DROVER, DATA, RUNS, OUT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wd(method, path, body=None):
    req = urllib.request.Request(DRIVER + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["value"]


def login_link():
    token = open(os.path.join(DATA, "admin.token")).read().strip()
    out = subprocess.run([DROVER, "--server", URL, "--token", token, "ui"], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def measure(page_hash, mark):
    caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"]}}}}
    sid = wd("POST", "/session", caps)["sessionId"]
    try:
        wd("POST", f"/session/{sid}/url", {"url": login_link()})
        t0 = time.monotonic()
        wd("POST", f"/session/{sid}/url", {"url": URL + "/ui/" + page_hash})
        while True:
            v = wd("POST", f"/session/{sid}/execute/sync", {"script": f"""
                const m = performance.getEntriesByName({json.dumps(mark)})[0];
                return m ? {{ ms: m.startTime, rows: document.querySelectorAll('#instances tbody tr').length,
                             cells: document.querySelectorAll('.cell[data-group]').length,
                             text: (document.getElementById('page-of') || {{}}).textContent || '' }} : null;""",
                "args": []})
            if v:
                return v
            if time.monotonic() - t0 > 60:
                raise SystemExit(f"{mark} not set within 60 s")
            time.sleep(0.05)
    finally:
        wd("DELETE", f"/session/{sid}")


port = free_port()
DRIVER = f"http://127.0.0.1:{port}"
driver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
try:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); break
        except OSError:
            time.sleep(0.05)
    result = {}
    for name, page_hash, mark in [("fleet", "#/fleet", "drover:fleet:rendered"),
                                  ("group", "#/group/s0/r0", "drover:group:rendered")]:
        runs = [measure(page_hash, mark) for _ in range(RUNS)]
        ms = [r["ms"] for r in runs]
        result[name] = {"ms": ms, "median_ms": statistics.median(ms), "max_ms": max(ms),
                        "rows": runs[-1]["rows"], "cells": runs[-1]["cells"], "pager": runs[-1]["text"]}
        print(f"ui_load: {name}: median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms "
              f"({runs[-1]['cells']} group cells, {runs[-1]['rows']} instance rows {runs[-1]['text']})",
              file=sys.stderr)
    json.dump(result, open(OUT, "w"))
finally:
    driver.terminate(); driver.wait()
