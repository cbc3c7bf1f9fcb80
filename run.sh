#!/usr/bin/env bash
# One entry point for a fresh clone; needs only python3.
#   ./run.sh demo [args]   set up, then run the main job (mdit-demo: train an MDiT on digits)
#   ./run.sh sizes [args]  set up, then print model sizes and costs (mdit-sizes)
#   ./run.sh test [args]   set up, then run the test suite (pytest -m "not slow")
# Set-up: a virtualenv in .venv (override with VENV=...), PyTorch (TORCH_SPEC, default
# torch==2.13.0; set e.g. TORCH_SPEC="torch" on a CUDA machine), this package with its test
# extras, and NATTEN when it builds (optional: its tests are skipped without it).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"

stamp="$VENV/.installed-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$PY" -m pip install -q -e ".[test]"
  "$PY" -c "import natten" 2>/dev/null \
    || "$PY" -m pip install -q --no-build-isolation "natten>=0.21" \
    || echo "NATTEN did not install; its agreement tests will be skipped."
  touch "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
  demo) exec "$PY" -m diffusers_mdit "$@" ;;
  sizes) exec "$PY" -c "from diffusers_mdit.cli import sizes; raise SystemExit(sizes())" "$@" ;;
  test) exec "$PY" -m pytest -m "not slow" -q "$@" ;;
  *) echo "usage: ./run.sh {demo|sizes|test} [args]" >&2; exit 2 ;;
esac
