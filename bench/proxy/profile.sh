#!/usr/bin/env bash
# bench/proxy/profile.sh: where each proxy's CPU goes per request, under the same load as
# bench/proxy.sh with 1 worker (proxy on CPU 0, wrk and backends on CPU 1).
#
# For each proxy: `perf stat` (task-clock, context switches, syscalls via the
# raw_syscalls:sys_enter tracepoint, wake-ups of other tasks via sched:sched_waking) over a
# wrk run -> per-request figures; then
# `strace -c -f` for a few seconds -> which syscalls (strace slows the proxy, so only its
# proportions count); then `perf record --call-graph dwarf` -> the hottest
# functions (self time) and the kernel/user split, for each proxy; reports kept in OUTDIR.
#
# Usage: DROVER_BIN=target/release/drover bench/proxy/profile.sh [OUTDIR]
# (no build here: run bench/proxy.sh or cargo build --release -p drover first)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=bench/proxy/lib.sh
source "$ROOT/bench/proxy/lib.sh"

: "${DROVER_BIN:=${CARGO_TARGET_DIR:-target}/release/drover}" "${BENCH_CONNS:=50}" "${BENCH_THREADS:=2}"
: "${PROFILE_SECONDS:=10}" "${PROFILE_ONLY:=nginx haproxy drover}"
OUT=${1:-$(mktemp -d /tmp/bench-proxy-profile.XXXXXX)}
mkdir -p "$OUT"
for tool in wrk curl perf strace taskset; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
setup_pinned_run

declare -A SPLIT CPUREQ MALLOCS
LIBC=$(ldd "$DROVER" | awk '/libc.so.6/ {print $3}')
MALLOC_EVENT=""
if [[ -n $LIBC ]] && timeout 20 perf probe -q -x "$LIBC" --add malloc 2>/dev/null; then
    MALLOC_EVENT=probe_libc:malloc
    remove_probe() { timeout 20 perf probe -q --del probe_libc:malloc 2>/dev/null || true; }
    trap 'rc=$?; remove_probe; (exit $rc); cleanup' EXIT INT TERM
fi
echo "| proxy | req/s | CPU us per request | syscalls per request | context switches per request | wake-ups it causes per request |"
echo "|---|---|---|---|---|---|"
for p in $PROFILE_ONLY; do
    note=$(wait_idle)
    start_proxy "$p" 1
    run_wrk 3 "$WORK/warm.txt" || die "warm-up failed"
    pids=$(tree_pids "$PROXY_PID" | paste -sd,)
    timeout $((PROFILE_SECONDS + 20)) perf stat -e task-clock,context-switches,raw_syscalls:sys_enter,sched:sched_waking -x, \
        -o "$OUT/$p.perfstat" -p "$pids" -- sleep "$PROFILE_SECONDS" &
    stat_pid=$!
    PIDS+=("$stat_pid")
    run_wrk "$PROFILE_SECONDS" "$OUT/$p.wrk.txt" || die "wrk against $p failed"
    reap "$stat_pid"
    parse_wrk "$OUT/$p.wrk.txt"
    awk -F, -v reqs="$W_REQS" -v rps="$W_RPS" -v p="$p" '
        $3 == "task-clock" { cpu_ms = $1 }
        $3 == "context-switches" { cs = $1 }
        $3 == "raw_syscalls:sys_enter" { sc = $1 }
        $3 == "sched:sched_waking" { wk = $1 }
        END { printf "| %s | %.0f | %.1f | %.2f | %.3f | %.2f |\n", p, rps, cpu_ms * 1000 / reqs, sc / reqs, cs / reqs, wk / reqs }' \
        "$OUT/$p.perfstat" | tee "$OUT/$p.row"
    CPUREQ[$p]=$(awk -F'|' '{print $4 + 0}' "$OUT/$p.row")

    # Allocations: a uprobe on glibc's malloc (added once below, removed at exit), counted
    # over a separate run since each hit traps and would inflate the CPU figure above.
    if [[ -n $MALLOC_EVENT ]]; then
        run_wrk 7 "$OUT/$p.malloc-wrk.txt" &
        wrk_pid=$!
        PIDS+=("$wrk_pid")
        sleep 1
        timeout 20 perf stat -e "$MALLOC_EVENT" -x, -o "$OUT/$p.malloc" -p "$(tree_pids "$PROXY_PID" | paste -sd,)" \
            -- sleep 5 || true
        reap "$wrk_pid"
        parse_wrk "$OUT/$p.malloc-wrk.txt"
        MALLOCS[$p]=$(awk -F, -v r="$W_RPS" '$3 ~ /malloc/ { printf "%.1f", $1 / (r * 5) }' "$OUT/$p.malloc")
    fi

    # Which syscalls: strace -c on every thread/process of the proxy, 5 s under load.
    run_wrk 7 "$OUT/$p.strace-wrk.txt" &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    sleep 1
    args=()
    for t in $(tree_pids "$PROXY_PID"); do args+=(-p "$t"); done
    timeout -s INT 5 strace -c -f "${args[@]}" -o "$OUT/$p.strace" || true
    reap "$wrk_pid"
    parse_wrk "$OUT/$p.strace-wrk.txt"
    echo "$W_REQS requests in the 7 s wrk run around strace (5 s of it traced)" >>"$OUT/$p.strace"

    # Where the time goes: perf record (DWARF call graphs) of every process of the proxy.
    run_wrk 8 "$OUT/$p.record-wrk.txt" &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    sleep 1
    pids=$(tree_pids "$PROXY_PID" | paste -sd,)
    timeout 30 perf record -F 999 --call-graph dwarf,32768 -o "$OUT/$p.perf.data" -p "$pids" -- sleep 5 \
        >/dev/null 2>&1 || true
    reap "$wrk_pid"
    timeout 300 perf report -i "$OUT/$p.perf.data" --no-children --stdio --percent-limit 0.5 -g none \
        >"$OUT/$p.perf.self.txt" 2>/dev/null || true
    timeout 300 perf report -i "$OUT/$p.perf.data" --children --stdio --percent-limit 2 -g none \
        >"$OUT/$p.perf.children.txt" 2>/dev/null || true
    timeout 300 perf report -i "$OUT/$p.perf.data" --no-children --stdio --sort dso -g none \
        >"$OUT/$p.perf.dso.txt" 2>/dev/null || true
    SPLIT[$p]=$(awk '$1 ~ /%$/ { v = $1; sub(/%/, "", v); if ($2 ~ /kernel/) k += v; else u += v }
        END { printf "%.0f %.0f", k, u }' "$OUT/$p.perf.dso.txt")
    stop_proxy
    echo "  ($p: $note)" >&2
done
echo
echo "CPU per request split by perf samples (kernel = syscalls and the loopback TCP path they run):"
echo
echo "| proxy | kernel us per request | user us per request | glibc malloc calls per request |"
echo "|---|---|---|---|"
for p in $PROFILE_ONLY; do
    read -r k u <<<"${SPLIT[$p]}"
    awk -v c="${CPUREQ[$p]}" -v k="$k" -v u="$u" -v p="$p" -v m="${MALLOCS[$p]:-n/a}" 'BEGIN {
        t = k + u; if (t == 0) t = 1; printf "| %s | %.1f | %.1f | %s |\n", p, c * k / t, c * u / t, m }'
done
echo
echo "Output (perf stat, strace -c, perf report) in $OUT"
