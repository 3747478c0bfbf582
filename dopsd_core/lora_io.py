"""LoRA files: ComfyUI format (what stock LoraLoaderModelOnly loads) and PEFT format (official D-OPSD).

ComfyUI format: `<prefix><module>.lora_up.weight [out, r]`, `.lora_down.weight [r, in]`, `.alpha` (0-dim),
effective scale alpha / r, with `dopsd.*` metadata in the safetensors header. ComfyUI maps
`diffusion_model.<module>` straight onto the model's `<module>.weight`, so these files load without
"lora key not loaded" as long as <module> names the host's own modules.

PEFT format: a folder with `adapter_config.json` (written by peft's LoraConfig) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (= down) and `.lora_B.weight`
(= up); rank and alpha live in the config (`r`, `lora_alpha`, per-module `rank_pattern`/`alpha_pattern`,
`use_rslora`). The official D-OPSD scripts save a model with two adapters, so a checkpoint folder holds
`student/` and `teacher/` sub-folders, each a PEFT adapter; `load_peft_adapter` picks one.

Module names differ between hosts (diffusers' Z-Image has `layers.0.attention.to_q/to_k/to_v`, ComfyUI's a
fused `layers.0.attention.qkv`). `name_map` callables translate names; fused weights need the exact block
conversion of `fuse_qkv_loras` (separate -> fused) and `split_fused_lora` (fused -> separate).
"""
import json
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_write

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
NameMap = Optional[Callable[[str], str]]
Part = Union[Tuple[torch.Tensor, torch.Tensor, float], Dict[str, torch.Tensor]]


def lora_metadata(method: str, base_model: str, rank: int, alpha: float, steps: int, settings: dict,
                  **extra) -> Dict[str, str]:
    """safetensors header metadata (strings only) describing how a LoRA was made.

    Keys: dopsd.method, dopsd.base_model, dopsd.rank, dopsd.alpha, dopsd.steps, dopsd.settings (JSON of the
    TrainConfig), dopsd.version, plus dopsd.<key> for every extra keyword (e.g. targets=..., source=...).
    """
    from . import __version__

    meta = {"dopsd.method": str(method), "dopsd.base_model": str(base_model), "dopsd.rank": str(rank),
            "dopsd.alpha": str(alpha), "dopsd.steps": str(steps),
            "dopsd.settings": json.dumps(settings, sort_keys=True, default=str),
            "dopsd.version": __version__, "format": "pt"}
    for k, v in extra.items():
        meta[f"dopsd.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return meta


def save_comfy_lora(path: str, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
                    overwrite: bool = False) -> str:
    """Write atomically; refuses to replace an existing file unless overwrite=True."""
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), overwrite=overwrite)


def load_comfy_lora(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, header metadata) of a ComfyUI-format LoRA file."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def _module_name(module: str, prefix: str) -> str:
    return module[len(prefix):] if prefix and module.startswith(prefix) else module


def comfy_to_peft(sd: Dict[str, torch.Tensor], prefix: str = "diffusion_model.", name_map: NameMap = None):
    """ComfyUI-format factors -> (PEFT tensors, ranks, alphas) keyed by (mapped) module name."""
    tensors, ranks, alphas = {}, {}, {}
    for key, up in sd.items():
        if not key.endswith(".lora_up.weight"):
            continue
        module = key[: -len(".lora_up.weight")]
        if module + ".lora_down.weight" not in sd:
            raise KeyError(f"{key} has no matching {module}.lora_down.weight")
        down = sd[module + ".lora_down.weight"]
        name = _module_name(module, prefix)
        name = name_map(name) if name_map else name
        if name in ranks:
            raise ValueError(f"two LoRA modules map to the PEFT name {name!r}; check name_map")
        ranks[name] = int(down.shape[0])
        alphas[name] = float(sd[module + ".alpha"]) if module + ".alpha" in sd else float(down.shape[0])
        tensors[PEFT_PREFIX + name + ".lora_A.weight"] = down.detach().contiguous().cpu()
        tensors[PEFT_PREFIX + name + ".lora_B.weight"] = up.detach().contiguous().cpu()
    return tensors, ranks, alphas


def _most_common(values):
    values = list(values)
    return max(sorted(set(values)), key=values.count)


