#!/usr/bin/env python3
"""Parses Prometheus text exposition (stdin) with the Prometheus project's own
Python parser (prometheus_client) and checks what a scraper relies on:

- the text parses;
- every family declares its TYPE (none is left "unknown") and its HELP;
- counters and histogram buckets are never negative;
- a histogram's buckets are cumulative (never decreasing with `le`) and its
  `+Inf` bucket equals its `_count`, per label set.

Prints {"sample name{labels}": value} as JSON (labels sorted, as in
`name{a="x",b="y"}`) and exits 0, or prints the problems and exits 1.

    curl -s http://127.0.0.1:8080/metrics | python3 scripts/prom_check.py
"""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def key(name, labels):
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def main():
    text = sys.stdin.read()
    problems = []
    samples = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and others
        print(f"does not parse: {e}")
        return 1
    for fam in families:
        if fam.type == "unknown":
            problems.append(f"{fam.name}: no TYPE line")
        if not fam.documentation:
            problems.append(f"{fam.name}: no HELP line")
        buckets = {}
        counts = {}
        for s in fam.samples:
            k = key(s.name, s.labels)
            if k in samples:
                problems.append(f"{k}: appears twice")
            samples[k] = s.value
            if math.isnan(s.value):
                problems.append(f"{k}: NaN")
            if fam.type in ("counter", "histogram") and s.value < 0:
                problems.append(f"{k}: negative ({s.value})")
            if fam.type == "histogram":
                rest = {n: v for n, v in s.labels.items() if n != "le"}
                group = key("", rest)
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets.setdefault(group, []).append((le, s.value))
                elif s.name.endswith("_count"):
                    counts[group] = s.value
        for group, bs in buckets.items():
            values = [v for _, v in sorted(bs)]
            if values != sorted(values):
                problems.append(f"{fam.name}{group}: buckets not cumulative: {sorted(bs)}")
            inf = dict(bs).get(math.inf)
            if inf is None:
                problems.append(f"{fam.name}{group}: no +Inf bucket")
            elif counts.get(group) != inf:
                problems.append(f"{fam.name}{group}: +Inf bucket {inf} but _count {counts.get(group)}")
    if problems:
        print("\n".join(problems))
        return 1
    print(json.dumps(samples, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
