"""Issue #4's end-to-end check in the real server: a D-OPSD job trains from a posted prompt while another
prompt samples the same checkpoint; stop via the route saves a LoRA that stock LoraLoaderModelOnly loads."""
import functools

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import comfy_server as server_lib
from conftest import TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

pytestmark = pytest.mark.server


def _base():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_ZIMAGE_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
    }


def _sample_graph(prefix, lora=None):
    g = _base() | {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a sks cat", "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0] if lora else ["4", 0], "seed": 7, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    if lora:
        g["8"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": lora,
                                                                  "strength_model": 1.0}}
    return g


def _train_graph():
    return _base() | {
        "3": {"class_type": "TestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "dopsd_target.png"}},
        "11": {"class_type": "DOPSDDatasetFromImages", "inputs": {
            "images": ["10", 0], "captions": "a photo of a [trigger] cat", "trigger": "sks", "resolution": 64}},
        "12": {"class_type": "DOPSDTeacherReferenceLatent", "inputs": {
            "dataset": ["11", 0], "clip": ["2", 0], "vae": ["3", 0],
            "teacher_prompt_prefix": "exactly like the reference image:"}},
        "13": {"class_type": "DOPSDTrainer", "inputs": {
            "model": ["4", 0], "pairs": ["12", 0], "vae": ["3", 0], "method": "dopsd", "steps": 100000,
            "inference_steps": 8, "train_steps": 4, "schedule": "auto", "loss_space": "x0", "rank": 4,
            "alpha": 4.0, "learning_rate": 0.01, "ema_decay": 0.9, "ema_warmup": False, "detach_states": True,
            "precision": "fp32", "grad_accum": 1, "grad_clip": 1.0, "gradient_checkpointing": True, "seed": 0,
            "save_prefix": "dopsd/server_test", "save_every": 0, "preview_every": 3, "targets": "auto"}},
    }


def _latent(server, entry, node="9"):
    saved = entry["outputs"][node]["latents"][0]
    path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


_wait = functools.partial(server_lib.wait_for, timeout=120)


def test_training_job_through_the_server(comfy_server):
    server = comfy_server
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        server.base_dir / "input" / "dopsd_target.png")
    reference = _latent(server, server.run_prompt(_sample_graph("dopsd_test/ref")))

    entry = server.run_prompt(_train_graph())
    job_id = entry["outputs"]["13"]["dopsd_job"][0]
    status = lambda: server.get_json(f"/dopsd/jobs/{job_id}")  # noqa: E731
    _wait(lambda: status()["step"] >= 2, what="the job to train")

    # a second prompt samples the same checkpoint while the job is active: same output as without the job
    during = _latent(server, server.run_prompt(_sample_graph("dopsd_test/during")))
    assert torch.equal(during, reference)
    steps = status()["step"]
    _wait(lambda: status()["step"] > steps, what="training to resume after the prompt")
    st = status()
    assert st["state"] == "running" and st["error"] is None and len(st["losses"]) >= 3
    assert st["previews"] and st["previews"]["student"]["type"] == "temp"
    code, _ = server.request("GET", f"/view?filename={st['previews']['student']['filename']}"
                                    f"&subfolder={st['previews']['student']['subfolder']}&type=temp")
    assert code == 200
    assert job_id in [j["job_id"] for j in server.get_json("/dopsd/jobs")["jobs"]]
    assert server.request("POST", "/dopsd/jobs/not-a-job/stop", {"save": True})[0] == 404

    code, body = server.request("POST", f"/dopsd/jobs/{job_id}/stop", {"save": True})
    assert code == 200, body
    final = _wait(lambda: status()["state"] in ("stopped", "error") and status(), what="the job to stop")
    assert final["state"] == "stopped", final["error"]
    lora_file = final["lora_path"].split("/loras/", 1)[1]
    assert server.get_json("/dopsd/jobs")  # routes still answer
    with_lora = _latent(server, server.run_prompt(_sample_graph("dopsd_test/lora", lora=lora_file)))
    assert not torch.equal(with_lora, reference), "the trained LoRA must change the output"
    assert "lora key not loaded" not in server.log()
    problems = [l for l in server.log().splitlines()
                if "Exception in thread" in l or ("Error" in l and ("dopsd" in l.lower() or "D-OPSD" in l))]
    assert not problems, server.log_tail()
