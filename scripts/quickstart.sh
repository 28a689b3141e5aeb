#!/usr/bin/env bash
# Sets up a local virtual environment (.venv: pinned CPU torch, this package built from
# source, test tools) when it is missing or stale, then runs one job in it:
#   bash scripts/quickstart.sh demo [demo options]   the main job: `bespoke-ext demo`
#   bash scripts/quickstart.sh test [pytest options] the test suite
#   bash scripts/quickstart.sh setup                 only the set-up
# Environment: PYTHON (interpreter for the venv, default python3), BESPOKE_EXT_VENV (path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BESPOKE_EXT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"  # the CPU wheel on these machines; see README for GPU installs

job="${1:-test}"
shift || true

stamp_inputs() {
  # anything that changes what gets built or installed, and the torch installed now (a torch upgrade by
  # another package needs a rebuild of the extension: bespoke_ext refuses to import the old one)
  { cat pyproject.toml setup.py scripts/quickstart.sh csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp 2>/dev/null
    "$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true; } | sha256sum | cut -c1-16
}

setup() {
  local stamp; stamp="$(stamp_inputs)"
  if [[ -f "$VENV/.bespoke_ext_stamp" && "$(cat "$VENV/.bespoke_ext_stamp")" == "$stamp" ]]; then
    return 0
  fi
  echo "[quickstart] setting up $VENV"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel ninja
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN" numpy
  # --no-build-isolation: build against the torch installed above, not a fresh download
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test,demo]"
  stamp_inputs > "$VENV/.bespoke_ext_stamp"  # now with the torch just installed
}

setup
case "$job" in
  setup) ;;
  demo) exec "$VENV/bin/bespoke-ext" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@" ;;
  *) echo "usage: $0 {demo|test|setup} [options]" >&2; exit 2 ;;
esac
