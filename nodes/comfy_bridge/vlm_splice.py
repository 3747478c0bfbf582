"""The Qwen3-VL splice: Z-Image's teacher context c_t from (caption, target image).

What the official Z-Image recipe does: load Qwen3-VL-4B-Instruct, overwrite its language model with Z-Image's
Qwen3-4B text-encoder weights (same architecture, 398/398 tensors match), run the chat template with the image and
the caption, and take hidden_states[-2] with padding stripped.

What this module does instead of loading a second 4B LLM: it builds the transformers Qwen3-VL model with its
language model on the meta device (shapes only, no memory), loads only the vision tower (`model.visual.*`) from the
Qwen3-VL folder, and, for the duration of each encode, puts the ComfyUI CLIP's own Qwen3 modules (embedding,
q/k/v/o and MLP Linears, RMSNorms) into the language model's slots. The leaf module names of ComfyUI's
`comfy.text_encoders.llama.Llama2_` and transformers' `Qwen3VLTextModel` are identical, so the mapping is
"same path". Sharing modules rather than tensors means ComfyUI stays in charge of the weights: device placement,
low-VRAM offload, fp8/quantised ops and LoRA patches on the CLIP all apply to the teacher as they do to
ComfyUI's own encoding. Between encodes the splice holds no reference to the CLIP; the slots go back to meta.

transformers supplies the Qwen3-VL parts ComfyUI does not have: the vision tower, DeepStack injection of visual
features into the first LLM layers, and interleaved 3-axis MRoPE. Computation runs in float32 like ComfyUI's own
text encoding (ComfyUI embeds with out_dtype=float32 and its ops cast weights per layer).
"""
import contextlib
import glob
import inspect
import json
import logging
import os
import threading
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

ZIMAGE_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # comfy/text_encoders/z_image.py
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
MIN_PIXELS, MAX_PIXELS = 512 * 512, 768 * 768  # official processor settings
MAX_TEACHER_TOKENS = 1024  # official: the teacher context is cut to 1024 tokens after encoding
VISION_PREFIXES = ("model.visual.", "visual.")  # transformers >= 4.57 checkpoints use the first
DEFAULT_FOLDER_HINT = "ComfyUI/models/text_encoders/Qwen3-VL-4B-Instruct"
DOWNLOAD_HINT = ("download Qwen/Qwen3-VL-4B-Instruct (config.json, preprocessor_config.json and the *.safetensors "
                 "shards; only the model.visual.* tensors are read) into " + DEFAULT_FOLDER_HINT)
QWEN3_SIZES = {1024: "Qwen3-0.6B", 2048: "Qwen3-1.7B / Qwen3-VL-2B", 2560: "Qwen3-4B / Qwen3-VL-4B",
               4096: "Qwen3-8B / Qwen3-VL-8B", 5120: "Qwen3-14B/32B / Qwen3-VL-32B"}


class SpliceError(ValueError):
    """A wrong input to the VLM splice; the message names the fix."""


def _size_name(hidden: int) -> str:
    return QWEN3_SIZES.get(int(hidden), f"hidden {hidden}")


# ----------------------------------------------------------------------------------------------------------
# the ComfyUI side: which Qwen3 transformer does this CLIP hold?

