"""dopsd_core flow arithmetic, schedules (against ComfyUI's own code) and the Euler sampler."""
import pytest
import torch

from dopsd_core import flow, sampler, schedules
from core_models import single_thread  # noqa: F401 (autouse: one intra-op thread)


def test_flow_identities():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = flow.add_noise(x0, noise, sigma)
    v = noise - x0
    torch.testing.assert_close(flow.x0_from_velocity(x_t, sigma, v), x0)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, sigma, x0), v)
    # one Euler step to sigma 0 with the true velocity lands on x0
    torch.testing.assert_close(flow.euler_step(x_t, v, sigma, torch.zeros(3)), x0)


def test_simple_sigmas_zimage_turbo_values():
    s = schedules.simple_sigmas(8, shift=3.0)
    expected = torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0])
    torch.testing.assert_close(s, expected, atol=1e-4, rtol=0)


def test_rollout_sigmas_official_four_of_eight():
    states = schedules.rollout_sigmas(schedules.simple_sigmas(8, 3.0), 4)
    torch.testing.assert_close(states, torch.tensor([1.0, 0.9, 0.75, 0.5]), atol=1e-6, rtol=0)
    assert len(schedules.rollout_sigmas(schedules.simple_sigmas(8, 3.0), 8)) == 8
    with pytest.raises(ValueError, match="divide"):
        schedules.rollout_sigmas(schedules.simple_sigmas(8, 3.0), 3)


def _comfy():
    try:
        import comfy.model_sampling
        import comfy.samplers
        from comfy_extras import nodes_flux
    except Exception:  # pragma: no cover - only without ComfyUI on the path
        pytest.skip("ComfyUI is not importable")
    return comfy, nodes_flux


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (4, 3.0), (9, 6.0), (1, 1.0)])
def test_simple_sigmas_equal_comfyui(steps, shift):
    comfy, _ = _comfy()

    class MS(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = MS()
    ms.set_parameters(shift=shift, multiplier=1.0)  # what ModelSamplingAuraFlow does
    theirs = comfy.samplers.calculate_sigmas(ms, "simple", steps)
    assert torch.equal(schedules.simple_sigmas(steps, shift), theirs.float())


@pytest.mark.parametrize("steps,w,h", [(4, 1024, 1024), (4, 256, 256), (8, 768, 1344), (50, 2048, 2048)])
def test_flux2_sigmas_equal_comfyui(steps, w, h):
    _, nodes_flux = _comfy()
    theirs = nodes_flux.get_schedule(steps, round(w * h / 256))
    assert torch.equal(schedules.flux2_sigmas(steps, w, h), theirs)


def test_sample_euler_exact_for_linear_flow():
    # A velocity field that is exactly noise - x0 for a fixed x0 transports noise to x0 in any steps.
    x0 = torch.randn(2, 5)
    noise = torch.randn(2, 5)

    def v(x, s):
        # for x = s*noise + (1-s)*x0, the velocity is noise - x0
        return noise - x0

    out = sampler.sample_euler(v, noise, schedules.simple_sigmas(4, 3.0))
    torch.testing.assert_close(out, x0)


def test_flow_convention_and_euler_equal_comfyui():
    """Our x_t/x0/velocity arithmetic is ComfyUI's CONST, and sample_euler is k-diffusion's Euler with
    denoised = x - sigma * v (what ComfyUI runs for a flow model)."""
    comfy, _ = _comfy()
    from comfy.k_diffusion import sampling as kd

    const = comfy.model_sampling.CONST()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.25, 0.8])
    x_t = flow.add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_t, const.noise_scaling(sigma, noise, x0))
    v = noise - x0
    torch.testing.assert_close(flow.x0_from_velocity(x_t, sigma, v), const.calculate_denoised(sigma, v, x_t))

    w = torch.randn(4, 4, generator=g) * 0.3

    def velocity(x, s):  # any smooth field; the samplers must integrate it identically
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w)) + s.view(-1, 1, 1, 1)

    def denoiser(x, s):
        return const.calculate_denoised(s, velocity(x, s), x)

    sigmas = schedules.simple_sigmas(8, 3.0)
    ours = sampler.sample_euler(velocity, noise, sigmas)
    theirs = kd.sample_euler(denoiser, const.noise_scaling(sigmas[0], noise, torch.zeros_like(noise)), sigmas,
                             disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flux2_scheduler_node_equals_ours():
    _, nodes_flux = _comfy()
    out = nodes_flux.Flux2Scheduler.execute(4, 1024, 768)
    theirs = out[0] if isinstance(out, (tuple, list)) else out.result[0]
    assert torch.equal(schedules.flux2_sigmas(4, 1024, 768), torch.as_tensor(theirs))
