"""Let PyPI's torchaudio import beside the CPU-only torch wheel (test environment only).

ComfyUI 0.33 imports torchaudio at start-up (comfy/sd.py -> the audio VAE). PyPI's newest torchaudio is a CUDA
build made for an older torch; its `_torchaudio` C extension cannot load here, and torchaudio's `_load_lib`
re-raises that OSError, so `import torchaudio` fails. torchaudio itself is written to run without the extension
when the library file is absent (`_load_lib` returns False).

This finder runs once, just before `torchaudio._extension.utils` is first imported: it wraps `_load_lib` so that a
library that exists but cannot load counts as absent. If the extension loads, the wrapper changes nothing. The
pure-Python parts (functional, transforms) work; the C ops stay unavailable, which no ComfyUI image path needs.
Installed by scripts/setup_env.sh as a .pth hook; see docs/testing.md.
"""
import importlib.abc
import importlib.util
import sys

TARGET = "torchaudio._extension.utils"


class _TorchaudioCpuShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            load_lib = module._load_lib

            def _load_lib_or_absent(lib):
                try:
                    return load_lib(lib)
                except OSError:
                    return False  # present but unloadable (CUDA build beside CPU torch): run without it

            module._load_lib = _load_lib_or_absent

        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, _TorchaudioCpuShim())
