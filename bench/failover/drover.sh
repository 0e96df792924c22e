# bench/failover/drover.sh: drover server + an agent with [postgres] beside each member
# + a drover proxy write endpoint fed by the server (sourced by bench/failover.sh, after
# lib.sh). The PostgreSQL cluster is built the way drover_db::testing::PgCluster builds
# it (initdb with checksums, pg_basebackup -R, member settings on the postgres command
# line, trust on loopback), then `synchronous_standby_names = 'FIRST 1 (pg1, pg2)'`;
# the server (mode = "sync") manages it from then on.
#
# Profiles:
#   default: [databases.main] timings at drover's defaults (dead_grace_ms 3000,
#            lease_ttl_ms 1000, status_max_age_ms 3000), agents' probe_interval_ms 500,
#            default keepalives
#   tuned:   what crates/drover/tests/failover.rs uses: dead_grace_ms 2000,
#            lease_ttl_ms 500, status_max_age_ms 2000, probe_interval_ms 200,
#            keepalive every 1 s (warning 3 s, critical 5 s)

DROVER_ADMIN_TOKEN=bench-admin-token
DROVER_AGENT_TOKEN=bench-agent-token
declare -A AGENT_PID=()

drover_ports() { # sets PG_PORT[] SERVER_PORT WRITE_PORT
    PG_PORT=($((PORT_BASE)) $((PORT_BASE + 1)) $((PORT_BASE + 2)))
    SERVER_PORT=$((PORT_BASE + 40))
    WRITE_PORT=$((PORT_BASE + 30))
}

pg_opts() { # INDEX RUN: what makes member i itself (on the command line, not in postgresql.conf)
    echo "-c port=${PG_PORT[$1]} -c listen_addresses=127.0.0.1 -c unix_socket_directories=$2/sock -c cluster_name=pg$1"
}

pg_start() { # INDEX RUN
    (cd "$2" && as_pg 90 "$PG_BIN/pg_ctl" -D "$2/pg$1" -l "$2/pg$1.log" -w -t 60 -o "$(pg_opts "$1" "$2")" start) \
        >"$2/pg_ctl$1.out" 2>&1 || die "pg_ctl start pg$1: $(cat "$2/pg_ctl$1.out"; tail -5 "$2/pg$1.log")"
}

drover_pg_cluster() { # RUN
    local run=$1 i
    mkdir -p "$run/sock"
    chmod 755 "$run"
    chown "$PG_OS_USER:" "$run" "$run/sock"
    (cd "$run" && as_pg 120 "$PG_BIN/initdb" -D "$run/pg0" -U postgres --auth=trust --data-checksums --no-sync \
        --no-instructions -E UTF8 --locale=C) >"$run/initdb.out" 2>&1 || die "initdb: $(tail -5 "$run/initdb.out")"
    cat >>"$run/pg0/postgresql.conf" <<'EOF'

# bench/failover (as drover_db::testing)
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_log_hints = on
hot_standby = on
hot_standby_feedback = on
wal_keep_size = '256MB'
wal_receiver_status_interval = '1s'
wal_retrieve_retry_interval = '500ms'
shared_buffers = '32MB'
max_connections = 40
EOF
    [[ -z ${BENCH_WAL_RECEIVER_TIMEOUT:-} ]] || echo "wal_receiver_timeout = '$BENCH_WAL_RECEIVER_TIMEOUT'" >>"$run/pg0/postgresql.conf"
    printf '%s\n' "local all all trust" "local replication all trust" \
        "host all all 127.0.0.1/32 trust" "host replication all 127.0.0.1/32 trust" >"$run/pg0/pg_hba.conf"
    pg_start 0 "$run"
    psql_at "${PG_PORT[0]}" "CREATE ROLE replicator WITH REPLICATION LOGIN" >/dev/null || die "create role replicator"
    for i in 1 2; do
        (cd "$run" && as_pg 120 "$PG_BIN/pg_basebackup" -h 127.0.0.1 -U replicator -p "${PG_PORT[0]}" \
            -D "$run/pg$i" -R -X stream -c fast --no-sync) >"$run/basebackup$i.out" 2>&1 ||
            die "pg_basebackup pg$i: $(tail -5 "$run/basebackup$i.out")"
        pg_start "$i" "$run"
    done
    poll 60 bash -c "[[ \$(timeout 5 $PG_BIN/psql -X -tA 'host=127.0.0.1 port=${PG_PORT[0]} user=postgres dbname=postgres' \
        -c \"SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'\" 2>/dev/null) == 2 ]]" ||
        die "replicas do not stream from pg0"
    psql_at "${PG_PORT[0]}" "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (pg1, pg2)'" >/dev/null &&
        psql_at "${PG_PORT[0]}" "SELECT pg_reload_conf()" >/dev/null || die "synchronous_standby_names"
}

