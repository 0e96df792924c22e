# bench/proxy/lib.sh: shared by bench/proxy.sh and bench/proxy/profile.sh (sourced, not run).
#
# Everything listens on 127.0.0.1 and lives in $WORK (a temp dir). Every process started
# here is recorded in PIDS and killed by cleanup (installed as an EXIT/INT/TERM trap by
# the caller). No function ever `wait`s on a running server: servers run in the
# background and are polled through /proc; every client command runs under `timeout`.

: "${BENCH_PORT_BASE:=28100}"
BACKEND_PORTS=($((BENCH_PORT_BASE + 1)) $((BENCH_PORT_BASE + 2)) $((BENCH_PORT_BASE + 3)))
PROXY_PORT=$((BENCH_PORT_BASE + 10))
ADMIN_PORT=$((BENCH_PORT_BASE + 11))
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
CLK_TCK=$(getconf CLK_TCK)
PIDS=()
declare -A BACKEND_PID=()

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# Reaps a child that has exited or is being killed (`wait` returns at once then).
reap() {
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# SIGTERM, up to 5 s of grace, then SIGKILL; reaps the zombie (it has exited, so `wait`
# returns at once).
stop_pid() {
    local pid=$1 i
    alive "$pid" || {
        reap "$pid"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    reap "$pid"
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    exec 2>/dev/null # bash's "Killed" notices for the servers stopped below
    for pid in "${PIDS[@]}"; do
        # Each PID this script started with all its descendants (nginx workers; timeout
        # and wrk under a backgrounded run), deepest first.
        for c in $(tree_pids "$pid" | tac); do
            alive "$c" && kill -KILL "$c" 2>/dev/null || true
        done
    done
    if [[ -n ${WORK:-} && -d $WORK && -z ${BENCH_KEEP:-} ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}

check_ports() {
    local p
    for p in "${BACKEND_PORTS[@]}" "$PROXY_PORT" "$ADMIN_PORT"; do
        port_free "$p" || die "port $p on 127.0.0.1 is in use (set BENCH_PORT_BASE)"
    done
}

# utime+stime in clock ticks of PID and its descendants (every thread is included in a
# process's /proc/PID/stat; nginx workers are separate processes, hence the tree).
cpu_ticks() {
    local total=0 p s
    for p in $(tree_pids "$1"); do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        # shellcheck disable=SC2086
        set -- $s
        # After "pid (comm) ": $1 is field 3 (state), so utime (14) is $12, stime (15) $13.
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

# Busy share of the whole machine over 1 s, from /proc/stat, as a percentage.
machine_busy_pct() {
    local a b
    read -r -a a < <(head -1 /proc/stat)
    sleep 1
    read -r -a b < <(head -1 /proc/stat)
    local idle=$((b[4] + b[5] - a[4] - a[5])) total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    ((total > 0)) || total=1
    echo $((100 * (total - idle) / total))
}

# Before a measured run: no rustc (other engineers' builds) may be running, and the
# machine must be quiet (under BENCH_MAX_BUSY %, default 20, busy over 1 s: this catches
# linkers and test runs too). Waits up to BENCH_MAX_IDLE_WAIT seconds (default 1800);
# after that it measures anyway and the note says so. Prints the note on stdout.
wait_idle() {
    local waited=0 max=${BENCH_MAX_IDLE_WAIT:-1800} busy
    while true; do
        busy=$(machine_busy_pct)
        if ! pgrep -x rustc >/dev/null && ((busy <= ${BENCH_MAX_BUSY:-20})); then break; fi
        if ((waited == 0)); then log "rustc running or machine ${busy}% busy: waiting before measuring"; fi
        if ((waited >= max)); then
            echo "BUSY: rustc running or ${busy}% busy after ${max}s of waiting"
            return 0
        fi
        sleep 4
        waited=$((waited + 5))
    done
    if ((waited > 0)); then echo "quiet before (waited ${waited}s)"; else echo "quiet before"; fi
}

# Busy (non-idle, non-iowait) ticks of the whole machine so far, from /proc/stat (USER_HZ).
machine_busy_ticks() {
    local a total=0 i
    read -r -a a < <(head -1 /proc/stat)
    for i in 1 2 3 4 5 6 7 8; do total=$((total + a[i])); done
    echo $((total - a[4] - a[5]))
}

# Steal ticks of the whole machine so far (/proc/stat): time the hypervisor gave this
# guest's vCPUs to others while they had work. Runs with much of it measure slow for
# every proxy (cache and TLB refills, delayed wake-ups), so it is judged on its own.
machine_steal_ticks() {
    local a
    read -r -a a < <(head -1 /proc/stat)
    echo "${a[8]:-0}"
}

# utime+stime of this shell plus every child it has reaped (wrk, curl, ...).
own_ticks() {
    local s
    s=$(cat "/proc/$$/stat")
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13} + ${14} + ${15}))
}

backend_ticks() {
    local t=0 i
    for i in "${!BACKEND_PID[@]}"; do t=$((t + $(cpu_ticks "${BACKEND_PID[$i]}"))); done
    echo "$t"
}

# The common start of the 1-worker diagnostic scripts (profile.sh, threads.sh): a temp
# dir removed at exit, a private copy of DROVER_BIN as $DROVER, the proxy pinned to CPU 0
# and wrk and the backends to CPU 1, the backends started.
setup_pinned_run() {
    [[ -x $DROVER_BIN ]] || die "no drover binary at $DROVER_BIN"
    WORK=$(mktemp -d /tmp/bench-proxy.XXXXXX)
    trap cleanup EXIT INT TERM
    DROVER="$WORK/drover-bin"
    cp "$DROVER_BIN" "$DROVER"
    ulimit -n 20000 2>/dev/null || true
    check_ports
    PROXY_CPUS=0 LOAD_CPUS=1 BACKEND_CPUS=1
    start_backends
}

# ---------------------------------------------------------------- backends

# One backend = one single-process nginx (master_process off), so `kill -9 PID` really
# kills that backend: a cheap, fast "ok\n" server.
start_backend() {
    local i=$1 port=${BACKEND_PORTS[$1]} dir="$WORK/backend$1"
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path $dir/tmp;
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location / { return 200 "ok\n"; }
    }
}
EOF
    ${BACKEND_CPUS:+taskset -c "$BACKEND_CPUS"} "$NGINX" -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" \
        >"$dir/stdout" 2>&1 &
    BACKEND_PID[$i]=$!
    PIDS+=("$!")
    wait_port "$port" 10 || die "backend $i (nginx on :$port) did not start: $(tail -3 "$dir/logs/error.log" 2>/dev/null)"
}

