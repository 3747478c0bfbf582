"""Toy world: model shapes and calling conventions (fast; random weights)."""
import dataclasses
import os
import sys

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dopsd_core import flow, schedules  # noqa: E402
from dopsd_core.lora import LoRANetwork  # noqa: E402
from toyworld import distill  # noqa: E402
from toyworld.concepts import make_world  # noqa: E402
from toyworld.dit import DiTConfig, ToyDiT  # noqa: E402
from toyworld.encoder import EncoderConfig, Tokenizer, ToyVLM  # noqa: E402
from toyworld.evaluator import Evaluator, frechet_distance, gaussian_stats  # noqa: E402
from toyworld.model import ToyModel  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    w = make_world(0)
    tok = Tokenizer(w.vocabulary())
    enc = ToyVLM(EncoderConfig(vocab_size=len(tok)))
    dit = ToyDiT(DiTConfig(context_dim=enc.cfg.width))
    for p in dit.parameters():  # adaLN-zero starts at zero; perturb so outputs depend on every input
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    return w, tok, enc, dit


def test_encoder_text_and_image_tokens():
    w, tok, enc, _ = _model()
    ids = tok(["a red striped circle", "a sks circle"])
    h = enc(ids)
    assert h.shape == (2, tok.max_len, enc.cfg.width)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    hi = enc(ids, img)
    assert hi.shape == (2, tok.max_len + enc.num_image_tokens, enc.cfg.width)
    assert enc.context_mask(ids, img).shape == hi.shape[:2]
    # a row whose image is masked out encodes its text exactly as a text-only call does
    hm = enc(ids, img, image_mask=torch.tensor([True, False]))
    assert torch.allclose(hm[1, : tok.max_len], h[1], atol=1e-5)
    assert not torch.allclose(hm[0, : tok.max_len], h[0], atol=1e-3)


def test_dit_velocity_convention_and_shapes():
    _, tok, enc, dit = _model()
    ids = tok(["a red striped circle"] * 3)
    ctx, mask = enc(ids), enc.context_mask(ids)
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.tensor([1.0, 0.5, 0.1])
    v = dit(x, sigma, ctx, mask)
    assert v.shape == x.shape
    x0 = dit.forward_x0(x, sigma, ctx, mask)
    assert torch.allclose(flow.x0_from_velocity(x, sigma, v), x0, atol=1e-4)
    # an Euler step to sigma = 0 lands on the x0 prediction
    assert torch.allclose(flow.euler_step(x, v, sigma, torch.zeros(3)), x0, atol=1e-4)


def test_lora_hooks_every_block_linear():
    _, tok, enc, dit = _model()
    net = LoRANetwork.for_module(dit, rank=2, targets=["blocks.*"], seed=0)
    assert len(net.names) == 4 * 11  # per block: 4 self-attn, 4 cross-attn, 2 MLP and 1 adaLN linear
    ids = tok(["a red solid square"])
    ctx, mask = enc(ids), enc.context_mask(ids)
    x, s = torch.randn(1, 3, 32, 32), torch.tensor([0.75])
    base = dit(x, s, ctx, mask)
    h = net.attach(dit)
    try:
        for m in net.loras:
            torch.nn.init.normal_(m.up, std=0.1)
        with net.mode("student"):
            changed = dit(x, s, ctx, mask)
        with net.mode("off"):
            off = dit(x, s, ctx, mask)
    finally:
        h.remove()
    assert not torch.allclose(changed, base, atol=1e-4)
    assert torch.allclose(off, base, atol=1e-6)


def test_toy_model_samples_with_and_without_image_context():
    _, tok, enc, dit = _model()
    m = ToyModel(tok, enc, dit).eval()
    noise = torch.randn(2, 3, 32, 32)
    sig = schedules.simple_sigmas(4, shift=3.0)
    a = m.sample(["a red solid square", "a blue dotted circle"], noise, sig)
    b = m.sample(["a red solid square", "a blue dotted circle"], noise, sig, images=torch.zeros(2, 3, 32, 32))
    assert a.shape == b.shape == noise.shape and torch.isfinite(a).all()


def test_frechet_distance_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    b = torch.randn(500, 8, generator=g)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a)) < 1e-6
    near = frechet_distance(gaussian_stats(a), gaussian_stats(b))
    far = frechet_distance(gaussian_stats(a), gaussian_stats(b + 2.0))
    assert near < 0.2 < far
    ev = Evaluator(7, 10, 6)
    assert ev.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_dmd_backward_simulation_reaches_the_samplers_states():
    """DMD2's backward simulation must hand each row the state the student's own 4-step sampler visits."""
    _, tok, enc, dit = _model()
    ids = tok(["a red solid square"] * 4)
    ctx, mask = enc(ids), enc.context_mask(ids)
    z = torch.randn(4, 3, 32, 32)
    sched = schedules.simple_sigmas(4, shift=3.0)
    visited = {}
    with torch.no_grad():
        from dopsd_core import sampler
        sampler.sample_euler(lambda x, s: dit(x, s, ctx, mask), z, sched,
                             callback=lambda i, x, v: visited.__setitem__(i, x.clone()))
    k = torch.tensor([0, 1, 2, 3])
    got = distill._backward_simulation(dit, z, ctx, mask, sched, k)
    for row in range(4):
        assert torch.allclose(got[row], visited[int(k[row])][row], atol=1e-5), row


def test_dmd_distillation_trains_student_and_fake_score_only():
    w, tok, enc, dit = _model()
    teacher = ToyModel(tok, enc, dit).eval()
    cfg = distill.DistillConfig(pairs=8, teacher_steps=2, steps=2, batch=4)
    couplings = distill.make_couplings(w, teacher, cfg, log=None)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    student, losses = distill.distill(teacher, couplings, cfg, log=None)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())   # the real score stays frozen
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    # the build distils the reflow student for comparison from the same (now frozen) teacher afterwards
    reflow, losses = distill.distill(teacher, couplings, dataclasses.replace(cfg, method="reflow"), log=None)
    assert len(losses) == 2 and any(not torch.equal(before[k], v) for k, v in reflow.state_dict().items())
