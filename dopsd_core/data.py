"""Image-caption pairs: from a folder (image + same-name .txt) or a JSONL file, with buckets and captions.

Errors name the file and the fix, because a bad dataset is the most common way a training run fails.
Everything random here (caption choice, caption dropout, batch order) is a pure function of
(seed, epoch, index), so a resumed run sees exactly the captions and batches the straight run saw.
"""
import codecs
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

TRIGGER_PLACEHOLDER = "[trigger]"
# Caption fields of the official D-OPSD JSONL rows; the official loader picks one of them at random per batch.
OFFICIAL_CAPTION_KEYS = ("short_en", "detailed_en", "short_zh", "detailed_zh", "medium_zh", "medium_en",
                         "user_prompt_en", "user_prompt_zh")
# kohya-style subfolders "<repeats>_<name>": every image in them counts <repeats> times per epoch.
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Extensions Pillow registers an opener for, minus formats that are not plain pictures or need external
# programs (stubs for scientific data, PostScript via Ghostscript, Windows metafiles, video).
_NOT_PICTURES = {".bufr", ".grib", ".h5", ".hdf", ".fit", ".fits", ".eps", ".ps", ".wmf", ".emf", ".mpeg",
                 ".mpg", ".im", ".iim", ".vst", ".vda", ".icb", ".gbr", ".pxr", ".rgba"}
IMAGE_EXTS = tuple(sorted(e for e, fmt in Image.registered_extensions().items()
                          if fmt in Image.OPEN and e not in _NOT_PICTURES))
CAPTION_EXT = ".txt"


@dataclass
class Example:
    image_path: str
    caption: str
    captions: Tuple[str, ...] = field(default_factory=tuple)  # alternatives to draw from (official JSONL)
    repeats: int = 1  # kohya "<repeats>_<name>" subfolders: times per epoch

    def all_captions(self) -> Tuple[str, ...]:
        return self.captions or (self.caption,)


@dataclass
class FolderScan:
    """What a folder holds: the examples, and by name everything that is not used (so nothing is dropped silently)."""
    examples: List[Example]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (relative name, why)
    orphan_captions: List[str] = field(default_factory=list)      # .txt files with no image beside them
    empty_captions: List[str] = field(default_factory=list)       # images whose caption file is empty

    def warnings(self) -> List[str]:
        out = [f"skipped {name}: {why}" for name, why in self.skipped]
        out += [f"caption {name} has no image with the same name beside it" for name in self.orphan_captions]
        out += [f"caption of {name} is empty: it trains on the trigger word alone" for name in self.empty_captions]
        return out


