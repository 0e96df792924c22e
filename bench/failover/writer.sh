#!/usr/bin/env bash
# bench/failover/writer.sh PORT DIR: the application. Inserts increasing ids through the
# write endpoint on 127.0.0.1:PORT, one psql connection per statement (a client that
# reconnects after every error), until DIR/stop exists. Each attempt is appended as
# "id start end" (epoch seconds) to DIR/acked when psql reported success (the commit
# was acknowledged) or to DIR/failed otherwise; a failed id is never retried.
set -u
port=$1 dir=$2
PSQL=${PG_BIN:-/usr/lib/postgresql/15/bin}/psql
conn="host=127.0.0.1 port=$port user=postgres dbname=postgres connect_timeout=2"
exec 3>>"$dir/acked" 4>>"$dir/failed" 5>>"$dir/errors"
id=0
while [[ ! -e $dir/stop ]]; do
    id=$((id + 1))
    t0=$EPOCHREALTIME
    # timeout: a statement that hangs (a commit waiting for a standby that is gone)
    # counts as failed after 5 s.
    if err=$(timeout 5 "$PSQL" -X -q -t -A -v ON_ERROR_STOP=1 "$conn" -c "INSERT INTO t VALUES ($id)" 2>&1 >/dev/null); then
        echo "$id $t0 $EPOCHREALTIME" >&3
    else
        t1=$EPOCHREALTIME
        echo "$id $t0 $t1" >&4
        echo "$id $t1 ${err//$'\n'/ }" >&5
        sleep 0.02
    fi
done
