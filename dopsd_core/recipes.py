"""Named training recipes: every knob the official D-OPSD scripts set, with where each value comes from.

A recipe is plain data: `Recipe.settings` maps a knob name to `Setting(value, source)`. `apply(recipe,
inputs)` returns the trainer's settings with the recipe's values put over the user's; `custom` returns the
user's inputs untouched. Knob names are the trainer node's input names (so the node shows exactly what a
recipe set), plus a few that only a recipe or an option input sets:

- lora_init: "gaussian" (official) | "default" (the pack's kaiming-uniform)
- qkv: "separate" (official: one rank-r LoRA each for q, k and v) | "fused" (the pack: one LoRA over the
  fused qkv weight ComfyUI builds)
- rollout: "inference" (the pack: states of the schedule users sample with) | "scheduler" (official klein:
  the diffusers scheduler set without the pipeline's sigmas, see flux2_scheduler_sigmas)
- schedule_shift: "per_example" (official: the shift is computed from each batch's resolution) |
  "first_pair" (the pack's older rule)
- caption_sampling: "draw" (official: one caption field per sample) | "first"; caption_dropout: a rate
- teacher_prompt: "caption" | "caption_then_instruction" (official klein) | "instruction_then_caption"
- resolution, weight_decay, lr_schedule, batch_size: checked or passed on as documented

Sources: `official` = github.com/vvvvvjdy/D-OPSD (paper arXiv 2605.05204), files named per value with
line numbers of commit b9dfa2d (the last upstream commit; read through a public mirror).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .schedules import _flux2_empirical_mu

CUSTOM = "custom"
ZIMAGE = "official Z-Image-Turbo LoRA"
KLEIN = "official FLUX.2-klein 4B edit teacher"
NAMES = (CUSTOM, ZIMAGE, KLEIN)

# Official klein --edit-sys-prompt (flux2-klein_self-distill-edit/scripts/train_lora_4b.sh L34).
KLEIN_EDIT_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition "
                          "consistent with the reference image.")
# The caption fields the official sampler draws from (train_dopsd.py: Z-Image L314, klein L458).
OFFICIAL_CAPTION_FIELDS = ("short_en", "detailed_en", "short_zh", "detailed_zh", "medium_zh", "medium_en",
                           "user_prompt_en", "user_prompt_zh")
TEACHER_PROMPTS = ("caption", "caption_then_instruction", "instruction_then_caption")


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


@dataclass(frozen=True)
class Recipe:
    name: str
    family: Optional[str]                 # the model family it is for (families.py names), None: any
    settings: Mapping[str, Setting]

    def value(self, knob: str, default=None):
        s = self.settings.get(knob)
        return default if s is None else s.value


ZI = "z-image-turbo_self-distill-vlm/"
KL = "flux2-klein_self-distill-edit/"


def _common(folder: str, script: str, off: int, steps: int, lr: float, targets: str, targets_src: str,
            keys_line: int) -> Dict[str, Setting]:
    """Knobs both official scripts set the same way; `off` shifts the line numbers of the klein script,
    which lacks the Z-Image script's blank first line."""
    s = folder + script

    def at(line):
        return f"{s} L{line - off}"
    return {
        "method": Setting("dopsd", f"{folder}train_dopsd.py: the on-policy loop"),
        "steps": Setting(steps, f"{at(17)} (--max-train-steps)"),
        "rank": Setting(64, f"{at(21)} (--lora-rank 64)"),
        "alpha": Setting(128.0, f"{at(22)} (--lora-alpha 128)"),
        "lora_init": Setting("gaussian", f"{folder}ema_utils.py L66 (init_lora_weights=\"gaussian\": down ~ N(0, 1/r^2))"),
        "qkv": Setting("separate", targets_src + " (to_q, to_k, to_v are separate PEFT LoRAs)"),
        "targets": Setting(targets, targets_src),
        "learning_rate": Setting(lr, f"{at(30)} (--learning-rate-gen)"),
        "weight_decay": Setting(0.0, f"{at(31)} (--adam-weight-decay 0.0)"),
        "lr_schedule": Setting("constant", f"{folder}train_dopsd.py: no lr scheduler is stepped"),
        "grad_clip": Setting(1.0, f"{folder}arguments.py (--max-grad-norm default 1.0)"),
        "precision": Setting("bf16", f"{at(26)} (--mixed-precision bf16)"),
        "gradient_checkpointing": Setting(True, f"{at(32)} (--enable-gc)"),
        "loss_space": Setting("x0", f"{folder}train_dopsd.py: F.mse_loss(x_0_student, x_0_teacher)"),
        "detach_states": Setting(True, f"{folder}train_dopsd.py: latents_student.detach().requires_grad_(True)"),
        "ema_decay": Setting(0.9999, f"{at(34)} (--ema-decay 0.9999; the argparse default is 0.9)"),
        "ema_warmup": Setting(False, f"{folder}ema_utils.py: a fixed decay after every optimizer step"),
        "batch_size": Setting(1, f"{at(27)} (--batch-size 1 per GPU)"),
        "grad_accum": Setting(4, f"{at(4)} (NUM_PROCS=4 GPUs) x --gradient-accumulation-steps 1: an effective "
                                 "batch of 4, here as 4 accumulated examples on one GPU"),
        "resolution": Setting(1024, f"{folder}train_dopsd.py L{keys_line - 14} all_ratios: 11 aspect buckets of about 1 MP "
                                    "(1024x1024 ... 1344x576)"),
        "caption_sampling": Setting("draw", f"{folder}dataset.py L155 (random.choice over prompt_keys per batch)"),
        "caption_fields": Setting(OFFICIAL_CAPTION_FIELDS, f"{folder}train_dopsd.py L{keys_line} (prompt_keys: 8 "
                                                            "fields, en + zh)"),
        "caption_dropout": Setting(0.0, f"{folder}dataset.py: no caption dropout"),
    }


