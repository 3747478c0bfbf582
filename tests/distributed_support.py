"""Helpers for the scale-out tests: an exported tiny set, and launcher runs on 1-2 local CPU ranks (gloo).

Ranks are separate processes given torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), or real `torchrun` where the test is about the command.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import comfy_env

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "scripts" / "dopsd_torchrun.py"
TEST_SUPPORT = Path(__file__).resolve().parent / "comfy_test_support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COMFYUI_PATH=str(comfy_env.comfy_root()))
    env.pop("PYTHONPATH", None)
    return env


def launcher_args(model_file, data, out, **options) -> list:
    args = ["--cpu", "--model", str(model_file), "--data", str(data), "--out", str(out),
            "--import-module", str(TEST_SUPPORT), "--precision", "fp32", "--timeout", "30"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def start_ranks(world: int, args: list, log_dir: Path):
    """Start `world` launcher processes; returns [(Popen, stdout path, stderr path)]."""
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        out, err = log_dir / f"rank{rank}.out", log_dir / f"rank{rank}.err"
        procs.append((subprocess.Popen([sys.executable, str(LAUNCHER), *args], env=rank_env(rank, world, port),
                                       stdout=open(out, "w"), stderr=open(err, "w"), cwd=str(REPO)), out, err))
    return procs


def wait_ranks(procs, timeout: float = 240.0):
    end = time.time() + timeout
    codes = []
    for p, out, err in procs:
        try:
            codes.append(p.wait(max(1.0, end - time.time())))
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            raise AssertionError(f"launcher ranks did not finish in {timeout} s: {read(err)[-2000:]}")
    return codes


def read(path) -> str:
    return Path(path).read_text(errors="replace")


def run_ranks(world: int, args: list, log_dir: Path, timeout: float = 240.0):
    procs = start_ranks(world, args, log_dir)
    codes = wait_ranks(procs, timeout)
    if any(codes):
        logs = "\n".join(f"--- rank {i} rc {c}\n{read(o)[-1500:]}\n{read(e)[-3000:]}"
                         for i, ((_, o, e), c) in enumerate(zip(procs, codes)))
        raise AssertionError(f"launcher failed:\n{logs}")
    return [read(o) for _, o, _ in procs]


def losses(stdout: str) -> list:
    return [float(line.split(" loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]
