#!/usr/bin/env python
"""Build the toy world's weights (evaluator, pre-trained teacher, 4-step student) with a fixed seed.

    .venv/bin/python scripts/toyworld_build.py            # build into the cache (skips if present)
    .venv/bin/python scripts/toyworld_build.py --force    # rebuild
    .venv/bin/python scripts/toyworld_build.py --ship     # also write the fp16 copy to toyworld/weights/
Takes about 24 minutes on 2 CPU cores (pre-training 17, distillation and measurements 7; the pre-training stage
is cached on its own, so --force redoes only the rest). Cache: $DOPSD_TOYWORLD_CACHE or ~/.cache/comfyui-dopsd/toyworld.
"""
import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from toyworld import build as tb  # noqa: E402
from toyworld import weights  # noqa: E402


def ship(b: tb.Build):
    """fp16 copy of what the experiment and the gap test need (encoder, 4-step student, multi-step teacher, evaluator)
    + meta, under toyworld/weights/ (the reflow student stays in the cache)."""
    dst = os.path.join(weights.SHIPPED_DIR, b.meta["key"])
    os.makedirs(dst, exist_ok=True)
    weights.save_module(b.student.encoder, os.path.join(dst, "encoder.safetensors"), half=True)
    weights.save_module(b.student.dit, os.path.join(dst, "dit_student.safetensors"), half=True)
    weights.save_module(b.teacher.dit, os.path.join(dst, "dit_teacher.safetensors"), half=True)
    weights.save_module(b.evaluator, os.path.join(dst, "evaluator.safetensors"), half=True)
    weights.write_meta(dst, {**b.meta, "shipped": "fp16; the reflow student is only in the build cache"})
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(f"[build] shipped copy in {dst} ({size / 1e6:.2f} MB)")


def gap_picture(b: tb.Build, path: str, n: int = 12):
    """Rows: real renders of n ordinary prompts; the multi-step teacher at 4 and at 32 Euler steps; the 4-step
    student (same noise per column)."""
    from toyworld.measure import original_prompts
    from toyworld.render import save_grid
    p = original_prompts(b.world, b.evaluator, n, seed=100)
    rows = [p.real[:n]] + [m.sample(p.captions, p.noise, tb.student_sigmas(k))
                           for m, k in ((b.teacher, 4), (b.teacher, 32), (b.student, 4))]
    save_grid(torch.cat(rows), path, nrow=n, scale=3)
    print(f"[build] {path}: real | teacher 4 steps | teacher 32 steps | student 4 steps; prompts {p.captions}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="redo the distillation and measurements even if the cache "
                    "holds this build (the pre-training stage is reused from its own cache)")
    ap.add_argument("--ship", action="store_true", help="write the fp16 copy to toyworld/weights/")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = tb.BuildConfig()
    cached = os.path.join(weights.cache_root(), cfg.key())
    t = time.time()
    if args.force or not os.path.exists(os.path.join(cached, "meta.json")):
        if os.path.exists(cached):
            shutil.rmtree(cached)
        b = tb.build(cfg, directory=cached)
    else:
        b = tb.load_dir(cached)
        print(f"[build] found {cached}")
    print(f"[build] total {time.time() - t:.0f} s")
    if "measurements" in b.meta:
        print(tb.gap_table(b.meta["measurements"]))
    if args.ship:
        ship(b)
        gap_picture(tb.load_dir(os.path.join(weights.SHIPPED_DIR, b.meta["key"])),
                    os.path.join(os.path.dirname(weights.SHIPPED_DIR), "..", "docs", "toyworld", "gap.png"))


if __name__ == "__main__":
    main()
