"""Tiny but real ComfyUI models, built through ComfyUI's own classes and loaders, deterministically.

Every builder returns what the matching ComfyUI loader returns (a ModelPatcher, a comfy.sd.CLIP, a comfy.sd.VAE),
so pack code under test cannot tell them from the real thing except by size. Weights come from a seeded
generator (ComfyUI's ops leave them uninitialised), so two builds with the same seed are identical.

Usable outside pytest (benchmarks, the demo): `import comfy_env; comfy_env.setup(); import comfy_fixtures`.

Why the shapes are what they are:
- Z-Image: the real config (model_detection for dim 3840) shrunk. dim must be >= 256 with z_image_modulation
  (adaLN takes min(dim, 256) while the timestep embedder outputs 256); head_dim 128 = sum(axes_dims) as in the
  real model. cap_feat_dim = the tiny Qwen3 text encoder's hidden size, so its conditioning drives the model.
- Qwen3 text encoder: Qwen3-4B's layout with hidden 64 and the full 151936 vocab (the bundled tokenizer emits
  ids up to 151668). At least 3 layers, because Z-Image reads layer -2 and asserts abs(layer_idx) < num_layers.
- Flux2: FLUX.2-klein's layout (no guidance embedding, no pooled vector, global modulation, 128 latent
  channels, Qwen3 three-layer stack as context). num_heads = hidden / sum(axes_dim), the rule newer ComfyUI
  detection uses for klein. context_in_dim = 3 x 64 = what a tiny klein text encoder (3 stacked layers) gives.
- VAEs: ComfyUI's AutoencoderKL with the real latent layout (Flux: 16 ch at /8; Flux2: 32 ch, 2x2 patchified
  with batch-norm to 128 ch at /16) and 32 base channels instead of 128 (GroupNorm needs multiples of 32).
"""
import inspect
import json
import math

import torch

ZIMAGE_TE_HIDDEN = 64

TINY_ZIMAGE = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=ZIMAGE_TE_HIDDEN,
    n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=8.0 / 3.0,
    qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)

# Qwen3-4B layout, shrunk (comfy.text_encoders.llama.Qwen3_4BConfig fields; head_dim stays 128).
TINY_QWEN3 = dict(hidden_size=ZIMAGE_TE_HIDDEN, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1)
# klein reads hidden layers 9, 18 and 27, so its tiny encoder needs 28 layers (still ~2 M params plus vocab).
TINY_KLEIN_QWEN3 = dict(TINY_QWEN3, num_hidden_layers=28)
KLEIN_LAYERS = 3

TINY_FLUX2 = dict(
    image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
    context_in_dim=KLEIN_LAYERS * ZIMAGE_TE_HIDDEN, hidden_size=128, mlp_ratio=3.0, num_heads=2,
    depth=1, depth_single_blocks=2, axes_dim=[16, 16, 16, 16], theta=2000, patch_size=1, qkv_bias=False,
    guidance_embed=False, global_modulation=True, mlp_silu_act=True, ops_bias=False,
    default_ref_method="index", ref_index_scale=10.0,
)

