"""The README's demo (scripts/demo.py), shortened: a real headless ComfyUI runs the shipped toy-world workflow on
the shipped weights and the script collects images, loss curve and LoRA. The full-length run and what it
measured are in README.md; here training is cut to a few steps, so only the plumbing is asserted."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_env


@pytest.mark.server
@pytest.mark.slow
def test_demo_runs_the_toy_workflow_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(comfy_env.REPO / "scripts" / "demo.py"), "--steps", "12",
                           "--out", str(out)], cwd=comfy_env.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{out}" in proc.stdout  # it prints where everything is

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["concept"].startswith("held-out colour")
    losses = json.loads((out / "losses.json").read_text())
    assert [s for s, _ in losses] == list(range(1, 13)) and all(np.isfinite(v) and v > 0 for _, v in losses)

    lora = load_file(str(out / summary["lora"]))
    assert lora and all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in lora)

    before = np.asarray(Image.open(out / "before.png"), dtype=np.float32)
    after = np.asarray(Image.open(out / "after.png"), dtype=np.float32)
    teacher = Image.open(out / "teacher_preview.png")
    assert before.shape == after.shape and before.shape[0] > 32 and teacher.width > teacher.height
    assert np.abs(before - after).max() > 0, "the LoRA changes the 4-step samples"
    assert Image.open(out / "ordinary_after.png").size == Image.open(out / "before.png").size  # the bleed check
    assert Image.open(out / "loss.png").size[0] > 0

    again = subprocess.run([sys.executable, str(comfy_env.REPO / "scripts" / "demo.py"), "--out", str(out)],
                           cwd=comfy_env.REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "not empty" in (again.stdout + again.stderr)  # never overwrites a run


@pytest.mark.server
@pytest.mark.slow
def test_demo_with_retention_trains_with_the_retention_prompts(tmp_path):
    """The shipped toy workflow with on-policy retention (`scripts/demo.py --retention`): the trainer really mixed
    the Retention Prompts node's prompts in (the LoRA file records them), and the ordinary prompt's samples come out."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(comfy_env.REPO / "scripts" / "demo.py"), "--retention", "--steps", "6",
                           "--out", str(out)], cwd=comfy_env.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workflow"] == "D-OPSD demo - toy world with retention (CPU).json" and summary["steps"] == 6
    with safe_open(str(out / summary["lora"]), "pt") as f:
        recorded = json.loads(f.metadata()["dopsd.retention"])
    assert recorded["ratio"] == 1.0
    assert {"a circle", "a square", "a red circle"} <= set(recorded["prompts"])   # listed + the pairs' class prompts
    assert not any("sks" in p for p in recorded["prompts"])
    for name in ("ordinary_before.png", "ordinary_after.png"):
        assert Image.open(out / name).size[0] > 32
