#!/usr/bin/env bash
# bench/failover: PostgreSQL failover under a write load, drover vs Patroni (issue #6).
# The same PostgreSQL 15 topology for each (a primary and two streaming replicas on
# loopback ports under a temp dir, synchronous mode) and the same workload: a writer
# inserting increasing ids through the write endpoint (HAProxy for Patroni, drover proxy
# for drover), one psql connection per statement, recording every acknowledged id; after
# 5-15 s (BENCH_KILL_AT + jitter) the primary's PostgreSQL is killed with kill -9 (the
# postmaster and all its processes at once, as a crash would), alone ("pg") or together
# with the process managing it on that node ("pg+mgr": its patroni, or its drover agent).
#
# Printed for each run: seconds without acknowledged writes (last acknowledged write
# before the kill -> next one; also first failed write after the kill -> next
# acknowledged write, and kill -> next acknowledged write), acknowledged
# writes lost (acknowledged ids missing on the primary behind the write endpoint after
# the run), which member is primary then, and which members accept writes. Not a test:
# it exits non-zero only when something could not be run, never on a missed target.
#
#   Patroni (Debian's patroni, single-node etcd from etcd-server) + HAProxy checking
#     Patroni's REST `GET /primary`: profile "default" (ttl 30, loop_wait 10,
#     retry_timeout 10; HAProxy inter 3s fall 3 rise 2 as in Patroni's docs) and
#     "tuned" (ttl 10, loop_wait 2, retry_timeout 3; HAProxy inter 1s fall 2 rise 1).
#     See bench/failover/patroni.sh.
#   drover (server + an agent with [postgres] beside each member + drover proxy, release
#     build): profile "default" (drover's default timings: dead_grace_ms 3000) and
#     "tuned" (the end-to-end test's: dead_grace_ms 2000, probes every 200 ms).
#     See bench/failover/drover.sh.
#
# Usage: bench/failover.sh          (from anywhere; installs what is missing with apt-get,
#                                   builds target/release/drover first)
# Settings (environment):
#   DROVER_BIN=path          use this drover binary instead of building
#                            (DROVER_DESC="..." says what it is in the output)
#   BENCH_ONLY="patroni drover"  systems; BENCH_PROFILES="default tuned"
#   BENCH_KILLS="pg pg+mgr"  what is killed; BENCH_REPEAT=1 runs of each combination;
#                            "freeze" (not run by default): SIGSTOP instead of kill -9 of
#                            postgres and its manager, a node that hangs or loses power
#                            with no TCP reset, so peers see silence rather than a close
#   BENCH_KILL_AT=5 BENCH_KILL_JITTER=10   the kill comes after KILL_AT + a random
#                            0..JITTER seconds of writes, so repeated runs land at
#                            different phases of Patroni's loop_wait
#   BENCH_MAX_OUTAGE=90      longest wait for writes to come back after the kill
#   BENCH_AFTER=3            seconds of writes kept after they came back
#   BENCH_DEADLINE=3600      the whole script is stopped (and cleaned up) after this
#   BENCH_PORT_BASE=28300    PostgreSQL BASE..+2, Patroni REST +10..+12, etcd +20/+21,
#                            write endpoint +30, drover server +40
#   BENCH_WAL_RECEIVER_TIMEOUT=5s  set PostgreSQL's wal_receiver_timeout on every member
#                            (both systems; default: PostgreSQL's own, 60 s)
#   BENCH_MAX_IDLE_WAIT=900  longest wait, before each run, for other builds (rustc) to end
#   BENCH_KEEP=1             keep the temp dir (configs, logs, the writer's records)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=bench/failover/lib.sh
source "$ROOT/bench/failover/lib.sh"
# shellcheck source=bench/failover/patroni.sh
source "$ROOT/bench/failover/patroni.sh"
# shellcheck source=bench/failover/drover.sh
source "$ROOT/bench/failover/drover.sh"

: "${BENCH_ONLY:=patroni drover}" "${BENCH_PROFILES:=default tuned}" "${BENCH_KILLS:=pg pg+mgr}"
: "${BENCH_REPEAT:=1}" "${BENCH_KILL_AT:=5}" "${BENCH_KILL_JITTER:=10}" "${BENCH_MAX_OUTAGE:=90}" "${BENCH_AFTER:=3}"
: "${BENCH_DEADLINE:=3600}" "${BENCH_PORT_BASE:=28300}"
PORT_BASE=$BENCH_PORT_BASE

