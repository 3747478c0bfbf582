#!/usr/bin/env python
"""Run the toy-world experiment: a held-out concept learned by SFT, off-policy distillation and D-OPSD
(velocity and x0 losses); prints the table, writes the learning curves and sample grids.

    .venv/bin/python scripts/toyworld_experiment.py                    # the README's table and plot
    .venv/bin/python scripts/toyworld_experiment.py --reduced --seeds 0 1 2 3 4   # the CI version, several seeds
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
                           ("retention", "attribute accuracy, original prompts (retention)", None),
                           ("fd_orig", "FD of 4-step samples, original prompts (lower is better)", None),
                           ("sharpness_orig", "edge energy of 4-step samples / real, original prompts", None)]:
        series = {NAMES.get(m, m): [(c["step"], c[key]) for c in res["methods"][m]["curves"]] for m in methods}
        panels.append({"title": title, "series": series, "base": res["methods"][methods[0]]["curves"][0][key],
                       "y_range": yr})
    learning_curves(os.path.join(out_dir, f"curves{tag}.png"), panels, names, width=1800)


def write_outputs(res, out_dir, tag=""):
    os.makedirs(out_dir, exist_ok=True)
    methods = list(res["methods"])
    write_curves(res, out_dir, tag)
    s = res["_samples"]
    targets = res["_target_images"][:8]
    blank = torch.ones(8 - len(targets), *targets.shape[1:])  # white tiles keep one model per row
    order = ["base"] + methods
    # rows: targets; then per model: trigger-prompt samples, then original-prompt samples
    grid = [torch.cat([targets, blank])] + [s[m][1][:8] for m in order] + [s[m][0][:8] for m in order]
    save_grid(torch.cat(grid), os.path.join(out_dir, f"samples{tag}.png"), nrow=8, scale=3)
    with open(os.path.join(out_dir, f"results{tag}.json"), "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=1)
    with open(os.path.join(out_dir, f"table{tag}.md"), "w") as f:
        f.write(tx.table(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true", help="the CI test's reduced settings")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="training seeds (one run each)")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--axis", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lrs", type=float, nargs="*", default=None,
                    help="learning rates, one full run each (the README's table: 1e-3 4e-3 1.6e-2)")
    ap.add_argument("--out", default=os.path.join("docs", "toyworld"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = tb.load()
    summary, rows = [], []
    for seed in args.seeds:
        for lr in args.lrs or [None]:
            cfg = tx.reduced_config(seed) if args.reduced else tx.ExperimentConfig(seed=seed)
            over = {k: v for k, v in (("methods", args.methods), ("axis", args.axis), ("steps", args.steps),
                                      ("lr", lr)) if v}
            cfg = dataclasses.replace(cfg, **over)
            t = time.time()
            res = tx.run_experiment(b, cfg)
            print(f"[experiment] seed {seed} lr {cfg.lr:g} done in {time.time() - t:.0f} s")
            print(tx.table(res))
            tag = (("_reduced" if args.reduced else "") + (f"_seed{seed}" if len(args.seeds) > 1 else "")
                   + (f"_lr{cfg.lr:g}" if args.lrs else ""))
            write_outputs(res, args.out, tag)
            rows += tx.table_rows(res, with_base=not rows)
            summary.append({"seed": seed, "lr": cfg.lr, "base": res["base"],
                            **{m: {**r["final"], "train_s": r["train_s"]} for m, r in res["methods"].items()}})
    if len(rows) > 1 + len(tx.METHODS):
        with open(os.path.join(args.out, "table_all.md"), "w") as f:
            f.write(tx.TABLE_HEAD + "\n".join(rows) + "\n")
        print(tx.TABLE_HEAD + "\n".join(rows))
    if len(args.seeds) > 1:
        path = os.path.join(args.out, "seeds" + ("_reduced" if args.reduced else "") + ".json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"[experiment] per-seed summary in {path}")


if __name__ == "__main__":
    main()
