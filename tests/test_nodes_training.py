"""The trainer node on the real ComfyUI (in-process): jobs, base weights, pause/stop/crash, LoRA nodes."""
import logging
import os

import pytest
import torch

import comfy_fixtures as F
from nodes_support import (encode, executor_mode, flux2_pairs, images, klein_clip,
                           lora_gradients_plain_and_checkpointed, param_hashes, same_weights, start_job, wait_state)


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, lora_nodes, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def flux2():
    with executor_mode():  # weights become inference tensors, as when a loader node made them
        return F.build_tiny_flux2(seed=0), F.build_tiny_flux2_vae(seed=0)


@pytest.fixture()
def loras_dir(tmp_path):
    import folder_paths
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], old[1])
    os.makedirs(tmp_path / "loras")
    yield tmp_path / "loras"
    folder_paths.folder_names_and_paths["loras"] = old


def _sample(model, cond, seed=3):
    import nodes as comfy_nodes
    latent = {"samples": torch.zeros(1, 128, 4, 4)}
    with executor_mode():
        return comfy_nodes.KSampler().sample(model, seed, 4, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]


def test_job_trains_in_background_and_leaves_base_weights_bit_identical(N, flux2):
    model, vae = flux2
    pairs = flux2_pairs(N, vae)
    before = param_hashes(model)
    job, handle = start_job(N, model, pairs, vae=vae, steps=5, preview_every=5)
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    st = job.status()
    assert st["step"] == 5 and len(st["losses"]) == 5 and all(l > 0 for _, l in st["losses"])
    assert st["previews"]["student"]["type"] == "temp" and st["previews"]["teacher"]["filename"].endswith(".png")
    assert same_weights(before, model)
    assert not model.model.diffusion_model.double_blocks[0].img_attn.qkv._forward_hooks  # hooks ejected
    # the snapshot changes what the ordinary KSampler produces
    cond = encode(klein_clip(), pairs[0].caption)
    base = _sample(model, cond)
    with executor_mode():
        patched = N.lora_nodes.DOPSDJobLoRA.execute(model, handle, 1.0, "student")[0]
    assert not torch.allclose(_sample(patched, cond), base)
    assert torch.equal(_sample(model, cond), base)


def test_saved_lora_loads_in_stock_loader_without_missing_keys(N, flux2, loras_dir, caplog):
    import nodes as comfy_nodes
    model, vae = flux2
    job, handle = start_job(N, model, flux2_pairs(N, vae), steps=3)
    wait_state(job, ("finished",))
    with executor_mode():
        path = N.lora_nodes.DOPSDSaveLoRA.execute(handle, "dopsd/test_lora", False, True)[0]
    assert os.path.isfile(path) and os.path.isdir(path[:-len(".safetensors")] + "_peft")
    with pytest.raises(FileExistsError, match="choose another filename or enable overwrite"):
        N.lora_nodes.DOPSDSaveLoRA.execute(handle, "dopsd/test_lora", False, False)
    assert "escapes" in N.lora_nodes.DOPSDSaveLoRA.validate_inputs("../../evil")
    cond = encode(klein_clip(), "a red sks circle")
    caplog.set_level(logging.WARNING)
    with executor_mode():
        loaded = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "dopsd/test_lora.safetensors", 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not torch.allclose(_sample(loaded, cond), _sample(model, cond))


def test_lora_for_another_model_is_rejected(N, flux2, loras_dir, tiny_zimage):
    model, vae = flux2
    job, handle = start_job(N, model, flux2_pairs(N, vae), steps=1)
    wait_state(job, ("finished",))
    with pytest.raises(ValueError, match="match no weight of this model"):
        N.lora_nodes.DOPSDJobLoRA.execute(tiny_zimage, handle, 1.0, "student")


