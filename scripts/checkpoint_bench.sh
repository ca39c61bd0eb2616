#!/usr/bin/env bash
# Checkpoint costs end to end, with the real binary: what a state directory
# and periodic checkpoints cost a run, and how long a restart takes to get
# back to reading input after SIGTERM or kill -9. Prints a markdown report
# (machine, exact commands, tables) on stdout and saves it as report.md in
# the data directory; progress goes to stderr. Exits 1 if any run fails or
# writes rows that differ from the run without a state directory.
#
# usage: scripts/checkpoint_bench.sh [--events E] [--devices D] [--runs R] [--workers W]
#                                    [--configs LIST] [--no-restart]
#                                    [--kill-at F] [--restart-interval DUR]
#   defaults: 60M events, 10M devices, 3 rounds, all cores, configs a,b,c,d
#   --runs R     rounds of the overhead runs, interleaved a-b-c-d (median reported)
#   --configs LIST  which overhead runs (comma-separated, a first: it is the reference)
#   --no-restart    skip the restart tests (overhead only)
#   --kill-at F  send the signal at this fraction of (c)'s median wall time (default 0.5)
#   --restart-interval DUR  checkpoint_interval of the restart runs (default 10s, as (c));
#                a small data set needs a short one (e.g. 200ms) to checkpoint before the kill
#
# The job: page_uv (views by page: pv, uv) and total_uv (all events: pv, uv),
# CUMULATE 1 min / 1 day, +08:00. Overhead runs, each with a fresh state dir:
#   (a) no state dir                                 (dedup tables in anonymous memory)
#   (b) --state-dir, checkpoint_interval = "0"      (one checkpoint, at the end)
#   (c) --state-dir, checkpoint_interval = "10s"
#   (d) --state-dir, checkpoint_interval = "2s"
# Restart: (c) (checkpoint_interval = --restart-interval) stopped at --kill-at of its duration with SIGTERM (must exit 0
# after a checkpoint), then with kill -9 (resumes from the last periodic
# checkpoint; if none is committed yet at that time, the kill waits for the
# first); each then rerun with the same state dir to the end.
#
# Data is generated once per (events, devices) under data/ckpt-e2e-<E>/
# (data/ckpt-e2e-<E>-<D>/ when D is not 10M) and reused; job files, summaries,
# logs and rows are under its jobs/ and out/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'ckpt-e2e: %s\n' "$*" >&2; }
die() { printf 'ckpt-e2e: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

EVENTS=60000000 DEVICES=10000000 RUNS=3 WORKERS=$(nproc) KILL_AT=0.5 RESTART_INTERVAL=10s
CONFIGS=a,b,c,d RESTART=1
while [ $# -gt 0 ]; do
  case $1 in
    --events) [ $# -ge 2 ] || die "--events needs a value"; EVENTS=$2; shift 2 ;;
    --devices) [ $# -ge 2 ] || die "--devices needs a value"; DEVICES=$2; shift 2 ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a value"; RUNS=$2; shift 2 ;;
    --configs) [ $# -ge 2 ] || die "--configs needs a value"; CONFIGS=$2; shift 2 ;;
    --no-restart) RESTART=0; shift ;;
    --workers) [ $# -ge 2 ] || die "--workers needs a value"; WORKERS=$2; shift 2 ;;
    --kill-at) [ $# -ge 2 ] || die "--kill-at needs a value"; KILL_AT=$2; shift 2 ;;
    --restart-interval) [ $# -ge 2 ] || die "--restart-interval needs a value"; RESTART_INTERVAL=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for v in EVENTS DEVICES RUNS WORKERS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ $CONFIGS =~ ^a(,[bcd])*$ ]] || die "--configs must start with a and name only a, b, c, d, got '$CONFIGS'"
[ "$RESTART" = 0 ] || [[ $CONFIGS == *c* ]] || die "the restart tests time themselves by (c): add c to --configs or pass --no-restart"
[[ $KILL_AT =~ ^0?\.[0-9]+$ ]] || die "--kill-at must be a fraction between 0 and 1, got '$KILL_AT'"
command -v python3 >/dev/null || die "python3 is needed (reading summaries)"
# the interpreter itself, not a shim: it runs between a signal and its timing
PY=$(python3 -c 'import sys; print(sys.executable)')
HAVE_TIME=0
[ -x /usr/bin/time ] && HAVE_TIME=1

# --------------------------------------------------------------------------
# 1. build, machine
# --------------------------------------------------------------------------
log "cargo build --release"
cargo build --release >&2 || die "cargo build --release failed"
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src Cargo.lock 2>/dev/null)" ]; then
  COMMIT="$COMMIT (+ uncommitted changes in src/)"
