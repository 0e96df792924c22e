#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs every test.
# Usage: scripts/test.sh            (README's test command; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive for real. Nothing is skipped when one is missing:
# it is installed here instead.
need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
[ -x /usr/lib/nagios/plugins/check_dummy ] || need_pkgs+=(monitoring-plugins-basic)
[ -x /usr/lib/nagios/plugins/check_load ] || need_pkgs+=(monitoring-plugins-basic)
have curl || need_pkgs+=(curl)
have openssl || need_pkgs+=(openssl)
# Proxy tests: real load (hey, wrk) and real TCP services behind the proxy.
have hey || need_pkgs+=(hey)
have wrk || need_pkgs+=(wrk)
have redis-server || need_pkgs+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql-15)
# Name-server tests: real DNS clients and a real Knot secondary.
have dig || need_pkgs+=(bind9-dnsutils)
have kdig || need_pkgs+=(knot-dnsutils)
have knotd || need_pkgs+=(knot)
# Multi-host tests build network namespaces.
have ip || need_pkgs+=(iproute2)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# The pipeline's SMTP tests deliver to a real SMTP server (aiosmtpd, from PyPI).
python3 -c "import aiosmtpd" 2>/dev/null || python3 -m pip install -q aiosmtpd

export DROVER_NAGIOS_PLUGINS=/usr/lib/nagios/plugins
# A one-shot run gains nothing from incremental artifacts, and they doubled the
# target directory's size (a clean CI build once ran out of disk).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Integration tests start real server and agent processes; two at a time keeps the
# 2-core machine from starving their timers.
cargo test --workspace --all-targets --locked --no-fail-fast -- --test-threads="${DROVER_TEST_THREADS:-4}"
