"""Few-step sigma schedules as a node.

D-OPSD trains the student on the exact states the sampler will visit, so the schedule used for training and
the one used for sampling must be the same object. This node produces it with the host ComfyUI's own code:
the `simple` scheduler over the model's model_sampling (Z-Image-Turbo: shift 3 via ModelSamplingAuraFlow),
or `Flux2Scheduler` (resolution-dependent shift, FLUX.2 / klein).
"""
import comfy.samplers
from comfy_api.latest import io

from . import CATEGORY


def is_flux2(model) -> bool:
    """True for FLUX.2 models (dev and klein) as ComfyUI builds them."""
    import comfy.supported_models

    return isinstance(getattr(model.model, "model_config", None), comfy.supported_models.Flux2)


def flux2_sigmas(steps: int, width: int, height: int):
    """ComfyUI's Flux2Scheduler when the host has it, else the pack's identical reimplementation."""
    try:
        from comfy_extras.nodes_flux import Flux2Scheduler
    except ImportError:
        Flux2Scheduler = None
    if Flux2Scheduler is not None:
        return Flux2Scheduler.execute(steps=steps, width=width, height=height)[0]
    from ..dopsd_core.schedules import flux2_sigmas as own

    return own(steps, width, height)


class DOPSDFewStepSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDFewStepSigmas",
            display_name="D-OPSD Few-Step Sigmas",
            category=CATEGORY,
            description="The sigma schedule of a few-step sampler, for SamplerCustomAdvanced and the D-OPSD "
                        "trainer. 'auto' picks flux2 for FLUX.2 models and simple otherwise.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("steps", default=8, min=1, max=1000),
                io.Combo.Input("schedule", options=["auto", "simple", "flux2"], default="auto"),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16,
                             tooltip="Image width in pixels (flux2 only: the shift depends on resolution)."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16,
                             tooltip="Image height in pixels (flux2 only)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, schedule, width, height) -> io.NodeOutput:
        if schedule == "auto":
            schedule = "flux2" if is_flux2(model) else "simple"
        if schedule == "flux2":
            sigmas = flux2_sigmas(steps, width, height)
        else:
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        return io.NodeOutput(sigmas.cpu())


NODES = [DOPSDFewStepSigmas]
