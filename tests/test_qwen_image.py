"""Qwen-Image on the real ComfyUI (in-process): the tiny model and Qwen2.5-VL encoder are the host's own classes,
the Native VLM teacher really sees the target image (the student does not), the family rules fit the model, and
the Reference Latent teacher (Qwen-Image-Edit's path) trains on it."""
import math

import pytest
import torch

import qwen_image_support as Q
from nodes_support import executor_mode, images, param_hashes, same_weights, start_job, wait_state

if not Q.has_qwen_image():  # both test hosts (0.3.75, 0.33) have it; older ComfyUI does not
    pytest.skip("needs host: ComfyUI with Qwen-Image (>= 0.3.49)", allow_module_level=True)


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def qwen():
    with executor_mode():  # weights become inference tensors, as when loader nodes made them
        return Q.tiny_set(seed=0)


def _dataset(N, imgs, captions="a red [trigger] circle"):
    with executor_mode():
        return N.dataset_nodes.DOPSDDatasetFromImages.execute(imgs, captions, "sks", 64)[0]


def _native_pairs(N, qwen, imgs, captions="a red [trigger] circle"):
    _, clip, vae = qwen
    with executor_mode():
        return N.teacher_nodes.DOPSDTeacherNativeVLM.execute(_dataset(N, imgs, captions), clip, vae)[0]


def test_tiny_models_are_the_hosts_qwen_image_classes(qwen):
    import comfy.ldm.qwen_image.model
    import comfy.ldm.wan.vae
    import comfy.model_base
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.qwen_vl

    model, clip, vae = qwen
    assert isinstance(model.model, comfy.model_base.QwenImage)
    assert isinstance(model.model.diffusion_model, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel)
    assert isinstance(clip.tokenizer, comfy.text_encoders.qwen_image.QwenImageTokenizer)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.qwen_image.QwenImageTEModel)
    visual = clip.cond_stage_model.qwen25_7b.transformer.visual
    assert isinstance(visual, comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer)
    assert visual.hidden_size == Q.QWEN_VL_VISION["hidden_size"] and len(visual.blocks) == 2
    assert isinstance(vae.first_stage_model, comfy.ldm.wan.vae.WanVAE) and vae.latent_channels == 16
    # the patch that shrinks the vision tower is gone outside its `with` block: the stock size comes back
    assert getattr(Q._vision, "sizes", None) is None


def test_native_vlm_teacher_sees_the_target_image_and_the_student_does_not(N, qwen):
    a, b = images(2, seed=0), images(2, seed=1)
    pairs_a, pairs_b = _native_pairs(N, qwen, a[:1]), _native_pairs(N, qwen, b[:1])
    pa, pb = pairs_a[0], pairs_b[0]
    assert pa.latent.shape == (1, 16, 1, 8, 8)  # Wan 2.1 latents: 5-D, 16 channels, 1/8
    assert pa.student[0][0].shape[-1] == Q.QWEN_TE_HIDDEN
    assert torch.equal(pa.student[0][0], pb.student[0][0]), "the student sees the caption only"
    ta, tb = pa.teacher[0][0], pb.teacher[0][0]
    assert ta.shape == tb.shape and ta.shape[1] > pa.student[0][0].shape[1]  # image tokens in the teacher's prompt
    assert (ta - tb).abs().max() > 1e-3, "another target image must give another teacher conditioning"
    # the same image again gives the same teacher (deterministic), so the difference above is the image's
    assert torch.equal(_native_pairs(N, qwen, a[:1])[0].teacher[0][0], ta)


def test_native_vlm_teacher_refuses_a_text_only_encoder(N, qwen, tmp_path):
    import comfy_fixtures as F
    clip = F.load_tiny_zimage_clip(F.save_state_dict(tmp_path / "te.safetensors", F.qwen3_state_dict()))
    with executor_mode(), pytest.raises(ValueError, match="ignores images"):
        N.teacher_nodes.DOPSDTeacherNativeVLM.execute(_dataset(N, images(1)), clip, qwen[2])


