# Sourced by scripts/netprobe and scripts/test: create or refresh .venv with only Python 3 present.
# Reinstalls when pyproject.toml changes (a stamp file keeps the hash), so a fresh clone and an
# old checkout both end up with what the project asks for.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
fi
stamp="$venv/.netprobe-installed${extra:+-$extra}"
# The stamp covers this script, setup.py and the C source too: a change to how we install, or
# to what is compiled, reinstalls (and so rebuilds netprobe/_pump).
want="$(cat "$root/pyproject.toml" "$root/setup.py" "$root/netprobe/_pump.c" "$root/scripts/_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  spec="$root"
  [ -n "$extra" ] && spec="$root[$extra]"
  log="$venv/install.log"
  echo "netprobe: installing into .venv (log: $log)" >&2
  # editable_mode=compat: a plain path in a .pth file. The default "strict"/"lenient" modes
  # install an import finder that site.py loads on every start (pathlib, re, urllib...):
  # ~5 ms of each netprobe run, a third of Python's own start-up.
  # --no-compile: pip would byte-compile every module of every package (5 of the 20 s of a
  # fresh install, mostly for modules nothing here imports); Python writes the .pyc of what
  # is imported on first use.
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-compile \
      --config-settings editable_mode=compat -e "$spec" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "netprobe: pip install failed; see $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
# pip writes .pyc files for what it installs, but not for an editable checkout; without them
# (and with PYTHONDONTWRITEBYTECODE set, as on some CI hosts) every run recompiles what changed
# (~8 ms a module). A source newer than the marker (or no marker) recompiles; the check is a
# few stat calls.
pyc_mark="$venv/.netprobe-pyc"
if [ ! -f "$pyc_mark" ] || [ -n "$(find "$root/netprobe" -name '*.py' -newer "$pyc_mark" -print -quit)" ]; then
  touch "$pyc_mark"
  "$venv/bin/python" -m compileall -q "$root/netprobe" >/dev/null 2>&1 || true
fi
