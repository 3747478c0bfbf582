"""Shared pytest fixtures: the real ComfyUI in-process, the pack, tiny real models and a real server.

ComfyUI is imported here, at collection time, before any test module can import `comfy` or `nodes`
(see comfy_env.py for why the order matters). Session-scoped models are shared: treat them as read-only
and `.clone()` a ModelPatcher before patching it.
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import comfy_env

# In-process ComfyUI gets its own base directory (models/, input/, output/, temp/, user/) so that no test writes
# into the ComfyUI tree under test; removed at the end of the session.
IN_PROCESS_BASE = Path(tempfile.mkdtemp(prefix="dopsd-comfy-base-"))
for _sub in ("models/loras", "input", "output", "temp", "user"):
    (IN_PROCESS_BASE / _sub).mkdir(parents=True, exist_ok=True)
comfy_env.setup(base_directory=IN_PROCESS_BASE)

import comfy_fixtures as F  # noqa: E402  (needs ComfyUI on sys.path)
import comfy_server as server_lib  # noqa: E402


def pytest_report_header(config):
    return (f"ComfyUI {comfy_env.comfy_version()} at {comfy_env.comfy_root()}, "
            f"frontend {comfy_env.frontend_version()}")


def written_into_comfy_tree(since: float) -> list:
    """Files in the ComfyUI tree under test modified after `since` (bytecode caches aside)."""
    root = comfy_env.comfy_root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if "__pycache__" not in p.parts and p.is_file() and p.stat().st_mtime > since)


def pytest_sessionstart(session):
    session.config._dopsd_t0 = time.time()


HARDWARE_SKIP = "needs hardware:"  # the one skip reason DOPSD_REQUIRE_NO_SKIPS=1 accepts (e.g. "needs hardware: CUDA")


def unexpected_skips(session) -> list:
    """Skip reasons other than missing hardware, from the terminal reporter's stats."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reasons = []
    for report in (reporter.stats.get("skipped", []) if reporter else []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if HARDWARE_SKIP not in reason:
            reasons.append(f"{report.nodeid}: {reason}")
    return reasons


def pytest_sessionfinish(session, exitstatus):
    """Removes the in-process base directory; fails the run if any test wrote into the ComfyUI tree, and, with
    DOPSD_REQUIRE_NO_SKIPS=1 (CI on the current host), if anything skipped for a reason other than hardware."""
    shutil.rmtree(IN_PROCESS_BASE, ignore_errors=True)
    if os.environ.get("DOPSD_REQUIRE_NO_SKIPS") == "1":
        skips = unexpected_skips(session)
        if skips:
            print(f"\n[dopsd] DOPSD_REQUIRE_NO_SKIPS=1 but {len(skips)} test(s) skipped:")
            print("\n".join(f"  {s}" for s in skips[:50]))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    written = written_into_comfy_tree(session.config._dopsd_t0)
    if written:
        print(f"\n[dopsd] tests wrote into the ComfyUI tree {comfy_env.comfy_root()} (they must use temp dirs):")
        print("\n".join(f"  {w}" for w in written[:50]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def comfy_root():
    return comfy_env.comfy_root()


@pytest.fixture(scope="session")
def pack():
    """The pack, imported from the repo root as package `comfyui_dopsd` inside the real ComfyUI."""
    return comfy_env.load_pack()


# -- tiny models -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_zimage():
    """MODEL: tiny Z-Image (ModelPatcher of supported_models.ZImage), seed 0, fp32, shift 3."""
    return F.build_tiny_zimage(seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_file(tmp_path_factory):
    """A tiny Qwen3 text encoder file with Qwen3-4B key names (what CLIPLoader type lumina2 opens)."""
    return F.save_state_dict(tmp_path_factory.mktemp("te") / "tiny_qwen3.safetensors", F.qwen3_state_dict(seed=0))


@pytest.fixture(scope="session")
def tiny_zimage_clip(tiny_qwen3_file):
    """CLIP: tiny Z-Image text encoder via comfy.sd.load_clip (lumina2) with a qwen3_4b_model_config override."""
    return F.load_tiny_zimage_clip(tiny_qwen3_file)


@pytest.fixture(scope="session")
def tiny_flux2():
    """MODEL: tiny FLUX.2-klein-like Flux2 (no guidance embedding), seed 0, fp32."""
    return F.build_tiny_flux2(seed=0)


@pytest.fixture(scope="session")
def flux2_conditioning():
    """Callable (seed=0, tokens=16, batch=1) -> CONDITIONING of the tiny Flux2's context width."""
    return F.flux2_conditioning


@pytest.fixture(scope="session")
def tiny_klein_clip(tmp_path_factory):
    """CLIP: tiny FLUX.2-klein text encoder; only on ComfyUI >= 0.9.2 (skipped on 0.3.75)."""
    if not F.has_klein_text_encoder():
        pytest.skip(f"ComfyUI {comfy_env.comfy_version()} has no FLUX.2-klein text encoder (needs >= 0.9.2)")
    path = tmp_path_factory.mktemp("klein_te") / "tiny_klein_qwen3.safetensors"
    F.save_state_dict(path, F.qwen3_state_dict(F.TINY_KLEIN_QWEN3, seed=0))
    return F.load_tiny_klein_clip(path)


@pytest.fixture(scope="session")
def tiny_flux_vae():
    """VAE: tiny Flux-layout autoencoder for Z-Image (16 latent channels, /8)."""
    return F.build_tiny_flux_vae(seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_vae():
    """VAE: tiny Flux2-layout autoencoder (128 latent channels, /16)."""
    return F.build_tiny_flux2_vae(seed=0)


# -- real server ---------------------------------------------------------------------------------------------

TINY_ZIMAGE_FILE = "tiny_zimage.safetensors"
TINY_FLUX2_FILE = "tiny_flux2.safetensors"
TINY_QWEN3_FILE = "tiny_qwen3.safetensors"
TINY_KLEIN_QWEN3_FILE = "tiny_klein_qwen3.safetensors"  # written only where the host has klein's encoder (>= 0.9.2)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server (main.py --cpu on 127.0.0.1, free port) with the pack and the test-only loader
    patch in custom_nodes, and tiny models in models/ (diffusion_models: tiny_zimage / tiny_flux2,
    text_encoders: tiny_qwen3, and tiny_klein_qwen3 for CLIPLoader type flux2 where the host has FLUX.2-klein's
    text encoder), plus the tiny Qwen-Image set of tests/qwen_image_support.py. Stopped by its own PID at the
    end of the session."""
    base = server_lib.prepare_base_dir(tmp_path_factory.mktemp("comfy_base"))
    models = base / "models"
    for name, cls, cfg in [(TINY_ZIMAGE_FILE, "ZImage", F.TINY_ZIMAGE), (TINY_FLUX2_FILE, "Flux2", F.TINY_FLUX2)]:
        F.save_diffusion_model(models / "diffusion_models" / name, cls, cfg, F.diffusion_state_dict(cls, cfg, seed=0))
    F.save_state_dict(models / "text_encoders" / TINY_QWEN3_FILE, F.qwen3_state_dict(seed=0))
    if F.has_klein_text_encoder():
        F.save_state_dict(models / "text_encoders" / TINY_KLEIN_QWEN3_FILE, F.qwen3_state_dict(F.TINY_KLEIN_QWEN3, seed=0))
    import qwen_image_support
    qwen_image_support.write_server_models(models)  # tiny Qwen-Image, Qwen2.5-VL and Wan 2.1 VAE
    server = server_lib.ComfyServer(base)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy_server):
    """The server's /object_info (every node definition, the pack's included)."""
    return comfy_server.get_json("/object_info")


@pytest.fixture(scope="session")
def assets(comfy_server):
    """The shipped workflows' inputs in the server's base directory: a dataset folder and a tiny Qwen3-VL folder."""
    import tiny_workflows
    return tiny_workflows.prepare_server(comfy_server)