class ComfyQwen3:
    """The Qwen3 language model inside a ComfyUI CLIP (a comfy.text_encoders.llama.Llama2_)."""

    def __init__(self, clip):
        cond = getattr(clip, "cond_stage_model", None)
        if cond is None:
            raise SpliceError(f"{type(clip).__name__} is not a ComfyUI CLIP: connect the CLIP output of a "
                              "CLIPLoader (type lumina2) loading Z-Image's qwen_3_4b text encoder")
        inner = getattr(cond, getattr(cond, "clip", "") or "", None)  # SD1ClipModel -> its SDClipModel
        transformer = getattr(inner, "transformer", None)
        llama = getattr(transformer, "model", None)
        config = getattr(llama, "config", None)
        kind = type(transformer).__name__ if transformer is not None else type(cond).__name__
        if config is None or not hasattr(llama, "layers") or not hasattr(llama, "embed_tokens"):
            raise SpliceError(f"this CLIP ({kind}) has no Qwen3 language model: the VLM splice needs Z-Image's "
                              "Qwen3-4B text encoder (CLIPLoader type lumina2, qwen_3_4b.safetensors)")
        if getattr(config, "q_norm", None) != "gemma3" or getattr(config, "rope_dims", None) is not None \
                or getattr(config, "transformer_type", "llama") != "llama":
            vl = " (Qwen2.5-VL, e.g. Qwen-Image's encoder)" if hasattr(transformer, "visual") else ""
            raise SpliceError(f"this CLIP's language model is {kind}{vl}, not Qwen3: the VLM splice needs Z-Image's "
                              "Qwen3-4B text encoder. For a text encoder that already reads images (Qwen-Image), "
                              "use the D-OPSD Teacher: Native VLM Encoder node instead")
        self.clip = clip
        self.kind = kind
        self.llama = llama
        self.config = config
        self.num_layers = len(llama.layers)

    def sizes(self) -> dict:
        c = self.config
        return dict(hidden_size=c.hidden_size, num_hidden_layers=self.num_layers,
                    intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                    num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab_size=c.vocab_size)

    def check_hidden_layer(self, hidden_layer: int) -> int:
        """hidden_states has num_layers + 1 entries (0 = embeddings, -1 = last layer after the final norm)."""
        n = self.num_layers
        if not -(n + 1) <= hidden_layer <= n:
            raise SpliceError(f"hidden_layer {hidden_layer} is out of range: this {n}-layer text encoder has hidden "
                              f"states {-(n + 1)}..{n} (0 = embeddings, -1 = last layer). Z-Image reads -2")
        return hidden_layer

    def hf_tokenizer(self):
        """The CLIP's own Qwen2Tokenizer (ComfyUI's bundled qwen25_tokenizer), else the bundled one loaded here."""
        tok = getattr(self.clip, "tokenizer", None)
        inner = getattr(tok, getattr(tok, "clip", "") or "", None)
        hf = getattr(inner, "tokenizer", None)
        if hf is not None and callable(hf) and hasattr(hf, "convert_tokens_to_ids"):
            return hf
        return bundled_tokenizer()

    def template(self) -> str:
        """The chat template the CLIP wraps prompts in (Z-Image's unless the CLIP says otherwise)."""
        t = getattr(getattr(self.clip, "tokenizer", None), "llama_template", None)
        return t if isinstance(t, str) and t.count("{}") == 1 else ZIMAGE_TEMPLATE


_BUNDLED = {}


def bundled_tokenizer():
    if "tok" not in _BUNDLED:
        import comfy.text_encoders.llama  # comfy.text_encoders is a namespace package: locate it by a module
        from transformers import Qwen2Tokenizer
        path = os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.llama.__file__)), "qwen25_tokenizer")
        _BUNDLED["tok"] = Qwen2Tokenizer.from_pretrained(path)
    return _BUNDLED["tok"]


# ----------------------------------------------------------------------------------------------------------
# the Qwen3-VL folder

def resolve_folder(path: str) -> str:
    """An absolute folder, or one relative to the ComfyUI root, its models dir or a text_encoders folder."""
    import folder_paths

    path = (path or "").strip().strip('"')
    if not path:
        raise SpliceError("vision_model is empty: " + DOWNLOAD_HINT + " and enter that folder")
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        candidates = [path]
    else:
        bases = [folder_paths.base_path, folder_paths.models_dir]
        try:
            bases += list(folder_paths.get_folder_paths("text_encoders"))
        except Exception:  # a ComfyUI without that folder name
            pass
        candidates = [os.path.join(b, path) for b in bases]
    for c in candidates:
        if os.path.isdir(c):
            return os.path.realpath(c)
    raise SpliceError(f"vision_model folder {path!r} not found (looked in: {', '.join(candidates)}): "
                      + DOWNLOAD_HINT)