def read_caption(path: str) -> str:
    """Caption text: UTF-8 (a BOM is dropped) or UTF-16 with its BOM. Anything else raises, naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}; a "
                         "Windows 'ANSI'/cp1252 file?): save it as UTF-8") from None
    return text.replace("\ufeff", "").strip()


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _scan_one(folder: str, rel: str, repeats: int, scan: FolderScan, default_caption: Optional[str]):
    names = sorted(os.listdir(folder))
    stems = {os.path.splitext(n)[0] for n in names if _is_image(n) and os.path.isfile(os.path.join(folder, n))}
    for name in names:
        path, shown = os.path.join(folder, name), os.path.join(rel, name) if rel else name
        stem, ext = os.path.splitext(name)
        if name.startswith("."):
            continue  # hidden files (.DS_Store, editors' temp files)
        if os.path.isdir(path):
            if not rel and not REPEATS_FOLDER.match(name):
                scan.skipped.append((shown + "/", "a subfolder not named <repeats>_<name> (kohya style, e.g. "
                                                  f"10_{name})"))
            elif rel:
                scan.skipped.append((shown + "/", "folders inside a <repeats>_<name> folder are not read"))
            continue
        if ext.lower() == CAPTION_EXT:
            if stem not in stems:
                scan.orphan_captions.append(shown)
            continue
        if not _is_image(name):
            scan.skipped.append((shown, f"not an image format Pillow reads ({ext or 'no extension'})"))
            continue
        txt = os.path.join(folder, stem + CAPTION_EXT)
        if os.path.exists(txt):
            caption = read_caption(txt)
            if not caption:
                scan.empty_captions.append(shown)
        elif default_caption is not None:
            caption = default_caption
        else:
            raise FileNotFoundError(f"{shown} has no caption: add {stem}{CAPTION_EXT} beside it (UTF-8 text)")
        scan.examples.append(Example(path, caption, repeats=repeats))


_COMMON = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".jfif")


def scan_folder(folder: str, default_caption: Optional[str] = None) -> FolderScan:
    """Every image in `folder` and in its kohya `<repeats>_<name>` subfolders (sorted), with the caption in
    the same-name .txt file; extensions in IMAGE_EXTS, any case. Other files, other subfolders and captions
    without an image are listed in the result rather than dropped silently."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    scan = FolderScan([])
    _scan_one(folder, "", 1, scan, default_caption)
    for name in sorted(os.listdir(folder)):
        m = REPEATS_FOLDER.match(name)
        if m and os.path.isdir(os.path.join(folder, name)):
            if int(m.group(1)) < 1:
                scan.skipped.append((name + "/", "0 repeats"))
                continue
            _scan_one(os.path.join(folder, name), name, int(m.group(1)), scan, default_caption)
    if not scan.examples:
        skipped = "; ".join(scan.warnings()[:8])
        raise ValueError(f"dataset folder {folder} holds no images with captions, neither at its top level nor in "
                         f"kohya-style <repeats>_<name> subfolders (e.g. 10_mychar/). Formats: image + same-name "
                         f".txt, images {', '.join(e for e in IMAGE_EXTS if e in _COMMON)}, ..."
                         + (f" Not used: {skipped}" if skipped else ""))
    return scan



def load_folder(folder: str, default_caption: Optional[str] = None) -> List[Example]:
    """scan_folder's examples (see there); what it skipped is logged by name."""
    scan = scan_folder(folder, default_caption)
    for w in scan.warnings():
        logging.warning("D-OPSD dataset %s: %s", folder, w)
    return scan.examples


def expand_repeats(examples: Sequence[Example]) -> List[Example]:
    """Each example `repeats` times (kohya's rule: a repeat is one more occurrence per epoch)."""
    return [e for e in examples for _ in range(max(1, e.repeats))]


