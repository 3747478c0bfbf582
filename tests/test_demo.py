"""The README's demo (scripts/demo.py), shortened: a real headless ComfyUI runs the shipped toy-world workflow on
the shipped weights and the script collects images, loss curve and LoRA. The full-length run and what it
measured are in README.md; here training is cut to a few steps, so only the plumbing is asserted."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
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
    assert Image.open(out / "loss.png").size[0] > 0

    again = subprocess.run([sys.executable, str(comfy_env.REPO / "scripts" / "demo.py"), "--out", str(out)],
                           cwd=comfy_env.REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "not empty" in (again.stdout + again.stderr)  # never overwrites a run
