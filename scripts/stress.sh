#!/usr/bin/env bash
# Finds the highest rate at which `tally serve` keeps up: the data delay
# (now - job watermark, /metrics tally_data_delay_seconds) stays flat.
#
#   scripts/stress.sh [--rates "200000 400000 800000"] [--seconds 20] [--connections 8]
#                     [--devices 1000000] [--shape flat|peak] [--client-cc NAME]
#
# Per rate R: a fresh daemon (page_uv over a TCP source, max_out_of_orderness
# 5s, 2 workers); `tally gen --to tcp://… --rate R --start-ms NOW` streams
# R x SECONDS events whose event time is the wall clock (with --shape peak,
# R is the average and the peak runs about six times faster); the delay is
# sampled every second. Flat: over the second half of the run it grows by
# less than 0.5 s. The generator runs on the same machine and takes its share
# of the cores. The daemon's CPU is counted while the generator runs, in
# cores (a daemon below its limit should use about rate / capacity of them).
# The generator's connections use cubic unless --client-cc names another
# congestion control (`default`: the kernel's), for the reason given in
# scripts/tcp_bench.sh. Prints a markdown report (data/stress/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."

RATES="100000 200000 400000 800000 1600000" SECONDS_PER_RATE=20 CONNECTIONS=8 DEVICES=1000000 SHAPE=flat CLIENT_CC=cubic
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) RATES=$2; shift 2 ;;
        --seconds) SECONDS_PER_RATE=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --devices) DEVICES=$2; shift 2 ;;
        --shape) SHAPE=$2; shift 2 ;;
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
DIR=data/stress
mkdir -p "$DIR"

report=$DIR/report.md
{
    echo "# tally serve under a stream at a given rate ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD))"
    echo
    echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2/1048576 }' /proc/meminfo); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "$CONNECTIONS connections, $SECONDS_PER_RATE s per rate, $DEVICES devices, shape $SHAPE; generator on the same machine, congestion control $CLIENT_CC"
    echo
    echo "| rate events/s | events | delay at 1/2 s | delay at end s | growth over 2nd half s | flat | events/s taken | daemon CPU cores | RSS MB |"
    echo "|---:|---:|---:|---:|---:|---|---:|---:|---:|"
} > "$report"
best=0
for R in $RATES; do
    PORT=$(free_port) HTTP=$(free_port)
    live_tcp_job "$DIR"
    $TALLY serve --job "$DIR/job.toml" --workers 2 >/dev/null 2>"$DIR/serve.log" &
    serve=$!
    wait_ready
    events=$((R * SECONDS_PER_RATE))
    now_ms=$(date +%s%3N)
    cpu0=$(cpu_ticks $serve)
    $TALLY gen --events "$events" --devices "$DEVICES" --start-ms "$now_ms" --duration "${SECONDS_PER_RATE}s" \
        --shape "$SHAPE" --disorder 1s --late-fraction 0 --to "tcp://127.0.0.1:$PORT" \
        --connections "$CONNECTIONS" --rate "$R" --tcp-congestion "$CLIENT_CC" 2>"$DIR/gen.log" &
    gen=$!
    delays=()
    for _ in $(seq 1 "$SECONDS_PER_RATE"); do
        sleep 1
        delays+=("$(metric tally_data_delay_seconds)")
    done
    wait $gen || true
    cpu1=$(cpu_ticks $serve)
    taken=$(metric 'tally_events_total{source="client"}')
    rss=$(awk '/VmRSS/ { printf "%.0f", $2/1024 }' "/proc/$serve/status")
    kill -TERM $serve; wait $serve || true
    half=$((SECONDS_PER_RATE / 2))
    read -r mid end growth flat < <(python3 - "$half" "${delays[@]}" <<'PY'
import sys
half = int(sys.argv[1]); d = [float(x) if x else float("nan") for x in sys.argv[2:]]
second = [x for x in d[half:] if x == x]
grow = second[-1] - second[0] if second else float("nan")
print(f"{d[half-1]:.1f} {d[-1]:.1f} {grow:.1f} {'yes' if second and grow < 0.5 else 'no'}")
PY
)
    rate_taken=$(python3 -c "print(round(${taken:-0} / $SECONDS_PER_RATE))")
    # The daemon's CPU while the generator ran (its span: the rate's seconds
    # or, when the generator falls behind, longer), over those seconds.
    cores=$(python3 -c "print(f'{($cpu1 - $cpu0) / $(getconf CLK_TCK) / $SECONDS_PER_RATE:.2f}')")
    echo "| $R | $events | $mid | $end | $growth | $flat | $rate_taken | $cores | $rss |" >> "$report"
    if [ "$flat" = yes ]; then best=$R; fi
done
{
    echo
    echo "Highest rate with a flat delay: **$best events/s**."
    echo "Load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Commands: \`$TALLY serve --job $DIR/job.toml --workers 2\` fed by \`$TALLY gen --events R*S --start-ms NOW --duration Ss --shape $SHAPE --disorder 1s --late-fraction 0 --to tcp://… --connections $CONNECTIONS --rate R --tcp-congestion $CLIENT_CC\` (scripts/stress.sh)."
} >> "$report"
cat "$report"
