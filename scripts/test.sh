#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Builds or reuses the test venv (scripts/setup_env.sh), then runs pytest against the real ComfyUI:
# .venv/ComfyUI (0.3.75 from PyPI) by default, or the ComfyUI tree in $COMFYUI_PATH (its extra
# dependencies, if any, are yours to install into the venv; see docs/testing.md).
# Exit status: pytest's, except that "no tests collected" (pytest's 5) is a failure too.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DOPSD_VENV:-$repo/.venv}

bash "$repo/scripts/setup_env.sh" "$venv"
if [ -n "${COMFYUI_PATH:-}" ]; then
  echo "[test] ComfyUI under test: $COMFYUI_PATH (from COMFYUI_PATH)"
else
  echo "[test] ComfyUI under test: $venv/ComfyUI"
fi

cd "$repo"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider -v -ra --durations=10 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  rc=1
fi
exit "$rc"
