"""The toy-world experiment, reduced (toyworld.experiment.reduced_config: SFT and D-OPSD with the velocity loss, 60
steps at lr 1e-3, smaller prompt sets) on the shipped weights, asserting the direction the full experiment
measured. The margins come from five training seeds (`scripts/toyworld_experiment.py --reduced --seeds 0 1 2 3 4`,
recorded in docs/toyworld/seeds_reduced.json); the test runs seed 0 and checks that the recorded seeds agree
with the margins too, so the thresholds cannot quietly drift away from what was measured."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)

from toyworld import build as tb  # noqa: E402
from toyworld import experiment as tx  # noqa: E402

SEEDS_FILE = os.path.join(REPO, "docs", "toyworld", "seeds_reduced.json")

# Margins (see the module docstring for where they come from).
MIN_CONCEPT_GAIN_OVER_SFT = 0.5    # D-OPSD concept accuracy minus SFT's, same steps, rank, lr and data (seeds: 0.67-0.74)
MIN_DOPSD_CONCEPT = 0.55           # D-OPSD reaches it from 0.03 (seeds: 0.73-0.79)
MAX_SFT_CONCEPT = 0.2              # SFT at this budget has not learnt the concept (seeds: 0.04-0.06)
MAX_RETENTION_DROP = 0.2           # D-OPSD's attribute accuracy on original prompts vs base (seeds: 0.07-0.10)


def _check(base, sft, dopsd):
    assert dopsd["concept_acc"] - sft["concept_acc"] >= MIN_CONCEPT_GAIN_OVER_SFT, (sft, dopsd)
    assert dopsd["concept_acc"] >= MIN_DOPSD_CONCEPT and base["concept_acc"] < 0.1, (base, dopsd)
    assert sft["concept_acc"] <= MAX_SFT_CONCEPT, sft
    assert base["retention"] - dopsd["retention"] <= MAX_RETENTION_DROP, (base, dopsd)


@pytest.fixture(scope="module")
def results():
    b = tb.load(build_if_missing=False, log=None)
    return tx.run_experiment(b, tx.reduced_config(0), log=None)


@pytest.mark.slow
def test_reduced_experiment_direction_holds(results):
    m = results["methods"]
    _check(results["base"], m["sft"]["final"], m["dopsd_velocity"]["final"])


@pytest.mark.slow
def test_reduced_experiment_is_what_the_seed_record_says(results):
    """Seed 0 here reproduces seed 0 of the record (same weights, same seeds), and every recorded seed meets the
    margins: the thresholds hold across seeds, not only for the one CI runs."""
    with open(SEEDS_FILE) as f:
        record = json.load(f)
    assert sorted(r["seed"] for r in record) == [0, 1, 2, 3, 4]
    for r in record:
        _check(r["base"], r["sft"], r["dopsd_velocity"])
    seed0 = next(r for r in record if r["seed"] == 0)
    for method in ("sft", "dopsd_velocity"):
        got = results["methods"][method]["final"]
        assert got["concept_acc"] == pytest.approx(seed0[method]["concept_acc"], abs=0.05), method
        assert got["retention"] == pytest.approx(seed0[method]["retention"], abs=0.05), method
