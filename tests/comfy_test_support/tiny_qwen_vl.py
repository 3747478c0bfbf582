"""Test-only patch: the stock CLIPLoader (type qwen_image) opens the tiny Qwen2.5-VL file of tests/qwen_image_support.

ComfyUI detects Qwen2.5-VL-7B by its k_proj bias width (the tiny file keeps it) but builds the language model at 7B
sizes and the vision tower at its real width (1280 x 32 blocks) whatever the file holds. For a file whose vision
tower is narrower than that, the sizes read from its tensors are passed as the official
`qwen25_7b_model_config` model option, and the vision tower is built at the file's width while it loads.
"""
import logging
import os
import sys

import comfy.sd

_tests_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _tests_dir not in sys.path:
    sys.path.append(_tests_dir)
import qwen_image_support  # noqa: E402

_previous_load_te = comfy.sd.load_text_encoder_state_dicts


def _load_text_encoder_state_dicts(state_dicts=[], *args, model_options={}, **kwargs):
    sizes = qwen_image_support.tiny_sizes(state_dicts[0]) if len(state_dicts) == 1 else None
    if sizes is None:
        return _previous_load_te(state_dicts, *args, model_options=model_options, **kwargs)
    config, vision = sizes
    logging.info("comfy_test_support: tiny Qwen2.5-VL text encoder %s, vision tower %s", config, vision)
    with qwen_image_support.tiny_vision_tower(vision):
        return _previous_load_te(state_dicts, *args, model_options=dict(model_options, qwen25_7b_model_config=config),
                                 **kwargs)


comfy.sd.load_text_encoder_state_dicts = _load_text_encoder_state_dicts
NODE_CLASS_MAPPINGS = {}
