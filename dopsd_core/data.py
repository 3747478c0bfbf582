"""Image-caption pairs: from a folder (image + same-name .txt) or a JSONL file, with buckets and captions.

Errors name the file and the fix, because a bad dataset is the most common way a training run fails.
Everything random here (caption choice, caption dropout, batch order) is a pure function of
(seed, epoch, index), so a resumed run sees exactly the captions and batches the straight run saw.
"""
import json
import os
import random
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRIGGER_PLACEHOLDER = "[trigger]"
# Caption fields of the official D-OPSD JSONL rows; the official loader picks one of them at random per batch.
OFFICIAL_CAPTION_KEYS = ("short_en", "detailed_en", "short_zh", "detailed_zh", "medium_zh", "medium_en",
                         "user_prompt_en", "user_prompt_zh")


@dataclass
class Example:
    image_path: str
    caption: str
    captions: Tuple[str, ...] = field(default_factory=tuple)  # alternatives to draw from (official JSONL)

    def all_captions(self) -> Tuple[str, ...]:
        return self.captions or (self.caption,)


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


def load_jsonl(path: str, caption_keys: Optional[Sequence[str]] = None) -> List[Example]:
    """Rows {"image": path, "caption": text} (also "file_name"/"text"/"prompt"), or the official code's rows
    ("local_path_list" + caption fields such as "short_en"/"detailed_en"). Relative image paths are tried
    relative to the JSONL file's folder, then to its parent folders (the official rows are relative to the
    recipe folder, e.g. "dataset/style_x/target_images/00.png").

    caption_keys: which fields hold alternative captions (default: the official eight when present); each
    step then draws one of them, as the official loader does.
    """
    base = os.path.dirname(os.path.abspath(path))
    keys = tuple(caption_keys) if caption_keys else OFFICIAL_CAPTION_KEYS
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
            explicit = row.get("caption") or row.get("text") or row.get("prompt")
            alternatives = tuple(str(row[k]) for k in keys if row.get(k))
            if explicit is not None and not caption_keys:
                alternatives = ()  # an explicit caption wins unless alternatives were asked for
            caption = explicit if explicit is not None else (alternatives[0] if alternatives else None)
            if images is None or caption is None:
                raise ValueError(f"{path}:{n} needs an image field ('image', 'file_name' or 'local_path_list') and "
                                 f"a caption field ('caption', 'text', 'prompt' or one of {', '.join(keys)})")
            for image in ([images] if isinstance(images, str) else images):
                examples.append(Example(_resolve(base, image), str(caption), alternatives))
    if not examples:
        raise ValueError(f"{path} holds no rows")
    return examples


def _resolve(base: str, image: str) -> str:
    if os.path.isabs(image):
        return image
    folder = base
    while True:
        candidate = os.path.join(folder, image)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return os.path.join(base, image)  # missing: open_image reports it with this path
        folder = parent


def load_dataset(path: str, default_caption: Optional[str] = None) -> List[Example]:
    """A folder of image + .txt pairs, or a .jsonl file."""
    if os.path.isdir(path):
        return load_folder(path, default_caption)
    if path.lower().endswith(".jsonl"):
        return load_jsonl(path)
    raise ValueError(f"{path} is neither a folder of image + .txt pairs nor a .jsonl file")


