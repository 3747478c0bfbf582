"""LoRA files: ComfyUI format (what stock LoraLoaderModelOnly loads) and PEFT format (official D-OPSD).

ComfyUI format: `<prefix><module>.lora_up.weight [out, r]`, `.lora_down.weight [r, in]`, `.alpha` (0-dim),
effective scale alpha / r, with `dopsd.*` metadata in the safetensors header.
PEFT format: a folder with `adapter_config.json` (written by peft's LoraConfig) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (= down) and `.lora_B.weight`
(= up); rank and alpha live in the config (`r`, `lora_alpha`, per-module `rank_pattern`/`alpha_pattern`).
"""
import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_write

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def lora_metadata(method: str, base_model: str, rank: int, alpha: float, steps: int, settings: dict) -> Dict[str, str]:
    """safetensors header metadata (strings only) describing how a LoRA was made."""
    return {"dopsd.method": str(method), "dopsd.base_model": str(base_model), "dopsd.rank": str(rank),
            "dopsd.alpha": str(alpha), "dopsd.steps": str(steps),
            "dopsd.settings": json.dumps(settings, sort_keys=True, default=str), "format": "pt"}


def save_comfy_lora(path: str, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
                    overwrite: bool = False) -> str:
    """Write atomically; refuses to replace an existing file unless overwrite=True."""
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), overwrite=overwrite)


def load_comfy_lora(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def comfy_to_peft(sd: Dict[str, torch.Tensor], prefix: str = "diffusion_model.",
                  name_map: Optional[Callable[[str], str]] = None):
    """ComfyUI-format factors -> (PEFT tensors, ranks, alphas) keyed by (mapped) module name."""
    tensors, ranks, alphas = {}, {}, {}
    for key, up in sd.items():
        if not key.endswith(".lora_up.weight"):
            continue
        module = key[: -len(".lora_up.weight")]
        down = sd[module + ".lora_down.weight"]
        name = module[len(prefix):] if module.startswith(prefix) else module
        name = name_map(name) if name_map else name
        ranks[name] = down.shape[0]
        alphas[name] = float(sd.get(module + ".alpha", torch.tensor(float(down.shape[0]))))
        tensors[PEFT_PREFIX + name + ".lora_A.weight"] = down.contiguous()
        tensors[PEFT_PREFIX + name + ".lora_B.weight"] = up.contiguous()
    return tensors, ranks, alphas


def save_peft_adapter(folder: str, sd: Dict[str, torch.Tensor], prefix: str = "diffusion_model.",
                      name_map: Optional[Callable[[str], str]] = None, base_model: Optional[str] = None,
                      overwrite: bool = False) -> str:
    """Write a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    from peft import LoraConfig

    tensors, ranks, alphas = comfy_to_peft(sd, prefix, name_map)
    if not tensors:
        raise ValueError("no LoRA factors to export")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks), init_lora_weights=True,
                        rank_pattern={n: v for n, v in ranks.items() if v != r},
                        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
                        base_model_name_or_path=base_model)
    if os.path.exists(os.path.join(folder, PEFT_WEIGHTS)) and not overwrite:
        raise FileExistsError(f"{folder} already holds a PEFT adapter; choose another folder or allow overwriting")
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, PEFT_WEIGHTS), lambda tmp: save_file(tensors, tmp))
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
    atomic_write(os.path.join(folder, PEFT_CONFIG), lambda tmp: open(tmp, "w").write(config_json))
    return folder


def _pattern_value(name: str, patterns: dict, default):
    for pattern, value in (patterns or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return value
    return default


def load_peft_adapter(path: str, prefix: str = "diffusion_model.",
                      name_map: Optional[Callable[[str], str]] = None) -> Dict[str, torch.Tensor]:
    """A PEFT adapter folder (or its .safetensors file) -> ComfyUI-format factors with explicit alphas.

    `name_map` translates PEFT module names (e.g. diffusers' `layers.0.attention.to_q`) into the host's.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = os.path.join(folder, PEFT_WEIGHTS) if os.path.isdir(path) else path
    config_path = os.path.join(folder, PEFT_CONFIG)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"no {PEFT_WEIGHTS} in {folder}")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {PEFT_CONFIG} beside {weights}: PEFT rank/alpha are stored there")
    with open(config_path) as f:
        config = json.load(f)
    tensors = load_file(weights)
    out = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        alpha = _pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", down.shape[0]))
        if config.get("use_rslora"):
            alpha = alpha * (down.shape[0] ** 0.5)  # rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        name = name_map(name) if name_map else name
        out[prefix + name + ".lora_down.weight"] = down
        out[prefix + name + ".lora_up.weight"] = up
        out[prefix + name + ".alpha"] = torch.tensor(float(alpha))
    if not out:
        raise ValueError(f"{weights} holds no lora_A/lora_B tensors")
    return out


def fuse_loras(parts, out_features=None) -> Dict[str, torch.Tensor]:
    """Exact LoRA for a fused weight (e.g. qkv) from LoRAs of its row blocks (q, k, v).

    parts: list of (down [r_i, in], up [o_i, r_i], alpha_i) in row order. The result has rank sum(r_i),
    down = cat(down_i), up = blockdiag(up_i * alpha_i / r_i) and alpha = rank, so its scale is 1 and
    up @ down reproduces each block's delta exactly.
    """
    downs = [d for d, _, _ in parts]
    ups = [u * (a / d.shape[0]) for d, u, a in parts]
    down = torch.cat(downs, 0)
    up = torch.block_diag(*ups)
    if out_features is not None and up.shape[0] != out_features:
        raise ValueError(f"fused LoRA has {up.shape[0]} rows, the fused weight has {out_features}")
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}
