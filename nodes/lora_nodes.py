"""LoRA nodes: preview a job's current LoRA, save it, apply a file with a key check, import PEFT."""
import logging
import os
import threading

import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..dopsd_core import checkpoint, lora_io
from . import CATEGORY, jobs
from .paths import comfy_roots, inside
from .trainer_nodes import Job


class _KeysNotLoaded(logging.Handler):
    """Collects ComfyUI's own "lora key not loaded: <key>" warnings from this thread. They still reach the
    log as usual; this only counts them, whatever the adapter format (LoRA, LoHa, LoKr, OFT, ...)."""
    PREFIX = "lora key not loaded: "

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys, self.thread = [], threading.get_ident()

    def emit(self, record):
        if record.thread == self.thread:
            message = record.getMessage()
            if message.startswith(self.PREFIX):
                self.keys.append(message[len(self.PREFIX):])


class _ReadKeys(dict):
    """The adapter's tensors, remembering which keys ComfyUI read: a key it never read was not loaded (this
    still counts when the log level hides ComfyUI's warnings)."""

    def __init__(self, sd):
        super().__init__(sd)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def load_patches(model, sd: dict, source: str) -> dict:
    """comfy.lora.load_lora as LoraLoaderModelOnly calls it, refusing a file whose keys ComfyUI does not
    all load (it would otherwise apply the rest and only log a warning per key)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    watcher, tracked = _KeysNotLoaded(), _ReadKeys(sd)
    root = logging.getLogger()
    root.addHandler(watcher)
    try:
        patches = comfy.lora.load_lora(tracked, key_map)
    finally:
        root.removeHandler(watcher)
    missed = sorted(set(watcher.keys) | (set(sd) - tracked.read))
    if missed or not patches:
        missed = missed or sorted(sd)
        raise ValueError(f"{source}: {len(missed)} of {len(sd)} keys match no weight of this model (e.g. "
                         f"{missed[:5]}); ComfyUI would apply {len(patches)} patches and skip these. Is it an "
                         "adapter for another model family, or a format ComfyUI does not read?")
    return patches


def apply_lora(model, sd: dict, strength: float, source: str):
    """Stock patching (the path of comfy.sd.load_lora_for_models) with a check that every key was loaded."""
    patches = load_patches(model, sd, source)
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched


def loras_dir() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def clean_stale_temps(max_depth: int = 3):
    """At startup: remove temp files a crash left in models/loras (they would show up in LoRA dropdowns)."""
    for base in folder_paths.get_folder_paths("loras"):
        for folder, subdirs, _ in os.walk(base):
            if os.path.relpath(folder, base).count(os.sep) + 1 >= max_depth:
                subdirs[:] = []
            try:
                checkpoint.remove_stale_temps(folder)
            except OSError as e:
                logging.warning("D-OPSD: could not clean temp files in %s: %s", folder, e)


# PEFT adapters may be read from these folders: models/loras, ComfyUI/input and ComfyUI/output (e.g. jobs).
PEFT_ROOTS = (("", "loras"), (" [input]", "input"), (" [output]", "output"))


def peft_adapters(max_depth: int = 4) -> list:
    """Folders holding a PEFT adapter (adapter_config.json + adapter_model.safetensors) in ComfyUI's
    folders, named like ComfyUI names files: relative to models/loras, or with an ' [input]' / ' [output]'
    suffix."""
    names = []
    for suffix, kind in PEFT_ROOTS:
        for base in comfy_roots(kind):
            base = os.path.abspath(base)
            for folder, subdirs, files in os.walk(base, followlinks=False):
                depth = os.path.relpath(folder, base).count(os.sep) + 1
                if depth >= max_depth:
                    subdirs[:] = []
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                if lora_io.PEFT_CONFIG in files and lora_io.PEFT_WEIGHTS in files and folder != base:
                    names.append(os.path.relpath(folder, base).replace(os.sep, "/") + suffix)
    return sorted(set(names))


def resolve_peft(name: str) -> str:
    """The adapter folder `name` (as peft_adapters lists it) names. Anything else (absolute, '..', a link
    leaving ComfyUI's folders, missing) gets one message, so the error tells nothing about other files."""
    name = (name or "").strip()
    kind = "loras"
    for suffix, k in PEFT_ROOTS[1:]:
        if name.endswith(suffix):
            name, kind = name[: -len(suffix)], k
    roots = comfy_roots("loras", "input", "output")
    not_found = ValueError(f"PEFT adapter {name!r} is not among the adapters in models/loras, input or output: put "
                           "the adapter folder (adapter_config.json + adapter_model.safetensors) there and pick it "
                           "from the list")
    for base in comfy_roots(kind):
        try:
            path = inside(base, name, "peft_path", roots)
        except ValueError:
            raise not_found from None
        if os.path.exists(path):
            return path
    raise not_found


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
    def validate_inputs(cls, filename, also_peft=False):
        try:
            name = filename[: -len(".safetensors")] if filename.endswith(".safetensors") else filename
            inside(loras_dir(), name + ".safetensors", "filename")
            if also_peft:
                inside(loras_dir(), name + "_peft", "filename")
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
        path = inside(loras_dir(), name, "filename")
        # the PEFT folder is checked before anything is written: a <name>_peft link out of models/loras is refused
        peft = inside(loras_dir(), name[: -len(".safetensors")] + "_peft", "filename") if also_peft else None
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{name} already exists in models/loras: choose another filename or enable overwrite")
        path = j.save_lora(path, overwrite=overwrite)
        if peft:
            lora_io.save_peft_adapter(peft, j.lora_state_dict(), base_model=j.base_model_name, overwrite=overwrite)
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
                    io.Combo.Input("peft_path", options=peft_adapters(),
                                   tooltip="An adapter folder (adapter_config.json + adapter_model.safetensors) in "
                                           "models/loras, or in input / output (marked [input] / [output]). "
                                           "Official checkpoints: pick their student/ folder."),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                    io.String.Input("save_as", default="", tooltip="Optional name in models/loras (ComfyUI format).")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, peft_path, save_as=""):
        """Some ComfyUI versions do not check a V3 combo's value against its options: check it here."""
        try:
            resolve_peft(peft_path)
            if save_as:
                inside(loras_dir(), save_as, "save_as")
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, peft_path, strength, save_as) -> io.NodeOutput:
        folder = resolve_peft(peft_path)
        # ComfyUI's key map understands diffusion_model.<diffusers name> (Z-Image: to_q/to_k/to_v slices of qkv).
        sd = lora_io.load_peft_adapter(folder, prefix="diffusion_model.")
        patched = apply_lora(model, sd, strength, peft_path)
        if save_as:
            name = save_as if save_as.endswith(".safetensors") else save_as + ".safetensors"
            path = inside(loras_dir(), name, "save_as")
            lora_io.save_comfy_lora(path, sd, {"dopsd.imported_from": peft_path}, overwrite=False)
        return io.NodeOutput(patched)


clean_stale_temps()
NODES = [DOPSDJobLoRA, DOPSDSaveLoRA, DOPSDApplyLoRAFile, DOPSDImportPEFT]
