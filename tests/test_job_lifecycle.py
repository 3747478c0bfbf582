"""Issue 12, in-process on ComfyUI's tiny Z-Image: what a job asks of ComfyUI's memory manager, what it keeps
after it ends, how it survives an unload in the middle of a step, and how it stops when the model is gone."""
import gc
import logging
import weakref

import pytest
import torch

import comfy_fixtures as F
from nodes_support import executor_mode, lora_gradients_plain_and_checkpointed, start_job, wait_state


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, lora_nodes, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def zimage(tiny_zimage_clip, tiny_flux_vae):
    with executor_mode():
        return F.build_tiny_zimage(seed=0), tiny_zimage_clip, tiny_flux_vae


@pytest.fixture()
def pairs(N, zimage):
    _, clip, vae = zimage
    with executor_mode():
        images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(images, "a [trigger] cat", "sks", 64)[0]
        # a prefix: Z-Image on 0.3.75 ignores reference latents, and a teacher that equals the student is refused
        return N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, clip, vae, "as in the image:")[0]


@pytest.fixture()
def loras_dir(tmp_path):
    import folder_paths
    old = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], old[1])
    (tmp_path / "loras").mkdir()
    yield tmp_path / "loras"
    folder_paths.folder_names_and_paths["loras"] = old


def test_training_memory_is_passed_to_load_models_gpu(N, zimage, pairs, monkeypatch):
    import comfy.model_management as mm
    model, _, _ = zimage
    calls = []
    original = mm.load_models_gpu

    def recording(models, memory_required=0, *args, **kwargs):
        calls.append((models, memory_required, kwargs.get("minimum_memory_required")))
        return original(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", recording)
    job, _ = start_job(N, model, pairs, steps=1)
    job.use_turns = False
    net = job.net
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    # the figure, by hand from the tiny config: 64 px -> 8x8 latent, patch 2 -> 16 tokens, plus the longest
    # conditioning; width 256; 4 top-level blocks (2 layers + 2 refiners); fp32; no checkpointing
    cfg = F.TINY_ZIMAGE
    cond = max(pairs[0].student[0][0].shape[1], pairs[0].teacher[0][0].shape[1])
    tokens = (8 // cfg["patch_size"]) ** 2 + cond
    blocks = cfg["n_layers"] + 2 * cfg["n_refiner_layers"]
    from comfyui_dopsd.nodes.comfy_bridge import memory
    activations = blocks * memory.ACTIVATIONS_PER_BLOCK * tokens * cfg["dim"] * 4
    lora = sum(p.numel() for p in net.trainable_parameters()) * 4 * 5
    inference = model.model.memory_required([1, 16, 8, 8])
    expected = int(inference + activations + lora)
    training_calls = [c for c in calls if c[1] == expected and c[2] == expected]
    assert training_calls, f"no load_models_gpu call asked for {expected} bytes: {[c[1:] for c in calls]}"
    assert expected > inference + activations > inference


def test_finished_job_releases_model_optimizer_latents_and_keeps_a_bounded_history(N, zimage, pairs, monkeypatch):
    model, _, _ = zimage
    monkeypatch.setattr(N.jobs, "MAX_ENDED_JOBS", 2)
    job, handle = start_job(N, model, pairs, steps=4)
    job.use_turns = False
    refs = {}
    job.test_hook = lambda j: refs.setdefault("optimizer", weakref.ref(j.trainer.optimizer))
    wait_state(job, ("finished", "error"))
    assert job.wait(30) and job.state == "finished", job.error
    assert job.model is None and job.trainer is None and job.pairs is None and job.pairs_in is None
    gc.collect()
    assert refs["optimizer"]() is None, "the optimizer state must be freed when the job ends"
    assert all(p.device.type == "cpu" for p in job.net.trainable_parameters())
    with executor_mode():  # the LoRA stays usable after the job ended
        patched = N.lora_nodes.DOPSDJobLoRA.execute(model, handle, 1.0, "student")[0]
    assert patched is not model
    later = []
    for _ in range(2):
        j, _ = start_job(N, model, pairs, steps=1)
        j.use_turns = False
        j.wait(60)
        later.append(j.job_id)
    known = [j.job_id for j in N.jobs.all_jobs()]
    assert job.job_id not in known and all(i in known for i in later)
    assert job.status()["state"] == "finished"


def test_unload_in_the_middle_of_a_step_is_retried_and_the_job_finishes(N, zimage, pairs, caplog):
    import comfy.model_management as mm
    model, _, _ = zimage
    job, _ = start_job(N, model, pairs, steps=3)
    job.use_turns = False
    block = model.model.diffusion_model.layers[0]
    fired = []

    def unload_once(module, args):  # another thread unloading while the step's forwards run
        if job.step == 1 and not fired and torch.is_grad_enabled():
            fired.append(True)
            mm.unload_all_models()

    hook = block.register_forward_pre_hook(unload_once)
    try:
        with caplog.at_level(logging.WARNING):
            state = wait_state(job, ("finished", "error", "stopped"))
    finally:
        hook.remove()
    assert fired and state == "finished" and job.error is None, job.error
    assert job.step == 3 and "unloaded during a training step" in caplog.text


def test_model_gone_for_good_stops_the_job_with_its_lora_saved_and_a_reason(N, zimage, pairs, loras_dir, monkeypatch):
    from comfyui_dopsd.nodes.comfy_bridge import memory
    model, _, _ = zimage
    original = memory.load_for_training
    job_holder = {}

    def load(m, memory):
        job = job_holder.get("job")
        if job is not None and job.step >= 2:
            raise RuntimeError("weights were freed")
        return original(m, memory)

    monkeypatch.setattr(memory, "load_for_training", load)
    job, _ = start_job(N, model, pairs, steps=50, save_prefix="gone/lora")
    job_holder["job"] = job
    job.use_turns = False
    assert wait_state(job, ("finished", "error", "stopped")) == "stopped"
    assert "could not load the model" in job.error and "weights were freed" in job.error
    assert (loras_dir / "gone" / "lora_step00002.safetensors").is_file() and job.step == 2
    assert "lora_step00002" in job.error


def test_waiting_to_running_sends_a_state_event_and_a_crash_logs_its_traceback(N, zimage, pairs, monkeypatch, caplog):
    model, _, _ = zimage
    sent = []
    monkeypatch.setattr(N.events, "send", lambda event, data: sent.append((event, dict(data))))
    job, _ = start_job(N, model, pairs, steps=2)
    job.use_turns = False
    wait_state(job, ("finished", "error"))
    kinds = [(e, d["state"]) for e, d in sent if e in ("dopsd.state", "dopsd.progress")]
    assert ("dopsd.state", "running") in kinds, kinds
    assert kinds.index(("dopsd.state", "running")) < kinds.index(("dopsd.progress", "running")), kinds

    def boom(j):
        if j.trainer.step == 1:
            raise RuntimeError("simulated crash")

    job, _ = start_job(N, model, pairs, steps=5)
    job.use_turns = False
    job.test_hook = boom
    with caplog.at_level(logging.ERROR):
        assert wait_state(job, ("error", "finished")) == "error"
        job.wait(30)
    assert "Traceback" in caplog.text and "simulated crash" in caplog.text and job.job_id in caplog.text


def test_block_guard_copies_activations_only_for_in_place_blocks_and_zimage_needs_none(N, zimage, pairs):
    """Z-Image's blocks never modify their inputs: without checkpointing they run unguarded (no activation
    copies) and still give the LoRA the same gradient as recomputation; Flux2's in-place blocks are guarded."""
    from comfyui_dopsd.nodes.comfy_bridge import blocks
    from comfyui_dopsd.nodes.pairs import detached_copy
    model, _, _ = zimage
    with executor_mode():
        flux2 = F.build_tiny_flux2(seed=0)
    guard = blocks.guard_blocks(flux2, None, False)
    assert len(guard.modules) == len(blocks.top_level_blocks(flux2)) > 0
    guard.remove()
    guard = blocks.guard_blocks(model, None, False)
    assert guard.modules == [] and len(blocks.top_level_blocks(model)) == 4
    guard.remove()

    pair = detached_copy(pairs)[0]
    noise = torch.randn(pair.latent.shape, generator=torch.Generator().manual_seed(0))
    plain, ckpt = lora_gradients_plain_and_checkpointed(model, pair, noise)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(plain, ckpt, rtol=1e-3, atol=1e-6)


def test_cancel_while_a_prompt_waits_for_the_step_reaches_that_prompt_and_not_the_job(N):
    """The job's ops neither raise nor clear ComfyUI's interrupt flag; a Cancel pressed while the prompt
    waits for the step in flight survives the executor's reset and interrupts that prompt."""
    import queue
    import threading
    import time

    import comfy.model_management as mm
    import nodes as comfy_nodes
    from comfyui_dopsd.nodes.comfy_bridge import interrupts, turns

    class Queue:
        def __init__(self):
            self.q = queue.Queue()

        def get(self, timeout=None):
            try:
                return self.q.get(timeout=timeout)
            except queue.Empty:
                return None

    turn, fake, saved = turns.ModelTurn(), Queue(), turns._installed_on
    turns._installed_on = None
    turns.install_on_queue(fake, turn, currently_in_prompt=False)
    stepping, release, seen = threading.Event(), threading.Event(), {}

    def training_step():
        with interrupts.shielded(), turn.trainer_step():
            stepping.set()
            release.wait(10)
            mm.throw_exception_if_processing_interrupted()  # what every comfy op does inside the step
            seen["job_saw_flag"] = mm.processing_interrupted()

    job = threading.Thread(target=training_step)
    job.start()
    stepping.wait(10)
    fake.q.put("prompt")
    worker = threading.Thread(target=lambda: seen.setdefault("item", fake.get(timeout=10)))
    worker.start()
    try:
        time.sleep(0.2)
        assert "item" not in seen, "the prompt must wait for the step in flight"
        comfy_nodes.interrupt_processing(True)  # the user's Cancel, for that prompt
        release.set()
        job.join(10)
        worker.join(10)
        assert seen["item"] == "prompt" and seen["job_saw_flag"] is False
        comfy_nodes.interrupt_processing(False)  # the executor's reset when the prompt starts
        with pytest.raises(mm.InterruptProcessingException):
            mm.throw_exception_if_processing_interrupted()  # the prompt's first node
    finally:
        comfy_nodes.interrupt_processing(False)
        release.set()
        turn.worker_release()
        turns._installed_on = saved


def test_family_rules_in_one_module(N, zimage):
    from comfyui_dopsd.nodes.comfy_bridge import families, lora_patch
    model, _, _ = zimage
    with executor_mode():
        flux2 = F.build_tiny_flux2(seed=0)
    assert families.family(model) == "zimage" and families.family(flux2) == "flux2"
    assert families.default_schedule(model) == "simple" and families.default_schedule(flux2) == "flux2"
    assert lora_patch.default_targets(model) == families.TARGETS["zimage"]
    assert lora_patch.default_targets(flux2) == families.TARGETS["flux"]
    assert families.hidden_width(model) == F.TINY_ZIMAGE["dim"]
    assert families.hidden_width(flux2) == F.TINY_FLUX2["hidden_size"]
    assert families.pixels_per_latent(torch.zeros(1, 128, 4, 4)) == 16
    assert families.pixels_per_latent(torch.zeros(1, 16, 8, 8)) == 8


def test_schedule_rules_live_only_in_families(N, zimage):
    """The few-step schedule node and the trainer take 'auto' from families.py (issue 12: schedule_nodes.py had its
    own is_flux2); no other module under nodes/ tells FLUX.2 apart."""
    import pathlib

    from comfyui_dopsd.nodes import schedule_nodes, trainer_nodes
    from comfyui_dopsd.nodes.comfy_bridge import families
    model, _, _ = zimage
    with executor_mode():
        flux2 = F.build_tiny_flux2(seed=0)
    for m, latent in ((model, torch.zeros(1, 16, 8, 8)), (flux2, torch.zeros(1, 128, 4, 4))):
        node = schedule_nodes.DOPSDFewStepSigmas.execute(m, 4, "auto", 64, 64)[0]
        torch.testing.assert_close(node, trainer_nodes.inference_sigmas(m, 4, "auto", latent))
        torch.testing.assert_close(node, families.sampling_sigmas(m, 4, families.default_schedule(m), 64, 64))
    flux2_node = schedule_nodes.DOPSDFewStepSigmas.execute(flux2, 4, "auto", 64, 64)[0]
    assert not torch.equal(flux2_node, schedule_nodes.DOPSDFewStepSigmas.execute(flux2, 4, "simple", 64, 64)[0])
    root = pathlib.Path(families.__file__).parents[1]
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "families.py"
                 and any(s in p.read_text() for s in ("def is_flux2", "supported_models.Flux2", "== 128"))]
    assert offenders == [], offenders


def test_job_status_contract_is_defined_once_and_documented_from_it(N, zimage, pairs, monkeypatch):
    """Job.status(), the events and docs/architecture.md all come from nodes/events.py (issue 12)."""
    import pathlib

    from comfyui_dopsd.nodes import events
    model, _, vae = zimage
    sent = []
    monkeypatch.setattr(events, "send", lambda event, data: (events.check(event, data), sent.append((event, data))))
    job, _ = start_job(N, model, pairs, vae=vae, steps=2, preview_every=2)
    job.use_turns = False
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    job.wait(30)
    assert list(job.status()) == events.fields(events.JobStatus)
    assert {e for e, _ in sent} == set(events.EVENTS), [e for e, _ in sent]
    assert set(job.status()["previews"]) == set(events.fields(events.Previews))
    with pytest.raises(ValueError, match="differ from JobStatus"):
        events.check("dopsd.state", {"job_id": "x"})
    docs = (pathlib.Path(events.__file__).parents[1] / "docs" / "architecture.md").read_text()
    assert events.contract_markdown() in docs