drover_api() { timeout 3 curl -sS -m 2 -H "Authorization: Bearer $DROVER_ADMIN_TOKEN" "http://127.0.0.1:$SERVER_PORT$1" 2>/dev/null; }

drover_leader() { drover_api /api/v1/databases/main | jq -r '.leader.member // empty' 2>/dev/null; }

drover_ready() {
    [[ $(drover_leader) == pg0 ]] || return 1
    [[ $(psql_at "${PG_PORT[0]}" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 2 ]] || return 1
    [[ $(psql_at "${PG_PORT[0]}" "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") -ge 1 ]] || return 1
    [[ $(psql_at "$WRITE_PORT" "SELECT inet_server_port()") == "${PG_PORT[0]}" ]]
}

start_agent() { # INDEX PROFILE RUN
    local i=$1 profile=$2 run=$3 probe=500 ka=()
    [[ $profile == tuned ]] && probe=200 ka=(--keepalive-interval-secs 1 --keepalive-warning-secs 3 --keepalive-critical-secs 5)
    cat >"$run/agent-pg$i.toml" <<EOF
[postgres]
cluster = "main"
port = ${PG_PORT[$i]}
data_dir = "$run/pg$i"
run_as = "postgres"
start_options = "$(pg_opts "$i" "$run")"
log_file = "$run/pg$i.log"
probe_interval_ms = $probe
EOF
    "$DROVER" agent --server "ws://127.0.0.1:$SERVER_PORT" --name "pg$i" --token "$DROVER_AGENT_TOKEN" \
        --subscriptions pg --config "$run/agent-pg$i.toml" --address 127.0.0.1 --label "pg_port=${PG_PORT[$i]}" \
        --api-listen "" "${ka[@]}" </dev/null >"$run/agent-pg$i.log" 2>&1 &
    AGENT_PID[pg$i]=$!
    started "$!"
}

drover_setup() { # PROFILE RUN
    local profile=$1 run=$2 i timings
    drover_ports
    wait_ports_free "${PG_PORT[@]}" "$SERVER_PORT" "$WRITE_PORT"
    mkdir -p "$run"
    drover_pg_cluster "$run"
    case $profile in
        default) timings="" ;;
        tuned) timings=$'dead_grace_ms = 2000\nlease_ttl_ms = 500\nstatus_max_age_ms = 2000' ;;
        *) die "unknown drover profile $profile" ;;
    esac
    mkdir -p "$run/server/conf.d"
    cat >"$run/server/conf.d/db.toml" <<EOF
[databases.main]
members = ["pg0", "pg1", "pg2"]
mode = "sync"
user = "postgres"
replication_user = "replicator"
$timings
EOF
    "$DROVER" server --config-dir "$run/server/conf.d" --data-dir "$run/server/data" --listen "127.0.0.1:$SERVER_PORT" \
        --admin-token "$DROVER_ADMIN_TOKEN" --agent-token "$DROVER_AGENT_TOKEN" </dev/null >"$run/server.log" 2>&1 &
    started "$!"
    poll 20 bash -c "timeout 2 curl -fs -m 1 -o /dev/null http://127.0.0.1:$SERVER_PORT/health" ||
        die "drover server did not start: $(tail -5 "$run/server.log")"
    for i in 0 1 2; do start_agent "$i" "$profile" "$run"; done
    cat >"$run/proxy.toml" <<EOF
[[listeners]]
name = "write"
bind = "127.0.0.1:$WRITE_PORT"
protocol = "tcp"
service = "primary"

[services.primary]
members = { subscription = "pg", port = 5432, checks = ["db-primary"], port_label = "pg_port" }
close_on_leave = true
retries = 0
EOF
    "$DROVER" proxy --config "$run/proxy.toml" --server "http://127.0.0.1:$SERVER_PORT" --token "$DROVER_AGENT_TOKEN" \
        --state-file "$run/proxy-members.json" </dev/null >"$run/proxy.log" 2>&1 &
    started "$!"
    poll 60 drover_ready || die "drover: pg0 not leading with a sync standby behind the write endpoint after 60 s: $(drover_api /api/v1/databases/main | head -c 600)"
    SYS_DESC="$DROVER_DESC"
}

# Kills the current leader as `kill_leader` (lib.sh) says; its manager is the agent.
drover_kill() { # WHAT RUN
    local what=$1 run=$2 leader
    leader=$(drover_leader)
    [[ -n $leader ]] || die "drover: no leader to kill"
    kill_leader "$what" "$leader" "${AGENT_PID[$leader]}" "$run/$leader"
}
