"""Builds the shipped example workflows (workflows/*.json) in the real ComfyUI frontend.

    .venv/bin/python tests/make_workflows.py            # rewrite workflows/*.json and their *.jpg thumbnails
    .venv/bin/python tests/make_workflows.py --check    # exit 1 if a .json file's graph would change

Each workflow is described below as nodes (type, position, widget values by name), links (by output and input
name), groups and Markdown notes. The script starts a real ComfyUI server with the pack, opens the frontend in
headless Chromium, creates the nodes with the frontend's own node definitions, connects them, and saves
`app.graphToPrompt().workflow`, i.e. exactly what "Save" / drag-and-drop use. So widget order, node sizes and the
format version always match the ComfyUI frontend, and a node whose inputs changed fails here loudly.

The shipped files are written by the oldest supported frontend (1.32.9, ComfyUI 0.3.75, `.venv`), which the newer
one (1.49.6) opens as it is. Newer frontends save the same graph with extra fields, so "up to date" means the same
`graph_essentials()` (node types, links, widget values, groups), not the same bytes: the browser tests check that
on both frontends.
"""
import argparse
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKFLOWS = REPO / "workflows"

# -- model files users need (names and folders as ComfyUI's own templates use them) -------------------------
HF_ZIMAGE = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
HF_FLUX2 = "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files"
ZIMAGE_UNET = "z_image_turbo_bf16.safetensors"
ZIMAGE_TE = "qwen_3_4b.safetensors"
ZIMAGE_VAE = "ae.safetensors"
QWEN3_VL_FOLDER = "models/text_encoders/Qwen3-VL-4B-Instruct"
KLEIN_UNET = "flux-2-klein-4b.safetensors"
KLEIN_TE = "qwen_3_4b.safetensors"
KLEIN_VAE = "flux2-vae.safetensors"
HF_QWEN = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
QWEN_UNET = "qwen_image_fp8_e4m3fn.safetensors"  # names as in ComfyUI's own Qwen-Image template
QWEN_TE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
QWEN_LIGHTNING = "Qwen-Image-Lightning-8steps-V1.0.safetensors"
MODELS = {  # frontend "models" property: lets ComfyUI offer the download when a file is missing
    ZIMAGE_UNET: dict(url=f"{HF_ZIMAGE}/diffusion_models/{ZIMAGE_UNET}", directory="diffusion_models"),
    ZIMAGE_TE: dict(url=f"{HF_ZIMAGE}/text_encoders/{ZIMAGE_TE}", directory="text_encoders"),
    ZIMAGE_VAE: dict(url=f"{HF_ZIMAGE}/vae/{ZIMAGE_VAE}", directory="vae"),
    KLEIN_VAE: dict(url=f"{HF_FLUX2}/vae/{KLEIN_VAE}", directory="vae"),
    QWEN_UNET: dict(url=f"{HF_QWEN}/diffusion_models/{QWEN_UNET}", directory="diffusion_models"),
    QWEN_TE: dict(url=f"{HF_QWEN}/text_encoders/{QWEN_TE}", directory="text_encoders"),
    QWEN_VAE: dict(url=f"{HF_QWEN}/vae/{QWEN_VAE}", directory="vae"),
    QWEN_LIGHTNING: dict(url=f"https://huggingface.co/lightx2v/Qwen-Image-Lightning/resolve/main/{QWEN_LIGHTNING}",
                         directory="loras"),
}
ZIMAGE_LORA = "dopsd/zimage_turbo_lora"
KLEIN_LORA = "dopsd/flux2_klein_lora"
QWEN_LORA = "dopsd/qwen_image_lora"
KLEIN_EDIT_PROMPT = ("Make the main subject (facial/ip details), background, and overall composition consistent "
                     "with the reference image.")

NOTE_COLOR, NOTE_BG = "#432", "#653"
GROUP_COLORS = {"models": "#3f789e", "data": "#8A8", "train": "#b58b2a", "sample": "#a1309b", "out": "#88A"}

ZIMAGE_FILES_MD = f"""**Model files** (into `ComfyUI/models/…`):

| file | folder |
|---|---|
| [{ZIMAGE_UNET}]({MODELS[ZIMAGE_UNET]['url']}) | `diffusion_models/` |
| [{ZIMAGE_TE}]({MODELS[ZIMAGE_TE]['url']}) (Qwen3-4B) | `text_encoders/` |
| [{ZIMAGE_VAE}]({MODELS[ZIMAGE_VAE]['url']}) | `vae/` |"""

SPLICE_MD = """**Teacher (VLM splice)**: the folder of [Qwen/Qwen3-VL-4B-Instruct](https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct)
(`config.json`, `preprocessor_config.json` and the `*.safetensors` shards) as
`ComfyUI/models/text_encoders/Qwen3-VL-4B-Instruct/`. Only its vision tower is loaded: the language model is
Z-Image's own Qwen3-4B from the CLIP loader, so no second 4B LLM sits in memory."""

KLEIN_FILES_MD = f"""**Model files** (into `ComfyUI/models/…`), FLUX.2-klein **4B** (Apache-2.0,
[black-forest-labs/FLUX.2-klein-4B](https://huggingface.co/black-forest-labs/FLUX.2-klein-4B)):

| file | folder |
|---|---|
| `{KLEIN_UNET}` (or its fp8 variant) | `diffusion_models/` |
| `{KLEIN_TE}` (its Qwen3-4B text encoder) | `text_encoders/` |
| [{KLEIN_VAE}]({MODELS[KLEIN_VAE]['url']}) | `vae/` |

FLUX.2-klein needs **ComfyUI 0.9.2 or newer** (Qwen3 text encoder for FLUX.2: CLIPLoader type `flux2`)."""

