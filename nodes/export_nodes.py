"""Export the prepared training set for training outside ComfyUI (torchrun on several GPUs).

The pairs a teacher node made (target latents, student and teacher CONDITIONING with reference latents or
VLM features) are written to output/dopsd_sets/<name>/ as checksummed safetensors shards plus a manifest
(dopsd_core/exported_set.py). Training machines then need the diffusion model file only: no text
encoder, no VLM, no VAE. docs/scaling.md describes the whole path.
"""
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..dopsd_core import exported_set, schedules
from ..dopsd_core.train import METHODS
from . import CATEGORY
from .comfy_bridge import lora_patch, model_checks
from .paths import inside
from .teacher_nodes import Pairs
from .trainer_nodes import inference_sigmas

SETS_FOLDER = "dopsd_sets"


def model_family(model) -> dict:
    """What a set must match to train `model`: ComfyUI's model config class, image_model, context width.
    The launcher computes the same dict for the model file it loads (docs/scaling.md)."""
    config = getattr(model.model, "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    return {"model_class": type(config).__name__, "image_model": unet.get("image_model"),
            "context_width": model_checks.context_width(model)}


def sets_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), SETS_FOLDER)


def set_folder(name: str) -> str:
    return inside(sets_root(), name, "name")


class DOPSDExportTrainingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDExportTrainingSet", display_name="D-OPSD Export Training Set", category=CATEGORY,
            description="Writes the training pairs (target latents, student and teacher conditioning) with the "
                        "model family, sampling schedule and recipe to output/dopsd_sets/<name>/ as checksummed "
                        "shards, for multi-GPU training with torchrun (docs/scaling.md). Text encoders and the "
                        "VLM are not needed where the set is trained.",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the set will train (its family is recorded and checked)."),
                Pairs.Input("pairs"),
                io.String.Input("name", default="my_set", tooltip="Folder under output/dopsd_sets/."),
                io.Int.Input("inference_steps", default=8, min=1, max=100),
                io.Int.Input("train_steps", default=4, min=1, max=100, tooltip="Rollout states K; divides inference_steps."),
                io.Combo.Input("schedule", options=["auto", "simple", "flux2"], default="auto"),
                io.Combo.Input("method", options=list(METHODS), default="dopsd"),
                io.Combo.Input("loss_space", options=["x0", "velocity"], default="x0"),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6),
                io.Float.Input("ema_decay", default=0.9999, min=0.0, max=1.0, step=0.0001),
                io.String.Input("targets", default="auto"),
                io.Int.Input("pairs_per_shard", default=64, min=1, max=100000),
                io.Boolean.Input("overwrite", default=False),
            ],
            outputs=[io.String.Output(display_name="folder")],
        )

    @classmethod
    def validate_inputs(cls, name, train_steps, inference_steps, overwrite=False):
        if inference_steps % train_steps:
            return f"train_steps ({train_steps}) must divide inference_steps ({inference_steps})"
        try:
            folder = set_folder(name)
        except ValueError as e:
            return str(e)
        if os.path.exists(folder) and not overwrite:
            return f"an exported set named {name!r} already exists in {sets_root()}: choose another name or overwrite"
        return True

    @classmethod
    def execute(cls, model, pairs, name, inference_steps, train_steps, schedule, method, loss_space, rank, alpha,
                learning_rate, ema_decay, targets, pairs_per_shard, overwrite) -> io.NodeOutput:
        model_checks.require_flow_model(model)
        if not pairs:
            raise ValueError("no training pairs: the dataset is empty")
        for p in pairs:
            model_checks.require_condition_width(p.student, model, "student")
            model_checks.require_condition_width(p.teacher, model, "teacher")
        infer = inference_sigmas(model, inference_steps, schedule, pairs[0].latent)
        rollout = schedules.rollout_sigmas(infer, train_steps)
        recipe = {"method": method, "loss_space": loss_space, "rank": rank, "alpha": alpha,
                  "learning_rate": learning_rate, "ema_decay": ema_decay,
                  "targets": list(lora_patch.parse_targets(targets, model))}
        sched = {"name": schedule, "inference_steps": inference_steps, "train_steps": train_steps,
                 "inference_sigmas": [float(s) for s in infer], "rollout_sigmas": [float(s) for s in rollout]}
        with torch.inference_mode(False):
            rows = ({"caption": p.caption, "latent": p.latent, "student": p.student, "teacher": p.teacher}
                    for p in pairs)
            folder = exported_set.write_set(set_folder(name), rows, model_family(model), sched, recipe,
                                            pairs_per_shard=pairs_per_shard, overwrite=overwrite)
        return io.NodeOutput(folder, ui={"text": [folder]})


NODES = [DOPSDExportTrainingSet]