_AE = dict(double_z=True, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
           num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TINY_FLUX_VAE = dict(embed_dim=16, ddconfig=dict(_AE, z_channels=16))
TINY_FLUX2_VAE = dict(embed_dim=32, ddconfig=dict(_AE, z_channels=32, batch_norm_latent=True))

# safetensors metadata that tests/comfy_test_support uses to load tiny files with the stock loaders.
META_MODEL_CLASS = "comfy_test.model_class"
META_UNET_CONFIG = "comfy_test.unet_config"


# ----------------------------------------------------------------------------------------------------------
# deterministic weights

def seeded_state_dict(module: torch.nn.Module, seed: int = 0, dtype=torch.float32) -> dict:
    """A state dict for `module` drawn from a seeded generator: fan-in scaled normals for matrices, unit
    normals for token embeddings, ones for 1-D scales (norms) and running variances, zeros for biases and
    running means. Keys are visited in sorted order, so the result depends only on the seed and the shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in sorted(module.state_dict().items()):
        shape, leaf = tuple(ref.shape), name.rsplit(".", 1)[-1]
        if not ref.dtype.is_floating_point:
            t = torch.zeros(shape, dtype=ref.dtype)
        elif leaf in ("bias", "running_mean"):
            t = torch.zeros(shape)
        elif leaf == "running_var" or (len(shape) == 1 and leaf in ("weight", "scale")):
            t = torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            std = 1.0 / math.sqrt(fan_in) if "embed_tokens" not in name else 1.0
            t = torch.randn(shape, generator=gen) * std
        out[name] = t.to(dtype) if t.dtype.is_floating_point else t
    return out


# Keys that newer ComfyUI's detection adds for the same architecture; passed only where the host's classes take them.
NEWER_FLUX_KEYS = {"txt_ids_dims": [3]}  # 0.18+: text position ids on axis 3 (FLUX.2)


def host_unet_config(unet_config: dict) -> dict:
    """The tiny config in the form the running ComfyUI's model classes expect."""
    config = dict(unet_config)
    if config.get("image_model") == "flux2":
        import dataclasses

        import comfy.ldm.flux.model

        fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
        config.update({k: v for k, v in NEWER_FLUX_KEYS.items() if k in fields and k not in config})
    return config


def _skeleton(model_class: str, unet_config: dict, dtype):
    import comfy.supported_models

    config = getattr(comfy.supported_models, model_class)(host_unet_config(unet_config))
    config.set_inference_dtype(dtype, None)
    return config, config.get_model({})


# ----------------------------------------------------------------------------------------------------------
# diffusion models

def diffusion_state_dict(model_class: str, unet_config: dict, seed: int = 0, dtype=torch.float32) -> dict:
    """The contents of a tiny 'diffusion_models/*.safetensors' file (keys as in the real files, no prefix)."""
    _, skeleton = _skeleton(model_class, unet_config, dtype)
    return seeded_state_dict(skeleton.diffusion_model, seed, dtype)


def load_diffusion_model(model_class: str, unet_config: dict, sd: dict, dtype=torch.float32):
    """What comfy.sd.load_diffusion_model_state_dict does once detection has chosen the model config."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config, model = _skeleton(model_class, unet_config, dtype)
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_tiny_zimage(seed: int = 0, dtype=torch.float32):
    """MODEL: a tiny Z-Image (supported_models.ZImage -> model_base.Lumina2 / NextDiT), shift 3, Flux latents."""
    return load_diffusion_model("ZImage", TINY_ZIMAGE, diffusion_state_dict("ZImage", TINY_ZIMAGE, seed, dtype), dtype)


def build_tiny_flux2(seed: int = 0, dtype=torch.float32):
    """MODEL: a tiny FLUX.2-klein-like model (supported_models.Flux2, guidance_embed False, 128 latent channels)."""
    return load_diffusion_model("Flux2", TINY_FLUX2, diffusion_state_dict("Flux2", TINY_FLUX2, seed, dtype), dtype)


def save_diffusion_model(path, model_class: str, unet_config: dict, sd: dict) -> str:
    """Write a tiny diffusion model file whose metadata lets tests/comfy_test_support detect it."""
    import safetensors.torch

    meta = {META_MODEL_CLASS: model_class, META_UNET_CONFIG: json.dumps(host_unet_config(unet_config))}
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# text encoders

def qwen3_state_dict(config: dict = TINY_QWEN3, seed: int = 0) -> dict:
    """A tiny Qwen3 text encoder file's contents, with Qwen3-4B's key names (model.layers.N.self_attn.q_norm...)."""
    import comfy.ops
    import comfy.text_encoders.llama

    skeleton = comfy.text_encoders.llama.Qwen3_4B(dict(config), dtype=torch.float32, device="cpu",
                                                   operations=comfy.ops.disable_weight_init)
    return seeded_state_dict(skeleton, seed)


def save_state_dict(path, sd: dict) -> str:
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _clip_from_target(target, sd, model_options):
    """comfy.sd.CLIP built the way load_text_encoder_state_dicts builds it (signature differs across versions)."""
    import comfy.sd
    import comfy.utils

    kwargs = dict(parameters=comfy.utils.calculate_parameters(sd), model_options=model_options)
    if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
        kwargs["state_dict"] = [sd]
    clip = comfy.sd.CLIP(target, **kwargs)
    clip.load_sd(sd)
    return clip


def load_tiny_zimage_clip(path, config: dict = TINY_QWEN3):
    """CLIP: Z-Image's Qwen3-4B text encoder (ZImageTokenizer + ZImageTEModel) at tiny size.

    Goes through the stock comfy.sd.load_clip(type lumina2) with the official size hook
    model_options["qwen3_4b_model_config"]. Newer ComfyUI detects Qwen3 encoders by hidden size, so a tiny file
    is no longer recognised there; then the same CLIP is assembled from the same classes directly."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.z_image
    import comfy.utils

    model_options = {"qwen3_4b_model_config": dict(config)}
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    if comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B:
        return comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=model_options)
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer,
                                                     comfy.text_encoders.z_image.te())
    return _clip_from_target(target, sd, model_options)


