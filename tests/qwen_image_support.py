"""Tiny but real Qwen-Image models, built through ComfyUI's own classes (as comfy_fixtures builds Z-Image / Flux2).

- Diffusion model: supported_models.QwenImage -> model_base.QwenImage / comfy.ldm.qwen_image's
  QwenImageTransformer2DModel,
  the real layout shrunk: 2 double-stream blocks, 2 heads of 32 (axes_dims_rope 8+12+12 = head_dim, as 16+56+56 = 128
  in the real model), joint_attention_dim = the tiny text encoder's hidden size, 64 input channels (16 latent
  channels x 2 x 2 patches), Wan 2.1 latents (16 ch, 1/8, 5-D [B, 16, T, H, W]).
- Text encoder: Qwen2.5-VL-7B's layout (comfy.text_encoders.llama.Qwen25_7BVLI under qwen_image.te /
  QwenImageTokenizer) with hidden 64 and the full 152064 vocab. num_key_value_heads stays 4 because ComfyUI
  detects Qwen2.5-7B by k_proj.bias width 4 x 128 = 512 (head_dim 128 is a class constant). WITH its vision tower
  (qwen_vl.Qwen2VLVisionTransformer): ComfyUI builds that at the real width (1280, 32 blocks, ~630 M parameters)
  whatever the config says, so tiny_vision_tower() shrinks it to 32 wide x 2 blocks while the encoder is built; the
  patch is confined to the `with` block (the server does the same for tiny files: comfy_test_support/tiny_qwen_vl.py).
- VAE: ComfyUI's Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE, what Qwen-Image uses) at base width 8 instead of 96; the
  stock comfy.sd.VAE detects it from the state dict (width read from decoder.head.0.gamma), so the stock VAELoader
  opens the tiny file too.
"""
import contextlib
import threading

import torch

import comfy_fixtures as F

QWEN_TE_HIDDEN = 64
QWEN_VL_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
REAL_VISION_WIDTH = 1280  # what Qwen25_7BVLI hard-codes

