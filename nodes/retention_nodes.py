"""On-policy retention in ComfyUI: the prompts node, and the job side of the trainer's `retention` input.

`D-OPSD Retention Prompts` encodes ordinary prompts (a list, the class prompt = the training captions with the
trigger word removed, and generated variations) with a CLIP into a RETENTION value. Wired into the trainer with
`retention_ratio` > 0, that fraction of the training steps also roll the student out on a retention prompt and
pull it towards the frozen base model (LoRA off, the same text-only conditioning): the D-OPSD loss with the base
as teacher, which keeps the concept from bleeding into every prompt. dopsd_core/retention.py has the rule.
"""
from typing import Optional

import torch
from comfy_api.latest import io

from ..dopsd_core import retention as core
from . import CATEGORY
from .comfy_bridge import model_checks
from .pairs import Pair, detached_copy
from .teacher_nodes import Pairs, encode_text

Retention = io.Custom("DOPSD_RETENTION")
MAX_PROMPTS = 512


class DOPSDRetentionPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDRetentionPrompts", display_name="D-OPSD Retention Prompts", category=CATEGORY,
            description="Ordinary prompts the LoRA must leave as the base model draws them (on-policy retention). "
                        "Wire into the trainer's `retention` input and set `retention_ratio` (e.g. 0.5).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model you train (the same as for the pairs)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line, e.g. other subjects of the same class and prompts you "
                                        "use often. Must not contain the trigger word."),
                Pairs.Input("pairs", optional=True,
                            tooltip="The training pairs: their captions with the trigger word removed become class "
                                    "prompts ('a photo of sks dog' -> 'a photo of dog')."),
                io.String.Input("trigger", default="sks", tooltip="The trigger word to remove from the captions."),
                io.Int.Input("variations", default=8, min=0, max=256,
                             tooltip="Extra prompts made from the prompts above with setting templates "
                                     "('a photo of ...', '... outdoors', ...)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Which variations are drawn."),
            ],
            outputs=[Retention.Output(display_name="retention")],
        )

    @classmethod
    def execute(cls, clip, prompts, trigger, variations, seed, pairs=None) -> io.NodeOutput:
        lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        captions = [p.caption for p in pairs] if pairs else []
        texts = core.retention_prompts(lines, captions, trigger, variations, seed)
        if not texts:
            raise ValueError("no retention prompts: write some prompts, or connect the training pairs (their "
                             "captions without the trigger word are the class prompts)")
        if len(texts) > MAX_PROMPTS:
            raise ValueError(f"{len(texts)} retention prompts; at most {MAX_PROMPTS} (each is encoded and kept)")
        return io.NodeOutput({"prompts": texts, "conds": [encode_text(clip, t) for t in texts]})


def for_job(model, retention, ratio: float, method: str):
    """Checks the trainer's retention inputs; returns what the job needs, or None (ratio 0 or nothing wired:
    training is exactly the paper's method)."""
    if retention is None or not ratio:
        return None
    if method != "dopsd":
        raise ValueError(f"retention_ratio {ratio} needs method dopsd (retention rolls the student out on its own "
                         f"samples); set retention_ratio to 0 for method {method}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"retention_ratio must be in [0, 1], got {ratio}")
    for text, cond in zip(retention["prompts"], retention["conds"]):
        try:
            model_checks.require_condition_width(cond, model, "retention")
        except ValueError as e:
            raise ValueError(f"{e}. Connect the same CLIP to D-OPSD Retention Prompts as to the pairs "
                             f"(retention prompt {text!r})") from None
    return {"prompts": list(retention["prompts"]), "conds": list(retention["conds"]), "ratio": float(ratio)}


def with_retention(task, spec, seed: int):
    """A RetentionMix over the training's ComfyTask (comfy_bridge/training.py) that, for a `ratio` of the
    micro-steps, also trains a retention prompt; None without retention (the paper's method).

    A retention example takes the concept pair the data order drew for its latent size, swaps in the retention
    prompt as the student's and the teacher's conditioning, and runs it through the task's own ComfyUI path
    with the teacher's LoRA off (Pair.teacher_mode = "off"). Call outside inference mode (tensors are copied)."""
    if spec is None:
        return None
    conds = detached_copy([Pair(t, c, c, torch.zeros(1), torch.zeros(1))
                           for t, c in zip(spec["prompts"], spec["conds"])])

    def run_retention(concept, prompt_indices, compute):
        concept = task.pairs[concept] if isinstance(concept, int) else concept
        r = conds[prompt_indices[0]]
        pair = Pair(r.caption, r.student, r.student, torch.zeros_like(concept.latent), concept.image)
        pair.teacher_mode = "off"
        return task.run_pairs([pair], compute)

    return core.RetentionMix(task, len(conds), spec["ratio"], seed, run_retention, prompts=spec["prompts"])


def record(mix, trainer):
    """Put the job's retention settings (None: none) into the trainer's exact-resume state, so that a job
    resumed from it can tell whether it mixes the same retention (after_resume)."""
    trainer.extras["retention"] = mix.settings() if isinstance(mix, core.RetentionMix) else None


def after_resume(mix, trainer) -> Optional[str]:
    """Continue the retention draws where the resumed run left off. Returns the warning for the user when the
    checkpoint was trained with other retention settings (the continuation then differs from the uninterrupted
    run, as with any other changed setting), or None; a checkpoint from before the settings were stored is
    not checked."""
    if isinstance(mix, core.RetentionMix):
        mix.seek_step(trainer.step, trainer.cfg.grad_accum)
    extras = trainer.resumed_extras
    if extras is None or "retention" not in extras:
        return None
    saved = extras["retention"]
    mismatch = core.resume_mismatch(saved, trainer.extras.get("retention"))
    if mismatch is None:
        return None
    if saved is None:
        fix = ("To continue it exactly, disconnect D-OPSD Retention Prompts or set retention_ratio 0; to add "
               "retention from here on, keep it so")
    else:
        fix = (f"To continue it exactly, connect the same D-OPSD Retention Prompts (prompts, pairs, trigger, "
               f"variations, seed) with retention_ratio {saved['ratio']:g}, or start a new job (empty resume_from)")
    return f"resume_from: {mismatch}, so the continuation will not match an uninterrupted run. {fix}."


NODES = [DOPSDRetentionPrompts]
