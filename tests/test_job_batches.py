"""Same-bucket batches in the ComfyUI trainer (issue 12), on ComfyUI's real tiny Z-Image: a batch of two pairs
runs through the guider as one batched call and gives the gradient of two batch-1 micro-steps accumulated; a
training set whose pairs cannot share a batch is refused with the fix, a mixed one is batched per bucket."""
import pytest
import torch

import comfy_fixtures as F
from nodes_support import executor_mode, start_job, wait_state

# fp32 on the CPU; the batched call differs from two single calls only in summation order inside the kernels
# (measured: largest element difference 4e-9; relative difference of the whole gradient 1.2e-6 to 1.7e-6 on 0.3.75
# and 0.33)
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7
GRAD_NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, jobs, teacher_nodes, trainer_nodes  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def zimage(tiny_zimage_clip, tiny_flux_vae):
    with executor_mode():
        return F.build_tiny_zimage(seed=0), tiny_zimage_clip, tiny_flux_vae


def make_pairs(N, clip, vae, captions, sizes):
    out = []
    with executor_mode():
        for i, (caption, size) in enumerate(zip(captions, sizes)):
            image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(i))
            ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(image, caption, "sks", size)[0]
            out += N.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, clip, vae, "as in the image:")[0]
    return out


SAME_LENGTH = ["a red [trigger] cat", "a blue [trigger] dog"]


def test_batch_of_two_equals_two_accumulated_micro_steps(N, zimage):
    from comfyui_dopsd.dopsd_core.train import TrainConfig, Trainer
    from comfyui_dopsd.nodes.comfy_bridge import batches, lora_patch, training
    from comfyui_dopsd.nodes.pairs import detached_copy
    model, clip, vae = zimage
    pairs = detached_copy(make_pairs(N, clip, vae, SAME_LENGTH, [64, 64]))
    assert batches.bucket_key(pairs[0]) == batches.bucket_key(pairs[1]), "the captions must tokenize alike"
    mp = model.clone()
    net = lora_patch.build_network(mp, 4, 4.0, "auto", 0.0, 0.9, False, 0)
    with torch.no_grad():
        for m in net.loras:  # both adapters non-zero, so student and teacher LoRA both matter
            m.up.normal_(0, 0.05)
            m.ema_up.normal_(0, 0.05)
    attachment = lora_patch.install(mp, net)
    task = training.ComfyTask(mp, net, pairs, 0, attachment)
    common = dict(steps=1, rollout_sigmas=[1.0, 0.75, 0.5], loss_space="x0", grad_clip=0.0, seed=3)
    batch2 = Trainer(net, task, TrainConfig(batch_size=2, grad_accum=1, **common))
    accum2 = Trainer(net, task, TrainConfig(batch_size=1, grad_accum=2, **common))
    calls = []
    original = training.guided.run_guided

    def counting(model_, conds, latent, body, **kw):
        calls.append(latent.shape[0])
        return original(model_, conds, latent, body, **kw)

    def grads(micro_steps):
        batch2.zero_grad()
        with torch.inference_mode(False), torch.enable_grad():
            loss = sum(micro_steps())
        return torch.cat([p.grad.flatten() for p in net.trainable_parameters()]), loss

    try:
        training.guided.run_guided = counting
        # the same seeded noise either way: [2, ...] drawn at once equals two [1, ...] draws in a row
        batched, batched_loss = grads(lambda: [batch2.micro_step([0, 1])])
        single, single_loss = grads(lambda: [accum2.micro_step([0]) / 2, accum2.micro_step([1]) / 2])
    finally:
        training.guided.run_guided = original
        lora_patch.uninstall(mp)
    assert calls == [2, 1, 1], calls  # one batched guider call, then two single ones
    assert batched.abs().sum() > 0
    torch.testing.assert_close(batched, single, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    relative = float((batched - single).norm() / batched.norm())
    print(f"batch 2 vs 2 x batch 1 (grad_accum 2): |g2 - g1| / |g2| = {relative:.2e}, |g2| = {float(batched.norm()):.3e}")
    assert relative < GRAD_NORM_RTOL, relative
    assert batched_loss == pytest.approx(single_loss, rel=1e-5)


def test_trainer_node_trains_batches_per_bucket_and_refuses_a_set_that_cannot_batch(N, zimage, monkeypatch):
    from comfyui_dopsd.nodes.comfy_bridge import batches, training
    model, clip, vae = zimage
    pairs = make_pairs(N, clip, vae, SAME_LENGTH + ["a [trigger] bird"], [64, 64, 32])
    seen = []
    original = training.ComfyTask.run_pairs

    def spy(self, batch, compute):
        seen.append([batches.bucket_key(p) for p in batch])
        return original(self, batch, compute)

    monkeypatch.setattr(training.ComfyTask, "run_pairs", spy)
    job, _ = start_job(N, model, pairs, steps=4, batch_size=2)
    job.use_turns = False
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    assert job.cfg.batch_size == 2 and len(seen) == 4
    assert all(len(set(keys)) == 1 for keys in seen), "a batch mixed buckets"
    assert sorted(len(keys) for keys in seen[:2]) == [1, 2]  # first epoch: the 64 px pair batch, the 32 px pair alone

    mixed = make_pairs(N, clip, vae, ["a [trigger] cat", "a [trigger] bird"], [64, 32])
    with pytest.raises(ValueError, match="would batch nothing.*batch_size 1 with grad_accum 2"):
        start_job(N, model, mixed, steps=1, batch_size=2)


def test_caption_variants_that_cannot_share_a_batch_are_refused_before_the_job(N, zimage):
    """Multi-caption rows: any variant may be drawn in any epoch, so with batch_size > 1 each must stack like the
    pair's first caption; a variant of another token length is refused with the fix (batch 1 + grad_accum)."""
    import dataclasses

    from comfyui_dopsd.nodes.comfy_bridge import training
    _, clip, vae = zimage
    pairs = make_pairs(N, clip, vae, SAME_LENGTH, [64, 64])
    longer = make_pairs(N, clip, vae, ["a red [trigger] cat sitting on a green sofa in the afternoon sun"], [64])[0]
    same = tuple((p.caption, p.student, p.teacher, None) for p in pairs)
    training.check_variants_batchable([dataclasses.replace(pairs[0], variants=same)], 2)  # same length: fine
    mixed = dataclasses.replace(pairs[0], variants=same[:1] + ((longer.caption, longer.student, longer.teacher, None),))
    with pytest.raises(ValueError, match="grad_accum 2"):
        training.check_variants_batchable([mixed, pairs[1]], 2)
    training.check_variants_batchable([mixed, pairs[1]], 1)  # batch 1: any variant runs alone