def open_image(path: str) -> Image.Image:
    """RGB image; transparent pixels are composited on white (as the official loader does)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.getchannel("A"))
                return out
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image {path} does not exist; fix the dataset entry") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove it") from e


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove it") from e


def apply_trigger(caption: str, trigger: str = "", placeholder: str = TRIGGER_PLACEHOLDER) -> str:
    """Substitute `[trigger]` (or another placeholder, e.g. the official data's "[V]"); without a
    placeholder in the caption the trigger word is put in front."""
    if not trigger:
        return caption.replace(placeholder, "").strip()
    if placeholder in caption:
        return caption.replace(placeholder, trigger)
    return f"{trigger} {caption}".strip()


def caption_dropout(caption: str, p: float, rng: random.Random) -> str:
    return "" if p > 0 and rng.random() < p else caption


def example_rng(seed: int, epoch: int, index: int, purpose: str = "") -> random.Random:
    """A Random that depends only on its arguments (string seeding is stable across processes)."""
    return random.Random(f"dopsd:{purpose}:{seed}:{epoch}:{index}")


def choose_caption(example: Example, seed: int = 0, epoch: int = 0, index: int = 0, trigger: str = "",
                   dropout: float = 0.0, placeholder: str = TRIGGER_PLACEHOLDER) -> str:
    """The caption an example trains with in an epoch: one of its alternatives, trigger applied, maybe
    dropped (empty) with probability `dropout`. Deterministic in (seed, epoch, index)."""
    rng = example_rng(seed, epoch, index, "caption")
    options = example.all_captions()
    caption = options[rng.randrange(len(options))] if len(options) > 1 else options[0]
    return caption_dropout(apply_trigger(caption, trigger, placeholder), dropout, rng)


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


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[H, W, 3] float in 0..1 (ComfyUI's IMAGE layout without the batch dimension)."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).float() / 255.0


class ImageCaptionDataset:
    """Examples with an aspect bucket each; images are loaded, cover-resized and centre-cropped on demand."""

    def __init__(self, examples: Sequence[Example], resolution: int = 1024, bucket_step: int = 64,
                 max_aspect: float = 2.0, trigger: str = "", caption_dropout: float = 0.0, seed: int = 0,
                 placeholder: str = TRIGGER_PLACEHOLDER, buckets: Optional[Sequence[Tuple[int, int]]] = None):
        if not examples:
            raise ValueError("the dataset is empty: add image-caption pairs")
        self.examples = list(examples)
        self.buckets = list(buckets) if buckets else bucket_sizes(resolution, bucket_step, max_aspect)
        self.sizes = [nearest_bucket(*image_size(e.image_path), self.buckets) for e in self.examples]
        self.trigger, self.dropout, self.seed, self.placeholder = trigger, caption_dropout, seed, placeholder

    def __len__(self) -> int:
        return len(self.examples)

    def bucket(self, index: int) -> Tuple[int, int]:
        """(width, height) this example is trained at."""
        return self.sizes[index]

    def image(self, index: int) -> Image.Image:
        return resize_to_bucket(open_image(self.examples[index].image_path), self.sizes[index])

    def caption(self, index: int, epoch: int = 0) -> str:
        return choose_caption(self.examples[index], self.seed, epoch, index, self.trigger, self.dropout,
                              self.placeholder)


class BatchOrder:
    """Which examples form each batch, epoch after epoch: a seeded shuffle per epoch, examples of one
    bucket (same size) batched together, the batch order shuffled too. Its whole state is (epoch,
    cursor), so a resumed run continues with exactly the batches the straight run would have drawn.
    """

    def __init__(self, buckets: Sequence[Hashable], batch_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if not buckets:
            raise ValueError("the training set is empty: add image-caption pairs")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.cursor = 0, 0
        self._cache: Dict[int, List[List[int]]] = {}
        if not self.batches(0):
            raise ValueError(f"no bucket holds {batch_size} examples and drop_last is set: lower the batch size")

    def batches(self, epoch: int) -> List[List[int]]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n = len(self.buckets)
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
            groups: Dict[Hashable, List[int]] = {}
            for i in order:  # dict keeps first-seen order, which is itself seeded
                groups.setdefault(self.buckets[i], []).append(i)
            out = []
            for members in groups.values():
                for s in range(0, len(members), self.batch_size):
                    chunk = members[s:s + self.batch_size]
                    if len(chunk) == self.batch_size or not self.drop_last:
                        out.append(chunk)
            if self.shuffle:
                out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
            self._cache = {epoch: out}  # keep one epoch
        return self._cache[epoch]

    def next(self) -> List[int]:
        batches = self.batches(self.epoch)
        if self.cursor >= len(batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        self.cursor += 1
        return list(batches[self.cursor - 1])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
