"""The D-OPSD objective and its baselines: on-policy states, exact gradients, options."""
import pytest
import torch

from core_models import TinyFlowModel, single_thread  # noqa: F401 (autouse)
from dopsd_core import flow, lora, objectives, sampler, schedules


def _setup(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyFlowModel().to(dtype)
    net = lora.LoRANetwork.for_module(model, rank=4, seed=seed, dtype=dtype)
    net.attach(model)
    with torch.no_grad():  # a non-zero student and a different teacher, so the loss is not trivially 0
        for m in net.loras:
            m.up.normal_(0, 0.1)
            m.ema_up.normal_(0, 0.1)
    cs, ct = torch.randn(1, 8, dtype=dtype), torch.randn(1, 8, dtype=dtype)
    return (model, net, *_roles(model, net, cs, ct))


def _roles(model, net, cs, ct):
    """(student, teacher): the model with the LoRA's student adapter on c_s, and with its EMA on c_t."""
    return net.predictors(lambda x, s: model(x, s, cs), lambda x, s: model(x, s, ct))


def test_states_are_the_students_own_sampler_states():
    """On-policy: the loss sees exactly the states the student's sampler visits from the same noise."""
    _, _, student, teacher = _setup()
    noise = torch.randn(3, 16)
    sigmas = schedules.simple_sigmas(8, 3.0)
    visited = []
    sampler.sample_euler(student, noise, sigmas, callback=lambda i, x, v: visited.append(x.clone()))
    res = objectives.dopsd_step(student, teacher, noise, sigmas[:-1], backward=False)
    assert len(res.states) == 8
    for a, b in zip(res.states, visited):
        assert torch.equal(a, b)


def test_strided_rollout_visits_inference_states_it_shares():
    _, _, student, teacher = _setup()
    noise = torch.randn(2, 16)
    states = schedules.rollout_sigmas(schedules.simple_sigmas(8, 3.0), 4)
    four_step = torch.cat([states, torch.zeros(1)])
    visited = []
    sampler.sample_euler(student, noise, four_step, callback=lambda i, x, v: visited.append(x.clone()))
    res = objectives.dopsd_step(student, teacher, noise, states, backward=False)
    assert all(torch.equal(a, b) for a, b in zip(res.states, visited))


def _manual_loss(student, teacher, noise, sigmas, space, steps=None):
    """The paper's formula written out directly, with explicitly detached states."""
    x, terms = sigmas[0] * noise, []
    for k in range(len(sigmas)):
        s = sigmas[k].expand(noise.shape[0])
        v_s = student(x, s)
        with torch.no_grad():
            v_t = teacher(x, s)
        if space == "x0":
            d = flow.x0_from_velocity(x, s, v_s) - flow.x0_from_velocity(x, s, v_t)
        else:
            d = v_s - v_t
        if steps is None or k in steps:
            terms.append((d ** 2).mean())
        if k + 1 < len(sigmas):
            x = flow.euler_step(x, v_s.detach(), sigmas[k], sigmas[k + 1])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("space", ["velocity", "x0"])
@pytest.mark.parametrize("steps", [None, [0, 3]])
def test_gradient_equals_explicit_mean_loss(space, steps):
    model, net, student, teacher = _setup(dtype=torch.float64)
    noise = torch.randn(2, 16, dtype=torch.float64)
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)
    params = net.trainable_parameters()
    res = objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions(space, steps))
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = _manual_loss(student, teacher, noise, sig, space, steps)
    ref.backward()
    assert res.loss == pytest.approx(float(ref.detach()), rel=1e-10)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_teacher_gets_no_gradient():
    model, net, student, teacher = _setup()
    model.requires_grad_(False)
    objectives.dopsd_step(student, teacher, torch.randn(2, 16), torch.tensor([1.0, 0.5]))
    assert all(m.ema_up.grad is None for m in net.loras)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.trainable_parameters())


def test_undetached_rollout_backpropagates_through_states():
    """detach_states=False differs from the detached gradient (it includes d x_k / d theta terms)."""
    _, net, student, teacher = _setup(dtype=torch.float64)
    noise = torch.randn(2, 16, dtype=torch.float64)
    sig = torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64)
    objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions(detach_states=True))
    g_det = [p.grad.clone() for p in net.trainable_parameters()]
    for p in net.trainable_parameters():
        p.grad = None
    objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions(detach_states=False))
    g_bptt = [p.grad.clone() for p in net.trainable_parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(g_det, g_bptt))


