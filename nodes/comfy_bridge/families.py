"""Model-family rules in one place: which family a MODEL is, and what training does differently for it.

| family   | ComfyUI class (unet_config image_model) | "auto" LoRA targets (the pack's)        | schedule | latent / px | blocks in place |
| -------- | --------------------------------------- | --------------------------------------- | -------- | ----------- | --------------- |
| zimage   | supported_models.ZImage (lumina2)       | attention qkv/out, feed_forward w1-w3   | simple   | 16 ch, 1/8  | no              |
| flux2    | supported_models.Flux2 (flux2)          | double-block attn/MLP, single linear1/2 | flux2    | 128 ch, 1/16| yes             |
| flux     | Flux / Chroma (flux, chroma)            | as flux2                                | simple   | 16 ch, 1/8  | yes             |
| toy      | the toy world (dopsd_toy)               | every Linear                            | simple   | pixels      | unknown: guard  |
| other    | e.g. Qwen-Image, SD3                    | every Linear                            | simple   | 1/8         | unknown: guard  |

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
# Modules whose blocks compute x = x + f(x) out of place; any other block may update its input in place.
OUT_OF_PLACE_MODULES = ("comfy.ldm.lumina.",)


def image_model(model) -> str:
    cfg = getattr(model.model, "model_config", None)
    return str((getattr(cfg, "unet_config", {}) or {}).get("image_model", ""))


def family(model) -> str:
    """zimage | flux2 | flux | toy | other."""
    import comfy.supported_models

    if isinstance(getattr(model.model, "model_config", None), comfy.supported_models.Flux2):
        return "flux2"
    name = image_model(model)
    return {"lumina2": "zimage", "flux2": "flux2", "flux": "flux", "chroma": "flux",
            "dopsd_toy": "toy"}.get(name, "other")


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


def hidden_width(model) -> int:
    """Width of the residual stream of the DiT (Z-Image `dim`, Flux `hidden_size`)."""
    unet = getattr(model.model.model_config, "unet_config", {}) or {}
    for key in ("dim", "hidden_size", "inner_dim"):
        if unet.get(key):
            return int(unet[key])
    for module in model.model.diffusion_model.modules():
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    return 0


def updates_in_place(block) -> bool:
    """False for blocks known never to modify their inputs; True otherwise (the safe answer)."""
    return not type(block).__module__.startswith(OUT_OF_PLACE_MODULES)
