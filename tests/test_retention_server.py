"""Issue 15: on-policy retention from the trainer node, on a real ComfyUI server with its tiny Z-Image.

- ratio 0 with the retention input wired trains bit for bit as without it;
- ratio > 0 adds retention losses whose teacher is the frozen base model (with ema_decay 0 an EMA teacher would
  equal the student on the same text-only condition, loss exactly 0; the base gives > 0);
- a resumed job draws the retention steps the uninterrupted job drew (same LoRA bits), and says nothing;
- a job resumed with other retention (ratio, prompts, none, or some where the checkpoint had none) trains on and
  tells the user in its status's `warnings` (the card and a toast show them), naming the fix;
- a CLIP of the wrong width is refused with an error that names the fix.
"""
import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_server as server_lib
from conftest import TINY_QWEN3_FILE, TINY_ZIMAGE_FILE
from dopsd_core import retention

pytestmark = pytest.mark.server
PROMPTS = "a photo of a dog\na red car"


def graph(retention_ratio=None, clip="2", prompts=PROMPTS, **settings):
    trainer = dict(model=["4", 0], pairs=["12", 0], method="dopsd", steps=4, inference_steps=4, train_steps=4,
                   schedule="auto", loss_space="x0", rank=4, alpha=4.0, learning_rate=0.01, ema_decay=0.9,
                   ema_warmup=False, detach_states=True, precision="fp32", grad_accum=1, grad_clip=1.0,
                   gradient_checkpointing=False, seed=0, save_prefix="", save_every=0, preview_every=0,
                   targets="auto")
    trainer.update(settings)
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_ZIMAGE_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
        "3": {"class_type": "TestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "TestTinyKleinCLIP", "inputs": {}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "dopsd_ret_target.png"}},
        "11": {"class_type": "DOPSDDatasetFromImages", "inputs": {
            "images": ["10", 0], "captions": "a photo of a [trigger] cat", "trigger": "sks", "resolution": 64}},
        "12": {"class_type": "DOPSDTeacherReferenceLatent", "inputs": {
            "dataset": ["11", 0], "clip": ["2", 0], "vae": ["3", 0], "teacher_prompt_prefix": "as in the image:"}},
        "13": {"class_type": "DOPSDTrainer", "inputs": trainer},
    }
    if retention_ratio is not None:
        g["14"] = {"class_type": "DOPSDRetentionPrompts", "inputs": {
            "clip": [clip, 0], "prompts": prompts, "pairs": ["12", 0], "trigger": "sks", "variations": 2, "seed": 0}}
        trainer.update(retention=["14", 0], retention_ratio=retention_ratio)
    return g


@pytest.fixture()
def server(comfy_server):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        comfy_server.base_dir / "input" / "dopsd_ret_target.png")
    return comfy_server


wait_for = functools.partial(server_lib.wait_for, timeout=120)


def failed_entry(server, g):
    """The /history entry of a prompt expected to fail (server.run_prompt raises on failure)."""
    prompt_id = server.post_prompt(g)

    def done():
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        return entry if entry and entry.get("status", {}).get("completed") is not None else None
    return wait_for(done, what=f"prompt {prompt_id}")


def train(server, make=graph, **kw):
    entry = server.run_prompt(make(**kw), timeout=120)  # raises with ComfyUI's messages if the prompt failed
    job_id = entry["outputs"]["13"]["dopsd_job"][0]
    st = wait_for(lambda: (s := server.get_json(f"/dopsd/jobs/{job_id}"))["state"] in ("finished", "error", "stopped")
                  and s, what="the job to end")
    assert st["state"] == "finished", st["error"]
    return job_id, st


def lora_file(server, prefix, step):
    return load_file(str(server.base_dir / "models" / "loras" / f"{prefix}_step{step:05d}.safetensors"))


def lora_metadata(server, prefix, step):
    with safe_open(str(server.base_dir / "models" / "loras" / f"{prefix}_step{step:05d}.safetensors"), "pt") as f:
        return f.metadata()


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nodes_are_registered(object_info):
    assert "DOPSDRetentionPrompts" in object_info
    optional = object_info["DOPSDTrainer"]["input"]["optional"]
    assert "retention" in optional and optional["retention_ratio"][1]["default"] == 0.0


def test_ratio_zero_trains_bit_for_bit_as_without_retention(server):
    _, plain = train(server, save_prefix="ret/plain", steps=3)
    _, wired = train(server, save_prefix="ret/ratio0", steps=3, retention_ratio=0.0)
    assert [l for _, l in plain["losses"]] == [l for _, l in wired["losses"]]
    assert same_tensors(lora_file(server, "ret/plain", 3), lora_file(server, "ret/ratio0", 3))
    assert all("dopsd.retention" not in lora_metadata(server, p, 3) for p in ("ret/plain", "ret/ratio0"))


