"""The training loop: methods, exact resume, NaN guard, stop/pause, accumulation, bf16, checkpoints."""
import os
import random
import threading
import time

import numpy as np
import pytest
import torch

from core_models import ListTask, TinyFlowModel, single_thread  # noqa: F401 (autouse)
from dopsd_core import checkpoint, lora
from dopsd_core.control import TrainControl
from dopsd_core.train import TrainConfig, Trainer, TrainingDiverged


def make(cfg, seed=0, dropout=0.1):
    torch.manual_seed(123)
    model = TinyFlowModel().requires_grad_(False)
    net = lora.LoRANetwork.for_module(model, rank=4, seed=seed, dropout=dropout, ema_decay=0.9)
    net.attach(model)
    g = torch.Generator().manual_seed(7)
    x0s = [torch.randn(2, 16, generator=g) for _ in range(3)]
    cs = [torch.randn(1, 8, generator=g) for _ in range(3)]
    ct = [torch.randn(1, 8, generator=g) for _ in range(3)]
    return model, net, ListTask(model, net, x0s, cs, ct)


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("method", ["dopsd", "sft", "off_policy"])
def test_each_method_learns_something(method):
    cfg = TrainConfig(method=method, steps=5, lr=1e-2, warmup_steps=2, lr_schedule="cosine")
    _, net, task = make(cfg)
    before = snapshot(net)
    res = Trainer(net, task, cfg).train()
    assert res.step == 5 and len(res.losses) == 5 and not res.stopped
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("up"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("ema_up"))


def test_dopsd_loss_decreases_towards_teacher():
    cfg = TrainConfig(steps=60, lr=3e-3, grad_clip=0)
    _, net, task = make(cfg, dropout=0.0)
    net.ema_decay = 1.0  # a fixed teacher, so the student has a fixed target
    with torch.no_grad():
        for m in net.loras:
            m.ema_up.normal_(0, 0.3)
    res = Trainer(net, task, cfg).train()
    assert sum(res.losses[-10:]) < 0.5 * sum(res.losses[:10])


@pytest.mark.parametrize("method", ["dopsd", "sft", "off_policy"])
def test_resume_is_bit_identical(tmp_path, method):
    cfg = TrainConfig(method=method, steps=8, lr=5e-3, grad_accum=2, warmup_steps=3, lr_schedule="cosine")
    _, net_a, task_a = make(cfg)
    Trainer(net_a, task_a, cfg).train()

    _, net_b, task_b = make(cfg)
    half = TrainConfig(**{**cfg.to_dict(), "steps": 8})
    trainer_b = Trainer(net_b, task_b, half)
    for _ in range(3):
        trainer_b.train_step()
    path = checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), trainer_b)
    torch.manual_seed(999)  # disturb every global RNG: resume must restore them
    random.seed(999)
    np.random.seed(999)

    _, net_c, task_c = make(cfg, seed=42)  # different init: everything must come from the checkpoint
    trainer_c = Trainer(net_c, task_c, cfg)
    checkpoint.load_checkpoint(path, trainer_c)
    assert trainer_c.step == 3
    trainer_c.train()
    a, c = net_a.state_dict(), net_c.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_nan_guard_stops_without_updating():
    cfg = TrainConfig(steps=3)
    model, net, task = make(cfg)
    trainer = Trainer(net, task, cfg)
    trainer.train_step()
    good = snapshot(net)
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        trainer.train_step()
    assert all(torch.equal(good[k], v) for k, v in net.state_dict().items())
    assert trainer.step == 1


def test_stop_and_pause_between_steps():
    cfg = TrainConfig(steps=1000, lr=1e-3)
    _, net, task = make(cfg)
    control = TrainControl()
    seen, times = [], {}

    def progress(p):
        seen.append(p.step)
        times[p.step] = time.monotonic()
        if p.step == 2:
            control.pause()
            threading.Timer(0.3, control.resume).start()
        if p.step == 4:
            control.stop(save=False)

    res = Trainer(net, task, cfg, control=control, on_progress=progress).train()
    assert res.stopped and res.step == 4 and seen == [1, 2, 3, 4]
    assert times[3] - times[2] >= 0.3 and control.save_on_stop is False


