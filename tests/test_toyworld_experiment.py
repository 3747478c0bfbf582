"""The toy-world experiment, reduced (toyworld.experiment.reduced_config: SFT, D-OPSD (velocity) and D-OPSD +
on-policy retention, 40 steps of 12 rows at lr 1e-3, one sampling noise, smaller prompt sets) on the shipped
weights, asserting the directions measured. The margins come from five training seeds
(`scripts/toyworld_experiment.py --reduced --seeds 0 1 2 3 4 --threads 1`, recorded in
docs/toyworld/seeds_reduced.json); the test runs seed 0 and checks that every recorded seed meets the margins
too, so the thresholds cannot quietly drift away from what was measured."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)

from toyworld import build as tb  # noqa: E402
from toyworld import experiment as tx  # noqa: E402

SEEDS_FILE = os.path.join(REPO, "docs", "toyworld", "seeds_reduced.json")

# Margins (see the module docstring for where they come from; the measured ranges over the 5 seeds in brackets).
MIN_CONCEPT_GAIN_OVER_SFT = 0.12           # D-OPSD concept accuracy minus SFT's [0.19-0.31]
MIN_RETENTION_CONCEPT_GAIN_OVER_SFT = 0.05  # D-OPSD + retention still learns more of the concept than SFT [0.08-0.24]
MIN_BLEED_CUT = 0.04                       # D-OPSD's bleed rate minus D-OPSD + retention's [0.06-0.16]
MAX_FD_RATIO = 0.65                        # FD on ordinary prompts, D-OPSD + retention over D-OPSD [0.41-0.53]
MAX_SFT_CONCEPT = 0.15                     # SFT at this budget has not learnt the concept [0.06-0.10]


def _check(base, sft, dopsd, kept):
    assert base["concept_acc"] < 0.1, base
    assert dopsd["concept_acc"] - sft["concept_acc"] >= MIN_CONCEPT_GAIN_OVER_SFT, (sft, dopsd)
    assert kept["concept_acc"] - sft["concept_acc"] >= MIN_RETENTION_CONCEPT_GAIN_OVER_SFT, (sft, kept)
    assert sft["concept_acc"] <= MAX_SFT_CONCEPT, sft
    assert dopsd["bleed"] - kept["bleed"] >= MIN_BLEED_CUT, (dopsd, kept)
    assert kept["fd_orig"] <= MAX_FD_RATIO * dopsd["fd_orig"], (dopsd, kept)


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the record was made with --threads 1
    try:
        b = tb.load(build_if_missing=False, log=None)
        return tx.run_experiment(b, tx.reduced_config(0), log=None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_reduced_experiment_direction_holds(results):
    m = results["methods"]
    _check(results["base"], m["sft"]["final"], m["dopsd_velocity"]["final"], m["dopsd_retention"]["final"])
    assert m["dopsd_retention"]["retention_steps"] == results["config"]["steps"] - 1   # ratio 1: all but step 1


@pytest.mark.slow
def test_reduced_experiment_is_what_the_seed_record_says(results):
    """Seed 0 here reproduces seed 0 of the record (same weights, same seeds, one thread), and every recorded seed
    meets the margins: the thresholds hold across seeds, not only for the one CI runs."""
    with open(SEEDS_FILE) as f:
        record = json.load(f)["runs"]
    assert sorted(r["seed"] for r in record) == [0, 1, 2, 3, 4]
    for r in record:
        _check(r["base"], r["sft"], r["dopsd_velocity"], r["dopsd_retention"])
    seed0 = next(r for r in record if r["seed"] == 0)
    for method in ("sft", "dopsd_velocity", "dopsd_retention"):
        got = results["methods"][method]["final"]
        for key in ("concept_acc", "retention", "bleed"):
            assert got[key] == pytest.approx(seed0[method][key], abs=0.02), (method, key)
        assert got["fd_orig"] == pytest.approx(seed0[method]["fd_orig"], rel=0.05), method