QWEN_FILES_MD = f"""**Model files** (into `ComfyUI/models/…`), as in ComfyUI's own Qwen-Image template:

| file | folder |
|---|---|
| [{QWEN_UNET}]({MODELS[QWEN_UNET]['url']}) | `diffusion_models/` |
| [{QWEN_TE}]({MODELS[QWEN_TE]['url']}) (Qwen2.5-VL-7B, with its vision tower) | `text_encoders/` |
| [{QWEN_VAE}]({MODELS[QWEN_VAE]['url']}) | `vae/` |
| [{QWEN_LIGHTNING}]({MODELS[QWEN_LIGHTNING]['url']}) (makes Qwen-Image an 8-step model) | `loras/` |"""

DATASET_MD = """**Dataset**: a folder `ComfyUI/input/dopsd_dataset/` with images and a same-name `.txt` caption for each
(`cat1.png` + `cat1.txt`), or a `.jsonl` file there with `image` / `caption` rows. `[trigger]` in a caption is
replaced by the trigger word; otherwise the trigger is put in front."""

RUN_MD = """**Run**: press *Run*. The trainer starts a background job and returns at once, so the queue stays free:
training pauses while other prompts run. Watch it on the trainer node or in the **D-OPSD** tab of the left sidebar
(progress, it/s, ETA, loss chart, student/teacher previews) and use its **Pause / Resume / Stop** buttons.
Stop saves the LoRA as it is. The state survives a page reload."""


def note(key, pos, size, text, title="Read me"):
    return dict(key=key, type="MarkdownNote", pos=pos, size=size, values={"text": text}, title=title,
                color=NOTE_COLOR, bgcolor=NOTE_BG)


def node(key, type_, pos, values=None, **extra):
    return dict(key=key, type=type_, pos=pos, values=values or {}, **extra)


def loader(key, type_, pos, values, file_name):
    spec = node(key, type_, pos, values)
    if file_name in MODELS:
        spec["models"] = [dict(name=file_name, **MODELS[file_name])]
    return spec


def zimage_loaders(x=460, y=80):
    return [
        loader("unet", "UNETLoader", [x, y], {"unet_name": ZIMAGE_UNET, "weight_dtype": "default"}, ZIMAGE_UNET),
        node("shift", "ModelSamplingAuraFlow", [x, y + 130], {"shift": 3.0}),
        loader("clip", "CLIPLoader", [x, y + 230], {"clip_name": ZIMAGE_TE, "type": "lumina2", "device": "default"},
               ZIMAGE_TE),
        loader("vae", "VAELoader", [x, y + 390], {"vae_name": ZIMAGE_VAE}, ZIMAGE_VAE),
    ]


def klein_loaders(x=460, y=80):
    return [
        loader("unet", "UNETLoader", [x, y], {"unet_name": KLEIN_UNET, "weight_dtype": "default"}, KLEIN_UNET),
        loader("clip", "CLIPLoader", [x, y + 130], {"clip_name": KLEIN_TE, "type": "flux2", "device": "default"},
               KLEIN_TE),
        loader("vae", "VAELoader", [x, y + 290], {"vae_name": KLEIN_VAE}, KLEIN_VAE),
    ]


def qwen_loaders(x=460, y=80):
    return [
        loader("unet", "UNETLoader", [x, y], {"unet_name": QWEN_UNET, "weight_dtype": "default"}, QWEN_UNET),
        loader("lightning", "LoraLoaderModelOnly", [x, y + 130], {"lora_name": QWEN_LIGHTNING, "strength_model": 1.0},
               QWEN_LIGHTNING),
        node("shift", "ModelSamplingAuraFlow", [x, y + 270], {"shift": 3.1}),
        loader("clip", "CLIPLoader", [x, y + 370], {"clip_name": QWEN_TE, "type": "qwen_image", "device": "default"},
               QWEN_TE),
        loader("vae", "VAELoader", [x, y + 530], {"vae_name": QWEN_VAE}, QWEN_VAE),
    ]


def trainer(pos, inference_steps, train_steps, save_prefix):
    return node("trainer", "DOPSDTrainer", pos, {
        "method": "dopsd", "steps": 500, "inference_steps": inference_steps, "train_steps": train_steps,
        "schedule": "auto", "loss_space": "x0", "rank": 16, "alpha": 16.0, "learning_rate": 1e-4,
        "ema_decay": 0.9999, "ema_warmup": False, "detach_states": True, "precision": "bf16", "grad_accum": 1,
        "grad_clip": 1.0, "gradient_checkpointing": True, "seed": 0, "save_prefix": save_prefix, "save_every": 250,
        "preview_every": 50, "targets": "auto", "resume_from": "", "batch_size": 1, "recipe": "custom", "retention_ratio": 0.0}, control="fixed")


def dataset(pos, resolution):
    return node("dataset", "DOPSDDatasetFromFolder", pos,
                {"folder": "dopsd_dataset", "trigger": "sks", "resolution": resolution})


def splice_teacher(pos):
    return node("teacher", "DOPSDTeacherVLMSplice", pos, {"vision_model": QWEN3_VL_FOLDER, "hidden_layer": -2})