def test_grad_accumulation_is_the_mean_of_micro_steps():
    """Two accumulated micro-steps give the mean gradient of the two micro-batches the order drew."""
    cfg = TrainConfig(steps=1, lr=1e-2, grad_accum=2, grad_clip=0)
    _, net, task = make(cfg, dropout=0.0)
    t = Trainer(net, task, cfg)
    gen, order = t.generator.get_state(), t.order.state_dict()
    t.optimizer.zero_grad()
    t.cfg.grad_accum = 1  # one micro-step at a time, by hand
    single = []
    for _ in range(2):
        for p in t.params:
            p.grad = None
        t.micro_step(t.next_batch())
        single.append([p.grad.clone() for p in t.params])
    t.cfg.grad_accum = 2
    t.generator.set_state(gen)
    t.order.load_state_dict(order)
    t.optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        t.micro_step(t.next_batch())
    for a, b, acc in zip(single[0], single[1], [p.grad for p in t.params]):
        torch.testing.assert_close(acc, (a + b) / 2)


def test_bf16_autocast_runs_and_keeps_fp32_masters():
    cfg = TrainConfig(steps=2, precision="bf16")
    _, net, task = make(cfg)
    Trainer(net, task, cfg).train()
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path):
    cfg = TrainConfig(steps=5, save_every=2, keep_checkpoints=0)
    _, net, task = make(cfg)
    Trainer(net, task, cfg, checkpoint_dir=str(tmp_path)).train()
    assert sorted(os.listdir(tmp_path)) == ["dopsd-step000002.pt", "dopsd-step000004.pt", "dopsd-step000005.pt"]


def test_config_and_dataset_errors():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="dreambooth")
    with pytest.raises(ValueError, match="rollout_sigmas"):
        TrainConfig(rollout_sigmas=[1.5])
    cfg = TrainConfig()
    _, net, task = make(cfg)
    task.x0s = []
    with pytest.raises(ValueError, match="empty"):
        Trainer(net, task, cfg)


