"""Translation between ComfyUI objects (ModelPatcher, CONDITIONING, guiders) and dopsd_core."""
