#!/usr/bin/env bash
# bench/handlers: events/s through handlers, and ingestion with a slow handler vs none.
# Not a test; prints figures. Usage: bench/handlers.sh (from the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p drover -p drover-bench-agents
B=target/release/drover-bench-agents
for h in http tcp; do
  echo "== $h handler"
  $B --mode flood --agents 100 --seconds 15 --handler $h
done
for rate in 100000 0; do
  for h in none slow none slow; do
    echo "== rate=${rate:-max} handler=$h"
    $B --mode flood --agents 100 --seconds 15 --rate $rate --handler $h
  done
done
