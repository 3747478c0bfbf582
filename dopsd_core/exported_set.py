"""A prepared training set on disk: what training machines need, without the text encoders or the VLM.

Per pair: the target latent, the student conditioning and the teacher conditioning (ComfyUI CONDITIONING:
a list of [tensor, {options}] whose options may hold reference latents, masks, pooled outputs ...). Pairs
are stored in safetensors shards next to a `manifest.json` that records the model family, the sampling
schedule, the recipe settings and a SHA-256 per shard, so a training run can refuse a set made for another
model, a set with a missing shard, or a corrupted file before it spends any GPU time.

Layout of a set folder (format FORMAT, version VERSION):
    manifest.json
    shard-00000.safetensors   tensors "<pair>/latent", "<pair>/student/<n>", "<pair>/teacher/<n>";
                              header metadata "dopsd.pairs": JSON of each pair's caption and conditioning
                              tree, tensors replaced by {"__tensor__": "<key>"}
    shard-00001.safetensors ...
The folder is written under a temporary name and renamed into place, so a set is complete or absent.
"""
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "dopsd-exported-set"
VERSION = 1
MANIFEST = "manifest.json"
SHARD = "shard-{index:05d}.safetensors"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
CACHED_SHARDS = 2   # shards kept in memory while reading pairs in random order


class ExportedSetError(ValueError):
    """The exported set cannot be used as it is; the message says what to do."""


