"""comfyui-dopsd: D-OPSD (on-policy self-distillation) LoRA training for step-distilled diffusion models in ComfyUI.

ComfyUI imports this file as the pack. Nodes are V3 (`comfy_api.latest`) classes collected in nodes.NODE_LIST.
They are offered both ways ComfyUI discovers nodes: NODE_CLASS_MAPPINGS (checked first by every ComfyUI
version; 0.3.75 then ignores comfy_entrypoint) and the V3 `comfy_entrypoint`.
All imports inside the pack are relative: ComfyUI has its own top-level `nodes` module.
"""
from comfy_api.latest import ComfyExtension

from .nodes import NODE_LIST

WEB_DIRECTORY = "./web"

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _node in NODE_LIST:
    _schema = _node.GET_SCHEMA()
    NODE_CLASS_MAPPINGS[_schema.node_id] = _node
    NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name or _schema.node_id


class DOPSDExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODE_LIST)


async def comfy_entrypoint() -> ComfyExtension:
    return DOPSDExtension()


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "comfy_entrypoint"]
