"""Datasets of image-caption pairs: from a folder under ComfyUI's input directory, or from the graph."""
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..dopsd_core import data
from . import CATEGORY
from .paths import inside

Dataset = io.Custom("DOPSD_DATASET")


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _prepare(images_and_captions, trigger: str, resolution: int):
    """Resize each image to its aspect bucket and apply the trigger word."""
    buckets = data.bucket_sizes(resolution, step=64 if resolution >= 256 else 16)
    items = []
    for image, caption in images_and_captions:
        size = data.nearest_bucket(image.width, image.height, buckets)
        items.append({"image": _to_tensor(data.resize_to_bucket(image, size)),
                      "caption": data.apply_trigger(caption, trigger)})
    return items


class DOPSDDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromFolder", display_name="D-OPSD Dataset (folder)", category=CATEGORY,
            description="Image + same-name .txt caption pairs from a folder inside ComfyUI's input directory "
                        "(or a .jsonl file there with image/caption rows).",
            inputs=[
                io.String.Input("folder", default="dopsd_dataset",
                                tooltip="Folder (or .jsonl file) relative to ComfyUI/input."),
                io.String.Input("trigger", default="", tooltip="Replaces [trigger] in captions; otherwise prepended."),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32,
                             tooltip="Training area is about resolution^2; each image goes to its aspect bucket."),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        try:
            path = inside(folder_paths.get_input_directory(), folder, "dataset folder")
        except ValueError as e:
            return str(e)
        import os
        if not os.path.exists(path):
            return f"dataset folder {folder!r} does not exist in {folder_paths.get_input_directory()}"
        return True

    @classmethod
    def execute(cls, folder, trigger, resolution) -> io.NodeOutput:
        path = inside(folder_paths.get_input_directory(), folder, "dataset folder")
        examples = data.load_jsonl(path) if path.endswith(".jsonl") else data.load_folder(path)
        pairs = [(data.open_image(e.image_path), e.caption) for e in examples]
        return io.NodeOutput(_prepare(pairs, trigger, resolution))


class DOPSDDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromImages", display_name="D-OPSD Dataset (images + captions)", category=CATEGORY,
            description="Training pairs from an IMAGE batch wired in the graph and one caption per line "
                        "(a single line is used for every image).",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("captions", multiline=True, default="a photo of [trigger]"),
                io.String.Input("trigger", default=""),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, captions, trigger, resolution) -> io.NodeOutput:
        lines = [c.strip() for c in captions.splitlines() if c.strip()]
        if not lines:
            raise ValueError("captions is empty: write one caption per line (or one line for all images)")
        if len(lines) not in (1, images.shape[0]):
            raise ValueError(f"got {images.shape[0]} images but {len(lines)} caption lines: give one caption per "
                             "image, or a single line for all of them")
        from PIL import Image
        pil = [Image.fromarray((img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)) for img in images]
        caps = lines * images.shape[0] if len(lines) == 1 else lines
        return io.NodeOutput(_prepare(list(zip(pil, caps)), trigger, resolution))


NODES = [DOPSDDatasetFromFolder, DOPSDDatasetFromImages]
