"""The toy world in ComfyUI: its 4-step model, VLM encoder and identity VAE as MODEL / CLIP / VAE, and the
renders of a held-out concept, so the pack's real D-OPSD nodes run on a model small enough for a CPU.

The weights are the shipped copy in `toyworld/weights/` (or the cache that `scripts/toyworld_build.py`
fills); nothing is downloaded. See toyworld/README.md for what the world is and what was measured on it.
"""
import sys

from comfy_api.latest import io

from . import CATEGORY

AXES = ["colour", "shape", "style"]


def _toyworld():
    """Import the toy world. It imports the library as top-level `dopsd_core` (so its scripts run from the
    repository root); inside ComfyUI that name is given the pack's own copy."""
    from .. import dopsd_core
    sys.modules.setdefault("dopsd_core", dopsd_core)
    from ..toyworld import build, dataset
    return build, dataset


def _missing_weights_message():
    """None when the weights are there (shipped or cached), else what to do about it."""
    build, _ = _toyworld()
    from ..toyworld import weights
    key = build.BuildConfig().key()
    if weights.find_build(key):
        return None
    return (f"the toy world's weights ({key}) are neither in {weights.SHIPPED_DIR} nor in {weights.cache_root()}: "
            "run `python scripts/toyworld_build.py` in the pack's folder, or turn on allow_build on the "
            "D-OPSD Toy World Loader (about 10 minutes on 2 CPU cores)")


def _require_size(images, size: int, what: str):
    """The toy world is 32x32 pixels; any other size would fail deep inside with a tensor-size error."""
    if images.shape[1:3] != (size, size):
        raise ValueError(f"the toy world's images are {size}x{size} pixels, but {what} got "
                         f"{images.shape[2]}x{images.shape[1]}: set the D-OPSD Dataset node's resolution to {size} "
                         "(its default, 512, is for real models)")


def _sized(encoder, tokenizer, size: int):
    """The toy CLIP and VAE, refusing images of another size with a message that names the fix."""
    from .comfy_bridge import toy_models

    class ToyClip(toy_models.ToyClip):
        def tokenize(self, text, return_word_ids=False, images=None, **kwargs):
            for image in images or []:
                _require_size(image, size, "the teacher's encoder")
            return super().tokenize(text, return_word_ids, images, **kwargs)

    class ToyVAE(toy_models.ToyVAE):
        def encode(self, pixels):
            _require_size(pixels, size, "VAE Encode")
            return super().encode(pixels)

    return ToyClip(encoder, tokenizer), ToyVAE()


class DOPSDToyWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyWorldLoader", display_name="D-OPSD Toy World Loader", category=CATEGORY,
            description="The toy world's step-distilled 4-step model (32x32 RGB pixels), its tiny VLM text(+image) "
                        "encoder and an identity VAE, for trying D-OPSD on a CPU in minutes. Sample it with "
                        "KSampler at 4 steps, cfg 1, euler, simple.",
            inputs=[io.Boolean.Input("allow_build", default=False,
                                     tooltip="Build the weights if neither the shipped copy nor the cache has them "
                                             "(about 10 minutes on 2 CPU cores).")],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, allow_build):
        return True if allow_build else (_missing_weights_message() or True)

    @classmethod
    def execute(cls, allow_build) -> io.NodeOutput:
        from .comfy_bridge import toy_models
        build, _ = _toyworld()
        missing = None if allow_build else _missing_weights_message()
        if missing:
            raise ValueError(missing)
        b = build.load(build_if_missing=allow_build)
        model = toy_models.model_patcher(b.student.dit, build.SHIFT)
        clip, vae = _sized(b.student.encoder, b.tokenizer, b.student.encoder.cfg.image_size)
        return io.NodeOutput(model, clip, vae)


class DOPSDToyWorldConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyWorldConcept", display_name="D-OPSD Toy World Concept", category=CATEGORY,
            description="Renders of the toy world's held-out concept on one axis (a colour, shape or style the "
                        "model never saw), with one caption per image that has [trigger] in the concept's place.",
            inputs=[io.Combo.Input("axis", options=AXES, default="colour",
                                   tooltip="Which held-out attribute is the new concept."),
                    io.Int.Input("images", default=6, min=1, max=64),
                    io.Int.Input("captions", default=2, min=1, max=64,
                                 tooltip="How many distinct captions (e.g. 2: 'a [trigger] circle' and "
                                         "'a [trigger] cross', each over several images)."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="captions"),
                     io.String.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, axis, images, captions, seed) -> io.NodeOutput:
        build, dataset = _toyworld()
        world = build.BuildConfig().world()  # the world is a function of the config: no weights needed
        cs = dataset.concept_set(world, axis, images, "[trigger]", seed, min(captions, images))
        pixels = ((cs.images + 1.0) / 2.0).clamp(0, 1).movedim(1, -1).contiguous()
        return io.NodeOutput(pixels, "\n".join(cs.captions), f"held-out {axis}: {cs.member}")


NODES = [DOPSDToyWorldLoader, DOPSDToyWorldConcept]
