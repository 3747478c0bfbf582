"""LoRA nodes: preview a job's current LoRA, save it, apply a file with a key check, import PEFT."""
import logging
import os

import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..dopsd_core import lora_io
from . import CATEGORY, jobs
from .paths import inside
from .trainer_nodes import Job


def apply_lora(model, sd: dict, strength: float, source: str):
    """Stock patching (comfy.sd.load_lora_for_models) with a check that every LoRA module found its weight."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False) if _takes_log_missing() else comfy.lora.load_lora(sd, key_map)
    modules = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}
    if len(patches) < len(modules) or not patches:
        unknown = sorted(m for m in modules if m not in key_map)[:5]
        raise ValueError(f"{source}: {len(modules) - len(patches)} of {len(modules)} LoRA modules match no weight "
                         f"of this model (e.g. {unknown}). Is it a LoRA for another model family?")
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched


def _takes_log_missing():
    import inspect
    return "log_missing" in inspect.signature(comfy.lora.load_lora).parameters


class DOPSDJobLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDJobLoRA", display_name="D-OPSD Apply Job LoRA", category=CATEGORY,
            description="Applies the job's LoRA as it is right now (a snapshot) to a MODEL, through the same "
                        "patching as LoraLoaderModelOnly, for previews with the ordinary few-step KSampler.",
            not_idempotent=True,
            inputs=[io.Model.Input("model"), Job.Input("job"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                    io.Combo.Input("adapter", options=["student", "teacher"], default="student",
                                   tooltip="student: the LoRA being trained; teacher: its EMA.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # the job's LoRA changes every step: never serve an old snapshot from the cache

    @classmethod
    def execute(cls, model, job, strength, adapter) -> io.NodeOutput:
        j = jobs.get(job["job_id"])
        sd = j.lora_state_dict(adapter)
        return io.NodeOutput(apply_lora(model, sd, strength, f"job {j.job_id}"))


class DOPSDSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDSaveLoRA", display_name="D-OPSD Save LoRA", category=CATEGORY, is_output_node=True,
            description="Writes the job's current LoRA into models/loras (ComfyUI format, loadable by "
                        "LoraLoaderModelOnly), atomically. Optionally also a PEFT adapter folder.",
            not_idempotent=True,
            inputs=[Job.Input("job"), io.String.Input("filename", default="dopsd/my_lora_final"),
                    io.Boolean.Input("overwrite", default=False),
                    io.Boolean.Input("also_peft", default=False, tooltip="Also write <filename>_peft/ for diffusers/PEFT.")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, filename):
        try:
            inside(folder_paths.get_folder_paths("loras")[0], filename, "filename")
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # save what the job holds now, on every queue (a cached path would be stale)

    @classmethod
    def execute(cls, job, filename, overwrite, also_peft) -> io.NodeOutput:
        j = jobs.get(job["job_id"])
        name = filename if filename.endswith(".safetensors") else filename + ".safetensors"
        path = inside(folder_paths.get_folder_paths("loras")[0], name, "filename")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{name} already exists in models/loras: choose another filename or enable overwrite")
        path = j.save_lora(path, overwrite=overwrite)
        if also_peft:
            lora_io.save_peft_adapter(path[: -len(".safetensors")] + "_peft", j.lora_state_dict(),
                                      base_model=j.base_model_name, overwrite=overwrite)
        logging.info("D-OPSD: saved LoRA %s", path)
        return io.NodeOutput(path, ui={"text": [path]})


class DOPSDApplyLoRAFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDApplyLoRAFile", display_name="D-OPSD Apply LoRA File", category=CATEGORY,
            description="LoraLoaderModelOnly with a check: fails, naming the fix, when the LoRA's keys do not "
                        "match the model instead of silently skipping them.",
            inputs=[io.Model.Input("model"), io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return io.NodeOutput(apply_lora(model, comfy.utils.load_torch_file(path, safe_load=True), strength, lora_name))


class DOPSDImportPEFT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDImportPEFT", display_name="D-OPSD Import PEFT LoRA", category=CATEGORY,
            description="Loads a PEFT adapter (e.g. an official D-OPSD checkpoint folder with adapter_config.json "
                        "and adapter_model.safetensors) onto the MODEL, and optionally saves it in ComfyUI format.",
            inputs=[io.Model.Input("model"),
                    io.String.Input("peft_path", default="", tooltip="Adapter folder or its .safetensors file."),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                    io.String.Input("save_as", default="", tooltip="Optional name in models/loras (ComfyUI format).")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, peft_path, strength, save_as) -> io.NodeOutput:
        if not peft_path or not os.path.exists(peft_path):
            raise ValueError(f"PEFT adapter {peft_path!r} not found: give the checkpoint folder (with "
                             "adapter_config.json) or its adapter_model.safetensors")
        # ComfyUI's key map understands diffusion_model.<diffusers name> (Z-Image: to_q/to_k/to_v slices of qkv).
        sd = lora_io.load_peft_adapter(peft_path, prefix="diffusion_model.")
        patched = apply_lora(model, sd, strength, peft_path)
        if save_as:
            name = save_as if save_as.endswith(".safetensors") else save_as + ".safetensors"
            path = inside(folder_paths.get_folder_paths("loras")[0], name, "save_as")
            lora_io.save_comfy_lora(path, sd, {"dopsd.imported_from": peft_path}, overwrite=False)
        return io.NodeOutput(patched)


NODES = [DOPSDJobLoRA, DOPSDSaveLoRA, DOPSDApplyLoRAFile, DOPSDImportPEFT]
