"""Cost of one D-OPSD iteration against the work it cannot avoid, and its peak memory against SFT.

Run: .venv/bin/python benchmarks/bench_dopsd_iteration.py [--k 4] [--reps 5]

Time. "Unavoidable" = K student forward+backward passes plus K teacher forward passes on the same states,
timed in this run with the same model, batch and LoRA. `dopsd_step` reuses the student's training forward
as the rollout's velocity, so it should add only the Euler updates and bookkeeping (target <= 1.10x).
"Naive" = a separate no-grad rollout to collect states, then K grad forwards kept alive and one backward
(the obvious implementation). Times are the minimum over interleaved repetitions, so a busy neighbour
inflates every variant alike rather than one of them.

Memory. Peak bytes of tensors allocated during the step, above what was live before it (weights, LoRA),
from torch.profiler's memory timeline (profile_memory=True), which tracks every CPU tensor allocation and
free, i.e. activations, saved tensors, gradients and temporaries. (RSS would be dominated by the weights
and the allocator's caching and say nothing about the graph.) On CUDA the script uses
torch.cuda.max_memory_allocated instead. Target: D-OPSD peak <= 1.15x one SFT step on the same batch.
Exits non-zero if a target is missed.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dopsd_core import lora, objectives, schedules  # noqa: E402

TIME_TARGET, MEM_TARGET = 1.10, 1.15


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h):
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + self.proj(a)
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TinyDiT(nn.Module):
    """Joint attention over context tokens and latent patches, like Z-Image's single-stream DiT."""

    def __init__(self, channels=16, patch=2, dim=256, depth=6, heads=4, ctx_dim=64):
        super().__init__()
        self.patch = patch
        self.x_in = nn.Linear(channels * patch * patch, dim)
        self.c_in = nn.Linear(ctx_dim, dim)
        self.t_in = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x, sigma, ctx):
        b, c, hgt, wid = x.shape
        p = self.patch
        tok = x.view(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        h = self.x_in(tok) + self.t_in(sigma.view(b, 1, 1).to(x.dtype))
        h = torch.cat([self.c_in(ctx.expand(b, -1, -1)), h], dim=1)
        for blk in self.blocks:
            h = blk(h)
        out = self.out(h[:, ctx.shape[1]:])
        return out.view(b, hgt // p, wid // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hgt, wid)


def build(seed=0, batch=2, size=32):
    torch.manual_seed(seed)
    model = TinyDiT().requires_grad_(False)
    net = lora.LoRANetwork.for_module(model, rank=16, seed=seed)
    net.attach(model)
    with torch.no_grad():
        for m in net.loras:
            m.up.normal_(0, 0.02)
            m.ema_up.normal_(0, 0.02)
    cs, ct = torch.randn(1, 32, 64), torch.randn(1, 48, 64)

    def student(x, s):
        with net.mode("student"):
            return model(x, s, cs)

    def teacher(x, s):
        with net.mode("teacher"):
            return model(x, s, ct)

    x0 = torch.randn(batch, 16, size, size)
    noise = torch.randn(batch, 16, size, size)
    return model, net, student, teacher, x0, noise


def unavoidable(student, teacher, states, sigmas):
    """Exactly K student forward+backward and K teacher forwards, nothing else."""
    for x, s in zip(states, sigmas):
        sig = s.expand(x.shape[0])
        v_s = student(x, sig)
        with torch.no_grad():
            v_t = teacher(x, sig)
        F.mse_loss(v_s, v_t).backward()


def naive(student, teacher, noise, sigmas):
    """Separate no-grad rollout, then all K graphs kept alive and one backward."""
    states, x = [], sigmas[0] * noise
    with torch.no_grad():
        for k, s in enumerate(sigmas):
            states.append(x)
            v = student(x, s.expand(x.shape[0]))
            if k + 1 < len(sigmas):
                x = x + (sigmas[k + 1] - s) * v
    total = 0
    for x, s in zip(states, sigmas):
        sig = s.expand(x.shape[0])
        v_s = student(x, sig)
        with torch.no_grad():
            v_t = teacher(x, sig)
        total = total + F.mse_loss(v_s, v_t)
    (total / len(sigmas)).backward()


def timed(fn, net):
    for p in net.trainable_parameters():
        p.grad = None
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_bytes(fn, net):
    for p in net.trainable_parameters():
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "timeline.json")
        with warnings.catch_warnings():  # deprecated for CUDA users; still the CPU timeline
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4, help="rollout states (official: 4 of an 8-step schedule)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, net, student, teacher, x0, noise = build()
    sigmas = schedules.rollout_sigmas(schedules.simple_sigmas(2 * args.k, 3.0), args.k)
    opts = objectives.DOPSDOptions()
    states = objectives.dopsd_step(student, teacher, noise, sigmas, opts, backward=False).states

    variants = {
        "dopsd": lambda: objectives.dopsd_step(student, teacher, noise, sigmas, opts),
        "unavoidable": lambda: unavoidable(student, teacher, states, sigmas),
        "naive": lambda: naive(student, teacher, noise, sigmas),
    }
    for fn in variants.values():  # warm-up
        timed(fn, net)
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(timed(fn, net))
    best = {k: min(v) for k, v in times.items()}

    sft_sigma = torch.full((x0.shape[0],), 0.7)
    mem = {
        "sft": peak_bytes(lambda: objectives.sft_step(student, x0, noise, sft_sigma, opts), net),
        "dopsd": peak_bytes(variants["dopsd"], net),
        "naive": peak_bytes(variants["naive"], net),
    }
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M params, LoRA {sum(p.numel() for p in net.trainable_parameters()) / 1e6:.2f} M, "
          f"batch {x0.shape[0]} x {tuple(x0.shape[1:])}, K = {args.k}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{args.threads} threads, {args.reps} reps")
    for name in variants:
        print(f"time {name:12s} min {best[name] * 1e3:8.1f} ms   (all: {', '.join(f'{t * 1e3:.0f}' for t in times[name])})")
    for name, b in mem.items():
        print(f"peak memory above weights, {name:6s}: {b / 2 ** 20:8.1f} MiB")
    t_ratio = best["dopsd"] / best["unavoidable"]
    m_ratio = mem["dopsd"] / mem["sft"]
    print(f"time ratio dopsd/unavoidable = {t_ratio:.3f} (target <= {TIME_TARGET})")
    print(f"time ratio naive/dopsd = {best['naive'] / best['dopsd']:.3f}")
    print(f"memory ratio dopsd/sft = {m_ratio:.3f} (target <= {MEM_TARGET})")
    print(f"memory ratio naive/sft = {mem['naive'] / mem['sft']:.3f}")
    ok = t_ratio <= TIME_TARGET and m_ratio <= MEM_TARGET
    print("PASS" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