def test_retention_steps_are_taught_by_the_base_model(server):
    steps, ratio = 8, 0.4
    # 2 prompts + the class prompt "a photo of a cat" + 2 variations
    draws = retention.schedule(seed=0, ratio=ratio, n_prompts=5, micro_steps=steps)
    first = next(i for i, d in enumerate(draws) if d is not None)
    assert first > 0
    _, base = train(server, steps=steps, ema_decay=0.0)
    _, mixed = train(server, steps=steps, ema_decay=0.0, retention_ratio=ratio)
    lb, lm = [l for _, l in base["losses"]], [l for _, l in mixed["losses"]]
    assert lm[:first] == lb[:first]          # the same concept steps until the first retention draw ...
    # ... which adds a retention loss. ema_decay 0: the EMA teacher equals the student, so an EMA teacher on the
    # same text-only condition would add exactly 0; the LoRA-off base adds > 0
    assert lm[first] > lb[first], (first, lb, lm)


def test_resumed_job_draws_what_the_uninterrupted_job_drew(server):
    train(server, steps=6, retention_ratio=0.5, save_prefix="ret/full")
    first, _ = train(server, steps=3, retention_ratio=0.5, save_every=3)
    draws = retention.schedule(seed=0, ratio=0.5, n_prompts=5, micro_steps=6)
    assert any(d is not None for d in draws[3:]) and any(d is None for d in draws[3:])
    _, resumed = train(server, steps=6, retention_ratio=0.5, save_prefix="ret/resumed", resume_from=first)
    assert same_tensors(lora_file(server, "ret/full", 6), lora_file(server, "ret/resumed", 6))
    assert resumed["warnings"] == []
    # the LoRA file says which retention it was trained with
    recorded = json.loads(lora_metadata(server, "ret/full", 6)["dopsd.retention"])
    assert recorded["ratio"] == 0.5 and len(recorded["prompts"]) == 5 and "a photo of a cat" in recorded["prompts"]


def test_resume_with_other_retention_warns_the_user_with_the_fix(server):
    """The checkpoint records the retention it was trained with; a resume with other retention still trains (like
    any other changed setting) but is no exact continuation, and the job's status says so and how to fix it."""
    with_retention, _ = train(server, steps=2, retention_ratio=0.5)
    without, _ = train(server, steps=2)
    fix = ("connect the same D-OPSD Retention Prompts (prompts, pairs, trigger, variations, seed) with "
           "retention_ratio 0.5")
    saved = ("the checkpoint was trained with retention ratio 0.5 and 5 retention prompts ('a photo of a dog', "
             "'a red car'")

    def warnings(**kw):
        _, st = train(server, steps=3, **kw)
        assert st["step"] == 3
        return st["warnings"]

    [w] = warnings(resume_from=with_retention, retention_ratio=0.25)
    assert w.startswith(f"resume_from: {saved}") and "(ratio 0.5 -> 0.25)" in w and fix in w, w
    assert "will not match an uninterrupted run" in w
    [w] = warnings(resume_from=with_retention, retention_ratio=0.5, prompts="a photo of a dog\na blue bus")
    assert w.startswith(f"resume_from: {saved}") and "new: 'a blue bus'" in w and "gone: 'a red car'" in w and fix in w
    [w] = warnings(resume_from=with_retention)
    assert w.startswith(f"resume_from: {saved}") and "this run has no retention" in w and fix in w, w
    [w] = warnings(resume_from=without, retention_ratio=0.5)
    assert w.startswith("resume_from: the checkpoint was trained with no retention; this run has retention ratio 0.5")
    assert "disconnect D-OPSD Retention Prompts or set retention_ratio 0" in w, w


def test_a_clip_of_another_width_is_refused_with_the_fix(server):
    entry = failed_entry(server, graph(retention_ratio=0.5, clip="5", save_prefix="ret/never"))
    assert entry["status"]["status_str"] == "error"
    text = str(entry["status"]["messages"])
    assert "retention conditioning has width" in text and "Connect the same CLIP to D-OPSD Retention Prompts" in text


def test_retention_joins_batches_of_two(server):
    """batch_size 2 (two same-size images, one caption): a drawn retention prompt runs after the concept batch."""
    def batched(**kw):
        g = graph(**kw)
        g["15"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 2}}
        g["11"]["inputs"]["images"] = ["15", 0]
        return g

    def run(**kw):
        return [loss for _, loss in train(server, make=batched, **kw)[1]["losses"]]

    steps, ratio = 6, 0.4
    draws = retention.schedule(seed=0, ratio=ratio, n_prompts=5, micro_steps=steps)
    first = next(i for i, d in enumerate(draws) if d is not None)
    base = run(steps=steps, ema_decay=0.0, batch_size=2)
    mixed = run(steps=steps, ema_decay=0.0, batch_size=2, retention_ratio=ratio)
    assert mixed[:first] == base[:first] and mixed[first] > base[first], (first, base, mixed)
