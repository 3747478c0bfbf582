"""Checks that turn a wrong graph into an error that names the fix, before any training starts."""
import comfy.model_sampling

FLOW_HELP = ("D-OPSD trains flow-matching few-step models (Z-Image-Turbo, FLUX.2-klein, SD3, Qwen-Image, ...). "
             "Load one of those, or a ModelSamplingAuraFlow/SD3-patched flow model")


def require_flow_model(model):
    """The model must use ComfyUI's CONST (flow) sampling: v = noise - x0."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST):
        kind = type(ms).__name__
        raise ValueError(f"this model uses {kind} (an eps/v-prediction model such as SD1.5/SDXL): {FLOW_HELP}")
    return ms


def context_width(model):
    """Width of the text-conditioning tokens the diffusion model accepts, or None if unknown."""
    cfg = getattr(model.model, "model_config", None)
    unet = getattr(cfg, "unet_config", {}) or {}
    for key in ("cap_feat_dim", "context_in_dim", "joint_attention_dim", "context_dim"):
        if unet.get(key):
            return int(unet[key])
    return None


def require_condition_width(conditioning, model, what: str):
    expected = context_width(model)
    if expected is None:
        return
    for tensor, _ in conditioning:
        if tensor.shape[-1] != expected:
            raise ValueError(f"{what} conditioning has width {tensor.shape[-1]} but the model expects {expected}: "
                             "encode it with the text encoder that belongs to this model (Z-Image: Qwen3-4B; "
                             "FLUX.2-klein: its Qwen3 encoder)")