def read_config(folder: str):
    """The folder's Qwen3VLConfig; errors name what to download."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise SpliceError(f"vision_model folder {folder} has no config.json: {DOWNLOAD_HINT}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise SpliceError(f"cannot read {cfg_path} ({e}): download config.json again") from e
    model_type = raw.get("model_type")
    if model_type != "qwen3_vl":
        raise SpliceError(f"{cfg_path} is model_type {model_type!r}, not 'qwen3_vl': the splice needs a Qwen3-VL "
                          "dense model folder (Qwen3-VL-4B-Instruct for Z-Image's Qwen3-4B)")
    try:
        from transformers import Qwen3VLConfig
    except ImportError as e:
        import transformers
        raise SpliceError(f"transformers {transformers.__version__} has no Qwen3-VL: upgrade it "
                          "(pip install -U 'transformers>=4.57') in ComfyUI's Python environment") from e
    return Qwen3VLConfig.from_pretrained(folder)


def check_compatible(config, te: ComfyQwen3, folder: str):
    text = config.text_config
    want = te.sizes()
    got = dict(hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
               intermediate_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
               num_key_value_heads=text.num_key_value_heads,
               head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
               vocab_size=text.vocab_size)
    if got["hidden_size"] != want["hidden_size"]:
        raise SpliceError(f"{folder} is a Qwen3-VL whose language model has hidden size {got['hidden_size']} "
                          f"({_size_name(got['hidden_size'])}), but the connected text encoder has "
                          f"{want['hidden_size']} ({_size_name(want['hidden_size'])}): use the Qwen3-VL of the same "
                          "size as the text encoder (Qwen3-VL-4B-Instruct for Z-Image's Qwen3-4B)")
    bad = [f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k]]
    if bad:
        raise SpliceError(f"{folder}'s language model does not have the text encoder's shape ({'; '.join(bad)}): "
                          "use the Qwen3-VL that matches it (Qwen3-VL-4B-Instruct for Z-Image's Qwen3-4B)")
    vis = config.vision_config
    if getattr(vis, "out_hidden_size", text.hidden_size) != text.hidden_size:
        raise SpliceError(f"{folder}/config.json is inconsistent: vision out_hidden_size {vis.out_hidden_size} != "
                          f"text hidden_size {text.hidden_size}")
    if len(getattr(vis, "deepstack_visual_indexes", []) or []) > text.num_hidden_layers:
        raise SpliceError(f"{folder}/config.json injects DeepStack features into more layers than the language "
                          "model has")


def _safetensors_files(folder: str):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        names = sorted({v for k, v in weight_map.items() if k.startswith(VISION_PREFIXES)})
        return [os.path.join(folder, n) for n in names]
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def load_vision_state_dict(folder: str, dtype) -> dict:
    """Only the vision tower's tensors (model.visual.* or visual.*), prefix stripped, cast to dtype."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    if not files:
        raise SpliceError(f"vision_model folder {folder} has no *.safetensors: {DOWNLOAD_HINT}")
    out = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                for prefix in VISION_PREFIXES:
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key).to(dtype)
                        break
    if not out:
        raise SpliceError(f"no vision-tower tensors (model.visual.*) in {folder}'s safetensors: {DOWNLOAD_HINT}")
    return out


def _preprocessor_settings(folder: str, vision_config) -> dict:
    settings = dict(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                    merge_size=vision_config.spatial_merge_size, image_mean=[0.5, 0.5, 0.5],
                    image_std=[0.5, 0.5, 0.5])
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if raw.get(key) is not None:
                settings[key] = raw[key]
    mismatch = [k for k, v in (("patch_size", vision_config.patch_size),
                               ("temporal_patch_size", vision_config.temporal_patch_size),
                               ("merge_size", vision_config.spatial_merge_size)) if settings[k] != v]
    if mismatch:
        raise SpliceError(f"{path} disagrees with config.json on {', '.join(mismatch)}: download both files from "
                          "the same Qwen3-VL repository")
    return settings


def _vision_dtype(device) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    try:
        import comfy.model_management as mm
        return torch.bfloat16 if mm.should_use_bf16(device, prioritize_performance=False) else torch.float32
    except Exception:  # an older/newer signature: play safe
        return torch.float32


@contextlib.contextmanager
def _no_init():
    """Build modules without running their (slow) random initialisation; weights are loaded right after."""
    ctx = None
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights as ctx
        except ImportError:
            ctx = None
    if ctx is None:
        yield
    else:
        with ctx():
            yield


