#!/usr/bin/env python
"""The README's demo: the shipped toy-world workflow, end to end, in a real headless ComfyUI on the CPU.

    bash scripts/demo.sh                 # sets up .venv first (scripts/setup_env.sh), then runs this
    .venv/bin/python scripts/demo.py [--steps N] [--out DIR] [--retention]

It starts ComfyUI (`main.py --cpu`) with this pack in a fresh base directory, converts
`workflows/D-OPSD demo - toy world (CPU).json` to the API format exactly as the frontend queues it, posts it,
follows the background training job through the pack's /dopsd/jobs route, and when the prompt is done collects
into one output folder:
  teacher_preview.png   student | teacher | target at 4 steps, before training
  before.png, after.png the 4-step sampler on the trigger prompt without / with the learned LoRA (same noises)
  ordinary_before.png, ordinary_after.png   the same for an ordinary prompt that names no colour (the bleed)
  loss.png, losses.json the job's loss curve
  <name>.safetensors    the saved LoRA (a standard ComfyUI LoRA)
  summary.json          what the toy world's evaluator reads in before/after (the concept's share of samples)
With --retention it runs `workflows/D-OPSD demo - toy world with retention (CPU).json` instead (on-policy retention:
ordinary prompts stay as the base model drew them; about twice the training time).
  comfyui/              the server's base directory, with its log
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the server driver and workflow converter the tests use
sys.path.insert(1, str(REPO))

WORKFLOW = REPO / "workflows" / "D-OPSD demo - toy world (CPU).json"
WORKFLOW_RETENTION = REPO / "workflows" / "D-OPSD demo - toy world with retention (CPU).json"


def _set_input(prompt: dict, class_type: str, name: str, value):
    hits = [n for n in prompt.values() if n["class_type"] == class_type]
    if len(hits) != 1:
        raise RuntimeError(f"expected one {class_type} in the demo workflow, found {len(hits)}")
    hits[0]["inputs"][name] = value


class _JobReporter:
    """Called at each poll of the prompt: finds the training job and prints its progress every few seconds."""

    def __init__(self, server):
        self.server, self.job_id, self.status, self.last_print, self.last_state = server, None, None, 0.0, None

    def __call__(self):
        if self.job_id is None:
            jobs = self.server.get_json("/dopsd/jobs")["jobs"]
            self.job_id = jobs[-1]["job_id"] if jobs else None
        if self.job_id is None:
            return
        self.status = status = self.server.get_json(f"/dopsd/jobs/{self.job_id}")
        if time.monotonic() - self.last_print > 5 or status["state"] != self.last_state:
            loss = status["losses"][-1][1] if status["losses"] else float("nan")
            print(f"[demo] job {self.job_id}: {status['state']} step {status['step']}/{status['total_steps']} "
                  f"loss {loss:.4f}", flush=True)
            self.last_print, self.last_state = time.monotonic(), status["state"]


def _saved_images(server, entry, prompt, prefix):
    ids = [i for i, n in prompt.items() if n["class_type"] == "SaveImage" and n["inputs"]["filename_prefix"] == prefix]
    files = []
    for node_id in ids:
        for img in entry["outputs"].get(node_id, {}).get("images", []):
            files.append(server.base_dir / img["type"] / img["subfolder"] / img["filename"])
    return files


def _grid(files, path, scale=4):
    """The saved 32x32 PNGs side by side, nearest-neighbour upscaled; returns them as a [-1, 1] tensor."""
    import numpy as np
    import torch
    from PIL import Image
    from toyworld.render import save_grid
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for f in files]
    images = torch.from_numpy(np.stack(arrays)).movedim(-1, 1)
    save_grid(images, str(path), nrow=8, scale=scale)
    return images


def _evaluate(**samples):
    """The toy world's evaluator on each named set of samples: how many show the held-out colour, and the shape
    asked for (a circle, in both prompts of the demo)."""
    import torch
    from toyworld import build as tb
    b = tb.load(build_if_missing=False, log=None)
    colour = b.world.held_out["colour"]
    out = {"concept": f"held-out colour {colour!r}"}
    with torch.no_grad():
        for name, images in samples.items():
            pred = b.evaluator.predict(images)
            out[name] = {"concept_share": float((pred[:, 1] == b.world.index("colour", colour)).float().mean()),
                         "shape_circle_share": float((pred[:, 0] == b.world.index("shape", "circle")).float().mean())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: out/demo/<date-time>)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the workflow's)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--retention", action="store_true", help="run the demo workflow with on-policy retention")
    args = ap.parse_args(argv)
    workflow = WORKFLOW_RETENTION if args.retention else WORKFLOW

    import comfy_env
    import comfy_server
    import workflow_api
    from toyworld.plot import learning_curves

    out = Path(args.out or REPO / "out" / "demo" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"[demo] {out} is not empty: pick another --out (nothing is overwritten)")
    t0 = time.time()
    base = comfy_server.prepare_base_dir(out / "comfyui", test_support=False)
    print(f"[demo] starting ComfyUI {comfy_env.comfy_root()} (CPU) with the pack; log {base / 'server.log'}", flush=True)
    server = comfy_server.ComfyServer(base, startup_timeout=180.0)
    try:
        info = server.get_json("/object_info")
        prompt = workflow_api.to_api(json.loads(workflow.read_text(encoding="utf-8")), info)
        if args.steps:
            _set_input(prompt, "DOPSDTrainer", "steps", args.steps)
        print(f"[demo] queueing {workflow.name}", flush=True)
        report = _JobReporter(server)
        entry = server.wait_history(server.post_prompt(prompt), args.timeout, on_poll=report)
        report()  # the job's final status
        status = report.status
    finally:
        server.stop()
    if status is None or status["state"] != "finished":
        raise SystemExit(f"[demo] the training job did not finish: {status}")

    teacher = _saved_images(server, entry, prompt, "dopsd_demo/teacher_preview")
    before_files = _saved_images(server, entry, prompt, "dopsd_demo/before_base")
    after_files = _saved_images(server, entry, prompt, "dopsd_demo/after_lora")
    _grid(teacher, out / "teacher_preview.png", scale=6)
    before = _grid(before_files, out / "before.png")
    after = _grid(after_files, out / "after.png")
    ordinary_before = _grid(_saved_images(server, entry, prompt, "dopsd_demo/ordinary_base"), out / "ordinary_before.png")
    ordinary_after = _grid(_saved_images(server, entry, prompt, "dopsd_demo/ordinary_lora"), out / "ordinary_after.png")
    losses = status["losses"]
    (out / "losses.json").write_text(json.dumps(losses))
    window = 20
    recent = [[v for _, v in losses[max(0, i - window + 1): i + 1]] for i in range(len(losses))]
    smooth = [(s, sum(r) / len(r)) for (s, _), r in zip(losses, recent)]
    learning_curves(str(out / "loss.png"), [{"title": "D-OPSD loss per step (x0 space, batch 1)",
                                             "series": {"loss": losses, f"mean of the last {window}": smooth},
                                             "base": None}],
                    ["loss", f"mean of the last {window}"], width=700, height=380, legend_base=None)
    lora = Path(status["lora_path"])
    shutil.copy2(lora, out / lora.name)
    summary = {"workflow": workflow.name, "steps": status["step"], "lora": lora.name,
               "wall_s": round(time.time() - t0, 1),
               **_evaluate(before=before, after=after, ordinary_before=ordinary_before, ordinary_after=ordinary_after)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] done in {summary['wall_s']:.0f} s. The evaluator reads the new colour in "
          f"{summary['before']['concept_share']:.0%} of the samples before and {summary['after']['concept_share']:.0%} after; "
          f"in the ordinary prompt's samples {summary['ordinary_before']['concept_share']:.0%} before and "
          f"{summary['ordinary_after']['concept_share']:.0%} after.")
    for name in ("teacher_preview.png", "before.png", "after.png", "ordinary_before.png", "ordinary_after.png",
                 "loss.png", lora.name, "summary.json"):
        print(f"[demo]   {out / name}")
    return out


if __name__ == "__main__":
    main()
