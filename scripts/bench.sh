#!/usr/bin/env bash
# End-to-end benchmark: tally (jsonl and binary input, 1 and 2 workers) against
# Apache Flink's CUMULATE page PV/UV query on the same file, plus the DuckDB
# batch reference if scripts/duckdb_reference.py exists. Prints a markdown
# report (machine, table, 2w/1w ratios, row agreement, exact commands) on
# stdout and saves it under the bench directory; progress goes to stderr.
#
# usage: scripts/bench.sh [--events N] [--devices D] [--no-flink] [--quick] [--runs R]
#                         [--duckdb | --no-duckdb]
#   defaults: 20M events, 1M devices, 3 runs per configuration
#   --quick   2M events, 200k devices (explicit --events/--devices still win)
#   --runs R  runs per tally configuration (median reported), default 3
#   --duckdb / --no-duckdb  force / skip the DuckDB reference; by default it
#             runs up to 5M events only (it is a slow join meant for test
#             sizes: ~60 s and 3.6 GB RSS at 2M events)
# env: FLINK_RUN=path/to/run.sh (default /work/shared/peers/flink/run.sh),
#      FLINK_HEAP=-Xmx2g (passed through to run.sh), TALLY_BENCH_WORKERS="1 2"
#
# Data is generated once per (events, devices) under data/bench-<N>-<D>/ and
# reused; every run's job file, summary, log and rows are under its out/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

EVENTS= DEVICES= QUICK=0 FLINK=1 RUNS=3 DUCKDB=auto
while [ $# -gt 0 ]; do
  case $1 in
    --events) [ $# -ge 2 ] || die "--events needs a value"; EVENTS=$2; shift 2 ;;
    --devices) [ $# -ge 2 ] || die "--devices needs a value"; DEVICES=$2; shift 2 ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a value"; RUNS=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --no-flink) FLINK=0; shift ;;
    --duckdb) DUCKDB=1; shift ;;
    --no-duckdb) DUCKDB=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  EVENTS=${EVENTS:-2000000}; DEVICES=${DEVICES:-200000}
else
  EVENTS=${EVENTS:-20000000}; DEVICES=${DEVICES:-1000000}
fi
for v in EVENTS DEVICES RUNS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
WORKERS=(${TALLY_BENCH_WORKERS:-1 2})
FLINK_RUN=${FLINK_RUN:-/work/shared/peers/flink/run.sh}
FORMATS=(jsonl binary)
TZ_OFFSET=+08:00
DISORDER=2m
WATERMARK=5m

command -v python3 >/dev/null || die "python3 is needed (parsing summaries, comparing rows)"
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) is needed for peak RSS: apt-get install time"
HELPERS=$ROOT/scripts/bench
[ -f "$HELPERS/compare_rows.py" ] || die "missing $HELPERS/compare_rows.py"

# --------------------------------------------------------------------------
# 1. build, machine
# --------------------------------------------------------------------------
log "cargo build --release"
cargo build --release >&2 || die "cargo build --release failed"

COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock build.rs 2>/dev/null)" ]; then
  COMMIT="$COMMIT (+ uncommitted changes in src/Cargo)"
fi
NPROC=$(nproc)
MEM_GIB=$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
[ -n "$CPU" ] || CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
KERNEL=$(uname -r)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUSTC=$(rustc --version 2>/dev/null || echo unknown)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

BENCH=data/bench-$EVENTS-$DEVICES
OUT=$BENCH/out
mkdir -p "$BENCH" "$OUT" "$BENCH/jobs"
# others rebuild target/ concurrently: run one frozen copy of the binary
TALLY=$BENCH/tally
cp target/release/tally "$TALLY.tmp" && mv "$TALLY.tmp" "$TALLY"

