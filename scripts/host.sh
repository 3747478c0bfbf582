# Sourced by setup_env.sh, test.sh and demo.sh: which ComfyUI host and which venv (docs/testing.md).
#   DOPSD_COMFY=0.3.75 (default)  ComfyUI 0.3.75 from PyPI                         venv .venv
#   DOPSD_COMFY=0.33              ComfyUI 0.33.0 from ../shared/comfyui (tarball)  venv .venv-comfy033
# $DOPSD_VENV overrides the venv directory.
dopsd_host=${DOPSD_COMFY:-0.3.75}
case "$dopsd_host" in
  0.3.75) dopsd_default_venv=$repo/.venv ;;
  0.33) dopsd_default_venv=$repo/.venv-comfy033 ;;
  *) echo "unknown DOPSD_COMFY=$dopsd_host (use 0.3.75 or 0.33)" >&2; exit 2 ;;
esac
dopsd_venv=${DOPSD_VENV:-$dopsd_default_venv}
