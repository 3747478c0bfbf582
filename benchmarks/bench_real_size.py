"""Real-size training step of the pack, next to ComfyUI's TrainLoraNode and the analytic memory budget.

    python benchmarks/bench_real_size.py --comfyui /path/to/ComfyUI              # GPU: real sizes, ~5 min on one H200
    python benchmarks/bench_real_size.py --comfyui ... --tiny --scaling 2        # CPU, tiny models, seconds (CI)

Models are built through ComfyUI's own classes (comfy.supported_models.ZImage / Flux2 -> model_base ->
NextDiT / Flux) with random weights drawn on the device, so nothing is downloaded. Real sizes follow the
public checkpoints as ComfyUI's model_detection reads them: Z-Image-Turbo (dim 3840, 30 layers, 2 refiner
layers, 30 heads, Qwen3-4B context 2560) and FLUX.2-klein 4B (hidden 3072, 5 double + 20 single blocks,
24 heads, context 3 x 2560) and 9B (hidden 4096, 8 + 24 blocks, 32 heads, context 3 x 4096).

Per model it measures, at --resolution (1024) with gradient checkpointing and bf16 autocast, LoRA rank 16:
- pack step: one optimizer step of the pack's D-OPSD (K = 4 rollout states, 4 student forward+backward and
  4 teacher forwards) through the same code the node and the torchrun launcher run (comfy_bridge/training.ComfyTask,
  lora_patch, blocks, dopsd_core.distributed.DistributedTrainer): seconds per step (mean over --steps after
  one warm-up step) and peak GPU memory (torch.cuda.max_memory_allocated, weights included);
- the same with fp8 (e4m3fn) base weights when --fp8 is given (bf16 compute);
- ComfyUI's TrainLoraNode (flow-matching SFT, one forward+backward per step, its own rank-16 LoRA) on the
  same model: seconds per step as (time of 1 + n steps - time of 1 step) / n, and its peak memory;
- with --scaling N: the pack step under torchrun-style ranks 1..N (one GPU each; gloo on CPU), global batch
  = ranks, so the table shows examples per second.
The analytic budgets (Z-Image r16 15.5 GiB, klein-4B 10.2 GiB, bf16) are printed next to the measured peaks.
Conditioning is synthetic (random features of the real width): student = 128 text tokens; Z-Image teacher =
128 text + 384 image-feature tokens (the VLM splice's image tokens); klein teacher = the text plus the target
as a reference latent (its edit path).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GiB = 1024 ** 3

REAL = {
    "zimage": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                              n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, multiple_of=256,
                              ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, axes_dims=[32, 48, 48],
                              axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                              time_scale=1000.0, pad_tokens_multiple=32)),
    "klein4b": ("Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                              context_in_dim=3 * 2560, hidden_size=3072, mlp_ratio=3.0, num_heads=24, depth=5,
                              depth_single_blocks=20, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                              qkv_bias=False, guidance_embed=False, global_modulation=True, mlp_silu_act=True,
                              ops_bias=False, default_ref_method="index", ref_index_scale=10.0)),
}
REAL["klein9b"] = ("Flux2", dict(REAL["klein4b"][1], context_in_dim=3 * 4096, hidden_size=4096, num_heads=32, depth=8,
                                 depth_single_blocks=24))
BUDGET_GIB = {"zimage": 15.5, "klein4b": 10.2}
LATENT = {"ZImage": (16, 8), "Flux2": (128, 16)}   # channels, pixels per latent cell


def _launcher():
    spec = importlib.util.spec_from_file_location("dopsd_torchrun", os.path.join(REPO, "scripts", "dopsd_torchrun.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_for(name: str, tiny: bool):
    if not tiny:
        return REAL[name]
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import comfy_fixtures as F  # the tests' tiny shapes, one source of truth
    sys.path.pop(0)
    return ("ZImage", F.TINY_ZIMAGE) if name == "zimage" else ("Flux2", F.TINY_FLUX2)


def host_config(cfg: dict) -> dict:
    """Newer ComfyUI's FluxParams take txt_ids_dims (FLUX.2 text positions on axis 3); 0.3.75's do not."""
    import dataclasses

    import comfy.ldm.flux.model
    cfg = dict(cfg)
    if cfg.get("image_model") == "flux2":
        fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
        if "txt_ids_dims" in fields:
            cfg.setdefault("txt_ids_dims", [3])
    return cfg


def build_model(name: str, tiny: bool, weight_dtype, seed: int = 0):
    """ModelPatcher of a ComfyUI-built model with seeded random weights, made on the device."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    cls, cfg = spec_for(name, tiny)
    config = getattr(comfy.supported_models, cls)(host_config(cfg))
    compute = torch.float32 if tiny else torch.bfloat16
    config.set_inference_dtype(weight_dtype, compute if weight_dtype != compute else None)
    device = mm.get_torch_device()
    model = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.diffusion_model.named_parameters()):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            if p.ndim == 1:
                value = torch.ones(p.shape, device=device) if pname.endswith(("scale", "weight")) else \
                    torch.zeros(p.shape, device=device)
            else:
                value = torch.randn(p.shape, generator=gen, device=device) * fan_in ** -0.5
            p.copy_(value.to(p.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    if hasattr(patcher, "cached_patcher_init"):
        # newer ComfyUI (TrainLoraNode's clone(force_deepcopy=True)) rebuilds a model through its loader's factory
        patcher.cached_patcher_init = (_rebuild, (name, tiny, weight_dtype, seed))
    return patcher, cls, cfg


def _rebuild(name, tiny, weight_dtype, seed, disable_dynamic=False):
    return build_model(name, tiny, weight_dtype, seed)[0]


def synthetic_pairs(cls: str, cfg: dict, resolution: int, n: int, seed: int = 0):
    import torch
    from comfyui_dopsd.nodes.pairs import Pair
    gen = torch.Generator().manual_seed(seed)
    channels, scale = LATENT[cls]
    width = cfg["cap_feat_dim"] if cls == "ZImage" else cfg["context_in_dim"]
    pairs = []
    for i in range(n):
        latent = torch.randn(1, channels, resolution // scale, resolution // scale, generator=gen)
        text = torch.randn(1, 128, width, generator=gen)
        student = [[text, {"pooled_output": None}]]
        if cls == "ZImage":
            teacher = [[torch.cat([text, torch.randn(1, 384, width, generator=gen)], 1), {"pooled_output": None}]]
        else:
            teacher = [[text, {"pooled_output": None, "reference_latents": [latent]}]]
        pairs.append(Pair(f"pair {i}", student, teacher, latent, None))
    return pairs


def pack_steps(model, pairs, env, steps: int, precision: str, checkpointing: bool, rank: int = 16):
    """Seconds per optimizer step (after one warm-up step) and peak device bytes of the pack's D-OPSD step."""
    import torch
    from comfyui_dopsd.dopsd_core import distributed, schedules
    from comfyui_dopsd.dopsd_core.train import TrainConfig
    from comfyui_dopsd.nodes.comfy_bridge import lora_patch, training
    clone = model.clone()
    net = lora_patch.build_network(clone, rank, float(rank), "auto", 0.0, 0.9999, False, 0)
    lora_patch.install(clone, net)
    rollout = schedules.rollout_sigmas(schedules.simple_sigmas(8, 3.0), 4)
    cfg = TrainConfig(method="dopsd", steps=steps + 1, batch_size=env.world_size, rollout_sigmas=list(rollout),
                      loss_space="x0", precision=precision, seed=0)

    times = []
    cuda = torch.cuda.is_available()

    def on_progress(p):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    task = training.ComfyTask(clone, net, pairs, 0, checkpointing=checkpointing)  # guard / checkpointing inside
    trainer = distributed.DistributedTrainer(net, task, cfg, env, example_shape=lambda i: pairs[i].latent.shape,
                                             on_progress=on_progress)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            trainer.train()
    finally:
        lora_patch.uninstall(clone)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    # on_progress runs on rank 0 only (DistributedTrainer): the other ranks have no times
    per_step = (times[-1] - times[0]) / max(1, len(times) - 1) if times else None
    return per_step, peak


def trainlora_steps(model, pairs, steps: int, tiny: bool):
    """ComfyUI's TrainLoraNode on the same model: (s/step from 1 vs 1+steps runs, peak bytes), or an error string."""
    import torch
    try:
        from comfy_extras.nodes_train import TrainLoraNode
    except ImportError as e:
        return None, None, f"no TrainLoraNode ({e})"
    schema = TrainLoraNode.GET_SCHEMA()
    base = {i.id: [getattr(i, "default", None)] for i in schema.inputs}
    # two latent dicts: ComfyUI 0.3.75's single-latent path leaves `multi_res` unset (UnboundLocalError)
    base.update(model=[model], latents=[{"samples": p.latent} for p in pairs[:2]],
                positive=[p.student for p in pairs[:2]],
                batch_size=[1], rank=[16], seed=[0], gradient_checkpointing=[True],
                training_dtype=["fp32" if tiny else "bf16"], lora_dtype=["fp32" if tiny else "bf16"])
    if "existing_lora" in base:
        base["existing_lora"] = ["[None]"]
    cuda = torch.cuda.is_available()

    def run(n):
        kwargs = dict(base, steps=[n])
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(False):
            TrainLoraNode.execute(**kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        one = run(1)
        more = run(1 + steps)
        return (more - one) / steps, (torch.cuda.max_memory_allocated() if cuda else None), None
    except Exception as e:  # reported in the table, never hidden
        return None, None, f"{type(e).__name__}: {str(e)[:120]}"


def release_models():
    """Unload every model ComfyUI still holds and return the cached blocks, so the next model's peak is its own
    (ComfyUI keeps a loaded model on the device after the last reference in this script is gone)."""
    import gc

    import torch

    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fmt(value, unit=""):
    return "n/a" if value is None else f"{value:.3f}{unit}"


def worker(args):
    """One rank of the --scaling measurement (started by torchrun-style env); prints JSON on rank 0."""
    launcher = _launcher()
    if not args.cpu:
        launcher.pin_local_gpu()
    launcher.setup_comfy(args.comfyui, args.cpu)
    launcher.import_path(REPO, "comfyui_dopsd")
    import torch
    from comfyui_dopsd.dopsd_core import distributed
    env = distributed.init_from_env(backend="gloo" if args.cpu else None, timeout_s=120)
    model, cls, cfg = build_model(args.model, args.tiny, torch.float32 if args.tiny else torch.bfloat16)
    pairs = synthetic_pairs(cls, cfg, args.resolution, max(2, env.world_size))
    per_step, peak = pack_steps(model, pairs, env, args.steps, "fp32" if args.tiny else "bf16", True)
    if env.is_main:
        print("RESULT " + json.dumps({"world": env.world_size, "s_per_step": per_step, "peak": peak}), flush=True)
    distributed.barrier(env)
    distributed.shutdown(env)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown of c10d threads (see scripts/dopsd_torchrun.py)


def scaling(args, world: int):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model_for_scaling,
           "--comfyui", args.comfyui, "--resolution", str(args.resolution), "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--cpu"] if args.cpu else []
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=args.time_limit) for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"scaling worker failed (rc {p.returncode}): {e[-2000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT "):])