# --------------------------------------------------------------------------
# 2. data (cached; a marker holding the gen command marks a complete set)
# --------------------------------------------------------------------------
declare -A INPUT GEN_CMD
for fmt in "${FORMATS[@]}"; do
  ext=$([ "$fmt" = binary ] && echo bin || echo "$fmt")
  dir=$BENCH/$fmt
  INPUT[$fmt]=$dir/events.$ext
  cmd="target/release/tally gen --events $EVENTS --devices $DEVICES --format $fmt --out $dir --disorder $DISORDER"
  GEN_CMD[$fmt]=$cmd
  if [ -f "$dir/.complete" ] && [ "$(cat "$dir/.complete")" = "$cmd" ] && [ -f "${INPUT[$fmt]}" ]; then
    log "using cached ${INPUT[$fmt]}"
    continue
  fi
  log "generating ${INPUT[$fmt]}"
  rm -rf "$dir"
  "$TALLY" gen --events "$EVENTS" --devices "$DEVICES" --format "$fmt" --out "$dir" --disorder "$DISORDER" >&2 \
    || die "tally gen failed for $fmt"
  [ -f "${INPUT[$fmt]}" ] || die "tally gen did not write ${INPUT[$fmt]}"
  printf '%s' "$cmd" >"$dir/.complete"
done
LINES=$(wc -l <"${INPUT[jsonl]}")
JSONL_MB=$(( $(stat -c %s "${INPUT[jsonl]}") / 1000000 ))
BIN_MB=$(( $(stat -c %s "${INPUT[binary]}") / 1000000 ))
# warm the page cache so every engine reads from memory
cat "${INPUT[jsonl]}" "${INPUT[binary]}" >/dev/null

# --------------------------------------------------------------------------
# 3. job files
# --------------------------------------------------------------------------
job_path() { echo "$BENCH/jobs/page_uv-$1-w$2.toml"; }
rows_path() { echo "$OUT/tally-$1-w$2.jsonl"; }
for fmt in "${FORMATS[@]}"; do
  if [ "$fmt" = binary ]; then filter="event = 0"; else filter="event = 'view'"; fi
  for w in "${WORKERS[@]}"; do
    cat >"$(job_path "$fmt" "$w")" <<EOF
# generated by scripts/bench.sh: page PV/UV, the query Flink runs
[job]
timezone = "$TZ_OFFSET"

[[source]]
name = "client"
kind = "file"
path = "../$fmt/$(basename "${INPUT[$fmt]}")"
format = "$fmt"
max_out_of_orderness = "$WATERMARK"