# -- the workflows ----------------------------------------------------------------------------------------
def wf_train_zimage():
    readme = f"""## D-OPSD: LoRA for Z-Image-Turbo

On-policy self-distillation: the student (caption only) learns from a teacher that also sees the target image,
on the student's own 8-step trajectory, so the LoRA learns the concept and Z-Image-Turbo stays a few-step model.

{ZIMAGE_FILES_MD}

{SPLICE_MD}

{DATASET_MD}

{RUN_MD}

**Settings**: `inference_steps` 8 with `train_steps` 4 is the official recipe (8-step euler / simple sampler, shift 3
from ModelSamplingAuraFlow). `recipe` *official Z-Image-Turbo LoRA* replaces every setting with the authors'
(rank 64 / alpha 128, separate q/k/v, 2000 steps, effective batch 4; docs/nodes.md lists each with its source). LoRAs go to `models/loras/{ZIMAGE_LORA}_stepNNNNN.safetensors`; look at them with
*D-OPSD LoRA preview - Z-Image-Turbo 8-step*. Check the teacher first with *D-OPSD teacher preview - Z-Image-Turbo*."""
    return dict(
        nodes=[note("readme", [0, 0], [420, 700], readme), *zimage_loaders(), dataset([820, 80], 1024),
               splice_teacher([820, 260]), trainer([1240, 80], 8, 4, ZIMAGE_LORA)],
        links=[("unet", 0, "shift", "model"), ("dataset", 0, "teacher", "dataset"), ("clip", 0, "teacher", "clip"),
               ("vae", 0, "teacher", "vae"), ("shift", 0, "trainer", "model"), ("teacher", 0, "trainer", "pairs"),
               ("vae", 0, "trainer", "vae")],
        groups=[("1. Z-Image-Turbo", ["unet", "shift", "clip", "vae"], "models"),
                ("2. Dataset and teacher context", ["dataset", "teacher"], "data"),
                ("3. Train (background job)", ["trainer"], "train")],
    )


def wf_train_klein():
    readme = f"""## D-OPSD: LoRA for FLUX.2-klein

On-policy self-distillation with FLUX.2-klein's own edit path as the teacher: the teacher sees the target image
as a reference latent (plus an edit instruction), the student sees the caption only. Training runs on the
student's own 4-step trajectory, so the LoRA keeps klein a 4-step model.

{KLEIN_FILES_MD}

{DATASET_MD}

{RUN_MD}

**Settings**: `inference_steps` 4 matches klein's 4-step sampler (Flux2 scheduler, chosen by `schedule` auto).
`recipe` *official FLUX.2-klein 4B edit teacher* replaces the settings with the authors' (rank 64, lr 2e-5, 3001
steps, their rollout states; docs/nodes.md lists each with its source); the teacher already puts the edit
instruction after the caption, as the official script does.
LoRAs go to `models/loras/{KLEIN_LORA}_stepNNNNN.safetensors`; look at them with
*D-OPSD LoRA preview - FLUX.2-klein 4-step*."""
    return dict(
        nodes=[note("readme", [0, 0], [420, 680], readme), *klein_loaders(), dataset([820, 80], 1024),
               node("teacher", "DOPSDTeacherReferenceLatent", [820, 260], {"teacher_prompt_prefix": KLEIN_EDIT_PROMPT,
                                                                     "instruction_position": "after caption (official klein)"}),
               trainer([1240, 80], 4, 4, KLEIN_LORA)],
        links=[("dataset", 0, "teacher", "dataset"), ("clip", 0, "teacher", "clip"), ("vae", 0, "teacher", "vae"),
               ("unet", 0, "trainer", "model"), ("teacher", 0, "trainer", "pairs"), ("vae", 0, "trainer", "vae")],
        groups=[("1. FLUX.2-klein 4B", ["unet", "clip", "vae"], "models"),
                ("2. Dataset and teacher context", ["dataset", "teacher"], "data"),
                ("3. Train (background job)", ["trainer"], "train")],
    )


def wf_train_qwen_image():
    readme = f"""## D-OPSD: LoRA for Qwen-Image (native VLM teacher)

On-policy self-distillation with Qwen-Image's own text encoder as the teacher: Qwen2.5-VL reads the caption **and
the target image** (its vision tower, the way Qwen-Image-Edit encodes its input image), the student reads the
caption only. Training runs on the student's own 8-step trajectory (Qwen-Image + the Lightning 8-step LoRA), so
the LoRA keeps it an 8-step model.

{QWEN_FILES_MD}

{DATASET_MD}

{RUN_MD}

**Settings**: `inference_steps` 8 with `train_steps` 4, euler / simple at shift 3.1 (ModelSamplingAuraFlow) and
cfg 1, as ComfyUI's Qwen-Image template samples with the Lightning LoRA. No official D-OPSD recipe exists for
Qwen-Image: the LoRA targets (family `qwenimage`) are both streams' attention projections and MLPs. LoRAs go to
`models/loras/{QWEN_LORA}_stepNNNNN.safetensors`; use them **together with** the Lightning LoRA. For
Qwen-Image-Edit, the *Reference Latent* teacher is the other choice (the edit model's own input-image path)."""
    return dict(
        nodes=[note("readme", [0, 0], [420, 700], readme), *qwen_loaders(), dataset([820, 80], 1024),
               node("teacher", "DOPSDTeacherNativeVLM", [820, 260]), trainer([1240, 80], 8, 4, QWEN_LORA)],
        links=[("unet", 0, "lightning", "model"), ("lightning", 0, "shift", "model"),
               ("dataset", 0, "teacher", "dataset"), ("clip", 0, "teacher", "clip"), ("vae", 0, "teacher", "vae"),
               ("shift", 0, "trainer", "model"), ("teacher", 0, "trainer", "pairs"), ("vae", 0, "trainer", "vae")],
        groups=[("1. Qwen-Image (8-step)", ["unet", "lightning", "shift", "clip", "vae"], "models"),
                ("2. Dataset and teacher context", ["dataset", "teacher"], "data"),
                ("3. Train (background job)", ["trainer"], "train")],
    )