RECIPES: Dict[str, Recipe] = {
    CUSTOM: Recipe(CUSTOM, None, {}),
    ZIMAGE: Recipe(ZIMAGE, "zimage", {
        **_common(ZI, "scripts/train_lora.sh", 0, 2000, 1e-4,
                  "*attention.qkv, *attention.out, *feed_forward.w1, *feed_forward.w2, *feed_forward.w3",
                  ZI + "train_dopsd.py L236-244 (feed_forward.w1/w2/w3, attention.to_q/k/v, attention.to_out.0)",
                  314),
        "schedule": Setting("simple", ZI + "train_dopsd.py L483-484 (t = 0, 100, 250, 500 of 1000)"),
        "inference_steps": Setting(8, ZI + "README: 8-step inference (the 4 states are every other of 8)"),
        "train_steps": Setting(4, ZI + "scripts/train_lora.sh L19 (--num-training-steps 4)"),
        "rollout": Setting("inference", ZI + "train_dopsd.py L483-484: sigma 1, .9, .75, .5 = every other state "
                                             "of the 8-step shift-3 schedule"),
        "schedule_shift": Setting("first_pair", "Z-Image's schedule does not depend on resolution"),
        "teacher_prompt": Setting("caption", ZI + "train_dopsd.py L505-515 (the VLM reads the caption and the "
                                                  "image; use_system_prompt=False)"),
        "teacher": Setting("vlm_splice", ZI + "train_dopsd.py L206-222 (Qwen3-VL on Z-Image's Qwen3-4B weights)"),
    }),
    KLEIN: Recipe(KLEIN, "flux2", {
        **_common(KL, "scripts/train_lora_4b.sh", 1, 3001, 2e-5,
                  "double_blocks.*.img_attn.qkv, double_blocks.*.img_attn.proj, double_blocks.*.txt_attn.qkv, "
                  "double_blocks.*.txt_attn.proj",
                  KL + "train_dopsd.py L375-388: of its 12 names only the 8 attention projections exist in "
                       "diffusers' Flux2 (double-stream blocks); ff.net.*/ff_context.net.* match nothing",
                  458),
        "schedule": Setting("flux2", KL + "train_dopsd.py L622-629 (FlowMatchEulerDiscreteScheduler, empirical mu)"),
        "inference_steps": Setting(4, KL + "README: 4-step inference"),
        "train_steps": Setting(4, KL + "scripts/train_lora_4b.sh L18 (--num-training-steps 4)"),
        "rollout": Setting("scheduler", KL + "train_dopsd.py L624-629: set_timesteps(4, mu=mu) without the "
                                             "pipeline's sigmas, so at 1024^2 sigma = 1, .952, .832, .0098"),
        "schedule_shift": Setting("per_example", KL + "train_dopsd.py L621-623: mu from each batch's h*w"),
        "teacher_prompt": Setting("caption_then_instruction",
                                  KL + "train_dopsd.py L640 (f\"{caption} {edit_sys_prompt}\") and "
                                       "scripts/train_lora_4b.sh L34 (the instruction)"),
        "teacher": Setting("reference_latent", KL + "train_dopsd.py L709 (the target's latent concatenated as "
                                                    "reference tokens)"),
    }),
}

