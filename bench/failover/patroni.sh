# bench/failover/patroni.sh: Patroni (Debian's package) + single-node etcd + HAProxy
# (sourced by bench/failover.sh, after lib.sh).
#
# Three patroni processes (pg0, pg1, pg2) with their own data dirs, PostgreSQL ports and
# REST ports; Patroni bootstraps the cluster itself (pg0 first, so it leads; pg1 and pg2
# clone it with pg_basebackup). synchronous_mode: true. HAProxy's write endpoint checks
# each member's Patroni REST API with `GET /primary`, as Patroni's docs recommend
# (docs/haproxy.cfg in Patroni's sources: `option httpchk`, `http-check expect status
# 200`, `default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`).
#
# Profiles:
#   default: ttl 30, loop_wait 10, retry_timeout 10 (Patroni's defaults); HAProxy as in
#            Patroni's docs: inter 3s fall 3 rise 2
#   tuned:   ttl 10, loop_wait 2, retry_timeout 3 (ttl >= loop_wait + 2 * retry_timeout
#            holds); HAProxy inter 1s fall 2 rise 1

declare -A PATRONI_PID=()

patroni_ports() { # sets PG_PORT[] REST_PORT[] ETCD_PORT ETCD_PEER WRITE_PORT
    PG_PORT=($((PORT_BASE)) $((PORT_BASE + 1)) $((PORT_BASE + 2)))
    REST_PORT=($((PORT_BASE + 10)) $((PORT_BASE + 11)) $((PORT_BASE + 12)))
    ETCD_PORT=$((PORT_BASE + 20))
    ETCD_PEER=$((PORT_BASE + 21))
    WRITE_PORT=$((PORT_BASE + 30))
}

patroni_write_config() { # NAME INDEX PROFILE RUN
    local name=$1 i=$2 profile=$3 run=$4 ttl loop retry
    case $profile in
        default) ttl=30 loop=10 retry=10 ;;
        tuned) ttl=10 loop=2 retry=3 ;;
        *) die "unknown Patroni profile $profile" ;;
    esac
    cat >"$run/$name.yml" <<EOF
scope: bench
name: $name
log:
  level: INFO
restapi:
  listen: 127.0.0.1:${REST_PORT[$i]}
  connect_address: 127.0.0.1:${REST_PORT[$i]}
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
bootstrap:
  dcs:
    ttl: $ttl
    loop_wait: $loop
    retry_timeout: $retry
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 256MB
        max_connections: 40
        shared_buffers: 32MB
        wal_receiver_status_interval: 1s
        wal_retrieve_retry_interval: 500ms
${BENCH_WAL_RECEIVER_TIMEOUT:+        wal_receiver_timeout: $BENCH_WAL_RECEIVER_TIMEOUT
}  initdb:
    - encoding: UTF8
    - locale: C
    - data-checksums
postgresql:
  listen: 127.0.0.1:${PG_PORT[$i]}
  connect_address: 127.0.0.1:${PG_PORT[$i]}
  data_dir: $run/$name/data
  bin_dir: $PG_BIN
  pgpass: $run/$name/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
  parameters:
    unix_socket_directories: $run/$name
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
EOF
}

patroni_haproxy_config() { # PROFILE RUN
    local profile=$1 run=$2 check i servers=""
    case $profile in
        default) check="inter 3s fall 3 rise 2" ;;
        tuned) check="inter 1s fall 2 rise 1" ;;
    esac
    for i in 0 1 2; do
        servers+="    server pg$i 127.0.0.1:${PG_PORT[$i]} maxconn 100 check port ${REST_PORT[$i]}"$'\n'
    done
    cat >"$run/haproxy.cfg" <<EOF
global
    maxconn 100
    pidfile $run/haproxy.pid

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen primary
    bind 127.0.0.1:$WRITE_PORT
    option httpchk GET /primary
    http-check expect status 200
    default-server $check on-marked-down shutdown-sessions
$servers
EOF
}

start_patroni_member() { # NAME INDEX RUN
    local name=$1 i=$2 run=$3
    mkdir -p "$run/$name"
    chown "$PG_OS_USER:" "$run/$name"
    chmod 700 "$run/$name"
    "${AS_PG[@]}" patroni "$run/$name.yml" </dev/null >"$run/$name.log" 2>&1 &
    PATRONI_PID[$name]=$!
    started "$!"
}