start_backends() {
    local i
    for i in 0 1 2; do start_backend "$i"; done
}

# ---------------------------------------------------------------- proxies
# Each writes its config for $1 workers into $WORK/<name>/ and starts the proxy in the
# background, setting PROXY_PID. Same backends, same retry/health intent:
#   retry a failed connect or a connection lost before the response on another backend
#   (at most 2 resends), active health checks every 500 ms (fall 2, rise 2) where the
#   proxy has them (nginx open source has only passive max_fails/fail_timeout),
#   keepalive connections upstream, no access log.

start_nginx() {
    local w=$1 dir="$WORK/nginx-proxy" servers="" p
    mkdir -p "$dir/logs"
    for p in "${BACKEND_PORTS[@]}"; do servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'; done
    cat >"$dir/nginx.conf" <<EOF
worker_processes $w;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log error;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path $dir/tmp;
    proxy_temp_path $dir/tmp;
    upstream app {
$servers        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 1s;
        }
    }
}
EOF
    ${PROXY_CPUS:+taskset -c "$PROXY_CPUS"} "$NGINX" -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" \
        >"$dir/stdout" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$!")
    PROXY_LOG="$dir/logs/error.log"
}

start_haproxy() {
    local w=$1 dir="$WORK/haproxy" servers="" i=0 p
    mkdir -p "$dir"
    for p in "${BACKEND_PORTS[@]}"; do
        i=$((i + 1))
        servers+="    server b$i 127.0.0.1:$p check inter 500 fall 2 rise 2"$'\n'
    done
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread $w
    maxconn 5000
    pidfile $dir/haproxy.pid

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    http-reuse always

frontend fe
    bind 127.0.0.1:$PROXY_PORT
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /
$servers
EOF
    # -db: stay in the foreground, no master-worker; backgrounded here with &, never waited on.
    ${PROXY_CPUS:+taskset -c "$PROXY_CPUS"} "$HAPROXY" -f "$dir/haproxy.cfg" -db </dev/null >"$dir/log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$!")
    PROXY_LOG="$dir/log"
}