fi
NPROC=$(nproc)
MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB (MemTotal %s kB)", $2 / 1048576, $2}' /proc/meminfo)
CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
KERNEL=$(uname -r)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
RUSTC=$(rustc --version 2>/dev/null || echo unknown)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

if [ "$DEVICES" = 10000000 ]; then D=data/ckpt-e2e-$EVENTS; else D=data/ckpt-e2e-$EVENTS-$DEVICES; fi
OUT=$D/out JOBS=$D/jobs
mkdir -p "$D" "$OUT" "$JOBS"
FSTYPE=$(findmnt -n -o FSTYPE -T "$D" 2>/dev/null || stat -f -c %T "$D")
[ "$FSTYPE" != tmpfs ] || die "$D is on tmpfs: state must go to the real disk"
# others rebuild target/ concurrently: run one frozen copy of the binary
TALLY=$D/tally
cp target/release/tally "$TALLY.tmp" && mv "$TALLY.tmp" "$TALLY"

# --------------------------------------------------------------------------
# 2. data (cached; a marker holding the gen command marks a complete set)
# --------------------------------------------------------------------------
INPUT=$D/events/events.jsonl
GEN_CMD="target/release/tally gen --events $EVENTS --devices $DEVICES --format jsonl --files 1 --out $D/events"
if [ -f "$D/events/.complete" ] && [ "$(cat "$D/events/.complete")" = "$GEN_CMD" ] && [ -f "$INPUT" ]; then
  log "using cached $INPUT"
else
  log "generating $INPUT"
  rm -rf "$D/events"
  "$TALLY" gen --events "$EVENTS" --devices "$DEVICES" --format jsonl --files 1 --out "$D/events" >&2 \
    || die "tally gen failed"
  [ -f "$INPUT" ] || die "tally gen did not write $INPUT"
  printf '%s' "$GEN_CMD" >"$D/events/.complete"
fi
LINES=$(wc -l <"$INPUT")
INPUT_MB=$(( $(stat -c %s "$INPUT") / 1000000 ))
log "warming the page cache with $INPUT ($INPUT_MB MB)"
cat "$INPUT" >/dev/null

