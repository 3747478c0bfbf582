"""Where the toy world's weights live, and how they are saved and found again.

A build is identified by a hash of everything that determines it (world, model and training configs, and a
format version). Look-up order for a hash: the shipped copy in `toyworld/weights/<hash>/`, then the cache
`$DOPSD_TOYWORLD_CACHE` or `~/.cache/comfyui-dopsd/toyworld`, `<hash>/` below it. Each build directory holds
safetensors files (fp32, or fp16 for the shipped copy) and `meta.json` (configs, timings, measurements).
"""
import hashlib
import json
import os
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def cache_root() -> str:
    return os.environ.get("DOPSD_TOYWORLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "comfyui-dopsd", "toyworld")


def config_hash(config: Dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_build(key: str) -> Optional[str]:
    """The directory holding a complete build for `key`, or None."""
    for root in (SHIPPED_DIR, cache_root()):
        d = os.path.join(root, key)
        if os.path.exists(os.path.join(d, "meta.json")):
            return d
    return None


def save_module(module: torch.nn.Module, path: str, half: bool = False):
    sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous().clone()
          for k, v in module.state_dict().items()}
    save_file(sd, path)


def load_module(module: torch.nn.Module, path: str) -> torch.nn.Module:
    sd = load_file(path)
    ref = module.state_dict()
    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()})
    return module


def write_meta(directory: str, meta: Dict):
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def read_meta(directory: str) -> Dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)
