"""The D-OPSD trainer node (starts a background job and returns at once), waiting, and teacher preview."""
import math
import os

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io

from ..dopsd_core import schedules
from ..dopsd_core.train import METHODS, PRECISIONS, TrainConfig
from . import CATEGORY, jobs, routes, teacher_nodes
from .comfy_bridge import lora_patch, model_checks, turns
from .paths import inside, resume_path
from .schedule_nodes import flux2_sigmas
from .teacher_nodes import Pairs

Job = io.Custom("DOPSD_JOB")
routes.register_with_server()


def inference_sigmas(model, steps: int, schedule: str, latent: torch.Tensor) -> torch.Tensor:
    """The few-step schedule users sample with; training rolls out on (a subset of) the same sigmas."""
    if schedule == "auto":
        schedule = "flux2" if model_checks.is_flux2(model) else "simple"
    if schedule == "flux2":
        scale = 16 if latent.shape[1] == 128 else 8
        return flux2_sigmas(steps, latent.shape[-1] * scale, latent.shape[-2] * scale).float().cpu()
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float().cpu()


def check_save_prefix(save_prefix: str, overwrite: bool = False):
    """The job writes loras/<save_prefix>_stepNNNNN.safetensors; refuse to clobber an earlier run's files."""
    if not save_prefix.strip():
        return ""
    base = folder_paths.get_folder_paths("loras")[0]
    path = inside(base, save_prefix + "_step00000.safetensors", "save_prefix")
    folder, stem = os.path.dirname(path), os.path.basename(save_prefix.strip())
    if not overwrite and os.path.isdir(folder) and any(f.startswith(stem + "_step") for f in os.listdir(folder)):
        raise ValueError(f"LoRAs named {save_prefix}_step* already exist in {base}: choose another save_prefix")
    return save_prefix.strip()


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
            ],
            outputs=[Job.Output(display_name="job")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, save_prefix, train_steps, inference_steps, resume_from="", ema_decay=0.9999, alpha=16.0,
                        grad_clip=1.0, learning_rate=1e-4):
        if inference_steps % train_steps:
            return (f"train_steps ({train_steps}) must divide inference_steps ({inference_steps}) so the rollout "
                    "stays on the sampler's schedule")
        for name, value in (("ema_decay", ema_decay), ("alpha", alpha), ("grad_clip", grad_clip),
                            ("learning_rate", learning_rate)):
            if not math.isfinite(float(value)):  # NaN passes ComfyUI's min/max checks (grad_clip NaN: no clipping)
                return f"{name} is {value}: give a number"
        try:
            resume_path(resume_from)
            check_save_prefix(save_prefix, overwrite=bool(resume_from))  # a resumed job keeps its save_prefix
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, pairs, method, steps, inference_steps, train_steps, schedule, loss_space, rank, alpha,
                learning_rate, ema_decay, ema_warmup, detach_states, precision, grad_accum, grad_clip,
                gradient_checkpointing, seed, save_prefix, save_every, preview_every, targets, vae=None,
                resume_from="") -> io.NodeOutput:
        model_checks.require_flow_model(model)
        if not pairs:
            raise ValueError("no training pairs: the dataset is empty")
        for p in pairs:
            model_checks.require_condition_width(p.student, model, "student")
            model_checks.require_condition_width(p.teacher, model, "teacher")
        teacher_nodes.require_visible_teacher(model, pairs)
        resume_from = resume_path(resume_from)
        save_prefix = check_save_prefix(save_prefix, overwrite=bool(resume_from))
        infer = inference_sigmas(model, inference_steps, schedule, pairs[0].latent)
        rollout = schedules.rollout_sigmas(infer, train_steps)
        cfg = TrainConfig(method=method, steps=steps, rollout_sigmas=[float(s) for s in rollout],
                          loss_space=loss_space, detach_states=detach_states, lr=learning_rate, precision=precision,
                          grad_accum=grad_accum, grad_clip=grad_clip, seed=seed, save_every=save_every)
        clone = model.clone()
        with torch.inference_mode(False):  # the executor runs nodes in inference mode; LoRA weights must train
            net = lora_patch.build_network(clone, rank, alpha, targets, 0.0, ema_decay, ema_warmup, seed)
        base_name = type(getattr(model.model, "model_config", model.model)).__name__
        job = jobs.Job(clone, net, pairs, cfg, node_id=str(getattr(cls.hidden, "unique_id", None) or ""), vae=vae,
                       inference_sigmas=infer, preview_every=preview_every, save_prefix=save_prefix,
                       base_model_name=base_name, resume_from=resume_from or "",
                       gradient_checkpointing=gradient_checkpointing)
        job.start()
        return io.NodeOutput({"job_id": job.job_id}, ui={"dopsd_job": [job.job_id]})


class DOPSDWaitForJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDWaitForJob", display_name="D-OPSD Wait For Job", category=CATEGORY,
            description="Waits until the job finishes or stops (training runs meanwhile), so one workflow can "
                        "train and then preview the LoRA. Raises if the job failed.",
            inputs=[Job.Input("job"), io.Int.Input("timeout_s", default=0, min=0, max=10 ** 7,
                                                    tooltip="0: wait as long as it takes.")],
            outputs=[Job.Output(display_name="job")],
        )

    @classmethod
    def execute(cls, job, timeout_s) -> io.NodeOutput:
        j = jobs.get(job["job_id"])
        with turns.TURN.worker_yield():
            finished = j.wait(timeout_s or None)
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
        out = jobs.sample_pair(model, None, pair, sigmas, seed)
        student, teacher = vae.decode(out["student"]), vae.decode(out["teacher"])
        target = pair.image[:, :, :, :3].to(student.device, student.dtype)
        if target.shape[1:3] != student.shape[1:3]:
            target = torch.nn.functional.interpolate(target.movedim(-1, 1), size=student.shape[1:3]).movedim(1, -1)
        return io.NodeOutput(torch.cat([student[:1], teacher[:1], target[:1]], dim=0))


NODES = [DOPSDTrainer, DOPSDWaitForJob, DOPSDTeacherPreview]
