"""The VLM-splice teacher (Z-Image) on the real ComfyUI in-process, with a tiny Qwen3-VL saved to disk.

The tiny Qwen3-VL has the tiny Z-Image text encoder's language-model shape (comfy_fixtures.TINY_QWEN3, head_dim 128
as ComfyUI's Qwen3_4BConfig fixes it) and a tiny random vision tower; its folder holds config.json,
preprocessor_config.json and a safetensors file with the model.visual.* tensors (plus one decoy language-model
tensor of a wrong shape, which must not be read)."""
import os
import types

import pytest
import torch

import comfy_fixtures as F
from nodes_support import executor_mode, images, start_job, wait_state

CAPTIONS = ["a photo of a cat", "a red [trigger] circle on a wooden table, soft light"]
# keep the tiny VLM's image small: 64x64 target -> 4x4 patches of 16 -> 2x2 merged = 4 image tokens
PIX = dict(min_pixels=32 * 32, max_pixels=64 * 64)


def vl_config(rope_theta=None, text_overrides=None):
    import comfy.text_encoders.llama
    from transformers import Qwen3VLConfig

    te = comfy.text_encoders.llama.Qwen3_4BConfig(**F.TINY_QWEN3)
    text = dict(hidden_size=te.hidden_size, intermediate_size=te.intermediate_size,
                num_hidden_layers=te.num_hidden_layers, num_attention_heads=te.num_attention_heads,
                num_key_value_heads=te.num_key_value_heads, head_dim=te.head_dim, vocab_size=te.vocab_size,
                rms_norm_eps=te.rms_norm_eps, max_position_embeddings=te.max_position_embeddings,
                # the real Qwen3-VL-4B: rope_theta 5e6, mrope_section [24, 20, 20] (sums to head_dim / 2)
                rope_parameters=dict(rope_type="default", rope_theta=rope_theta or te.rope_theta,
                                     mrope_section=[24, 20, 20], mrope_interleaved=True))
    text.update(text_overrides or {})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision)


def write_vl_folder(folder, config, seed=1):
    import json

    import safetensors.torch
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qvl

    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(str(folder))
    visual = qvl.Qwen3VLVisionModel._from_config(config.vision_config)
    sd = {"model.visual." + k: v for k, v in F.seeded_state_dict(visual, seed).items()}
    sd["model.language_model.embed_tokens.weight"] = torch.zeros(3, 5)  # decoy: reading it would break loading
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "image_processor_type": "Qwen2VLImageProcessor"}, f)
    return str(folder)


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, trainer_nodes, vlm_splice_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def V(pack):
    from comfyui_dopsd.nodes.comfy_bridge import vlm_splice
    return vlm_splice


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory):
    return write_vl_folder(tmp_path_factory.mktemp("qwen3vl") / "Qwen3-VL-tiny", vl_config())


@pytest.fixture(scope="module")
def dataset(N):
    with executor_mode():
        return N.dataset_nodes.DOPSDDatasetFromImages.execute(images(2, 64), "\n".join(CAPTIONS), "sks", 64)[0]


def run_node(N, dataset, clip, vae, folder, hidden_layer=-2, **pix):
    pix = dict(PIX, **pix)
    with executor_mode():
        return N.vlm_splice_nodes.DOPSDTeacherVLMSplice.execute(dataset, clip, vae, folder, hidden_layer,
                                                                pix["max_pixels"], pix["min_pixels"])


# -- (1) the splice is ComfyUI's own Z-Image encoder on text ----------------------------------------------------

