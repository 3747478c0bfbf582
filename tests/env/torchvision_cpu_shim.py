"""Let PyPI's torchvision import beside the CPU-only torch wheel (test environment only).

PyPI ships torchvision as a CUDA build. Next to the CPU torch wheel its C extension cannot load
(it links libtorch_cuda), which torchvision tolerates, except that `_meta_registrations` then calls
`register_fake("torchvision::nms")` on an operator that was never defined and the import fails.
ComfyUI imports torchvision at module level (comfy.sd), so it has to import.

This finder runs once, just before torchvision is first imported: if the C extension loads, it does
nothing; otherwise it defines the two operator *schemas* torchvision expects. The C ops themselves stay
unavailable (torchvision.ops.nms raises), which no ComfyUI path used by the pack or its tests needs.
Installed by scripts/setup_env.sh as a .pth hook; see docs/testing.md for the alternatives considered.
"""
import importlib.abc
import importlib.util
import sys


class _TorchvisionCpuShim(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or _TorchvisionCpuShim.done:
            return None
        _TorchvisionCpuShim.done = True
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return None
        _define_missing_schemas(spec.submodule_search_locations[0])
        return spec


def _define_missing_schemas(package_dir):
    import glob
    import os

    import torch

    for lib in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return  # the real ops are there: nothing to do
        except (OSError, ImportError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined
    _define_missing_schemas.library = lib  # keep the fragment alive


sys.meta_path.insert(0, _TorchvisionCpuShim())
