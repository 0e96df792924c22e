# bench/lib.sh: helpers every benchmark script shares (sourced, not run).

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() {
    log "error: $*"
    exit 1
}

# True while PID exists and is not a zombie.
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

# PID and all its descendants.
tree_pids() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1" 2>/dev/null); do tree_pids "$c"; done
}

# Drops a reaped PID from PIDS, so cleanup never signals a number the system may have
# handed to someone else's process since.
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_free() { [[ -z $(ss -Htln "sport = :$1" 2>/dev/null) ]]; }

# Waits until a TCP port accepts (max $2 s, default 10).
wait_port() {
    local port=$1 max=${2:-10} i
    for i in $(seq $((max * 10))); do
        if timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}
