"""Helpers for the node tests: tiny datasets, pairs and jobs built the way a ComfyUI graph builds them."""
import contextlib
import functools
import tempfile
import time
from pathlib import Path

import torch

import comfy_fixtures as F


class FakeFlux2Clip:
    """Deterministic CONDITIONING of the tiny Flux2's context width, for hosts without FLUX.2-klein's text encoder
    (ComfyUI < 0.9.2). Use klein_clip(), which gives the real encoder where the host has it."""

    def tokenize(self, text, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, text):
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        return [[torch.randn(1, 16, F.TINY_FLUX2["context_in_dim"], generator=gen), {"pooled_output": None}]]


@functools.lru_cache(maxsize=1)
def klein_clip():
    """CLIP for the tiny Flux2: ComfyUI's real FLUX.2-klein text encoder (klein_te, layers 9/18/27) built tiny where
    the host has it (>= 0.9.2, e.g. 0.33), else FakeFlux2Clip. Built once per session."""
    if not F.has_klein_text_encoder():
        return FakeFlux2Clip()
    path = Path(tempfile.mkdtemp(prefix="dopsd-klein-te-")) / "tiny_klein_qwen3.safetensors"
    F.save_state_dict(path, F.qwen3_state_dict(F.TINY_KLEIN_QWEN3, seed=0))
    clip = F.load_tiny_klein_clip(path)
    path.unlink()
    return clip


def encode(clip, text):
    """CONDITIONING for `text`, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def images(n=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=gen)


@contextlib.contextmanager
def executor_mode():
    """ComfyUI runs nodes under torch.inference_mode(); so do these tests."""
    with torch.inference_mode():
        yield


def flux2_pairs(nodes, vae, n=2, prefix=""):
    with executor_mode():
        return _flux2_pairs(nodes, vae, n, prefix)


def _flux2_pairs(nodes, vae, n, prefix):
    ds = nodes.dataset_nodes.DOPSDDatasetFromImages.execute(
        images(n), "a red [trigger] circle\na blue [trigger] square" if n == 2 else "a [trigger] thing", "sks", 64)[0]
    return nodes.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, klein_clip(), vae, prefix)[0]


TRAINER_DEFAULTS = dict(method="dopsd", steps=4, inference_steps=4, train_steps=4, schedule="auto", loss_space="x0",
                        rank=4, alpha=4.0, learning_rate=1e-2, ema_decay=0.9, ema_warmup=False, detach_states=True,
                        precision="fp32", grad_accum=1, grad_clip=1.0, gradient_checkpointing=False, seed=0,
                        save_prefix="", save_every=0, preview_every=0, targets="auto")


def start_job(nodes, model, pairs, vae=None, **overrides):
    kwargs = dict(TRAINER_DEFAULTS, **overrides)
    with executor_mode():
        out = nodes.trainer_nodes.DOPSDTrainer.execute(model, pairs, vae=vae, **kwargs)
    return nodes.jobs.get(out[0]["job_id"]), out[0]


def wait_state(job, states, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if job.state in states:
            return job.state
        time.sleep(0.02)
    raise AssertionError(f"job stayed {job.state} (wanted {states}); error={job.error}")


def param_hashes(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def same_weights(before, model):
    after = model.model.state_dict()
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def lora_gradients_plain_and_checkpointed(model, pair, noise):
    """The LoRA gradients of one D-OPSD step (states 1, .75, .5) through ComfyUI's sampling path, with the job's
    block guard, computed twice: without and with gradient checkpointing. The LoRA (rank 4) gets non-zero up
    weights so that both adapters matter. Returns (plain, checkpointed) as flat tensors."""
    from comfyui_dopsd.dopsd_core import objectives
    from comfyui_dopsd.nodes.comfy_bridge import blocks, guided, lora_patch

    mp = model.clone()
    net = lora_patch.build_network(mp, 4, 4.0, "auto", 0.0, 0.9, False, 0)
    with torch.no_grad():
        for m in net.loras:
            m.up.normal_(0, 0.05)
            m.ema_up.normal_(0, 0.05)
    lora_patch.install(mp, net)

    def grads(checkpointing):
        for p in net.trainable_parameters():
            p.grad = None

        def body(mw, mo, latent, _):
            student, teacher = net.predictors(guided.velocity_fn(mw, mo, "positive"),
                                              guided.velocity_fn(mw, mo, "teacher"))
            return objectives.dopsd_step(student, teacher, noise, torch.tensor([1.0, 0.75, 0.5]))

        handle = blocks.guard_blocks(mp, net, checkpointing)
        try:
            with guided.training_flags():  # newer ComfyUI: autograd-safe RoPE while training
                guided.run_guided(mp, {"positive": pair.student, "teacher": pair.teacher}, pair.latent, body)
        finally:
            handle.remove()
        return torch.cat([p.grad.flatten() for p in net.trainable_parameters()])

    try:
        return grads(False), grads(True)
    finally:
        lora_patch.uninstall(mp)

