#!/usr/bin/env python3
"""Independent DuckDB recomputation of tally's summary metrics.

Usage:

    python3 scripts/duckdb_summary_reference.py SPEC.json OUT.jsonl

SPEC.json describes the inputs and the metrics, the way the job file does:

    {
      "tz_ms": 28800000,
      "events": [{"path": "a.jsonl", "format": "jsonl"}, {"path": "b.csv", "format": "csv"}],
      "columns": {"did": "VARCHAR", "ts": "BIGINT", "room_id": "VARCHAR", "amount": "DOUBLE", ...},
      "dimensions": [{"name": "author", "path": "authors.csv", "format": "csv",
                      "key": "author_id", "fields": ["category"], "on_missing": "null"}],
      "metrics": [{"name": "live_minute", "window": "tumble", "step_ms": 60000, "size_ms": 60000,
                   "grouping_sets": [[], ["room_id"]], "filter": "event = 'gift'",
                   "measures": ["count", "uv", "sum(amount)", "max(amount)"]}]
    }

Events are read with DuckDB's `read_json` / `read_csv` with the given column
types (integer device ids and keys read as VARCHAR are their decimal text, so
`7` joins `"7"`), left-joined with each dimension on the key's text
(`on_missing = "drop"`: inner-joined), filtered, and grouped:

* `tumble`: one row per (window, grouping set, key) with events in the window;
* `cumulate` (`size_ms` a day): for every window end on the step grid from the
  end of the first step holding data of the day to the end of the last, one row
  per key with events in [day start, window end).

Measures: `count(*)`, `count(DISTINCT did)`, `sum` over `DECIMAL(38, 6)`,
`min`, `max` (NULL over no values). A metric with `"top": {"n", "by", "per"}`
keeps, per window and value of the `per` fields, the `n` rows with the
largest `by` (NULL last; ties in the order of the rows' dims as JSON text,
fields in grouping order), each with its `rank`. Rows are written in tally's shape,
`{"metric","window_start","window_end","grouping","dims",<measures>}`, dims
as text. It shares no code with tally; meant for test-sized inputs.
"""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal

import duckdb