[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
filter = "$filter"
measures = ["pv", "uv"]
step = "1m"
size = "1d"

[[sink]]
kind = "jsonl"
path = "../out/$(basename "$(rows_path "$fmt" "$w")")"
EOF
  done
done

# --------------------------------------------------------------------------
# 4. tally runs (interleaved so machine noise spreads over all configurations)
# --------------------------------------------------------------------------
run_cmd() { # fmt w rep -> the command line (for the report)
  echo "/usr/bin/time -f '%M %e' $TALLY run --job $(job_path "$1" "$2") --workers $2 --summary $OUT/summary-$1-w$2-r$3.json"
}
for rep in $(seq "$RUNS"); do
  for fmt in "${FORMATS[@]}"; do
    for w in "${WORKERS[@]}"; do
      tag=$fmt-w$w-r$rep
      rm -f "$OUT/summary-$tag.json"
      if ! /usr/bin/time -f '%M %e' -o "$OUT/time-$tag.txt" \
        "$TALLY" run --job "$(job_path "$fmt" "$w")" --workers "$w" --summary "$OUT/summary-$tag.json" \
        2>"$OUT/log-$tag.txt"; then
        cat "$OUT/log-$tag.txt" >&2
        die "tally run failed ($tag); log: $OUT/log-$tag.txt"
      fi
      log "run $rep/$RUNS $fmt workers=$w: $(grep '^tally: .* events' "$OUT/log-$tag.txt" | head -1 | sed 's/^tally: //')"
    done
  done
done

# median over runs (lower median for an even count); prints fields for the report
tally_stats() { # fmt w -> "events seconds eps rss_mb state_b_per_entry rows rejected"
  python3 - "$OUT" "$1" "$2" "$RUNS" <<'PY'
import json, sys
out, fmt, w, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
S, R = [], []
for r in range(1, runs + 1):
    S.append(json.load(open(f"{out}/summary-{fmt}-w{w}-r{r}.json")))
    R.append(int(open(f"{out}/time-{fmt}-w{w}-r{r}.txt").read().split()[-2]))
med = lambda xs: sorted(xs)[(len(xs) - 1) // 2]
m = sorted(S, key=lambda s: s["events_per_second"])[(runs - 1) // 2]
per = m.get("dedup_bytes_per_entry") or (m["state_bytes_max"] / m["dedup_entries_max"] if m["dedup_entries_max"] else float("nan"))
eps = [s["events_per_second"] for s in S]
print(m["events"], f'{m["seconds"]:.3f}', f'{m["events_per_second"]:.0f}', f"{med(R) / 1024:.0f}",
      f"{per:.1f}", m["rows"], m["rejected"], f"{min(eps)/1e6:.2f}-{max(eps)/1e6:.2f}")
PY
}
declare -A EV SEC EPS RSS PER ROWS REJ SPREAD
for fmt in "${FORMATS[@]}"; do
  for w in "${WORKERS[@]}"; do
    read -r EV[$fmt$w] SEC[$fmt$w] EPS[$fmt$w] RSS[$fmt$w] PER[$fmt$w] ROWS[$fmt$w] REJ[$fmt$w] SPREAD[$fmt$w] \
      < <(tally_stats "$fmt" "$w") || die "cannot read summaries of $fmt workers=$w"
    [ "${REJ[$fmt$w]}" = 0 ] || log "warning: $fmt workers=$w skipped ${REJ[$fmt$w]} records"
  done
done
# every worker count must write the same rows
SAME_ROWS=()
for fmt in "${FORMATS[@]}"; do
  ref=$(sort "$(rows_path "$fmt" "${WORKERS[0]}")" | md5sum)
  same=yes
  for w in "${WORKERS[@]:1}"; do
    [ "$(sort "$(rows_path "$fmt" "$w")" | md5sum)" = "$ref" ] || same=NO
  done
  SAME_ROWS+=("$fmt: $same")
  [ "$same" = yes ] || log "warning: $fmt rows differ between worker counts"
done

# --------------------------------------------------------------------------
# 5. Flink (same jsonl file, once)
# --------------------------------------------------------------------------
FLINK_STATUS="not run (--no-flink)" FL_WALL= FL_EPS= FL_RSS= FL_CMP= FL_CMD= FL_TINY=
if [ "$FLINK" = 1 ]; then
  FL_CMD="${FLINK_HEAP:+FLINK_HEAP=$FLINK_HEAP }bash $FLINK_RUN ${INPUT[jsonl]} $OUT/flink.jsonl"
  if [ ! -f "$FLINK_RUN" ]; then
    FLINK_STATUS="not run: $FLINK_RUN not found"
    log "warning: $FLINK_STATUS"
  else
    log "running Flink on ${INPUT[jsonl]} (first use installs PyFlink, takes minutes)"
    rm -f "$OUT/flink.jsonl"
    if bash "$FLINK_RUN" "${INPUT[jsonl]}" "$OUT/flink.jsonl" >"$OUT/flink.log" 2>&1; then
      line=$(grep '^wall_s=' "$OUT/flink.log" | tail -1 || true)
      FL_WALL=$(sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' <<<"$line")
      FL_EPS=$(sed -n 's/.*events_per_s=\([0-9.]*\).*/\1/p' <<<"$line")
      FL_RSS=$(sed -n 's/.*jvm_peak_rss_mb=\([0-9]*\).*/\1/p' <<<"$line")
      if [ -z "$FL_WALL" ] || [ -z "$FL_EPS" ]; then
        FLINK_STATUS="ran, but no 'wall_s=… events_per_s=…' line in $OUT/flink.log"
        FL_WALL= FL_EPS=
        log "warning: $FLINK_STATUS"
      else
        FLINK_STATUS="ok: $line"
        log "flink: $line"
        FL_CMP=$(python3 "$HELPERS/compare_rows.py" --name flink --json "$OUT/compare-flink.json" \
          "$OUT/flink.jsonl" "$(rows_path jsonl "${WORKERS[-1]}")" 2> >(sed 's/^/bench: /' >&2)) \
          || FL_CMP="comparison failed"
        log "flink vs tally: $FL_CMP"
        # Flink's wall holds a fixed cost (plan, deploy, firing every window to
        # the day end) that dominates small inputs: time the same job on the
        # first 1000 lines to show it
        head -n 1000 "${INPUT[jsonl]}" >"$OUT/flink-tiny-in.jsonl"
        log "running Flink on the first 1000 lines (fixed-cost baseline)"
        if bash "$FLINK_RUN" "$OUT/flink-tiny-in.jsonl" "$OUT/flink-tiny.jsonl" >"$OUT/flink-tiny.log" 2>&1; then
          FL_TINY=$(grep '^wall_s=' "$OUT/flink-tiny.log" | tail -1 | sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p' || true)
        fi
        [ -n "$FL_TINY" ] || log "warning: Flink baseline run failed; see $OUT/flink-tiny.log"
      fi
    else
      FLINK_STATUS="failed (exit $?); see $OUT/flink.log"
      tail -20 "$OUT/flink.log" >&2
      log "warning: Flink $FLINK_STATUS"
    fi
  fi
fi

# --------------------------------------------------------------------------
# 6. DuckDB batch reference (optional)
# --------------------------------------------------------------------------
DK_STATUS="not run: scripts/duckdb_reference.py not present" DK_SEC= DK_RSS= DK_CMP= DK_CMD=
DUCKDB_MAX_EVENTS=5000000
if [ "$DUCKDB" = 0 ]; then
  DK_STATUS="not run (--no-duckdb)"
elif [ "$DUCKDB" = auto ] && [ "$EVENTS" -gt "$DUCKDB_MAX_EVENTS" ] && [ -f scripts/duckdb_reference.py ]; then
  DK_STATUS="not run: over $DUCKDB_MAX_EVENTS events (a slow join for test sizes; --duckdb forces it)"
  log "skipping DuckDB reference: $DK_STATUS"
elif [ -f scripts/duckdb_reference.py ]; then
  PY=python3
  if ! python3 -c 'import duckdb' 2>/dev/null; then
    # run.sh installs duckdb next to PyFlink
    fpy=${PEER_FLINK_ROOT:-$HOME/.cache/tally-peers/flink}/venv/bin/python
    if [ -x "$fpy" ] && "$fpy" -c 'import duckdb' 2>/dev/null; then PY=$fpy; else PY=; fi
  fi
  if [ -z "$PY" ]; then
    DK_STATUS="not run: no python with the duckdb module (pip install duckdb)"
    log "warning: DuckDB $DK_STATUS"
  else
    DK_CMD="/usr/bin/time -f '%M %e' $PY scripts/duckdb_reference.py ${INPUT[jsonl]} $OUT/duckdb.jsonl --tz $TZ_OFFSET --step 60000"
    log "running DuckDB reference"
    rm -f "$OUT/duckdb.jsonl"
    if /usr/bin/time -f '%M %e' -o "$OUT/time-duckdb.txt" \
      "$PY" scripts/duckdb_reference.py "${INPUT[jsonl]}" "$OUT/duckdb.jsonl" --tz "$TZ_OFFSET" --step 60000 \
      >"$OUT/duckdb.log" 2>&1; then
      read -r DK_KB DK_SEC < <(tail -1 "$OUT/time-duckdb.txt")
      DK_RSS=$((DK_KB / 1024))
      DK_STATUS="ok"
      DK_CMP=$(python3 "$HELPERS/compare_rows.py" --name duckdb "$OUT/duckdb.jsonl" \
        "$(rows_path jsonl "${WORKERS[-1]}")" 2> >(sed 's/^/bench: /' >&2)) || DK_CMP="not comparable (see log above)"
      log "duckdb: ${DK_SEC}s; vs tally: $DK_CMP"
    else
      DK_STATUS="failed; see $OUT/duckdb.log"
      tail -20 "$OUT/duckdb.log" >&2
      log "warning: DuckDB $DK_STATUS"
    fi
  fi
fi

# --------------------------------------------------------------------------
# 7. verify one jsonl result (timed separately)
# --------------------------------------------------------------------------
VW=${WORKERS[-1]}
VERIFY_CMD="$TALLY verify --job $(job_path jsonl "$VW") --results $(rows_path jsonl "$VW")"
log "verifying jsonl workers=$VW rows"
VERIFY_OK=yes
/usr/bin/time -f '%M %e' -o "$OUT/time-verify.txt" \
  "$TALLY" verify --job "$(job_path jsonl "$VW")" --results "$(rows_path jsonl "$VW")" \
  >"$OUT/verify.txt" 2>&1 || VERIFY_OK=NO
read -r V_KB V_SEC < <(tail -1 "$OUT/time-verify.txt")
[ "$VERIFY_OK" = yes ] || { cat "$OUT/verify.txt" >&2; log "warning: tally verify FAILED"; }

# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
fmt_m() { python3 -c "import sys; print(f'{float(sys.argv[1])/1e6:.2f}')" "$1"; }
ratio() { # a b -> a/b formatted, or n/a
  if [ -n "$2" ] && [ -n "$1" ]; then python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}x')" "$1" "$2"; else echo "n/a"; fi
}
REPORT=$BENCH/report-$STAMP.md
{
  echo "### Benchmark: page PV/UV, CUMULATE step 1 min / size 1 day, tz $TZ_OFFSET, watermark $WATERMARK"
  echo
  echo "- machine: $NPROC CPUs ($CPU), $MEM_GIB GiB RAM, kernel $KERNEL; load average before the runs $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg) (shared machine)"
  echo "- date: $DATE; commit: $COMMIT; $RUSTC"
  echo "- input: $LINES events (incl. ~1% duplicates), $DEVICES devices, 44 pages, 4 h from 22:00 +08:00 (crosses local midnight), disorder $DISORDER;"
  echo "  jsonl $JSONL_MB MB, binary $BIN_MB MB; page cache warm"
  echo "- tally: median of $RUNS runs (events/s and seconds from \`--summary\`, the median run; peak RSS: median of \`/usr/bin/time %M\`);"
  echo "  Flink: one run, its job wall time (submit → finish, JVM start excluded), parallelism 2, heap state, mini-batch, two-phase agg"
  echo
  echo "| run | workers | events | seconds | M events/s | ratio vs Flink | peak RSS MB | state B/(device,key) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for fmt in "${FORMATS[@]}"; do
    for w in "${WORKERS[@]}"; do
      k=$fmt$w
      echo "| tally $fmt | $w | ${EV[$k]} | ${SEC[$k]} | $(fmt_m "${EPS[$k]}") | $(ratio "${EPS[$k]}" "$FL_EPS") | ${RSS[$k]} | ${PER[$k]} |"
    done
  done
  if [ -n "$FL_EPS" ]; then
    echo "| Flink 2.3 (PyFlink SQL) jsonl | 2 | $LINES | $FL_WALL | $(fmt_m "$FL_EPS") | 1.00x | ${FL_RSS:-?} (JVM) | – |"
  else
    echo "| Flink 2.3 (PyFlink SQL) jsonl | 2 | – | – | – | – | – | – |"
  fi
  if [ -n "$DK_SEC" ]; then
    dk_eps=$(python3 -c "import sys; print(round(int(sys.argv[1])/max(float(sys.argv[2]),1e-9)))" "$LINES" "$DK_SEC")
    echo "| DuckDB reference (batch, process wall) | – | $LINES | $DK_SEC | $(fmt_m "$dk_eps") | $(ratio "$dk_eps" "$FL_EPS") | $DK_RSS | – |"
  fi
  echo
  spread=()
  for fmt in "${FORMATS[@]}"; do for w in "${WORKERS[@]}"; do spread+=("$fmt w$w ${SPREAD[$fmt$w]}"); done; done
  echo "Range of M events/s over the $RUNS runs: $(IFS=';'; echo "${spread[*]}" | sed 's/;/; /g')"
  echo
  if [ "${#WORKERS[@]}" -ge 2 ]; then
    w1=${WORKERS[0]} wn=${WORKERS[-1]}
    for fmt in "${FORMATS[@]}"; do
      echo "- $fmt: $wn workers / $w1 worker = $(ratio "${EPS[$fmt$wn]}" "${EPS[$fmt$w1]}")"
    done
  fi
  echo "- tally rows identical across worker counts: ${SAME_ROWS[*]}"
  echo "- the binary rows' ratio vs Flink compares tally on binary input with Flink on the JSON-lines input"
  echo "- binary vs jsonl (workers ${WORKERS[-1]}): $(ratio "${EPS[binary${WORKERS[-1]}]}" "${EPS[jsonl${WORKERS[-1]}]}")"
  echo "- Flink: $FLINK_STATUS"
  if [ -n "$FL_TINY" ]; then
    marg=$(python3 -c "import sys; w=float(sys.argv[2])-float(sys.argv[3]); print(f'{int(sys.argv[1])/w/1e6:.3f} M events/s' if w > 0 else 'n/a')" "$LINES" "$FL_WALL" "$FL_TINY")
    echo "- Flink fixed cost: ${FL_TINY}s wall on the first 1000 lines; rate above that: $marg"
    echo "  (ratios in the table use Flink's whole wall time, as its run.sh reports it)"
  fi
  if [ -n "$FL_CMP" ]; then
    echo "- Flink rows vs tally jsonl rows on the (window_start, window_end, page) keys present in both"
    echo "  (Flink emits every minute to the day end, tally stops at the last minute with data): $FL_CMP"
  fi
  echo "- DuckDB: $DK_STATUS${DK_CMP:+; rows vs tally: $DK_CMP}"
  echo "- \`tally verify\` of the jsonl workers=$VW rows: $(head -1 "$OUT/verify.txt") ($(grep 'rows checked' "$OUT/verify.txt" | tr -s ' ' | sed 's/^ //')); ${V_SEC}s, peak RSS $((V_KB / 1024)) MB"
  echo
  echo "Commands (from the repo root; \`$TALLY\` is a frozen copy of \`target/release/tally\`):"
  echo
  echo '```sh'
  echo "cargo build --release"
  for fmt in "${FORMATS[@]}"; do echo "${GEN_CMD[$fmt]}"; done
  for fmt in "${FORMATS[@]}"; do for w in "${WORKERS[@]}"; do echo "$(run_cmd "$fmt" "$w" 1)   # x$RUNS"; done; done
  [ -z "$FL_CMD" ] || echo "$FL_CMD"
  [ -z "$FL_TINY" ] || echo "head -n 1000 ${INPUT[jsonl]} > $OUT/flink-tiny-in.jsonl; ${FLINK_HEAP:+FLINK_HEAP=$FLINK_HEAP }bash $FLINK_RUN $OUT/flink-tiny-in.jsonl $OUT/flink-tiny.jsonl"
  [ -z "$DK_CMD" ] || echo "$DK_CMD"
  echo "$VERIFY_CMD"
  [ -z "$FL_CMP" ] || echo "python3 scripts/bench/compare_rows.py $OUT/flink.jsonl $(rows_path jsonl "${WORKERS[-1]}")"
  echo '```'
  echo
  echo "Job file (jsonl; the binary one filters \`event = 0\`): \`$(job_path jsonl "${WORKERS[-1]}")\`"
} >"$REPORT"
cat "$REPORT"
log "report saved to $REPORT"
[ "$VERIFY_OK" = yes ] || exit 1
