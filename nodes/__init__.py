"""The pack's ComfyUI nodes.

Convention: every module named `*_nodes.py` in this package defines `NODES`, a list of V3 `io.ComfyNode`
classes; NODE_LIST collects them in module-name order. Node ids start with "DOPSD" and custom socket
types with "DOPSD_", so they cannot clash with ComfyUI's or another pack's. A module that fails to import
makes the whole pack fail to import, loudly, rather than silently losing nodes.
"""
import importlib
import pkgutil

CATEGORY = "D-OPSD"

NODE_LIST = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.endswith("_nodes"):
        NODE_LIST.extend(importlib.import_module(f".{_info.name}", __name__).NODES)
