"""Scale-out LoRA training: the exported set, the torchrun launcher, and data parallelism over 2 gloo ranks.

Tolerance for "2 ranks x batch 1 == 1 rank x batch 2": the two runs sum the same per-example gradients in a
different order (g_a/2 + g_b/2 after the all-reduce vs (g_a + g_b)/2), so they differ by float32 rounding,
amplified a little by Adam over a few steps: LoRA factors within atol 1e-5 + rtol 1e-4, losses rtol 1e-5.
The launcher on one rank and the trainer node run the identical loop, so they are compared bit for bit.
"""
import os

import pytest
import torch

import comfy_fixtures as F
import distributed_support as D
from nodes_support import TRAINER_DEFAULTS, executor_mode, flux2_pairs, start_job, wait_state

STEPS = 4
RECIPE = dict(method="dopsd", loss_space="x0", rank=4, alpha=4.0, learning_rate=1e-2, ema_decay=0.9, targets="auto")


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import export_nodes, jobs, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("scaleout")


@pytest.fixture(scope="module")
def model_file(work):
    sd = F.diffusion_state_dict("Flux2", F.TINY_FLUX2, seed=0)
    return F.save_diffusion_model(work / "tiny_flux2.safetensors", "Flux2", F.TINY_FLUX2, sd)


@pytest.fixture(scope="module")
def flux2(model_file):
    import comfy.utils
    with executor_mode():
        sd = comfy.utils.load_torch_file(model_file)
        return F.load_diffusion_model("Flux2", F.TINY_FLUX2, sd), F.build_tiny_flux2_vae(seed=0)


@pytest.fixture(scope="module")
def output_dir(work):
    import folder_paths
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(work / "output"))
    yield work / "output"
    folder_paths.set_output_directory(old)


@pytest.fixture(scope="module")
def pairs(N, flux2):
    return flux2_pairs(N, flux2[1])


@pytest.fixture(scope="module")
def exported(N, flux2, pairs, output_dir):
    with executor_mode():
        out = N.export_nodes.DOPSDExportTrainingSet.execute(
            flux2[0], pairs, "tiny_set", inference_steps=4, train_steps=4, schedule="auto", pairs_per_shard=1,
            overwrite=False, **RECIPE)
    return out[0]


def load_lora(path):
    from comfyui_dopsd.dopsd_core import lora_io
    return lora_io.load_comfy_lora(str(path))


def assert_close_sd(a, b, atol=1e-5, rtol=1e-4):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


@pytest.fixture(scope="module")
def two_rank_run(work, model_file, exported):
    """2 ranks x batch 1, checkpoints every 2 steps (the straight run the resume tests continue)."""
    out = work / "r2" / "lora.safetensors"
    stdout = D.run_ranks(2, D.launcher_args(model_file, exported, out, steps=STEPS, save_every=2), work / "r2log")
    return out, stdout


@pytest.fixture(scope="module")
def one_rank_batch2_run(work, model_file, exported):
    out = work / "r1b2" / "lora.safetensors"
    stdout = D.run_ranks(1, D.launcher_args(model_file, exported, out, steps=STEPS, global_batch=2, save_every=2),
                         work / "r1b2log")
    return out, stdout


def test_export_round_trips_pairs_exactly(N, pairs, exported):
    from comfyui_dopsd.dopsd_core import exported_set
    data = exported_set.ExportedSet(exported)
    assert len(data) == len(pairs) == 2 and len(data.shards) == 2
    assert data.family["model_class"] == "Flux2" and data.recipe["method"] == "dopsd"
    assert len(data.schedule["rollout_sigmas"]) == 4
    for i, p in enumerate(pairs):
        got = data.pair(i)
        assert got["caption"] == p.caption and torch.equal(got["latent"], p.latent)
        assert torch.equal(got["student"][0][0], p.student[0][0])
        assert torch.equal(got["teacher"][0][0], p.teacher[0][0])
        refs, want = got["teacher"][0][1]["reference_latents"], p.teacher[0][1]["reference_latents"]
        assert len(refs) == len(want) and all(torch.equal(a, b) for a, b in zip(refs, want))
        assert set(got["teacher"][0][1]) == set(p.teacher[0][1])
        assert data.latent_shape(i) == p.latent.shape  # from the manifest
    lazy = exported_set.LazyPairs(data)
    assert len(lazy) == 2 and torch.equal(lazy[1]["latent"], pairs[1].latent)
    assert len(data._cache) <= exported_set.CACHED_SHARDS


def test_two_ranks_batch1_equal_one_rank_batch2(two_rank_run, one_rank_batch2_run):
    (out2, logs2), (out1, logs1) = two_rank_run, one_rank_batch2_run
    sd2, meta2 = load_lora(out2)
    sd1, _ = load_lora(out1)
    assert meta2["dopsd.world_size"] == "2"
    assert_close_sd(sd2, sd1)
    l2, l1 = D.losses(logs2[0]), D.losses(logs1[0])
    assert len(l2) == len(l1) == STEPS and not D.losses(logs2[1])  # only rank 0 logs
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-7)
    # and the LoRA actually trained
    assert any(v.abs().max() > 0 for k, v in sd1.items() if k.endswith("lora_up.weight"))


