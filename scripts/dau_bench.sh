#!/usr/bin/env bash
# DAU end to end: three JSON-lines sources (client, server, binlog; their
# disorder differs) and a device history, run (a) as a cumulate metric
# (platform pv/uv over the three sources), (b) as a dau metric (platform
# active/new/returning, minute dedup, history) and (c) that dau metric with
# a minute_devices sink (the detail stream to a file) in alternation, same
# machine, same files. Prints a markdown report on stdout and saves it as
# data/dau-bench-<N>-<D>/report.md; progress goes to stderr.
#
# usage: scripts/dau_bench.sh [--events N] [--devices D] [--runs R] [--workers W]
#   defaults: 20M events over the three sources, 1M devices, 3 runs, 2 workers
#
# The history lists 5 of every 6 devices (3, 45 or 31 days since last
# seen, ...), so new and returning devices both occur.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'dau-bench: %s\n' "$*" >&2; }
die() { printf 'dau-bench: error: %s\n' "$*" >&2; exit 1; }

EVENTS=20000000 DEVICES=1000000 RUNS=3 WORKERS=2
while [ $# -gt 0 ]; do
  case $1 in
    --events) EVENTS=$2; shift 2 ;;
    --devices) DEVICES=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done

log "cargo build --release"
cargo build --release --quiet
TALLY=target/release/tally
DIR=data/dau-bench-$EVENTS-$DEVICES
mkdir -p "$DIR/out"
PER=$((EVENTS / 3))

gen() { # name seed disorder fraction
  if [ ! -s "$DIR/$1/events.jsonl" ]; then
    log "generating $1: $PER events"
    rm -rf "$DIR/$1"
    "$TALLY" gen --events "$PER" --devices "$DEVICES" --format jsonl --files 1 --seed "$2" \
      --disorder "$3" --disorder-fraction "$4" --out "$DIR/$1" >&2
    mv "$DIR/$1"/*.jsonl "$DIR/$1/events.jsonl" 2>/dev/null || true
  fi
}
gen client 11 2m 0.3
gen server 22 4m 0.6
gen binlog 33 20s 0.05

# The generator's span starts 2026-02-15 22:00 +08:00.
if [ ! -s "$DIR/history.csv" ]; then
  log "writing the device history"
  awk -v n="$DEVICES" 'BEGIN {
    print "did,first_day,last_day";
    for (d = 1; d <= n; d++) {
      m = d % 6;
      if (m == 1) print d ",2025-11-07,2026-02-12";
      else if (m == 2) print d ",2025-07-30,2026-01-01";
      else if (m == 3) print d ",2025-12-17,2026-01-15";
      else if (m == 4) print d ",2026-01-16,2026-01-16";
      else if (m == 5) print d ",2025-01-11,2026-02-07";
    } }' > "$DIR/history.csv"
fi

job() { # name metric-block
  cat > "$DIR/$1.toml" <<EOF
[job]
timezone = "+08:00"
$(for s in client server binlog; do printf '[[source]]\nname = "%s"\nkind = "file"\npath = "%s/events.jsonl"\nformat = "jsonl"\nmax_out_of_orderness = "5m"\n' "$s" "$s"; done)
$2
[[sink]]
kind = "jsonl"
path = "out/rows-$1.jsonl"
EOF
}
job cumulate '[[metric]]
name = "platform_uv"
kind = "cumulate"
group_by = ["platform"]
measures = ["pv", "uv"]'
job dau '[[metric]]
name = "platform_dau"
kind = "dau"
group_by = ["platform"]
device_history = "history.csv"'
job dau_detail '[[metric]]
name = "platform_dau"
kind = "dau"
group_by = ["platform"]
device_history = "history.csv"
[[sink]]
kind = "minute_devices"
path = "out/minute-devices.jsonl"'

log "warming the page cache"
cat "$DIR"/*/events.jsonl > /dev/null
for r in $(seq 1 "$RUNS"); do
  for j in cumulate dau dau_detail; do
    "$TALLY" run --job "$DIR/$j.toml" --workers "$WORKERS" --summary "$DIR/out/summary-$j-$r.json" 2> "$DIR/out/log-$j-$r.txt" > /dev/null
    log "round $r $j: $(head -1 "$DIR/out/log-$j-$r.txt")"
  done
done

python3 - "$DIR" "$RUNS" "$WORKERS" "$EVENTS" "$DEVICES" > "$DIR/report.md" <<'EOF'
import json, subprocess, sys, statistics
d, runs, workers, events, devices = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def summ(j, r): return json.load(open(f"{d}/out/summary-{j}-{r}.json"))
mem = [l for l in open("/proc/meminfo") if l.startswith("MemTotal")][0].split()[1]
load = open("/proc/loadavg").read().split()[:3]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
print(f"### DAU end to end: {events} events over 3 JSON-lines sources, {devices} devices, {workers} workers\n")
print(f"- machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs, MemTotal {int(mem)//1024} MiB; load average at end {' '.join(load)}")
print(f"- commit {commit}{' (+ uncommitted changes in src/)' if dirty else ''}; {runs} rounds, cumulate and dau alternating; median by seconds\n")
print("| job | seconds (median) | range | M events/s | vs cumulate | late dropped | state MB max | rows | minute_devices rows |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
med = {}
for j in ["cumulate", "dau", "dau_detail"]:
    ss = sorted((summ(j, r) for r in range(1, runs + 1)), key=lambda s: s["seconds"])
    m = ss[len(ss) // 2]
    med[j] = m
    rel = m["seconds"] / med["cumulate"]["seconds"]
    print(f"| {j} | {m['seconds']:.3f} | {ss[0]['seconds']:.2f}-{ss[-1]['seconds']:.2f} | {m['events_per_second']/1e6:.2f} | {rel:.2f}x | {m['late_dropped']} | {m['state_bytes_max']/1e6:.0f} | {m['rows']} | {m.get('minute_devices_rows', 0)} |")
m = med["dau"]
imp = m["history_imports"][0]
print()
print(f"- device history: {imp['rows']} rows imported in {imp['seconds']:.3f} s = {imp['rows']/imp['seconds']/1e6:.2f} M rows/s; "
      f"{m['history_devices']} devices at the end, {m['history_bytes_per_device']:.1f} bytes per device (target <= 24)")
print(f"- device id texts (for `tally devices export`): {m.get('device_id_bytes_per_device', 0):.1f} bytes per device")
print(f"- minute-dedup rings: {m['ring_bytes_per_entry']:.1f} bytes per (source, device, key) entry at each day's close (target <= 32); "
      f"dedup tables {m['dedup_bytes_per_entry']:.1f} bytes per (device, key)")
print("\nCommands:\n\n```sh")
print(f"scripts/dau_bench.sh --events {events} --devices {devices} --runs {runs} --workers {workers}")
for j in ["cumulate", "dau", "dau_detail"]:
    print(f"target/release/tally run --job {d}/{j}.toml --workers {workers} --summary {d}/out/summary-{j}-R.json")
print("```")
EOF
cat "$DIR/report.md"
log "report saved to $DIR/report.md"
