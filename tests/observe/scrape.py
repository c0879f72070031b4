"""Scrapes a running coordinator's /metrics with Prometheus' own OpenMetrics parser until the
job ends, and keeps one /api/status answer from the middle of the run (tests/tests/observe.rs).

usage: scrape.py DASHBOARD_URL OUT.json
"""
import json
import sys
import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

url, out = sys.argv[1].rstrip("/"), sys.argv[2]
scrapes, status, failures, started = [], None, 0, time.monotonic()
while time.monotonic() - started < 300:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
            content_type = r.headers["Content-Type"]
            text = r.read().decode()
    except OSError:
        failures += 1
        if scrapes and failures > 10:
            break
        time.sleep(0.2)
        continue
    failures = 0
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    scrapes.append({"content_type": content_type, "samples": samples})
    step = samples.get("ferrotune_step{job=tiny-incidents}", 0)
    if status is None and step >= 20:
        with urllib.request.urlopen(url + "/api/status", timeout=2) as r:
            status = json.loads(r.read())
    time.sleep(0.25)
with open(out, "w") as f:
    json.dump({"scrapes": scrapes, "status": status}, f)
