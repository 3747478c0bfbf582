"""On-policy retention in dopsd_core (no ComfyUI): prompts, the seeded draw, ratio 0 = the paper's method, the
frozen base as the retention teacher, and a resume that draws what the uninterrupted run drew."""
import pytest
import torch

from core_models import ListTask, TinyFlowModel, single_thread  # noqa: F401 (autouse)
from dopsd_core import checkpoint, lora, retention
from dopsd_core.train import TrainConfig, Trainer


def test_class_prompts_drop_the_trigger_word_only():
    caps = ["a photo of sks dog", "a sks, red cat", "A SKS dog", "a photo of sks dog", "asks sksx dog"]
    assert retention.class_prompts(caps, "sks") == ["a photo of dog", "a red cat", "A dog", "asks sksx dog"]
    assert retention.remove_trigger("sks", "sks") == ""


def test_retention_prompts_list_class_prompts_and_seeded_variations():
    p = retention.retention_prompts(["a cat"], ["a photo of sks dog"], "sks", n_variations=5, seed=3)
    assert p[:2] == ["a cat", "a photo of dog"] and len(p) == 7
    assert p == retention.retention_prompts(["a cat"], ["a photo of sks dog"], "sks", n_variations=5, seed=3)
    assert p != retention.retention_prompts(["a cat"], ["a photo of sks dog"], "sks", n_variations=5, seed=4)
    with pytest.raises(ValueError, match="must not name the trigger word 'sks'"):
        retention.retention_prompts(["a sks cat"], [], "sks")


def test_draw_is_seeded_keeps_the_ratio_and_skips_the_first_step():
    s = retention.schedule(seed=1, ratio=0.5, n_prompts=4, micro_steps=2000)
    assert s[0] is None
    frac = sum(d is not None for d in s) / len(s)
    assert 0.45 < frac < 0.55
    assert all(0 <= d[0] < 4 for d in s if d is not None)
    assert s == retention.schedule(seed=1, ratio=0.5, n_prompts=4, micro_steps=2000)
    assert s != retention.schedule(seed=2, ratio=0.5, n_prompts=4, micro_steps=2000)
    assert all(d is None for d in retention.schedule(seed=1, ratio=0.0, n_prompts=4, micro_steps=200))


def make(seed=0, ema_decay=0.9):
    torch.manual_seed(123)
    model = TinyFlowModel().requires_grad_(False)
    net = lora.LoRANetwork.for_module(model, rank=4, seed=seed, ema_decay=ema_decay)
    net.attach(model)
    g = torch.Generator().manual_seed(7)
    x0s = [torch.randn(2, 16, generator=g) for _ in range(3)]
    cs = [torch.randn(1, 8, generator=g) for _ in range(3)]
    ct = [torch.randn(1, 8, generator=g) for _ in range(3)]
    prompts = [torch.randn(1, 8, generator=g) for _ in range(5)]
    return model, net, ListTask(model, net, x0s, cs, ct), prompts


def mixed(model, net, task, prompts, ratio, seed=0, seen=None):
    def run_retention(index, ids, compute):
        ctx = prompts[ids[0]]
        student, base = net.predictors(lambda x, s: model(x, s, ctx), lambda x, s: model(x, s, ctx), teacher_mode="off")

        def watched_base(x, s):
            v = base(x, s)
            if seen is not None:
                with net.mode("off"):
                    seen.append(torch.equal(v, model(x, s, ctx)))
            return v
        return compute(student, watched_base, task.x0s[index])
    return retention.RetentionMix(task, len(prompts), ratio, seed, run_retention)


def test_ratio_zero_trains_exactly_as_without_retention():
    cfg = TrainConfig(steps=6, lr=5e-3)
    _, net_a, task_a, _ = make()
    Trainer(net_a, task_a, cfg).train()
    model, net_b, task_b, prompts = make()
    mix = mixed(model, net_b, task_b, prompts, 0.0)
    Trainer(net_b, mix, cfg).train()
    assert all(d is None for d in mix.log) and len(mix.log) == 6
    for k, v in net_a.state_dict().items():
        assert torch.equal(v, net_b.state_dict()[k]), k


def test_retention_teacher_is_the_base_model_not_the_ema():
    """ema_decay 0: the EMA teacher equals the student after every step, so an EMA teacher on the same text-only
    condition would add a retention loss of exactly 0; the frozen base adds > 0 (the student has moved away)."""
    cfg = TrainConfig(steps=12, lr=2e-2)
    _, net_a, task_a, _ = make(ema_decay=0.0)
    plain = Trainer(net_a, task_a, cfg).train().losses
    model, net, task, prompts = make(ema_decay=0.0)
    seen = []
    mix = mixed(model, net, task, prompts, 0.4, seed=5, seen=seen)
    losses = Trainer(net, mix, cfg).train().losses
    first = next(i for i, d in enumerate(mix.log) if d is not None)
    assert first > 0
    assert losses[:first] == plain[:first]       # the same concept steps until the first retention draw ...
    assert losses[first] > plain[first] + 1e-8   # ... which adds the base-teacher loss to that step
    assert seen and all(seen)  # the teacher's output is the LoRA-off model's, bit for bit