# Debian packages the bench drives, installed when missing (as scripts/test.sh does).
need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
[[ -x $PG_BIN/postgres ]] || need_pkgs+=(postgresql-15)
have psql || need_pkgs+=(postgresql-client-15)
[[ -x $HAPROXY ]] || need_pkgs+=(haproxy)
[[ $BENCH_ONLY != *patroni* ]] || have patroni || need_pkgs+=(patroni)
[[ $BENCH_ONLY != *patroni* ]] || have etcd || need_pkgs+=(etcd-server)
have jq || need_pkgs+=(jq)
have curl || need_pkgs+=(curl)
have ss || need_pkgs+=(iproute2)
have setpriv || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]} > 0)); then
    log "installing: ${need_pkgs[*]}"
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    timeout 600 $SUDO apt-get update -qq
    # policy-rc.d (containers) keeps the packages' own etcd/patroni services from starting;
    # on a machine with systemd, `systemctl disable --now etcd patroni` after the install.
    DEBIAN_FRONTEND=noninteractive timeout 900 $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

if [[ -z ${DROVER_BIN:-} && $BENCH_ONLY == *drover* ]]; then
    log "building drover (release)"
    timeout 3600 cargo build --release -p drover --locked || die "cargo build --release -p drover failed"
    DROVER_BIN=${CARGO_TARGET_DIR:-target}/release/drover
    DROVER_DESC="drover $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    git diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || DROVER_DESC+=" with uncommitted changes"
elif [[ -n ${DROVER_BIN:-} ]]; then
    : "${DROVER_DESC:=drover binary $DROVER_BIN}"
fi

WORK=$(mktemp -d /tmp/bench-failover.XXXXXX)
chmod 755 "$WORK"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
if [[ $BENCH_ONLY == *drover* ]]; then
    [[ -x $DROVER_BIN ]] || die "no drover binary at $DROVER_BIN"
    # A private copy, so a concurrent build cannot replace the binary halfway through.
    DROVER="$WORK/drover-bin"
    cp "$DROVER_BIN" "$DROVER"
fi
# The whole bench is bounded: after BENCH_DEADLINE seconds this shell gets SIGTERM and
# its trap kills everything. The watchdog itself is killed by cleanup.
(
    sleep "$BENCH_DEADLINE"
    log "BENCH_DEADLINE ($BENCH_DEADLINE s) reached: stopping"
    kill -TERM $$
) </dev/null >/dev/null 2>&1 &
WATCHDOG=$! # not in PIDS (a run's teardown kills those); cleanup kills it
disown "$WATCHDOG"

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

member_of_port() {
    local i
    for i in 0 1 2; do [[ ${PG_PORT[$i]} == "$1" ]] && echo "pg$i"; done
    return 0
}

# One run: build SYSTEM with PROFILE, write, kill, measure; appends a row to RESULTS.
run_one() {
    local sys=$1 profile=$2 kill=$3 rep=$4 run w port new writable="" i r lost busy=""
    run="$WORK/$sys-$profile-${kill/+/-}-$rep"
    w="$run/writer"
    wait_idle
    log "== $sys $profile, kill $kill, run $rep: setting up"
    "${sys}_setup" "$profile" "$run"
    psql_at "$WRITE_PORT" "CREATE TABLE t (id bigint PRIMARY KEY)" >/dev/null || die "CREATE TABLE through the write endpoint"
    start_writer "$WRITE_PORT" "$w"
    # The kill lands at a random phase of Patroni's loop (and of drover's probes).
    sleep "$(awk -v a="$BENCH_KILL_AT" -v j="$BENCH_KILL_JITTER" -v r="$RANDOM" 'BEGIN {printf "%.1f", a + j * r / 32767}')"
    poll 20 bash -c "[[ \$(wc -l <'$w/acked' 2>/dev/null || echo 0) -ge 20 ]]" ||
        die "writes are not flowing through the write endpoint: $(tail -3 "$w/errors" 2>/dev/null)"
    pgrep -x rustc >/dev/null && busy="rustc running"
    "${sys}_kill" "$kill" "$run"
    log "killed $KILLED ($kill) after $(acks "$w") acknowledged writes; waiting for writes"
    if ! poll "$BENCH_MAX_OUTAGE" resumed "$w" "$KILL_TIME"; then
        log "no write acknowledged within $BENCH_MAX_OUTAGE s of the kill"
    fi
    sleep "$BENCH_AFTER"
    poll 10 bash -c "[[ \$(awk -v t=$KILL_TIME '\$3 > t {n++} END {print n + 0}' '$w/acked') -ge 10 ]]" || true
    [[ -z $busy ]] && pgrep -x rustc >/dev/null && busy="rustc running"
    stop_writer "$w"
    # Where the write endpoint leads now, and what that primary holds.
    port=$(psql_at "$WRITE_PORT" "SELECT inet_server_port()" || true)
    new=$(member_of_port "$port")
    for i in 0 1 2; do
        [[ $(psql_at "${PG_PORT[$i]}" "SELECT pg_is_in_recovery()" || true) == f ]] && writable+="${writable:+,}pg$i"
    done
    if [[ -n $new ]] && psql_at "$WRITE_PORT" "SELECT id FROM t" >"$run/stored"; then
        read -r lost lost_list < <(lost_ids "$w" "$run/stored")
        [[ $lost == 0 ]] || lost="$lost ($lost_list...)"
    else
        lost="n/a (endpoint down)"
        new=${new:-none}
    fi
    read -r gap k2a window nfail nack < <(analyze "$w" "$KILL_TIME")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$profile" "$kill" "$rep" "$KILLED" "$new" \
        "$gap" "$k2a" "$window" "$nfail" "$nack" "$lost" "${writable:-none}" "${busy:--}" >>"$RESULTS"
    log "$sys $profile kill $kill: killed $KILLED, primary now $new, no acked write for $window s (first failure -> ack $gap s, kill -> ack $k2a s), lost $lost, writable ${writable:-none}"
    kill_everything_under "$run"
    [[ -n ${BENCH_KEEP:-} ]] || rm -rf "$run" # ~300 MB a run (data dirs, WAL, etcd)
}