def has_klein_text_encoder() -> bool:
    """FLUX.2-klein's Qwen3 text encoder exists in ComfyUI >= 0.9.2 only."""
    import comfy.text_encoders.flux

    return hasattr(comfy.text_encoders.flux, "klein_te")


def load_tiny_klein_clip(path, config: dict = TINY_KLEIN_QWEN3):
    """CLIP: FLUX.2-klein's text encoder (KleinTokenizer + klein_te, layers 9/18/27 stacked) at tiny size.
    Needs ComfyUI >= 0.9.2 (check has_klein_text_encoder())."""
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.KleinTokenizer,
                                                     comfy.text_encoders.flux.klein_te(model_type="qwen3_4b"))
    return _clip_from_target(target, sd, {"qwen3_4b_model_config": dict(config)})


def flux2_conditioning(seed: int = 0, tokens: int = 16, width: int = TINY_FLUX2["context_in_dim"], batch: int = 1):
    """CONDITIONING for the tiny Flux2 without a text encoder (ComfyUI 0.3.75 has no klein encoder):
    seeded features of the right width; pooled_output None, as every Flux2 encoder returns."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, width, generator=gen)
    return [[cond, {"pooled_output": None}]]


# ----------------------------------------------------------------------------------------------------------
# VAEs

def _tiny_vae(params: dict, seed: int, latent_channels: int, ratio: int):
    import comfy.ldm.models.autoencoder
    import comfy.sd

    skeleton = comfy.ldm.models.autoencoder.AutoencoderKL(**json.loads(json.dumps(params)))
    sd = seeded_state_dict(skeleton, seed)
    vae = comfy.sd.VAE(sd=sd, config={"params": json.loads(json.dumps(params))})
    # The config path builds the network but keeps SD-VAE defaults for the bookkeeping; set the real layout's.
    vae.latent_channels = latent_channels
    vae.downscale_ratio = vae.upscale_ratio = ratio
    return vae


def build_tiny_flux_vae(seed: int = 0):
    """VAE for Z-Image (the Flux autoencoder layout: 16 latent channels, 8x downscale)."""
    return _tiny_vae(TINY_FLUX_VAE, seed, latent_channels=16, ratio=8)


def build_tiny_flux2_vae(seed: int = 0):
    """VAE for Flux2 (32 channels patchified 2x2 with batch-norm: 128 latent channels, 16x downscale)."""
    return _tiny_vae(TINY_FLUX2_VAE, seed, latent_channels=128, ratio=16)
