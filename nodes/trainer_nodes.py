"""The D-OPSD trainer node (starts a background job and returns at once), waiting, and teacher preview.

Re-queue semantics of the trainer node (ComfyUI would otherwise serve its cached output, i.e. a job id that
may have ended long ago): the node runs on every queue (`fingerprint_inputs` is NaN, ComfyUI's "always
changed"). When the same graph, the same MODEL object and the same pairs object already drive an active job
(a re-queue of an unchanged workflow while it trains), it returns that job, so the card shows the running
job; otherwise it starts a new one. It never returns an ended job. A new job whose save_prefix is used by
an active job or by a trainer in a queued prompt is refused (at validation where ComfyUI lets us see it).
"""
import hashlib
import json
import logging
import math
import os
import posixpath
import time

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..dopsd_core.train import METHODS, PRECISIONS, TrainConfig
from . import CATEGORY, jobs, recipe_bridge, retention_nodes, routes, teacher_nodes
from .comfy_bridge import families, model_checks, training, turns
from .paths import inside, resume_path
from .teacher_nodes import Pairs

Job = io.Custom("DOPSD_JOB")
routes.register_with_server()


def inference_sigmas(model, steps: int, schedule: str, latent: torch.Tensor) -> torch.Tensor:
    """The few-step schedule users sample with; training rolls out on (a subset of) the same sigmas."""
    return families.latent_sigmas(model, steps, schedule, latent)


def normalise_save_prefix(save_prefix: str) -> str:
    """One spelling per file name: './a//b' -> 'a/b', backslashes as '/', '' stays '' (keep in memory)."""
    text = (save_prefix or "").strip().replace("\\", "/")
    if not text:
        return ""
    norm = posixpath.normpath(text)
    return "" if norm == "." else norm


def check_save_prefix(save_prefix: str, overwrite: bool = False):
    """The job writes loras/<save_prefix>_stepNNNNN.safetensors; refuse to clobber an earlier run's files.
    Returns the normalised prefix."""
    save_prefix = normalise_save_prefix(save_prefix)
    if not save_prefix:
        return ""
    base = folder_paths.get_folder_paths("loras")[0]
    path = inside(base, save_prefix + "_step00000.safetensors", "save_prefix")
    folder, stem = os.path.dirname(path), os.path.basename(save_prefix)
    if not overwrite and os.path.isdir(folder) and any(f.startswith(stem + "_step") for f in os.listdir(folder)):
        raise ValueError(f"LoRAs named {save_prefix}_step* already exist in {base}: choose another save_prefix")
    return save_prefix


def _queued_trainer_prefixes():
    """(node id, prompt id, normalised save_prefix) of the trainers in ComfyUI's running and pending prompts."""
    try:
        from server import PromptServer
        queue = PromptServer.instance.prompt_queue
        read = getattr(queue, "get_current_queue_volatile", None) or queue.get_current_queue
        running, pending = read()
    except Exception:  # no server (in-process use)
        return []
    found = []
    for item in list(running) + list(pending):
        prompt = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or node.get("class_type") != "DOPSDTrainer":
                continue
            prefix = (node.get("inputs") or {}).get("save_prefix")
            if isinstance(prefix, str):
                found.append((str(node_id), item[1], normalise_save_prefix(prefix)))
    return found


def prefix_users(save_prefix: str, node_id: str = ""):
    """Who else writes `save_prefix`: descriptions of active jobs and queued trainers, other than node
    `node_id` (the same node queued again shows its own job, see the module docstring)."""
    if not save_prefix:
        return [], False
    users, own_job = [], False
    for job in jobs.active_jobs():
        if job.save_prefix == save_prefix:
            if node_id and job.node_id == node_id:
                own_job = True
            else:
                users.append(f"job {job.job_id} ({job.state}, node {job.node_id or '?'})")
    for other_node, prompt_id, prefix in _queued_trainer_prefixes():
        if prefix == save_prefix and other_node != node_id:
            users.append(f"the trainer node {other_node} of queued prompt {prompt_id}")
    return users, own_job


def _clash_message(save_prefix, users):
    return (f"save_prefix {save_prefix!r} is already used by {', '.join(users)}: two jobs would write the same "
            "LoRA files. Choose another save_prefix, or stop that job first")


def graph_signature(prompt, node_id):
    """A hash of node `node_id` and everything upstream of it in an API-format prompt (None without one)."""
    if not prompt or node_id is None or str(node_id) not in prompt:
        return None
    seen, stack = {}, [str(node_id)]
    while stack:
        current = stack.pop()
        if current in seen or current not in prompt:
            continue
        node = prompt[current]
        seen[current] = {"class_type": node.get("class_type"), "inputs": node.get("inputs")}
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                stack.append(value[0])
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


