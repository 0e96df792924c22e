# bench/failover/lib.sh: shared by bench/failover.sh and its helpers (sourced, not run).
#
# Everything listens on 127.0.0.1 and lives in $WORK (a temp dir). Every process started
# here is recorded in PIDS; every PostgreSQL data dir is somewhere under $WORK. cleanup
# (the caller's EXIT/INT/TERM trap) and teardown_run kill all of them by pid: the
# recorded processes with their descendants, and every postmaster named by a
# postmaster.pid under the run's dir with its descendants. Nothing `wait`s on a running
# server; every client command runs under `timeout`.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
PG_OS_USER=postgres
PIDS=()

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# Records a background process for cleanup. disown: no "Killed" job notice when it is
# killed later (bash still reaps it; alive() treats a zombie as gone anyway).
started() {
    PIDS+=("$1")
    disown "$1" 2>/dev/null || true
}

# SIGKILL PID and its descendants at once (deepest first).
kill_tree() {
    local pid=$1 c
    for c in $(tree_pids "$pid" | tac); do
        alive "$c" && kill -KILL "$c" 2>/dev/null || true
    done
    { wait "$pid"; } 2>/dev/null || true
    forget_pid "$pid"
}

# The postmaster pid of a data dir, if its postmaster.pid names a live process.
postmaster_pid() {
    local pid
    pid=$(head -1 "$1/postmaster.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && echo "$pid"
}

# kill -9 of a PostgreSQL server as a machine crash would: the postmaster and every
# process under it at once (killing only the postmaster leaves backends and the
# walsender running, and still streaming, for a while). Returns once all are gone, then
# removes postmaster.pid (a crashed machine comes back without it; left in place it may
# name a zombie that pg_ctl takes for a live postmaster), like drover_db::testing.
kill9_pg() {
    local dir=$1 pm pids=() p i
    pm=$(postmaster_pid "$dir") || return 0
    mapfile -t pids < <(tree_pids "$pm")
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for i in $(seq 150); do
        local any=0
        for p in "${pids[@]}"; do alive "$p" && any=1; done
        ((any == 0)) && break
        sleep 0.02
    done
    rm -f "$dir/postmaster.pid"
}

# SIGSTOP of a PostgreSQL server (postmaster and all its processes): a frozen machine.
# Its sockets stay open, so nobody gets a reset: peers see silence, not a close.
freeze_pg() {
    local pm p
    pm=$(postmaster_pid "$1") || return 0
    for p in $(tree_pids "$pm"); do kill -STOP "$p" 2>/dev/null || true; done
}

# Every postmaster under DIR (any depth) and the recorded processes, with descendants.
kill_everything_under() {
    local root=$1 f pid
    for pid in "${PIDS[@]}"; do kill_tree "$pid"; done
    [[ -n $root && -d $root ]] || return 0
    while IFS= read -r f; do
        pid=$(head -1 "$f" 2>/dev/null) || continue
        [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || continue
        # Only a postgres whose data dir is this one (the pid may have been reused).
        grep -qa -- "$(dirname "$f")" "/proc/$pid/cmdline" 2>/dev/null || grep -qa -- "$(dirname "$f")" "/proc/$pid/environ" 2>/dev/null ||
            [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$(dirname "$f")" ]] || continue
        kill_tree "$pid"
    done < <(find "$root" -name postmaster.pid 2>/dev/null)
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    exec 2>/dev/null # bash's "Killed" notices for the servers stopped below
    kill_everything_under "${WORK:-}"
    [[ -z ${WATCHDOG:-} ]] || kill_tree "$WATCHDOG"
    if [[ -n ${WORK:-} && -d $WORK && -z ${BENCH_KEEP:-} ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# Waits until every port given is free (max 15 s): a previous run's listeners are gone.
wait_ports_free() {
    local p i
    for p in "$@"; do
        for i in $(seq 150); do
            port_free "$p" && break
            sleep 0.1
        done
        port_free "$p" || die "port $p on 127.0.0.1 is in use (set BENCH_PORT_BASE)"
    done
}

# Polls `CMD...` every 0.2 s until it succeeds, at most $1 seconds.
poll() {
    local max=$1 end
    shift
    end=$((SECONDS + max))
    while ((SECONDS < end)); do
        "$@" && return 0
        sleep 0.2
    done
    "$@"
}

# Before a run: no rustc (other engineers' builds) may be running. Waits up to
# BENCH_MAX_IDLE_WAIT seconds (default 900), then runs anyway (the row's note says so).
wait_idle() {
    local waited=0 max=${BENCH_MAX_IDLE_WAIT:-900}
    while pgrep -x rustc >/dev/null; do
        ((waited == 0)) && log "rustc running: waiting up to ${max}s before the run"
        ((waited >= max)) && return 0
        sleep 5
        waited=$((waited + 5))
    done
    ((waited == 0)) || log "quiet after ${waited}s"
}

# ---------------------------------------------------------------- PostgreSQL

# The prefix that runs a command as the postgres OS user (PostgreSQL refuses to run as
# root); setpriv and env exec, so a backgrounded server's $! is the server itself.
AS_PG=()
[[ $(id -u) == 0 ]] && AS_PG=(setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups -- env HOME=/tmp)

# as_pg SECS CMD...: a PostgreSQL tool as the postgres OS user, under `timeout SECS`.
as_pg() {
    local t=$1
    shift
    timeout "$t" "${AS_PG[@]}" "$@"
}

# psql PORT SQL: one statement over loopback TCP as the superuser; unaligned, tuples only.
psql_at() {
    timeout 10 "$PG_BIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 \
        "host=127.0.0.1 port=$1 user=postgres dbname=postgres connect_timeout=2" -c "$2" 2>/dev/null
}

# ---------------------------------------------------------------- the workload

# Starts the writer against PORT; its files go to DIR (acked, failed, errors).
start_writer() {
    local port=$1 dir=$2
    mkdir -p "$dir"
    rm -f "$dir/stop"
    bash "$ROOT/bench/failover/writer.sh" "$port" "$dir" </dev/null >/dev/null 2>&1 &
    WRITER_PID=$!
    started "$!"
}

# Asks the writer to stop after its current statement (bounded by its own timeout).
stop_writer() {
    local dir=$1 i
    touch "$dir/stop"
    for i in $(seq 100); do
        alive "$WRITER_PID" || break
        sleep 0.1
    done
    kill_tree "$WRITER_PID"
}

acks() { [[ -s $1/acked ]] && wc -l <"$1/acked" || echo 0; }

# Number of writes acknowledged after time T (epoch seconds with decimals).
acks_after() {
    [[ -s $1/acked ]] || {
        echo 0
        return
    }
    awk -v t="$2" '$3 > t {n++} END {print n + 0}' "$1/acked"
}

# analyze DIR KILL_TIME: prints "gap kill_to_ack no_ack_window failed_attempts acked"
#   gap:           first failed write after the kill (when the client saw the error)
#                  -> next acknowledged write (seconds)
#   kill_to_ack:   kill -> first write acknowledged after the first failure
#   no_ack_window: last write acknowledged before the kill -> that same write
analyze() {
    local dir=$1 kill=$2
    touch "$dir/acked" "$dir/failed"
    awk -v kill="$kill" '
        FILENAME == ARGV[1] { ack_id[++na] = $1; ack_end[na] = $3; next }
        { if ($3 >= kill && (ff == "" || $3 < ff)) ff = $3; if ($3 >= kill) nf++ }
        END {
            last_before = ""
            for (i = 1; i <= na; i++) if (ack_end[i] < kill && (last_before == "" || ack_end[i] > last_before)) last_before = ack_end[i]
            next_ack = ""
            if (ff != "") for (i = 1; i <= na; i++) if (ack_end[i] > ff && (next_ack == "" || ack_end[i] < next_ack)) next_ack = ack_end[i]
            if (ff == "") { printf "nofail - - 0 %d\n", na; exit }
            if (next_ack == "") { printf "noack - - %d %d\n", nf, na; exit }
            printf "%.2f %.2f %.2f %d %d\n", next_ack - ff, next_ack - kill, next_ack - last_before, nf, na
        }' "$dir/acked" "$dir/failed"
}

# Whether a write was acknowledged after the first failure that followed the kill.
resumed() { [[ $(analyze "$1" "$2") != no* ]]; }

# lost DIR IDS_FILE: acknowledged ids missing from IDS_FILE (one id a line): "count first-few".
lost_ids() {
    awk 'FNR == NR { have[$1] = 1; next } !($1 in have) { n++; if (n <= 5) l = l (l ? "," : "") $1 }
         END { print n + 0, (l ? l : "-") }' "$2" "$1/acked"
}

# Kills member LEADER of a run: its postgres only ("pg"), its postgres and its manager
# process ("pg+mgr": drover's agent or Patroni), or freezes both ("freeze": SIGSTOP, the
# node stops answering with its sockets open, so nothing is reset). Sets KILLED and KILL_TIME.
kill_leader() { # WHAT LEADER MANAGER_PID DATA_DIR
    local what=$1 leader=$2 mgr=$3 data=$4
    KILLED=$leader
    KILL_TIME=$EPOCHREALTIME
    case $what in
        pg) kill9_pg "$data" ;;
        pg+mgr)
            kill -KILL "$mgr" 2>/dev/null || true
            kill9_pg "$data"
            ;;
        freeze)
            kill -STOP "$mgr" 2>/dev/null || true
            freeze_pg "$data"
            ;;
        *) die "unknown kill $what" ;;
    esac
}
