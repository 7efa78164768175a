#!/usr/bin/env bash
# Benchmark `netprobe backlog` on loopback against a minimal C connect()/close() loop and nmap -sT.
#
#   scripts/bench_backlog.sh [--smoke]
#
# 1. New connections per second against a fast accept-and-close C server (scripts/connect_loop.c,
#    built here with gcc): netprobe vs the C loop (goal: netprobe >= 60% of the C rate), and nmap
#    -sT's connect rate over ports 1-65535 (mostly refused; a reference, not the same workload).
# 2. Most connections held at once (several source addresses) against a C server that keeps
#    them: time until all were open and netprobe's peak RSS (goal: 50,000 in < 10 s, < 200 MB).
# --smoke uses tiny counts and skips nmap when it is missing (seconds). Exits non-zero when a
# correctness check fails (every connect must complete; the peak must reach the count); missed
# speed goals are reported, not failures. Loopback only; every run is bounded by count and time.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
source "$here/_venv.sh" ""
set +e  # _venv.sh turns on errexit; this script collects failures itself (see fail)
py="$root/.venv/bin/python"
netprobe=("$py" -m netprobe)

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
if [ "$smoke" = 1 ]; then
  n_rate=3000; n_c=3000; n_held=2000; hold=1s; nmap_ports=1-3000; rounds=1
else
  n_rate=50000; n_c=50000; n_held=50000; hold=15s; nmap_ports=1-65535; rounds=3
fi
sources=127.0.0.2-127.0.0.5  # 4 x 28,232 ephemeral ports: room for 50,000 to one port
work="$root/bench-out/backlog"
mkdir -p "$work"
status=0
pids=()
cleanup() {
  local rc=$?  # the trap must not replace the script's own exit status
  for p in "${pids[@]}"; do
    # Only a group this server leads (never our own), then the server itself.
    [ "$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ')" = "$p" ] && kill -- "-$p" 2>/dev/null
    kill "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  exit "$rc"
}
trap cleanup EXIT

fail() { echo "CHECK FAILED: $*"; status=1; }

# Holding 50,000 sockets needs that many descriptors; as root the hard limit can be raised.
if [ "$(id -u)" = 0 ]; then
  ulimit -n 200000 2>/dev/null || echo "note: could not raise RLIMIT_NOFILE (hard $(ulimit -Hn))"
fi
echo "fd limit for this run: soft $(ulimit -Sn), hard $(ulimit -Hn)"

if ! command -v gcc >/dev/null 2>&1; then
  echo "gcc is missing: the C reference loop cannot be built"
  [ "$smoke" = 1 ] && exit 0
  exit 2
fi
gcc -O2 -o "$work/connect_loop" "$here/connect_loop.c" || { echo "gcc failed"; exit 2; }

if ! command -v nmap >/dev/null 2>&1 && [ "$smoke" = 0 ]; then
  echo "installing nmap with apt-get" >&2
  apt-get install -y -q nmap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q nmap >/dev/null; }
fi

start_server() {  # $1: "" or "keep"; sets server_port (not run in a subshell: pids must stick)
  local out="$work/server${1:+-$1}.txt"
  rm -f "$out"
  # The server makes itself a process group (setsid), so its "keep" helpers die with it.
  "$work/connect_loop" serve 0 $1 >"$out" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q '^port ' "$out" 2>/dev/null && break
    sleep 0.05
  done
  server_port=$(awk '/^port /{print $2; exit}' "$out")
}

summary_field() {  # $1: JSON lines file, $2: python expression over `s` (the summary)
  "$py" -c "import json,sys; s=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print($2)" "$1"
}

echo "netprobe backlog benchmark: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r)"
echo "NOTE: the CPU may be shared with other work: rates are noisy; compare within one run."
echo

# --- 1. connection rate -------------------------------------------------------------------
start_server ""
port=$server_port
[ -n "$port" ] || { echo "server did not start"; exit 2; }
# Rounds alternate C and netprobe so both see the same background load; medians are compared.
c_rates=(); np_rates=()
for round in $(seq "$rounds"); do
  c_line=$("$work/connect_loop" connect 127.0.0.1 "$port" "$n_c") || fail "C loop: not every connect completed"
  c_rates+=("$(echo "$c_line" | awk '{print $8}')")
  echo "round $round C connect()/close() loop: $c_line"
  cmd=("${netprobe[@]}" backlog "127.0.0.1:$port" -n "$n_rate" -c 256 --timeout 3s --duration 120s --json)
  "${cmd[@]}" >"$work/rate.jsonl" || fail "netprobe backlog (rate) exited $?"
  np_line=$(summary_field "$work/rate.jsonl" "f\"connects {s['attempted']} established {s['established']} seconds {s['duration_s']} rate {s['connects_per_s']} rss_kb {s['max_rss_kb']}\"")
  np_rates+=("$(summary_field "$work/rate.jsonl" "s['connects_per_s']")")
  echo "round $round netprobe backlog:          $np_line"
  [ "$(summary_field "$work/rate.jsonl" "s['established'] == s['attempted'] == $n_rate")" = True ] \
    || fail "netprobe: not every connect completed ($np_line)"