# GET on a member's REST API; prints the body.
rest() { timeout 3 curl -sS -m 2 "http://127.0.0.1:${REST_PORT[$1]}$2" 2>/dev/null; }

# The /cluster view from the first member that answers.
patroni_cluster() {
    local i
    for i in 0 1 2; do rest "$i" /cluster && return 0; done
    return 1
}

patroni_leader() { patroni_cluster | jq -r '.members[] | select(.role == "leader") | .name' 2>/dev/null | head -1; }

patroni_ready() { # leader pg0, one sync standby, both replicas streaming from it
    local c
    c=$(patroni_cluster) || return 1
    [[ $(jq -r '.members[] | select(.role == "leader") | .name' <<<"$c") == pg0 ]] || return 1
    [[ $(jq '[.members[] | select(.role == "sync_standby")] | length' <<<"$c") -ge 1 ]] || return 1
    [[ $(jq '[.members[] | select(.role != "leader" and (.state == "streaming" or .state == "running"))] | length' <<<"$c") -ge 2 ]] || return 1
    [[ $(psql_at "${PG_PORT[0]}" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 2 ]] || return 1
    [[ $(psql_at "${PG_PORT[0]}" "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") -ge 1 ]]
}

# Brings up etcd, the three Patroni members and HAProxy for PROFILE in RUN; returns
# when pg0 leads with a synchronous standby and the write endpoint reaches it.
patroni_setup() { # PROFILE RUN
    local profile=$1 run=$2 i
    patroni_ports
    wait_ports_free "${PG_PORT[@]}" "${REST_PORT[@]}" "$ETCD_PORT" "$ETCD_PEER" "$WRITE_PORT"
    mkdir -p "$run"
    chmod 755 "$run"
    etcd --name e0 --data-dir "$run/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "e0=http://127.0.0.1:$ETCD_PEER" --initial-cluster-state new \
        </dev/null >"$run/etcd.log" 2>&1 &
    started "$!"
    poll 20 bash -c "timeout 2 curl -fsS -m 1 http://127.0.0.1:$ETCD_PORT/health 2>/dev/null | grep -q true" ||
        die "etcd did not become healthy: $(tail -3 "$run/etcd.log")"
    for i in 0 1 2; do patroni_write_config "pg$i" "$i" "$profile" "$run"; done
    start_patroni_member pg0 0 "$run"
    poll 90 bash -c "timeout 3 curl -fs -m 2 -o /dev/null http://127.0.0.1:${REST_PORT[0]}/primary" ||
        die "Patroni pg0 did not bootstrap a primary: $(tail -5 "$run/pg0.log")"
    start_patroni_member pg1 1 "$run"
    start_patroni_member pg2 2 "$run"
    patroni_haproxy_config "$profile" "$run"
    "$HAPROXY" -f "$run/haproxy.cfg" -db </dev/null >"$run/haproxy.log" 2>&1 &
    started "$!"
    wait_port "$WRITE_PORT" 10 || die "HAProxy did not listen: $(tail -5 "$run/haproxy.log")"
    poll 120 patroni_ready || die "Patroni: no leader pg0 with a streaming sync standby after 120 s: $(patroni_cluster)"
    poll 30 bash -c "[[ \$(timeout 5 $PG_BIN/psql -X -tA 'host=127.0.0.1 port=$WRITE_PORT user=postgres dbname=postgres connect_timeout=2' -c 'SELECT inet_server_port()' 2>/dev/null) == ${PG_PORT[0]} ]]" ||
        die "HAProxy's write endpoint does not reach pg0"
    SYS_DESC="Patroni $(patroni --version 2>/dev/null | awk '{print $2}'), etcd $(etcd --version 2>/dev/null | awk '/^etcd Version/ {print $3}'), $("$HAPROXY" -v 2>/dev/null | awk 'NR == 1 {print $1, $3}')"
}

# Kills the current leader as `kill_leader` (lib.sh) says; its manager is the patroni process.
patroni_kill() { # WHAT RUN
    local what=$1 run=$2 leader
    leader=$(patroni_leader)
    [[ -n $leader ]] || die "Patroni: no leader to kill"
    kill_leader "$what" "$leader" "${PATRONI_PID[$leader]}" "$run/$leader/data"
}

patroni_member_of_port() {
    local i
    for i in 0 1 2; do [[ ${PG_PORT[$i]} == "$1" ]] && echo "pg$i"; done
}
