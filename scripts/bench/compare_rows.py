#!/usr/bin/env python3
"""Compare two files of CUMULATE page rows (JSON lines) on the
(window_start, window_end, page) keys present in both.

usage: compare_rows.py REFERENCE.jsonl TALLY.jsonl [--name NAME] [--json OUT.json]

Rows may look like tally's ({"window_end":…, "dims":{"page":…}, "pv":…, "uv":…})
or carry `page` at top level; `metric`, if present, must be `page_uv`.

The reference (Flink) emits every minute window up to the end of each day,
whereas tally stops at the last minute that holds data at end of input, so the
comparison is on the pairs present in both. As a check on that rule, keys that
only one side has *inside* tally's last window are reported separately (they
should be 0): tally-only keys, and reference keys at or before tally's last
window_end that tally lacks.

Prints one line:
  compared=N mismatches=M tally_only=A ref_only_in_range=B ref_only_after=C
and exits 0 (the caller decides what a mismatch means); exits 2 on bad input.
"""
import argparse
import json
import sys


def load(path):
    rows = {}
    dup = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                sys.exit(f"compare_rows: {path}:{n}: not JSON: {e}")
            if r.get("metric", "page_uv") != "page_uv":
                continue
            dims = r.get("dims") or {}
            page = dims.get("page", r.get("page"))
            try:
                key = (int(r["window_start"]), int(r["window_end"]), str(page))
                val = (int(r["pv"]), int(r["uv"]))
            except (KeyError, TypeError, ValueError) as e:
                sys.exit(f"compare_rows: {path}:{n}: missing/bad field ({e}): {line[:200]!r}")
            if key in rows:
                dup += 1
            rows[key] = val
    return rows, dup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("tally")
    ap.add_argument("--name", default="reference")
    ap.add_argument("--json", help="also write the counts as JSON here")
    a = ap.parse_args()

    ref, ref_dup = load(a.reference)
    tal, tal_dup = load(a.tally)
    if not tal:
        sys.exit(f"compare_rows: no page_uv rows in {a.tally}")
    last_end = max(k[1] for k in tal)
    common = ref.keys() & tal.keys()
    bad = sorted(k for k in common if ref[k] != tal[k])
    tally_only = sorted(k for k in tal.keys() - ref.keys())
    ref_only = ref.keys() - tal.keys()
    ref_only_in = sorted(k for k in ref_only if k[1] <= last_end)
    ref_only_after = len(ref_only) - len(ref_only_in)

    out = {
        "reference_rows": len(ref),
        "tally_rows": len(tal),
        "compared": len(common),
        "mismatches": len(bad),
        "tally_only": len(tally_only),
        "ref_only_in_range": len(ref_only_in),
        "ref_only_after": ref_only_after,
        "duplicate_keys": ref_dup + tal_dup,
        "tally_last_window_end": last_end,
    }
    for k in bad[:5]:
        print(f"  mismatch {k}: {a.name} pv,uv={ref[k]} tally pv,uv={tal[k]}", file=sys.stderr)
    for k in tally_only[:3]:
        print(f"  only in tally: {k} pv,uv={tal[k]}", file=sys.stderr)
    for k in ref_only_in[:3]:
        print(f"  only in {a.name} (inside tally's range): {k} pv,uv={ref[k]}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
