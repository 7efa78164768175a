#!/usr/bin/env bash
# Streaming throughput and memory of `netprobe send` against `nc -N` (netcat-openbsd) and
# `socat - TCP:...`, all in the same run, same file, same servers:
#   upload:    FILE -> client -> discard server          (client stdout to /dev/null)
#   roundtrip: FILE -> client -> echo server -> client -> OUT file (sha256 checked)
#   ./scripts/bench_send.sh            full run: 1 GiB, 3 rounds (installs peers with apt-get if missing)
#   ./scripts/bench_send.sh --smoke    seconds: 8 MiB, 1 round; nc/socat optional
# Prints per tool and test: median MB/s (1 MB = 10^6 bytes), ratio to nc, peak RSS (max over
# rounds: GNU time's %M, or psutil sampling where /usr/bin/time is missing). Exits 1 when any round-trip output differs from
# the input or a client fails. Goal (issue 5): netprobe >= nc throughput, constant memory.
# Servers: `netprobe echo --mode discard|echo` (SERVER=python: a threaded stdlib server).
# socat's PIPE echo is not offered: it stalled here under load, for nc as well (16 KiB pipe).
# netprobe's rate is also shown without its start-up (Python + Typer/pydantic imports, measured
# as the median wall time of an empty `netprobe send` exchange), which no transfer loop wins back.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/.."
source "$here/_venv.sh" ""
mode="${1:-}"
case "$mode" in
  ""|--smoke) ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
if [ "$mode" = "--smoke" ]; then
  size_mib=${SIZE_MIB:-8}; rounds=${ROUNDS:-1}
else
  size_mib=${SIZE_MIB:-1024}; rounds=${ROUNDS:-3}
fi
server_kind="${SERVER:-netprobe}"
np="$root/.venv/bin/netprobe"

want_pkg() {  # want_pkg BINARY PACKAGE: install when missing (full mode), else skip the column
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$mode" != "--smoke" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench_send: installing $2 with apt-get" >&2
    apt-get install -y "$2" >&2 || { apt-get update >&2 && apt-get install -y "$2" >&2; }
  fi
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "bench_send: $1 not available: its column is skipped" >&2
  return 1
}
tools="netprobe"
# netcat-openbsd installs nc.openbsd (the `nc` alternative may be ncat, which lacks -N).
want_pkg nc.openbsd netcat-openbsd && tools="$tools nc"
want_pkg socat socat && tools="$tools socat"

tmp="$(mktemp -d)"
# Servers start inside $(...) subshells, so their pids go to a file, not a shell array.
cleanup() {
  if [ -f "$tmp/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null; done <"$tmp/pids"
    sleep 0.2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Input: one random MiB repeated (generating 1 GiB from urandom would dominate a smoke run).
"$root/.venv/bin/python" - "$tmp/in.bin" "$size_mib" <<'PY'
import os, sys
block = os.urandom(1 << 20)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(block)
PY
bytes=$(stat -c %s "$tmp/in.bin")
in_sum=$(sha256sum "$tmp/in.bin" | cut -d' ' -f1)

start_server() {  # start_server discard|echo -> prints the port
  local kind="$1" log="$tmp/server-$1.out" port
  if [ "$server_kind" = python ]; then
    "$root/.venv/bin/python" - "$kind" >"$log" 2>"$tmp/server-$kind.err" <<'PY' &
import socket, sys, threading
echo = sys.argv[1] == "echo"
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(f"listening on 127.0.0.1:{listener.getsockname()[1]}/tcp", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(1 << 20):
            if echo:
                conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
PY
    echo $! >>"$tmp/pids"
  else
    "$np" echo --port 0 --mode "$kind" >"$log" 2>"$tmp/server-$kind.err" &
    echo $! >>"$tmp/pids"
  fi
  for _ in $(seq 100); do
    grep -q 'listening on' "$log" 2>/dev/null && break
    sleep 0.05
  done
  port=$(head -1 "$log" | sed -n 's/.*:\([0-9]*\)\/tcp.*/\1/p')
  [ -n "$port" ] || { echo "bench_send: $kind server did not start" >&2; cat "$tmp/server-$kind.err" >&2; exit 1; }
  echo "$port"
}
discard_port=$(start_server discard)
echo_port=$(start_server echo)

client_cmd() {  # client_cmd TOOL PORT
  case "$1" in
    netprobe) echo "$np send 127.0.0.1:$2" ;;
    nc) echo "nc.openbsd -N 127.0.0.1 $2" ;;
    socat) echo "socat -t 30 - TCP:127.0.0.1:$2" ;;
  esac
}

# The runner: wall time of the client alone (the runner's own start-up excluded) and the
# client's peak RSS in KiB.
cat >"$tmp/run.py" <<'PY'
import os, subprocess, sys, tempfile, time
stdin, stdout, stderr, *cmd = sys.argv[1:]
# ru_maxrss of a child forked from Python counts the pre-exec copy of Python (~11 MB), so the
# peak comes from GNU time (a small C parent) when present, else from psutil sampling.
use_time = os.access("/usr/bin/time", os.X_OK)
report = tempfile.mktemp()
if use_time:
    cmd = ["/usr/bin/time", "-f", "%M", "-o", report, *cmd]
