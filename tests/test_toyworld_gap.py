"""Toy world: the shipped build has a few-step distillation gap, and its 4-step student closes most of it (issue 15).

Measured again here on the shipped fp16 weights (one sampling noise, the 256 ordinary prompts of the build's
measurement), not read from meta.json: the multi-step teacher must be much worse at 4 Euler steps than at 32, and the
distilled student at 4 steps must close most of that gap. Without a gap there is no few-step ability for SFT to
break. Margins from the build's measurement over 3 sampling noises (toyworld/README.md; measured here in brackets):
"""
import os
import sys

import pytest

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toyworld import build as tb  # noqa: E402
from toyworld.measure import original_prompts, read_samples  # noqa: E402

GAP_FD_RATIO = 1.9      # teacher FD at 4 steps over at 32 steps: 531 / 223 = 2.4 over 3 noises [2.16]
GAP_SHARPNESS = 0.75    # teacher denoised sharpness at 4 steps over at 32: 0.23 / 0.38 = 0.61 [0.63]
CLOSED_AT_LEAST = 0.8   # share of the teacher's FD gap the 4-step student closes: (531 - 182) / (531 - 223) = 1.13 [1.25]


@pytest.fixture(scope="module")
def readings():
    b = tb.load(build_if_missing=False, log=None)
    assert b.teacher is not None, "the shipped build must hold the multi-step teacher (scripts/toyworld_build.py --ship)"
    prompts = original_prompts(b.world, b.evaluator, 256, seed=100)

    def read(model, steps):
        x = model.sample(prompts.captions, prompts.noise, tb.student_sigmas(steps))
        return read_samples(b.world, b.evaluator, x, prompts)
    return {"teacher_4": read(b.teacher, 4), "teacher_32": read(b.teacher, 32), "student_4": read(b.student, 4)}


def test_teacher_is_much_worse_at_4_steps_than_at_32(readings):
    t4, t32 = readings["teacher_4"], readings["teacher_32"]
    assert t4["fd"] >= GAP_FD_RATIO * t32["fd"], (t4["fd"], t32["fd"])
    assert t4["denoised_sharpness"] <= GAP_SHARPNESS * t32["denoised_sharpness"]


def test_student_at_4_steps_closes_most_of_the_gap(readings):
    t4, t32, s4 = readings["teacher_4"], readings["teacher_32"], readings["student_4"]
    closed = (t4["fd"] - s4["fd"]) / (t4["fd"] - t32["fd"])
    assert closed >= CLOSED_AT_LEAST, closed
