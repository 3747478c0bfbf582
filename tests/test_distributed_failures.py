"""Scale-out failure behaviour on 2 gloo ranks: a killed rank, a NaN on one rank, Ctrl-C / SIGTERM."""
import signal
import time

import pytest
import torch

import comfy_fixtures as F
import distributed_support as D

BOUND_S = 40  # the launcher's --timeout is 30 s in these tests; a closed socket is noticed at once


@pytest.fixture(scope="module")
def core(pack):
    from comfyui_dopsd.dopsd_core import checkpoint, exported_set
    return checkpoint, exported_set


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("scaleout_fail")


@pytest.fixture(scope="module")
def model_file(work):
    sd = F.diffusion_state_dict("Flux2", F.TINY_FLUX2, seed=0)
    return F.save_diffusion_model(work / "tiny_flux2.safetensors", "Flux2", F.TINY_FLUX2, sd)


def _pair(seed, nan=False):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 128, 4, 4, generator=gen)
    ref = torch.full_like(latent, float("nan")) if nan else latent
    student = F.flux2_conditioning(seed=seed)
    teacher = [[student[0][0], {"pooled_output": None, "reference_latents": [ref]}]]
    return {"caption": f"pair {seed}", "latent": latent, "student": student, "teacher": teacher}


def _write(core, folder, nan_pair=None):
    _, exported_set = core
    family = {"model_class": "Flux2", "image_model": "flux2", "context_width": F.TINY_FLUX2["context_in_dim"]}
    schedule = {"rollout_sigmas": [1.0, 0.75, 0.5, 0.25], "inference_sigmas": [1.0, 0.75, 0.5, 0.25, 0.0]}
    recipe = {"method": "dopsd", "loss_space": "x0", "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
              "ema_decay": 0.9, "targets": ["double_blocks.*.img_attn.qkv", "single_blocks.*.linear1"]}
    pairs = [_pair(i, nan=(i == nan_pair)) for i in range(4)]
    return exported_set.write_set(str(folder), pairs, family, schedule, recipe, pairs_per_shard=2)


@pytest.fixture(scope="module")
def good_set(core, work):
    return _write(core, work / "good")


def _wait_for(path, text, procs, timeout=90.0):
    end = time.time() + timeout
    while time.time() < end:
        if text in D.read(path):
            return
        if any(p.poll() is not None for p, _, _ in procs):
            break
        time.sleep(0.1)
    raise AssertionError(f"never saw {text!r}: {D.read(path)[-1000:]}\n{[D.read(e)[-2000:] for _, _, e in procs]}")


def _kill_all(procs):
    for p, _, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_rank_ends_the_other_within_bound_and_checkpoint_survives(core, work, model_file, good_set):
    checkpoint, _ = core
    out = work / "kill" / "lora.safetensors"
    procs = D.start_ranks(2, D.launcher_args(model_file, good_set, out, steps=500, save_every=2), work / "killlog")
    try:
        _wait_for(procs[0][1], "step 3/", procs)
        procs[1][0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        rc = procs[0][0].wait(BOUND_S)
        elapsed = time.time() - killed_at
    finally:
        _kill_all(procs)
    err = D.read(procs[0][2])
    print(f"surviving rank exited {elapsed:.2f} s after the kill")
    assert rc == 1 and elapsed < BOUND_S, (rc, elapsed)
    assert "RankFailure" in err and "another rank died or stopped answering" in err and "resume" in err, err[-2000:]
    assert not out.exists()  # no final LoRA from a broken run
    latest = checkpoint.CheckpointManager(str(out.parent / "lora.checkpoints")).latest()
    info = checkpoint.read_info(latest)
    assert info["step"] >= 2 and info["step"] % 2 == 0
    state = torch.load(latest, map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and state["config"]["batch_size"] == 2 and state["lora"]


def test_nan_on_one_rank_stops_all_ranks_and_writes_no_lora(core, work, model_file):
    bad = _write(core, work / "nan", nan_pair=1)
    out = work / "nan_run" / "lora.safetensors"
    procs = D.start_ranks(2, D.launcher_args(model_file, bad, out, steps=3, save_every=1), work / "nanlog")
    try:
        codes = D.wait_ranks(procs, 120)
    finally:
        _kill_all(procs)
    errs = [D.read(e) for _, _, e in procs]
    assert codes == [1, 1], errs
    assert all("TrainingDiverged" in e and "on at least one of 2 ranks" in e for e in errs), errs
    assert not out.exists()


def test_interrupt_saves_checkpoint_and_lora_on_all_ranks(core, work, model_file, good_set):
    checkpoint, _ = core
    out = work / "stop" / "lora.safetensors"
    procs = D.start_ranks(2, D.launcher_args(model_file, good_set, out, steps=500, save_every=0), work / "stoplog")
    try:
        _wait_for(procs[0][1], "step 2/", procs)
        procs[0][0].send_signal(signal.SIGINT)  # Ctrl-C reaching one rank only: the ranks agree to stop
        codes = D.wait_ranks(procs, 60)
    finally:
        _kill_all(procs)
    assert codes == [130, 130], [D.read(e)[-2000:] for _, _, e in procs]
    log = D.read(procs[0][1])
    assert "stopped at step" in log
    step = int(log.split("stopped at step ")[1].split(":")[0])
    assert step < 500
    assert (out.parent / f"lora_step{step:05d}.safetensors").is_file()
    latest = checkpoint.CheckpointManager(str(out.parent / "lora.checkpoints")).latest()
    assert checkpoint.read_info(latest)["step"] == step
