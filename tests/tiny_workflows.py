"""The shipped workflows, pointed at the tiny test models, for the server and browser tests.

`tiny_workflow()` edits a UI-format workflow (so the browser can load it and `workflow_api.to_api` can convert
it) the way a user would re-point it at other files:
- model files -> the tiny files the comfy_server fixture writes (UNETLoader, CLIPLoader for Z-Image);
- Qwen-Image: UNETLoader / CLIPLoader (qwen_image) / VAELoader -> the tiny files of qwen_image_support (the stock
  loaders open them), the Lightning LoRA -> a tiny stand-in LoRA on the tiny model;
- CLIPLoader type flux2 (FLUX.2-klein's Qwen3 encoder) -> the tiny klein encoder file, opened by the stock
  CLIPLoader, where the host has that encoder (ComfyUI >= 0.9.2); on older hosts -> TestTinyKleinCLIP, a
  test-only stand-in with the same output;
- VAELoader, which cannot open tiny files -> TestTinyVAE (tests/comfy_test_support);
- sizes and steps -> tiny (64 px images, a few training steps), the Qwen3-VL folder -> a tiny one on disk;
- the trained LoRA file name -> what an earlier step produced.
Everything else (nodes, links, the other settings) stays as shipped.
"""
import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

import workflow_api as W
import comfy_fixtures as F
import qwen_image_support as Q
from conftest import TINY_FLUX2_FILE, TINY_KLEIN_QWEN3_FILE, TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "workflows"
TRAIN_ZIMAGE = "D-OPSD train - Z-Image-Turbo (VLM splice teacher)"
TRAIN_KLEIN = "D-OPSD train - FLUX.2-klein (reference latent teacher)"
TRAIN_QWEN = "D-OPSD train - Qwen-Image (native VLM teacher)"
TEACHER_PREVIEW = "D-OPSD teacher preview - Z-Image-Turbo"
PREVIEW_ZIMAGE = "D-OPSD LoRA preview - Z-Image-Turbo 8-step"
PREVIEW_KLEIN = "D-OPSD LoRA preview - FLUX.2-klein 4-step"
TOY_DEMO = "D-OPSD demo - toy world (CPU)"
TOY_RETENTION = "D-OPSD demo - toy world with retention (CPU)"   # executed by test_demo.py (scripts/demo.py)
ALL = [TRAIN_ZIMAGE, TRAIN_KLEIN, TRAIN_QWEN, TEACHER_PREVIEW, PREVIEW_ZIMAGE, PREVIEW_KLEIN, TOY_DEMO, TOY_RETENTION]
DATASET_FOLDER = "dopsd_dataset"
VL_FOLDER_NAME = "Qwen3-VL-tiny"


def load(name: str) -> dict:
    return W.load(WORKFLOW_DIR / f"{name}.json")


def shipped_names() -> list:
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))


# -- server-side assets --------------------------------------------------------------------------------------
def write_dataset(input_dir, n: int = 2, size: int = 64, seed: int = 0) -> Path:
    """<input>/dopsd_dataset: n coloured images with same-name captions (what the shipped workflows read)."""
    folder = Path(input_dir) / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = ["a red [trigger] circle", "a blue [trigger] square", "a green [trigger] star"]
    for i in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = [(220, 40, 40), (40, 60, 220), (40, 200, 60)][i % 3]
        Image.fromarray(img).save(folder / f"item{i}.png")
        (folder / f"item{i}.txt").write_text(captions[i % 3])
    return folder


def write_vl_folder(text_encoders_dir) -> Path:
    """A tiny Qwen3-VL folder matching the tiny Z-Image text encoder (built like the VLM-splice tests build it)."""
    from test_nodes_vlm_splice import vl_config, write_vl_folder as write

    folder = Path(text_encoders_dir) / VL_FOLDER_NAME
    if not (folder / "config.json").is_file():
        write(folder, vl_config())
    return folder


def prepare_server(server) -> dict:
    """Dataset and tiny Qwen3-VL folder inside a comfy_server's base directory (idempotent)."""
    base = Path(server.base_dir)
    return {"dataset": write_dataset(base / "input"), "vl_folder": write_vl_folder(base / "models" / "text_encoders")}