def wf_teacher_preview():
    readme = f"""## D-OPSD teacher preview (Z-Image-Turbo)

Before training, check the teacher. From the same noise, the 8-step sampler runs with the **student** context
(caption only) and with the **teacher** context (caption + target image); the target is shown last.
If the teacher image does not move towards the target, D-OPSD has nothing to teach: fix the data or the teacher
settings first. `pair_index` picks the dataset entry.

{ZIMAGE_FILES_MD}

{SPLICE_MD}

{DATASET_MD}"""
    return dict(
        nodes=[note("readme", [0, 0], [420, 600], readme), *zimage_loaders(), dataset([820, 80], 1024),
               splice_teacher([820, 260]),
               node("preview", "DOPSDTeacherPreview", [1240, 80],
                    {"steps": 8, "schedule": "auto", "pair_index": 0, "seed": 0}, control="fixed"),
               node("show", "PreviewImage", [1240, 360], size=[620, 300])],
        links=[("unet", 0, "shift", "model"), ("dataset", 0, "teacher", "dataset"), ("clip", 0, "teacher", "clip"),
               ("vae", 0, "teacher", "vae"), ("shift", 0, "preview", "model"), ("teacher", 0, "preview", "pairs"),
               ("vae", 0, "preview", "vae"), ("preview", 0, "show", "images")],
        groups=[("1. Z-Image-Turbo", ["unet", "shift", "clip", "vae"], "models"),
                ("2. Dataset and teacher context", ["dataset", "teacher"], "data"),
                ("3. Student | teacher | target", ["preview", "show"], "out")],
    )


def wf_lora_preview_zimage():
    readme = f"""## Preview a D-OPSD LoRA on Z-Image-Turbo (8 steps)

The same seed and prompt with and without the LoRA, on Z-Image-Turbo's usual 8-step sampler (euler, simple,
cfg 1, shift 3). Pick the LoRA in *Load LoRA*: the trainer writes `models/loras/{ZIMAGE_LORA}_stepNNNNN.safetensors`.
Put the trigger word from training in the prompt. Any LoRA loader works: the files are standard ComfyUI LoRAs.

{ZIMAGE_FILES_MD}"""
    prompt = "a photo of sks, detailed, natural light"
    return dict(
        nodes=[note("readme", [0, 0], [420, 520], readme),
               loader("unet", "UNETLoader", [460, 80], {"unet_name": ZIMAGE_UNET, "weight_dtype": "default"}, ZIMAGE_UNET),
               node("lora", "LoraLoaderModelOnly", [460, 210],
                    {"lora_name": f"{ZIMAGE_LORA}_step00500.safetensors", "strength_model": 1.0}),
               node("shift_lora", "ModelSamplingAuraFlow", [460, 350], {"shift": 3.0}, title="ModelSamplingAuraFlow (LoRA)"),
               node("shift_base", "ModelSamplingAuraFlow", [460, 450], {"shift": 3.0}, title="ModelSamplingAuraFlow (base)"),
               loader("clip", "CLIPLoader", [460, 560], {"clip_name": ZIMAGE_TE, "type": "lumina2", "device": "default"}, ZIMAGE_TE),
               loader("vae", "VAELoader", [460, 720], {"vae_name": ZIMAGE_VAE}, ZIMAGE_VAE),
               node("pos", "CLIPTextEncode", [820, 80], {"text": prompt}, size=[400, 160]),
               node("neg", "ConditioningZeroOut", [820, 290]),
               node("latent", "EmptySD3LatentImage", [820, 390], {"width": 1024, "height": 1024, "batch_size": 1}),
               node("ks_lora", "KSampler", [1260, 80], {"seed": 0, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                                       "scheduler": "simple", "denoise": 1.0},
                    control="fixed", title="KSampler (with LoRA)"),
               node("ks_base", "KSampler", [1260, 440], {"seed": 0, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                                       "scheduler": "simple", "denoise": 1.0},
                    control="fixed", title="KSampler (base model)"),
               node("dec_lora", "VAEDecode", [1620, 80]), node("dec_base", "VAEDecode", [1620, 440]),
               node("save_lora", "SaveImage", [1840, 80], {"filename_prefix": "dopsd/preview_lora"}, size=[320, 340]),
               node("save_base", "SaveImage", [1840, 440], {"filename_prefix": "dopsd/preview_base"}, size=[320, 340])],
        links=[("unet", 0, "lora", "model"), ("lora", 0, "shift_lora", "model"), ("unet", 0, "shift_base", "model"),
               ("clip", 0, "pos", "clip"), ("pos", 0, "neg", "conditioning"),
               ("shift_lora", 0, "ks_lora", "model"), ("pos", 0, "ks_lora", "positive"), ("neg", 0, "ks_lora", "negative"),
               ("latent", 0, "ks_lora", "latent_image"),
               ("shift_base", 0, "ks_base", "model"), ("pos", 0, "ks_base", "positive"), ("neg", 0, "ks_base", "negative"),
               ("latent", 0, "ks_base", "latent_image"),
               ("ks_lora", 0, "dec_lora", "samples"), ("vae", 0, "dec_lora", "vae"), ("dec_lora", 0, "save_lora", "images"),
               ("ks_base", 0, "dec_base", "samples"), ("vae", 0, "dec_base", "vae"), ("dec_base", 0, "save_base", "images")],
        groups=[("Models and LoRA", ["unet", "lora", "shift_lora", "shift_base", "clip", "vae"], "models"),
                ("Prompt", ["pos", "neg", "latent"], "data"),
                ("8-step sampling: LoRA vs base", ["ks_lora", "ks_base", "dec_lora", "dec_base", "save_lora", "save_base"],
                 "sample")],
    )


