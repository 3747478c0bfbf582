"""Put the real ComfyUI into this Python process, the way `main.py --cpu` would, and load the pack.

Import this before anything imports `comfy`, `nodes` or the pack. Tests (via conftest.py), benchmarks and
demo scripts share it, so they all see the same ComfyUI and the same pack module.

Two things need care:
- ComfyUI has a top-level module `nodes` and so does this repo (`nodes/`). ComfyUI must win, so ComfyUI goes
  to the front of sys.path and the repo root to the very end (for `import dopsd_core` in standalone scripts).
  `python -m pytest` run from the repo puts the repo root first; we move it.
- `comfy.cli_args` parses sys.argv at import only when `comfy.options.enable_args_parsing()` was called,
  and `comfy.model_management` picks the device at import. So argv is swapped for `--cpu` during that import.
"""
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_MODULE = "comfyui_dopsd"  # the name the pack gets when tests load it in-process
DEFAULT_COMFY_ARGS = ("--cpu",)


def comfy_root() -> Path:
    """The ComfyUI tree under test: $COMFYUI_PATH, else the copy scripts/setup_env.sh made inside the venv
    running us (normally .venv/ComfyUI)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
    elif (Path(sys.prefix) / "ComfyUI" / "main.py").is_file():
        root = Path(sys.prefix) / "ComfyUI"
    else:
        root = REPO / ".venv" / "ComfyUI"
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        hint = "COMFYUI_PATH" if env else "run `bash scripts/setup_env.sh` first, or set COMFYUI_PATH"
        raise RuntimeError(f"no ComfyUI tree at {root} ({hint})")
    return root


def _fix_sys_path(root: Path) -> None:
    repo_entries = {str(REPO), "", "."}
    keep = [p for p in sys.path if p not in repo_entries and Path(p or ".").resolve() != REPO]
    sys.path[:] = [str(root)] + [p for p in keep if p != str(root)] + [str(REPO)]


def setup(extra_args=(), threads: int = 2, base_directory=None):
    """Import ComfyUI in-process on the CPU (idempotent). Returns the ComfyUI root.

    `base_directory` (ComfyUI's --base-directory) puts models/, input/, output/, temp/ and user/ there instead
    of in the ComfyUI tree: the test suite passes a temp dir so that no test writes into a host's tree."""
    root = comfy_root()
    if "comfy.model_management" in sys.modules:
        return root
    _fix_sys_path(root)
    import torch

    torch.set_num_threads(threads)
    argv = sys.argv
    base_args = ("--base-directory", str(base_directory)) if base_directory else ()
    sys.argv = ["comfyui-dopsd-tests", *DEFAULT_COMFY_ARGS, *base_args, *extra_args]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  parses the argv above
        import comfy.model_management  # noqa: F401  picks the CPU now
    finally:
        sys.argv = argv
    return root


def comfy_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:  # very old trees
        return "unknown"


def frontend_version() -> str:
    """The version of the frontend package the host serves (comfyui-frontend-package), or 'unknown'."""
    import importlib.metadata

    try:
        return importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_pack(name: str = PACK_MODULE):
    """Import the pack from the repo root as package `name` (what ComfyUI does, with a tidier name)."""
    if name in sys.modules:
        return sys.modules[name]
    setup()
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

