"""Few-step sigma schedules as a node.

D-OPSD trains the student on the exact states the sampler will visit, so the schedule used for training and
the one used for sampling must be the same object. This node produces it with the host ComfyUI's own code:
the `simple` scheduler over the model's model_sampling (Z-Image-Turbo: shift 3 via ModelSamplingAuraFlow),
or `Flux2Scheduler` (resolution-dependent shift, FLUX.2 / klein); the family rule ('auto') and both schedules
live in comfy_bridge/families.py.
"""
from comfy_api.latest import io

from . import CATEGORY
from .comfy_bridge import families


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
        return io.NodeOutput(families.sampling_sigmas(model, steps, schedule, width, height))


NODES = [DOPSDFewStepSigmas]