def wf_lora_preview_klein():
    readme = f"""## Preview a D-OPSD LoRA on FLUX.2-klein (4 steps)

The same seed and prompt with and without the LoRA, on klein's 4-step sampler (Flux2 scheduler, euler, no CFG).
Pick the LoRA in *Load LoRA*: the trainer writes `models/loras/{KLEIN_LORA}_stepNNNNN.safetensors`. Put the trigger
word from training in the prompt.

{KLEIN_FILES_MD}"""
    prompt = "a photo of sks, detailed, natural light"
    sampler_nodes = []
    sampler_links = []
    for tag, y, model_src in (("lora", 80, "lora"), ("base", 480, "unet")):
        sampler_nodes += [
            node(f"guider_{tag}", "BasicGuider", [1260, y], title=f"BasicGuider ({'with LoRA' if tag == 'lora' else 'base model'})"),
            node(f"sca_{tag}", "SamplerCustomAdvanced", [1540, y]),
            node(f"dec_{tag}", "VAEDecode", [1540, y + 200]),
            node(f"save_{tag}", "SaveImage", [1840, y], {"filename_prefix": f"dopsd/preview_{tag}"}, size=[320, 340]),
        ]
        sampler_links += [
            (model_src, 0, f"guider_{tag}", "model"), ("pos", 0, f"guider_{tag}", "conditioning"),
            ("noise", 0, f"sca_{tag}", "noise"), (f"guider_{tag}", 0, f"sca_{tag}", "guider"),
            ("sampler", 0, f"sca_{tag}", "sampler"), ("sigmas", 0, f"sca_{tag}", "sigmas"),
            ("latent", 0, f"sca_{tag}", "latent_image"), (f"sca_{tag}", 0, f"dec_{tag}", "samples"),
            ("vae", 0, f"dec_{tag}", "vae"), (f"dec_{tag}", 0, f"save_{tag}", "images"),
        ]
    return dict(
        nodes=[note("readme", [0, 0], [420, 560], readme),
               loader("unet", "UNETLoader", [460, 80], {"unet_name": KLEIN_UNET, "weight_dtype": "default"}, KLEIN_UNET),
               node("lora", "LoraLoaderModelOnly", [460, 210],
                    {"lora_name": f"{KLEIN_LORA}_step00500.safetensors", "strength_model": 1.0}),
               loader("clip", "CLIPLoader", [460, 350], {"clip_name": KLEIN_TE, "type": "flux2", "device": "default"}, KLEIN_TE),
               loader("vae", "VAELoader", [460, 510], {"vae_name": KLEIN_VAE}, KLEIN_VAE),
               node("pos", "CLIPTextEncode", [820, 80], {"text": prompt}, size=[400, 160]),
               node("latent", "EmptyFlux2LatentImage", [820, 290], {"width": 1024, "height": 1024, "batch_size": 1}),
               node("sigmas", "Flux2Scheduler", [820, 450], {"steps": 4, "width": 1024, "height": 1024}),
               node("noise", "RandomNoise", [820, 610], {"noise_seed": 0}, control="fixed"),
               node("sampler", "KSamplerSelect", [820, 740], {"sampler_name": "euler"}),
               *sampler_nodes],
        links=[("unet", 0, "lora", "model"), ("clip", 0, "pos", "clip"), *sampler_links],
        groups=[("Models and LoRA", ["unet", "lora", "clip", "vae"], "models"),
                ("Prompt, size, 4-step schedule", ["pos", "latent", "sigmas", "noise", "sampler"], "data"),
                ("4-step sampling: LoRA vs base", [k["key"] for k in sampler_nodes], "sample")],
    )


TOY_LORA = "dopsd/toyworld_demo"
TOY_PROMPT = "a sks circle"
TOY_ORDINARY = "a circle"   # names no colour: where the new colour bleeds in
TOY_TRAIN = dict(steps=300, learning_rate=1e-3, rank=4, alpha=4.0, ema_decay=0.9999)
TOY_RETENTION_PROMPTS = "a circle\na square\na red circle\na blue square\na striped circle\na dotted square"