TINY_QWEN_IMAGE = dict(
    image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=QWEN_TE_HIDDEN, axes_dims_rope=[8, 12, 12],
)
# comfy.text_encoders.llama.Qwen25_7BVLI_Config fields, shrunk; passed as model_options["qwen25_7b_model_config"].
TINY_QWEN25_VL = dict(hidden_size=QWEN_TE_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
WAN_VAE_DIM = 8

TINY_QWEN_IMAGE_FILE = "tiny_qwen_image.safetensors"
TINY_QWEN25_VL_FILE = "tiny_qwen_2.5_vl.safetensors"
TINY_WAN_VAE_FILE = "tiny_qwen_image_vae.safetensors"


# ----------------------------------------------------------------------------------------------------------
# host feature detection

def has_qwen_image() -> bool:
    """Qwen-Image (model, Qwen2.5-VL encoder with images) is in ComfyUI >= 0.3.49; both test hosts have it."""
    import comfy.supported_models

    try:
        import comfy.text_encoders.qwen_image  # noqa: F401
        import comfy.text_encoders.qwen_vl  # noqa: F401
    except ImportError:
        return False
    return hasattr(comfy.supported_models, "QwenImage")


# ----------------------------------------------------------------------------------------------------------
# the vision tower at tiny size

_vision = threading.local()


def _tiny_tower_class(stock):
    class TinyQwen2VLVisionTransformer(stock):
        """The stock vision transformer at the sizes set by tiny_vision_tower (stock sizes otherwise)."""

        def __init__(self, *args, **kwargs):
            sizes = getattr(_vision, "sizes", None)
            if sizes:
                kwargs.update(sizes)
            super().__init__(*args, **kwargs)
            if sizes:  # the real tower attends globally in every 8th block (7, 15, 23, 31): keep one such block
                self.fullatt_block_indexes = [sizes["num_layers"] - 1]
    TinyQwen2VLVisionTransformer.__name__ = stock.__name__
    return TinyQwen2VLVisionTransformer


@contextlib.contextmanager
def tiny_vision_tower(sizes: dict = QWEN_VL_VISION):
    """While active (in this thread), Qwen2.5-VL encoders get a vision tower of `sizes` instead of 1280 x 32."""
    import comfy.text_encoders.qwen_vl as qwen_vl

    if not getattr(qwen_vl.Qwen2VLVisionTransformer, "_dopsd_tiny", False):
        tiny = _tiny_tower_class(qwen_vl.Qwen2VLVisionTransformer)
        tiny._dopsd_tiny = True
        qwen_vl.Qwen2VLVisionTransformer = tiny  # llama.Qwen25_7BVLI looks the class up at construction
    old, _vision.sizes = getattr(_vision, "sizes", None), dict(sizes)
    try:
        yield
    finally:
        _vision.sizes = old


def tiny_sizes(sd: dict):
    """(qwen25_7b_model_config, vision sizes) read from a tiny Qwen2.5-VL state dict; None for anything else."""
    patch = sd.get("visual.patch_embed.proj.weight")
    norm = sd.get("model.layers.0.post_attention_layernorm.weight")
    if patch is None or norm is None or patch.shape[0] == REAL_VISION_WIDTH:
        return None
    head_dim = 128
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.blocks."))
    config = dict(hidden_size=norm.shape[0], num_hidden_layers=layers,
                  intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                  num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                  num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim)
    vision = dict(hidden_size=patch.shape[0], num_layers=blocks,
                  intermediate_size=sd["visual.blocks.0.mlp.gate_proj.weight"].shape[0],
                  num_heads=QWEN_VL_VISION["num_heads"])  # not readable from the shapes
    return config, vision


# ----------------------------------------------------------------------------------------------------------
# builders

def qwen_image_state_dict(seed: int = 0) -> dict:
    return F.diffusion_state_dict("QwenImage", TINY_QWEN_IMAGE, seed)


def build_tiny_qwen_image(seed: int = 0, dtype=torch.float32):
    """MODEL: a tiny Qwen-Image (supported_models.QwenImage -> model_base.QwenImage), shift 1.15, Wan 2.1 latents."""
    return F.load_diffusion_model("QwenImage", TINY_QWEN_IMAGE, F.diffusion_state_dict("QwenImage", TINY_QWEN_IMAGE,
                                                                                         seed, dtype), dtype)


def build_tiny_qwen_image_fp8(seed: int = 0):
    """MODEL: the tiny Qwen-Image with float8_e4m3fn weights computed in fp32 (ComfyUI's manual-cast ops), as the
    shipped workflow's qwen_image_fp8_e4m3fn.safetensors loads on a device without fp8 compute."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.QwenImage(F.host_unet_config(TINY_QWEN_IMAGE))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    model = config.get_model({}, device="cpu")
    model.load_model_weights({k: v.to(torch.float8_e4m3fn) for k, v in qwen_image_state_dict(seed).items()}, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def qwen25_vl_state_dict(seed: int = 0) -> dict:
    """A tiny Qwen2.5-VL-7B file's contents (model.layers.* and visual.* keys, as in qwen_2.5_vl_7b.safetensors)."""
    import comfy.ops
    import comfy.text_encoders.llama

    with tiny_vision_tower():
        skeleton = comfy.text_encoders.llama.Qwen25_7BVLI(dict(TINY_QWEN25_VL), dtype=torch.float32, device="cpu",
                                                          operations=comfy.ops.disable_weight_init)
    return F.seeded_state_dict(skeleton, seed)


def load_tiny_qwen_clip(sd: dict):
    """CLIP: Qwen-Image's text encoder (QwenImageTokenizer + qwen_image.te) from a tiny state dict, through the
    stock comfy.sd.load_text_encoder_state_dicts (detected as Qwen2.5-7B) with the official size hook."""
    import comfy.sd

    config, vision = tiny_sizes(sd)
    with tiny_vision_tower(vision):
        return comfy.sd.load_text_encoder_state_dicts([dict(sd)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                                      model_options={"qwen25_7b_model_config": config})


def build_tiny_qwen_clip(seed: int = 0):
    return load_tiny_qwen_clip(qwen25_vl_state_dict(seed))


def wan_vae_state_dict(seed: int = 0) -> dict:
    import comfy.ldm.wan.vae

    skeleton = comfy.ldm.wan.vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    return F.seeded_state_dict(skeleton, seed)


def build_tiny_wan_vae(seed: int = 0):
    """VAE: the Wan 2.1 autoencoder at base width 8, through the stock comfy.sd.VAE detection."""
    import comfy.sd

    return comfy.sd.VAE(sd=wan_vae_state_dict(seed))


def tiny_set(seed: int = 0):
    """(MODEL, CLIP, VAE) of the tiny Qwen-Image (about 1 s to build; ComfyUI's own loaders' output types)."""
    return build_tiny_qwen_image(seed), build_tiny_qwen_clip(seed), build_tiny_wan_vae(seed)


def write_server_models(models_dir) -> None:
    """Put the tiny Qwen-Image files where the stock UNETLoader / CLIPLoader (qwen_image) / VAELoader look."""
    F.save_diffusion_model(models_dir / "diffusion_models" / TINY_QWEN_IMAGE_FILE, "QwenImage", TINY_QWEN_IMAGE,
                           qwen_image_state_dict(seed=0))
    F.save_state_dict(models_dir / "text_encoders" / TINY_QWEN25_VL_FILE, qwen25_vl_state_dict(seed=0))
    (models_dir / "vae").mkdir(parents=True, exist_ok=True)
    F.save_state_dict(models_dir / "vae" / TINY_WAN_VAE_FILE, wan_vae_state_dict(seed=0))
    (models_dir / "loras").mkdir(parents=True, exist_ok=True)
    F.save_state_dict(models_dir / "loras" / TINY_LIGHTNING_FILE, lightning_lora_state_dict(seed=0))


TINY_LIGHTNING_FILE = "tiny_qwen_image_lightning.safetensors"


def lightning_lora_state_dict(seed: int = 0, rank: int = 4, scale: float = 0.02) -> dict:
    """A stand-in for Qwen-Image-Lightning (a few-step LoRA for Qwen-Image) on the tiny model: rank-4 LoRA on every
    attention and MLP Linear, in the diffusers-style key format ComfyUI maps for Qwen-Image."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in build_tiny_qwen_image(seed=0).model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
            sd[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
    return sd
