#!/usr/bin/env python
"""Run the toy-world experiment: a held-out concept learned by SFT, off-policy distillation, D-OPSD (velocity and
x0 losses) and D-OPSD + on-policy retention, over several training seeds; prints the tables (mean ± sd, FD noise
floors), writes the learning curves and sample grids of the first seed.

    .venv/bin/python scripts/toyworld_experiment.py --seeds 0 1 2 --threads 1          # the README's tables
    .venv/bin/python scripts/toyworld_experiment.py --reduced --seeds 0 1 2 3 4 --threads 1   # the CI margins
Deterministic with --threads 1 (same weights, same seeds, same numbers).
Weights come from toyworld/weights/ (shipped) or the cache, or are built first (scripts/toyworld_build.py).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from toyworld import build as tb  # noqa: E402
from toyworld import experiment as tx  # noqa: E402
from toyworld.plot import learning_curves  # noqa: E402
from toyworld.render import save_grid  # noqa: E402

NAMES = tx.NAMES


def write_curves(res, out_dir, tag=""):
    """The learning curves PNG from a results dict (or its results.json)."""
    methods = list(res["methods"])
    names = [NAMES.get(m, m) for m in methods]
    panels = []
    for key, title, yr in [("concept_acc", "concept accuracy, trigger prompts (higher is better)", (0, 1)),
                           ("retention", "attribute accuracy, ordinary prompts (retention)", None),
                           ("bleed", "bleed rate: no-colour prompts drawn in the concept colour", None),
                           ("fd_orig", "FD of 4-step samples, ordinary prompts (lower is better)", None),
                           ("dsharp_orig", "denoised sharpness of 4-step samples / real", None)]:
        series = {NAMES.get(m, m): [(c["step"], c[key]) for c in res["methods"][m]["curves"]] for m in methods}
        panels.append({"title": title, "series": series, "base": res["methods"][methods[0]]["curves"][0][key],
                       "y_range": yr})
    learning_curves(os.path.join(out_dir, f"curves{tag}.png"), panels, names, width=1800)


def write_outputs(res, out_dir, tag=""):
    """Curves, sample grid and the full results of one training seed."""
    os.makedirs(out_dir, exist_ok=True)
    methods = list(res["methods"])
    write_curves(res, out_dir, tag)
    s = res["_samples"]
    targets = res["_target_images"][:8]
    blank = torch.ones(8 - len(targets), *targets.shape[1:])  # white tiles keep one model per row
    order = [m for m in ["base"] + methods if s.get(m) is not None]
    # rows: targets; then per model: trigger-prompt samples, then original-prompt samples
    grid = [torch.cat([targets, blank])] + [s[m][1][:8] for m in order] + [s[m][0][:8] for m in order]
    save_grid(torch.cat(grid), os.path.join(out_dir, f"samples{tag}.png"), nrow=8, scale=3)
    with open(os.path.join(out_dir, f"results{tag}.json"), "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true", help="the CI test's reduced settings")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds (one run each)")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--retention-ratio", type=float, default=None)
    ap.add_argument("--out", default=os.path.join("docs", "toyworld"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = tb.load()
    tag = "_reduced" if args.reduced else ""
    runs, base, started = [], None, time.time()
    for seed in args.seeds:
        cfg = tx.reduced_config(seed) if args.reduced else tx.ExperimentConfig(seed=seed)
        over = {k: v for k, v in (("methods", args.methods), ("steps", args.steps),
                                  ("retention_ratio", args.retention_ratio)) if v is not None}
        cfg = dataclasses.replace(cfg, **over)
        t = time.time()
        res = tx.run_experiment(b, cfg, base=base)
        print(f"[experiment] seed {seed} done in {time.time() - t:.0f} s")
        if base is None:
            base = res["base"]
            write_outputs(res, args.out, tag)
        runs.append({k: v for k, v in res.items() if not k.startswith("_")})
    agg = tx.aggregate(runs)
    text = tx.table(agg)
    print(text)
    with open(os.path.join(args.out, f"table{tag}.md"), "w") as f:
        f.write(text)
    summary = [{"seed": r["config"]["seed"], "base": r["base"], "floors": r["floors"],
                **{m: {**x["final"], "train_s": x["train_s"], "passes_per_step": x["passes_per_step"]}
                   for m, x in r["methods"].items()}} for r in runs]
    with open(os.path.join(args.out, f"seeds{tag}.json"), "w") as f:
        json.dump({"aggregate": agg, "runs": summary, "wall_s": time.time() - started}, f, indent=1)
    print(f"[experiment] {len(runs)} seeds in {time.time() - started:.0f} s; per-seed numbers in "
          f"{os.path.join(args.out, f'seeds{tag}.json')}")


if __name__ == "__main__":
    main()
