"""Files the pack reads and writes (in-process, real ComfyUI): adapters of every format ComfyUI loads are
checked key by key, paths stay inside ComfyUI's folders, temp files stay hidden, and inputs that would
train nothing (a teacher the model cannot see, NaN settings, the toy world at 512) are refused."""
import logging
import math
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import comfy_fixtures as F
from nodes_support import executor_mode, flux2_pairs, start_job, wait_state


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, lora_nodes, teacher_nodes, toyworld_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def flux2():
    with executor_mode():
        return F.build_tiny_flux2(seed=0), F.build_tiny_flux2_vae(seed=0)


@pytest.fixture()
def comfy_dirs(tmp_path):
    """models/loras, input and output in a temporary ComfyUI base folder."""
    import folder_paths
    old_loras = folder_paths.folder_names_and_paths["loras"]
    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    base = tmp_path / "comfy"
    for sub in ("models/loras", "input", "output"):
        (base / sub).mkdir(parents=True)
    folder_paths.folder_names_and_paths["loras"] = ([str(base / "models/loras")], old_loras[1])
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    yield base
    folder_paths.folder_names_and_paths["loras"] = old_loras
    folder_paths.set_input_directory(old_in)
    folder_paths.set_output_directory(old_out)


# -- adapters: every key ComfyUI does not load is counted and refused, its own warnings kept ---------------

def _qkv(model):
    w = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    return "diffusion_model.double_blocks.0.img_attn.qkv", w.shape


