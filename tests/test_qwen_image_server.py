"""Qwen-Image with the Native VLM teacher, end to end in the real server: the stock loaders open the tiny
Qwen-Image, Qwen2.5-VL (type qwen_image) and Wan 2.1 VAE files, a D-OPSD job trains a few steps, the base model
samples bit-identically afterwards, and the saved LoRA loads through ComfyUI's own LoraLoader onto every
trained module of the model."""
import math
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import qwen_image_support as Q

pytestmark = pytest.mark.server

if not Q.has_qwen_image():  # both test hosts (0.3.75, 0.33) have it; older ComfyUI does not
    pytest.skip("needs host: ComfyUI with Qwen-Image (>= 0.3.49)", allow_module_level=True)

TARGET = "dopsd_qwen_target.png"
STEPS = 3


def _loaders():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": Q.TINY_QWEN_IMAGE_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": Q.TINY_QWEN25_VL_FILE, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": Q.TINY_WAN_VAE_FILE}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.1}},
    }


def _sample_graph(prefix, lora=None):
    g = _loaders() | {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red sks circle", "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0] if lora else ["4", 0], "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    if lora:
        g["8"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": lora,
                                                                  "strength_model": 1.0}}
    return g


def _train_graph(save_prefix):
    return _loaders() | {
        "10": {"class_type": "LoadImage", "inputs": {"image": TARGET}},
        "11": {"class_type": "DOPSDDatasetFromImages", "inputs": {
            "images": ["10", 0], "captions": "a red [trigger] circle", "trigger": "sks", "resolution": 64}},
        "12": {"class_type": "DOPSDTeacherNativeVLM", "inputs": {"dataset": ["11", 0], "clip": ["2", 0],
                                                                 "vae": ["3", 0]}},
        "13": {"class_type": "DOPSDTrainer", "inputs": {
            "model": ["4", 0], "pairs": ["12", 0], "vae": ["3", 0], "method": "dopsd", "steps": STEPS,
            "inference_steps": 4, "train_steps": 4, "schedule": "auto", "loss_space": "x0", "rank": 4,
            "alpha": 4.0, "learning_rate": 0.01, "ema_decay": 0.9, "ema_warmup": False, "detach_states": True,
            "precision": "fp32", "grad_accum": 1, "grad_clip": 1.0, "gradient_checkpointing": False, "seed": 0,
            "save_prefix": save_prefix, "save_every": 0, "preview_every": 0, "targets": "auto"}},
    }


def _latent(server, entry, node="9"):
    saved = entry["outputs"][node]["latents"][0]
    path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def _wait_job(server, job_id, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = server.get_json(f"/dopsd/jobs/{job_id}")
        if status["state"] in ("finished", "stopped", "error"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s")


def test_native_vlm_teacher_job_trains_tiny_qwen_image(comfy_server):
    server = comfy_server
    Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        server.base_dir / "input" / TARGET)
    reference = _latent(server, server.run_prompt(_sample_graph("dopsd_qwen/ref")))

    prefix = f"dopsd/qwen_image_{int(time.time() * 1000)}"
    entry = server.run_prompt(_train_graph(prefix), timeout=120)
    status = _wait_job(server, entry["outputs"]["13"]["dopsd_job"][0])
    assert status["state"] == "finished", status["error"]
    losses = [loss for _, loss in status["losses"]]
    assert status["step"] == STEPS and len(losses) == STEPS and all(math.isfinite(l) and l > 0 for l in losses)

    # the base model samples bit-identically after the job (its weights were never touched)
    after = _latent(server, server.run_prompt(_sample_graph("dopsd_qwen/after")))
    assert torch.equal(after, reference)

    # the LoRA file: trained (up weights moved off their zero init) and loadable onto every trained module
    lora_name = f"{prefix}_step{STEPS:05d}.safetensors"
    lora_sd = safetensors.torch.load_file(str(server.base_dir / "models" / "loras" / lora_name))
    ups = [v for k, v in lora_sd.items() if k.endswith("lora_up.weight") or k.endswith("lora_B.weight")]
    assert ups and any(v.abs().max() > 0 for v in ups), "training must change the LoRA"
    import comfy.lora
    model = Q.build_tiny_qwen_image(seed=0)
    patches = comfy.lora.load_lora(lora_sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(patches) == len(ups) == 12 * Q.TINY_QWEN_IMAGE["num_layers"]
    assert set(patches) <= set(model.model.state_dict())

    # ComfyUI's own LoraLoaderModelOnly applies it: the sample changes, and no key is left unloaded
    with_lora = _latent(server, server.run_prompt(_sample_graph("dopsd_qwen/lora", lora=lora_name)))
    assert not torch.equal(with_lora, reference), "the trained LoRA must change the output"
    assert "lora key not loaded" not in server.log()
    assert "Exception in thread" not in server.log(), server.log_tail()
    assert "comfy_test_support: tiny Qwen2.5-VL text encoder" in server.log()  # built tiny, not at 7B + 1280 wide