for sys in $BENCH_ONLY; do
    for profile in $BENCH_PROFILES; do
        for kill in $BENCH_KILLS; do
            for rep in $(seq "$BENCH_REPEAT"); do run_one "$sys" "$profile" "$kill" "$rep"; done
        done
    done
done

desc_kill() {
    case $1-$2 in
        patroni-pg) echo "postgres" ;;
        patroni-pg+mgr) echo "postgres + its patroni" ;;
        drover-pg) echo "postgres (agent alive)" ;;
        drover-pg+mgr) echo "postgres + its agent" ;;
        *-freeze) echo "node frozen (SIGSTOP of postgres + $([[ $1 == drover ]] && echo agent || echo patroni))" ;;
    esac
}
desc_profile() {
    case $1-$2 in
        patroni-default) echo "defaults: ttl 30, loop_wait 10, retry_timeout 10; HAProxy inter 3s fall 3 rise 2" ;;
        patroni-tuned) echo "tuned: ttl 10, loop_wait 2, retry_timeout 3; HAProxy inter 1s fall 2 rise 1" ;;
        drover-default) echo "defaults: dead_grace_ms 3000, lease_ttl_ms 1000, probe 500 ms" ;;
        drover-tuned) echo "tuned: dead_grace_ms 2000, lease_ttl_ms 500, probe 200 ms" ;;
    esac
}

echo
echo "bench/failover ($(date -u +%Y-%m-%d), $(nproc) cores; ${DROVER_DESC:-}; kill after ${BENCH_KILL_AT}-$((BENCH_KILL_AT + BENCH_KILL_JITTER)) s of writes${BENCH_WAL_RECEIVER_TIMEOUT:+; wal_receiver_timeout $BENCH_WAL_RECEIVER_TIMEOUT})"
echo
echo "| system | settings | kill -9 of the primary's | run | primary after | no acked write for (s) | first failure → next ack (s) | kill → next ack (s) | failed attempts | acked | acked writes lost | writable at end | note |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
while IFS=$'\t' read -r sys profile kill rep killed new gap k2a window nfail nack lost writable busy; do
    printf '| %s | %s | %s | %s | %s (was %s) | **%s** | %s | %s | %s | %s | %s | %s | %s |\n' "$sys" "$(desc_profile "$sys" "$profile")" \
        "$(desc_kill "$sys" "$kill")" "$rep" "$new" "$killed" "$window" "$gap" "$k2a" "$nfail" "$nack" "$lost" "$writable" "$busy"
done <"$RESULTS"
echo
echo "no acked write for: last write acknowledged before the kill -> next one acknowledged."
echo "first failure: when the client first saw an error after the kill (a connect held by"
echo "the endpoint, e.g. HAProxy's connect retries, makes it late). kill -> next ack: the"
echo "outage as the tests measure it."
