#!/usr/bin/env bash
# Operation summaries end to end on the live scenario (`tally gen --scenario
# live`): (a) plain cumulate PV/UV per room (the baseline the issue names),
# (b) a summary with two dimension joins (authors CSV, users JSON lines) and
# five grouping sets on tumbling minutes, (c) that plus a day cumulate
# summary of three sets and an hourly one, (d) = (b) with the users read
# from Redis hashes (a redis-server started here on 127.0.0.1 and a free
# port, stopped at exit) instead of the file, in alternation, same
# machine, same file; (b) and (d) must write the same rows; (e) = (b) plus
# a detail (DWD) sink writing every joined event with four fields. Prints a markdown report on stdout and saves it as
# data/live-bench-<N>-<D>/report.md; progress goes to stderr.
#
# usage: scripts/live_bench.sh [--events N] [--devices D] [--runs R] [--workers W]
#   defaults: 10M events, 500k devices, 3 runs, 2 workers
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'live-bench: %s\n' "$*" >&2; }
die() { printf 'live-bench: error: %s\n' "$*" >&2; exit 1; }

EVENTS=10000000 DEVICES=500000 RUNS=3 WORKERS=2
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

for cmd in redis-server redis-cli python3; do
  command -v "$cmd" > /dev/null || die "$cmd is needed (redis-server and redis-cli: apt-get install redis-server)"
done
log "cargo build --release"
cargo build --release --quiet
TALLY=target/release/tally
DIR=data/live-bench-$EVENTS-$DEVICES
mkdir -p "$DIR/out"
if [ ! -s "$DIR/events.jsonl" ]; then
  log "generating $EVENTS live events"
  "$TALLY" gen --scenario live --events "$EVENTS" --devices "$DEVICES" --disorder 2m --out "$DIR" >&2
fi

