"""LoRA: targets, modes, base weights untouched, EMA teacher, ComfyUI and PEFT formats."""
import json
import os

import pytest
import torch

from core_models import TinyFlowModel
from dopsd_core import lora, lora_io


def _model_and_net(**kw):
    torch.manual_seed(0)
    model = TinyFlowModel()
    net = lora.LoRANetwork.for_module(model, seed=1, **kw)
    return model, net


def test_targets_by_pattern_and_exclude():
    model, net = _model_and_net(rank=2, targets=["blocks.*", "out"], exclude=["blocks.1"])
    assert net.names == ["blocks.0", "out"]
    with pytest.raises(ValueError, match="no Linear module matches"):
        lora.LoRANetwork.for_module(model, targets=["nothing.*"])


def test_zero_init_changes_nothing_and_modes_switch():
    model, net = _model_and_net(rank=4)
    x, s, c = torch.randn(3, 16), torch.rand(3), torch.randn(1, 8)
    base = model(x, s, c)
    handle = net.attach(model)
    torch.testing.assert_close(model(x, s, c), base)          # B = 0 at init
    with torch.no_grad():
        for m in net.loras:
            m.up.normal_()
    student = model(x, s, c)
    assert not torch.allclose(student, base)
    with net.mode("off"):
        assert torch.equal(model(x, s, c), base)
    with net.mode("teacher"):                                  # EMA still at init (zero delta)
        torch.testing.assert_close(model(x, s, c), base)
    handle.remove()
    assert torch.equal(model(x, s, c), base)


def test_base_weights_bit_identical_after_training_steps():
    model, net = _model_and_net(rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net.attach(model)
    model.requires_grad_(False)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(2, 16), torch.rand(2), torch.randn(1, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ema_update_math_and_warmup():
    _, net = _model_and_net(rank=2, ema_decay=0.9)
    m = net.loras[0]
    with torch.no_grad():
        m.up.fill_(1.0)
    net.ema_update(step=0)
    torch.testing.assert_close(m.ema_up, torch.full_like(m.ema_up, 0.1))
    _, warm = _model_and_net(rank=2, ema_decay=0.9999, ema_warmup=True)
    assert warm.ema_decay_at(0) == pytest.approx(0.1)
    assert warm.ema_decay_at(10 ** 6) == pytest.approx(0.9999)
    assert net.ema_decay_at(0) == 0.9


def test_hook_and_weight_function_agree():
    model, net = _model_and_net(rank=3, alpha=6.0)
    with torch.no_grad():
        for m in net.loras:
            m.up.normal_()
    x = torch.randn(4, model.out.in_features)
    lin, m = model.out, net["out"]
    via_hook = lin(x) + m.delta_output(x)
    via_weight = torch.nn.functional.linear(x, m.weight_function(lin.weight), lin.bias)
    torch.testing.assert_close(via_hook, via_weight, rtol=1e-5, atol=1e-5)


def _randomise(net):
    with torch.no_grad():
        for m in net.loras:
            m.up.normal_()
            m.ema_up.normal_()
            m.ema_down.normal_()


def test_comfy_state_dict_roundtrip_with_metadata(tmp_path):
    model, net = _model_and_net(rank=4, alpha=8.0)
    _randomise(net)
    sd = net.comfy_state_dict()
    assert set(sd) == {f"diffusion_model.{n}.{s}" for n in net.names
                       for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert sd["diffusion_model.out.lora_up.weight"].shape == (16, 4)
    meta = lora_io.lora_metadata("dopsd", "tiny", 4, 8.0, 10, {"lr": 1e-4})
    path = lora_io.save_comfy_lora(str(tmp_path / "a.safetensors"), sd, meta)
    with pytest.raises(FileExistsError, match="overwrit"):
        lora_io.save_comfy_lora(path, sd, meta)
    loaded, meta2 = lora_io.load_comfy_lora(path)
    assert meta2["dopsd.method"] == "dopsd" and json.loads(meta2["dopsd.settings"]) == {"lr": 1e-4}
    _, other = _model_and_net(rank=4, alpha=8.0)
    other.load_comfy_state_dict(loaded)
    x = torch.randn(2, 16)
    for n in net.names:
        a, b = net[n], other[n]
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and a.alpha == b.alpha
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_load_rejects_foreign_keys():
    _, net = _model_and_net(rank=2)
    bad = {"diffusion_model.nope.lora_up.weight": torch.zeros(1, 2),
           "diffusion_model.nope.lora_down.weight": torch.zeros(2, 1)}
    with pytest.raises(KeyError, match="do not match this model"):
        net.load_comfy_state_dict(bad)


def test_peft_export_loads_in_peft_and_matches(tmp_path):
    peft = pytest.importorskip("peft")
    model, net = _model_and_net(rank=4, alpha=8.0, targets=["inp", "blocks.*", "out"])
    _randomise(net)
    x, s, c = torch.randn(3, 16), torch.rand(3), torch.randn(1, 8)
    handle = net.attach(model)
    ours = model(x, s, c).detach()
    handle.remove()
    folder = lora_io.save_peft_adapter(str(tmp_path / "peft"), net.comfy_state_dict(), base_model="tiny")
    peft_model = peft.PeftModel.from_pretrained(model, folder)
    torch.testing.assert_close(peft_model(x, s, c), ours, rtol=1e-5, atol=1e-5)
    # ... and back: PEFT -> ComfyUI format -> our network gives the same factors
    back = lora_io.load_peft_adapter(folder)
    _, net2 = _model_and_net(rank=4, alpha=8.0, targets=["inp", "blocks.*", "out"])
    net2.load_comfy_state_dict(back)
    for n in net.names:
        assert torch.equal(net[n].up, net2[n].up) and net2[n].alpha == 8.0


def test_fuse_loras_is_exact():
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(r, 10, generator=g), torch.randn(6, r, generator=g), a) for r, a in [(2, 4.0), (3, 3.0), (2, 1.0)]]
    fused = lora_io.fuse_loras(parts, out_features=18)
    delta = fused["lora_up.weight"] @ fused["lora_down.weight"] * (float(fused["alpha"]) / fused["lora_down.weight"].shape[0])
    expected = torch.cat([u @ d * (a / d.shape[0]) for d, u, a in parts])
    torch.testing.assert_close(delta, expected)
