"""The training loop: methods, exact resume, NaN guard, stop/pause, accumulation, bf16, checkpoints."""
import threading

import pytest
import torch

from core_models import ListTask, TinyFlowModel
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


def test_resume_is_bit_identical(tmp_path):
    cfg = TrainConfig(steps=8, lr=5e-3, grad_accum=2, warmup_steps=3, lr_schedule="cosine")
    _, net_a, task_a = make(cfg)
    Trainer(net_a, task_a, cfg).train()

    _, net_b, task_b = make(cfg)
    half = TrainConfig(**{**cfg.to_dict(), "steps": 8})
    trainer_b = Trainer(net_b, task_b, half)
    for _ in range(3):
        trainer_b.train_step()
    path = checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), trainer_b)
    torch.manual_seed(999)  # disturb global RNG: resume must restore it

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
    resumed = []
    seen = []

    def progress(p):
        seen.append(p.step)
        if p.step == 2:
            control.pause()
            threading.Timer(0.3, control.resume).start()
        if p.step == 4:
            control.stop(save=False)

    res = Trainer(net, task, cfg, control=control, on_progress=progress,
                  on_resume=lambda: resumed.append(True)).train()
    assert res.stopped and res.step == 4 and seen == [1, 2, 3, 4]
    assert resumed == [True] and control.save_on_stop is False


def test_grad_accumulation_equals_bigger_batch():
    """Two accumulated micro-steps give the mean gradient of the two micro-batches."""
    cfg1 = TrainConfig(steps=1, lr=1e-2, grad_accum=2, grad_clip=0)
    _, net, task = make(cfg1, dropout=0.0)
    t = Trainer(net, task, cfg1)
    gen_state = t.generator.get_state()
    t.optimizer.zero_grad()
    losses = [task.run(int(torch.randint(len(task), (1,), generator=t.generator)), t._compute).loss for _ in range(2)]
    manual = [p.grad.clone() for p in t.params]
    t.optimizer.zero_grad()
    t.generator.set_state(gen_state)
    for _ in range(2):
        task.run(int(torch.randint(len(task), (1,), generator=t.generator)), t._compute)
    again = [p.grad.clone() for p in t.params]
    for a, b in zip(manual, again):
        torch.testing.assert_close(a, b)
    assert all(l > 0 for l in losses)


def test_bf16_autocast_runs_and_keeps_fp32_masters():
    cfg = TrainConfig(steps=2, precision="bf16")
    _, net, task = make(cfg)
    Trainer(net, task, cfg).train()
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())


def test_checkpoint_callback_every_n(tmp_path):
    cfg = TrainConfig(steps=6, save_every=2)
    _, net, task = make(cfg)
    saved = []
    trainer = Trainer(net, task, cfg)
    trainer.on_checkpoint = lambda step: saved.append(checkpoint.save_checkpoint(str(tmp_path / f"s{step}.pt"), trainer))
    trainer.train()
    assert [p.rsplit("/", 1)[1] for p in saved] == ["s2.pt", "s4.pt", "s6.pt"]


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