def within(path: str, roots: Sequence[str]) -> bool:
    """`path` (after symlinks) is one of `roots` (after symlinks) or below one of them."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if os.path.commonpath([root, real]) == root:
            return True
    return False


def load_jsonl(path: str, caption_keys: Optional[Sequence[str]] = None,
               roots: Optional[Sequence[str]] = None) -> List[Example]:
    """Rows {"image": path, "caption": text} (also "file_name"/"text"/"prompt"), or the official code's rows
    ("local_path_list" + caption fields such as "short_en"/"detailed_en"). Relative image paths are tried
    relative to the JSONL file's folder, then to its parent folders (the official rows are relative to the
    recipe folder, e.g. "dataset/style_x/target_images/00.png").

    caption_keys: which fields hold alternative captions (default: the official eight when present); each
    step then draws one of them, as the official loader does.
    roots: when given, every image must resolve (after symlinks) inside one of these folders, and parent
    folders are searched only up to them; a row naming anything else raises the same error whether or not
    the file exists (so the error cannot be used to probe the disk).
    """
    base = os.path.dirname(os.path.abspath(path))
    keys = tuple(caption_keys) if caption_keys else OFFICIAL_CAPTION_KEYS
    examples = []
    with open(path, encoding="utf-8-sig") as f:
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
                resolved = _resolve(base, str(image), roots)
                if roots is not None and (resolved is None or not within(resolved, roots)):
                    raise ValueError(f"{path}:{n}: image {image!r} is outside the dataset's folder and ComfyUI's "
                                     "input directory: put the images there and name them relative to the .jsonl")
                examples.append(Example(resolved, str(caption), alternatives))
    if not examples:
        raise ValueError(f"{path} holds no rows")
    return examples


def _resolve(base: str, image: str, roots: Optional[Sequence[str]] = None) -> Optional[str]:
    if os.path.isabs(image) or image.startswith("~"):
        return image if roots is None else None
    folder = base
    while True:
        candidate = os.path.join(folder, image)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder or (roots is not None and not within(parent, roots)):
            return os.path.join(base, image)  # missing: open_image reports it with this path
        folder = parent


def load_dataset(path: str, default_caption: Optional[str] = None) -> List[Example]:
    """A folder of image + .txt pairs, or a .jsonl file."""
    if os.path.isdir(path):
        return load_folder(path, default_caption)
    if path.lower().endswith(".jsonl"):
        return load_jsonl(path)
    raise ValueError(f"{path} is neither a folder of image + .txt pairs nor a .jsonl file")


def fingerprint(paths: Sequence[str]) -> str:
    """A short hash of the files' (path, size, mtime): changes when a file is added, removed or edited."""
    h = hashlib.sha1()
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def dataset_files(path: str, roots: Optional[Sequence[str]] = None) -> List[str]:
    """The files a dataset at `path` reads (folder: images and captions one subfolder deep; JSONL: itself and
    its rows' images, confined to `roots` as in load_jsonl), for fingerprint()."""
    if os.path.isdir(path):
        out = [path]
        for name in os.listdir(path):
            sub = os.path.join(path, name)
            out.append(sub)
            if os.path.isdir(sub) and REPEATS_FOLDER.match(name):
                out += [os.path.join(sub, n) for n in os.listdir(sub)]
        return out
    out = [path]
    try:
        out += [e.image_path for e in load_jsonl(path, roots=roots)]
    except (OSError, ValueError):
        pass
    return out


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with one rule for everything: transparent pixels composited on white; 16-bit greyscale scaled
    (0..65535 -> 0..255) rather than clamped; 32-bit float greyscale taken as 0..1."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def open_image(path: str) -> Image.Image:
    """RGB image, turned upright by its EXIF orientation (as ComfyUI's LoadImage does); transparent
    pixels become white; 16-bit greyscale is scaled. Errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im) or im)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image {path} does not exist; fix the dataset entry") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely ({e}): downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove it") from e


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) after EXIF orientation, from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image {path} does not exist; fix the dataset entry") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely ({e}): downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
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


def draw_variant(seed: int, epoch: int, index: int, count: int, dropout: float = 0.0) -> Optional[int]:
    """Which of `count` captions example `index` trains with in `epoch` (uniform, as the official sampler's
    random.choice over its caption fields), or None when caption dropout drops it (probability `dropout`).
    A pure function of its arguments, so a resumed run draws the same sequence."""
    if count < 1:
        raise ValueError("an example needs at least one caption")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {dropout}")
    rng = example_rng(seed, epoch, index, "caption")
    choice = rng.randrange(count) if count > 1 else 0
    return None if dropout > 0 and rng.random() < dropout else choice


def choose_caption(example: Example, seed: int = 0, epoch: int = 0, index: int = 0, trigger: str = "",
                   dropout: float = 0.0, placeholder: str = TRIGGER_PLACEHOLDER) -> str:
    """The caption an example trains with in an epoch: one of its alternatives, trigger applied, maybe
    dropped (empty) with probability `dropout`. Deterministic in (seed, epoch, index)."""
    options = example.all_captions()
    choice = draw_variant(seed, epoch, index, len(options), dropout)
    return "" if choice is None else apply_trigger(options[choice], trigger, placeholder)


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
