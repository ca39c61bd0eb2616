# Helpers the serve benches share (source it; $HTTP is the daemon's API port).

# A TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The value of one /metrics sample, by its exact `name{labels}`.
metric() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# Waits until /readyz answers 200.
wait_ready() { until curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1; do sleep 0.05; done; }

# User + system CPU ticks of a process, and its resident memory in kB.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

# The congestion control a bench's clients use: NAME, or the kernel's for
# `default`; exits if this kernel lacks it.
client_cc() {
    local cc=$1 avail=/proc/sys/net/ipv4/tcp_available_congestion_control
    if [ "$cc" = default ]; then cc=$(cat /proc/sys/net/ipv4/tcp_congestion_control); fi
    if ! grep -qw "$cc" "$avail"; then
        echo "congestion control $cc is not available here: $(cat "$avail")" >&2
        exit 2
    fi
    echo "$cc"
}

# Writes DIR/job.toml for the live benches: page_uv over a TCP source on
# 127.0.0.1:$PORT (5 s out-of-orderness, 2 s idle timeout), rows to
# DIR/out.jsonl, the API on 127.0.0.1:$HTTP.
live_tcp_job() {
    cat > "$1/job.toml" <<EOF
[job]
timezone = "+08:00"
[[source]]
name = "client"
kind = "tcp"
listen = "127.0.0.1:$PORT"
max_out_of_orderness = "5s"
idle_timeout = "2s"
[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
measures = ["pv", "uv"]
[[sink]]
kind = "jsonl"
path = "$(realpath "$1")/out.jsonl"
[serve]
http = "127.0.0.1:$HTTP"
EOF
}
