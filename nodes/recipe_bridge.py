"""Recipes in ComfyUI: the trainer's recipe input, what a recipe sets on the job, and the per-example draw.

dopsd_core/recipes.py holds the recipes as data; this module turns one into the job's LoRA network, rollout
states and captions over a ComfyUI MODEL and its pairs:
- `resolve(recipe, inputs, model, pairs)`: the settings with the recipe's values over the node's inputs,
  refusing a recipe made for another model family, and the lines the node shows.
- `ExampleSetup`: per training example, which encoded caption variant is used (drawn per (epoch, example)
  from the job seed, so a resumed job draws the same sequence; caption dropout picks the empty variant)
  and which rollout states (official klein: recomputed from each example's resolution). The training step
  calls `begin(index)`; that is the whole hook.
"""
import torch
from comfy_api.latest import io

from ..dopsd_core import data, recipes, schedules
from ..dopsd_core.lora import LoRANetwork
from .comfy_bridge import families, lora_patch

# Option inputs of the trainer, each offering the official value next to the pack's (first option = default).
OPTIONS = {
    "lora_init": {"kaiming-uniform (pack)": "default", "gaussian 1/r (official)": "gaussian"},
    "qkv": {"fused (pack)": "fused", "separate q/k/v (official)": "separate"},
    "rollout": {"inference schedule (pack)": "inference", "scheduler without sigmas (official klein)": "scheduler"},
    "schedule_shift": {"first pair (pack)": "first_pair", "per example (official)": "per_example"},
    "caption_sampling": {"draw one per epoch": "draw", "first caption": "first"},
}
# ComfyUI fuses q, k and v into one Linear; a separate-q/k/v LoRA is saved under the diffusers names that
# ComfyUI's loader maps onto the fused weight's rows: Z-Image's attention.to_q/to_k/to_v beside attention.qkv
# (comfy.utils.z_image_to_diffusers), Flux2's transformer.transformer_blocks.N.attn.to_q/.../add_v_proj
# (comfy.utils.flux_to_diffusers, the "transformer." LoRA keys of comfy.lora.model_lora_keys_unet).
SPLIT_QKV = {"zimage": {"*attention.qkv": ("to_q", "to_k", "to_v")},
             "flux2": {"double_blocks.*.img_attn.qkv": ("to_q", "to_k", "to_v"),
                       "double_blocks.*.txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}}


def _flux2_part_key(name: str, part: str) -> str:
    """double_blocks.N.img_attn.qkv + to_q -> transformer.transformer_blocks.N.attn.to_q"""
    return f"transformer.transformer_blocks.{name.split('.')[1]}.attn.{part}"


PART_KEYS = {"flux2": _flux2_part_key}


def inputs():
    """The recipe combo and the option inputs (optional: workflows saved before them keep working)."""
    out = [io.Combo.Input("recipe", options=list(recipes.NAMES), default=recipes.CUSTOM, optional=True,
                          tooltip="custom: the inputs below as you set them. An official recipe sets every knob "
                                  "the authors' script sets (listed on the node after a run, with sources in "
                                  "docs/nodes.md) and ignores the inputs it covers.")]
    tips = {"lora_init": "LoRA down-projection init; both start at a zero delta.",
            "qkv": "One LoRA over ComfyUI's fused qkv, or one rank-r LoRA each for q, k, v (Z-Image, klein; saved "
                   "under the diffusers names ComfyUI's loader maps onto the fused weight).",
            "rollout": "klein: train on the sampler's states (1, .967, .908, .767 at 1024^2, 4 steps) or on the "
                       "official script's (1, .952, .832, .0098).",
            "schedule_shift": "flux2 schedule: shift from the first pair's size, or from each example's.",
            "caption_sampling": "Examples with several captions (JSONL fields, caption dropout): draw one per "
                                "epoch (official), or always the first."}
    for knob, options in OPTIONS.items():
        out.append(io.Combo.Input(knob, options=list(options), default=next(iter(options)), optional=True,
                                  tooltip=tips[knob]))
    return out


def option_values(kwargs: dict) -> dict:
    """The option inputs' internal values (labels -> values); missing ones take their default."""
    out = {}
    for knob, options in OPTIONS.items():
        label = kwargs.get(knob)
        out[knob] = options.get(label, next(iter(options.values()))) if label is not None else next(iter(options.values()))
    return out


def family_error(name: str, model) -> str:
    """'' when recipe `name` fits the model's family, else the message naming the fix."""
    recipe = recipes.get(name)
    fam = families.family(model)
    if recipe.family is None or recipe.family == fam:
        return ""
    fits = [n for n in recipes.NAMES if recipes.get(n).family == fam]
    return (f"recipe {name!r} is for {recipe.family} models, but this MODEL is {fam} "
            f"({type(getattr(model.model, 'model_config', model.model)).__name__}): choose "
            f"{' or '.join(repr(n) for n in fits + [recipes.CUSTOM])}")


def teacher_prompt_error(settings: dict, pairs) -> str:
    """'' when every pair's teacher prompt is what the recipe prescribes, else the message naming the fix."""
    order = settings.get("teacher_prompt")
    if order != "caption_then_instruction":
        return ""
    for p in pairs:
        for caption, _, _, prompt in (p.variants or ((p.caption, None, None, p.teacher_prompt),)):
            want = recipes.teacher_text(caption, recipes.KLEIN_EDIT_INSTRUCTION, order)
            if (prompt if prompt is not None else caption) != want:
                return (f"the recipe's teacher prompt is the caption followed by the official instruction, but a "
                        f"pair's teacher read {prompt!r}: on the Reference Latent teacher set teacher_prompt_prefix "
                        f"to {recipes.KLEIN_EDIT_INSTRUCTION!r} and instruction_position to 'after caption "
                        "(official klein)'")
    return ""


def resolve(name: str, node_inputs: dict, model, pairs):
    """(settings, lines): the trainer settings after the recipe, and what the node shows. Raises with the fix
    when the recipe does not fit the model or the pairs."""
    error = family_error(name, model)
    if error:
        raise ValueError(error)
    settings, changed = recipes.apply(name, node_inputs)
    settings["caption_dropout_override"] = settings.get("caption_dropout") if name != recipes.CUSTOM else None
    error = teacher_prompt_error(settings, pairs)
    if error:
        raise ValueError(error)
    lines = recipes.describe(name, changed)
    if name == recipes.CUSTOM:
        lines += [f"  {k} = {settings[k]}" for k in OPTIONS]
    want = settings.get("resolution")
    if want and pairs:
        scale = families.pixels_per_latent(pairs[0].latent)
        area = sum(p.latent.shape[-1] * p.latent.shape[-2] for p in pairs) * scale * scale / len(pairs)
        if area < 0.5 * want * want:
            lines.append(f"note: your pairs average {area ** 0.5:.0f}^2 pixels; the recipe trains at about {want}^2: "
                         f"set resolution {want} on the dataset node")
    return settings, lines


def job_info(name: str, settings: dict, rollout) -> dict:
    """What the job status and the LoRA metadata record: dopsd.recipe and dopsd.recipe_settings."""
    keep = {k: v for k, v in settings.items() if k != "caption_dropout_override"}
    return {"recipe": name, "recipe_settings": {**keep, "rollout_sigmas": [round(float(s), 6) for s in rollout]}}


def build_network(model, settings: dict, seed: int) -> LoRANetwork:
    """The job's LoRA: targets, rank/alpha, init and (Z-Image) separate q/k/v from the settings."""
    family = families.family(model)
    split = SPLIT_QKV.get(family) if settings.get("qkv") == "separate" else None
    return LoRANetwork.for_module(model.model.diffusion_model, rank=settings["rank"], alpha=settings["alpha"],
                                  targets=lora_patch.parse_targets(settings["targets"], model),
                                  init=settings.get("lora_init", "default"), ema_decay=settings["ema_decay"],
                                  ema_warmup=settings["ema_warmup"], seed=seed, device="cpu", split=split,
                                  part_keys=PART_KEYS.get(family) if split else None)


def host_flux2_scheduler_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """recipes.flux2_scheduler_sigmas with the host's empirical mu and time shift (ComfyUI's nodes_flux)."""
    try:
        from comfy_extras.nodes_flux import compute_empirical_mu, generalized_time_snr_shift
    except ImportError:  # a host without Flux2Scheduler: the pack's identical copies
        return recipes.flux2_scheduler_sigmas(steps, width, height)
    return recipes.flux2_scheduler_sigmas(steps, width, height, compute_empirical_mu, generalized_time_snr_shift)


def rollout_states(model, settings: dict, latent: torch.Tensor, inference_sigmas_fn) -> torch.Tensor:
    """The K training states for an example with this latent. inference_sigmas_fn(model, steps, schedule,
    latent) is the trainer's inference schedule (the sampler users run)."""
    k = int(settings["train_steps"])
    schedule = settings["schedule"]
    if schedule == "auto":
        schedule = families.default_schedule(model)
    if settings.get("rollout") == "scheduler" and schedule == "flux2":
        scale = families.pixels_per_latent(latent)
        return host_flux2_scheduler_sigmas(k, latent.shape[-1] * scale, latent.shape[-2] * scale)
    infer = inference_sigmas_fn(model, settings["inference_steps"], schedule, latent)
    return schedules.rollout_sigmas(infer, k)


class ExampleSetup:
    """Per training example: the caption variant (drawn) and the rollout states. `trainer` is set by the job
    once the Trainer exists; `begin(index)` sets its states and returns the conditioning for the step."""

    def __init__(self, pairs, seed: int, caption_sampling: str = "draw", dropout_override=None,
                 states_for=None):
        self.pairs, self.seed = pairs, seed
        self.caption_sampling, self.dropout_override = caption_sampling, dropout_override
        self.states_for = states_for  # latent -> sigmas, or None: keep the trainer's
        self.trainer = None
        self._states = {}
        self.drawn = []  # (epoch, index, caption) of the last steps, for tests and the status

    def variant(self, index: int, epoch: int):
        """(caption, student, teacher) for example `index` in `epoch`."""
        p = self.pairs[index]
        if not p.variants or self.caption_sampling == "first":
            return p.caption, p.student, p.teacher
        captions = [v for v in p.variants if v[0] != ""]
        dropped = next((v for v in p.variants if v[0] == ""), None)
        rate = p.caption_dropout if self.dropout_override is None else self.dropout_override
        choice = data.draw_variant(self.seed, epoch, index, len(captions), rate if dropped is not None else 0.0)
        v = dropped if choice is None else captions[choice]
        return v[0], v[1], v[2]

    def states(self, index: int):
        if self.states_for is None:
            return None
        latent = self.pairs[index].latent
        key = tuple(latent.shape)
        if key not in self._states:
            self._states[key] = torch.as_tensor(self.states_for(latent), dtype=torch.float32)
        return self._states[key]

    def begin(self, index: int) -> dict:
        """The conditioning of the step on example `index` ({"positive": c_s, "teacher": c_t})."""
        epoch = self.trainer.order.epoch if self.trainer is not None else 0
        caption, student, teacher = self.variant(index, epoch)
        states = self.states(index)
        if states is not None and self.trainer is not None:
            self.trainer.sigmas = states
        self.drawn = (self.drawn + [(epoch, index, caption)])[-64:]
        return {"positive": student, "teacher": teacher}