def running_job_for(origin):
    """The active job started from exactly this graph, MODEL and pairs, if any."""
    if origin is None or origin[0] is None:
        return None
    for job in jobs.active_jobs():
        o = job.origin
        if o is not None and o[0] == origin[0] and o[1] is origin[1] and o[2] is origin[2]:
            return job
    return None


def current_prompt_id() -> str:
    """The prompt the worker is executing (ComfyUI sets it before execution; V3 has no hidden prompt_id)."""
    try:
        from server import PromptServer
        return str(getattr(PromptServer.instance, "last_prompt_id", "") or "")
    except Exception:
        return ""


class DOPSDTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTrainer", display_name="D-OPSD Trainer (background)", category=CATEGORY,
            description="Trains a LoRA on the loaded MODEL with D-OPSD (or an SFT / off-policy baseline) in a "
                        "background thread and returns a job at once. Training pauses while other prompts run. "
                        "Watch it on this node; control it with its Pause / Resume / Stop buttons.",
            not_idempotent=True,
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                Pairs.Input("pairs"),
                io.Vae.Input("vae", optional=True, tooltip="For student/teacher preview images during training."),
                io.Combo.Input("method", options=list(METHODS), default="dopsd",
                               tooltip="dopsd: on-policy self-distillation (paper). sft: plain flow-matching "
                                       "fine-tuning. off_policy: teacher supervision on noised targets."),
                io.Int.Input("steps", default=500, min=1, max=100000),
                io.Int.Input("inference_steps", default=8, min=1, max=100,
                             tooltip="Steps of the few-step sampler you use (Z-Image-Turbo 8, klein 4)."),
                io.Int.Input("train_steps", default=4, min=1, max=100,
                             tooltip="Rollout states K per iteration; must divide inference_steps. The official "
                                     "code trains 4 states of an 8-step schedule."),
                io.Combo.Input("schedule", options=["auto", "simple", "flux2"], default="auto"),
                io.Combo.Input("loss_space", options=["x0", "velocity"], default="x0",
                               tooltip="x0: official code (faster convergence); velocity: the paper's formula."),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6),
                io.Float.Input("ema_decay", default=0.9999, min=0.0, max=1.0, step=0.0001,
                               tooltip="Teacher = EMA of the student. 0.9999 as in the paper/official scripts."),
                io.Boolean.Input("ema_warmup", default=False),
                io.Boolean.Input("detach_states", default=True, tooltip="Official code: no backprop through the rollout."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16"),
                io.Int.Input("grad_accum", default=1, min=1, max=256),
                io.Float.Input("grad_clip", default=1.0, min=0.0, max=100.0, step=0.01),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1),
                io.String.Input("save_prefix", default="dopsd/my_lora",
                                tooltip="LoRAs go to models/loras/<save_prefix>_stepNNNNN.safetensors. Empty: keep "
                                        "them in memory only (save with the Save LoRA node)."),
                io.Int.Input("save_every", default=250, min=0, max=100000, tooltip="0: save only at the end."),
                io.Int.Input("preview_every", default=50, min=0, max=100000, tooltip="0: no previews."),
                io.String.Input("targets", default="auto",
                                tooltip="Comma-separated glob patterns of Linear modules to train; 'auto' picks "
                                        "attention and MLP projections for the model family."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A job id from output/dopsd_jobs (or <job id>/training_state.pt) to continue "
                                        "exactly; the job keeps its save_prefix."),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True,
                             tooltip="Pairs per micro-step, run through the model as one batch. Only pairs with the "
                                     "same image size and caption token length share a batch (a smaller batch "
                                     "otherwise). grad_accum multiplies it."),
                # last (after batch_size), so that workflows saved before them keep their widget values (the frontend maps them
                # by position)
                *recipe_bridge.inputs(),
                retention_nodes.Retention.Input("retention", optional=True,
                                                tooltip="Ordinary prompts to keep as the base model draws them "
                                                        "(D-OPSD Retention Prompts)."),
                io.Float.Input("retention_ratio", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Fraction of steps that also train one retention prompt, with the frozen base "
                                       "model as teacher (method dopsd; each costs one more rollout). 0: the paper's "
                                       "method, unchanged."),
            ],
            outputs=[Job.Output(display_name="job")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # run on every queue: a cached job id may belong to an ended job

    @classmethod
    def validate_inputs(cls, save_prefix, train_steps, inference_steps, resume_from="", ema_decay=0.9999, alpha=16.0,
                        grad_clip=1.0, learning_rate=1e-4, recipe=recipe_bridge.recipes.CUSTOM, method="dopsd",
                        retention_ratio=0.0):
        if recipe not in recipe_bridge.recipes.NAMES:
            return f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_bridge.recipes.NAMES)}"
        if retention_ratio and method != "dopsd" and recipe == recipe_bridge.recipes.CUSTOM:
            return f"retention_ratio {retention_ratio} needs method dopsd; set it to 0 for method {method}"
        official = recipe != recipe_bridge.recipes.CUSTOM  # its own steps replace these inputs
        if not official and (train_steps < 1 or inference_steps % train_steps):
            return (f"train_steps ({train_steps}) must divide inference_steps ({inference_steps}) so the rollout "
                    "stays on the sampler's schedule")
        for name, value in (("ema_decay", ema_decay), ("alpha", alpha), ("grad_clip", grad_clip),
                            ("learning_rate", learning_rate)):
            if not math.isfinite(float(value)):  # NaN passes ComfyUI's min/max checks (grad_clip NaN: no clipping)
                return f"{name} is {value}: give a number"
        node_id = str(getattr(cls.hidden, "unique_id", None) or "") if getattr(cls, "hidden", None) else ""
        prefix = normalise_save_prefix(save_prefix)
        users, own_job = prefix_users(prefix, node_id)
        if users:
            return _clash_message(prefix, users)
        if own_job:  # this node's running job writes these files; a re-queue shows that job
            return True
        try:
            resume_path(resume_from)
            check_save_prefix(prefix, overwrite=bool(resume_from))  # a resumed job keeps its save_prefix
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, pairs, method, steps, inference_steps, train_steps, schedule, loss_space, rank, alpha,
                learning_rate, ema_decay, ema_warmup, detach_states, precision, grad_accum, grad_clip,
                gradient_checkpointing, seed, save_prefix, save_every, preview_every, targets, vae=None,
                resume_from="", batch_size=1, recipe=recipe_bridge.recipes.CUSTOM, retention=None,
                retention_ratio=0.0, **options) -> io.NodeOutput:
        node_id = str(getattr(cls.hidden, "unique_id", None) or "") if getattr(cls, "hidden", None) else ""
        prompt = getattr(cls.hidden, "prompt", None) if getattr(cls, "hidden", None) else None
        origin = (graph_signature(prompt, node_id), model, pairs)
        running = running_job_for(origin)
        if running is not None:  # the unchanged workflow queued again while its job trains: show that job
            return io.NodeOutput({"job_id": running.job_id}, ui={"dopsd_job": [running.job_id]})
        model_checks.require_flow_model(model)
        if not pairs:
            raise ValueError("no training pairs: the dataset is empty")
        for p in pairs:
            model_checks.require_condition_width(p.student, model, "student")
            model_checks.require_condition_width(p.teacher, model, "teacher")
        save_prefix = normalise_save_prefix(save_prefix)
        users = [f"job {j.job_id} ({j.state}, node {j.node_id or '?'})" for j in jobs.active_jobs()
                 if save_prefix and j.save_prefix == save_prefix]
        if users:
            raise ValueError(_clash_message(save_prefix, users))
        teacher_nodes.require_visible_teacher(model, pairs)
        resume_from = resume_path(resume_from)
        save_prefix = check_save_prefix(save_prefix, overwrite=bool(resume_from))
        given = dict(method=method, steps=steps, inference_steps=inference_steps, train_steps=train_steps,
                     schedule=schedule, loss_space=loss_space, rank=rank, alpha=alpha, learning_rate=learning_rate,
                     ema_decay=ema_decay, ema_warmup=ema_warmup, detach_states=detach_states, precision=precision,
                     grad_accum=grad_accum, grad_clip=grad_clip, gradient_checkpointing=gradient_checkpointing,
                     targets=targets, batch_size=batch_size, **recipe_bridge.option_values(options))
        settings, lines = recipe_bridge.resolve(recipe, given, model, pairs)
        retention = retention_nodes.for_job(model, retention, retention_ratio, settings["method"])
        if retention is not None:
            lines.append(f"retention: {len(retention['prompts'])} prompts, ratio {retention['ratio']:g}")
        if settings["train_steps"] < 1 or settings["inference_steps"] % settings["train_steps"]:
            raise ValueError(f"train_steps ({settings['train_steps']}) must divide inference_steps "
                             f"({settings['inference_steps']})")
        training.check_batchable(pairs, settings["batch_size"])
        if settings["caption_sampling"] == "draw":
            training.check_variants_batchable(pairs, settings["batch_size"])
        infer = inference_sigmas(model, settings["inference_steps"], settings["schedule"], pairs[0].latent)
        rollout = recipe_bridge.rollout_states(model, settings, pairs[0].latent, inference_sigmas)
        cfg = TrainConfig(method=settings["method"], steps=settings["steps"],
                          rollout_sigmas=[float(s) for s in rollout], loss_space=settings["loss_space"],
                          detach_states=settings["detach_states"], lr=settings["learning_rate"],
                          weight_decay=settings["weight_decay"], lr_schedule=settings["lr_schedule"],
                          precision=settings["precision"], grad_accum=settings["grad_accum"],
                          batch_size=settings["batch_size"], grad_clip=settings["grad_clip"], seed=seed,
                          save_every=save_every)
        clone = model.clone()
        with torch.inference_mode(False):  # the executor runs nodes in inference mode; LoRA weights must train
            net = recipe_bridge.build_network(clone, settings, seed)
        base_name = type(getattr(model.model, "model_config", model.model)).__name__
        job = jobs.Job(clone, net, pairs, cfg, node_id=node_id, prompt_id=current_prompt_id(), vae=vae,
                       inference_sigmas=infer, preview_every=preview_every, save_prefix=save_prefix,
                       base_model_name=base_name, resume_from=resume_from or "",
                       gradient_checkpointing=settings["gradient_checkpointing"], origin=origin,
                       retention=retention)
        job.training.examples = recipe_bridge.ExampleSetup(
            pairs, seed, settings["caption_sampling"], settings.get("caption_dropout_override"),
            (lambda latent: recipe_bridge.rollout_states(model, settings, latent, inference_sigmas))
            if settings["schedule_shift"] == "per_example" else None)
        job.recipe_info = recipe_bridge.job_info(recipe, settings, rollout)
        logging.info("D-OPSD job %s trains with %s", job.job_id, "\n".join(lines))
        job.start()
        return io.NodeOutput({"job_id": job.job_id}, ui={"dopsd_job": [job.job_id], "text": ["\n".join(lines)]})


class DOPSDWaitForJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDWaitForJob", display_name="D-OPSD Wait For Job", category=CATEGORY,
            description="Waits until the job finishes or stops (training runs meanwhile), so one workflow can "
                        "train and then preview the LoRA. Raises if the job failed. Cancel ends the wait (the "
                        "prompt is interrupted) and leaves the job training.",
            inputs=[Job.Input("job"), io.Int.Input("timeout_s", default=0, min=0, max=10 ** 7,
                                                    tooltip="0: wait as long as it takes.")],
            outputs=[Job.Output(display_name="job")],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # a cached "finished" must not stand for another run of the job

    @classmethod
    def execute(cls, job, timeout_s) -> io.NodeOutput:
        j = jobs.get(job["job_id"])
        deadline = time.monotonic() + timeout_s if timeout_s else None
        with turns.TURN.worker_yield():
            finished = j.wait(0)
            while not finished and (deadline is None or time.monotonic() < deadline):
                comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: ComfyUI's interruption
                finished = j.wait(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
        if not finished:
            raise TimeoutError(f"job {j.job_id} still {j.state} after {timeout_s} s")
        if j.state == "error":
            raise RuntimeError(f"D-OPSD job {j.job_id} failed: {j.error}")
        return io.NodeOutput(job)


class DOPSDTeacherPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherPreview", display_name="D-OPSD Teacher Preview", category=CATEGORY,
            description="Before training: the few-step sampler with the student context (caption only) and the "
                        "teacher context (caption + target image), from the same noise, next to the target. "
                        "If the teacher cannot produce the target, D-OPSD cannot teach it.",
            inputs=[io.Model.Input("model"), Pairs.Input("pairs"), io.Vae.Input("vae"),
                    io.Int.Input("steps", default=8, min=1, max=100),
                    io.Combo.Input("schedule", options=["auto", "simple", "flux2"], default="auto"),
                    io.Int.Input("pair_index", default=0, min=0, max=10000),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1)],
            outputs=[io.Image.Output(display_name="student | teacher | target")],
        )

    @classmethod
    def execute(cls, model, pairs, vae, steps, schedule, pair_index, seed) -> io.NodeOutput:
        model_checks.require_flow_model(model)
        if not 0 <= pair_index < len(pairs):
            raise ValueError(f"pair_index {pair_index} is out of range: the dataset has {len(pairs)} pairs")
        pair = pairs[pair_index]
        model_checks.require_condition_width(pair.teacher, model, "teacher")
        teacher_nodes.require_visible_teacher(model, [pair])
        sigmas = inference_sigmas(model, steps, schedule, pair.latent)
        out = training.sample_pair(model, None, pair, sigmas, seed)
        student, teacher = (teacher_nodes.decode_images(vae, out[m]) for m in ("student", "teacher"))
        target = pair.image[:, :, :, :3].to(student.device, student.dtype)
        if target.shape[1:3] != student.shape[1:3]:
            target = torch.nn.functional.interpolate(target.movedim(-1, 1), size=student.shape[1:3]).movedim(1, -1)
        return io.NodeOutput(torch.cat([student[:1], teacher[:1], target[:1]], dim=0))


NODES = [DOPSDTrainer, DOPSDWaitForJob, DOPSDTeacherPreview]
