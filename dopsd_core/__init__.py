"""D-OPSD: on-policy self-distillation for step-distilled flow models, as a standalone library.

Knows nothing of ComfyUI: everything works on torch modules that predict flow-matching velocity.
"""
from . import flow, lora, objectives, sampler, schedules  # noqa: F401

__version__ = "0.1.0"
