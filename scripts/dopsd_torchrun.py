#!/usr/bin/env python
"""Train a D-OPSD LoRA on several GPUs from a set exported in ComfyUI; writes a LoRA ComfyUI loads.

    torchrun --nproc-per-node 4 scripts/dopsd_torchrun.py --comfyui /path/to/ComfyUI \
        --model /path/to/ComfyUI/models/diffusion_models/z_image_turbo_bf16.safetensors \
        --data /path/to/ComfyUI/output/dopsd_sets/my_set --out /path/to/ComfyUI/models/loras/my_lora.safetensors

ComfyUI is used as a library (no server): its loader builds the diffusion model from the file, and every
prediction runs through the same ComfyUI sampling path and the same pack code as the trainer node
(nodes/comfy_bridge/training.ComfyTask, lora_patch, blocks), so a 1-process run equals the node's run step for
step.
The data-parallel mechanics are dopsd_core.distributed; `--full` fine-tunes every weight instead (FSDP2,
dopsd_core.full_finetune) and writes a diffusion-model file for UNETLoader. docs/scaling.md has the whole picture.
Plain `python scripts/dopsd_torchrun.py ...` runs one process.
"""
import argparse
import contextlib
import importlib.util
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_dopsd"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""),
                   help="ComfyUI folder (with main.py); default $COMFYUI_PATH")
    p.add_argument("--model", required=True, help="diffusion model file (what UNETLoader opens)")
    p.add_argument("--data", required=True, help="a set folder written by 'D-OPSD Export Training Set'")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, ComfyUI format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--peft", action="store_true", help="also write a PEFT adapter folder next to --out")
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning (FSDP2 over the ranks): --out is a diffusion model file for UNETLoader")
    p.add_argument("--save-weights", choices=["student", "ema"], default="student",
                   help="full fine-tuning: write the trained weights or their EMA (the teacher)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--global-batch", type=int, default=0,
                   help="examples per micro-step over all ranks (default: the number of ranks)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--method", choices=["dopsd", "sft", "off_policy"], help="default: the set's recipe")
    p.add_argument("--loss-space", choices=["x0", "velocity"], help="default: the set's recipe")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the set's recipe)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the set's recipe)")
    p.add_argument("--lr", type=float, help="learning rate (default: the set's recipe)")
    p.add_argument("--ema-decay", type=float, help="teacher EMA decay (default: the set's recipe)")
    p.add_argument("--targets", help="comma-separated module globs (default: the set's recipe)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--weight-dtype", choices=["default", "bf16", "fp16", "fp8_e4m3fn"], default="default",
                   help="dtype of the frozen base weights (as UNETLoader's weight_dtype)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--checkpoint-dir", default="", help="default: <out without .safetensors>.checkpoints")
    p.add_argument("--resume", default="", help="a checkpoint file or folder (its latest); any world size")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait for a silent rank before all ranks stop")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), e.g. for tests")
    p.add_argument("--import-module", action="append", default=[],
                   help="a custom-node folder or .py file to import before loading (e.g. a loader extension)")
    return p.parse_args(argv)