# -- workflow edits ------------------------------------------------------------------------------------------
def _set(node: dict, info: dict, name: str, value):
    layout = W.widget_layout(info)
    if name not in layout:
        raise KeyError(f"{node['type']} has no widget {name!r} ({layout})")
    node["widgets_values"][layout.index(name)] = value


def _get(node: dict, info: dict, name: str):
    return node["widgets_values"][W.widget_layout(info).index(name)]


def _swap_type(node: dict, object_info: dict, new_type: str, values: dict):
    """Replace a loader node (no input sockets) by another node type with the same single output."""
    info = object_info[new_type]
    layout = W.widget_layout(info)
    node["type"] = new_type
    node["inputs"] = []
    node["widgets_values"] = [values.get(name, "fixed" if name == W.CONTROL else None) for name in layout]
    node.setdefault("properties", {})["Node name for S&R"] = new_type
    node["properties"].pop("models", None)
    out_type = info["output"][0]
    for slot in node.get("outputs", []):
        if slot.get("type") != out_type:
            raise ValueError(f"cannot swap {node['id']} to {new_type}: output {slot.get('type')} != {out_type}")


def tiny_workflow(workflow: dict, object_info: dict, *, vl_folder=None, train_steps: int = 2,
                  preview_every: int = 1, save_prefix: str = "dopsd/test_lora", lora_name: str = None,
                  size: int = 64) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        t = node["type"]
        info = object_info.get(t)
        if info is None:
            continue
        node.get("properties", {}).pop("models", None)  # no "missing models" dialog for the real files
        if t == "UNETLoader":
            name = _get(node, info, "unet_name")
            _set(node, info, "unet_name", TINY_FLUX2_FILE if "klein" in name or "flux" in name else
                 Q.TINY_QWEN_IMAGE_FILE if "qwen_image" in name else TINY_ZIMAGE_FILE)
        elif t == "CLIPLoader":
            if _get(node, info, "type") == "qwen_image":
                _set(node, info, "clip_name", Q.TINY_QWEN25_VL_FILE)
            elif _get(node, info, "type") == "flux2":
                if F.has_klein_text_encoder():
                    _set(node, info, "clip_name", TINY_KLEIN_QWEN3_FILE)
                else:
                    _swap_type(node, object_info, "TestTinyKleinCLIP", {})
            else:
                _set(node, info, "clip_name", TINY_QWEN3_FILE)
        elif t == "VAELoader" and "qwen_image" in _get(node, info, "vae_name"):
            _set(node, info, "vae_name", Q.TINY_WAN_VAE_FILE)  # the stock VAELoader detects the tiny Wan 2.1 VAE
        elif t == "VAELoader":
            kind = "flux2" if "flux2" in _get(node, info, "vae_name") else "flux"
            _swap_type(node, object_info, "TestTinyVAE", {"kind": kind, "seed": 0})
        elif t == "DOPSDDatasetFromFolder":
            _set(node, info, "resolution", size)
        elif t == "DOPSDTeacherVLMSplice":
            if vl_folder is not None:
                _set(node, info, "vision_model", str(vl_folder))
            _set(node, info, "min_pixels", 32 * 32)
            _set(node, info, "max_pixels", 64 * 64)
        elif t == "DOPSDTrainer":
            for k, v in dict(steps=train_steps, preview_every=preview_every, save_every=0, save_prefix=save_prefix,
                             precision="fp32", rank=4, alpha=4.0, learning_rate=1e-2, ema_decay=0.9,
                             gradient_checkpointing=False).items():
                _set(node, info, k, v)
        elif t == "LoraLoaderModelOnly" and "Lightning" in _get(node, info, "lora_name"):
            _set(node, info, "lora_name", Q.TINY_LIGHTNING_FILE)
        elif t == "LoraLoaderModelOnly" and lora_name is not None:
            _set(node, info, "lora_name", lora_name)
        elif t in ("EmptySD3LatentImage", "EmptyFlux2LatentImage", "Flux2Scheduler"):
            _set(node, info, "width", size)
            _set(node, info, "height", size)
    return wf


def lora_file_name(save_prefix: str, step: int) -> str:
    """The name LoraLoaderModelOnly lists for the trainer's file <save_prefix>_stepNNNNN.safetensors."""
    return f"{save_prefix}_step{step:05d}.safetensors"


def dumps(x) -> str:
    return json.dumps(x, ensure_ascii=False)
