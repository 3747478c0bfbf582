"""Teacher contexts: the multimodal condition c_t of (prompt, target image), next to the student's c_s.

Each node turns a dataset into training pairs (student CONDITIONING from the caption alone, teacher
CONDITIONING from caption + image, and the VAE latent of the image) and also outputs the first pair's two
CONDITIONINGs, which are ordinary ComfyUI conditioning: wire them into a KSampler to look at them.
Three ways to give the teacher the image:
- reference latents (FLUX.2-klein's edit path, Qwen-Image-Edit, Kontext);
- a native VLM text encoder whose tokenizer takes images (Qwen-Image's Qwen2.5-VL);
- the VLM splice for Z-Image (vlm_splice_nodes.py).
"""
import logging

import node_helpers
import torch
from comfy_api.latest import io

from . import CATEGORY
from .dataset_nodes import Dataset
from ..dopsd_core.recipes import teacher_text
from .pairs import make_pair

Pairs = io.Custom("DOPSD_PAIRS")
INSTRUCTION_POSITIONS = {"before caption": "instruction_then_caption",
                         "after caption (official klein)": "caption_then_instruction"}
KLEIN_EDIT_PROMPT = ("Make the main subject (facial/ip details), background, and overall composition consistent "
                     "with the reference image.")


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def encode_latent(vae, image):
    return vae.encode(image[:, :, :, :3])


def decode_images(vae, latent):
    """IMAGE [N, H, W, 3] from a latent batch, as ComfyUI's VAEDecode returns it: video-style VAEs (Qwen-Image's
    Wan 2.1 VAE: latents [B, 16, T, H/8, W/8]) decode to [B, T, H, W, 3], whose frames become the batch."""
    images = vae.decode(latent)
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images


def require_dataset(dataset):
    if not dataset:
        raise ValueError("the dataset is empty: add image-caption pairs")


def _has_image_tokens(tokens) -> bool:
    """ComfyUI VL tokenizers put {"type": "image", ...} entries where the image goes."""
    if isinstance(tokens, dict):
        return any(_has_image_tokens(v) for v in tokens.values()) or tokens.get("type") == "image"
    if isinstance(tokens, (list, tuple)):
        return any(_has_image_tokens(v) for v in tokens)
    return False


def _each_once(dataset, make):
    """make(item) for every item; repeated items (kohya repeats share one item object) are encoded once."""
    done, out = {}, []
    for item in dataset:
        if id(item) not in done:
            done[id(item)] = make(item)
        out.append(done[id(item)])
    return out


def model_sees_reference_latents(model, teacher, latent):
    """Whether the model turns `reference_latents` into an input of its forward (ComfyUI's extra_conds),
    tried the way the sampler does it. None when it cannot be told (then nothing is refused)."""
    cond, extra = teacher[0][0], dict(teacher[0][1])
    refs = extra.pop("reference_latents", None)
    if refs is None:
        return None
    params = {"pooled_output": None, **extra, "noise": torch.zeros_like(latent), "device": latent.device,
              "cross_attn": cond}
    try:
        without = model.model.extra_conds(**params)
        with_refs = model.model.extra_conds(**params, reference_latents=refs)
    except Exception:  # an unusual model: let training (and the blind-teacher check) decide
        return None
    return set(with_refs) != set(without)


def require_visible_teacher(model, pairs):
    """Refuse, before anything trains, a teacher that differs from the student only by reference latents
    the model ignores: D-OPSD would train at loss 0 (teacher == student) and save an all-zero LoRA. When a
    teacher_prompt_prefix still makes the teacher differ, only warn: the teacher then sees that text, not
    the image."""
    if not pairs or model_sees_reference_latents(model, pairs[0].teacher, pairs[0].latent) is not False:
        return
    name = type(getattr(model.model, "model_config", model.model)).__name__
    fix = ("use the VLM Splice teacher (Z-Image) or a model with an edit path (FLUX.2-klein, Qwen-Image-Edit, "
           "Kontext)")
    if all(torch.equal(p.teacher[0][0], p.student[0][0]) for p in pairs):
        raise ValueError(f"this model ({name}) ignores reference latents, so the Reference Latent teacher would see "
                         f"exactly what the student sees and nothing would train: {fix}")
    logging.warning("D-OPSD: this model (%s) ignores reference latents: the teacher differs from the student only "
                    "by its prompt prefix and never sees the target image; %s", name, fix)


def _outputs(pairs):
    return io.NodeOutput(pairs, pairs[0].student, pairs[0].teacher)


def _pair_outputs():
    return [Pairs.Output(display_name="pairs"), io.Conditioning.Output(display_name="student (first pair)"),
            io.Conditioning.Output(display_name="teacher (first pair)")]


class DOPSDTeacherReferenceLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherReferenceLatent", display_name="D-OPSD Teacher: Reference Latent",
            category=CATEGORY,
            description="Teacher sees the target image as a VAE reference latent (FLUX.2-klein edit path, "
                        "Qwen-Image-Edit, Kontext). The student sees the caption only.",
            inputs=[
                Dataset.Input("dataset"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.String.Input("teacher_prompt_prefix", default="", multiline=True,
                                tooltip="Optional edit-style instruction for the teacher only, e.g. the official "
                                        "klein recipe's: " + KLEIN_EDIT_PROMPT),
                io.Combo.Input("instruction_position", options=list(INSTRUCTION_POSITIONS), optional=True,
                               default="before caption",
                               tooltip="Where the instruction goes in the teacher's prompt. The official klein "
                                       "script appends it after the caption; the pack's first choice was before."),
            ],
            outputs=_pair_outputs(),
        )

    @classmethod
    def execute(cls, dataset, clip, vae, teacher_prompt_prefix, instruction_position="before caption") -> io.NodeOutput:
        require_dataset(dataset)
        order = INSTRUCTION_POSITIONS[instruction_position]

        def make(item):
            latent = encode_latent(vae, item["image"])

            def encode(caption):
                student = encode_text(clip, caption)
                text = teacher_text(caption, teacher_prompt_prefix, order)
                teacher = node_helpers.conditioning_set_values(
                    encode_text(clip, text) if text != caption else student, {"reference_latents": [latent]},
                    append=True)
                return student, teacher, text
            return make_pair(item, latent, encode)
        return _outputs(_each_once(dataset, make))


class DOPSDTeacherNativeVLM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherNativeVLM", display_name="D-OPSD Teacher: Native VLM Encoder", category=CATEGORY,
            description="Teacher context from a text encoder whose tokenizer takes images "
                        "(e.g. Qwen-Image's Qwen2.5-VL): clip.tokenize(caption, images=[target]).",
            inputs=[Dataset.Input("dataset"), io.Clip.Input("clip"), io.Vae.Input("vae")],
            outputs=_pair_outputs(),
        )

    @classmethod
    def execute(cls, dataset, clip, vae) -> io.NodeOutput:
        require_dataset(dataset)

        def make(item):
            def encode(caption):
                tokens = clip.tokenize(caption, images=[item["image"][:, :, :, :3]])
                if not _has_image_tokens(tokens):
                    raise ValueError("this CLIP's tokenizer ignores images, so the teacher would see text only: use "
                                     "a VLM text encoder (e.g. Qwen-Image's qwen_2.5_vl), or the Reference Latent / "
                                     "VLM Splice teacher")
                return encode_text(clip, caption), clip.encode_from_tokens_scheduled(tokens), caption
            return make_pair(item, lambda: encode_latent(vae, item["image"]), encode)
        return _outputs(_each_once(dataset, make))


NODES = [DOPSDTeacherReferenceLatent, DOPSDTeacherNativeVLM]
