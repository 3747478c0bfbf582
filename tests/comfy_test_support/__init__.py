"""Test-only ComfyUI custom node (never part of the pack): lets the stock loaders open tiny model files.

ComfyUI's model detection hard-codes real model widths, so UNETLoader / CLIPLoader cannot open the tiny
files tests write. The comfy_server fixture links this directory into the server's custom_nodes; importing it
patches two lookups, and only for files that say they are tiny:
- diffusion models: tests/comfy_fixtures.save_diffusion_model stores the supported_models class name and
  the unet config in the safetensors metadata; that config is used instead of detection.
- Qwen3 text encoders narrower than Qwen3-4B: detected as Qwen3-4B (newer ComfyUI goes by hidden size), and
  their sizes, read from the tensor shapes, are passed as the official `qwen3_4b_model_config` model option
  (the stock CLIPLoader has no way to pass it).
"""
import json
import logging

import comfy.model_detection
import comfy.sd
import comfy.supported_models

META_MODEL_CLASS = "comfy_test.model_class"
META_UNET_CONFIG = "comfy_test.unet_config"
QWEN3_4B_HIDDEN = 2560

_stock_model_config_from_unet = comfy.model_detection.model_config_from_unet
_stock_load_te = comfy.sd.load_text_encoder_state_dicts
_stock_detect_te = comfy.sd.detect_te_model


def _model_config_from_unet(state_dict, unet_key_prefix, *args, metadata=None, **kwargs):
    if metadata and META_MODEL_CLASS in metadata:
        config_class = getattr(comfy.supported_models, metadata[META_MODEL_CLASS])
        logging.info("comfy_test_support: tiny %s from file metadata", metadata[META_MODEL_CLASS])
        return config_class(json.loads(metadata[META_UNET_CONFIG]))
    return _stock_model_config_from_unet(state_dict, unet_key_prefix, *args, metadata=metadata, **kwargs)


def _tiny_qwen3_config(sd):
    """Qwen3-4B-layout sizes of a tiny Qwen3 state dict, or None for anything else."""
    norm = sd.get("model.layers.0.post_attention_layernorm.weight")
    if norm is None or "model.layers.0.self_attn.q_norm.weight" not in sd or norm.shape[0] == QWEN3_4B_HIDDEN:
        return None
    head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    return dict(hidden_size=norm.shape[0], num_hidden_layers=layers,
                intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim)


def _detect_te_model(sd, *args, **kwargs):
    # Newer ComfyUI tells Qwen3 sizes apart by hidden size; a tiny one would be taken for another model.
    if _tiny_qwen3_config(sd) is not None:
        return comfy.sd.TEModel.QWEN3_4B
    return _stock_detect_te(sd, *args, **kwargs)


def _load_text_encoder_state_dicts(state_dicts=[], *args, model_options={}, **kwargs):
    config = _tiny_qwen3_config(state_dicts[0]) if len(state_dicts) == 1 else None
    if config is not None:
        logging.info("comfy_test_support: tiny Qwen3 text encoder %s", config)
        model_options = dict(model_options, qwen3_4b_model_config=config)
    return _stock_load_te(state_dicts, *args, model_options=model_options, **kwargs)


comfy.model_detection.model_config_from_unet = _model_config_from_unet
comfy.sd.load_text_encoder_state_dicts = _load_text_encoder_state_dicts
comfy.sd.detect_te_model = _detect_te_model

class TestTinyVAE:
    """Test-only loader: the seeded tiny VAE of tests/comfy_fixtures.py (VAELoader cannot open tiny files)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["flux", "flux2"],), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, kind, seed):
        import os
        import sys
        tests_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        if tests_dir not in sys.path:
            sys.path.append(tests_dir)
        import comfy_fixtures
        build = comfy_fixtures.build_tiny_flux_vae if kind == "flux" else comfy_fixtures.build_tiny_flux2_vae
        return (build(seed=seed),)


NODE_CLASS_MAPPINGS = {"TestTinyVAE": TestTinyVAE}

from .tiny_klein_clip import NODE_CLASS_MAPPINGS as _KLEIN_CLIP  # noqa: E402  (used by tests/test_web_*.py)

NODE_CLASS_MAPPINGS.update(_KLEIN_CLIP)

from . import tiny_qwen_vl  # noqa: E402,F401  (the stock CLIPLoader opens the tiny Qwen2.5-VL file)