# -- conditioning trees <-> (JSON, tensors) -------------------------------------------------------------
def _flatten(value: Any, prefix: str, tensors: Dict[str, torch.Tensor], path: str, seen: Optional[dict] = None):
    """JSON-able tree with tensors moved into `tensors`; one tensor object used twice (the teacher's reference
    latent is often the target latent) is stored once and comes back as one object."""
    seen = {} if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            key = f"{prefix}/{len(tensors)}"
            tensors[key] = value.detach().to("cpu").clone().contiguous()  # own storage: safetensors refuses sharing
            seen[id(value)] = key
        return {_TENSOR: seen[id(value)]}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ExportedSetError(f"{path} has a non-string key {bad[0]!r}; only string keys can be exported")
        return {k: _flatten(v, prefix, tensors, f"{path}.{k}", seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_flatten(v, prefix, tensors, f"{path}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [_flatten(v, prefix, tensors, f"{path}[{i}]", seen) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExportedSetError(
        f"{path} holds a {type(value).__name__}, which cannot be exported (only tensors, numbers, strings and "
        "lists/dicts of them). Remove that conditioning option (e.g. a ControlNet or hook) before exporting")


def _unflatten(value: Any, tensors: Dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(_unflatten(v, tensors) for v in value[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- writing --------------------------------------------------------------------------------------------
def write_set(folder: str, pairs: Iterable[dict], family: Dict[str, Any], schedule: Dict[str, Any],
              recipe: Dict[str, Any], pairs_per_shard: int = 64, overwrite: bool = False) -> str:
    """Write `pairs` ({"caption": str, "latent": [1,C,H,W], "student": COND, "teacher": COND}) to `folder`.

    family: e.g. {"model_class": "Flux2", "image_model": "flux2", "latent_channels": 128, "context_width": 192};
    schedule: {"inference_sigmas": [...], "rollout_sigmas": [...], "name": ...}; recipe: free-form settings.
    The folder appears complete (renamed from a temporary sibling) or not at all. Raises FileExistsError if
    it exists and overwrite is False, ExportedSetError for an empty set or an unexportable condition.
    """
    if pairs_per_shard < 1:
        raise ExportedSetError(f"pairs_per_shard must be >= 1, got {pairs_per_shard}")
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another name or allow overwriting")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-set-", dir=parent)
    try:
        shards, buffer, count = [], [], 0
        for pair in pairs:
            buffer.append(pair)
            count += 1
            if len(buffer) == pairs_per_shard:
                shards.append(_write_shard(tmp, len(shards), count - len(buffer), buffer))
                buffer = []
        if buffer:
            shards.append(_write_shard(tmp, len(shards), count - len(buffer), buffer))
        if count == 0:
            raise ExportedSetError("the training set is empty: nothing to export")
        manifest = {"format": FORMAT, "version": VERSION, "pairs": count, "family": dict(family),
                    "latent_shapes": [shape for s in shards for shape in s.pop("latent_shapes")],
                    "schedule": dict(schedule), "recipe": dict(recipe), "shards": shards,
                    "checksum": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=float)
        if os.path.exists(folder):  # overwrite: the old set goes only once the new one is complete
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return folder


def _write_shard(folder: str, index: int, first: int, pairs: Sequence[dict]) -> dict:
    tensors: Dict[str, torch.Tensor] = {}
    entries = []
    for offset, pair in enumerate(pairs):
        n = first + offset
        latent = pair["latent"]
        if not isinstance(latent, torch.Tensor) or latent.ndim < 3:
            raise ExportedSetError(f"pair {n}: the latent must be a [1, C, H, W] tensor")
        tensors[f"{n}/latent"] = latent.detach().to("cpu").clone().contiguous()
        seen = {id(latent): f"{n}/latent"}
        entries.append({"caption": str(pair.get("caption", "")),
                        "student": _flatten(pair["student"], f"{n}/student", tensors, f"pair {n} student", seen),
                        "teacher": _flatten(pair["teacher"], f"{n}/teacher", tensors, f"pair {n} teacher", seen)})
    name = SHARD.format(index=index)
    path = os.path.join(folder, name)
    save_file(tensors, path, metadata={"dopsd.pairs": json.dumps(entries), "dopsd.first": str(first)})
    return {"file": name, "first": first, "count": len(pairs), "sha256": _sha256(path),
            "bytes": os.path.getsize(path),
            "latent_shapes": [list(tensors[f"{first + i}/latent"].shape) for i in range(len(pairs))]}


# -- reading --------------------------------------------------------------------------------------------
def read_manifest(folder: str) -> dict:
    """The manifest, checked for format and version. Raises ExportedSetError naming the fix."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ExportedSetError(f"{folder} is not an exported D-OPSD training set (no {MANIFEST}); export one with "
                               "the 'D-OPSD Export Training Set' node")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportedSetError(f"{path} is unreadable ({e}); export the set again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportedSetError(f"{path} is not a {FORMAT} manifest; export the set again")
    if int(manifest.get("version", -1)) > VERSION:
        raise ExportedSetError(f"{folder} is version {manifest['version']} of the exported-set format; this code "
                               f"reads up to version {VERSION}: update comfyui-dopsd on the training machines")
    return manifest


def check_family(manifest: dict, family: Dict[str, Any]) -> None:
    """Raise if the set was exported for another model (compares every key both sides give)."""
    exported = manifest.get("family", {})
    wrong = [k for k, v in family.items() if k in exported and v is not None and exported[k] != v]
    if wrong:
        detail = ", ".join(f"{k}: set {exported[k]!r} vs model {family[k]!r}" for k in wrong)
        raise ExportedSetError(f"this training set was exported for another model family ({detail}); train the "
                               "model it was exported with, or export the set again with this model")


class ExportedSet:
    """Read-only access to an exported set. Every shard is checked (presence, size, SHA-256) on open,
    unless verify=False; pairs are read lazily (the last CACHED_SHARDS shards stay in memory), so a rank
    holds a few shards, not the whole set."""

    def __init__(self, folder: str, verify: bool = True, family: Optional[Dict[str, Any]] = None):
        self.folder = os.path.abspath(folder)
        self.manifest = read_manifest(self.folder)
        if family:
            check_family(self.manifest, family)
        self.shards: List[dict] = list(self.manifest["shards"])
        self._cache: "OrderedDict[int, tuple]" = OrderedDict()   # the last few shards read
        self._check_files(verify)

    def _check_files(self, verify: bool):
        missing = [s["file"] for s in self.shards if not os.path.isfile(os.path.join(self.folder, s["file"]))]
        if missing:
            raise ExportedSetError(f"{self.folder} is missing shard(s) {', '.join(missing)}: copy the whole folder "
                                   "from the machine that exported it")
        if sum(s["count"] for s in self.shards) != self.manifest["pairs"]:
            raise ExportedSetError(f"{self.folder}/{MANIFEST} is inconsistent (shard counts do not add up to "
                                   f"{self.manifest['pairs']} pairs); export the set again")
        if verify:
            for s in self.shards:
                path = os.path.join(self.folder, s["file"])
                if os.path.getsize(path) != s["bytes"] or _sha256(path) != s["sha256"]:
                    raise ExportedSetError(f"checksum mismatch in {path}: the file is corrupted or incomplete; "
                                           "copy it again from the machine that exported the set")

    def __len__(self) -> int:
        return int(self.manifest["pairs"])

    @property
    def family(self) -> dict:
        return dict(self.manifest.get("family", {}))

    @property
    def schedule(self) -> dict:
        return dict(self.manifest.get("schedule", {}))

    @property
    def recipe(self) -> dict:
        return dict(self.manifest.get("recipe", {}))

    def _shard_of(self, index: int) -> int:
        for i, s in enumerate(self.shards):
            if s["first"] <= index < s["first"] + s["count"]:
                return i
        raise IndexError(f"pair {index} is out of range: the set has {len(self)} pairs")

    def _load_shard(self, i: int):
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        path = os.path.join(self.folder, self.shards[i]["file"])
        with safe_open(path, framework="pt") as f:
            entries = json.loads((f.metadata() or {})["dopsd.pairs"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self._cache[i] = (entries, tensors)
        while len(self._cache) > CACHED_SHARDS:
            self._cache.popitem(last=False)
        return self._cache[i]

    def latent_shape(self, index: int) -> torch.Size:
        """From the manifest (no shard is read), so ranks can order and batch a large set cheaply."""
        shapes = self.manifest.get("latent_shapes")
        if shapes is not None:
            if not 0 <= index < len(shapes):
                raise IndexError(f"pair {index} is out of range: the set has {len(self)} pairs")
            return torch.Size(shapes[index])
        entries, tensors = self._load_shard(self._shard_of(index))
        return tensors[f"{index}/latent"].shape

    def pair(self, index: int) -> dict:
        """{"caption", "latent" [1,C,H,W], "student" COND, "teacher" COND} (fresh, plain CPU tensors)."""
        i = self._shard_of(index)
        entries, tensors = self._load_shard(i)
        entry = entries[index - self.shards[i]["first"]]
        own = {k: v.clone() for k, v in tensors.items() if k.startswith(f"{index}/")}
        return {"caption": entry["caption"], "latent": own[f"{index}/latent"],
                "student": _unflatten(entry["student"], own), "teacher": _unflatten(entry["teacher"], own)}

    def pairs(self) -> List[dict]:
        return [self.pair(i) for i in range(len(self))]


class LazyPairs(SequenceABC):
    """A read-only sequence of pairs over an ExportedSet: `make(dict) -> pair object` runs on each access."""

    def __init__(self, data: ExportedSet, make: Callable[[dict], Any] = dict):
        self.data, self.make = data, make

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.data):
            raise IndexError(index)
        return self.make(self.data.pair(index))
