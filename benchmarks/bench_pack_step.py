"""What the pack's ComfyUI plumbing costs on top of a raw D-OPSD step: step time and activation memory.

Run: .venv/bin/python benchmarks/bench_pack_step.py [--reps 3] [--dim 384] [--layers 6] [--size 32]

Model: ComfyUI's own Z-Image class (supported_models.ZImage -> NextDiT) with random weights, built through the
test fixtures, medium-sized so the passes dominate (width --dim, --layers blocks + 2 refiners, latent
16 x size x size, 32 text tokens, LoRA rank 16 on the default targets).

- raw: `objectives.dopsd_step` with velocities from `BaseModel.apply_model` on the model, the LoRA attached
  by plain forward hooks (`LoRANetwork.attach`), gradient checkpointing by `grad_checkpoint.checkpoint_modules`;
  no ComfyUI sampling path, no patcher, no guard.
- pack: one example of a job's step exactly as the job runs it: `jobs.ComfyTask.run` (load_models_gpu with the
  training memory, CFGGuider.sample, calc_cond_batch, the LoRA injected by the patcher) inside the block guard
  and training flags of `Job._step_context`.
Both compute the same K = 4 student forward+backward and teacher passes. Time is process CPU time on one
thread, minimum over interleaved repetitions (as bench_dopsd_iteration.py explains); memory is the peak of
`dopsd_core.memtrack.PeakTensorMemory` (tensors created during the step above what existed before).

Targets (issue 12): pack/raw time <= 1.03 and memory <= 1.05, with and without gradient checkpointing.
Prints the ratios; exits 1 if a target is missed. `--guard-all-blocks` measures the guard as it was before
issue 12 (activation copies for Z-Image's blocks too).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import comfy_env  # noqa: E402

comfy_env.setup(threads=1)
import torch  # noqa: E402

import comfy_fixtures as F  # noqa: E402

TIME_TARGET, MEM_TARGET = 1.03, 1.05


def build(args, N):
    head = args.dim // 4
    axes = [head // 4, (head - head // 4) // 2]
    cfg = dict(F.TINY_ZIMAGE, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=4,
               axes_dims=axes + [head - sum(axes)])
    with torch.inference_mode():  # as a loader node makes them
        model = F.load_diffusion_model("ZImage", cfg, F.diffusion_state_dict("ZImage", cfg, seed=0))
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 32, F.ZIMAGE_TE_HIDDEN, generator=gen), {}]]
    teacher = [[torch.randn(1, 48, F.ZIMAGE_TE_HIDDEN, generator=gen), {}]]
    latent = torch.randn(1, 16, args.size, args.size, generator=gen)
    pair = N.pairs.Pair("bench", cond, teacher, latent, torch.zeros(1, args.size * 8, args.size * 8, 3))
    return model, pair


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--guard-all-blocks", action="store_true",
                    help="copy saved activations for every block, as before issue 12 (for comparison)")
    args = ap.parse_args()
    pack = comfy_env.load_pack()
    from comfyui_dopsd.dopsd_core import grad_checkpoint, objectives
    from comfyui_dopsd.dopsd_core.memtrack import PeakTensorMemory
    from comfyui_dopsd.nodes import jobs, pairs as pairs_mod  # noqa: F401
    from comfyui_dopsd.nodes.comfy_bridge import blocks, guided, lora_patch
    N = pack.nodes
    if args.guard_all_blocks:
        blocks.updates_in_place = lambda block: True
    model, pair = build(args, N)
    sigmas = torch.tensor([1.0, 0.875, 0.75, 0.625])
    opts = objectives.DOPSDOptions("x0")
    clone = model.clone()
    with torch.inference_mode(False):
        net = lora_patch.build_network(clone, 16, 16.0, "auto", 0.0, 0.9, False, 0)
        with torch.no_grad():
            for m in net.loras:
                m.up.normal_(0, 0.02)
                m.ema_up.normal_(0, 0.02)
    pair = N.pairs.detached_copy([pair])[0]
    noise = torch.randn(pair.latent.shape, generator=torch.Generator().manual_seed(1))

    def compute(student, teacher, x0):
        return objectives.dopsd_step(student, teacher, noise, sigmas, opts)

    attachment = lora_patch.install(clone, net)

    def pack_step(checkpointing):
        task = jobs.ComfyTask(clone, net, [pair], 0, attachment, checkpointing, "fp32")
        handle = blocks.guard_blocks(clone, net, checkpointing)
        try:
            with guided.training_flags():
                task.run(0, compute)
        finally:
            handle.remove()

    base = model.model  # the raw path: the same BaseModel, hooks of our own

    def raw_step(checkpointing):
        root = base.diffusion_model
        clone.eject_model()  # the job's injected hooks must not run in the raw path too
        swapped = lora_patch._alias_inference_tensors(root)  # what any trainer needs for loader-made weights
        handle = net.attach(root)
        ck = grad_checkpoint.checkpoint_modules(blocks.top_level_blocks(model), net) if checkpointing else None
        try:
            def velocity(c):
                def fn(x, s):
                    context = c[0][0].to(x.device)
                    denoised = base.apply_model(x, s, c_crossattn=context, num_tokens=context.shape[1])
                    return (x - denoised) / s.view(-1, 1, 1, 1)
                return fn
            compute(*net.predictors(velocity(pair.student), velocity(pair.teacher)), pair.latent)
        finally:
            if ck is not None:
                ck.remove()
            handle.remove()
            lora_patch._restore(swapped)

    def measure(fn, checkpointing):
        for p in net.trainable_parameters():
            p.grad = None
        with torch.inference_mode(False), torch.enable_grad():
            t0 = time.process_time()
            with PeakTensorMemory() as mem:
                fn(checkpointing)
            return time.process_time() - t0, mem.peak

    lora_patch.uninstall(clone)
    attachment = lora_patch.install(clone, net)
    ok = True
    print(f"Z-Image (ComfyUI NextDiT) dim {args.dim}, {args.layers}+2 blocks, latent 16x{args.size}x{args.size}, "
          f"LoRA {sum(p.numel() for p in net.trainable_parameters()) / 1e6:.2f} M, K=4, 1 thread, {args.reps} reps")
    for checkpointing in (False, True):
        measure(pack_step, checkpointing), measure(raw_step, checkpointing)  # warm-up
        times = {"pack": [], "raw": []}
        mems = {}
        for _ in range(args.reps):
            for name, fn in (("raw", raw_step), ("pack", pack_step)):
                t, m = measure(fn, checkpointing)
                times[name].append(t)
                mems[name] = m
        t_ratio = min(times["pack"]) / min(times["raw"])
        m_ratio = mems["pack"] / max(mems["raw"], 1)
        tag = "with checkpointing" if checkpointing else "without checkpointing"
        print(f"{tag}: time raw {min(times['raw']) * 1e3:.0f} ms, pack {min(times['pack']) * 1e3:.0f} ms -> "
              f"pack/raw {t_ratio:.3f} (target <= {TIME_TARGET}); activation memory raw {mems['raw'] / 2**20:.1f} "
              f"MiB, pack {mems['pack'] / 2**20:.1f} MiB -> pack/raw {m_ratio:.3f} (target <= {MEM_TARGET})")
        ok &= t_ratio <= TIME_TARGET and m_ratio <= MEM_TARGET
    lora_patch.uninstall(clone)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
