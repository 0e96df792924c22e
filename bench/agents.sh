#!/usr/bin/env bash
# bench/agents: server throughput and agent footprint. Not a test; prints figures.
# Usage: bench/agents.sh   (from the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p drover -p drover-bench-agents
ulimit -n 65536 || true
B=target/release/drover-bench-agents
echo "== flood: 100 agents streaming results"
$B --mode flood --agents 100 --seconds 15
echo "== flood: 1000 agents"
$B --mode flood --agents 1000 --window 32 --seconds 15
echo "== hold: 10000 agents at default keepalive rates, one check every 10 s"
$B --mode hold --agents 10000 --seconds 30
echo "== real agent idle footprint"
$B --mode agent-idle --seconds 60