def test_family_rules_fit_qwen_image(N, qwen):
    from comfyui_dopsd.nodes.comfy_bridge import families, lora_patch

    model = qwen[0]
    assert families.family(model) == "qwenimage" and families.default_schedule(model) == "simple"
    assert families.hidden_width(model) == 2 * 32  # heads x head_dim (inner_dim), not in the detected config
    latent = _native_pairs(N, qwen, images(1))[0].latent
    assert families.pixels_per_latent(latent) == 8
    net = lora_patch.build_network(model.clone(), 4, 4.0, "auto", 0.0, 0.9, False, 0)
    names = sorted(net.names)
    per_block = {n.split(".", 2)[2] for n in names}
    assert per_block == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                         "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                         "txt_mlp.net.0.proj", "txt_mlp.net.2"}
    assert len(names) == 12 * Q.TINY_QWEN_IMAGE["num_layers"]


def test_reference_latent_teacher_trains_qwen_image_edit_style(N, qwen):
    """Qwen-Image-Edit's path: model_base.QwenImage turns reference_latents into ref_latents on both hosts."""
    model, clip, vae = qwen
    with executor_mode():
        pairs = N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(_dataset(N, images(1)), clip, vae, "")[0]
    assert N.teacher_nodes.model_sees_reference_latents(model, pairs[0].teacher, pairs[0].latent) is True
    before = param_hashes(model)
    job, _ = start_job(N, model, pairs, vae=vae, steps=2, inference_steps=4, train_steps=4)
    assert wait_state(job, ("finished", "error"), timeout=120) == "finished", job.error
    losses = [l for _, l in job.status()["losses"]]
    assert len(losses) == 2 and all(math.isfinite(l) and l > 0 for l in losses)
    assert same_weights(before, model)


def test_teacher_preview_decodes_qwen_image_latents(N, qwen):
    """Wan 2.1 latents are 5-D: the preview must give IMAGE frames [3, H, W, 3] (student | teacher | target)."""
    model, _, vae = qwen
    pairs = _native_pairs(N, qwen, images(1))
    with executor_mode():
        out = N.trainer_nodes.DOPSDTeacherPreview.execute(model, pairs, vae, 4, "auto", 0, 0)[0]
    assert out.shape == (3, 64, 64, 3) and torch.isfinite(out).all()


def test_the_shipped_workflows_shape_trains_fp8_base_plus_lightning_lora(N, qwen):
    """What the shipped workflow loads: fp8 (e4m3fn) Qwen-Image weights, a few-step LoRA patched on by
    LoraLoaderModelOnly, the Native VLM teacher. The job trains; once ComfyUI unpatches, the fp8 bytes are as before."""
    import comfy.model_management as mm
    import comfy.sd

    _, clip, vae = qwen
    base = Q.build_tiny_qwen_image_fp8(seed=0)
    assert {p.dtype for p in base.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with executor_mode():
        lightning, _ = comfy.sd.load_lora_for_models(base, None, Q.lightning_lora_state_dict(), 1.0, 0)
    assert len(lightning.patches) == 28  # 12 trained Linears + img_mod / txt_mod per block
    job, _ = start_job(N, lightning, _native_pairs(N, qwen, images(1)), vae=vae, steps=2, inference_steps=8,
                       train_steps=4, precision="bf16")
    assert wait_state(job, ("finished", "error", "stopped"), timeout=180) == "finished", job.error
    losses = [loss for _, loss in job.status()["losses"]]
    assert len(losses) == 2 and all(math.isfinite(l) and l > 0 for l in losses)
    assert any(v.abs().max() > 0 for k, v in job.lora_state_dict().items() if "lora_up" in k)
    mm.unload_all_models()  # ComfyUI patches LoRAs into the weights while loaded and restores them on unload
    after = base.model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
