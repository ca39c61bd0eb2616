#!/usr/bin/env bash
# TCP ingest against file ingest on the same events, in the same run.
#
#   scripts/tcp_bench.sh [--events N] [--devices D] [--connections C] [--runs R] [--idle K]
#                        [--client-cc NAME]
#
# Generates N JSON-lines events once (data/tcp-bench-N-D/), then per round:
#   file: `tally run` of page_uv over the file, 2 workers (its summary's seconds);
#   tcp:  `tally serve` of the same job with a TCP source, 2 workers; C client
#         processes send the file's lines (dealt round-robin into C parts, so
#         every client spans the whole time range, as live producers do) with
#         sendfile(2); timed from the first byte sent until /metrics counts
#         every event (tally_events_total).
#
# The clients' congestion control is `cubic` unless --client-cc names
# another (`default`: the kernel's, net.ipv4.tcp_congestion_control). The
# clients stand in for producers on other hosts, whose congestion control
# runs on their own CPUs; on loopback a pacing one such as BBR (the
# default of the VMs tally is measured on) fires its timers and softirqs
# on the two cores being measured, for a bandwidth model loopback does
# not need: here 0.3 CPU s more of the daemon's per round, and TCP / file
# 0.62 against 0.97 (PERF.md).
# Then the memory of K idle connections: the daemon's RSS with K clients
# connected and silent, minus its RSS before they connected.
# Prints a markdown report and saves it as data/tcp-bench-N-D/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=10000000 DEVICES=1000000 CONNECTIONS=8 RUNS=3 IDLE=1000 CLIENT_CC=cubic
while [ $# -gt 0 ]; do
    case "$1" in
        --events) EVENTS=$2; shift 2 ;;
        --devices) DEVICES=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --client-cc) CLIENT_CC=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CLIENT_CC=$(client_cc "$CLIENT_CC") || exit 2
export CLIENT_CC

# TALLY=path: measure that binary (e.g. a copy of an older build) instead
# of building target/release/tally.
if [ -z "${TALLY:-}" ]; then
    cargo build --release --quiet
    TALLY=target/release/tally
fi
DIR=data/tcp-bench-$EVENTS-$DEVICES
mkdir -p "$DIR"
if [ ! -f "$DIR/events/events.jsonl" ]; then
    $TALLY gen --events "$EVENTS" --devices "$DEVICES" --out "$DIR/events"
fi
INPUT=$DIR/events/events.jsonl
# Round-robin, line by line: contiguous parts would put 1/C of the file's
# time span between one connection and the next, and the source's watermark
# (the slowest connection's) would then hold every window of the later
# parts open to the end, which is not what ingest costs.
PARTS=$DIR/parts-rr
if [ ! -f "$PARTS/part-$CONNECTIONS-0" ]; then
    mkdir -p "$PARTS"
    split -n "r/$CONNECTIONS" -d -a 1 "$INPUT" "$PARTS/part-$CONNECTIONS-"
fi

PORT=$(free_port) HTTP=$(free_port)

metric_block='
[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
measures = ["pv", "uv"]
'
cat > "$DIR/file.toml" <<EOF
[job]
timezone = "+08:00"
[[source]]
name = "client"
kind = "file"
path = "$(realpath "$INPUT")"
max_out_of_orderness = "5m"
$metric_block
[[sink]]
kind = "jsonl"
path = "$(realpath "$DIR")/file-out.jsonl"
EOF
cat > "$DIR/tcp.toml" <<EOF
[job]
timezone = "+08:00"
[[source]]
name = "client"
kind = "tcp"
listen = "127.0.0.1:$PORT"
max_out_of_orderness = "5m"
$metric_block
[[sink]]
kind = "jsonl"
path = "$(realpath "$DIR")/tcp-out.jsonl"
[serve]
http = "127.0.0.1:$HTTP"
EOF

# Sends the parts on one connection each (sendfile, $CLIENT_CC) while
# polling /metrics on one keep-alive connection until the daemon counts
# every event, then prints the seconds since the first connect; or with
# --idle K holds K silent connections until stdin closes. (A curl per poll would cost the
# daemon's two cores about as much as the senders do.)
SENDER=$(cat <<'PY'
import http.client, os, socket, sys, threading, time
port = int(sys.argv[1])
if sys.argv[2] == "--idle":
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(int(sys.argv[3]))]
    print("connected", flush=True)
    sys.stdin.read()
    sys.exit(0)
http_port, events = int(sys.argv[2]), int(sys.argv[3])
key = 'tally_events_total{source="client"} '
def send(path):
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, os.environ["CLIENT_CC"].encode())
    s.connect(("127.0.0.1", port))
    with s, open(path, "rb") as f:
        s.sendfile(f)