def save_peft_adapter(folder: str, sd: Dict[str, torch.Tensor], prefix: str = "diffusion_model.",
                      name_map: NameMap = None, base_model: Optional[str] = None, overwrite: bool = False,
                      metadata: Optional[Dict[str, str]] = None) -> str:
    """Write a PEFT adapter folder (from ComfyUI-format factors) that `PeftModel.from_pretrained` loads.

    Ranks/alphas that differ from the most common one go into rank_pattern/alpha_pattern, anchored so that
    each pattern matches exactly its module.
    """
    from peft import LoraConfig

    tensors, ranks, alphas = comfy_to_peft(sd, prefix, name_map)
    if not tensors:
        raise ValueError("no LoRA factors to export")
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    # target_modules as one anchored regex: a plain list would also match other modules ending in a name
    targets = "^(?:" + "|".join(re.escape(n) for n in sorted(ranks)) + ")$"
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                        rank_pattern={f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
                        alpha_pattern={f"^{re.escape(n)}": v for n, v in alphas.items() if v != alpha},
                        base_model_name_or_path=base_model)
    if os.path.exists(os.path.join(folder, PEFT_WEIGHTS)) and not overwrite:
        raise FileExistsError(f"{folder} already holds a PEFT adapter; choose another folder or allow overwriting")
    os.makedirs(folder, exist_ok=True)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    atomic_write(os.path.join(folder, PEFT_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata=meta))
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_json)

    atomic_write(os.path.join(folder, PEFT_CONFIG), write_config)
    return folder


def _pattern_value(name: str, patterns: Optional[dict], default):
    """PEFT's rule: a pattern key matches a module name that ends with it (after a dot), as a regex."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def find_peft_adapter(path: str, adapter: Optional[str] = None) -> str:
    """The folder of one PEFT adapter: `path` itself, or its `adapter` sub-folder (the official D-OPSD
    checkpoints hold `student/` and `teacher/`; without `adapter`, `student` is chosen)."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    if adapter is None and os.path.exists(os.path.join(path, PEFT_WEIGHTS)):
        return path
    subs = sorted(d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, PEFT_WEIGHTS)))
    if adapter is not None:
        if adapter not in subs:
            raise FileNotFoundError(f"no adapter {adapter!r} in {path}; it holds: {', '.join(subs) or 'none'}")
        return os.path.join(path, adapter)
    if "student" in subs:
        return os.path.join(path, "student")
    if len(subs) == 1:
        return os.path.join(path, subs[0])
    raise FileNotFoundError(f"no {PEFT_WEIGHTS} in {path}" + (f"; choose one of its adapters: {', '.join(subs)}"
                                                             if subs else ""))