def test_text_only_splice_equals_comfyui_zimage_encoding(V, vl_folder, tiny_zimage_clip):
    """With the VL rope equal to the text encoder's (MRoPE on text-only positions is 1-D RoPE), the spliced
    Qwen3-VL's hidden_states[-2] is ComfyUI's Z-Image conditioning of the same prompt, token for token."""
    splice, te = V.get_splice(tiny_zimage_clip, vl_folder)
    for caption in CAPTIONS:
        tokens = tiny_zimage_clip.tokenize(caption)
        ref = tiny_zimage_clip.encode_from_tokens_scheduled(tokens)
        with executor_mode():
            states, inputs = splice.hidden_states(te, caption)
            cond = splice.encode(te, caption, None, -2)
        assert inputs["input_ids"][0].tolist() == [t for t, _ in tokens["qwen3_4b"][0]]
        assert len(states) == F.TINY_QWEN3["num_hidden_layers"] + 1
        torch.testing.assert_close(states[-2], ref[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond[0][0], ref[0][0], atol=1e-5, rtol=1e-5)
        assert cond[0][1]["pooled_output"] is None
        assert torch.equal(cond[0][1]["attention_mask"], ref[0][1]["attention_mask"])


def test_official_rope_theta_makes_text_positions_differ(V, tmp_path, tiny_zimage_clip, vl_folder):
    """The real Qwen3-VL-4B config has rope_theta 5e6 (Qwen3-4B: 1e6). Like the official code, the splice keeps the
    VL config, so even caption tokens are encoded differently from the student's c_s: the equality above is a
    property of equal rope settings, not an accident."""
    folder = write_vl_folder(tmp_path / "vl_5e6", vl_config(rope_theta=5e6))
    splice, te = V.get_splice(tiny_zimage_clip, folder)
    ref = tiny_zimage_clip.encode_from_tokens_scheduled(tiny_zimage_clip.tokenize(CAPTIONS[1]))[0][0]
    with executor_mode():
        states, _ = splice.hidden_states(te, CAPTIONS[1])
    diff = (states[-2] - ref).abs().amax(dim=-1)[0]
    assert diff[0] < 1e-5  # position 0: no rotation under either theta
    assert diff[1:].max() > 1e-3
    V.get_splice(tiny_zimage_clip, vl_folder)  # put the module's splice back in the cache


def test_image_splice_equals_the_official_copy_loaded_qwen3vl(V, vl_folder, tiny_zimage_clip):
    """Reference built the official way: a transformers Qwen3VLModel whose language model is *copied* from the CLIP's
    state dict (load_state_dict, every key matched) and whose inputs come from Qwen3VLProcessor. The shared-module
    splice gives the same hidden states with an image (vision tower + DeepStack + 3-D MRoPE)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLModel, Qwen3VLProcessor, Qwen3VLVideoProcessor

    splice, te = V.get_splice(tiny_zimage_clip, vl_folder)
    config = splice.config
    ref_model = Qwen3VLModel(config).eval()
    clip_sd = te.llama.state_dict()
    res = ref_model.language_model.load_state_dict(clip_sd, strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"rotary_emb.inv_freq"}
    ref_model.visual.load_state_dict(splice.model.visual.state_dict())
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                              size={"shortest_edge": PIX["min_pixels"],
                                                    "longest_edge": PIX["max_pixels"]}),
        tokenizer=V.bundled_tokenizer(), video_processor=Qwen3VLVideoProcessor())
    image = images(1, 64, seed=5)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + CAPTIONS[0] + \
           "<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], images=[image[0].permute(2, 0, 1)], do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-2]
    with executor_mode():
        states, mine = splice.hidden_states(te, CAPTIONS[0], image, **PIX)
    assert mine["input_ids"].tolist() == inputs["input_ids"].tolist()
    torch.testing.assert_close(states[-2], ref, atol=1e-5, rtol=1e-5)


# -- (2) with an image: shape, length, and a real training job -------------------------------------------------

def test_node_pairs_with_image_drive_a_dopsd_job_on_tiny_zimage(N, V, dataset, vl_folder, tiny_zimage,
                                                                tiny_zimage_clip, tiny_flux_vae):
    pairs, student, teacher = run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, vl_folder)
    assert len(pairs) == 2 and student is pairs[0].student and teacher is pairs[0].teacher
    n_image = (64 // 16 // 2) ** 2  # 64x64 target at max 64x64 pixels: 4x4 patches, 2x2 merge
    for pair in pairs:
        s, t = pair.student[0][0], pair.teacher[0][0]
        assert t.shape[-1] == s.shape[-1] == F.TINY_ZIMAGE["cap_feat_dim"]
        assert t.shape[1] == s.shape[1] + n_image + 2  # the image tokens and <|vision_start|>/<|vision_end|>
        assert pair.teacher[0][1]["pooled_output"] is None
        assert pair.teacher[0][1]["attention_mask"].shape == (1, t.shape[1])
        assert torch.isfinite(t).all()
        assert pair.latent.shape == (1, 16, 8, 8)
    # the image tokens carry the image: another image changes the teacher but not the student
    other = [dict(d, image=torch.flip(d["image"], dims=[2])) for d in dataset]
    pairs2 = run_node(N, other, tiny_zimage_clip, tiny_flux_vae, vl_folder)[0]
    assert torch.equal(pairs2[0].student[0][0], pairs[0].student[0][0])
    assert not torch.allclose(pairs2[0].teacher[0][0], pairs[0].teacher[0][0])
    # a short D-OPSD job on the tiny Z-Image trains on these pairs to the end
    job, _ = start_job(N, tiny_zimage, pairs, steps=3, inference_steps=4, train_steps=2)
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    assert job.status()["step"] == 3 and all(loss > 0 for _, loss in job.status()["losses"])


# -- (3) no second copy of the LLM; cache ---------------------------------------------------------------------

def test_splice_shares_the_clip_weights_and_is_cached(N, V, dataset, vl_folder, tiny_zimage_clip, tiny_flux_vae):
    run_node(N, dataset[:1], tiny_zimage_clip, tiny_flux_vae, vl_folder)
    builds = V.build_count()
    splice, te = V.get_splice(tiny_zimage_clip, vl_folder)
    run_node(N, dataset[:1], tiny_zimage_clip, tiny_flux_vae, vl_folder)
    assert V.build_count() == builds and V.get_splice(tiny_zimage_clip, vl_folder)[0] is splice
    clip_params = {p.data_ptr(): n for n, p in te.llama.named_parameters()}
    with splice.bound(te) as model:
        lm_params = list(model.language_model.named_parameters())
        assert len(lm_params) == len(clip_params)  # every LLM tensor, and only those
        for name, p in lm_params:
            assert p.data_ptr() in clip_params, name
            assert clip_params[p.data_ptr()] == name.replace("embed_tokens.inner.", "embed_tokens.")
    # between encodes the splice holds no LLM tensor at all (meta skeleton) and no reference to the CLIP
    assert all(p.is_meta for p in splice.model.language_model.parameters())
    real = sum(p.numel() for p in splice.model.parameters() if not p.is_meta)
    assert real == sum(p.numel() for p in splice.model.visual.parameters())


# -- (4) errors that name the fix -----------------------------------------------------------------------------

def test_bad_inputs_name_the_fix(N, V, dataset, vl_folder, tmp_path, tiny_zimage_clip, tiny_flux_vae):
    node = N.vlm_splice_nodes.DOPSDTeacherVLMSplice
    with pytest.raises(ValueError, match="not found .*download Qwen/Qwen3-VL-4B-Instruct"):
        run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no config.json"):
        run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, str(tmp_path / "empty"))
    wide = write_vl_folder(tmp_path / "vl8b", vl_config(text_overrides=dict(hidden_size=128)))
    with pytest.raises(ValueError, match=r"hidden size 128 .*text encoder has 64.*Qwen3-VL of the same size"):
        run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, wide)
    deep = write_vl_folder(tmp_path / "vl4l", vl_config(text_overrides=dict(num_hidden_layers=4)))
    with pytest.raises(ValueError, match="num_hidden_layers 4 vs 3"):
        run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, deep)
    # a Qwen2.5-VL text encoder (Qwen-Image's, real ComfyUI class, built on the meta device)
    import comfy.text_encoders.qwen_image
    qwen25 = comfy.text_encoders.qwen_image.te()(device="meta", dtype=torch.float32,
                                                 model_options={"qwen25_7b_model_config": dict(F.TINY_QWEN3)})
    with pytest.raises(ValueError, match=r"Qwen25_7BVLI \(Qwen2.5-VL.*not Qwen3.*Native VLM"):
        run_node(N, dataset, types.SimpleNamespace(cond_stage_model=qwen25), tiny_flux_vae, vl_folder)
    with pytest.raises(ValueError, match="not a ComfyUI CLIP"):
        run_node(N, dataset, object(), tiny_flux_vae, vl_folder)
    for bad in (3 + 1, -(3 + 2)):
        with pytest.raises(ValueError, match=rf"hidden_layer {bad} is out of range.*-4\.\.3"):
            run_node(N, dataset, tiny_zimage_clip, tiny_flux_vae, vl_folder, hidden_layer=bad)
    assert "swap them" in node.validate_inputs(min_pixels=4096, max_pixels=1024)
    with pytest.raises(ValueError, match="dataset is empty"):
        run_node(N, [], tiny_zimage_clip, tiny_flux_vae, vl_folder)


def test_hidden_layer_picks_that_state_and_relative_folder_resolves(N, V, dataset, vl_folder, tiny_zimage_clip,
                                                                     tiny_flux_vae, monkeypatch):
    import folder_paths

    splice, te = V.get_splice(tiny_zimage_clip, vl_folder)
    with executor_mode():
        states, _ = splice.hidden_states(te, dataset[0]["caption"], dataset[0]["image"], **PIX)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([os.path.dirname(vl_folder)], set()))
    teacher = run_node(N, dataset[:1], tiny_zimage_clip, tiny_flux_vae, os.path.basename(vl_folder),
                       hidden_layer=1)[2]
    torch.testing.assert_close(teacher[0][0], states[1].float())
