#!/usr/bin/env bash
# The README's demo command: bash scripts/demo.sh [--steps N] [--out DIR] [--retention]
# Sets up (or reuses) .venv with ComfyUI (.venv-comfy033 with DOPSD_COMFY=0.33), then runs the toy-world
# workflow end to end in a real headless ComfyUI on the CPU and writes the images, loss curve and LoRA to
# out/demo/<date-time>/ (see scripts/demo.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/host.sh"   # DOPSD_COMFY=0.33 runs the demo on the current ComfyUI
venv=$dopsd_venv
bash "$repo/scripts/setup_env.sh" "$venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$venv/bin/python" "$repo/scripts/demo.py" "$@"
