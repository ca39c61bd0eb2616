#!/usr/bin/env python3
"""Independent DuckDB recomputation of tally's `page_uv` metric.

Usage:

    python3 scripts/duckdb_reference.py INPUT.jsonl OUT.jsonl [--tz +08:00] [--step 60000]
        [--metric page_uv]

Reads the JSON-lines events in INPUT with DuckDB, with explicit columns
`ts BIGINT` (epoch milliseconds), `did VARCHAR` (integer ids are read as
their decimal text, so `7` and `"7"` are one device), `page VARCHAR` and
`event VARCHAR`; every other field is ignored. Then, over the events with
`event = 'view'`, for every local day (days start at midnight in the fixed
UTC offset `--tz`), for every window end on the `--step` grid from the end
of the first step holding data of that day to the end of the last step
holding data of that day, and for every page with data in
`[day_start, window_end)`:

    pv = count(*)              over the page's events in [day_start, window_end)
    uv = count(DISTINCT did)   over the same events

It writes one JSON object per line to OUT (`-` for stdout), in tally's output
shape:

    {"metric":"page_uv","window_start":DAY_START,"window_end":END,"dims":{"page":"p1"},"pv":12,"uv":9}

ordered by window end, then page. The computation is a plain join of window
ends with events, done the slow obvious way; it shares no code with tally
and is meant for test-sized inputs (hundreds of thousands of events). It
expects clean input (every line an object with an integer `ts` and a `did`);
lines without a `ts` or a `did` are ignored.

Needs Python 3.11 and the `duckdb` package (`pip install duckdb`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import duckdb

DAY_MS = 86_400_000


def parse_offset_ms(text: str) -> int:
    """`+08:00`, `-05:30`, `+0800`, `UTC` or `Z` as milliseconds east of UTC."""
    t = text.strip()
    if t.upper() == "UTC" or t == "Z":
        return 0
    m = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", t)
    if not m:
        raise argparse.ArgumentTypeError(f"time zone {text!r} must be a fixed offset like +08:00")
    sign = 1 if m.group(1) == "+" else -1
    hours, minutes = int(m.group(2)), int(m.group(3))
    if hours > 14 or minutes > 59:
        raise argparse.ArgumentTypeError(f"time zone {text!r} is out of range")
    return sign * (hours * 3_600_000 + minutes * 60_000)


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


QUERY = """
WITH views AS (
    SELECT
        ts,
        did,
        page,
        -- local day start and step start, with non-negative remainders
        ts - (((ts + $offset) % $day) + $day) % $day AS day_start,
        ts - (((ts + $offset) % $step) + $step) % $step AS step_start
    FROM events
    WHERE event = 'view' AND ts IS NOT NULL AND did IS NOT NULL
),
days AS (
    SELECT day_start, min(step_start) + $step AS first_end, max(step_start) + $step AS last_end
    FROM views
    GROUP BY day_start
),
window_ends AS (
    SELECT day_start, unnest(generate_series(first_end, last_end, $step)) AS window_end
    FROM days
)
SELECT
    w.day_start AS window_start,
    w.window_end AS window_end,
    v.page AS page,
    count(*) AS pv,
    count(DISTINCT v.did) AS uv
FROM window_ends AS w
JOIN views AS v ON v.day_start = w.day_start AND v.ts < w.window_end
GROUP BY w.day_start, w.window_end, v.page
ORDER BY w.window_end, v.page NULLS FIRST
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Recompute tally's page_uv rows (cumulative daily PV/UV of view events per page) with DuckDB.",
    )
    ap.add_argument("input", help="events, JSON lines (ts, did, page, event)")
    ap.add_argument("output", help="where to write the rows as JSON lines ('-' for stdout)")
    ap.add_argument("--tz", type=parse_offset_ms, default=0, help="fixed UTC offset of the days, e.g. +08:00")
    ap.add_argument("--step", type=positive_int, default=60_000, help="window step in milliseconds (default 60000)")
    ap.add_argument("--metric", default="page_uv", help="metric name written in each row (default page_uv)")
    args = ap.parse_args(argv)
    if DAY_MS % args.step != 0:
        ap.error("--step must divide a day")

    con = duckdb.connect()
    con.execute(
        """
        CREATE TABLE events AS
        SELECT ts, did, page, event
        FROM read_json(
            $path,
            format = 'newline_delimited',
            columns = {'ts': 'BIGINT', 'did': 'VARCHAR', 'page': 'VARCHAR', 'event': 'VARCHAR'}
        )
        """,
        {"path": args.input},
    )
    rows = con.execute(QUERY, {"offset": args.tz, "day": DAY_MS, "step": args.step}).fetchall()

    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for window_start, window_end, page, pv, uv in rows:
            row = {
                "metric": args.metric,
                "window_start": window_start,
                "window_end": window_end,
                "dims": {"page": page},
                "pv": pv,
                "uv": uv,
            }
            out.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False))
            out.write("\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"duckdb_reference: {len(rows)} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