start_drover() {
    local w=$1 dir="$WORK/drover" backends="" p
    mkdir -p "$dir"
    for p in "${BACKEND_PORTS[@]}"; do backends+="{ address = \"127.0.0.1:$p\" }, "; done
    cat >"$dir/proxy.toml" <<EOF
drain_timeout_secs = 1
admin_listen = "127.0.0.1:$ADMIN_PORT"

[[listeners]]
name = "web"
bind = "127.0.0.1:$PROXY_PORT"
protocol = "http"

[[routes]]
listener = "web"
service = "app"

[services.app]
backends = [${backends%, }]
retries = 2
connect_timeout_ms = 1000

[services.app.health]
kind = "http"
path = "/"
interval_ms = 500
timeout_ms = 500
rise = 2
fall = 2
EOF
    # --log-level warn: no per-request access log line (nginx and HAProxy run without one too).
    TOKIO_WORKER_THREADS=$w ${PROXY_CPUS:+taskset -c "$PROXY_CPUS"} "$DROVER" --log-level "${DROVER_LOG_LEVEL:-warn}" \
        proxy --config "$dir/proxy.toml" </dev/null >"$dir/log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$!")
    PROXY_LOG="$dir/log"
}

# Starts proxy $1 with $2 workers and waits until it answers 200 through every backend
# (for drover: until its admin endpoint shows all three backends healthy).
start_proxy() {
    local name=$1 w=$2 i
    check_ports_proxy
    "start_$name" "$w"
    sleep 0.2
    alive "$PROXY_PID" || die "$name exited at start: $(tail -5 "$PROXY_LOG" 2>/dev/null)"
    wait_port "$PROXY_PORT" 15 || die "$name did not listen on :$PROXY_PORT: $(tail -5 "$PROXY_LOG" 2>/dev/null)"
    if [[ $name == drover ]]; then
        for i in $(seq 100); do
            [[ $(timeout 2 curl -fsS "http://127.0.0.1:$ADMIN_PORT/backends" 2>/dev/null | grep -o '"state":"healthy"' | wc -l) -ge 3 ]] && break
            sleep 0.2
        done
    fi
    for i in $(seq 50); do
        [[ $(timeout 2 curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROXY_PORT/" 2>/dev/null) == 200 ]] && return 0
        sleep 0.2
    done
    die "$name does not answer 200 on :$PROXY_PORT: $(tail -5 "$PROXY_LOG" 2>/dev/null)"
}

check_ports_proxy() {
    local i
    for i in $(seq 50); do
        port_free "$PROXY_PORT" && port_free "$ADMIN_PORT" && return 0
        sleep 0.1
    done
    die "port $PROXY_PORT or $ADMIN_PORT still in use"
}

stop_proxy() {
    local kids c
    kids=$(pgrep -P "$PROXY_PID" 2>/dev/null || true)
    stop_pid "$PROXY_PID"
    # nginx workers exit with their master; make sure.
    for c in $kids; do alive "$c" && kill -KILL "$c" 2>/dev/null || true; done
}

# ---------------------------------------------------------------- wrk

# run_wrk SECONDS OUTFILE [extra wrk args]: the load, bounded by `timeout`.
run_wrk() {
    local secs=$1 out=$2
    shift 2
    ${LOAD_CPUS:+taskset -c "$LOAD_CPUS"} timeout $((secs + 20)) wrk -t "$BENCH_THREADS" -c "$BENCH_CONNS" \
        -d "${secs}s" --timeout 2s --latency "$@" "http://127.0.0.1:$PROXY_PORT/" >"$out" 2>&1
}

# wrk latency "123.45us" / "1.20ms" / "1.01s" -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else printf "nan" }'
}

# Parses a wrk output file into globals: W_RPS W_REQS W_P50 W_P99 (ms) W_FAILED W_SOCKERR W_NON2XX.
parse_wrk() {
    local f=$1
    W_RPS=$(awk '/^Requests\/sec:/ {print $2}' "$f")
    W_REQS=$(awk '/requests in/ {print $1}' "$f")
    W_P50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$f")")
    W_P99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$f")")
    W_NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$f")
    W_NON2XX=${W_NON2XX:-0}
    W_SOCKERR=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$f")
    W_SOCKERR=${W_SOCKERR:-0}
    W_FAILED=$((W_NON2XX + W_SOCKERR))
    [[ -n $W_RPS && -n $W_REQS ]] || die "could not parse wrk output $f: $(head -c 400 "$f")"
}
