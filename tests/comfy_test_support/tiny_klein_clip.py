"""Test-only node: a stand-in CLIP for the tiny FLUX.2-klein model on ComfyUI versions without a klein text encoder.

ComfyUI < 0.9.2 has no Qwen3 text encoder for FLUX.2 (CLIPLoader type flux2 means Mistral-24B there), so the
shipped klein workflows cannot load a text encoder on it. Tests that execute those workflows replace their
CLIPLoader with this node: deterministic CONDITIONING per text, of the tiny Flux2's context width (the same
stand-in tests/nodes_support.FakeFlux2Clip gives the in-process tests).
"""
import os
import sys

import torch


def _fixtures():
    tests_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import comfy_fixtures
    return comfy_fixtures


class _TinyKleinClip:
    def __init__(self, width: int, tokens: int = 16):
        self.width, self.tokens = width, tokens

    def tokenize(self, text, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, text, **kwargs):
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        return [[torch.randn(1, self.tokens, self.width, generator=gen), {"pooled_output": None}]]


class TestTinyKleinCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (_TinyKleinClip(_fixtures().TINY_FLUX2["context_in_dim"]),)


NODE_CLASS_MAPPINGS = {"TestTinyKleinCLIP": TestTinyKleinCLIP}
