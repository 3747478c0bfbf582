"""Helpers for the node tests: tiny datasets, pairs and jobs built the way a ComfyUI graph builds them."""
import contextlib
import time

import torch

import comfy_fixtures as F


class FakeFlux2Clip:
    """Deterministic CONDITIONING of the tiny Flux2's context width (0.3.75 has no klein text encoder)."""

    def tokenize(self, text, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, text):
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        return [[torch.randn(1, 16, F.TINY_FLUX2["context_in_dim"], generator=gen), {"pooled_output": None}]]


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
    return nodes.teacher_nodes.DOPSDTeacherReferenceLatent.execute(ds, FakeFlux2Clip(), vae, prefix)[0]


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
