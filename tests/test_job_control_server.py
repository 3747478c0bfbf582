"""Issue 12: a training job inside ComfyUI's everyday control flow, on a real server with ComfyUI's tiny
Z-Image and FLUX.2 models: Cancel, Wait For Job, /free, re-queue, one save_prefix for two jobs, bad bodies.

Each test stops the jobs it started. Steps are made long enough to be hit mid-step (grad_accum) so the
faults show on CPU with tiny models: a Cancel or an unload lands while a training step is in flight.
"""
import time

import numpy as np
import pytest
from PIL import Image

import comfy_server as server_lib
from conftest import TINY_FLUX2_FILE, TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

pytestmark = pytest.mark.server
FAMILIES = ["zimage", "flux2"]


def _model_nodes(family):
    if family == "zimage":
        return {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_ZIMAGE_FILE, "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
            "3": {"class_type": "TestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
            "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        }
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_FLUX2_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "TestTinyKleinCLIP", "inputs": {}},
        "3": {"class_type": "TestTinyVAE", "inputs": {"kind": "flux2", "seed": 0}},
        "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": 64, "height": 64}},
    }


def train_graph(family, trainer_id="13", **settings):
    trainer = dict(model=["4", 0], pairs=["12", 0], method="dopsd", steps=100000, inference_steps=4,
                   train_steps=4, schedule="auto", loss_space="x0", rank=4, alpha=4.0, learning_rate=0.01,
                   ema_decay=0.9, ema_warmup=False, detach_states=True, precision="fp32", grad_accum=1,
                   grad_clip=1.0, gradient_checkpointing=False, seed=0, save_prefix="", save_every=0,
                   preview_every=0, targets="auto")
    trainer.update(settings)
    return _model_nodes(family) | {
        "10": {"class_type": "LoadImage", "inputs": {"image": "dopsd_ctl_target.png"}},
        "11": {"class_type": "DOPSDDatasetFromImages", "inputs": {
            "images": ["10", 0], "captions": "a photo of a [trigger] cat", "trigger": "sks", "resolution": 64}},
        "12": {"class_type": "DOPSDTeacherReferenceLatent", "inputs": {
            # a prefix, so the teacher differs from the student also where the model ignores reference latents
            # (Z-Image on 0.3.75), which the trainer refuses otherwise
            "dataset": ["11", 0], "clip": ["2", 0], "vae": ["3", 0], "teacher_prompt_prefix": "as in the image:"}},
        trainer_id: {"class_type": "DOPSDTrainer", "inputs": trainer},
    }


def sample_graph(family, steps=400, prefix="dopsd_ctl/sample"):
    latent = ({"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
              if family == "zimage" else
              {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}})
    return _model_nodes(family) | {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
        "6": latent,
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 7, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


@pytest.fixture()
def server(comfy_server):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        comfy_server.base_dir / "input" / "dopsd_ctl_target.png")
    yield comfy_server
    for job in comfy_server.get_json("/dopsd/jobs")["jobs"]:  # leave no job behind for the next test
        if job["state"] in ("waiting", "running", "paused"):
            comfy_server.request("POST", f"/dopsd/jobs/{job['job_id']}/stop", {"save": False})
    wait_for(lambda: all(j["state"] not in ("waiting", "running", "paused", "stopping")
                         for j in comfy_server.get_json("/dopsd/jobs")["jobs"]), what="every job to end")


wait_for = server_lib.wait_for


def history(server, prompt_id, timeout=90):
    """The prompt's finished /history entry (success or not)."""
    def done():
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        return entry if entry and entry.get("status", {}).get("completed") is not None else None
    return wait_for(done, timeout, f"prompt {prompt_id} to finish")


def interrupted(entry) -> bool:
    return any(m[0] == "execution_interrupted" for m in entry["status"].get("messages", []))


def status(server, job_id):
    return server.get_json(f"/dopsd/jobs/{job_id}")