# -- ComfyUI as a library --------------------------------------------------------------------------------
def pin_local_gpu():
    """One GPU per rank: make LOCAL_RANK's GPU the only visible one before torch or ComfyUI touch CUDA."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or os.environ.get("DOPSD_NO_GPU_PIN"):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local)] if devices and int(local) < len(devices) else local


def setup_comfy(root: str, cpu: bool):
    if not root or not os.path.isfile(os.path.join(root, "main.py")):
        raise SystemExit(f"--comfyui {root!r} is not a ComfyUI folder (no main.py): pass --comfyui or set COMFYUI_PATH")
    root = os.path.abspath(root)
    # ComfyUI's top-level `nodes` module must win over this repo's nodes/ package
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or ".") not in (REPO, root)]
    argv, sys.argv = sys.argv, ["dopsd_torchrun"] + (["--cpu"] if cpu else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = argv


def import_path(path: str, name: str):
    path = os.path.abspath(path)
    init = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
    search = [path] if os.path.isdir(path) else None
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_model(path: str, weight_dtype: str):
    import comfy.sd
    import torch
    options = {}
    if weight_dtype != "default":
        options["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                            "fp8_e4m3fn": torch.float8_e4m3fn}[weight_dtype]
    if not os.path.isfile(path):
        raise SystemExit(f"--model {path!r} is not a file")
    return comfy.sd.load_diffusion_model(path, model_options=options)


# -- full fine-tuning ---------------------------------------------------------------------------------------
def full_weights(model, env, ema_decay):
    """Every diffusion-model weight trains; with several ranks the top-level blocks (and the rest at the root)
    are sharded with FSDP2 on this rank's device."""
    import torch
    from comfyui_dopsd.dopsd_core import full_finetune
    from comfyui_dopsd.nodes.comfy_bridge import blocks
    root = model.model.diffusion_model
    root.to(model.load_device)
    for p in root.parameters():
        p.requires_grad_(True)
    if env.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        device_type = torch.device(model.load_device).type
        full_finetune.shard_blocks(root, blocks.top_level_blocks(model),
                                   init_device_mesh(device_type, (env.world_size,)))
    return full_finetune.FullWeights(root, ema_decay=ema_decay)