DAY_MS = 86_400_000


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def number(v):
    """A measure as JSON: integral values as integers."""
    if v is None:
        return None
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def ranked(rows, top):
    """The `n` best rows per (window, set, `per` values), with their rank."""
    groups = {}
    for r in rows:
        key = (r["window_end"], json.dumps(r["grouping"]), json.dumps([r["dims"].get(f) for f in top["per"]]))
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        def order(r):
            v = r[top["by"]]
            text = "{" + ",".join(json.dumps(g) + ":" + json.dumps(r["dims"][g]) for g in r["grouping"]) + "}"
            return (v is None, -v if v is not None else 0, text)
        for i, r in enumerate(sorted(members, key=order)[: top["n"]]):
            r["rank"] = i + 1
            out.append(r)
    return out


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    out = open(sys.argv[2], "w")
    tz = int(spec["tz_ms"])
    con = duckdb.connect()
    cols = spec["columns"]
    parts = []
    for e in spec["events"]:
        if e["format"] == "jsonl":
            types = ", ".join(f"{quote(c)}: '{t}'" for c, t in cols.items())
            parts.append(f"SELECT * FROM read_json('{e['path']}', format='newline_delimited', columns={{{types}}})")
        else:
            casts = ", ".join(f"CAST({quote(c)} AS {t}) AS {quote(c)}" for c, t in cols.items())
            parts.append(f"SELECT {casts} FROM read_csv('{e['path']}', all_varchar=true, header=true)")
    con.execute("CREATE TABLE ev AS " + " UNION ALL ".join(parts))

    enriched = ["ev.*"]
    joins = []
    drops = []
    for i, d in enumerate(spec["dimensions"]):
        t = f"d{i}"
        fields = ", ".join(quote(f) for f in d["fields"])
        if d["format"] == "csv":
            src = f"read_csv('{d['path']}', all_varchar=true, header=true)"
        else:
            types = ", ".join(f"{quote(c)}: 'VARCHAR'" for c in [d["key"], *d["fields"]])
            src = f"read_json('{d['path']}', format='newline_delimited', columns={{{types}}})"
        con.execute(f"CREATE TABLE {t} AS SELECT {quote(d['key'])} AS k, {fields} FROM {src} WHERE {quote(d['key'])} IS NOT NULL AND {quote(d['key'])} <> ''")
        dup = con.execute(f"SELECT count(*) - count(DISTINCT k) FROM {t}").fetchone()[0]
        assert dup == 0, f"dimension {d['name']} repeats keys: the reference does not pick the last row"
        joins.append(f"LEFT JOIN {t} ON CAST(ev.{quote(d['key'])} AS VARCHAR) = {t}.k")
        for f in d["fields"]:
            enriched.append(f"{t}.{quote(f)} AS {quote(d['name'] + '.' + f)}")
        if d.get("on_missing") == "drop":
            drops.append(f"{t}.k IS NOT NULL")
    where = " WHERE " + " AND ".join(drops) if drops else ""
    con.execute(f"CREATE TABLE en AS SELECT {', '.join(enriched)} FROM ev {' '.join(joins)}{where}")
    enriched_names = [d["name"] + "." + f for d in spec["dimensions"] for f in d["fields"]]

    rows = []
    for m in spec["metrics"]:
        flt = m.get("filter") or "TRUE"
        for name in enriched_names:
            flt = re.sub(r"(?<![\w\"])" + re.escape(name) + r"(?![\w\"])", quote(name), flt)
        aggs = []
        fields = []
        for meas in m["measures"]:
            if meas == "count":
                aggs.append("count(*)")
                fields.append("count")
            elif meas == "uv":
                aggs.append("count(DISTINCT did)")
                fields.append("uv")
            else:
                fn, col = re.fullmatch(r"(sum|min|max)\((.+)\)", meas).groups()
                expr = f"CAST({quote(col)} AS DECIMAL(38, 6))" if fn == "sum" else quote(col)
                aggs.append(f"{fn}({expr})")
                fields.append(f"{fn}_{col}")
        step, size = int(m["step_ms"]), int(m["size_ms"])
        metric_rows = []
        for gs in m["grouping_sets"]:
            keys = ", ".join(quote(g) for g in gs)
            sel_keys = (keys + ", ") if gs else ""
            agg = ", ".join(aggs)
            if m["window"] == "tumble":
                q = f"""
                    WITH f AS (SELECT *, (ts + {tz}) // {step} * {step} - {tz} AS ws FROM en WHERE {flt})
                    SELECT ws, ws + {step}, {sel_keys}{agg} FROM f GROUP BY ws{', ' + keys if gs else ''}"""
            else:
                q = f"""
                    WITH f AS (SELECT *, (ts + {tz}) // {size} * {size} - {tz} AS ds,
                                      (ts + {tz}) // {step} * {step} - {tz} + {step} AS e FROM en WHERE {flt}),
                         days AS (SELECT ds, min(e) AS lo, max(e) AS hi FROM f GROUP BY ds),
                         ends AS (SELECT ds, unnest(range(lo, hi + 1, {step})) AS we FROM days)
                    SELECT ends.ds, ends.we, {', '.join('f.' + quote(g) for g in gs) + ', ' if gs else ''}{agg}
                    FROM ends JOIN f ON f.ds = ends.ds AND f.e <= ends.we
                    GROUP BY ends.ds, ends.we{', ' + ', '.join('f.' + quote(g) for g in gs) if gs else ''}"""
            for r in con.execute(q).fetchall():
                ws, we = r[0], r[1]
                dims = {g: (None if v is None else str(v)) for g, v in zip(gs, r[2 : 2 + len(gs)])}
                vals = r[2 + len(gs) :]
                row = {"metric": m["name"], "window_start": ws, "window_end": we, "grouping": gs, "dims": dims}
                for f, v in zip(fields, vals):
                    row[f] = v
                metric_rows.append(row)
        if "top" in m:
            metric_rows = ranked(metric_rows, m["top"])
        for row in metric_rows:
            for f in fields:
                row[f] = number(row[f])
        rows.extend(metric_rows)
    for row in rows:
        out.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
