"""exp_karras inside a real ComfyUI: registration in every scheduler dropdown, sigmas and timesteps equal
to the diffusers ExpKarrasScheduler's, the standalone SIGMAS node, and a KSampler run."""

import comfy.model_sampling
import comfy.samplers
import comfy_extras.nodes_custom_sampler as custom_sampler
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
