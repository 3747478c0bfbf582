"""The toy world's models as ComfyUI objects: MODEL (a flow BaseModel in a ModelPatcher), CLIP and VAE.

So the same D-OPSD nodes, stock KSampler and VAEDecode run on the miniature world exactly as they do on
Z-Image: the toy DiT becomes the `diffusion_model` of a `comfy.model_base.BaseModel` with FLOW sampling
(v = noise - x0; timestep = sigma), the toy VLM answers `tokenize(text, images=...)` and
`encode_from_tokens_scheduled(tokens)` like ComfyUI's VL text encoders, and the "VAE" is the identity map
between ComfyUI images ([B,H,W,3] in 0..1) and the toy's pixel latents ([B,3,H,W] in -1..1).
"""
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch


class ToyLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 3
    scale_factor = 1.0


class ToyModelConfig(comfy.supported_models_base.BASE):
    latent_format = ToyLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, unet_config, shift):
        super().__init__(unet_config)
        self.sampling_settings = {"shift": float(shift), "multiplier": 1.0}


class ToyDiffusionModel(torch.nn.Module):
    """ComfyUI's diffusion-model call (x, timesteps, context, attention_mask, ...) -> velocity."""

    def __init__(self, dit=None, device=None, operations=None, dtype=None, **unused):
        super().__init__()
        self.dit = dit
        self.dtype = next(dit.parameters()).dtype  # ComfyUI reads diffusion_model.dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options={}, **kwargs):
        mask = attention_mask.bool() if attention_mask is not None else None
        return self.dit(x, timesteps, context.to(x.dtype), mask)


class ToyBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, dit, device=None):
        model_config.unet_config = dict(model_config.unet_config, dit=dit)
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ToyDiffusionModel)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask", None)
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


def model_patcher(dit, shift: float):
    import comfy.conds  # noqa: F401  (used by ToyBaseModel.extra_conds)
    config = ToyModelConfig({"image_model": "dopsd_toy"}, shift)
    base = ToyBaseModel(config, dit.eval().requires_grad_(False))
    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=offload)


class ToyClip:
    """A CLIP-like wrapper: tokens are the toy tokenizer's ids; images are added as {"type": "image"} tokens
    (ComfyUI's convention for VL encoders), so the native-VLM teacher node accepts it."""

    def __init__(self, encoder, tokenizer):
        self.encoder, self.tokenizer = encoder.eval().requires_grad_(False), tokenizer

    def tokenize(self, text, return_word_ids=False, images=None, **kwargs):
        tokens = {"ids": self.tokenizer([text])}
        if images:
            tokens["images"] = [{"type": "image", "data": im} for im in images]
        return tokens

    @torch.no_grad()
    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        ids = tokens["ids"]
        images = None
        if tokens.get("images"):
            images = to_latent(tokens["images"][0]["data"])
        hidden = self.encoder(ids, images)
        mask = self.encoder.context_mask(ids, images).float()
        return [[hidden, {"pooled_output": None, "attention_mask": mask}]]

    def encode_from_tokens(self, tokens, return_pooled=False, **kwargs):
        cond = self.encode_from_tokens_scheduled(tokens)[0]
        return (cond[0], None) if return_pooled else cond[0]


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,3] in 0..1 -> toy pixels [B,3,H,W] in -1..1."""
    return images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0


class ToyVAE:
    """The identity 'VAE' of the pixel-space toy world (only what ComfyUI's VAE nodes call)."""
    downscale_ratio = 1
    upscale_ratio = 1
    latent_channels = 3
    output_channels = 3

    def encode(self, pixels):
        return to_latent(pixels)

    def decode(self, samples):
        return ((samples.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)

    def spacial_compression_encode(self):
        return 1

    def spacial_compression_decode(self):
        return 1

    def temporal_compression_decode(self):
        return None
