#!/usr/bin/env bash
# bench/dns: dnsperf against Knot DNS and drover dns serving the same zone file with the
# same UDP worker count (1, then 2); prints queries/s, mean latency and drover/Knot.
# Not a test: it prints figures and exits non-zero only when something could not run.
#
# Usage: bench/dns.sh               (from anywhere; builds target/release/drover first)
# Settings (environment):
#   DROVER_BIN=path        use this drover binary instead of building
#   BENCH_SECONDS=10       length of each dnsperf run
#   BENCH_WORKERS="1 2"    UDP workers: knotd `udp-workers`, drover `udp_workers`
#   BENCH_CLIENTS=4        dnsperf -c (source ports, so SO_REUSEPORT spreads them)
#   BENCH_OUTSTANDING=200  dnsperf -q
#   BENCH_PORT=28353       port both servers use in turn
#   BENCH_MAX_IDLE_WAIT=1800   longest wait for other builds (rustc) and other load to finish
#   BENCH_MAX_BUSY=10      a run starts only when the CPUs were busier than this (percent) in
#                          none of the 3 s before it (other work on a 2-core box skews the ratio)
#   BENCH_KEEP=1           keep the temp dir (configs, logs, raw dnsperf output)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
: "${BENCH_SECONDS:=10}" "${BENCH_WORKERS:=1 2}" "${BENCH_CLIENTS:=4}" "${BENCH_OUTSTANDING:=200}"
: "${BENCH_PORT:=28353}" "${BENCH_MAX_IDLE_WAIT:=1800}" "${BENCH_MAX_BUSY:=10}"

log() { printf '[bench/dns] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in dnsperf knotd kdig; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

if [[ -z ${DROVER_BIN:-} ]]; then
    log "building drover (release)"
    timeout 3600 cargo build --release -p drover --locked || die "cargo build --release -p drover failed"
    DROVER_BIN=${CARGO_TARGET_DIR:-target}/release/drover
fi
[[ -x $DROVER_BIN ]] || die "$DROVER_BIN is not executable"

TMP=$(mktemp -d /tmp/bench-dns.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n ${BENCH_KEEP:-} ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# Percent of CPU time not idle over the next 3 s, from /proc/stat.
cpu_busy() {
    local a b c d e f g t1 i1
    read -r _ a b c d e f g _ < /proc/stat; t1=$((a + b + c + d + e + f + g)); i1=$((d + e))
    sleep 3
    read -r _ a b c d e f g _ < /proc/stat
    echo $(( 100 - 100 * (d + e - i1) / (a + b + c + d + e + f + g - t1) ))
}

wait_idle() {
    local start=$SECONDS logged=
    while (( $(pgrep -c rustc || true) > 0 )) || (( $(cpu_busy) > BENCH_MAX_BUSY )); do
        [[ -z $logged ]] && { log "waiting for other builds (rustc) and load to finish"; logged=1; }
        (( SECONDS - start >= BENCH_MAX_IDLE_WAIT )) && die "machine still busy after ${BENCH_MAX_IDLE_WAIT}s"
        sleep 2
    done
}

# The zone: a few dozen names of the usual types; the query mix asks for existing data.
ZONE=$TMP/bench.test.zone
{
    echo '$TTL 3600'
    echo '@ IN SOA ns1 hostmaster 1 3600 600 604800 30'
    echo '@ IN NS ns1'
    echo 'ns1 IN A 192.0.2.1'
    echo '@ IN MX 10 mail'
    echo 'mail IN A 192.0.2.2'
    echo '@ IN TXT "v=spf1 -all"'
    for i in $(seq 1 50); do
        echo "www$i IN A 192.0.2.$((i + 10))"
        echo "www$i IN AAAA 2001:db8::$i"
    done
} > "$ZONE"
QUERIES=$TMP/queries
{
    for i in $(seq 1 50); do echo "www$i.bench.test A"; echo "www$i.bench.test AAAA"; done
    echo "bench.test MX"; echo "bench.test TXT"; echo "mail.bench.test A"
} > "$QUERIES"

start_knot() {
    local workers=$1 dir=$TMP/knot-$1
    mkdir -p "$dir"
    cp "$ZONE" "$dir/bench.test.zone"
    cat > "$dir/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$BENCH_PORT
    rundir: $dir
    udp-workers: $workers
    tcp-workers: 1
    background-workers: 1
control:
    listen: $dir/knot.sock
log:
  - target: stderr
    any: warning
database:
    storage: $dir
template:
  - id: default
    storage: $dir
zone:
  - domain: bench.test
    file: bench.test.zone
EOF
    knotd -c "$dir/knot.conf" 2> "$dir/knot.log" &
    PID=$!
    PIDS+=("$PID")
}

start_drover() {
    local workers=$1 dir=$TMP/drover-$1
    mkdir -p "$dir"
    cp "$ZONE" "$dir/bench.test.zone"
    cat > "$dir/dns.toml" <<EOF
udp_workers = $workers
[[zones]]
origin = "bench.test."
file = "bench.test.zone"
EOF
    "$DROVER_BIN" dns --config "$dir/dns.toml" --listen "127.0.0.1:$BENCH_PORT" > "$dir/out.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
}

wait_answering() {
    for _ in $(seq 1 100); do
        kdig @127.0.0.1 -p "$BENCH_PORT" +time=1 +retry=0 www1.bench.test A 2>/dev/null | grep -q 192.0.2.11 && return 0
        sleep 0.1
    done
    die "server on port $BENCH_PORT did not answer"
}

# Runs dnsperf; prints "QPS LATENCY_MS LOST".
perf() {
    local out=$TMP/dnsperf-$1.txt
    wait_idle
    dnsperf -s 127.0.0.1 -p "$BENCH_PORT" -d "$QUERIES" -l "$BENCH_SECONDS" -c "$BENCH_CLIENTS" \
        -q "$BENCH_OUTSTANDING" > "$out" 2>&1 || die "dnsperf failed: $(tail -3 "$out")"
    local qps lat lost
    qps=$(awk '/Queries per second:/ {print $4}' "$out")
    lat=$(awk '/Average Latency/ {print $4 * 1000}' "$out")
    lost=$(awk '/Queries lost:/ {print $3}' "$out")
    echo "$qps $lat $lost"
}

printf '%-8s %-8s %12s %12s %10s\n' server workers "queries/s" "latency ms" lost
for w in $BENCH_WORKERS; do
    start_knot "$w"; wait_answering
    read -r kq kl kloss < <(perf "knot-$w")
    kill "$PID"; wait "$PID" 2>/dev/null || true
    printf '%-8s %-8s %12s %12s %10s\n' knot "$w" "$kq" "$kl" "$kloss"

    start_drover "$w"; wait_answering
    read -r dq dl dloss < <(perf "drover-$w")
    kill "$PID"; wait "$PID" 2>/dev/null || true
    printf '%-8s %-8s %12s %12s %10s\n' drover "$w" "$dq" "$dl" "$dloss"
    awk -v d="$dq" -v k="$kq" -v w="$w" 'BEGIN { printf "ratio drover/knot with %s worker(s): %.2f\n", w, d / k }'
done