api = http.client.HTTPConnection("127.0.0.1", http_port)
threads = [threading.Thread(target=send, args=(p,)) for p in sys.argv[4:]]
t0 = time.monotonic()
for t in threads: t.start()
while True:
    api.request("GET", "/metrics")
    lines = api.getresponse().read().decode().splitlines()
    if next(int(l[len(key):]) for l in lines if l.startswith(key)) >= events:
        break
    time.sleep(0.01)
seconds = time.monotonic() - t0
for t in threads: t.join()
print(f"{seconds:.4f}")
PY
)


events=$($TALLY run --job "$DIR/file.toml" --workers 2 --summary "$DIR/s.json" 2>/dev/null >/dev/null; python3 -c "import json; print(json.load(open('$DIR/s.json'))['events'])")
report=$DIR/report.md
{
    echo "# TCP vs file ingest ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD))"
    echo
    echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2/1048576 }' /proc/meminfo); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "Input: $INPUT ($events events, $(du -h "$INPUT" | cut -f1)); TCP: $CONNECTIONS connections, clients' congestion control $CLIENT_CC (kernel default $(cat /proc/sys/net/ipv4/tcp_congestion_control))"
    echo
    echo "| round | file M events/s | tcp M events/s | tcp / file | file run CPU s | tcp daemon CPU s | senders CPU s |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
} > "$report"
# Both runs start from the same memory state. On these VMs memory a process
# frees goes back to the host (virtio-balloon free page reporting) ~2 s
# later, and touching it again costs a host fault per page: a run started
# right after another exited got its memory back warm (the kernel zeroing
# new tables: 0.5-1.6% of a file run's samples) and one started 4 s later
# cold (13.5-15.8%, the run 35% slower). The file run used to follow the
# previous daemon's exit at once, while the daemon's tables came a second
# or more after the file run's exit: TCP paid the cold memory, the file run
# mostly did not. Each run now waits MEMORY_SETTLE seconds first.
MEMORY_SETTLE=4
for round in $(seq 1 "$RUNS"); do
    sleep $MEMORY_SETTLE
    /usr/bin/time -f "%U %S" -o "$DIR/file-cpu" $TALLY run --job "$DIR/file.toml" --workers 2 --summary "$DIR/s.json" >/dev/null 2>&1
    file_rate=$(python3 -c "import json; s=json.load(open('$DIR/s.json')); print(s['events']/s['seconds']/1e6)")
    file_cpu=$(awk '{ print $1 + $2 }' "$DIR/file-cpu")

    sleep $MEMORY_SETTLE
    $TALLY serve --job "$DIR/tcp.toml" --workers 2 >/dev/null 2>"$DIR/serve.log" &
    serve=$!
    wait_ready
    cpu0=$(cpu_ticks $serve)
    seconds=$(/usr/bin/time -f "%U %S" -o "$DIR/sender-cpu" python3 -c "$SENDER" "$PORT" "$HTTP" "$events" "$PARTS"/part-"$CONNECTIONS"-*)
    cpu1=$(cpu_ticks $serve)
    tcp_cpu=$(python3 -c "print(($cpu1 - $cpu0) / $(getconf CLK_TCK))")
    sender_cpu=$(awk '{ print $1 + $2 }' "$DIR/sender-cpu")
    kill -TERM $serve; wait $serve || true
    tcp_rate=$(python3 -c "print($events/$seconds/1e6)")
    printf '| %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n' "$round" "$file_rate" "$tcp_rate" \
        "$(python3 -c "print($tcp_rate/$file_rate)")" "$file_cpu" "$tcp_cpu" "$sender_cpu" >> "$report"
done

# Memory per idle connection.
idle_line="Idle connections: not measured (--idle 0)."
if [ "$IDLE" -gt 0 ]; then
    $TALLY serve --job "$DIR/tcp.toml" --workers 2 >/dev/null 2>"$DIR/serve.log" &
    serve=$!
    wait_ready
    sleep 0.5
    before=$(rss_kb $serve)
    coproc IDLE_CLIENTS { python3 -c "$SENDER" "$PORT" --idle "$IDLE"; }
    read -r _ <&"${IDLE_CLIENTS[0]}"
    until [ "$(metric 'tally_tcp_connections{source="client"}')" = "$IDLE" ]; do sleep 0.05; done
    sleep 0.5
    after=$(rss_kb $serve)
    eval "exec ${IDLE_CLIENTS[1]}>&-"
    wait "$IDLE_CLIENTS_PID" || true
    kill -TERM $serve; wait $serve || true
    idle_line="Idle connections: RSS $before kB with none, $after kB with $IDLE: $(( (after - before) * 1024 / IDLE )) bytes each."
fi
{
    echo
    echo "$idle_line"
    echo "Load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Commands: \`$TALLY run --job $DIR/file.toml --workers 2\`; \`$TALLY serve --job $DIR/tcp.toml --workers 2\` fed by $CONNECTIONS sendfile(2) clients, congestion control $CLIENT_CC (scripts/tcp_bench.sh --client-cc $CLIENT_CC)."
} >> "$report"
cat "$report"
