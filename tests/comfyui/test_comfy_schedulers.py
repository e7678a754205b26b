"""exp_karras inside a real ComfyUI: registration in every scheduler dropdown, sigmas and timesteps equal
to the diffusers ExpKarrasScheduler's, the standalone SIGMAS node, and a KSampler run; the peer schedules of
schedulers/ equal ComfyUI's own (its scheduler table, the Align Your Steps, GITS and polyexponential nodes)."""

import comfy.model_sampling
import comfy.samplers
import comfy_extras.nodes_align_your_steps as align_your_steps
import comfy_extras.nodes_custom_sampler as custom_sampler
import comfy_extras.nodes_gits as gits
import nodes
import pytest
import torch

from .tiny_models import tiny_conditioning, tiny_sd15_model

NODE_ID = "DirectDistillExpKarrasScheduler"


class SD15Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """What ComfyUI builds for an SD1.5 checkpoint (default sampling settings)."""


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_sd15_model()


def run_node(model, steps, p=1.0, denoise=1.0):
    return nodes.NODE_CLASS_MAPPINGS[NODE_ID].execute(model=model, steps=steps, p=p, denoise=denoise).result[0]


def test_exp_karras_is_in_every_scheduler_dropdown(comfy_loaded):
    assert comfy.samplers.KSampler.SCHEDULERS is comfy.samplers.SCHEDULER_NAMES
    for node in (nodes.KSampler, nodes.KSamplerAdvanced, custom_sampler.BasicScheduler):
        assert "exp_karras" in node.INPUT_TYPES()["required"]["scheduler"][0], node.__name__
    assert "exp_karras" in comfy.samplers.SCHEDULER_HANDLERS


def test_node_is_registered_with_its_display_name(comfy_loaded):
    assert NODE_ID in nodes.NODE_CLASS_MAPPINGS
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[NODE_ID] == "ExpKarras Scheduler"
    info = nodes.NODE_CLASS_MAPPINGS[NODE_ID].GET_NODE_INFO_V1()
    assert info["category"] == "sampling/custom_sampling/schedulers" and info["description"]
    inputs = info["input"]["required"]
    assert set(inputs) == {"model", "steps", "p", "denoise"}
    assert all(options.get("tooltip") for _, options in inputs.values())
    assert {"default": 20, "min": 1, "max": 10000}.items() <= inputs["steps"][1].items()
    assert {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}.items() <= inputs["p"][1].items()
    assert {"default": 1.0, "min": 0.0, "max": 1.0}.items() <= inputs["denoise"][1].items()
    assert info["output"] == ["SIGMAS"]


def test_loading_twice_lists_exp_karras_once(comfy_loaded, load_repo):
    handler = comfy.samplers.SCHEDULER_HANDLERS["exp_karras"]
    assert load_repo()
    assert comfy.samplers.SCHEDULER_NAMES.count("exp_karras") == 1
    assert comfy.samplers.SCHEDULER_HANDLERS["exp_karras"] is handler
    assert nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0].count("exp_karras") == 1


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_comfy_sigmas_and_timesteps_equal_diffusers(dd_schedulers, sd_scheduler_config, steps):
    model_sampling = SD15Sampling()
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "exp_karras", steps)
    reference = dd_schedulers.ExpKarrasScheduler.from_config(sd_scheduler_config)
    reference.set_timesteps(steps)
    assert sigmas.dtype == torch.float32 and len(sigmas) == steps + 1
    exact = dd_schedulers.exp_karras_sigmas(
        steps, 1.0, alphas_cumprod=dd_schedulers.alphas_cumprod_from_config(sd_scheduler_config))
    torch.testing.assert_close(sigmas, exact.float(), rtol=1e-6, atol=0)
    # Both build the noise table in float64, so the float32 sigmas agree to rounding.
    torch.testing.assert_close(sigmas, reference.sigmas, rtol=1e-6, atol=0)
    # ComfyUI feeds the UNet the nearest integer timestep (an argmin over log-sigma); so does
    # ExpKarrasScheduler, so both doors make identical model calls.
    comfy_t = model_sampling.timestep(sigmas[:-1])
    assert comfy_t.tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("p", [0.0, 0.5, 2.0])
def test_node_and_diffusers_call_the_model_at_the_same_timesteps(comfy_loaded, tiny_model, dd_schedulers,
                                                                  sd_scheduler_config, p):
    """At p = 0 the grid is uniform in t, so an odd step count puts timesteps half-way between two (t = 499.5 at
    3 steps): a tie in log-sigma that float rounding decides. Both front doors must compute the same sigmas bit for
    bit and round the tie alike (before: 29 odd step counts of 3..59 called the UNet at other timesteps)."""
    model_sampling = tiny_model.get_model_object("model_sampling")
    reference = dd_schedulers.ExpKarrasScheduler.from_config(dict(sd_scheduler_config, exp_karras_p=p))
    for steps in range(1, 61):
        sigmas = run_node(tiny_model, steps, p=p)
        reference.set_timesteps(steps)
        torch.testing.assert_close(sigmas, reference.sigmas, rtol=0, atol=0)
        assert model_sampling.timestep(sigmas[:-1]).tolist() == reference.timesteps.tolist(), steps