# --------------------------------------------------------------------------
# 3. job files
# --------------------------------------------------------------------------
IFS=, read -r -a CFGS <<<"$CONFIGS"
declare -A INTERVAL=([a]="" [b]="0" [c]="10s" [d]="2s")
declare -A DESC=([a]="no state dir" [b]="state dir, interval 0 (end only)" [c]="state dir, interval 10s" [d]="state dir, interval 2s")
write_job() { # name interval sink
  {
    echo "# generated by scripts/checkpoint_bench.sh"
    echo "[job]"
    echo "timezone = \"+08:00\""
    [ -z "$2" ] || echo "checkpoint_interval = \"$2\""
    cat <<EOF

[[source]]
name = "client"
kind = "file"
path = "../events/events.jsonl"
format = "jsonl"
max_out_of_orderness = "5m"

[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
filter = "event = 'view'"
measures = ["pv", "uv"]

[[metric]]
name = "total_uv"
kind = "cumulate"
group_by = []
measures = ["pv", "uv"]

[[sink]]
kind = "jsonl"
path = "../out/$3"
EOF
  } >"$JOBS/$1.toml"
}
for c in "${CFGS[@]}"; do write_job "$c" "${INTERVAL[$c]}" "rows-$c.jsonl"; done
write_job restart-term "$RESTART_INTERVAL" rows-restart-term.jsonl
write_job restart-kill "$RESTART_INTERVAL" rows-restart-kill.jsonl
REF=$OUT/rows-reference.jsonl

# --------------------------------------------------------------------------
# 4. overhead: a-b-c-d interleaved, each with a fresh state dir
# --------------------------------------------------------------------------
state_of() { echo "$D/state-$1"; }
run_cmd() { # cfg tag -> the command (for the report)
  local s=
  [ "$1" = a ] || s=" --state-dir $(state_of "$1")"
  echo "$TALLY run --job $JOBS/$1.toml --workers $WORKERS$s --summary $OUT/summary-$2.json"
}
now() { date +%s.%N; }
for r in $(seq "$RUNS"); do
  for c in "${CFGS[@]}"; do
    tag=$c-r$r
    rm -rf "$(state_of "$c")" "$OUT/rows-$c.jsonl" "$OUT/summary-$tag.json"
    args=(run --job "$JOBS/$c.toml" --workers "$WORKERS" --summary "$OUT/summary-$tag.json")
    [ "$c" = a ] || args+=(--state-dir "$(state_of "$c")")
    t0=$(now)
    if [ "$HAVE_TIME" = 1 ]; then
      /usr/bin/time -f '%M %e %U %S' -o "$OUT/time-$tag.txt" "$TALLY" "${args[@]}" 2>"$OUT/log-$tag.txt" \
        || { cat "$OUT/log-$tag.txt" >&2; die "run $tag failed: $(run_cmd "$c" "$tag")"; }
    else
      "$TALLY" "${args[@]}" 2>"$OUT/log-$tag.txt" \
        || { cat "$OUT/log-$tag.txt" >&2; die "run $tag failed: $(run_cmd "$c" "$tag")"; }
    fi
    t1=$(now)
    "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1" >"$OUT/wall-$tag.txt"
    if [ "$c" = a ] && [ "$r" = 1 ]; then
      cp "$OUT/rows-a.jsonl" "$REF"
    fi
    cmp -s "$REF" "$OUT/rows-$c.jsonl" \
      || die "rows of run $tag differ from (a)'s: cmp $REF $OUT/rows-$c.jsonl"
    [ "$c" = a ] || du -sb "$(state_of "$c")" | cut -f1 >"$OUT/du-$tag.txt"
    log "round $r/$RUNS ($c) ${DESC[$c]}: $(grep '^tally: .* events' "$OUT/log-$tag.txt" | head -1 | sed 's/^tally: //'); rows = (a)"
  done
done
for c in "${CFGS[@]}"; do rm -rf "$(state_of "$c")"; done

# per configuration: median seconds, events/s, checkpoint stats
stats() { # cfg -> "sec wall eps count pause_max ckpt_max bytes rss range events rows"
  "$PY" - "$OUT" "$1" "$RUNS" "$HAVE_TIME" <<'PY'
import json, sys
out, c, runs, have_time = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
S = [json.load(open(f"{out}/summary-{c}-r{r}.json")) for r in range(1, runs + 1)]
W = [float(open(f"{out}/wall-{c}-r{r}.txt").read()) for r in range(1, runs + 1)]
med = lambda xs: sorted(xs)[(len(xs) - 1) // 2]
m = sorted(S, key=lambda s: s["seconds"])[(runs - 1) // 2]
ck = [s["checkpoints"] for s in S]
rss = "-"
if have_time:
    rss = f'{med([int(open(f"{out}/time-{c}-r{r}.txt").read().split()[-4]) for r in range(1, runs + 1)]) / 1024:.0f}'
secs = [s["seconds"] for s in S]
print(f'{m["seconds"]:.3f}', f"{med(W):.3f}", f'{m["events_per_second"]:.0f}', m["checkpoints"]["count"],
      f'{max(k["pause_seconds_max"] for k in ck):.3f}', f'{max(k["seconds_max"] for k in ck):.3f}',
      m["checkpoints"]["bytes_written"], rss, f"{min(secs):.2f}-{max(secs):.2f}", m["events"], m["rows"])
PY
}
declare -A SEC WALL EPS CNT PAUSE CKMAX BYTES RSS RANGE EV ROWS
for c in "${CFGS[@]}"; do
  read -r SEC[$c] WALL[$c] EPS[$c] CNT[$c] PAUSE[$c] CKMAX[$c] BYTES[$c] RSS[$c] RANGE[$c] EV[$c] ROWS[$c] \
    < <(stats "$c") || die "cannot read the summaries of ($c)"
done

# --------------------------------------------------------------------------
# 5. restart: (c) stopped by SIGTERM / kill -9 at KILL_AT of its wall time
# --------------------------------------------------------------------------
KILL_AFTER=0
[ "$RESTART" = 0 ] || KILL_AFTER=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) * float(sys.argv[2]):.2f}')" "${WALL[c]}" "$KILL_AT")
manifest_gen() { # state dir -> generation in its MANIFEST, or none
  "$PY" - "$1/MANIFEST" <<'PY'
import json, sys
try:
    text = open(sys.argv[1]).read()
except FileNotFoundError:
    print("none"); sys.exit()
print(json.loads(text.rstrip().rsplit("\n", 1)[0])["generation"])
PY
}
declare -A R_KILLED_AT R_RC R_EXIT_S R_GEN R_SINCE R_DU R_DU_CKPT R_DU_LIVE R_START R_FROM R_SEC R_EPS R_TOTAL R_NOTE R_STOP_CK
restart_test() { # name signal
  local name=$1 sig=$2 st=$D/state-$1 job=$JOBS/restart-$1.toml
  local rows=$OUT/rows-restart-$1.jsonl
  rm -rf "$st" "$rows" "$OUT/summary-$name-1.json" "$OUT/summary-$name-2.json"
  log "restart ($name): starting (c), $sig after ${KILL_AFTER}s"
  local t0 t_kill t_exit pid rc=0
  t0=$(now)
  "$TALLY" run --job "$job" --workers "$WORKERS" --state-dir "$st" --summary "$OUT/summary-$name-1.json" \
    2>"$OUT/log-$name-1.txt" &
  pid=$!
  sleep "$KILL_AFTER"
  R_NOTE[$name]=""
  if [ "$sig" = KILL ] && [ ! -f "$st/MANIFEST" ]; then
    # kill -9 before any checkpoint would just restart from scratch
    while [ ! -f "$st/MANIFEST" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    R_NOTE[$name]="no checkpoint committed at ${KILL_AFTER}s: killed right after the first one"
  fi
  local since=-
  t_kill=$(now)
  if ! kill -"$sig" "$pid" 2>/dev/null; then
    wait "$pid" || true
    R_NOTE[$name]="NOT MEASURED: the run ended before the signal${R_NOTE[$name]:+ (${R_NOTE[$name]})}"
    log "restart ($name): ${R_NOTE[$name]}"
    UNMEASURED=1
    for v in R_KILLED_AT R_RC R_EXIT_S R_GEN R_SINCE R_DU R_DU_CKPT R_DU_LIVE R_START R_FROM R_SEC R_EPS R_TOTAL R_STOP_CK; do
      eval "$v[\$name]=–"
    done
    R_EPS[$name]=0
    rm -rf "$st"
    return
  fi
  wait "$pid" || rc=$?
  t_exit=$(now)
  # after kill -9 the MANIFEST is the last one committed before the kill
  if [ "$sig" = KILL ] && [ -f "$st/MANIFEST" ]; then
    since=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$(date -r "$st/MANIFEST" +%s.%N)" "$t_kill")
  fi
  R_KILLED_AT[$name]=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$t_kill")
  R_EXIT_S[$name]=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t_kill" "$t_exit")
  R_RC[$name]=$rc
  R_SINCE[$name]=$since
  if [ "$sig" = TERM ]; then
    [ "$rc" = 0 ] || { cat "$OUT/log-$name-1.txt" >&2; die "restart ($name): exit $rc after SIGTERM, want 0"; }
    "$PY" - "$OUT/summary-$name-1.json" <<'PY' || die "restart ($name): the stopped run did not checkpoint"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["stopped"] and s["checkpoints"]["generation"] is not None, s["checkpoints"]
PY
    R_STOP_CK[$name]=$("$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['checkpoints']; print(f\"gen {c['generation']}, {c['count']} checkpoint(s), longest {c['seconds_max']:.3f} s\")" "$OUT/summary-$name-1.json")
  else
    [ "$rc" = 137 ] || die "restart ($name): exit $rc after kill -9, want 137"
  fi
  R_GEN[$name]=$(manifest_gen "$st")
  [ "$sig" = TERM ] || R_STOP_CK[$name]="last committed: gen ${R_GEN[$name]}, ${since}s before the kill"
  R_DU[$name]=$(du -sb "$st" | cut -f1)
  R_DU_CKPT[$name]=$(du -sb "$st/ckpt" | cut -f1)
  R_DU_LIVE[$name]=$( [ -d "$st/live" ] && du -sb "$st/live" | cut -f1 || echo 0)
  log "restart ($name): exit $rc, ${R_EXIT_S[$name]}s after the signal; checkpoint ${R_GEN[$name]}; state dir ${R_DU[$name]} bytes"
  log "restart ($name): resuming"
  local t1 t2
  t1=$(now)
  "$TALLY" run --job "$job" --workers "$WORKERS" --state-dir "$st" --summary "$OUT/summary-$name-2.json" \
    2>"$OUT/log-$name-2.txt" || { cat "$OUT/log-$name-2.txt" >&2; die "restart ($name): the resumed run failed"; }
  t2=$(now)
  cmp -s "$REF" "$rows" || die "restart ($name): rows differ from (a)'s: cmp $REF $rows"
  read -r R_START[$name] R_FROM[$name] R_SEC[$name] R_EPS[$name] < <("$PY" -c "
import json, sys
s = json.load(open(sys.argv[1]))
print(f\"{s['startup_seconds']:.3f}\", s['resumed_from'], f\"{s['seconds']:.3f}\", f\"{s['events_per_second']:.0f}\")" \
    "$OUT/summary-$name-2.json")
  R_TOTAL[$name]=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t1" "$t2")
  [ "${R_FROM[$name]}" = "${R_GEN[$name]}" ] || die "restart ($name): resumed from ${R_FROM[$name]}, the manifest said ${R_GEN[$name]}"
  log "restart ($name): startup ${R_START[$name]}s, resumed from ${R_FROM[$name]}; rows = (a)"
  rm -rf "$st"
}
UNMEASURED=0
if [ "$RESTART" = 1 ]; then
  restart_test term TERM
  restart_test kill KILL
fi

# per round: each run against (a) and (b) of the same round (the rounds
# interleave, so a pair shares the machine's state of the moment), wall
# seconds and CPU seconds (user + system, /usr/bin/time)
pairs() {
  "$PY" - "$OUT" "$RUNS" "$HAVE_TIME" "${CFGS[@]}" <<'PY'
import json, statistics, sys
out, runs, have_time, cfgs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
sec = {c: [json.load(open(f"{out}/summary-{c}-r{r}.json"))["seconds"] for r in range(1, runs + 1)] for c in cfgs}
def cpu(c, r):
    f = open(f"{out}/time-{c}-r{r}.txt").read().split()
    return float(f[-2]) + float(f[-1])
def show(xs):
    return f"{statistics.median(xs):.3f}x | {min(xs):.3f}–{max(xs):.3f} | {sum(x <= 1.05 for x in xs)}/{len(xs)}"
for c in cfgs[1:]:
    for base in ("a", "b"):
        if base == c or base not in cfgs:
            continue
        print(f"| ({c}) / ({base}), seconds | {show([x / y for x, y in zip(sec[c], sec[base])])} |")
        if have_time:
            print(f"| ({c}) / ({base}), CPU seconds | {show([cpu(c, r) / cpu(base, r) for r in range(1, runs + 1)])} |")
PY
}
PAIRS=$(pairs) || die "cannot read the rounds' summaries"

# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
m() { "$PY" -c "import sys; print(f'{float(sys.argv[1])/1e6:.2f}')" "$1"; }
ratio() { "$PY" -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.3f}')" "$1" "$2"; }
mb() { "$PY" -c "import sys; print(f'{int(sys.argv[1])/1e6:.1f}')" "$1"; }
REPORT=$D/report.md
{
  echo "### Checkpoints end to end: $LINES events, $DEVICES devices, $WORKERS workers"
  echo
  echo "- machine: $NPROC CPUs ($CPU), $MEM, kernel $KERNEL; load average before $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg) (shared machine)"
  echo "- date: $DATE; commit: $COMMIT; $RUSTC"
  echo "- input: \`$INPUT\`, $LINES lines, $INPUT_MB MB (page cache warm); state dirs under \`$D/\` on $FSTYPE"
  echo "- job: page_uv (group_by page, views: pv, uv) + total_uv (group_by [], all events: pv, uv), CUMULATE 1 min / 1 day, +08:00 (\`$JOBS/*.toml\`)"
  echo "- overhead: $RUNS rounds of ${CONFIGS//,/-} interleaved, each with a fresh state dir; seconds and events/s from \`--summary\` (median run by seconds; wall = process wall, median)"
  echo "- longest pause / longest checkpoint: the maximum over the rounds of \`checkpoints.pause_seconds_max\` / \`seconds_max\`; checkpoints and bytes: the median run"
  echo
  echo "| run | seconds | range | wall s | M events/s | vs (a) | vs (b) | checkpoints | longest pause s | longest checkpoint s | MB written | peak RSS MB | rows = (a) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for c in "${CFGS[@]}"; do
    vs_b=–
    [ -z "${SEC[b]:-}" ] || vs_b="$(ratio "${SEC[$c]}" "${SEC[b]}")x"
    echo "| ($c) ${DESC[$c]} | ${SEC[$c]} | ${RANGE[$c]} | ${WALL[$c]} | $(m "${EPS[$c]}") | $(ratio "${SEC[$c]}" "${SEC[a]}")x | $vs_b | ${CNT[$c]} | ${PAUSE[$c]} | ${CKMAX[$c]} | $(mb "${BYTES[$c]}") | ${RSS[$c]} | yes (cmp) |"
  done
  echo
  echo "(vs: ratio of median seconds, above 1 is slower; every run's ${ROWS[a]} rows are byte-identical to (a) round 1's, checked with cmp after each run)"
  echo
  echo "Per round: each run against the runs of its own round (rounds interleave the configurations, so a pair shares the machine's state of the moment); \"≤ 1.05\": rounds with at most 5% overhead."
  echo
  echo "| pair | median of the rounds' ratios | range | rounds ≤ 1.05 |"
  echo "|---|---:|---:|---:|"
  echo "$PAIRS"
  echo
  if [ "$RESTART" = 1 ]; then
    echo "Restart: (c) with checkpoint_interval = \"$RESTART_INTERVAL\" started with a fresh state dir, signalled at ${KILL_AFTER}s (${KILL_AT} of (c)'s median wall ${WALL[c]}s), then rerun with the same state dir to the end."
    echo
    echo "| signal | sent at s | exit | exit after signal s | checkpoint at stop | state dir bytes (du -sb) | of which ckpt/ | of which live/ | restart startup_seconds | resumed_from | restart seconds | restart M events/s | restart wall s | rows = (a) |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for n in term kill; do
      sig=$([ $n = term ] && echo "SIGTERM" || echo "kill -9")
      echo "| $sig | ${R_KILLED_AT[$n]} | ${R_RC[$n]} | ${R_EXIT_S[$n]} | ${R_STOP_CK[$n]} | ${R_DU[$n]} | ${R_DU_CKPT[$n]} | ${R_DU_LIVE[$n]} | ${R_START[$n]} | ${R_FROM[$n]} | ${R_SEC[$n]} | $(m "${R_EPS[$n]}") | ${R_TOTAL[$n]} | yes (cmp) |"
    done
    echo
    for n in term kill; do [ -z "${R_NOTE[$n]}" ] || echo "- $n: ${R_NOTE[$n]}"; done
    echo "- startup_seconds: from process start until workers read input, checking and restoring the checkpoint included (target: under 5 s for 10M devices)"
    echo "- state dir size: measured after the stopped run exited, before the restart (apparent bytes; live/ holds the memory-mapped tables the run worked on, removed and rebuilt from ckpt/ on restart)"
    echo
  fi
  echo "Commands (from the repo root; \`$TALLY\` is a frozen copy of \`target/release/tally\`):"
  echo
  echo '```sh'
  no_restart=
  [ "$RESTART" = 1 ] || no_restart=" --no-restart"
  echo "scripts/checkpoint_bench.sh --events $EVENTS --devices $DEVICES --runs $RUNS --workers $WORKERS --configs $CONFIGS$no_restart --kill-at $KILL_AT --restart-interval $RESTART_INTERVAL"
  echo "cargo build --release"
  echo "$GEN_CMD"
  for c in "${CFGS[@]}"; do
    [ "$c" = a ] && pre="" || pre="rm -rf $(state_of "$c"); "
    echo "$pre$(run_cmd "$c" "$c-rN")   # x$RUNS; then cmp $REF $OUT/rows-$c.jsonl"
  done
  for n in $([ "$RESTART" = 1 ] && echo term kill); do
    sig=$([ $n = term ] && echo "-TERM" || echo "-9")
    echo "rm -rf $D/state-$n; $TALLY run --job $JOBS/restart-$n.toml --workers $WORKERS --state-dir $D/state-$n --summary $OUT/summary-$n-1.json & sleep $KILL_AFTER; kill $sig \$!; wait"
    echo "du -sb $D/state-$n; $TALLY run --job $JOBS/restart-$n.toml --workers $WORKERS --state-dir $D/state-$n --summary $OUT/summary-$n-2.json; cmp $REF $OUT/rows-restart-$n.jsonl"
  done
  echo '```'
} >"$REPORT"
cat "$REPORT"
log "report saved to $REPORT"
[ "$UNMEASURED" = 0 ] || die "a restart test was not measured (see the report)"