with open(stdin, "rb") as i, open(stdout, "wb") as o, open(stderr, "wb") as e:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=i, stdout=o, stderr=e)
    peak = 0
    if not use_time:
        import psutil
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss // 1024)
            except psutil.Error:
                break
            time.sleep(0.01)
    rc = proc.wait()
    t1 = time.monotonic()
if use_time:
    with open(report) as f:
        peak = int(f.read().split()[-1])
    os.unlink(report)
print(rc, f"{t1 - t0:.6f}", peak)
PY
runner="$root/.venv/bin/python $tmp/run.py"

status=0
run_one() {  # run_one TOOL TEST ROUND -> appends "MB/s" to $tmp/TOOL.TEST.rates, RSS KB to .rss
  local tool="$1" test="$2" port out cmd rc secs peak
  if [ "$test" = upload ]; then port=$discard_port; out=/dev/null; else port=$echo_port; out="$tmp/out.bin"; fi
  cmd=$(client_cmd "$tool" "$port")
  read -r rc secs peak < <($runner "$tmp/in.bin" "$out" "$tmp/client.err" $cmd)
  if [ $rc -ne 0 ]; then
    echo "bench_send: $tool $test exited $rc: $(head -3 "$tmp/client.err")" >&2
    status=1
  fi
  if [ "$test" = roundtrip ]; then
    local got
    got=$(sha256sum "$tmp/out.bin" | cut -d' ' -f1)
    if [ "$got" != "$in_sum" ]; then
      echo "bench_send: $tool roundtrip: output differs from input ($(stat -c %s "$tmp/out.bin") of $bytes bytes)" >&2
      status=1
    fi
    rm -f "$tmp/out.bin"
  fi
  awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f\n", b / s / 1e6 }' >>"$tmp/$tool.$test.rates"
  echo "$secs" >>"$tmp/$tool.$test.secs"
  echo "$peak" >>"$tmp/$tool.$test.rss"
}

median() { sort -n "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Fixed cost of one netprobe run (interpreter + CLI imports + an empty exchange), median of 5.
for _ in 1 2 3 4 5; do
  read -r _rc secs _peak < <($runner /dev/null /dev/null /dev/null "$np" send "127.0.0.1:$discard_port")
  echo "$secs" >>"$tmp/startup"
done
startup=$(median "$tmp/startup")

echo "bench_send: ${size_mib} MiB, $rounds round(s), tools: $tools, servers: $server_kind (discard :$discard_port, echo :$echo_port)"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
for round in $(seq "$rounds"); do
  for test in upload roundtrip; do
    for tool in $tools; do   # interleaved, so background load hits every tool alike
      run_one "$tool" "$test" "$round"
    done
  done
done

printf '\n%-10s %-10s %12s %10s %14s %22s\n' tool test "MB/s(med)" "vs nc" "peak RSS MB" "MB/s excl. start-up"
for test in upload roundtrip; do
  nc_rate=""
  [ -f "$tmp/nc.$test.rates" ] && nc_rate=$(median "$tmp/nc.$test.rates")
  for tool in $tools; do
    r=$(median "$tmp/$tool.$test.rates")
    peak=$(sort -n "$tmp/$tool.$test.rss" | tail -1)
    ratio="-"
    [ -n "$nc_rate" ] && ratio=$(awk -v a="$r" -v b="$nc_rate" 'BEGIN { printf "%.2fx", a / b }')
    excl="-"
    if [ "$tool" = netprobe ]; then
      secs=$(median "$tmp/$tool.$test.secs")
      excl=$(awk -v b="$bytes" -v s="$secs" -v u="$startup" 'BEGIN { if (s > u) printf "%.1f", b / (s - u) / 1e6; else print "-" }')
      [ -n "$nc_rate" ] && [ "$excl" != "-" ] && excl="$excl ($(awk -v a="$excl" -v b="$nc_rate" 'BEGIN { printf "%.2fx", a / b }'))"
    fi
    printf '%-10s %-10s %12s %10s %14.1f %22s\n' "$tool" "$test" "$r" "$ratio" "$(awk -v k="$peak" 'BEGIN { print k / 1024 }')" "$excl"
  done
done
echo
echo "netprobe start-up (median wall time of an empty \`netprobe send\` to the discard server): ${startup} s"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg) (CPU shared with other work: figures are noisy)"
echo "all rounds (MB/s):"
for f in "$tmp"/*.rates; do echo "  $(basename "$f" .rates): $(tr '\n' ' ' <"$f")"; done
if [ $status -eq 0 ]; then echo "bytes verified: every round-trip output matched the input (sha256)"; fi
exit $status
