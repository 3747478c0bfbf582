"""The pack installed in a real ComfyUI server (`main.py --cpu`), the way a user runs it."""
import pytest

import comfy_server as server_lib
from conftest import TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

pytestmark = pytest.mark.server


def test_server_imports_pack_cleanly(comfy_server):
    log = comfy_server.log()
    assert server_lib.pack_import_problems(log) == [], comfy_server.log_tail()
    assert any(server_lib.PACK_DIR_NAME in line and "seconds" in line for line in log.splitlines()), \
        "the pack is missing from ComfyUI's custom node import times\n" + comfy_server.log_tail()


def test_object_info_lists_every_pack_node(comfy_server, pack):
    info = comfy_server.get_json("/object_info")
    for node_id in pack.NODE_CLASS_MAPPINGS:
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["python_module"] == f"custom_nodes.{server_lib.PACK_DIR_NAME}"
        assert info[node_id]["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert TINY_ZIMAGE_FILE in info["UNETLoader"]["input"]["required"]["unet_name"][0]


def test_extensions_serve_pack_js(comfy_server):
    scripts = comfy_server.get_json("/extensions")
    ours = [s for s in scripts if s.startswith(f"/extensions/{server_lib.PACK_DIR_NAME}/")]
    assert f"/extensions/{server_lib.PACK_DIR_NAME}/dopsd.js" in ours, scripts
    status, body = comfy_server.request("GET", f"/extensions/{server_lib.PACK_DIR_NAME}/dopsd.js")
    assert status == 200 and b"registerExtension" in body


def test_settings_helper(comfy_server):
    comfy_server.set_setting("Comfy.TutorialCompleted", True)
    assert comfy_server.get_json("/settings/Comfy.TutorialCompleted") is True


def _zimage_graph():
    """Stock nodes only: UNETLoader + CLIPLoader on the tiny files, Z-Image-Turbo's sampling settings."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_ZIMAGE_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
    }


def test_stock_prompt_on_tiny_zimage(comfy_server):
    graph = _zimage_graph() | {
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 42, "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "dopsd_test/ksampler"}},
    }
    entry = comfy_server.run_prompt(graph)
    saved = entry["outputs"]["7"]["latents"][0]
    assert (comfy_server.base_dir / "output" / saved["subfolder"] / saved["filename"]).is_file()


def test_prompt_with_pack_node(comfy_server):
    """DOPSDFewStepSigmas feeding ComfyUI's SamplerCustomAdvanced."""
    graph = _zimage_graph() | {
        "6": {"class_type": "DOPSDFewStepSigmas", "inputs": {
            "model": ["4", 0], "steps": 8, "schedule": "auto", "width": 256, "height": 256}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "8": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["3", 0]}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["7", 0], "guider": ["8", 0], "sampler": ["9", 0], "sigmas": ["6", 0], "latent_image": ["5", 0]}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "dopsd_test/custom"}},
    }
    entry = comfy_server.run_prompt(graph)
    assert entry["outputs"]["11"]["latents"]


def test_quick_test_for_ci_imports_pack(tmp_path):
    """`python main.py --quick-test-for-ci` with the pack (alone) in custom_nodes."""
    base = server_lib.prepare_base_dir(tmp_path / "base", test_support=False)
    run = server_lib.quick_test_for_ci(base)
    assert run.returncode == 0, run.stdout[-6000:]
    assert server_lib.pack_import_problems(run.stdout) == [], run.stdout[-6000:]
    assert f"custom_nodes/{server_lib.PACK_DIR_NAME}" in run.stdout, run.stdout[-6000:]