def test_pause_resume_stop_with_save_writes_a_usable_lora(N, flux2, loras_dir):
    model, vae = flux2
    before = param_hashes(model)
    job, _ = start_job(N, model, flux2_pairs(N, vae), steps=10000, save_prefix="dopsd/stopped")
    wait_state(job, ("running",))
    job.pause()
    step = job.step
    import time
    time.sleep(0.5)
    assert job.state == "paused" and job.step <= step + 1
    job.resume()
    wait_state(job, ("running",))
    job.stop(save=True)
    assert wait_state(job, ("stopped", "error")) == "stopped", job.error
    assert job.lora_path and os.path.isfile(job.lora_path)
    from comfyui_dopsd.dopsd_core import lora_io
    sd, meta = lora_io.load_comfy_lora(job.lora_path)
    assert meta["dopsd.method"] == "dopsd" and int(meta["dopsd.steps"]) == job.step
    assert same_weights(before, model)
    with pytest.raises(RuntimeError, match="already ended"):
        job.stop()


def test_crash_mid_training_reports_error_and_keeps_base_and_checkpoint(N, flux2, loras_dir):
    model, vae = flux2
    before = param_hashes(model)
    job, _ = start_job(N, model, flux2_pairs(N, vae), steps=50, save_prefix="dopsd/crashy", save_every=2)

    def boom(j):
        if j.trainer.step == 3:
            raise RuntimeError("simulated GPU failure")
    job.test_hook = boom
    assert wait_state(job, ("error", "finished")) == "error"
    assert "simulated GPU failure" in job.status()["error"]
    assert same_weights(before, model)
    assert job.checkpoints and os.path.isfile(job.checkpoints[-1])
    with executor_mode():  # the last checkpoint is a usable LoRA
        patched = N.lora_nodes.apply_lora(model, __import__("comfy.utils").utils.load_torch_file(job.checkpoints[-1]),
                                          1.0, "checkpoint")
    assert patched is not model


def test_bad_inputs_name_the_fix(N, flux2, tiny_zimage, tiny_zimage_clip, tiny_flux_vae, tmp_path):
    import comfy.model_sampling
    model, vae = flux2
    pairs = flux2_pairs(N, vae)
    # non-flow model
    eps = tiny_zimage.clone()

    class EpsSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass
    eps.add_object_patch("model_sampling", EpsSampling())
    with pytest.raises(ValueError, match="eps/v-prediction"):
        start_job(N, eps, pairs)
    # teacher conditioning of the wrong width (Z-Image text encoder on a Flux2 model)
    ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(images(1), "a cat", "", 64)[0]
    with executor_mode():
        zpairs = N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, tiny_zimage_clip, tiny_flux_vae, "")[0]
    with pytest.raises(ValueError, match="width 64 but the model expects 192"):
        start_job(N, model, zpairs)
    # empty dataset, mismatched captions, unreadable image folder, text-only tokenizer as "VLM"
    with pytest.raises(ValueError, match="dataset is empty"):
        N.teacher_nodes.DOPSDTeacherReferenceLatent.execute([], klein_clip(), vae, "")
    with pytest.raises(ValueError, match="3 images but 2 caption lines"):
        N.dataset_nodes.DOPSDDatasetFromImages.execute(images(3), "a\nb", "", 64)
    with pytest.raises(ValueError, match="ignores images"):
        N.teacher_nodes.DOPSDTeacherNativeVLM.execute(ds, tiny_zimage_clip, tiny_flux_vae)
    with pytest.raises(KeyError, match="no D-OPSD job with id 'nope'"):
        N.lora_nodes.DOPSDJobLoRA.execute(model, {"job_id": "nope"}, 1.0, "student")
    assert "must divide" in N.trainer_nodes.DOPSDTrainer.validate_inputs("", 3, 8)


def test_dataset_folder_node(N, tmp_path):
    import folder_paths
    from PIL import Image
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        d = tmp_path / "set"
        d.mkdir()
        Image.new("RGB", (96, 64), (255, 0, 0)).save(d / "a.png")
        (d / "a.txt").write_text("a [trigger] square")
        assert N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("set") is True
        assert "escapes" in N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("../x")
        assert "does not exist" in N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("nope")
        ds = N.dataset_nodes.DOPSDDatasetFromFolder.execute("set", "sks", 64)[0]
        assert ds[0]["caption"] == "a sks square" and ds[0]["image"].shape[-1] == 3
        (d / "b.png").write_bytes(b"garbage")
        (d / "b.txt").write_text("x")
        with pytest.raises(ValueError, match="cannot read image .*b.png"):
            N.dataset_nodes.DOPSDDatasetFromFolder.execute("set", "", 64)
    finally:
        folder_paths.set_input_directory(old)