def _formats(name, shape):
    out_f, in_f = shape
    r = 2
    return {
        "LoRA (kohya)": {f"{name}.lora_up.weight": torch.zeros(out_f, r), f"{name}.lora_down.weight": torch.zeros(r, in_f),
                         f"{name}.alpha": torch.tensor(2.0)},
        "LoRA (.lora.up)": {f"{name}.lora.up.weight": torch.zeros(out_f, r), f"{name}.lora.down.weight": torch.zeros(r, in_f)},
        "LoHa": {f"{name}.hada_w1_a": torch.zeros(out_f, r), f"{name}.hada_w1_b": torch.zeros(r, in_f),
                 f"{name}.hada_w2_a": torch.zeros(out_f, r), f"{name}.hada_w2_b": torch.zeros(r, in_f)},
        "LoKr": {f"{name}.lokr_w1": torch.zeros(2, 2), f"{name}.lokr_w2": torch.zeros(out_f // 2, in_f // 2)},
        "OFT": {f"{name}.oft_blocks": torch.zeros(4, in_f // 4, in_f // 4)},
    }


def test_unmatched_adapter_keys_are_counted_for_every_format(N, flux2, caplog):
    model, _ = flux2
    name, shape = _qkv(model)
    caplog.set_level(logging.WARNING)
    for fmt, good in _formats(name, shape).items():
        with executor_mode():
            N.lora_nodes.apply_lora(model, good, 1.0, fmt)  # a file that fully matches loads
        bogus = {k.replace(name, "diffusion_model.not_in_this_model"): v for k, v in good.items()}
        caplog.clear()
        with pytest.raises(ValueError, match=rf"{len(bogus)} of {len(good) + len(bogus)} keys match no weight"):
            N.lora_nodes.apply_lora(model, {**good, **bogus}, 1.0, fmt)
        not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
        assert len(not_loaded) == len(bogus), f"{fmt}: ComfyUI's own warnings stay on"
        # also counted when the log level hides warnings
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR
        try:
            with pytest.raises(ValueError, match=rf"{len(bogus)} of {len(good) + len(bogus)} keys match no weight"):
                N.lora_nodes.apply_lora(model, {**good, **bogus}, 1.0, fmt)
        finally:
            root.level = level


def test_apply_lora_file_refuses_a_half_matching_lokr(N, flux2, comfy_dirs):
    model, _ = flux2
    name, shape = _qkv(model)
    lokr = _formats(name, shape)["LoKr"]
    lokr.update({"diffusion_model.unknown_block.lokr_w1": torch.zeros(2, 2),
                 "diffusion_model.unknown_block.lokr_w2": torch.zeros(2, 2)})
    save_file(lokr, str(comfy_dirs / "models/loras/half.safetensors"))
    with pytest.raises(ValueError, match="half.safetensors: 2 of 4 keys match no weight"):
        N.lora_nodes.DOPSDApplyLoRAFile.execute(model, "half.safetensors", 1.0)


# -- saving: inside models/loras, hidden temp files, normal file mode ---------------------------------------

@pytest.fixture(scope="module")
def finished_job(N, flux2):
    model, vae = flux2
    job, handle = start_job(N, model, flux2_pairs(N, vae), steps=1)
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    return handle


def test_save_lora_peft_folder_never_writes_through_a_link_out(N, finished_job, comfy_dirs, tmp_path):
    loras = comfy_dirs / "models/loras"
    outside = tmp_path / "outside"
    outside.mkdir()
    (loras / "dopsd").mkdir()
    os.symlink(outside, loras / "dopsd" / "mine_peft")
    msg = N.lora_nodes.DOPSDSaveLoRA.validate_inputs("dopsd/mine", True)
    assert "link to a place outside" in msg
    with executor_mode(), pytest.raises(ValueError, match="link to a place outside"):
        N.lora_nodes.DOPSDSaveLoRA.execute(finished_job, "dopsd/mine", False, True)
    assert not os.listdir(outside) and not (loras / "dopsd" / "mine.safetensors").exists()
    os.symlink(outside / "x.safetensors", loras / "dopsd" / "linked.safetensors")
    assert "link to a place outside" in N.lora_nodes.DOPSDSaveLoRA.validate_inputs("dopsd/linked", False)
    # a plain name works, with the PEFT folder beside it
    with executor_mode():
        path = N.lora_nodes.DOPSDSaveLoRA.execute(finished_job, "dopsd/plain", False, True)[0]
    assert os.path.isfile(path) and os.path.isfile(loras / "dopsd" / "plain_peft" / "adapter_model.safetensors")


def test_temp_files_are_hidden_from_comfyui_cleaned_when_stale_and_saved_files_get_the_umask(N, comfy_dirs):
    import folder_paths
    from comfyui_dopsd.dopsd_core import checkpoint, lora_io
    loras = comfy_dirs / "models/loras"
    stale_old = loras / ".tmp-abc123.safetensors"  # what a crash of an earlier version left
    stale_new = loras / ".x.safetensors.deadbeef.dopsd-tmp"
    fresh = loras / ".y.safetensors.cafecafe.dopsd-tmp"  # another save in progress: kept
    for p in (stale_old, stale_new, fresh):
        p.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    for p in (stale_old, stale_new):
        os.utime(p, (two_hours_ago, two_hours_ago))
    seen = {}

    def write(tmp):
        seen["tmp"] = tmp
        seen["listed"] = folder_paths.get_filename_list("loras")
        save_file({"diffusion_model.a.lora_up.weight": torch.zeros(1, 1)}, tmp)

    old_umask = os.umask(0o022)
    try:
        checkpoint.atomic_write(str(loras / "ok.safetensors"), write)
        lora_io.save_comfy_lora(str(loras / "ok2.safetensors"), {"a.lora_up.weight": torch.zeros(1, 1)})
    finally:
        os.umask(old_umask)
    assert os.path.basename(seen["tmp"]).startswith(".")
    assert not [n for n in seen["listed"] if "tmp" in n], seen["listed"]
    assert not stale_old.exists() and not stale_new.exists() and fresh.exists()
    for name in ("ok.safetensors", "ok2.safetensors"):
        assert os.stat(loras / name).st_mode & 0o777 == 0o644
    assert folder_paths.get_filename_list("loras") == ["ok.safetensors", "ok2.safetensors"]
    # at startup the pack cleans what a crash left in any models/loras subfolder
    (loras / "dopsd").mkdir()
    crashed = loras / "dopsd" / ".tmp-0123.safetensors"
    crashed.write_bytes(b"")
    os.utime(crashed, (two_hours_ago, two_hours_ago))
    N.lora_nodes.clean_stale_temps()
    assert not crashed.exists() and fresh.exists()


# -- reading: Import PEFT and resume_from only inside ComfyUI's folders ---------------------------------------

def _adapter(folder):
    import json
    folder.mkdir(parents=True)
    save_file({"base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(4, 2)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))


def test_import_peft_lists_and_reads_only_comfyui_folders(N, comfy_dirs, tmp_path):
    _adapter(comfy_dirs / "models/loras" / "official" / "student")
    _adapter(comfy_dirs / "input" / "uploaded")
    _adapter(tmp_path / "secret")
    os.symlink(tmp_path / "secret", comfy_dirs / "models/loras" / "linked")
    assert N.lora_nodes.peft_adapters() == ["official/student", "uploaded [input]"]
    options = N.lora_nodes.DOPSDImportPEFT.define_schema().inputs[1].options
    assert options == ["official/student", "uploaded [input]"]  # a pickable list, as LoraLoader's
    assert N.lora_nodes.resolve_peft("uploaded [input]") == str(comfy_dirs / "input" / "uploaded")
    messages = set()
    for name in (str(tmp_path / "secret"), "../../secret", "linked", str(tmp_path / "nothing"), "../../nothing",
                 "nothing"):
        with pytest.raises(ValueError, match="is not among the adapters in models/loras, input or output") as e:
            N.lora_nodes.resolve_peft(name)
        messages.add(str(e.value).replace(repr(name), "NAME"))
    assert len(messages) == 1, messages  # the same words whether or not something exists outside


def test_resume_from_is_confined_and_keeps_the_save_prefix(N, comfy_dirs, tmp_path):
    from comfyui_dopsd.nodes.paths import resume_path
    job = comfy_dirs / "output" / "dopsd_jobs" / "abc123"
    job.mkdir(parents=True)
    (job / "training_state.pt").write_bytes(b"x")
    assert resume_path("abc123") == str(job / "training_state.pt")
    assert resume_path("abc123/training_state.pt") == str(job / "training_state.pt")
    assert resume_path(str(job / "training_state.pt")) == str(job / "training_state.pt")
    (tmp_path / "outside.pt").write_bytes(b"x")
    os.symlink(tmp_path / "outside.pt", job / "link.pt")
    validate = N.trainer_nodes.DOPSDTrainer.validate_inputs
    messages = set()
    for name in (str(tmp_path / "outside.pt"), "../../../outside.pt", "abc123/link.pt", str(tmp_path / "none.pt"),
                 "none"):
        msg = validate("", 4, 8, resume_from=name)
        assert "not a training state in output/dopsd_jobs or input" in msg
        messages.add(msg.replace(repr(name), "NAME"))
    assert len(messages) == 1
    (comfy_dirs / "models/loras" / "dopsd").mkdir()
    (comfy_dirs / "models/loras" / "dopsd" / "run_step00002.safetensors").write_bytes(b"x")
    assert "already exist" in validate("dopsd/run", 4, 8)
    assert validate("dopsd/run", 4, 8, resume_from="abc123") is True  # resuming keeps its save_prefix


def test_nan_settings_are_refused_at_validation(N):
    validate = N.trainer_nodes.DOPSDTrainer.validate_inputs
    assert validate("", 4, 8) is True
    for name in ("ema_decay", "alpha", "grad_clip", "learning_rate"):
        msg = validate("", 4, 8, **{name: math.nan})
        assert msg == f"{name} is nan: give a number"


# -- a teacher the model cannot see ---------------------------------------------------------------------------

def test_reference_latent_teacher_on_a_model_that_ignores_it(N, tiny_zimage, tiny_zimage_clip, tiny_flux_vae, flux2):
    """Z-Image on ComfyUI 0.3.75 drops reference_latents: refused before training (0.33 feeds them to its
    omni path, so there it is accepted). FLUX.2 reads them: accepted."""
    ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(torch.rand(1, 64, 64, 3), "a cat", "", 64)[0]
    with executor_mode():
        zpairs = N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, tiny_zimage_clip, tiny_flux_vae, "")[0]
    sees = N.teacher_nodes.model_sees_reference_latents(tiny_zimage, zpairs[0].teacher, zpairs[0].latent)
    import comfy.model_base
    import inspect
    assert sees == ("reference_latents" in inspect.getsource(comfy.model_base.Lumina2.extra_conds))
    if not sees:
        with pytest.raises(ValueError, match="ignores reference latents.*VLM Splice"):
            start_job(N, tiny_zimage, zpairs)
        with pytest.raises(ValueError, match="ignores reference latents"), executor_mode():
            N.trainer_nodes.DOPSDTeacherPreview.execute(tiny_zimage, zpairs, tiny_flux_vae, 2, "auto", 0, 0)
    model, vae = flux2
    pairs = flux2_pairs(N, vae)
    assert N.teacher_nodes.model_sees_reference_latents(model, pairs[0].teacher, pairs[0].latent) is True


def test_job_whose_teacher_equals_its_student_stops_with_the_reason(N, flux2):
    from comfyui_dopsd.nodes.pairs import Pair
    model, vae = flux2
    blind = [Pair(p.caption, p.student, p.student, p.latent, p.image) for p in flux2_pairs(N, vae)]
    job, _ = start_job(N, model, blind, steps=20)
    assert wait_state(job, ("finished", "error")) == "error"
    assert "identical for the first 3 steps" in job.error and job.step == 3
    from comfyui_dopsd.nodes.comfy_bridge.training import refuse_blind_teacher
    refuse_blind_teacher("sft", [[1, 0.0], [2, 0.0], [3, 0.0]])  # sft has no teacher
    refuse_blind_teacher("dopsd", [[1, 0.0], [2, 1e-9], [3, 0.0]])


def test_toy_world_at_another_resolution_says_32(N):
    with executor_mode():
        model, clip, vae = N.toyworld_nodes.DOPSDToyWorldLoader.execute(False).result
        images, captions, _ = N.toyworld_nodes.DOPSDToyWorldConcept.execute("colour", 2, 1, 0).result
        ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(images, captions, "sks", 512)[0]
        with pytest.raises(ValueError, match="32x32 pixels, but the teacher's encoder got 512x512: set the D-OPSD "
                                             "Dataset node's resolution to 32"):
            N.teacher_nodes.DOPSDTeacherNativeVLM.execute(ds, clip, vae)
        with pytest.raises(ValueError, match="resolution to 32"):
            N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, clip, vae, "")
