"""Cost of one D-OPSD iteration against the work it cannot avoid, and its peak memory against SFT.

Run: .venv/bin/python benchmarks/bench_dopsd_iteration.py [--k 4] [--reps 5] [--batch 2]

Model: a DiT-like stack (joint attention over context tokens + 2x2 latent patches, MLPs; ~4.9 M
params, LoRA rank 16 on every Linear), latents 16x32x32, batch 2, so the forward/backward passes dominate
and Python overhead cannot hide in the noise.

Time. "Unavoidable" = K student forward+backward passes plus K teacher forward passes on the same states,
timed in this run with the same model, batch and LoRA. `dopsd_step` reuses the student's training forward
as the rollout's velocity, so it should add only the Euler updates and bookkeeping (target <= 1.03x).
"Naive" = a separate no-grad rollout to collect the states, then K grad forwards kept alive and one
backward (the obvious implementation, which the official script is apart from its rollout reuse).
On CPU the clock is the process's CPU time (time.process_time) with one intra-op thread: on a machine
shared with other jobs, wall time mostly measures the neighbours (we saw a 10x spread between identical
repetitions with 2 threads on 2 busy cores), while CPU time measures the work done. On CUDA it is wall
time after synchronisation. Times are the minimum over interleaved repetitions, so disturbances that
remain hit every variant alike rather than one of them; medians are printed too.

Memory. CPU: `dopsd_core.memtrack.PeakTensorMemory`, a TorchDispatchMode that counts every tensor storage
created during the step (forward and backward: activations, saved tensors, gradients, temporaries) and
releases it when the storage is really freed (a weakref finalizer on the storage). It is the CPU
analogue of torch.cuda.max_memory_allocated: the peak bytes above what was alive before the step
(weights, LoRA). Why not the alternatives: RSS (ru_maxrss, even in a fresh subprocess) is dominated by the
weights, the interpreter and glibc's malloc cache and only ever grows, so it cannot resolve one graph
versus four; tracemalloc does not see torch's allocator; torch.profiler's CPU memory timeline missed half
of a plain 2 x 100 MB allocation when we checked it. With CUDA, torch.cuda.max_memory_allocated is printed
as well. Target: D-OPSD peak <= 1.15x one SFT step (one forward+backward) on the same model and batch.

Exits non-zero if a target is missed.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dopsd_core import lora, objectives, schedules  # noqa: E402
from dopsd_core.memtrack import PeakTensorMemory  # noqa: E402

TIME_TARGET, MEM_TARGET = 1.03, 1.15


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


def build(seed=0, batch=2, size=32, device="cpu"):
    torch.manual_seed(seed)
    model = TinyDiT().requires_grad_(False).to(device)
    net = lora.LoRANetwork.for_module(model, rank=16, seed=seed)
    net.attach(model)
    with torch.no_grad():  # a student and a teacher that differ, as after some training
        for m in net.loras:
            m.up.normal_(0, 0.02)
            m.ema_up.normal_(0, 0.02)
    # the teacher's context is longer: text + image tokens, as in D-OPSD's c_t
    cs, ct = torch.randn(1, 32, 64, device=device), torch.randn(1, 48, 64, device=device)

    student, teacher = net.predictors(lambda x, s: model(x, s, cs), lambda x, s: model(x, s, ct))

    x0 = torch.randn(batch, 16, size, size, device=device)
    noise = torch.randn(batch, 16, size, size, device=device)
    return model, net, student, teacher, x0, noise


def unavoidable(student, teacher, states, sigmas):
    """Exactly K student forward+backward and K teacher forwards, nothing else."""
    for x, s in zip(states, sigmas):
        sig = s.expand(x.shape[0])
        with torch.no_grad():
            v_t = teacher(x, sig)
        F.mse_loss(student(x, sig), v_t).backward()


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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, net, device):
    clock = time.perf_counter if device == "cuda" else time.process_time
    for p in net.trainable_parameters():
        p.grad = None
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def peak_memory(fn, net, device):
    """(tracked peak bytes, CUDA max_memory_allocated delta or None) of one call."""
    for p in net.trainable_parameters():
        p.grad = None
    cuda_peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakTensorMemory() as m:
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated() - base
    return m.peak, cuda_peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4, help="rollout states (official: 4 of an 8-step schedule)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU time is summed over them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    model, net, student, teacher, x0, noise = build(batch=args.batch, device=dev)
    sigmas = schedules.rollout_sigmas(schedules.simple_sigmas(2 * args.k, 3.0), args.k).to(dev)
    opts = objectives.DOPSDOptions()
    states = objectives.dopsd_step(student, teacher, noise, sigmas, opts, backward=False).states
    sft_sigma = torch.full((x0.shape[0],), 0.7, device=dev)

    variants = {
        "dopsd": lambda: objectives.dopsd_step(student, teacher, noise, sigmas, opts),
        "unavoidable": lambda: unavoidable(student, teacher, states, sigmas),
        "naive": lambda: naive(student, teacher, noise, sigmas),
        "sft(1 pass)": lambda: objectives.sft_step(student, x0, noise, sft_sigma, opts),
    }
    for fn in variants.values():  # warm-up
        timed(fn, net, dev)
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(timed(fn, net, dev))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}

    mem = {name: peak_memory(variants[name], net, dev) for name in ("sft(1 pass)", "dopsd", "naive")}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M params, LoRA {sum(p.numel() for p in net.trainable_parameters()) / 1e6:.2f} M"
          f" (rank 16, all Linear), batch {x0.shape[0]} x {tuple(x0.shape[1:])}, K = {args.k}, device {dev}, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved reps, "
          f"{'wall' if dev == 'cuda' else 'process CPU'} time")
    for name in variants:
        print(f"time {name:12s} min {best[name] * 1e3:8.1f} ms  median {med[name] * 1e3:8.1f} ms  "
              f"(all: {', '.join(f'{t * 1e3:.0f}' for t in times[name])})")
    for name, (tracked, cuda_peak) in mem.items():
        extra = f"   cuda max_memory_allocated {cuda_peak / 2 ** 20:8.1f} MiB" if cuda_peak is not None else ""
        print(f"peak tensor memory above weights, {name:12s}: {tracked / 2 ** 20:8.1f} MiB{extra}")
    t_ratio = best["dopsd"] / best["unavoidable"]
    m_ratio = mem["dopsd"][0] / mem["sft(1 pass)"][0]
    print(f"time ratio dopsd/unavoidable = {t_ratio:.3f} (target <= {TIME_TARGET}); "
          f"median-based {med['dopsd'] / med['unavoidable']:.3f}")
    print(f"time ratio naive/dopsd = {best['naive'] / best['dopsd']:.3f}")
    print(f"memory ratio dopsd/sft = {m_ratio:.3f} (target <= {MEM_TARGET})")
    print(f"memory ratio naive/sft = {mem['naive'][0] / mem['sft(1 pass)'][0]:.3f}")
    if mem["dopsd"][1] is not None:
        print(f"cuda memory ratio dopsd/sft = {mem['dopsd'][1] / mem['sft(1 pass)'][1]:.3f}")
    ok = t_ratio <= TIME_TARGET and m_ratio <= MEM_TARGET
    print("PASS" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