def test_node_sigmas_follow_basic_scheduler_denoise(comfy_loaded, tiny_model):
    full = comfy.samplers.calculate_sigmas(tiny_model.get_model_object("model_sampling"), "exp_karras", 20)
    torch.testing.assert_close(run_node(tiny_model, 20), full, rtol=0, atol=0)
    half = run_node(tiny_model, 10, denoise=0.5)
    torch.testing.assert_close(half, full[-11:], rtol=0, atol=0)
    (basic,) = custom_sampler.BasicScheduler().get_sigmas(tiny_model, "exp_karras", 10, 0.5)
    torch.testing.assert_close(half, basic, rtol=0, atol=0)
    empty = run_node(tiny_model, 10, denoise=0.0)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_node_p_shapes_the_schedule(comfy_loaded, tiny_model):
    uniform, curved = run_node(tiny_model, 20, p=0.0), run_node(tiny_model, 20, p=3.0)
    assert uniform[0] == curved[0] and uniform[-2] == curved[-2]  # same endpoints: t = 999 and t = 0
    assert curved[-3] < uniform[-3]  # larger p: finer steps near the end
    assert bool((curved[1:] < curved[:-1]).all())


def test_ksampler_runs_exp_karras_and_feeds_the_expected_timesteps(dd_schedulers, sd_scheduler_config, tiny_model):
    model = tiny_model.clone()
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        (out,) = nodes.common_ksampler(model, 0, 6, 5.0, "euler", "exp_karras", tiny_conditioning(0),
                                       tiny_conditioning(1), latent)
    finally:
        hook.remove()
    assert out["samples"].shape == (1, 4, 8, 8) and bool(torch.isfinite(out["samples"]).all())
    reference = dd_schedulers.ExpKarrasScheduler.from_config(sd_scheduler_config)
    reference.set_timesteps(6)
    fed = torch.stack([t[0] for t in seen]).float().cpu()  # cond and uncond share a batch and a timestep
    assert fed.tolist() == reference.timesteps.float().tolist()


@pytest.mark.parametrize("steps", [2, 4, 9, 20, 50, 139, 200])  # beta at 139, 200: repeated timesteps dropped
@pytest.mark.parametrize("name", ["karras", "exponential", "normal", "simple", "sgm_uniform", "beta", "kl_optimal"])
def test_peer_schedules_equal_comfyui_scheduler_table(dd_schedulers, name, steps):
    model_sampling = SD15Sampling()
    ours = dd_schedulers.schedule_sigmas(name, steps, model_sampling.sigmas)
    theirs = comfy.samplers.calculate_sigmas(model_sampling, name, steps)
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 4, 10, 13, 40])
@pytest.mark.parametrize("model", ["SD1", "SDXL"])
def test_align_your_steps_equals_comfyui_node(dd_schedulers, model, steps):
    (theirs,) = align_your_steps.AlignYourStepsScheduler.execute(model, steps, 1.0).result
    torch.testing.assert_close(dd_schedulers.align_your_steps_sigmas(steps, model).float(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [2, 3, 8, 12, 20, 27])
@pytest.mark.parametrize("coeff", [0.80, 1.05, 1.20, 1.50])
def test_gits_equals_comfyui_node(dd_schedulers, coeff, steps):
    (theirs,) = gits.GITSScheduler.execute(coeff, steps, 1.0).result
    ours = dd_schedulers.gits_sigmas(steps, coeff, table=SD15Sampling().sigmas)
    # Ours reads the time steps' sigmas from the model's table; the published sigmas carry 8 decimals.
    torch.testing.assert_close(ours.float(), theirs, rtol=5e-5, atol=0)


@pytest.mark.parametrize("steps, rho", [(1, 1.0), (8, 1.0), (8, 2.0), (20, 0.5)])
def test_polyexponential_equals_comfyui_node(dd_schedulers, steps, rho):
    sigmas = SD15Sampling().sigmas
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    (theirs,) = custom_sampler.PolyexponentialScheduler().get_sigmas(steps, hi, lo, rho)
    torch.testing.assert_close(dd_schedulers.polyexponential_sigmas(steps, lo, hi, rho).float(), theirs,
                               rtol=2e-6, atol=0)