def test_retention_step_on_the_untouched_lora_has_loss_exactly_zero():
    model, net, task, prompts = make()
    mix = retention.RetentionMix(task, len(prompts), 0.5, 0, None)
    ctx = prompts[0]
    student, base = net.predictors(lambda x, s: model(x, s, ctx), lambda x, s: model(x, s, ctx), teacher_mode="off")
    trainer = Trainer(net, task, TrainConfig(steps=1))
    assert trainer.objective(student, base, task.x0s[0]).loss == 0.0
    assert mix.next_draw() is None  # and position 0 never draws one


def test_resume_continues_the_draw_sequence_and_the_weights(tmp_path):
    cfg = TrainConfig(steps=8, lr=5e-3, grad_accum=2)
    model, net_a, task_a, prompts = make()
    mix_a = mixed(model, net_a, task_a, prompts, 0.5, seed=9)
    Trainer(net_a, mix_a, cfg).train()

    model, net_b, task_b, prompts = make()
    mix_b = mixed(model, net_b, task_b, prompts, 0.5, seed=9)
    t = Trainer(net_b, mix_b, TrainConfig(steps=3, lr=5e-3, grad_accum=2))
    t.train()
    path = checkpoint.save_checkpoint(str(tmp_path / "state.pt"), t)

    model, net_c, task_c, prompts = make()
    mix_c = mixed(model, net_c, task_c, prompts, 0.5, seed=9)
    t = Trainer(net_c, mix_c, cfg)
    checkpoint.load_checkpoint(path, t)
    mix_c.seek_step(t.step, cfg.grad_accum)
    t.train()
    assert mix_b.log + mix_c.log == mix_a.log
    assert any(d is not None for d in mix_c.log) and any(d is None for d in mix_c.log)
    for k, v in net_a.state_dict().items():
        assert torch.equal(v, net_c.state_dict()[k]), k


def test_the_exact_resume_state_carries_the_retention_settings(tmp_path):
    """The settings that decide the draws and their prompts travel in the checkpoint (Trainer.extras), so a
    resumed run can compare its own with them; a checkpoint written before extras existed still loads."""
    texts = ["a dog", "a red car", "a photo of a cat", "a cat outdoors", "two of a dog"]
    model, net, task, prompts = make()
    mix = retention.RetentionMix(task, len(prompts), 0.5, 9, None, prompts=texts)
    t = Trainer(net, task, TrainConfig(steps=2, lr=5e-3))
    t.extras["retention"] = mix.settings()
    t.train()
    path = checkpoint.save_checkpoint(str(tmp_path / "state.pt"), t)

    _, net_b, task_b, _ = make()
    resumed = Trainer(net_b, task_b, TrainConfig(steps=4, lr=5e-3))
    checkpoint.load_checkpoint(path, resumed)
    saved = resumed.resumed_extras["retention"]
    assert saved == {"ratio": 0.5, "seed": 9, "per_step": 1, "n_prompts": 5, "prompts": texts}
    assert retention.resume_mismatch(saved, mix.settings()) is None

    old = torch.load(path, weights_only=True)
    del old["extras"]
    _, net_c, task_c, _ = make()
    legacy = Trainer(net_c, task_c, TrainConfig(steps=4, lr=5e-3))
    legacy.load_state_dict(old)
    assert legacy.step == 2 and legacy.resumed_extras is None


def test_resume_mismatch_says_what_differs_from_the_checkpoint():
    texts = ["a dog", "a red car", "a photo of a cat"]
    saved = retention.RetentionMix([], 3, 0.5, 0, None, prompts=texts).settings()

    def other(ratio=0.5, seed=0, prompts=texts):
        return retention.RetentionMix([], len(prompts), ratio, seed, None, prompts=prompts).settings()

    assert retention.resume_mismatch(saved, other()) is None
    assert retention.resume_mismatch(None, None) is None
    msg = retention.resume_mismatch(saved, other(ratio=0.25))
    assert msg.startswith("the checkpoint was trained with retention ratio 0.5 and 3 retention prompts ('a dog', "
                          "'a red car', ...); this run has retention ratio 0.25") and "(ratio 0.5 -> 0.25)" in msg
    msg = retention.resume_mismatch(saved, other(prompts=["a dog", "a blue bus", "a photo of a cat", "a tree"]))
    assert "prompts 3 -> 4, new: 'a blue bus', 'a tree', gone: 'a red car'" in msg
    assert "another order" in retention.resume_mismatch(saved, other(prompts=texts[::-1]))
    assert "seed 0 -> 4" in retention.resume_mismatch(saved, other(seed=4))
    assert retention.resume_mismatch(saved, None).endswith("this run has no retention")
    assert retention.resume_mismatch(None, saved).startswith("the checkpoint was trained with no retention; "
                                                             "this run has retention ratio 0.5")