DIMS='[[dimension]]
name = "author"
kind = "file"
path = "authors.csv"
key = "author_id"
fields = ["category", "agency"]
[[dimension]]
name = "user"
kind = "file"
path = "users.jsonl"
key = "user_id"
fields = ["tier"]'
MINUTE='[[metric]]
name = "live_minute"
kind = "summary"
window = "tumble"
step = "1m"
grouping_sets = [[], ["room_id"], ["author_id"], ["author.category", "platform"], ["user.tier"]]
measures = ["count", "uv", "sum(amount)", "max(amount)"]'
job() { # name body
  cat > "$DIR/$1.toml" <<EOF
[job]
timezone = "+08:00"
[[source]]
name = "live"
kind = "file"
path = "events.jsonl"
format = "jsonl"
max_out_of_orderness = "5m"
$2
[[sink]]
kind = "jsonl"
path = "out/rows-$1.jsonl"
EOF
}
job cumulate '[[metric]]
name = "room_uv"
kind = "cumulate"
group_by = ["room_id"]
measures = ["pv", "uv"]'
job summary5 "$DIMS
$MINUTE"
job summary_all "$DIMS
$MINUTE
[[metric]]
name = \"live_day\"
kind = \"summary\"
window = \"cumulate\"
step = \"10m\"
grouping_sets = [[], [\"author.category\"], [\"user.tier\", \"platform\"]]
measures = [\"count\", \"uv\", \"sum(amount)\"]
[[metric]]
name = \"gifts_hour\"
kind = \"summary\"
window = \"tumble\"
step = \"1h\"
filter = \"event = 'gift'\"
grouping_sets = [[\"author_id\"], [\"user_id\"]]
measures = [\"count\", \"sum(amount)\", \"max(amount)\"]"

# (d): the users as Redis hashes.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REDIS_DIR=$(mktemp -d)
redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no --daemonize no \
  --logfile "$REDIS_DIR/redis.log" --dir "$REDIS_DIR" &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null; wait $REDIS_PID 2>/dev/null; rm -rf "$REDIS_DIR"' EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" ping > /dev/null 2>&1 && break; sleep 0.1; done
python3 - "$DIR/users.jsonl" <<'EOF' | redis-cli -p "$PORT" --pipe > /dev/null
import json, sys
out = sys.stdout.buffer
for line in open(sys.argv[1], "rb"):
    v = json.loads(line)
    args = [b"HSET", b"user:" + v.pop("user_id").encode()]
    for k, x in v.items():
        if x is not None:
            args += [k.encode(), (x if isinstance(x, str) else json.dumps(x)).encode()]
    out.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
EOF
log "redis on port $PORT holds $(redis-cli -p "$PORT" dbsize) user hashes"
job summary5_rdim "${DIMS%%\[\[dimension\]\]
name = \"user\"*}[[dimension]]
name = \"user\"
kind = \"redis\"
url = \"redis://127.0.0.1:$PORT\"
key = \"user_id\"
fields = [\"tier\"]
$MINUTE"

job summary5_dwd "$DIMS
$MINUTE
[[sink]]
kind = \"detail\"
path = \"out/dwd.jsonl\"
fields = [\"room_id\", \"amount\", \"author.category\", \"user.tier\"]"

log "warming the page cache"
cat "$DIR/events.jsonl" > /dev/null
JOBS="cumulate summary5 summary_all summary5_rdim summary5_dwd"
for r in $(seq 1 "$RUNS"); do
  for j in $JOBS; do
    "$TALLY" run --job "$DIR/$j.toml" --workers "$WORKERS" --summary "$DIR/out/summary-$j-$r.json" 2> "$DIR/out/log-$j-$r.txt" > /dev/null
    log "round $r $j: $(head -1 "$DIR/out/log-$j-$r.txt")"
  done
  cmp "$DIR/out/rows-summary5.jsonl" "$DIR/out/rows-summary5_rdim.jsonl" \
    || die "users from Redis gave other rows than users from the file"
  cmp "$DIR/out/rows-summary5.jsonl" "$DIR/out/rows-summary5_dwd.jsonl" \
    || die "a detail sink changed the rows"
done

python3 - "$DIR" "$RUNS" "$WORKERS" "$EVENTS" "$DEVICES" > "$DIR/report.md" <<'EOF'
import json, os, subprocess, sys
d, runs, workers, events, devices = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def summ(j, r): return json.load(open(f"{d}/out/summary-{j}-{r}.json"))
mem = [l for l in open("/proc/meminfo") if l.startswith("MemTotal")][0].split()[1]
load = open("/proc/loadavg").read().split()[:3]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
print(f"### Live summaries: {events} events, {devices} devices, {workers} workers\n")
print(f"- machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs, MemTotal {int(mem)//1024} MiB; load average at end {' '.join(load)}")
print(f"- commit {commit}{' (+ uncommitted changes in src/)' if dirty else ''}; {runs} rounds, jobs alternating; median by seconds\n")
print("| job | seconds (median) | range | M events/s | vs cumulate (events/s) | rows | state MB max |")
print("|---|---:|---:|---:|---:|---:|---:|")
med = {}
for j in ["cumulate", "summary5", "summary_all", "summary5_rdim", "summary5_dwd"]:
    ss = sorted((summ(j, r) for r in range(1, runs + 1)), key=lambda s: s["seconds"])
    m = ss[len(ss) // 2]
    med[j] = m
    rel = m["events_per_second"] / med["cumulate"]["events_per_second"]
    print(f"| {j} | {m['seconds']:.3f} | {ss[0]['seconds']:.2f}-{ss[-1]['seconds']:.2f} | {m['events_per_second']/1e6:.2f} | {rel:.0%} | {m['rows']} | {m['state_bytes_max']/1e6:.0f} |")
print()
for dim in med["summary5"]["dimensions"]:
    hit = 1 - dim["missing"] / max(dim["lookups"], 1)
    print(f"- dimension `{dim['name']}`: {dim['rows']} rows; {dim['lookups']} lookups, {hit:.1%} found (the rest: keys the table lacks)")
for dim in med["summary5_rdim"]["dimensions"]:
    c = dim.get("cache")
    if c:
        print(f"- summary5_rdim, Redis dimension `{dim['name']}`: local cache hit rate {c['local_hit_rate']:.2%} "
              f"({c['waited']} events waited), {c['shared_hits']} keys from the shared cache, {c['fetched']} keys "
              f"fetched in {c['round_trips']} round trips = {c['round_trips_per_million']:.1f} per 1M events, "
              f"{c['retries']} retries; rows byte-identical to summary5")
dwd = med["summary5_dwd"]
print(f"- summary5_dwd: {dwd['detail_events']} events to the detail sink, "
      f"{os.path.getsize(d + '/out/dwd.jsonl') / 1e9:.2f} GB")
print("\nCommands:\n\n```sh")
print(f"scripts/live_bench.sh --events {events} --devices {devices} --runs {runs} --workers {workers}")
for j in ["cumulate", "summary5", "summary_all", "summary5_rdim", "summary5_dwd"]:
    print(f"target/release/tally run --job {d}/{j}.toml --workers {workers} --summary {d}/out/summary-{j}-R.json")
print("```")
EOF
cat "$DIR/report.md"
log "report saved to $DIR/report.md"