def save_full_model(model, net, env, args, target, meta):
    """Rank 0 writes the whole diffusion model (gathered from the shards) as UNETLoader reads it: the base
    file's keys, dtypes and header metadata, plus dopsd.* metadata. Atomic; the base file is only read."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from comfyui_dopsd.dopsd_core.checkpoint import atomic_write
    root = model.model.diffusion_model
    with contextlib.ExitStack() as stack:
        if args.save_weights == "ema":
            stack.enter_context(net.mode("teacher"))
        if net.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().to("cpu").clone() for k, v in root.state_dict().items()}
    if not env.is_main:
        return
    with safe_open(args.model, framework="pt") as f:
        base_keys, base_meta = set(f.keys()), dict(f.metadata() or {})
        dtypes = {k: f.get_slice(k).get_dtype() for k in base_keys}
    missing = sorted(base_keys - set(sd))
    if missing:
        raise RuntimeError(f"the trained model lacks {len(missing)} keys of {args.model} (e.g. {missing[:3]}); "
                           "this model's file layout is not supported for full fine-tuning yet")
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn}
    out = {k: sd[k].to(names.get(dtypes[k], sd[k].dtype)).contiguous() for k in sorted(base_keys)}
    header = dict(base_meta, **meta, **{"dopsd.weights": args.save_weights})
    atomic_write(target, lambda tmp: save_file(out, tmp, metadata=header), overwrite=args.overwrite)
    print(f"wrote the fine-tuned diffusion model {target}", flush=True)


# -- the run ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu:
        pin_local_gpu()
    setup_comfy(args.comfyui, args.cpu)
    for i, extra in enumerate(args.import_module):
        import_path(extra, f"dopsd_extra_{i}")
    pack = import_path(REPO, PACK)
    import torch

    from comfyui_dopsd.dopsd_core import distributed, exported_set, lora_io
    from comfyui_dopsd.dopsd_core.train import TrainConfig, TrainingDiverged
    from comfyui_dopsd.nodes import export_nodes
    from comfyui_dopsd.nodes.comfy_bridge import lora_patch, training
    from comfyui_dopsd.nodes.pairs import Pair
    del pack

    env = distributed.init_from_env(backend="gloo" if args.cpu else None, timeout_s=args.timeout)
    log = print if env.is_main else (lambda *a, **k: None)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"{out} exists: choose another --out or pass --overwrite")

    try:
        data = exported_set.ExportedSet(args.data)
        model = load_model(args.model, args.weight_dtype)
        exported_set.check_family(data.manifest, export_nodes.model_family(model))
    except exported_set.ExportedSetError as e:
        print(f"rank {env.rank}: {args.data}: {e}", file=sys.stderr, flush=True)
        return 1
    recipe, schedule = data.recipe, data.schedule
    pick = lambda value, key: recipe[key] if value is None else value  # noqa: E731
    method, loss_space = pick(args.method, "method"), pick(args.loss_space, "loss_space")
    rank, alpha, lr = int(pick(args.rank, "rank")), float(pick(args.alpha, "alpha")), float(pick(args.lr, "learning_rate"))
    ema_decay = float(pick(args.ema_decay, "ema_decay"))
    targets = args.targets if args.targets is not None else ",".join(recipe["targets"])
    # read on demand: a rank keeps a couple of shards in memory, not the whole set
    pairs = exported_set.LazyPairs(data, lambda p: Pair(p["caption"], p["student"], p["teacher"], p["latent"], None))

    cfg = TrainConfig(method=method, steps=args.steps, batch_size=args.global_batch or env.world_size,
                      rollout_sigmas=schedule["rollout_sigmas"], loss_space=loss_space, detach_states=True, lr=lr,
                      precision=args.precision, grad_accum=args.grad_accum, grad_clip=args.grad_clip, seed=args.seed,
                      save_every=args.save_every, keep_checkpoints=3)
    clone = model.clone()
    if args.full:
        net = full_weights(clone, env, ema_decay)
    else:
        net = lora_patch.build_network(clone, rank, alpha, targets, 0.0, ema_decay, False, args.seed)
        lora_patch.install(clone, net)
    # the trainer node's micro-step (training flags, block guard / checkpointing inside), without the server's turns
    task = training.ComfyTask(clone, net, pairs, args.seed, checkpointing=args.gradient_checkpointing)

    def on_progress(p):
        log(f"step {p.step}/{p.total} loss {p.loss:.6f} lr {p.lr:.3g} grad_norm {p.grad_norm:.4f} "
            f"{p.its_per_sec:.3f} it/s eta {p.eta_s:.0f} s", flush=True)

    control = distributed.AgreedControl(env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: control.stop(save=True))
    ckpt_dir = args.checkpoint_dir or (out[:-len(".safetensors")] if out.endswith(".safetensors") else out) + ".checkpoints"
    trainer = distributed.DistributedTrainer(net, task, cfg, env, example_shape=data.latent_shape,
                                             checkpoint_dir=ckpt_dir, control=control, on_progress=on_progress)
    what = (("full fine-tuning, FSDP2-sharded" if net.sharded else "full fine-tuning") if args.full
            else f"{len(net.loras)} LoRA modules (rank {rank})")
    log(f"D-OPSD {method} on {env.world_size} rank(s), global batch {cfg.batch_size}, {len(pairs)} pairs, "
        f"{what}; checkpoints in {ckpt_dir}", flush=True)
    try:
        if args.resume:
            trainer.resume(args.resume)
            log(f"resumed at step {trainer.step} from {args.resume}", flush=True)
        with torch.inference_mode(False), torch.enable_grad():
            result = trainer.train()
    except (distributed.RankFailure, TrainingDiverged) as e:
        print(f"rank {env.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.full:
            lora_patch.uninstall(clone)
    meta = lora_io.lora_metadata(method, type(model.model.model_config).__name__, rank, alpha, trainer.step,
                                 cfg.to_dict(), source="dopsd_torchrun", world_size=env.world_size,
                                 exported_set=data.manifest["checksum"])
    target = out if not result.stopped else out[:-len(".safetensors")] + f"_step{trainer.step:05d}.safetensors"
    if args.full:
        save_full_model(clone, net, env, args, target, meta)
    elif env.is_main:
        sd = net.comfy_state_dict()
        lora_io.save_comfy_lora(target, sd, meta, overwrite=args.overwrite)
        if args.peft:
            lora_io.save_peft_adapter(target[:-len(".safetensors")] + "_peft", sd, overwrite=args.overwrite,
                                      metadata=meta)
    log(f"{'stopped' if result.stopped else 'finished'} at step {trainer.step}: wrote {target} "
        f"(checkpoint {result.checkpoint})", flush=True)
    distributed.barrier(env, "the final barrier")
    distributed.shutdown(env)
    return 130 if result.stopped else 0


if __name__ == "__main__":
    code = main()
    # Everything is written (atomically) and every rank passed the final barrier. Skip the interpreter's
    # teardown: c10d/gloo threads destroyed at exit have aborted finished runs ("terminate called without an
    # active exception", exit -6), which would turn a successful run into a failed one for torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