def wf_toyworld_demo():
    readme = f"""## D-OPSD demo: the toy world (CPU, minutes)

Everything runs on a CPU, with nothing to download: the pack ships the toy world's weights (a 4-step
step-distilled 32x32 pixel model, its tiny VLM encoder, an identity VAE; see `toyworld/README.md`).

1. **Concept**: 6 renders of the held-out colour, a colour the model never saw, captioned `a [trigger] <shape>`.
2. **Teacher**: the toy VLM encodes caption + target image (the in-context teacher). *Teacher preview* shows
   student | teacher | target from the same noise at 4 steps: with the image in its context the teacher
   turns towards the new colour (0.95 of its samples read as `rose` over many noises, see toyworld/README.md).
3. **Train**: D-OPSD on the student's own 4-step trajectory ({TOY_TRAIN['steps']} steps, about a minute). *Wait For Job*
   holds the rest of the graph until it is done; the LoRA goes to `models/loras/{TOY_LORA}_stepNNNNN.safetensors`.
4. **Preview**: the same 8 noises, 4 steps, `{TOY_PROMPT}`, with the LoRA and without it; and the ordinary
   prompt `{TOY_ORDINARY}`, which names no colour: the LoRA also tints it towards the new colour (the bleed, measured
   in the README's toy-world results; *D-OPSD demo - toy world with retention* keeps it down).

`scripts/demo.sh` runs this workflow headless and collects the images, the loss curve and the LoRA."""
    sampler = {"seed": 0, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    return dict(
        nodes=[note("readme", [0, 0], [420, 640], readme),
               node("loader", "DOPSDToyWorldLoader", [460, 80], {"allow_build": False}),
               node("concept", "DOPSDToyWorldConcept", [460, 260], {"axis": "colour", "images": 6, "captions": 2,
                                                                      "seed": 0}, control="fixed"),
               node("dataset", "DOPSDDatasetFromImages", [820, 80], {"captions": "a photo of [trigger]",
                                                                     "trigger": "sks", "resolution": 32}),
               node("teacher", "DOPSDTeacherNativeVLM", [820, 330]),
               node("tpreview", "DOPSDTeacherPreview", [1240, 80], {"steps": 4, "schedule": "auto", "pair_index": 0,
                                                                     "seed": 0}, control="fixed"),
               node("tsave", "SaveImage", [1240, 330], {"filename_prefix": "dopsd_demo/teacher_preview"}, size=[320, 260]),
               node("trainer", "DOPSDTrainer", [1640, 80], {
                   "method": "dopsd", "steps": TOY_TRAIN["steps"], "inference_steps": 4, "train_steps": 4,
                   "schedule": "auto", "loss_space": "x0", "rank": TOY_TRAIN["rank"], "alpha": TOY_TRAIN["alpha"],
                   "learning_rate": TOY_TRAIN["learning_rate"], "ema_decay": TOY_TRAIN["ema_decay"],
                   "ema_warmup": False, "detach_states": True, "precision": "fp32", "grad_accum": 1, "grad_clip": 1.0,
                   "gradient_checkpointing": False, "seed": 0, "save_prefix": TOY_LORA, "save_every": 0,
                   "preview_every": 25, "targets": "auto", "resume_from": "", "batch_size": 1, "retention_ratio": 0.0}, control="fixed"),
               node("wait", "DOPSDWaitForJob", [2080, 80], {"timeout_s": 0}),
               node("joblora", "DOPSDJobLoRA", [460, 1250], {"strength": 1.0, "adapter": "student"}),
               node("pos", "CLIPTextEncode", [460, 1410], {"text": TOY_PROMPT}, size=[300, 100]),
               node("blank", "EmptyImage", [820, 1250], {"width": 32, "height": 32, "batch_size": 8, "color": 0}),
               node("latent", "VAEEncode", [820, 1450]),
               node("ks_lora", "KSampler", [1180, 1250], sampler, control="fixed", title="KSampler (with LoRA)"),
               node("ks_base", "KSampler", [1180, 1610], sampler, control="fixed", title="KSampler (base model)"),
               node("dec_lora", "VAEDecode", [1540, 1250]), node("dec_base", "VAEDecode", [1540, 1610]),
               node("save_lora", "SaveImage", [1760, 1250], {"filename_prefix": "dopsd_demo/after_lora"}, size=[320, 300]),
               node("save_base", "SaveImage", [1760, 1610], {"filename_prefix": "dopsd_demo/before_base"}, size=[320, 300]),
               node("ord", "CLIPTextEncode", [460, 1970], {"text": TOY_ORDINARY}, size=[300, 100],
                    title="CLIPTextEncode (ordinary prompt)"),
               node("ks_ord_lora", "KSampler", [1180, 1970], sampler, control="fixed", title="KSampler (ordinary, with LoRA)"),
               node("ks_ord_base", "KSampler", [1180, 2330], sampler, control="fixed", title="KSampler (ordinary, base)"),
               node("dec_ord_lora", "VAEDecode", [1540, 1970]), node("dec_ord_base", "VAEDecode", [1540, 2330]),
               node("save_ord_lora", "SaveImage", [1760, 1970], {"filename_prefix": "dopsd_demo/ordinary_lora"},
                    size=[320, 300]),
               node("save_ord_base", "SaveImage", [1760, 2330], {"filename_prefix": "dopsd_demo/ordinary_base"},
                    size=[320, 300])],
        links=[("concept", "images", "dataset", "images"), ("concept", "captions", "dataset", "captions"),
               ("dataset", 0, "teacher", "dataset"), ("loader", "clip", "teacher", "clip"),
               ("loader", "vae", "teacher", "vae"),
               ("loader", "model", "tpreview", "model"), ("teacher", 0, "tpreview", "pairs"),
               ("loader", "vae", "tpreview", "vae"), ("tpreview", 0, "tsave", "images"),
               ("loader", "model", "trainer", "model"), ("teacher", 0, "trainer", "pairs"),
               ("loader", "vae", "trainer", "vae"), ("trainer", 0, "wait", "job"),
               ("loader", "model", "joblora", "model"), ("wait", 0, "joblora", "job"),
               ("loader", "clip", "pos", "clip"), ("blank", 0, "latent", "pixels"), ("loader", "vae", "latent", "vae"),
               ("joblora", 0, "ks_lora", "model"), ("pos", 0, "ks_lora", "positive"), ("pos", 0, "ks_lora", "negative"),
               ("latent", 0, "ks_lora", "latent_image"),
               ("loader", "model", "ks_base", "model"), ("pos", 0, "ks_base", "positive"),
               ("pos", 0, "ks_base", "negative"), ("latent", 0, "ks_base", "latent_image"),
               ("ks_lora", 0, "dec_lora", "samples"), ("loader", "vae", "dec_lora", "vae"),
               ("dec_lora", 0, "save_lora", "images"),
               ("ks_base", 0, "dec_base", "samples"), ("loader", "vae", "dec_base", "vae"),
               ("dec_base", 0, "save_base", "images"),
               ("loader", "clip", "ord", "clip"),
               ("joblora", 0, "ks_ord_lora", "model"), ("ord", 0, "ks_ord_lora", "positive"),
               ("ord", 0, "ks_ord_lora", "negative"), ("latent", 0, "ks_ord_lora", "latent_image"),
               ("loader", "model", "ks_ord_base", "model"), ("ord", 0, "ks_ord_base", "positive"),
               ("ord", 0, "ks_ord_base", "negative"), ("latent", 0, "ks_ord_base", "latent_image"),
               ("ks_ord_lora", 0, "dec_ord_lora", "samples"), ("loader", "vae", "dec_ord_lora", "vae"),
               ("dec_ord_lora", 0, "save_ord_lora", "images"),
               ("ks_ord_base", 0, "dec_ord_base", "samples"), ("loader", "vae", "dec_ord_base", "vae"),
               ("dec_ord_base", 0, "save_ord_base", "images")],
        groups=[("1. Toy world model and concept", ["loader", "concept"], "models"),
                ("2. Dataset, teacher context, teacher preview", ["dataset", "teacher", "tpreview", "tsave"], "data"),
                ("3. Train, then wait", ["trainer", "wait"], "train"),
                ("4. 4-step sampling: LoRA vs base", ["joblora", "pos", "blank", "latent", "ks_lora", "ks_base",
                                                      "dec_lora", "dec_base", "save_lora", "save_base", "ord",
                                                      "ks_ord_lora", "ks_ord_base", "dec_ord_lora", "dec_ord_base",
                                                      "save_ord_lora", "save_ord_base"], "sample")],
    )


def wf_toyworld_retention():
    """The toy demo with on-policy retention: a Retention Prompts node (ordinary toy prompts plus the class prompts of
    the pairs) into the trainer, ratio 1, its own LoRA name."""
    spec = wf_toyworld_demo()
    readme = spec["nodes"][0]["values"]["text"]
    spec["nodes"][0]["values"]["text"] = readme.replace(
        "## D-OPSD demo: the toy world (CPU, minutes)", "## D-OPSD demo: the toy world with on-policy retention (CPU)"
    ).replace(
        "3. **Train**:", "3. **Retention**: *D-OPSD Retention Prompts* lists ordinary prompts (plus the class prompts "
        "of the pairs: `a circle`, `a square`); with `retention_ratio` 1 every step after the first also rolls the "
        "student out on one of them, with the LoRA-off base model as its teacher, so ordinary prompts stay as the "
        "base model drew them (about twice the training time; README, \"Toy-world results\").\n4. **Train**:"
    ).replace("4. **Preview**", "5. **Preview**").replace(TOY_LORA, TOY_LORA_RETENTION).replace("*D-OPSD demo - toy world with retention* keeps it down",
                                                   "retention keeps it down")
    for n in spec["nodes"]:
        if n["key"] == "trainer":
            n["values"].update(retention_ratio=1.0, save_prefix=TOY_LORA_RETENTION)
    spec["nodes"].append(node("retention", "DOPSDRetentionPrompts", [2080, 260],
                              {"prompts": TOY_RETENTION_PROMPTS, "trigger": "sks", "variations": 0, "seed": 0},
                              control="fixed", size=[360, 300]))
    spec["links"] += [("loader", "clip", "retention", "clip"), ("teacher", 0, "retention", "pairs"),
                      ("retention", 0, "trainer", "retention")]
    spec["groups"][2] = ("3. Retention prompts, train, then wait", ["retention", "trainer", "wait"], "train")
    return spec


TOY_LORA_RETENTION = "dopsd/toyworld_retention"


WORKFLOWS_SPEC = {
    "D-OPSD train - Z-Image-Turbo (VLM splice teacher)": wf_train_zimage,
    "D-OPSD train - FLUX.2-klein (reference latent teacher)": wf_train_klein,
    "D-OPSD train - Qwen-Image (native VLM teacher)": wf_train_qwen_image,
    "D-OPSD teacher preview - Z-Image-Turbo": wf_teacher_preview,
    "D-OPSD LoRA preview - Z-Image-Turbo 8-step": wf_lora_preview_zimage,
    "D-OPSD LoRA preview - FLUX.2-klein 4-step": wf_lora_preview_klein,
    "D-OPSD demo - toy world (CPU)": wf_toyworld_demo,
    "D-OPSD demo - toy world with retention (CPU)": wf_toyworld_retention,
}

# Runs in the page: builds one workflow from the spec with the frontend's node classes, returns the saved JSON.
BUILD_JS = r"""
async (spec) => {
  app.graph.clear();
  const byKey = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    node.pos = n.pos;
    if (n.title) node.title = n.title;
    if (n.color) node.color = n.color;
    if (n.bgcolor) node.bgcolor = n.bgcolor;
    app.graph.add(node);
    for (const [name, value] of Object.entries(n.values)) {
      const w = node.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${n.type} has no widget ${name}: ${(node.widgets || []).map((w) => w.name)}`);
      w.value = value;
    }
    if (n.control) {
      const c = node.widgets.find((w) => w.name === "control_after_generate");
      if (!c) throw new Error(`${n.type} has no control_after_generate widget`);
      c.value = n.control;
    }
    if (n.models) node.properties.models = n.models;
    if (n.size) node.setSize(n.size);
    byKey[n.key] = node;
  }
  for (const [a, out, b, input] of spec.links) {
    const src = byKey[a], dst = byKey[b];
    if (!src || !dst) throw new Error(`link ${a} -> ${b}: unknown node key`);
    const oi = typeof out === "number" ? out : src.outputs.findIndex((o) => o.name === out);
    const ii = dst.inputs.findIndex((i) => i.name === input);
    if (oi < 0 || ii < 0) throw new Error(`link ${a}[${out}] -> ${b}.${input}: no such slot`);
    if (!src.connect(oi, dst, ii)) throw new Error(`link ${a}[${out}] -> ${b}.${input} refused (type mismatch?)`);
  }
  for (const n of Object.values(byKey)) {  // at least the size the frontend computes (widgets + D-OPSD card)
    const min = n.computeSize();
    n.setSize([Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])]);
  }
  for (const g of spec.groups) {
    const group = new LiteGraph.LGraphGroup(g.title);
    group.color = g.color;
    const nodes = g.keys.map((k) => byKey[k]);
    const pad = 14, head = group.font_size * 1.4, titleH = LiteGraph.NODE_TITLE_HEIGHT;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - pad;
    const y0 = Math.min(...nodes.map((n) => n.pos[1] - titleH)) - pad - head;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + pad;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + pad;
    group.pos = [x0, y0];
    group.size = [x1 - x0, y1 - y0];
    app.graph.add(group);
  }
  app.canvas.ds.offset = [140, 190];
  app.canvas.ds.scale = 0.6;
  const { workflow } = await app.graphToPrompt();
  workflow.extra = { ...(workflow.extra || {}), ds: { scale: 0.6, offset: [140, 190] } };
  return JSON.stringify(workflow);  // what "Save" writes: undefined fields left out (Playwright may send them as null)
}
"""


def prepare_spec(spec: dict) -> dict:
    """The JSON the page-side builder takes."""
    spec = dict(spec)
    spec["groups"] = [dict(title=t, keys=keys, color=GROUP_COLORS[c]) for t, keys, c in spec["groups"]]
    spec["links"] = [list(link) for link in spec["links"]]
    return spec


# Thumbnail: the graph fitted into a screen region clear of the frontend's toolbars, captured as it is drawn.
THUMB_REGION = dict(x=70, y=125, width=840, height=840)
FIT_JS = r"""
(region) => {
  const items = [...app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                                                n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]),
                 ...app.graph.groups.map((g) => [g.pos[0], g.pos[1], g.size[0], g.size[1]])];
  const x0 = Math.min(...items.map((b) => b[0])), y0 = Math.min(...items.map((b) => b[1]));
  const x1 = Math.max(...items.map((b) => b[0] + b[2])), y1 = Math.max(...items.map((b) => b[1] + b[3]));
  const scale = Math.min(region.width / (x1 - x0 + 20), region.height / (y1 - y0 + 20), 1);
  const rect = app.canvas.canvas.getBoundingClientRect();
  app.canvas.min_font_size_for_lod = 0;  // draw full detail (text, widgets, DOM notes) even when zoomed out
  app.canvas.ds.scale = scale;
  const padX = (region.width / scale - (x1 - x0)) / 2, padY = (region.height / scale - (y1 - y0)) / 2;
  app.canvas.ds.offset = [(region.x - rect.left) / scale - x0 + padX, (region.y - rect.top) / scale - y0 + padY];
  app.canvas.setDirty(true, true);
  return scale;
}
"""


def thumbnail(page, path, width=480):
    """JPEG thumbnail (<name>.jpg next to <name>.json is what ComfyUI's template browser shows)."""
    import io

    from PIL import Image

    page.evaluate(f"({FIT_JS})({json.dumps(THUMB_REGION)})")
    # DOM widgets (notes, the trainer card) follow the canvas on the next frames
    page.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => requestAnimationFrame(r))))")
    png = page.screenshot(clip=THUMB_REGION)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.save(path, "JPEG", quality=85, optimize=True)


