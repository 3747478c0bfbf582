"""The toy world's model as ComfyUI MODEL / CLIP / VAE (nodes/comfy_bridge/toy_models.py), with random weights:
stock nodes sample it, the native-VLM teacher accepts its encoder, and a D-OPSD job trains a LoRA on it.
(Plumbing only: trained toy weights and their measurements belong to the toy-world experiment.)"""
import sys

import pytest
import torch

from nodes_support import executor_mode, wait_state


@pytest.fixture(scope="module")
def toy(pack):
    from comfyui_dopsd import dopsd_core
    sys.modules.setdefault("dopsd_core", dopsd_core)  # toyworld imports the library by its top-level name
    from comfyui_dopsd.nodes.comfy_bridge import toy_models
    from comfyui_dopsd.toyworld import concepts, dit, encoder
    torch.manual_seed(0)
    tok = encoder.Tokenizer(concepts.make_world(0).vocabulary())
    with executor_mode():
        net = dit.ToyDiT(dit.DiTConfig())
        with torch.no_grad():  # the output layers start at zero; random ones make predictions depend on inputs
            for layer in (net.ada_out, net.out):
                layer.weight.normal_(0, 0.05)
        enc = encoder.ToyVLM(encoder.EncoderConfig(vocab_size=len(tok)))
        return (toy_models.model_patcher(net, 3.0), toy_models.ToyClip(enc, tok), toy_models.ToyVAE())


def _sample(model, clip, text="a red striped circle", seed=0):
    import nodes as comfy_nodes
    with executor_mode():
        cond = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
        latent = {"samples": torch.zeros(1, 3, 32, 32)}
        return comfy_nodes.KSampler().sample(model, seed, 4, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]


def test_stock_nodes_sample_and_decode_the_toy_model(toy):
    import nodes as comfy_nodes
    model, clip, vae = toy
    out = _sample(model, clip)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(out, _sample(model, clip))
    assert not torch.equal(out, _sample(model, clip, "a blue dotted square"))
    image = comfy_nodes.VAEDecode().decode(vae, {"samples": out})[0]
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() and image.max() <= 1
    again = comfy_nodes.VAEEncode().encode(vae, image)[0]["samples"]
    torch.testing.assert_close(again, out.clamp(-1, 1), atol=1e-6, rtol=0)


def test_dopsd_job_on_the_toy_model_with_the_native_vlm_teacher(toy, pack):
    from comfyui_dopsd.nodes import dataset_nodes, jobs, lora_nodes, teacher_nodes, trainer_nodes
    model, clip, vae = toy
    with executor_mode():
        ds = dataset_nodes.DOPSDDatasetFromImages.execute(torch.rand(3, 32, 32, 3), "a [trigger] circle", "sks", 32)[0]
        pairs = teacher_nodes.DOPSDTeacherNativeVLM.execute(ds, clip, vae)[0]
        assert pairs[0].teacher[0][0].shape[1] > pairs[0].student[0][0].shape[1]  # image tokens in c_t
        out = trainer_nodes.DOPSDTrainer.execute(
            model, pairs, vae=vae, method="dopsd", steps=4, inference_steps=4, train_steps=4, schedule="auto",
            loss_space="x0", rank=4, alpha=4.0, learning_rate=1e-2, ema_decay=0.9, ema_warmup=False,
            detach_states=True, precision="fp32", grad_accum=1, grad_clip=1.0, gradient_checkpointing=True, seed=0,
            save_prefix="", save_every=0, preview_every=4, targets="auto")[0]
    job = jobs.get(out["job_id"])
    assert wait_state(job, ("finished", "error")) == "finished", job.error
    assert all(loss > 0 for _, loss in job.status()["losses"]) and job.previews["teacher"]
    before = _sample(model, clip, "a sks circle")
    with executor_mode():
        patched = lora_nodes.DOPSDJobLoRA.execute(model, out, 1.0, "student")[0]
    assert not torch.equal(_sample(patched, clip, "a sks circle"), before)


def test_toy_world_loader_and_concept_nodes_use_the_shipped_weights(pack):
    import nodes as comfy_nodes
    from comfyui_dopsd.nodes import toyworld_nodes
    with executor_mode():
        model, clip, vae = toyworld_nodes.DOPSDToyWorldLoader.execute(False).result
        images, captions, concept = toyworld_nodes.DOPSDToyWorldConcept.execute("colour", 6, 2, 0).result
    assert toyworld_nodes.DOPSDToyWorldLoader.validate_inputs(False) is True
    assert images.shape == (6, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    lines = captions.splitlines()
    assert len(lines) == 6 and len(set(lines)) == 2 and all("[trigger]" in c for c in lines)
    assert concept == "held-out colour: rose"
    out = _sample(model, clip, "a red circle")
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the trained model follows its prompt: a red circle is redder than a blue one (a random model would not be)
    red = comfy_nodes.VAEDecode().decode(vae, {"samples": out})[0].mean(dim=(0, 1, 2))
    blue = comfy_nodes.VAEDecode().decode(vae, {"samples": _sample(model, clip, "a blue circle")})[0].mean(dim=(0, 1, 2))
    assert red[0] - red[2] > blue[0] - blue[2] + 0.05, (red, blue)


def test_toy_world_loader_without_weights_names_the_fix(pack, tmp_path, monkeypatch):
    from comfyui_dopsd.nodes import toyworld_nodes
    from comfyui_dopsd.toyworld import weights
    monkeypatch.setattr(weights, "SHIPPED_DIR", str(tmp_path / "shipped"))
    monkeypatch.setenv("DOPSD_TOYWORLD_CACHE", str(tmp_path / "cache"))
    message = toyworld_nodes.DOPSDToyWorldLoader.validate_inputs(False)
    assert isinstance(message, str) and "toyworld_build.py" in message and "allow_build" in message
    assert toyworld_nodes.DOPSDToyWorldLoader.validate_inputs(True) is True
    with pytest.raises(ValueError, match="toyworld_build.py"):
        toyworld_nodes.DOPSDToyWorldLoader.execute(False)