# What the pack does where a knob has no trainer input (the `custom` values of the option knobs).
PACK_DEFAULTS = {"lora_init": "default", "qkv": "fused", "rollout": "inference", "schedule_shift": "first_pair",
                 "caption_sampling": "draw", "weight_decay": 0.0, "lr_schedule": "constant", "batch_size": 1}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(NAMES)}")
    return RECIPES[name]


def apply(name: str, inputs: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(settings, changed): the user's inputs with the recipe's values over them, and the knobs whose value
    the recipe changed. Knobs the recipe sets but the inputs lack are added."""
    recipe = get(name)
    out = {**PACK_DEFAULTS, **dict(inputs)}
    changed = []
    for knob, setting in recipe.settings.items():
        if out.get(knob) != setting.value:
            changed.append(knob)
        out[knob] = setting.value
    return out, changed


def describe(name: str, changed: Sequence[str] = ()) -> List[str]:
    """One line per knob of the recipe: 'knob = value (source)'; a '*' marks values that differ from the inputs."""
    recipe = get(name)
    if not recipe.settings:
        return [f"recipe {name}: your inputs as given"]
    lines = [f"recipe {name}:"]
    for knob, s in recipe.settings.items():
        value = ", ".join(s.value) if isinstance(s.value, tuple) else s.value
        lines.append(f"{'*' if knob in changed else ' '} {knob} = {value}  [{s.source}]")
    return lines


def flux2_scheduler_sigmas(steps: int, width: int, height: int, mu_fn=None, shift_fn=None) -> torch.Tensor:
    """The states the official klein script trains on: diffusers' FlowMatchEulerDiscreteScheduler
    .set_timesteps(steps, mu=mu) WITHOUT the sigmas the pipeline passes, i.e. t = linspace(1, 1/1000, steps)
    (the scheduler's own timesteps 1000 .. 1) time-shifted by the empirical mu of the image size. At 1024^2
    and 4 steps: 1, .952, .832, .0098. The pipeline (and ComfyUI's Flux2Scheduler, which users sample with)
    passes linspace(1, 1/steps, steps) instead: 1, .967, .908, .767.

    mu_fn(image_seq_len, steps) and shift_fn(t, mu, sigma) default to the pack's copies; the node passes the
    host's (comfy_extras.nodes_flux.compute_empirical_mu / generalized_time_snr_shift). Returns [steps]."""
    mu_fn = mu_fn or _flux2_empirical_mu
    seq = (height // 16) * (width // 16)  # official L621: (h * w) // (16 * 16) with h, w multiples of 16
    mu = mu_fn(seq, steps)
    t = torch.linspace(1.0, 1.0 / 1000, steps, dtype=torch.float64)
    if shift_fn is None:
        import math
        return (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).float()
    return torch.as_tensor(shift_fn(t, mu, 1.0)).float()


def teacher_text(caption: str, instruction: str, order: str) -> str:
    """The teacher's prompt: the caption with an edit instruction after it (official klein), before it (the
    pack's earlier choice), or the caption alone."""
    if order not in TEACHER_PROMPTS:
        raise ValueError(f"teacher prompt order must be one of {TEACHER_PROMPTS}, got {order!r}")
    instruction = (instruction or "").strip()
    if order == "caption" or not instruction:
        return caption
    if order == "caption_then_instruction":
        return f"{caption} {instruction}".strip()
    return f"{instruction} {caption}".strip()
