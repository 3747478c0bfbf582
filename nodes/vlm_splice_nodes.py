"""The VLM-splice teacher for Z-Image-Turbo (the paper's choice): c_t from a Qwen3-VL that runs on the loaded
Z-Image text encoder's own Qwen3-4B weights. See nodes/comfy_bridge/vlm_splice.py for how the splice works."""
from comfy_api.latest import io

from . import CATEGORY
from .comfy_bridge import vlm_splice
from .dataset_nodes import Dataset
from .pairs import make_pair
from .teacher_nodes import _outputs, _pair_outputs, encode_latent, encode_text, require_dataset


class DOPSDTeacherVLMSplice(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherVLMSplice", display_name="D-OPSD Teacher: VLM Splice (Z-Image)", category=CATEGORY,
            description="Teacher context for Z-Image-Turbo as in the official recipe: a Qwen3-VL whose language "
                        "model is this CLIP's Qwen3-4B (shared, not loaded twice) reads the target image and the "
                        "caption; the teacher condition is its hidden state at hidden_layer. Needs a local "
                        "Qwen3-VL-4B-Instruct folder (only its vision tower is loaded).",
            inputs=[
                Dataset.Input("dataset"), io.Clip.Input("clip", tooltip="Z-Image's Qwen3-4B text encoder "
                                                                         "(CLIPLoader type lumina2)."),
                io.Vae.Input("vae"),
                io.String.Input("vision_model", default="models/text_encoders/Qwen3-VL-4B-Instruct",
                                tooltip="Folder with Qwen3-VL-4B-Instruct's config.json, preprocessor_config.json "
                                        "and safetensors (only model.visual.* is read). Absolute, or relative to "
                                        "the ComfyUI folder, its models folder or a text_encoders folder."),
                io.Int.Input("hidden_layer", default=-2, min=-1000, max=1000,
                             tooltip="Which hidden state is the condition (Z-Image reads -2, the penultimate layer; "
                                     "0 = embeddings)."),
                io.Int.Input("max_pixels", default=vlm_splice.MAX_PIXELS, min=1024, max=16384 * 16384, step=1024,
                             tooltip="Images above this area are scaled down for the VLM (official: 768x768)."),
                io.Int.Input("min_pixels", default=vlm_splice.MIN_PIXELS, min=1024, max=16384 * 16384, step=1024,
                             tooltip="Images below this area are scaled up for the VLM (official: 512x512)."),
            ],
            outputs=_pair_outputs(),
        )

    @classmethod
    def validate_inputs(cls, min_pixels=None, max_pixels=None):
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            return f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}): swap them"
        return True

    @classmethod
    def execute(cls, dataset, clip, vae, vision_model, hidden_layer, max_pixels, min_pixels) -> io.NodeOutput:
        require_dataset(dataset)
        vlm_splice.ComfyQwen3(clip).check_hidden_layer(hidden_layer)  # cheap checks before the folder is read
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}): swap them")
        splice, te = vlm_splice.get_splice(clip, vision_model)
        pairs = []
        for item in dataset:
            def encode(caption, item=item):
                teacher = splice.encode(te, caption, item["image"], hidden_layer, min_pixels, max_pixels)
                return encode_text(clip, caption), teacher, caption
            pairs.append(make_pair(item, encode_latent(vae, item["image"]), encode))
        return _outputs(pairs)


NODES = [DOPSDTeacherVLMSplice]
