#!/usr/bin/env bash
# Benchmark `netprobe port-check` against `nmap -sT` on a full 1-65535 loopback scan.
#
#   scripts/bench_portcheck.sh [--smoke] [--rounds N] [--ports LOW-HIGH] [--no-netns] [--skip-nmap]
#
# Installs nmap with apt-get when it is missing (not in --smoke, where peers are optional),
# then runs scripts/bench_portcheck_run.py inside a private network namespace (`unshare -rn`)
# when the host allows it, so no other process's listeners come and go mid-scan. Prints median
# seconds, ports/s, the nmap/netprobe ratio, peak RSS, whether the open sets are identical, and
# a plain blocking connect_ex loop's ports/s as the floor. Exits non-zero on a correctness failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
source "$here/_venv.sh" ""
py="$root/.venv/bin/python"

smoke=0
netns=1
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --no-netns) netns=0 ;;
  esac
done

if ! command -v nmap >/dev/null 2>&1 && [ "$smoke" = 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing nmap with apt-get" >&2
    # Try without refreshing the package lists first; update them once if that fails.
    $sudo apt-get install -y -q nmap >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q nmap >/dev/null; }
  else
    echo "bench: nmap is missing and apt-get is not available; install nmap first" >&2
    exit 2
  fi
fi

if [ "$netns" = 1 ] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
    && unshare -rn true 2>/dev/null; then
  exec unshare -rn sh -c 'ip link set lo up && exec "$0" "$@"' \
    "$py" "$here/bench_portcheck_run.py" --netns "$@"
fi
echo "bench: no private network namespace; running in the host namespace" >&2
exec "$py" "$here/bench_portcheck_run.py" "$@"
