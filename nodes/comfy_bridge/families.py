"""Model-family rules in one place: which family a MODEL is, and what training does differently for it.

| family   | ComfyUI class (unet_config image_model) | "auto" LoRA targets (the pack's)        | schedule | latent / px | blocks in place |
| -------- | --------------------------------------- | --------------------------------------- | -------- | ----------- | --------------- |
| zimage   | supported_models.ZImage (lumina2)       | attention qkv/out, feed_forward w1-w3   | simple   | 16 ch, 1/8  | no              |
| flux2    | supported_models.Flux2 (flux2)          | double-block attn/MLP, single linear1/2 | flux2    | 128 ch, 1/16| yes             |
| flux     | Flux / Chroma (flux, chroma)            | as flux2                                | simple   | 16 ch, 1/8  | yes             |
| qwenimage| supported_models.QwenImage (qwen_image) | img/txt attention and MLP (no official) | simple   | 16 ch 1/8 5D| unknown: guard  |
| toy      | the toy world (dopsd_toy)               | every Linear                            | simple   | pixels      | unknown: guard  |
| other    | e.g. SD3                                | every Linear                            | simple   | 1/8         | unknown: guard  |

Z-Image's "auto" targets are the official ones (qkv fused). klein's are NOT: the official list resolves to the
double-stream attention projections only (dopsd_core/recipes.py, recipe "official FLUX.2-klein 4B edit
teacher"); "auto" also trains the double-block MLPs and the single-stream blocks (the pack's choice).

Teacher kinds per family are chosen by the user's teacher node (docs/nodes.md): VLM splice for Z-Image,
reference latents for FLUX.2-klein / Qwen-Image-Edit / Kontext, the native VLM encoder for Qwen-Image.
"""
from typing import Sequence

import torch

TARGETS = {
    "zimage": ["*attention.qkv", "*attention.out", "*feed_forward.w1", "*feed_forward.w2", "*feed_forward.w3"],
    "flux": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
             "double_blocks.*.txt_attn.proj", "double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*",
             "single_blocks.*.linear1", "single_blocks.*.linear2"],
}
TARGETS["flux2"] = TARGETS["flux"]
# Qwen-Image (no official D-OPSD recipe): both streams' attention projections and MLPs of every double-stream block,
# as for the other families; names are ComfyUI's = diffusers' QwenImageTransformer2DModel ones (what ComfyUI's LoRA
# loader maps for Qwen-Image), modulation (img_mod / txt_mod) left out.
TARGETS["qwenimage"] = [f"transformer_blocks.*.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")]
# Modules whose blocks compute x = x + f(x) out of place; any other block may update its input in place.
OUT_OF_PLACE_MODULES = ("comfy.ldm.lumina.",)


def image_model(model) -> str:
    cfg = getattr(model.model, "model_config", None)
    return str((getattr(cfg, "unet_config", {}) or {}).get("image_model", ""))


def family(model) -> str:
    """zimage | flux2 | flux | qwenimage | toy | other."""
    import comfy.supported_models

    if isinstance(getattr(model.model, "model_config", None), comfy.supported_models.Flux2):
        return "flux2"
    name = image_model(model)
    return {"lumina2": "zimage", "flux2": "flux2", "flux": "flux", "chroma": "flux",
            "qwen_image": "qwenimage", "dopsd_toy": "toy"}.get(name, "other")


def is_flux2(model) -> bool:
    return family(model) == "flux2"


def default_targets(model) -> Sequence[str]:
    return TARGETS.get(family(model), ["*"])


def default_schedule(model) -> str:
    """The few-step schedule users sample the family with: ComfyUI's Flux2Scheduler or `simple`."""
    return "flux2" if is_flux2(model) else "simple"


def pixels_per_latent(latent: torch.Tensor) -> int:
    """VAE downscale read from the latent: FLUX.2's 128-channel latents are 1/16, the others 1/8."""
    return 16 if latent.shape[1] == 128 else 8


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """ComfyUI's Flux2Scheduler (resolution-dependent shift) when the host has it, else the pack's identical
    reimplementation (dopsd_core.schedules.flux2_sigmas, tested equal)."""
    try:
        from comfy_extras.nodes_flux import Flux2Scheduler
    except ImportError:
        Flux2Scheduler = None
    if Flux2Scheduler is not None:
        return Flux2Scheduler.execute(steps=steps, width=width, height=height)[0]
    from ...dopsd_core.schedules import flux2_sigmas as own

    return own(steps, width, height)


def sampling_sigmas(model, steps: int, schedule: str, width: int, height: int) -> torch.Tensor:
    """The few-step schedule (steps + 1 sigmas, float32, CPU) the family samples with. schedule: auto (the
    family's default_schedule) | simple (ComfyUI's `simple` over the model's model_sampling, e.g. Z-Image-Turbo's
    shift 3) | flux2. width / height in pixels (only flux2's shift depends on them)."""
    import comfy.samplers

    if schedule == "auto":
        schedule = default_schedule(model)
    if schedule == "flux2":
        return flux2_sigmas(steps, width, height).float().cpu()
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float().cpu()


def latent_sigmas(model, steps: int, schedule: str, latent: torch.Tensor) -> torch.Tensor:
    """sampling_sigmas for the image size a VAE-space latent [B, C, h, w] stands for."""
    scale = pixels_per_latent(latent)
    return sampling_sigmas(model, steps, schedule, latent.shape[-1] * scale, latent.shape[-2] * scale)


def hidden_width(model) -> int:
    """Width of the residual stream of the DiT (Z-Image `dim`, Flux `hidden_size`, Qwen-Image `inner_dim`)."""
    unet = getattr(model.model.model_config, "unet_config", {}) or {}
    for key in ("dim", "hidden_size", "inner_dim"):
        if unet.get(key):
            return int(unet[key])
    inner = getattr(model.model.diffusion_model, "inner_dim", None)  # Qwen-Image: heads x head_dim, not in its config
    if isinstance(inner, int) and inner > 0:
        return inner
    for module in model.model.diffusion_model.modules():
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    return 0


def updates_in_place(block) -> bool:
    """False for blocks known never to modify their inputs; True otherwise (the safe answer)."""
    return not type(block).__module__.startswith(OUT_OF_PLACE_MODULES)
