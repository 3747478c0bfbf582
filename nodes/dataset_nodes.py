"""Datasets of image-caption pairs: from a folder under ComfyUI's input directory, or from the graph.

One rule for both (docs/nodes.md, "Dataset rules"): images are turned upright by EXIF, transparent pixels
become white, 16-bit greyscale is scaled to 8 bits, and each image goes to its aspect bucket.
"""
import logging
import os

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..dopsd_core import data
from . import CATEGORY
from .paths import comfy_roots, inside

Dataset = io.Custom("DOPSD_DATASET")
# A dataset folder (or a symlink in input/ to one) may live in ComfyUI's input or output directory.
DATASET_ROOTS = ("input", "output")


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _prepare(images_and_captions, trigger: str, resolution: int, caption_dropout: float = 0.0):
    """Resize each image to its aspect bucket and apply the trigger word. Repeated examples (kohya
    repeats) are given as the same PIL image object and become the same item object, so they cost no
    memory and the teacher nodes encode them once.

    images_and_captions: (image, caption) or (image, caption, alternatives); an item gets "captions" (all
    alternatives, trigger applied: the trainer draws one per epoch) and "caption_dropout" when set."""
    buckets = data.bucket_sizes(resolution, step=64 if resolution >= 256 else 16)
    items, done = [], {}
    for image, caption, *rest in images_and_captions:
        alternatives = tuple(rest[0]) if rest else ()
        key = (id(image), caption, alternatives)
        if key not in done:
            size = data.nearest_bucket(image.width, image.height, buckets)
            item = {"image": _to_tensor(data.resize_to_bucket(image, size)),
                    "caption": data.apply_trigger(caption, trigger)}
            if len(alternatives) > 1:
                item["captions"] = tuple(data.apply_trigger(c, trigger) for c in alternatives)
            if caption_dropout > 0:
                item["caption_dropout"] = float(caption_dropout)
            done[key] = item
        items.append(done[key])
    return items


def _caption_keys(text: str):
    """The JSONL caption fields to draw from: comma-separated names, or '' for the official eight."""
    keys = [k.strip() for k in (text or "").split(",") if k.strip()]
    return keys or None


def caption_dropout_input():
    return io.Float.Input(
    "caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
    tooltip="Probability that a training step uses an empty caption (student and teacher; the teacher still "
            "sees the image). The teacher node then also encodes the empty caption. 0: never (the official "
            "scripts). An official recipe on the trainer uses 0 whatever this says.")


def dataset_path(folder: str) -> str:
    """The dataset's real path: relative to ComfyUI/input, links followed while they stay in input/output."""
    return inside(folder_paths.get_input_directory(), folder, "dataset folder", comfy_roots(*DATASET_ROOTS))


def jsonl_roots(path: str) -> list:
    """Where a JSONL dataset's rows may point: the dataset's own folder and ComfyUI's input directory."""
    return comfy_roots("input") + [os.path.dirname(path)]


def load_examples(path: str, caption_fields: str = ""):
    """Examples of a folder or JSONL dataset, repeats expanded; what was skipped is logged by name."""
    if path.lower().endswith(".jsonl") and os.path.isfile(path):
        return data.load_jsonl(path, caption_keys=_caption_keys(caption_fields), roots=jsonl_roots(path))
    return data.expand_repeats(data.load_folder(path))


class DOPSDDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromFolder", display_name="D-OPSD Dataset (folder)", category=CATEGORY,
            description="Image + same-name .txt caption pairs from a folder inside ComfyUI's input directory, "
                        "including kohya-style <repeats>_<name> subfolders (or a .jsonl file there with "
                        "image/caption rows). Skipped files are logged by name.",
            inputs=[
                io.String.Input("folder", default="dopsd_dataset",
                                tooltip="Folder (or .jsonl file) relative to ComfyUI/input."),
                io.String.Input("trigger", default="", tooltip="Replaces [trigger] in captions; otherwise prepended."),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32,
                             tooltip="Training area is about resolution^2; each image goes to its aspect bucket. "
                                     "The official scripts train at about 1 MP (1024)."),
                io.String.Input("caption_fields", default="", optional=True,
                                tooltip="JSONL only: comma-separated caption fields to draw one from per epoch, "
                                        "e.g. short_en,detailed_en. Empty: the official eight (short/medium/"
                                        "detailed/user_prompt x en/zh) that a row has."),
                caption_dropout_input(),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        try:
            path = dataset_path(folder)
        except ValueError as e:
            return str(e)
        if not os.path.exists(path):
            return f"dataset folder {folder!r} does not exist in {folder_paths.get_input_directory()}"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, **_):
        """Changes when a file of the dataset is added, removed or edited, so ComfyUI's cache never serves
        a stale dataset."""
        try:
            path = dataset_path(folder)
        except ValueError:
            return folder
        return data.fingerprint(data.dataset_files(path, jsonl_roots(path)))

    @classmethod
    def execute(cls, folder, trigger, resolution, caption_fields="", caption_dropout=0.0) -> io.NodeOutput:
        path = dataset_path(folder)
        examples = load_examples(path, caption_fields)
        opened = {}
        for e in examples:
            if e.image_path not in opened:
                opened[e.image_path] = data.open_image(e.image_path)
        pairs = [(opened[e.image_path], e.caption, e.captions) for e in examples]
        return io.NodeOutput(_prepare(pairs, trigger, resolution, caption_dropout))