def test_identical_student_and_teacher_give_zero_loss():
    _, net, student, _ = _setup()
    res = objectives.dopsd_step(student, student, torch.randn(2, 16), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert res.loss == 0.0


def test_sft_matches_flow_matching_target():
    model, net, student, _ = _setup(dtype=torch.float64)
    x0, noise = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    res = objectives.sft_step(student, x0, noise, sigma, backward=False)
    x_t = flow.add_noise(x0, noise, sigma)
    expected = ((student(x_t, sigma) - (noise - x0)) ** 2).mean()
    assert res.loss == pytest.approx(float(expected.detach()), rel=1e-10)


def test_off_policy_states_are_noised_targets_not_rollouts():
    _, _, student, teacher = _setup()
    x0, noise = torch.randn(2, 16), torch.randn(2, 16)
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5])
    res = objectives.off_policy_step(student, teacher, x0, noise, sig, backward=False)
    for s, x in zip(sig, res.states):
        torch.testing.assert_close(x, flow.add_noise(x0, noise, s))
    assert len(res.per_step) == 4


def test_bad_options_raise():
    with pytest.raises(ValueError, match="loss_space"):
        objectives.DOPSDOptions(loss_space="eps")


def test_gradcheck_of_the_detached_objective():
    """torch.autograd.gradcheck on one LoRA factor: the per-step backward of dopsd_step computes the
    derivative of the mean loss with the rollout states held fixed (finite differences agree)."""
    model, net, student, teacher = _setup(dtype=torch.float64)
    noise = torch.randn(2, 16, dtype=torch.float64)
    sig = torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64)
    up = net["out"].up
    with torch.no_grad():  # the states of the rollout at the current parameters
        states = objectives.dopsd_step(student, teacher, noise, sig, backward=False).states

    class Loss(torch.nn.Module):  # the mean loss on fixed states, as a function of the LoRA factors
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self):
            terms = []
            for x, s in zip(states, sig):
                sb = s.expand(2)
                with torch.no_grad():
                    v_t = teacher(x, sb)
                terms.append(((student(x, sb) - v_t) ** 2).mean())
            return torch.stack(terms).mean()

    name = f"net.loras.{net.names.index('out')}.up"

    def loss_at(u):
        return torch.func.functional_call(Loss(), {name: u}, ())

    u0 = up.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_at, (u0,), eps=1e-6, atol=1e-7, fast_mode=True)
    objectives.dopsd_step(student, teacher, noise, sig)
    (ref,) = torch.autograd.grad(loss_at(u0), u0)
    torch.testing.assert_close(up.grad, ref, rtol=1e-10, atol=1e-12)


def test_x0_loss_is_sigma_squared_weighted_velocity_loss():
    _, _, student, teacher = _setup(dtype=torch.float64)
    noise = torch.randn(2, 16, dtype=torch.float64)
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)
    v = objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions("velocity"), backward=False)
    x = objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions("x0"), backward=False)
    for s, lv, lx in zip(sig.tolist(), v.per_step, x.per_step):
        assert lx == pytest.approx(s * s * lv, rel=1e-9)


def test_loss_steps_subset_still_rolls_out_every_state():
    _, _, student, teacher = _setup()
    noise = torch.randn(2, 16)
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5])
    full = objectives.dopsd_step(student, teacher, noise, sig, backward=False)
    part = objectives.dopsd_step(student, teacher, noise, sig, objectives.DOPSDOptions(loss_steps=[-1]),
                                 backward=False)
    assert all(torch.equal(a, b) for a, b in zip(full.states, part.states))
    assert part.per_step == [pytest.approx(full.per_step[-1])]
    assert part.loss == pytest.approx(full.per_step[-1])


def test_teacher_is_evaluated_on_the_students_states_without_grad():
    _, _, student, teacher = _setup()
    seen = []

    def spy(x, s):
        seen.append((x.clone(), torch.is_grad_enabled()))
        return teacher(x, s)

    res = objectives.dopsd_step(student, spy, torch.randn(2, 16), torch.tensor([1.0, 0.75, 0.5]))
    assert [g for _, g in seen] == [False] * 3
    assert all(torch.equal(a, b) for (a, _), b in zip(seen, res.states))


def test_memory_stays_that_of_one_forward_backward():
    """Per-step backward frees each step's graph: peak memory ~ one SFT step, not K graphs."""
    from dopsd_core.memtrack import peak_bytes

    torch.manual_seed(0)
    model = TinyFlowModel(dim=64, hidden=256, depth=3).requires_grad_(False)
    net = lora.LoRANetwork.for_module(model, rank=4, seed=0)
    net.attach(model)
    cs, ct = torch.randn(1, 8), torch.randn(1, 8)
    student, teacher = _roles(model, net, cs, ct)
    x0, noise = torch.randn(32, 64), torch.randn(32, 64)
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.3])
    sft = peak_bytes(lambda: objectives.sft_step(student, x0, noise, torch.full((32,), 0.5)))
    dopsd = peak_bytes(lambda: objectives.dopsd_step(student, teacher, noise, sig))
    bptt = peak_bytes(lambda: objectives.dopsd_step(student, teacher, noise, sig,
                                                    objectives.DOPSDOptions(detach_states=False)))
    assert dopsd < 1.15 * sft
    assert bptt > 3 * sft  # keeping the graphs (BPTT) costs K times more: the tracker sees graphs