done
echo "  commands: $work/connect_loop connect 127.0.0.1 PORT $n_c"
echo "            netprobe backlog 127.0.0.1:PORT -n $n_rate -c 256 --timeout 3s --duration 120s --json"
medians=$("$py" -c "import statistics,sys; c=[float(x) for x in sys.argv[1].split()]; n=[float(x) for x in sys.argv[2].split()]; print(round(statistics.median(c)), round(statistics.median(n)), round(100*statistics.median(n)/statistics.median(c),1))" "${c_rates[*]}" "${np_rates[*]}")
read -r c_med np_med pct <<<"$medians"
verdict=$("$py" -c "print('MET' if $pct >= 60 else 'MISSED')")
echo "median over $rounds round(s): C loop $c_med/s, netprobe $np_med/s = ${pct}% of C (goal >= 60%: $verdict)"

if command -v nmap >/dev/null 2>&1; then
  t0=$(date +%s.%N)
  nmap -sT -n -Pn -T5 --max-retries 0 -p "$nmap_ports" 127.0.0.1 -oG "$work/nmap.txt" >/dev/null 2>&1 \
    || fail "nmap exited non-zero"
  t1=$(date +%s.%N)
  nports=$("$py" -c "a,b='$nmap_ports'.split('-'); print(int(b)-int(a)+1)")
  echo "nmap -sT:                  $nports ports in $("$py" -c "print(round($t1-$t0,2))") s = $("$py" -c "print(round($nports/($t1-$t0)))") connects/s (mostly refused ports)"
  echo "  command: nmap -sT -n -Pn -T5 --max-retries 0 -p $nmap_ports 127.0.0.1"
else
  echo "nmap -sT:                  skipped (nmap not installed)"
fi
echo

# --- 2. held connections ------------------------------------------------------------------
start_server keep
kport=$server_port
[ -n "$kport" ] || { echo "keep server did not start"; exit 2; }
cmd=("${netprobe[@]}" backlog "127.0.0.1:$kport" -n "$n_held" -c "$n_held" --hold "$hold"
     --source "$sources" --timeout 5s --duration 60s --json)
timer=()  # GNU time (package "time") adds wall time and RSS as the OS saw them; optional
[ -x /usr/bin/time ] && timer=(/usr/bin/time -f "%e %M" -o "$work/held.time")
rm -f "$work/held.time"
"${timer[@]}" "${cmd[@]}" >"$work/held.jsonl" \
  || fail "netprobe backlog (held) exited non-zero"
held_line=$(summary_field "$work/held.jsonl" "f\"held {s['peak_held']} of {s['attempted']} (established {s['established']}, errors {s['errors_by_errno']}) all open after {s['peak_held_at_s']} s; {s['processes']} process(es), peak RSS {s['rss_total_kb']//1024} MB in total; limits hit: {s['limits_hit'] or 'none'}\"")
echo "netprobe held connections: $held_line"
[ -f "$work/held.time" ] && echo "  whole run incl. the ${hold} hold: $(awk '{print $1 " s wall, max RSS of the main process " int($2/1024) " MB"}' "$work/held.time")"
echo "  command: netprobe backlog 127.0.0.1:PORT -n $n_held -c $n_held --hold $hold --source $sources --timeout 5s --duration 60s --json"
# When RLIMIT_NOFILE caps the concurrency, netprobe must say so and still hold that many at
# once; every one of the attempts must complete either way.
[ "$(summary_field "$work/held.jsonl" "s['established'] == s['attempted'] == $n_held and s['peak_held'] == s['concurrency']")" = True ] \
  || fail "held: not all $n_held established, or the peak missed the concurrency ($held_line)"
[ "$(summary_field "$work/held.jsonl" "s['concurrency'] == $n_held or bool(s['limits_hit'])")" = True ] \
  || fail "held: concurrency was lowered without a limits_hit message"
goal=$(summary_field "$work/held.jsonl" "'MET' if s['peak_held'] >= 50000 and (s['peak_held_at_s'] or 99) < 10 and s['rss_total_kb'] < 200*1024 else 'MISSED' + (' (limits: ' + '; '.join(s['limits_hit']) + ')' if s['limits_hit'] else '')")
[ "$smoke" = 1 ] && goal="not measured in --smoke"
echo "  goal 50,000 held in < 10 s with < 200 MB RSS: $goal"
exit $status