def test_atomic_write_keeps_old_file_on_crash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def boom(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(str(path), boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_gradient_checkpointing_gives_the_same_gradient():
    from dopsd_core import objectives
    from dopsd_core.grad_checkpoint import checkpoint_modules

    cfg = TrainConfig()
    model, net, task = make(cfg, dropout=0.0)
    with torch.no_grad():
        for m in net.loras:
            m.ema_up.normal_(0, 0.1)

    def grads():
        for p in net.trainable_parameters():
            p.grad = None
        task.run(0, lambda s, t, x0: objectives.dopsd_step(s, t, torch.ones_like(x0), torch.tensor([1.0, 0.6])))
        return [p.grad.clone() for p in net.trainable_parameters()]

    plain = grads()
    handle = checkpoint_modules(model.blocks, lora_network=net)
    ckpt = grads()
    handle.remove()
    assert "forward" not in model.blocks[0].__dict__
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


class BucketTask(ListTask):
    """ListTask with sizes: examples 0, 2, 4 are 'wide', 1, 3 'tall'; batches stack same-size latents."""

    def bucket(self, index):
        return "wide" if index % 2 == 0 else "tall"

    def run_batch(self, indices, compute):
        self.batches = getattr(self, "batches", []) + [list(indices)]
        cs = torch.cat([self.cs[i] for i in indices])
        ct = torch.cat([self.ct[i] for i in indices])
        x0 = torch.cat([self.x0s[i] for i in indices])

        student, teacher = self.net.predictors(
            lambda x, s: self.model(x, s, cs.repeat_interleave(x.shape[0] // cs.shape[0], 0)),
            lambda x, s: self.model(x, s, ct.repeat_interleave(x.shape[0] // ct.shape[0], 0)))

        return compute(student, teacher, x0)


def make_bucketed(n=5):
    torch.manual_seed(123)
    model = TinyFlowModel().requires_grad_(False)
    net = lora.LoRANetwork.for_module(model, rank=4, seed=0, ema_decay=0.9)
    net.attach(model)
    g = torch.Generator().manual_seed(7)
    return model, net, BucketTask(model, net, [torch.randn(1, 16, generator=g) for _ in range(n)],
                                  [torch.randn(1, 8, generator=g) for _ in range(n)],
                                  [torch.randn(1, 8, generator=g) for _ in range(n)])


def test_batches_are_same_bucket_and_cover_the_epoch():
    cfg = TrainConfig(steps=6, batch_size=2)
    _, net, task = make_bucketed()
    Trainer(net, task, cfg).train()
    assert all(len({task.bucket(i) for i in b}) == 1 for b in task.batches)
    first_epoch = sorted(i for b in task.batches[:3] for i in b)
    assert first_epoch == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="run_batch"):
        Trainer(net, make(cfg)[2], cfg)


def test_managed_checkpoints_resume_and_keep(tmp_path):
    cfg = TrainConfig(steps=6, save_every=2, keep_checkpoints=2, lr=5e-3, batch_size=2)
    _, net_a, task_a = make_bucketed()
    res = Trainer(net_a, task_a, cfg, checkpoint_dir=str(tmp_path)).train()
    files = sorted(os.listdir(tmp_path))
    assert files == ["dopsd-step000004.pt", "dopsd-step000006.pt"] and res.checkpoint.endswith("000006.pt")

    short = TrainConfig(**{**cfg.to_dict(), "steps": 6})
    _, net_b, task_b = make_bucketed()
    trainer_b = Trainer(net_b, task_b, short, checkpoint_dir=str(tmp_path / "b"))
    for _ in range(4):
        trainer_b.train_step()
    trainer_b._save()
    _, net_c, task_c = make_bucketed()
    trainer_c = Trainer(net_c, task_c, cfg, checkpoint_dir=str(tmp_path / "b")).resume(str(tmp_path / "b"))
    assert trainer_c.step == 4 and trainer_c.run_id == trainer_b.run_id
    trainer_c.train()
    a, c = net_a.state_dict(), net_c.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, save_every=1, keep_checkpoints=0)
    model, net, task = make(cfg)
    calls = []

    def poison(p):
        calls.append(p.step)
        if p.step == 3:
            with torch.no_grad():
                model.out.weight[0, 0] = float("inf")

    trainer = Trainer(net, task, cfg, checkpoint_dir=str(tmp_path), on_progress=poison)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is kept"):
        trainer.train()
    assert trainer.step == 3 and calls == [1, 2, 3]
    assert checkpoint.CheckpointManager(str(tmp_path)).latest().endswith("dopsd-step000003.pt")
    state = torch.load(os.path.join(tmp_path, "dopsd-step000003.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["lora"].values())


def test_checkpoints_never_replace_a_stranger(tmp_path):
    cfg = TrainConfig(steps=2, save_every=1)
    _, net, task = make(cfg)
    foreign = tmp_path / "notes.pt"
    foreign.write_bytes(b"my own file")
    trainer = Trainer(net, task, cfg)
    trainer.train_step()
    with pytest.raises(FileExistsError, match="not a D-OPSD checkpoint"):
        checkpoint.save_checkpoint(str(foreign), trainer)
    assert foreign.read_bytes() == b"my own file"
    first = checkpoint.save_checkpoint(str(tmp_path / "state.pt"), trainer)
    trainer.train_step()
    checkpoint.save_checkpoint(first, trainer)  # the same run may replace its own file
    _, net2, task2 = make(cfg)
    other = Trainer(net2, task2, cfg)
    with pytest.raises(FileExistsError, match="another training run"):
        checkpoint.save_checkpoint(first, other)
    Trainer(net, task, cfg, checkpoint_dir=str(tmp_path / "run")).train()
    with pytest.raises(FileExistsError, match="another training run"):
        Trainer(net2, task2, cfg, checkpoint_dir=str(tmp_path / "run")).train()


def test_sft_budget_matches_dopsd_student_passes():
    counts = {}
    for method, draws in [("dopsd", None), ("sft", None), ("sft", 1), ("off_policy", None)]:
        cfg = TrainConfig(method=method, steps=1, sft_draws=draws)
        _, net, task = make(cfg)
        n = {"student": 0, "teacher": 0}

        class Counting(ListTask):
            def run(self, index, compute):
                def student(x, s):
                    n["student"] += 1
                    with net.mode("student"):
                        return task.model(x, s, task.cs[index])

                def teacher(x, s):
                    n["teacher"] += 1
                    with net.mode("teacher"):
                        return task.model(x, s, task.ct[index])

                return compute(student, teacher, task.x0s[index])

        Trainer(net, Counting(task.model, net, task.x0s, task.cs, task.ct), cfg).train()
        counts[(method, draws)] = (n["student"], n["teacher"])
    assert counts == {("dopsd", None): (4, 4), ("sft", None): (4, 0), ("sft", 1): (1, 0), ("off_policy", None): (4, 4)}


def test_ema_settings_from_config_and_lr_schedule():
    from dopsd_core.optim import lr_factor

    cfg = TrainConfig(steps=10, ema_decay=0.5, ema_warmup=False, warmup_steps=2, lr_schedule="cosine", lr=1e-3)
    _, net, task = make(cfg)
    t = Trainer(net, task, cfg)
    assert net.ema_decay == 0.5
    lrs = []
    for _ in range(10):
        lrs.append(t.optimizer.param_groups[0]["lr"])
        t.train_step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] < lrs[2] and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    m = net.loras[0]  # EMA followed the student with decay 0.5 (after the last step)
    assert not torch.equal(m.ema_up, torch.zeros_like(m.ema_up))


def test_8bit_optimizer_needs_bitsandbytes():
    cfg = TrainConfig(steps=1, optimizer="adamw8bit")
    _, net, task = make(cfg)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
            Trainer(net, task, cfg)
    else:  # pragma: no cover - depends on the environment
        Trainer(net, task, cfg).train()


def test_resume_from_a_checkpoint_folder_after_a_saving_stop(tmp_path):
    cfg = TrainConfig(steps=4, save_every=0, lr=5e-3)
    _, net_a, task_a = make(cfg)
    Trainer(net_a, task_a, cfg).train()
    _, net_b, task_b = make(cfg)
    stop = TrainControl()
    Trainer(net_b, task_b, cfg, checkpoint_dir=str(tmp_path), control=stop,
            on_progress=lambda p: stop.stop() if p.step == 2 else None).train()
    assert os.listdir(tmp_path) == ["dopsd-step000002.pt"]
    _, net_c, task_c = make(cfg, seed=5)
    res = Trainer(net_c, task_c, cfg, checkpoint_dir=str(tmp_path)).resume(str(tmp_path)).train()
    assert res.step == 4
    a, c = net_a.state_dict(), net_c.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_seeded_runs_are_identical_and_seeds_matter():
    def run(seed):
        cfg = TrainConfig(steps=3, seed=seed, lr=1e-2)
        _, net, task = make(cfg)
        Trainer(net, task, cfg).train()
        return net.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_nonfinite_gradient_alone_is_caught():
    cfg = TrainConfig(steps=2)
    _, net, task = make(cfg)
    trainer = Trainer(net, task, cfg)
    handle = net.loras[0].up.register_hook(lambda g: g * float("inf"))
    before = snapshot(net)
    with pytest.raises(TrainingDiverged, match="a gradient became"):
        trainer.train_step()
    handle.remove()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.trainable_parameters())
