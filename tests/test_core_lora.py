"""LoRA: targets, modes, base weights untouched, EMA teacher, ComfyUI and PEFT formats."""
import json
import os

import pytest
import torch

from core_models import TinyFlowModel, single_thread  # noqa: F401 (autouse)
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


def test_fuse_qkv_and_split_are_exact():
    g = torch.Generator().manual_seed(1)
    d_in, d = 12, 6
    parts = {n: {"lora_down.weight": torch.randn(r, d_in, generator=g), "lora_up.weight": torch.randn(d, r, generator=g),
                 "alpha": torch.tensor(a)} for n, r, a in [("q", 2, 4.0), ("k", 3, 3.0), ("v", 1, 8.0)]}
    fused = lora_io.fuse_qkv_loras(parts["q"], parts["k"], parts["v"], out_features=3 * d)
    assert fused["lora_down.weight"].shape == (6, d_in) and float(fused["alpha"]) == 6.0

    def delta(p):
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        return up @ down * (float(p["alpha"]) / down.shape[0])

    torch.testing.assert_close(delta(fused), torch.cat([delta(parts[n]) for n in "qkv"]))
    for (down, up, alpha), n in zip(lora_io.split_fused_lora(fused, [d, d, d]), "qkv"):
        torch.testing.assert_close(up @ down * (alpha / down.shape[0]), delta(parts[n]))
    with pytest.raises(ValueError, match="rows"):
        lora_io.fuse_qkv_loras(parts["q"], parts["k"], parts["v"], out_features=5)


def test_peft_mixed_ranks_and_alphas_roundtrip(tmp_path):
    peft = pytest.importorskip("peft")
    model, net = _model_and_net(rank=4, alpha=8.0, targets=["inp", "blocks.*", "out"])
    _randomise(net)
    sd = net.comfy_state_dict()
    # give one module another rank and alpha, as rank_pattern/alpha_pattern must carry
    g = torch.Generator().manual_seed(3)
    sd["diffusion_model.blocks.1.lora_down.weight"] = torch.randn(2, 64, generator=g)
    sd["diffusion_model.blocks.1.lora_up.weight"] = torch.randn(64, 2, generator=g)
    sd["diffusion_model.blocks.1.alpha"] = torch.tensor(1.0)
    ours = lora.LoRANetwork.for_module(model, rank=4, targets=["inp", "blocks.*", "out"])
    ours.load_comfy_state_dict(sd)
    assert ours["blocks.1"].rank == 2 and ours["blocks.1"].alpha == 1.0
    x, s, c = torch.randn(3, 16), torch.rand(3), torch.randn(1, 8)
    handle = ours.attach(model)
    expected = model(x, s, c).detach()
    handle.remove()
    folder = lora_io.save_peft_adapter(str(tmp_path / "peft"), sd, metadata={"dopsd.method": "dopsd"})
    config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    peft_model = peft.PeftModel.from_pretrained(model, folder)
    torch.testing.assert_close(peft_model(x, s, c), expected, rtol=1e-5, atol=1e-5)
    back = lora_io.load_peft_adapter(folder)
    assert float(back["diffusion_model.blocks.1.alpha"]) == 1.0 and float(back["diffusion_model.out.alpha"]) == 8.0
    for k, v in sd.items():
        torch.testing.assert_close(back[k].float(), v.float())


def test_official_checkpoint_layout_and_name_map(tmp_path):
    """Official D-OPSD checkpoints hold student/ and teacher/ PEFT adapters; names can be mapped."""
    pytest.importorskip("peft")
    model, net = _model_and_net(rank=2, targets=["blocks.*"])
    _randomise(net)
    root = tmp_path / "lora_gen_step_500"
    lora_io.save_peft_adapter(str(root / "student"), net.comfy_state_dict(which="student"),
                              name_map=lambda n: n.replace("blocks.", "layers."))
    lora_io.save_peft_adapter(str(root / "teacher"), net.comfy_state_dict(which="teacher"),
                              name_map=lambda n: n.replace("blocks.", "layers."))
    back = lambda n: n.replace("layers.", "blocks.")  # noqa: E731
    student = lora_io.load_peft_adapter(str(root), name_map=back)           # student by default
    teacher = lora_io.load_peft_adapter(str(root), name_map=back, adapter="teacher")
    torch.testing.assert_close(student["diffusion_model.blocks.0.lora_up.weight"], net["blocks.0"].up)
    torch.testing.assert_close(teacher["diffusion_model.blocks.0.lora_up.weight"], net["blocks.0"].ema_up)
    out = lora_io.convert_peft_to_comfy(str(root), str(tmp_path / "converted.safetensors"), name_map=back)
    sd, meta = lora_io.load_comfy_lora(out)
    assert meta["dopsd.source"].endswith("lora_gen_step_500") and set(sd) == set(net.comfy_state_dict())
    with pytest.raises(FileNotFoundError, match="student, teacher"):
        lora_io.load_peft_adapter(str(root), adapter="ema")


def test_metadata_header_fields(tmp_path):
    meta = lora_io.lora_metadata("dopsd", "ZImage", 64, 128.0, 2000, {"lr": 1e-4, "loss_space": "x0"},
                                 targets=["attention.*"])
    for key in ("dopsd.method", "dopsd.base_model", "dopsd.rank", "dopsd.alpha", "dopsd.steps", "dopsd.settings",
                "dopsd.version", "dopsd.targets"):
        assert key in meta and isinstance(meta[key], str)
    _, net = _model_and_net(rank=2)
    path = lora_io.save_comfy_lora(str(tmp_path / "m.safetensors"), net.comfy_state_dict(), meta)
    assert lora_io.load_comfy_lora(path)[1]["dopsd.steps"] == "2000"


def test_stock_comfyui_loader_reads_every_key_and_the_same_delta(caplog):
    """ComfyUI's own key map + load_lora + calculate_weight: no "lora key not loaded", identical weights."""
    try:
        import comfy.lora
    except Exception:  # pragma: no cover - only without ComfyUI on the path
        pytest.skip("ComfyUI is not importable")
    import logging
    import types

    model, net = _model_and_net(rank=3, alpha=5.0)
    _randomise(net)
    host = torch.nn.Module()
    host.diffusion_model = model
    host.model_config = types.SimpleNamespace(unet_config={})
    key_map = comfy.lora.model_lora_keys_unet(host, {})
    sd = net.comfy_state_dict()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert set(patches) == {f"diffusion_model.{n}.weight" for n in net.names}
    for n in net.names:
        w = model.get_submodule(n).weight.detach().clone()
        key = f"diffusion_model.{n}.weight"
        theirs = comfy.lora.calculate_weight([(1.0, patches[key], 1.0, None, None)], w.clone(), key)
        torch.testing.assert_close(theirs, w + net[n].delta_weight("student"), rtol=1e-5, atol=1e-6)