class _Holder(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


class _Float32Embedding(torch.nn.Module):
    """ComfyUI's embedding, asked for float32 output as ComfyUI's own text encoding does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids, out_dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# the splice

class QwenVLSplice:
    """Qwen3-VL vision tower + a language-model skeleton whose modules come from a ComfyUI CLIP per encode."""

    def __init__(self, folder: str, config, device, offload_device):
        from transformers.models.qwen3_vl import modeling_qwen3_vl as qvl
        import comfy.model_patcher

        self.folder = folder
        self.config = config
        self.preprocessor = _preprocessor_settings(folder, config.vision_config)
        self.vision_dtype = _vision_dtype(device)
        with torch.device("meta"):
            model = qvl.Qwen3VLModel(config)
        # A real (not meta) tower so that its computed buffers (rotary inv_freq, float32) are right; its parameters
        # are left uninitialised (never touched, so never paged in) and replaced by the file's tensors, already in
        # the compute dtype (assign=True: no second copy while loading).
        with _no_init():
            visual = type(model.visual)._from_config(config.vision_config)
        missing, unexpected = visual.load_state_dict(load_vision_state_dict(folder, self.vision_dtype),
                                                     strict=False, assign=True)
        if missing or unexpected:
            raise SpliceError(f"the vision weights in {folder} do not fit its config.json (missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}): download the files of one Qwen3-VL "
                              "repository together")
        model.visual = visual.eval().requires_grad_(False)
        lm = model.language_model
        lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)  # real (CPU) buffers, not meta
        self.model = model.eval()
        self.placeholders = OrderedDict(
            (name, mod) for name, mod in lm.named_modules() if name and any(True for _ in mod.parameters(False)))
        # ModelPatcher sets `.device` on what it manages, a read-only property on transformers models: hold the
        # tower in a plain module (same parameters) so ComfyUI's memory manager can load and offload it.
        self.vision_patcher = comfy.model_patcher.ModelPatcher(_Holder(model.visual), load_device=device,
                                                               offload_device=offload_device)
        self.lock = threading.RLock()
        self._accepts_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    # -- weights ------------------------------------------------------------------------------------------

    def _set(self, root, path, module):
        parent, _, leaf = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, module)

    @contextlib.contextmanager
    def bound(self, te: ComfyQwen3):
        """The transformers Qwen3VLModel with the CLIP's own modules in its language model (nothing copied)."""
        lm = self.model.language_model
        with self.lock:
            for path, placeholder in self.placeholders.items():
                try:
                    src = te.llama.get_submodule(path)
                except AttributeError as e:
                    raise SpliceError(f"the text encoder has no module {path!r} that Qwen3-VL's language model "
                                      "needs: it is not a Qwen3 encoder of the same layout") from e
                for pname, p in placeholder.named_parameters(recurse=False):
                    theirs = getattr(src, pname, None)
                    if theirs is None or tuple(theirs.shape) != tuple(p.shape):
                        raise SpliceError(f"text encoder tensor {path}.{pname} has shape "
                                          f"{None if theirs is None else tuple(theirs.shape)}, Qwen3-VL expects "
                                          f"{tuple(p.shape)}: use the Qwen3-VL that matches the text encoder")
                self._set(lm, path, _Float32Embedding(src) if path == "embed_tokens" else src)
            try:
                yield self.model
            finally:
                for path, placeholder in self.placeholders.items():
                    self._set(lm, path, placeholder)

    def load(self, te: ComfyQwen3):
        """Ask ComfyUI's memory manager for the CLIP and the vision tower together; returns the compute device."""
        import comfy.model_management as mm

        patchers = [self.vision_patcher]
        if getattr(te.clip, "patcher", None) is not None:
            patchers.insert(0, te.clip.patcher)
        mm.load_models_gpu(patchers)
        if getattr(te.clip, "patcher", None) is not None:
            return torch.device(te.clip.patcher.load_device)
        return te.llama.embed_tokens.weight.device

    # -- encoding -----------------------------------------------------------------------------------------

    def image_processor(self, min_pixels: int, max_pixels: int):
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**self.preprocessor,
                                     size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)})

    def prepare(self, te: ComfyQwen3, caption: str, image=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        """Model inputs for one (caption, image): the CLIP's template with the image block first in the user turn."""
        inputs = {}
        content = caption
        if image is not None:
            pixels = image[0, :, :, :3].detach().float().cpu().clamp(0, 1).permute(2, 0, 1).contiguous()
            vis = self.image_processor(min_pixels, max_pixels)(images=[pixels], do_rescale=False,
                                                               return_tensors="pt")
            grid = vis["image_grid_thw"]
            n_image = int(grid.prod()) // (self.preprocessor["merge_size"] ** 2)
            content = VISION_START + IMAGE_PAD * n_image + VISION_END + caption
            inputs.update(pixel_values=vis["pixel_values"], image_grid_thw=grid)
        prompt = te.template().format(content)
        ids = torch.tensor([te.hf_tokenizer()(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        if image is not None:
            found = int((ids == self.config.image_token_id).sum())
            if found != n_image:
                raise SpliceError(f"the tokenizer turned {n_image} {IMAGE_PAD} into {found} image tokens (id "
                                  f"{self.config.image_token_id}): the CLIP's tokenizer is not Qwen's")
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        return inputs

    @torch.no_grad()
    def hidden_states(self, te: ComfyQwen3, caption: str, image=None, min_pixels=MIN_PIXELS,
                      max_pixels=MAX_PIXELS):
        """All hidden states (tuple of [1, L, D] float32) of the spliced model on (caption, image)."""
        inputs = self.prepare(te, caption, image, min_pixels, max_pixels)
        device = self.load(te)
        vision_device = next(self.model.visual.parameters()).device
        kwargs = {k: v.to(vision_device if k in ("pixel_values", "image_grid_thw") else device)
                  for k, v in inputs.items()}
        if self._accepts_token_types:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == self.config.image_token_id).int()
        with self.bound(te) as model:
            model.rope_deltas = None
            out = model(**kwargs, output_hidden_states=True, use_cache=False, return_dict=True)
        return out.hidden_states, inputs

    def encode(self, te: ComfyQwen3, caption: str, image=None, hidden_layer: int = -2, min_pixels=MIN_PIXELS,
               max_pixels=MAX_PIXELS):
        """CONDITIONING like ComfyUI's Z-Image encoder's: [[hidden_states[hidden_layer], {pooled_output: None,
        attention_mask}]], padding stripped (there is none: one prompt per call), cut to MAX_TEACHER_TOKENS."""
        import comfy.model_management as mm

        te.check_hidden_layer(hidden_layer)
        states, inputs = self.hidden_states(te, caption, image, min_pixels, max_pixels)
        mask = inputs["attention_mask"][0].bool()
        cond = states[hidden_layer][0][mask.to(states[hidden_layer].device)]
        if cond.shape[0] > MAX_TEACHER_TOKENS:
            log.warning("D-OPSD VLM splice: teacher context of %d tokens cut to %d (as the official recipe does); "
                        "lower max_pixels to keep the whole image", cond.shape[0], MAX_TEACHER_TOKENS)
            cond = cond[:MAX_TEACHER_TOKENS]
        cond = cond[None].float().to(mm.intermediate_device())
        return [[cond, {"pooled_output": None, "attention_mask": torch.ones(1, cond.shape[1], dtype=torch.long)}]]


# ----------------------------------------------------------------------------------------------------------
# cache: one splice (the vision tower is ~0.4 B parameters for Qwen3-VL-4B), rebuilt only when the folder changes

_CACHE = OrderedDict()
_CACHE_LOCK = threading.Lock()
_STATS = {"builds": 0}
CACHE_SIZE = 1


def _folder_stamp(folder: str):
    files = [os.path.join(folder, "config.json"), os.path.join(folder, "preprocessor_config.json")]
    files += _safetensors_files(folder)
    return tuple((os.path.basename(f), os.path.getmtime(f), os.path.getsize(f)) for f in files if os.path.isfile(f))


def build_count() -> int:
    """How many splices were built in this process (tests use it to check the cache)."""
    return _STATS["builds"]


def clear_cache():
    with _CACHE_LOCK:
        _CACHE.clear()


def get_splice(clip, vision_model: str):
    """(splice, ComfyQwen3) for this CLIP and Qwen3-VL folder, checked, built once and cached.

    The cache key is the folder (and its files' sizes/mtimes), not the CLIP: the splice keeps no CLIP weights
    between encodes, so every Qwen3 CLIP of the right shape reuses the same vision tower."""
    te = ComfyQwen3(clip)
    folder = resolve_folder(vision_model)
    config = read_config(folder)
    check_compatible(config, te, folder)
    key = (folder, _folder_stamp(folder))
    with _CACHE_LOCK:
        splice = _CACHE.get(key)
        if splice is None:
            patcher = getattr(clip, "patcher", None)
            device = getattr(patcher, "load_device", None) or te.llama.embed_tokens.weight.device
            offload = getattr(patcher, "offload_device", None) or torch.device("cpu")
            splice = QwenVLSplice(folder, config, device, offload)
            _STATS["builds"] += 1
            _CACHE[key] = splice
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
    return splice, te
