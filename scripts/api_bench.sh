#!/usr/bin/env bash
# API latency of `tally serve` at a fixed request rate, idle and while it
# ingests a TCP stream, in the same run.
#
#   scripts/api_bench.sh [--rate 1000] [--ingest 400000] [--seconds 15] [--devices 1000000]
#                        [--client-cc NAME]
#
# A daemon (page_uv over a TCP source, 2 workers) first takes 1M events
# (event time: the last two minutes) so the API has keys; then
# scripts/api_latency.py sends --rate /api/v1/latest requests a second for
# --seconds over 4 keep-alive connections, once with no input arriving and
# once while `tally gen --rate --ingest` streams on 8 connections (congestion
# control cubic unless --client-cc names another, `default` the kernel's: see
# scripts/tcp_bench.sh). Prints a markdown report (data/api-bench/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=1000 INGEST=400000 SECS=15 DEVICES=1000000 CLIENT_CC=cubic
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --ingest) INGEST=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --devices) DEVICES=$2; shift 2 ;;
        --client-cc) CLIENT_CC=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
CLIENT_CC=$(client_cc "$CLIENT_CC") || exit 2

# TALLY=path: measure that binary instead of building target/release/tally.
if [ -z "${TALLY:-}" ]; then
    cargo build --release --quiet
    TALLY=target/release/tally
fi
DIR=data/api-bench
mkdir -p "$DIR"
PORT=$(free_port) HTTP=$(free_port)
live_tcp_job "$DIR"
$TALLY serve --job "$DIR/job.toml" --workers 2 >/dev/null 2>"$DIR/serve.log" &
serve=$!
trap 'kill -TERM $serve 2>/dev/null || true' EXIT
wait_ready
# The last two minutes: a minute's end lies at least 60 s before the last
# event, so the watermark (5 s behind it) closes one and rows exist. (Over
# one minute, a run started in a minute's first 5 s closed none and this
# script waited for rows forever.)
now=$(date +%s%3N)
$TALLY gen --events 1000000 --devices "$DEVICES" --start-ms $((now - 120000)) --duration 120s --disorder 1s \
    --late-fraction 0 --to "tcp://127.0.0.1:$PORT" --tcp-congestion "$CLIENT_CC" 2>/dev/null
for _ in $(seq 1 300); do
    [ "$(metric tally_rows_total)" != "0" ] && break
    sleep 0.2
done
if [ "$(metric tally_rows_total)" = "0" ]; then
    echo "api_bench: no rows 60 s after the first events (see $DIR/serve.log)" >&2
    exit 1
fi
sleep 3

idle=$(python3 scripts/api_latency.py "$HTTP" page_uv "$RATE" "$SECS")
before=$(metric 'tally_events_total{source="client"}')
now=$(date +%s%3N)
$TALLY gen --events $((INGEST * (SECS + 4))) --devices "$DEVICES" --start-ms "$now" --duration "$((SECS + 4))s" \
    --disorder 1s --late-fraction 0 --to "tcp://127.0.0.1:$PORT" --connections 8 --rate "$INGEST" --tcp-congestion "$CLIENT_CC" 2>/dev/null &
gen=$!
sleep 2
busy=$(python3 scripts/api_latency.py "$HTTP" page_uv "$RATE" "$SECS")
after=$(metric 'tally_events_total{source="client"}')
delay=$(metric tally_data_delay_seconds)
wait $gen
row() { python3 -c "import json,sys; r=json.loads(sys.argv[2]); print(f\"| {sys.argv[1]} | {r['requests']} | {r['errors']} | {r['rate']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} |\")" "$1" "$2"; }
{
    echo "# API latency ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD))"
    echo
    echo "$(nproc) cores; load after: $(cut -d' ' -f1-3 /proc/loadavg). $RATE requests/s of /api/v1/latest over 4 keep-alive connections for $SECS s; ingest: \`tally gen --rate $INGEST --connections 8 --tcp-congestion $CLIENT_CC\` into a TCP source on the same machine."
    echo
    echo "| phase | requests | errors | requests/s | p50 ms | p90 ms | p99 ms | max ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    row "idle" "$idle"
    row "while ingesting" "$busy"
    echo
    echo "Ingested while measuring: $(python3 -c "print(round(($after - $before) / $SECS))") events/s; data delay at the end of it: ${delay} s."
} | tee "$DIR/report.md"