class _Rows(list):
    """The table's rows, each also printed as soon as it is measured (a run cut short still reports)."""

    def append(self, row):
        super().append(row)
        name, what, s, peak, budget = row
        print(f"[row] {name} | {what} | {fmt(s)} | {fmt(peak / GiB if peak else None)} | {fmt(budget)}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (seconds; the CI mode)")
    p.add_argument("--models", default="zimage,klein4b,klein9b")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--fp8", action="store_true", help="also measure with fp8 (e4m3fn) base weights")
    p.add_argument("--no-trainlora", action="store_true")
    p.add_argument("--scaling", type=int, default=0, help="measure the pack step on 1..N ranks (0: skip)")
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="zimage", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.cpu = True
        args.resolution = min(args.resolution, 64)
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    launcher = _launcher()
    launcher.setup_comfy(args.comfyui, args.cpu)
    launcher.import_path(REPO, "comfyui_dopsd")
    import torch
    from comfyui_dopsd.dopsd_core import distributed
    env = distributed.DistEnv()
    precision = "fp32" if args.tiny else "bf16"
    rows = _Rows()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if time.perf_counter() - started > args.time_limit:
            rows.append((name, "skipped (time limit)", None, None, None))
            continue
        variants = [("bf16" if not args.tiny else "fp32", torch.float32 if args.tiny else torch.bfloat16)]
        if args.fp8:  # tiny: fp8 storage, fp32 compute on the CPU
            variants.append(("fp8 base", torch.float8_e4m3fn))
        for label, wdtype in variants:
            model, cls, cfg = build_model(name, args.tiny, wdtype)
            params = sum(p.numel() for p in model.model.diffusion_model.parameters())
            pairs = synthetic_pairs(cls, cfg, args.resolution, 2)
            per_step, peak = pack_steps(model, pairs, env, args.steps, precision, True)
            rows.append((name, f"pack D-OPSD K=4 ({label}, {params / 1e6:.1f} M params)", per_step, peak,
                         BUDGET_GIB.get(name) if not args.tiny else None))
            if not args.no_trainlora and label != "fp8 base":
                s, pk, err = trainlora_steps(model, pairs, args.steps, args.tiny)
                rows.append((name, "ComfyUI TrainLoraNode (SFT, 1 fwd+bwd)" + (f" [{err}]" if err else ""), s, pk, None))
            del model, pairs
            release_models()
    for world in range(1, args.scaling + 1):
        args.model_for_scaling = names[0]
        r = scaling(args, world)
        rows.append((names[0], f"torchrun {world} rank(s), global batch {world}", r["s_per_step"], r["peak"], None))
    print(f"\nresolution {args.resolution}, LoRA r16, gradient checkpointing, {precision}, device "
          f"{'cuda:' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}, {args.steps} steps "
          f"after warm-up")
    print(f"| model | what | s/step | peak GiB | budget GiB |\n|---|---|---|---|---|")
    for name, what, s, peak, budget in rows:
        print(f"| {name} | {what} | {fmt(s)} | {fmt(peak / GiB if peak else None)} | {fmt(budget)} |")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
