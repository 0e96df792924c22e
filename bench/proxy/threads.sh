#!/usr/bin/env bash
# bench/proxy/threads.sh: per thread of each proxy, user and system CPU per request and
# voluntary / involuntary context switches per request, under the 1-worker load of
# bench/proxy.sh (proxy on CPU 0, wrk and backends on CPU 1). Read from
# /proc/PID/task/*/stat and status before and after one wrk run; no tracing, so the
# proxy runs at full speed. Also prints the machine's steal over the run (ticks).
#
# Usage: DROVER_BIN=target/release/drover bench/proxy/threads.sh
#   THREADS_ONLY="nginx drover" (or haproxy), THREADS_SECONDS=10
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=bench/proxy/lib.sh
source "$ROOT/bench/proxy/lib.sh"

: "${DROVER_BIN:=${CARGO_TARGET_DIR:-target}/release/drover}" "${BENCH_CONNS:=50}" "${BENCH_THREADS:=2}"
: "${THREADS_SECONDS:=10}" "${THREADS_ONLY:=nginx drover}"
for tool in wrk curl taskset; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
setup_pinned_run

# One line per thread of every process under $1: "comm voluntary involuntary utime stime".
threads() {
    local p t s
    for p in $(tree_pids "$1"); do
        for t in /proc/"$p"/task/*; do
            s=$(cat "$t/stat" 2>/dev/null) || continue
            s=${s##*) }
            # shellcheck disable=SC2086
            set -- $s
            echo "$p/${t##*/} $(tr ' ' _ <"$t/comm") $(awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v, n}' "$t/status") ${12} ${13}"
        done
    done
}

for p in $THREADS_ONLY; do
    start_proxy "$p" 1
    run_wrk 2 "$WORK/warm.txt" || die "warm-up against $p failed"
    threads "$PROXY_PID" | sort >"$WORK/before"
    s0=$(machine_steal_ticks)
    run_wrk "$THREADS_SECONDS" "$WORK/run.txt" || die "wrk against $p failed"
    s1=$(machine_steal_ticks)
    threads "$PROXY_PID" | sort >"$WORK/after"
    stop_proxy
    parse_wrk "$WORK/run.txt"
    echo "== $p: $W_REQS requests, p99 $W_P99 ms, steal $((s1 - s0)) ticks"
    join "$WORK/before" "$WORK/after" | awk -v r="$W_REQS" -v hz="$CLK_TCK" '{
        dv = $8 - $3; dn = $9 - $4; du = $10 - $5; ds = $11 - $6
        if (dv + dn + du + ds > 0)
            printf "  %-18s user %.2f us  system %.2f us  voluntary switches %.4f  involuntary %.4f  (per request)\n",
                $2, du / hz * 1e6 / r, ds / hz * 1e6 / r, dv / r, dn / r }'
done