def _flat(x):
    return [v for item in x for v in _flat(item)] if isinstance(x, (list, tuple)) else [x]


def _frames(images, masks):
    """Single images [H, W, C] in 0..1 from a list of IMAGE batches (sizes may differ); transparent pixels
    (an alpha channel, or ComfyUI's MASK where 1 = transparent, as LoadImage gives) become white."""
    frames = [img for batch in images for img in batch]
    mask_frames = [m for batch in masks for m in (batch if batch.dim() == 3 else batch[None])] if masks else []
    if mask_frames and len(mask_frames) not in (1, len(frames)):
        raise ValueError(f"got {len(frames)} images but {len(mask_frames)} masks: give one mask per image (or none)")
    out = []
    for i, img in enumerate(frames):
        img = img.float().clamp(0, 1)
        transparent = None
        if img.shape[-1] == 4:
            transparent = 1.0 - img[..., 3]
        if mask_frames:
            m = mask_frames[i if len(mask_frames) > 1 else 0].float().clamp(0, 1)
            if m.shape != img.shape[:2]:
                m = torch.nn.functional.interpolate(m[None, None], size=img.shape[:2], mode="bilinear")[0, 0]
            transparent = m if transparent is None else torch.maximum(transparent, m)
        rgb = img[..., :3]
        if transparent is not None:
            rgb = rgb * (1.0 - transparent[..., None]) + transparent[..., None]
        out.append(rgb)
    return out


class DOPSDDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDatasetFromImages", display_name="D-OPSD Dataset (images + captions)", category=CATEGORY,
            description="Training pairs from IMAGEs wired in the graph (a batch, or a list such as ComfyUI's "
                        "dataset loaders give: one dataset, one job) and one caption per line (a single line "
                        "is used for every image).",
            is_input_list=True,
            inputs=[
                io.Image.Input("images"),
                io.String.Input("captions", multiline=True, default="a photo of [trigger]",
                                tooltip="One caption per line, or a list of texts (one per image)."),
                io.String.Input("trigger", default=""),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32),
                io.Mask.Input("mask", optional=True,
                              tooltip="LoadImage's MASK (1 = transparent): transparent pixels become white, "
                                      "as in the folder dataset."),
                caption_dropout_input(),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, captions, trigger, resolution, mask=None, caption_dropout=None) -> io.NodeOutput:
        caption_dropout = float(_flat(caption_dropout)[0]) if caption_dropout is not None else 0.0
        images = [images] if isinstance(images, torch.Tensor) else _flat(images)
        masks = None if mask is None else ([mask] if isinstance(mask, torch.Tensor) else _flat(mask))
        texts = [str(c) for c in _flat(captions)]
        trigger, resolution = _flat(trigger)[0], int(_flat(resolution)[0])
        frames = _frames(images, masks)
        if len(texts) == 1:
            lines = [c.strip() for c in texts[0].splitlines() if c.strip()]
        else:  # a list of texts (e.g. from a captions loader): one per image, each kept whole
            lines = [" ".join(c.split()) for c in texts]
            for n, line in enumerate(lines):
                if not line:
                    logging.warning("D-OPSD dataset: caption %d of %d is empty: it trains on the trigger word "
                                    "alone", n + 1, len(lines))
        if not lines:
            raise ValueError("captions is empty: write one caption per line (or one line for all images)")
        if len(lines) not in (1, len(frames)):
            raise ValueError(f"got {len(frames)} images but {len(lines)} caption lines: give one caption per "
                             "image, or a single line for all of them")
        from PIL import Image
        pil = [Image.fromarray((f.cpu().numpy() * 255).round().astype(np.uint8)) for f in frames]
        caps = lines * len(frames) if len(lines) == 1 else lines
        return io.NodeOutput(_prepare(list(zip(pil, caps)), trigger, resolution, caption_dropout))


NODES = [DOPSDDatasetFromFolder, DOPSDDatasetFromImages]