def test_teacher_preview_shows_student_teacher_target(N, flux2):
    model, vae = flux2
    pairs = flux2_pairs(N, vae)
    with executor_mode():
        grid = N.trainer_nodes.DOPSDTeacherPreview.execute(model, pairs, vae, 4, "auto", 0, 0)[0]
    assert grid.shape[0] == 3 and grid.shape[-1] == 3
    assert not torch.allclose(grid[0], grid[1])  # the reference latent changes the teacher's sample


def test_gradient_checkpointing_and_plain_blocks_give_the_same_gradient(N, flux2):
    """Both block guards (recompute in backward vs copies of saved activations) give the LoRA the same
    gradient through ComfyUI's sampling path, and it is not zero."""
    from comfyui_dopsd.nodes.pairs import detached_copy
    model, vae = flux2
    pair = detached_copy(flux2_pairs(N, vae))[0]
    noise = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    plain, ckpt = lora_gradients_plain_and_checkpointed(model, pair, noise)
    assert plain.abs().sum() > 0
    # Float reordering only. Measured on 0.33 with the real klein encoder's conditioning (512 tokens, |c| up to 20):
    # each mode is bit-reproducible, the two differ by at most 0.2 % of the largest gradient entry; a wrong gradient
    # (a detached block, a missing LoRA) differs by far more than 1 % of it.
    torch.testing.assert_close(plain, ckpt, rtol=1e-3, atol=1e-2 * plain.abs().max().item())


@pytest.fixture()
def output_dir(tmp_path):
    import folder_paths
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(old)


def test_resume_from_training_state_continues_and_bad_file_is_named(N, flux2, loras_dir, output_dir, tmp_path):
    model, vae = flux2
    pairs = flux2_pairs(N, vae)
    first, _ = start_job(N, model, pairs, steps=2, save_prefix="dopsd/resumable", save_every=2)
    assert wait_state(first, ("finished", "error")) == "finished", first.error
    state = os.path.join(first.job_dir, "training_state.pt")
    assert os.path.isfile(state)
    # resuming keeps the save_prefix whose earlier files (step 2) exist
    second, _ = start_job(N, model, pairs, steps=4, resume_from=state, save_prefix="dopsd/resumable", save_every=2)
    assert wait_state(second, ("finished", "error")) == "finished", second.error
    assert second.step == 4 and len(second.result.losses) == 4  # the trainer itself is released at the end
    assert second.warnings == [] and second.status()["warnings"] == []
    # another learning rate: the job trains on, and its status (the card) says it is no exact continuation
    changed, _ = start_job(N, model, pairs, steps=3, resume_from=state, learning_rate=5e-3)
    assert wait_state(changed, ("finished", "error")) == "finished", changed.error
    assert changed.status()["warnings"] == ["resuming with settings that differ from the checkpoint's: lr; the "
                                            "continuation will not match an uninterrupted run"]
    assert sorted(os.listdir(loras_dir / "dopsd")) == ["resumable_step00002.safetensors",
                                                       "resumable_step00004.safetensors"]
    bad = os.path.join(os.path.dirname(first.job_dir), "broken", "training_state.pt")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
        f.write(b"garbage")
    third, _ = start_job(N, model, pairs, steps=2, resume_from="broken")  # a job id names its training state
    assert wait_state(third, ("finished", "error")) == "error"
    assert "not a training_state.pt" in third.error
    outside = tmp_path / "not_a_state.pt"  # outside ComfyUI's folders: refused before a job starts
    outside.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a training state in output/dopsd_jobs or input"):
        start_job(N, model, pairs, steps=2, resume_from=str(outside))