def test_launcher_equals_trainer_node_step_for_step(N, flux2, pairs, work, model_file, exported):
    model, _ = flux2
    job, _ = start_job(N, model, pairs, steps=STEPS, **{k: v for k, v in RECIPE.items()})
    assert wait_state(job, ("finished", "error"), timeout=120) == "finished", job.error
    node_sd = job.lora_state_dict()
    node_losses = [loss for _, loss in job.losses]
    out = work / "r1b1" / "lora.safetensors"
    logs = D.run_ranks(1, D.launcher_args(model_file, exported, out, steps=STEPS, save_every=0), work / "r1b1log")
    sd, meta = load_lora(out)
    assert meta["dopsd.method"] == "dopsd" and meta["dopsd.steps"] == str(STEPS)
    assert_close_sd(sd, node_sd, atol=0, rtol=0)
    # the log prints 6 decimals
    torch.testing.assert_close(torch.tensor(D.losses(logs[0])), torch.tensor(node_losses), atol=1e-6, rtol=0)
    assert TRAINER_DEFAULTS["precision"] == "fp32"


@pytest.mark.parametrize("world", [1, 2])
def test_resume_two_rank_checkpoint_on_other_world_sizes(world, two_rank_run, work, model_file, exported):
    out2, _ = two_rank_run
    ckpts = out2.parent / "lora.checkpoints"
    step2 = ckpts / "dopsd-step000002.pt"
    assert step2.is_file()
    out = work / f"resume{world}" / "lora.safetensors"
    logs = D.run_ranks(world, D.launcher_args(model_file, exported, out, steps=STEPS, global_batch=2, save_every=0,
                                              resume=step2, checkpoint_dir=work / f"resume{world}" / "ck"),
                       work / f"resume{world}log")
    assert "resumed at step 2" in logs[0]
    assert_close_sd(load_lora(out)[0], load_lora(out2)[0], atol=1e-6, rtol=1e-5)


def test_exported_set_errors_name_the_fix(exported, tmp_path):
    import shutil

    from comfyui_dopsd.dopsd_core import exported_set
    with pytest.raises(exported_set.ExportedSetError, match="another model family"):
        exported_set.ExportedSet(exported, family={"model_class": "ZImage", "image_model": "lumina2"})
    broken = tmp_path / "missing"
    shutil.copytree(exported, broken)
    os.remove(broken / "shard-00001.safetensors")
    with pytest.raises(exported_set.ExportedSetError, match="missing shard.*shard-00001"):
        exported_set.ExportedSet(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    data = bytearray((corrupt / "shard-00000.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "shard-00000.safetensors").write_bytes(bytes(data))
    with pytest.raises(exported_set.ExportedSetError, match="checksum mismatch.*shard-00000"):
        exported_set.ExportedSet(corrupt)
    with pytest.raises(exported_set.ExportedSetError, match="not an exported D-OPSD training set"):
        exported_set.ExportedSet(tmp_path)


def test_export_node_is_registered_and_validates_names(N, pack, exported, output_dir):
    node = N.export_nodes.DOPSDExportTrainingSet
    assert pack.NODE_CLASS_MAPPINGS["DOPSDExportTrainingSet"] is node
    assert "escapes" in node.validate_inputs("../../evil", 4, 4)
    assert "absolute" in node.validate_inputs("/tmp/evil", 4, 4)
    assert "already exists" in node.validate_inputs("tiny_set", 4, 4)
    assert node.validate_inputs("tiny_set", 4, 4, overwrite=True) is True
    assert "must divide" in node.validate_inputs("new_set", 3, 4)
    assert os.path.dirname(exported) == str(output_dir / "dopsd_sets")


def test_launcher_refuses_a_set_for_another_family(work, exported):
    sd = F.diffusion_state_dict("ZImage", F.TINY_ZIMAGE, seed=0)
    zimage = F.save_diffusion_model(work / "tiny_zimage.safetensors", "ZImage", F.TINY_ZIMAGE, sd)
    procs = D.start_ranks(1, D.launcher_args(zimage, exported, work / "wrong" / "l.safetensors", steps=1),
                          work / "wronglog")
    assert D.wait_ranks(procs, 120) == [1]
    err = D.read(procs[0][2])
    assert "exported for another model family" in err and "model_class: set 'Flux2' vs model 'ZImage'" in err


def test_documented_torchrun_command_writes_a_lora(work, model_file, exported, two_rank_run):
    """The command of docs/scaling.md, through the real torchrun (static rendezvous on 127.0.0.1)."""
    import subprocess
    import sys
    out = work / "torchrun" / "lora.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(D.free_port()), str(D.LAUNCHER),
           *D.launcher_args(model_file, exported, out, steps=STEPS, save_every=0)]
    env = D.rank_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(D.REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s), global batch 2" in proc.stdout
    assert_close_sd(load_lora(out)[0], load_lora(two_rank_run[0])[0], atol=0, rtol=0)  # same env contract, same bits
