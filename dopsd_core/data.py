"""Image-caption pairs: from a folder (image + same-name .txt) or a JSONL file, with buckets and captions.

Errors name the file and the fix, because a bad dataset is the most common way a training run fails.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRIGGER_PLACEHOLDER = "[trigger]"


@dataclass
class Example:
    image_path: str
    caption: str


def _read_caption(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def load_folder(folder: str, default_caption: Optional[str] = None) -> List[Example]:
    """Every image in `folder` (sorted) with the caption in the same-name .txt file."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    examples = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        txt = os.path.join(folder, stem + ".txt")
        if os.path.exists(txt):
            caption = _read_caption(txt)
        elif default_caption is not None:
            caption = default_caption
        else:
            raise FileNotFoundError(f"{name} has no caption: add {stem}.txt beside it or set a default caption")
        examples.append(Example(os.path.join(folder, name), caption))
    if not examples:
        raise ValueError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTS)}); add image + .txt pairs")
    return examples


def load_jsonl(path: str) -> List[Example]:
    """Rows {"image": path, "caption": text} (also "file_name"/"text", or the official code's
    "local_path_list" + a caption field); relative paths are relative to the JSONL file."""
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e.msg}") from e
            images = row.get("image") or row.get("file_name") or row.get("local_path_list")
            caption = row.get("caption") or row.get("text") or row.get("prompt")
            if images is None or caption is None:
                raise ValueError(f"{path}:{n} needs an 'image' and a 'caption' field")
            for image in ([images] if isinstance(images, str) else images):
                examples.append(Example(os.path.join(base, image), str(caption)))
    if not examples:
        raise ValueError(f"{path} holds no rows")
    return examples


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove it") from e


def apply_trigger(caption: str, trigger: str = "") -> str:
    """Substitute `[trigger]`; without a placeholder the trigger word is put in front."""
    if not trigger:
        return caption.replace(TRIGGER_PLACEHOLDER, "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger)
    return f"{trigger} {caption}".strip()


def caption_dropout(caption: str, p: float, rng: random.Random) -> str:
    return "" if p > 0 and rng.random() < p else caption


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> List[Tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area close to resolution^2 and aspect <= max_aspect."""
    area, sizes = resolution * resolution, set()
    w = step
    while w <= resolution * max_aspect:
        h = max(step, int(round(area / w / step)) * step)
        if max(w / h, h / w) <= max_aspect:
            sizes.add((w, h))
        w += step
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    aspect = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect), -b[0] * b[1]))


def resize_to_bucket(image: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """Scale to cover `size`, then centre-crop (never stretches the image)."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))