def start_job(server, family, trainer_id="13", **settings):
    prompt_id = server.post_prompt(train_graph(family, trainer_id, **settings))
    entry = history(server, prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["outputs"][trainer_id]["dopsd_job"][0], prompt_id


def stop(server, job_id, save=False):
    server.request("POST", f"/dopsd/jobs/{job_id}/stop", {"save": save})
    return wait_for(lambda: (st := status(server, job_id))["state"] in ("stopped", "finished", "error") and st,
                    what="the job to end")


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_during_training_cancels_the_prompt_and_never_the_job(server, family):
    job_id, train_prompt = start_job(server, family, grad_accum=12)
    wait_for(lambda: status(server, job_id)["step"] >= 1, what="the job to train")
    for _ in range(5):  # Cancel with no prompt running: it lands in training steps
        server.request("POST", "/interrupt", {})
        time.sleep(0.2)
    prompt_id = server.post_prompt(sample_graph(family))
    wait_for(lambda: any(item[1] == prompt_id for item in server.get_json("/queue")["queue_running"]),
             what="the prompt to be handed to the worker")
    server.request("POST", "/interrupt", {"prompt_id": prompt_id})  # while it waits for the step in flight
    entry = history(server, prompt_id)
    assert interrupted(entry), f"the cancelled prompt ran to the end: {entry['status']}"
    step = status(server, job_id)["step"]
    wait_for(lambda: status(server, job_id)["step"] > step, what="training to go on after Cancel")
    st = status(server, job_id)
    assert st["state"] == "running" and st["error"] is None, st["error"]
    assert st["prompt_id"] == train_prompt


def test_cancel_ends_wait_for_job_and_the_job_trains_on(server):
    graph = train_graph("zimage")
    graph["20"] = {"class_type": "DOPSDWaitForJob", "inputs": {"job": ["13", 0], "timeout_s": 0}}
    graph["21"] = {"class_type": "DOPSDSaveLoRA", "inputs": {"job": ["20", 0], "filename": "dopsd_ctl/never",
                                                             "overwrite": False, "also_peft": False}}
    prompt_id = server.post_prompt(graph)
    jobs = wait_for(lambda: [j for j in server.get_json("/dopsd/jobs")["jobs"]
                             if j["prompt_id"] == prompt_id and j["step"] >= 2], what="the job to train")
    server.request("POST", "/interrupt", {"prompt_id": prompt_id})
    entry = history(server, prompt_id, timeout=30)
    assert interrupted(entry), entry["status"]
    assert not (server.base_dir / "models" / "loras" / "dopsd_ctl" / "never.safetensors").exists()
    step = status(server, jobs[0]["job_id"])["step"]
    wait_for(lambda: status(server, jobs[0]["job_id"])["step"] > step, what="training to go on")
    assert status(server, jobs[0]["job_id"])["state"] == "running"


@pytest.mark.parametrize("family", FAMILIES)
def test_free_with_unload_models_during_training_never_kills_the_job(server, family):
    job_id, _ = start_job(server, family, steps=8, grad_accum=3)
    wait_for(lambda: status(server, job_id)["step"] >= 1, what="the job to train")
    while status(server, job_id)["state"] in ("waiting", "running"):
        assert server.request("POST", "/free", {"unload_models": True})[0] == 200
        time.sleep(0.05)
    st = status(server, job_id)
    assert st["state"] == "finished" and st["error"] is None and st["step"] == 8, st["error"]


def test_requeue_shows_the_running_job_and_starts_a_new_one_after_stop(server):
    job_a, _ = start_job(server, "zimage")
    again, _ = start_job(server, "zimage")
    assert again == job_a, "an unchanged trainer queued again while its job trains shows that job"
    stop(server, job_a, save=False)
    job_b, _ = start_job(server, "zimage")
    assert job_b != job_a, "after Stop a re-queue starts a new job, never returns the stopped one"
    assert status(server, job_b)["state"] in ("waiting", "running")
    stop(server, job_b, save=False)


def test_requeue_after_finish_saves_the_new_lora_again(server):
    graph = train_graph("zimage", steps=2)
    graph["20"] = {"class_type": "DOPSDWaitForJob", "inputs": {"job": ["13", 0], "timeout_s": 0}}
    graph["21"] = {"class_type": "DOPSDSaveLoRA", "inputs": {"job": ["20", 0], "filename": "dopsd_ctl/requeue",
                                                             "overwrite": True, "also_peft": False}}
    first = history(server, server.post_prompt(graph))
    path = server.base_dir / "models" / "loras" / "dopsd_ctl" / "requeue.safetensors"
    assert first["status"]["status_str"] == "success" and path.is_file()
    mtime = path.stat().st_mtime_ns
    time.sleep(0.05)
    second = history(server, server.post_prompt(graph))
    assert second["status"]["status_str"] == "success", second["status"]
    assert second["outputs"]["13"]["dopsd_job"][0] != first["outputs"]["13"]["dopsd_job"][0]
    assert path.stat().st_mtime_ns != mtime, "Save LoRA must write the new job's LoRA, not report a cached save"


def test_two_jobs_with_one_save_prefix_are_refused_at_validation(server):
    job_id, _ = start_job(server, "zimage", save_prefix="dopsd_ctl/clash")
    for spelling in ("dopsd_ctl/clash", "./dopsd_ctl//clash"):
        code, body = server.request("POST", "/prompt", {"prompt": train_graph("zimage", "14", save_prefix=spelling),
                                                        "client_id": server.client_id})
        assert code == 400 and "already used by job" in str(body), body
    blocker = server.post_prompt(sample_graph("zimage", steps=3000, prefix="dopsd_ctl/blocker"))
    queued = server.post_prompt(train_graph("zimage", "15", save_prefix="dopsd_ctl/queued"))
    code, body = server.request("POST", "/prompt", {"prompt": train_graph("zimage", "16", save_prefix="dopsd_ctl/queued"),
                                                    "client_id": server.client_id})
    assert code == 400 and "queued prompt" in str(body), body
    server.request("POST", "/queue", {"delete": [queued]})
    server.request("POST", "/interrupt", {"prompt_id": blocker})
    history(server, blocker)
    stop(server, job_id, save=False)


def test_save_prefix_spelled_with_dot_and_double_slash_finishes(server):
    job_id, _ = start_job(server, "zimage", steps=3, save_every=2, save_prefix="./dopsd_ctl//dotted")
    st = wait_for(lambda: (s := status(server, job_id))["state"] in ("finished", "error", "stopped") and s,
                  what="the job to end")
    assert st["state"] == "finished" and st["error"] is None, st["error"]
    names = sorted(p.name for p in (server.base_dir / "models" / "loras" / "dopsd_ctl").glob("dotted_step*"))
    assert names == ["dotted_step00002.safetensors", "dotted_step00003.safetensors"]


def test_stop_while_stopping_is_409_and_nested_json_is_400(server):
    job_id, _ = start_job(server, "zimage", grad_accum=12)
    wait_for(lambda: status(server, job_id)["step"] >= 1, what="the job to train")
    deep = "[" * 100000 + "]" * 100000
    import urllib.error
    import urllib.request
    req = urllib.request.Request(server.url + f"/dopsd/jobs/{job_id}/stop", data=deep.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        code = urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        code = e.code
    assert code == 400
    code, body = server.request("POST", f"/dopsd/jobs/{job_id}/stop", {"save": False})
    assert code == 200 and body["state"] == "stopping"
    code, body = server.request("POST", f"/dopsd/jobs/{job_id}/stop", {"save": False})
    assert code == 409, body
    stop(server, job_id)