def load_peft_adapter(path: str, prefix: str = "diffusion_model.", name_map: NameMap = None,
                      adapter: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A PEFT adapter folder (or its .safetensors file, or an official checkpoint folder with student/ and
    teacher/) -> ComfyUI-format factors with explicit alphas (rsLoRA folded into alpha).

    `name_map` translates PEFT module names (e.g. diffusers' `layers.0.attention.to_q`) into the host's.
    """
    folder = find_peft_adapter(path, adapter)
    weights = path if os.path.isfile(path) else os.path.join(folder, PEFT_WEIGHTS)
    config_path = os.path.join(folder, PEFT_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {PEFT_CONFIG} beside {weights}: PEFT rank/alpha are stored there")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("use_dora"):
        raise ValueError(f"{folder} is a DoRA adapter; only plain LoRA can be converted exactly")
    tensors = load_file(weights)
    out = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            if "lora_magnitude_vector" in key:
                raise ValueError(f"{weights} holds DoRA magnitudes ({key}); only plain LoRA can be converted")
            continue
        module, tail = key.split(".lora_A.", 1)
        up_key = f"{module}.lora_B.{tail}"
        if up_key not in tensors:
            raise KeyError(f"{weights}: {key} has no matching {up_key}")
        up = tensors[up_key]
        name = _module_name(module, PEFT_PREFIX)
        rank = int(down.shape[0])
        alpha = float(_pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", rank)))
        if config.get("use_rslora"):
            alpha = alpha * rank ** 0.5  # rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        name = name_map(name) if name_map else name
        key_out = prefix + name
        if key_out + ".lora_down.weight" in out:
            raise ValueError(f"two PEFT modules map to {key_out}; check name_map")
        out[key_out + ".lora_down.weight"] = down
        out[key_out + ".lora_up.weight"] = up
        out[key_out + ".alpha"] = torch.tensor(float(alpha))
    if not out:
        raise ValueError(f"{weights} holds no lora_A/lora_B tensors")
    return out


def convert_peft_to_comfy(peft_path: str, out_file: str, prefix: str = "diffusion_model.",
                          name_map: NameMap = None, adapter: Optional[str] = None,
                          metadata: Optional[Dict[str, str]] = None, overwrite: bool = False) -> str:
    """PEFT adapter (e.g. an official D-OPSD checkpoint) -> ComfyUI LoRA file."""
    sd = load_peft_adapter(peft_path, prefix, name_map, adapter)
    meta = {"dopsd.source": os.path.abspath(peft_path), **(metadata or {})}
    return save_comfy_lora(out_file, sd, meta, overwrite=overwrite)


def convert_comfy_to_peft(comfy_file: str, out_folder: str, prefix: str = "diffusion_model.",
                          name_map: NameMap = None, base_model: Optional[str] = None, overwrite: bool = False) -> str:
    """ComfyUI LoRA file -> PEFT adapter folder (metadata carried over into the safetensors header)."""
    sd, meta = load_comfy_lora(comfy_file)
    return save_peft_adapter(out_folder, sd, prefix, name_map, base_model, overwrite, metadata=meta)


# -- fused weights (e.g. qkv) ---------------------------------------------------------------------------
def _as_part(part: Part) -> Tuple[torch.Tensor, torch.Tensor, float]:
    if isinstance(part, dict):
        down = part["lora_down.weight"]
        alpha = float(part["alpha"]) if "alpha" in part else float(down.shape[0])
        return down, part["lora_up.weight"], alpha
    down, up, alpha = part
    return down, up, float(alpha)


def fuse_loras(parts: Sequence[Part], out_features: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Exact LoRA for a fused weight (e.g. qkv) from LoRAs of its row blocks (q, k, v).

    parts: (down [r_i, in], up [o_i, r_i], alpha_i) tuples or {"lora_down.weight", "lora_up.weight", "alpha"}
    dicts, in row order. The result has rank sum(r_i), down = cat(down_i), up = blockdiag(up_i * alpha_i/r_i)
    and alpha = rank, so its scale is 1 and up @ down reproduces each block's delta exactly.
    """
    parts = [_as_part(p) for p in parts]
    ins = {d.shape[1] for d, _, _ in parts}
    if len(ins) != 1:
        raise ValueError(f"parts of a fused weight share its input size; got {sorted(ins)}")
    down = torch.cat([d for d, _, _ in parts], 0)
    up = torch.block_diag(*[u * (a / d.shape[0]) for d, u, a in parts])
    if out_features is not None and up.shape[0] != out_features:
        raise ValueError(f"fused LoRA has {up.shape[0]} rows, the fused weight has {out_features}")
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(down.shape[0]))}


def fuse_qkv_loras(q: Part, k: Part, v: Part, out_features: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Exact rank-(rq+rk+rv) LoRA for a fused qkv weight from the separate to_q/to_k/to_v LoRAs."""
    return fuse_loras([q, k, v], out_features)


def split_fused_lora(part: Part, sizes: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """Separate LoRAs for the row blocks (sizes, e.g. [d, d, d] for qkv) of a fused weight's LoRA.

    Exact: block i keeps the shared down and its rows of up, with the fused alpha and rank, so its delta is
    the fused delta's rows. (Each block keeps the full rank; a block-diagonal up, as fuse_loras makes,
    could be trimmed, but a trained fused LoRA's up is generally dense.)
    """
    down, up, alpha = _as_part(part)
    if sum(sizes) != up.shape[0]:
        raise ValueError(f"sizes {list(sizes)} add up to {sum(sizes)}, the fused LoRA has {up.shape[0]} rows")
    out, start = [], 0
    for n in sizes:
        out.append((down.clone(), up[start:start + n].clone(), alpha))
        start += n
    return out