def build_in_page(page, spec: dict) -> dict:
    """The UI-format workflow the frontend in `page` saves for `spec` (BUILD_JS returns it as Save's JSON text)."""
    return json.loads(page.evaluate(f"({BUILD_JS})({json.dumps(spec)})"))


def build_all(server_url, page, thumbnails_to=None):
    from browser import wait_for

    page.goto(server_url)
    wait_for(page, "!!(window.app && window.app.graph && window.LiteGraph && window.__DOPSD_WEB_LOADED__)",
             timeout=90, message="ComfyUI frontend")
    out = {}
    for name, make in WORKFLOWS_SPEC.items():
        wf = build_in_page(page, prepare_spec(make()))
        wf.pop("id", None)  # a fresh id is made when the file is opened
        out[name] = wf
        if thumbnails_to is not None:
            thumbnail(page, Path(thumbnails_to) / f"{name}.jpg")
    return out


def graph_essentials(workflow: dict) -> dict:
    """What a UI-format workflow means, whichever frontend saved it: per node its type, title, mode, position,
    widget values, colours and model download hints; the links with their slots and types; the groups' titles and
    colours. Left out: what frontends add or size differently on save (node sizes, `widgets_values_named`, flags,
    order, unconnected outputs such as SaveImage's newer one, group bounds, ids of the file itself)."""
    nodes = {}
    for n in workflow["nodes"]:
        nodes[n["id"]] = dict(type=n["type"], title=n.get("title"), mode=n.get("mode", 0),
                              pos=[round(float(v)) for v in n["pos"]], widgets_values=n.get("widgets_values") or [],
                              color=n.get("color"), bgcolor=n.get("bgcolor"),
                              models=(n.get("properties") or {}).get("models"))
    links = sorted(tuple(link[:6]) if isinstance(link, list) else
                   (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"])
                   for link in workflow["links"])
    groups = sorted((g["title"], g.get("color")) for g in workflow.get("groups", []))
    return dict(nodes=nodes, links=links, groups=groups)


def essentials_diff(a: dict, b: dict) -> list:
    """Where two workflows' graph_essentials differ, as readable lines (empty when they mean the same graph)."""
    ea, eb = graph_essentials(a), graph_essentials(b)
    lines = []
    for node_id in sorted(set(ea["nodes"]) | set(eb["nodes"])):
        na, nb = ea["nodes"].get(node_id), eb["nodes"].get(node_id)
        if na != nb:
            keys = sorted(k for k in set(na or {}) | set(nb or {}) if (na or {}).get(k) != (nb or {}).get(k))
            lines += [f"node {node_id} ({(na or nb)['type']}) {k}: {(na or {}).get(k)!r} != {(nb or {}).get(k)!r}"
                      for k in keys]
    for key in ("links", "groups"):
        if ea[key] != eb[key]:
            lines.append(f"{key}: {sorted(set(ea[key]) ^ set(eb[key]))!r}")
    return lines


def dumps(workflow) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import tempfile

    import comfy_env

    comfy_env.setup()
    import comfy_server
    from browser import chromium_page

    with tempfile.TemporaryDirectory(prefix="dopsd-make-workflows-") as tmp:
        base = comfy_server.prepare_base_dir(Path(tmp) / "base")
        server = comfy_server.ComfyServer(base)
        try:
            server.set_setting("Comfy.TutorialCompleted", True)
            with chromium_page(width=1600, height=1100) as session:
                built = build_all(server.url, session.page, thumbnails_to=None if args.check else WORKFLOWS)
        finally:
            server.stop()
    stale = []
    for name, wf in built.items():
        path = WORKFLOWS / f"{name}.json"
        same = path.is_file() and graph_essentials(json.loads(path.read_text(encoding="utf-8"))) == graph_essentials(wf)
        if not same:
            stale.append(path.name)
            if not args.check:
                path.write_text(dumps(wf), encoding="utf-8")
    verb = "out of date" if args.check else "written"
    print(f"{len(stale)} of {len(built)} workflows {verb}: {', '.join(stale) or '-'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
