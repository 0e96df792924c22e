#!/usr/bin/env bash
# bench/proxy/instructions.sh: user-space instructions per request of a drover binary on
# the fast path, counted by valgrind's callgrind under the wrk load of bench/proxy.sh
# (1 worker, 3 backends). Unlike CPU time on a shared VM, the count barely moves between
# runs (±1 %), so it judges a change to the request path that is too small to see in
# req/CPU-s; it says nothing of kernel time, which is most of a request's cost.
#
# Counters are zeroed after a 3 s warm-up and dumped after the measured run, so start-up
# is not counted. Under valgrind the proxy is ~50x slower and wrk drives it far below
# its normal rate, so per-tick costs (one epoll_wait per batch) weigh a little more.
#
# Usage: DROVER_BIN=target/release/drover bench/proxy/instructions.sh [OUT]
#   prints "requests=N instructions=M per_request=M/N" and the functions that cost the
#   most per request (self cost); OUT (default: a temp file) keeps the callgrind data for
#   callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=bench/proxy/lib.sh
source "$ROOT/bench/proxy/lib.sh"

: "${DROVER_BIN:=${CARGO_TARGET_DIR:-target}/release/drover}" "${BENCH_CONNS:=50}" "${BENCH_THREADS:=2}"
: "${INSTRUCTIONS_SECONDS:=10}"
for tool in wrk curl valgrind callgrind_control callgrind_annotate; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x $DROVER_BIN ]] || die "no drover binary at $DROVER_BIN"

WORK=$(mktemp -d /tmp/bench-proxy.XXXXXX)
trap cleanup EXIT INT TERM
OUT=${1:-$WORK/callgrind.out}
ulimit -n 20000 2>/dev/null || true
check_ports
start_backends

# start_drover runs "$DROVER"; here that is valgrind wrapped around the binary.
cat >"$WORK/under-callgrind" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.out --dump-instr=no "$(realpath "$DROVER_BIN")" "\$@"
EOF
chmod +x "$WORK/under-callgrind"
DROVER="$WORK/under-callgrind"
start_drover 1
for _ in $(seq 150); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PROXY_PORT/" 2>/dev/null && break
    sleep 0.2
done
run_wrk 3 "$WORK/warm.txt" || die "warm-up failed: $(tail -3 "$WORK/warm.txt")"
VG_PID=$(pgrep -f "callgrind-out-file=$WORK/cg.out" | head -1)
[[ -n $VG_PID ]] || die "valgrind is not running: $(tail -5 "$PROXY_LOG")"
callgrind_control -z "$VG_PID" >/dev/null 2>&1
run_wrk "$INSTRUCTIONS_SECONDS" "$WORK/run.txt" || die "wrk failed: $(tail -3 "$WORK/run.txt")"
callgrind_control -d "$VG_PID" >/dev/null 2>&1
sleep 1
stop_proxy
parse_wrk "$WORK/run.txt"
dump=$(find "$WORK" -name 'cg.out*' -newer "$WORK/warm.txt" -size +0 | sort | tail -1)
[[ -n $dump ]] || die "no callgrind dump"
[[ $dump == "$OUT" ]] || cp "$dump" "$OUT"
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
awk -v i="$total" -v r="$W_REQS" 'BEGIN {printf "requests=%d instructions=%d per_request=%.0f\n", r, i, i / r}'
echo "self instructions per request, top 25:"
# Lines are "1,234 (5.67%)  file:function [object]"; the runtime's outer frames are left out.
callgrind_annotate --threshold=100 "$OUT" 2>/dev/null | sed -n '/file:function/,$p' | awk -v r="$W_REQS" '
    $1 ~ /^[0-9,]+$/ {
        n = $1; gsub(",", "", n)
        line = $0; sub(/^ *[0-9,]+ +\([^)]*\) +/, "", line); sub(/ \[[^]]*\]$/, "", line)
        if (line !~ /block_on|thread_start|call_once|clone\.S|start_thread|backtrace/) printf "%7.0f %s\n", n / r, line
    }' | head -25
