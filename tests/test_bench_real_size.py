"""The real-size GPU harness in its tiny CPU mode: it runs end to end and prints one complete table."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_real_size_tiny_prints_the_table():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_real_size.py"), "--comfyui", str(comfy_env.comfy_root()),
           "--tiny", "--models", "klein4b", "--steps", "1", "--scaling", "2", "--fp8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| klein4b |")]
    whats = [r.split("|")[2].strip() for r in rows]
    assert any(w.startswith("pack D-OPSD K=4 (fp32") for w in whats)
    assert any(w.startswith("pack D-OPSD K=4 (fp8 base") for w in whats)  # crashed in backward before lora_patch froze the base
    assert "ComfyUI TrainLoraNode (SFT, 1 fwd+bwd)" in whats  # no error bracket
    assert any(w.startswith("torchrun 1 rank") for w in whats) and any(w.startswith("torchrun 2 rank") for w in whats)
    for r in rows:
        s_per_step = r.split("|")[3].strip()
        assert re.fullmatch(r"\d+\.\d{3}", s_per_step) and float(s_per_step) > 0, r
