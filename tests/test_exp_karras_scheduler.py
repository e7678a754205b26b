"""ExpKarrasScheduler against independent DPM-Solver++ 2M implementations, as a drop-in for every
DPMSolverMultistepScheduler setting, and inside real pipelines (diffusers' own DPM-Solver test suite runs on
it in test_exp_karras_diffusers_suite.py)."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from direct_distill.schedulers import (ExpKarrasScheduler, alphas_cumprod_from_config, exp_karras_sigmas,
                                       exp_karras_timesteps, sigma_table, ve_to_vp)

# The scheduler configs the big checkpoints ship (values as in their scheduler_config.json).
SHIPPED_CONFIGS = {
    "sd15_pndm": (PNDMScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                                      steps_offset=1, trained_betas=None)),
    "sd21_ddim_v": (DDIMScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                                        set_alpha_to_one=False, steps_offset=1, trained_betas=None)),
    "sdxl_euler": (EulerDiscreteScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                interpolation_type="linear", num_train_timesteps=1000,
                                                prediction_type="epsilon", steps_offset=1,
                                                timestep_spacing="leading", trained_betas=None,
                                                use_karras_sigmas=False)),
    "dpm_karras": (DPMSolverMultistepScheduler, dict(beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule="scaled_linear", use_karras_sigmas=True,
                                                     algorithm_type="dpmsolver++", solver_order=2)),
}


def toy_eps_model(x, t):
    """A smooth, non-linear stand-in for a UNet's epsilon prediction (depends on x only)."""
    return torch.tanh(0.7 * x) + 0.1 * x.roll(1, dims=-1)


def run_diffusers(scheduler, x):
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps_model(x, t), t, x).prev_sample
    return x


def run_k_diffusion_dpmpp_2m(sigmas, x_ve):
    """DPM-Solver++(2M) in k-diffusion's form (Lu et al. 2022), on VE latents, written out here."""
    sigmas = sigmas.double()
    x, old_denoised = x_ve.double(), None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = x - s * toy_eps_model(ve_to_vp(x, s).float(), None).double()
        if s_next == 0:
            x = denoised
            break
        t, t_next = -s.log(), -s_next.log()
        h = t_next - t
        if old_denoised is None:
            d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s_next / s) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x.float()


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_from_shipped_configs(name, tmp_path):
    cls, cfg = SHIPPED_CONFIGS[name]
    sched = ExpKarrasScheduler.from_config(cls(**cfg).config)
    assert sched.config.exp_karras_p == 1.0 and sched.config.algorithm_type == "dpmsolver++"
    assert sched.config.prediction_type == cfg.get("prediction_type", "epsilon")
    sched.set_timesteps(20)
    torch.testing.assert_close(sched.sigmas, exp_karras_sigmas(20, 1.0, alphas_cumprod=sched.alphas_cumprod).float())
    sched.save_pretrained(tmp_path)
    again = ExpKarrasScheduler.from_pretrained(tmp_path)
    again.set_timesteps(20)
    # diffusers notes which arguments took defaults; a saved and reloaded config has them all given.
    assert dict(again.config) == {k: v for k, v in sched.config.items() if k != "_use_default_values"}
    assert not again.config.get("use_karras_sigmas", False)
    torch.testing.assert_close(again.sigmas, sched.sigmas)


def test_p_is_kept_and_changes_sigmas(tmp_path):
    sched = ExpKarrasScheduler(exp_karras_p=2.0)
    sched.save_pretrained(tmp_path)
    loaded = ExpKarrasScheduler.from_pretrained(tmp_path)
    assert loaded.config.exp_karras_p == 2.0
    loaded.set_timesteps(10)
    base = ExpKarrasScheduler()
    base.set_timesteps(10)
    assert not torch.allclose(loaded.sigmas, base.sigmas)


def test_matches_diffusers_dpmsolver_on_karras_sigmas():
    """Peer check: same sigmas, same toy model -> the same sample as DPMSolverMultistepScheduler."""
    for steps in (4, 10, 25):
        ref = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          use_karras_sigmas=True)
        ref.set_timesteps(steps)
        ours = ExpKarrasScheduler()
        ours.set_timesteps(sigmas=ref.sigmas)
        torch.testing.assert_close(ours.sigmas, ref.sigmas)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        torch.testing.assert_close(run_diffusers(ours, x.clone()), run_diffusers(ref, x.clone()),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps, p", [(5, 1.0), (12, 1.0), (20, 0.5), (20, 2.0)])
def test_matches_k_diffusion_dpmpp_2m_on_exp_karras(steps, p):
    sched = ExpKarrasScheduler(exp_karras_p=p)
    sched.set_timesteps(steps)
    x_ve = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.sigmas[0]
    ours = run_diffusers(sched, ve_to_vp(x_ve, sched.sigmas[0]))
    ref = run_k_diffusion_dpmpp_2m(sched.sigmas, x_ve)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_model_is_called_at_the_nearest_integer_timestep_of_each_sigma():
    """Sigmas are exact; the UNet gets the nearest integer timestep, as ComfyUI gives it."""
    sched = ExpKarrasScheduler()
    sched.set_timesteps(20)
    exact = exp_karras_timesteps(20, 1.0)
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps[-1] == 0
    assert (sched.timesteps.double() - exact).abs().max() <= 0.5 + 1e-6
    table = sigma_table(sched.alphas_cumprod)
    log_dist = (sched.sigmas[:-1, None].double().log() - table.log()).abs()
    torch.testing.assert_close(sched.timesteps, log_dist.argmin(dim=1))


def test_explicit_timesteps_and_errors():
    sched = ExpKarrasScheduler()
    sched.set_timesteps(timesteps=[999, 500.5, 100])
    table = sigma_table(sched.alphas_cumprod)
    assert sched.sigmas[0] == pytest.approx(table[999].item()) and sched.sigmas[-1] == 0
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="strictly decrease"):
        sched.set_timesteps(sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="steps"):
        sched.set_timesteps(0)


@pytest.mark.parametrize("p", [-1.0, float("nan"), float("inf")])
def test_bad_p_is_refused(p):
    with pytest.raises(ValueError, match="exp_karras_p"):
        ExpKarrasScheduler(exp_karras_p=p)


def test_unusable_config_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        ExpKarrasScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        ExpKarrasScheduler(prediction_type="flow_prediction")


def test_runs_in_stable_diffusion_pipeline(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(float(args[1].flatten()[0])),
                                        with_kwargs=True)
    out = pipe("sneaker", num_inference_steps=6, guidance_scale=3.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert seen == pipe.scheduler.timesteps.tolist()
    image = pipe("bag", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)  # 16x16 latents, a VAE that upsamples twice


def test_a_pipeline_saved_with_it_loads_again_with_it(tiny_sd_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline.scheduler = ExpKarrasScheduler.from_config(tiny_sd_pipeline.scheduler.config, exp_karras_p=2.0)
    tiny_sd_pipeline.save_pretrained(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(again.scheduler) is ExpKarrasScheduler and again.scheduler.config.exp_karras_p == 2.0


def test_runs_in_stable_diffusion_xl_pipeline(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    out = pipe("coat", num_inference_steps=5, output_type="latent", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_same_sigmas_through_euler_pipeline(tiny_sd_pipeline):
    """Pipelines whose scheduler takes ``sigmas=`` can run the exp-Karras schedule too."""
    pipe = tiny_sd_pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sig = exp_karras_sigmas(8, 1.0, alphas_cumprod=pipe.scheduler.alphas_cumprod)
    out = pipe("dress", sigmas=sig.tolist(), output_type="latent",  # Euler takes the final 0 too
               generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(pipe.scheduler.sigmas, sig.float())
    assert torch.isfinite(out).all()


# --- a drop-in for DPMSolverMultistepScheduler ------------------------------------------------------------

SPACING_REQUESTS = [("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                    ("use_lu_lambdas", True), ("use_flow_sigmas", True), ("flow_shift", 3.0),
                    ("use_dynamic_shifting", True), ("timestep_spacing", "trailing")]


def test_takes_every_dpmsolver_argument():
    theirs = set(inspect.signature(DPMSolverMultistepScheduler.__init__).parameters)
    assert theirs <= set(inspect.signature(ExpKarrasScheduler.__init__).parameters)


@pytest.mark.parametrize("flag, value", SPACING_REQUESTS)
def test_a_spacing_request_gets_one_clear_error(flag, value):
    with pytest.raises(ValueError, match=f"{flag}={value!r} asks for another sigma spacing.*exp_karras_p"):
        ExpKarrasScheduler(**{flag: value})
    with pytest.raises(ValueError, match=f"{flag}={value!r} asks"):
        ExpKarrasScheduler.from_config(PNDMScheduler().config, **{flag: value})


def test_several_spacing_requests_are_named_in_one_error():
    with pytest.raises(ValueError, match="use_karras_sigmas=True, timestep_spacing='trailing' asks"):
        ExpKarrasScheduler(use_karras_sigmas=True, timestep_spacing="trailing")


def test_from_config_drops_another_schedulers_spacing():
    other = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        use_karras_sigmas=True, timestep_spacing="trailing", steps_offset=1,
                                        flow_shift=3.0)
    sched = ExpKarrasScheduler.from_config(other.config)
    config = sched.config
    assert (config.use_karras_sigmas, config.timestep_spacing, config.steps_offset, config.flow_shift) == (
        False, "linspace", 1, 1.0)
    sched.set_timesteps(8)
    expected = exp_karras_sigmas(8, 1.0, alphas_cumprod=alphas_cumprod_from_config(other.config))
    torch.testing.assert_close(sched.sigmas, expected.float())


def test_from_config_keeps_the_noise_table_a_scheduler_left_at_its_defaults():
    # DDPM's own defaults (linear, 1e-4 to 0.02) are listed in _use_default_values; diffusers' from_config would
    # give them this class's defaults, SD's table: sigma_max 14.6 instead of 157.4.
    for source in (DDPMScheduler(), DDIMScheduler(beta_schedule="scaled_linear")):
        sched = ExpKarrasScheduler.from_config(source.config)
        assert (sched.config.beta_start, sched.config.beta_end) == (0.0001, 0.02)
        sched.set_timesteps(8)
        expected = exp_karras_sigmas(8, 1.0, alphas_cumprod=source.alphas_cumprod)
        torch.testing.assert_close(sched.sigmas, expected.float())


def test_a_config_file_that_leaves_out_the_noise_table_gets_its_own_class_defaults(tmp_path):
    """A scheduler_config.json naming only DDPMScheduler means DDPM's linear 1e-4 to 0.02, as DDPMScheduler reads
    it, not this class's SD table (alphas_cumprod[-1] 4.0e-5, not 4.7e-3)."""
    import json

    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                                 "num_train_timesteps": 1000}))
    ddpm = DDPMScheduler.from_pretrained(tmp_path)
    sched = ExpKarrasScheduler.from_pretrained(tmp_path)
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == ("linear", 0.0001, 0.02)
    torch.testing.assert_close(sched.alphas_cumprod, ddpm.alphas_cumprod)
    # a class diffusers does not have, or this one, keeps this class's defaults
    for name in ("ExpKarrasScheduler", "NoSuchScheduler"):
        assert ExpKarrasScheduler.from_config({"_class_name": name}).config.beta_schedule == "scaled_linear"


def test_steps_offset_is_taken_and_an_sd_pipeline_built_with_the_scheduler_does_not_rewrite_it(tiny_sd_pipeline):
    import warnings

    from diffusers import StableDiffusionImg2ImgPipeline

    assert ExpKarrasScheduler(steps_offset=0).config.steps_offset == 0  # nothing to offset: any integer
    tiny_sd_pipeline.scheduler = ExpKarrasScheduler.from_config(tiny_sd_pipeline.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "steps_offset ... is outdated" was a FutureWarning
        img2img = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline.components)
    assert img2img.scheduler.config.steps_offset == 1
    arguments = inspect.signature(ExpKarrasScheduler.__init__).parameters
    ExpKarrasScheduler(**{k: v for k, v in img2img.scheduler.config.items() if k in arguments})  # its own config


@pytest.mark.parametrize("p", [10.5, 30.0, 710.0, float("nan"), -1.0, "1", True])
def test_an_exp_karras_p_out_of_range_is_one_clear_error(p):
    # p = 30 used to run to NaN latents (its last float32 sigmas equal), 710 to overflow
    for build in (lambda: ExpKarrasScheduler(exp_karras_p=p),
                  lambda: exp_karras_sigmas(50, p, alphas_cumprod=DDPMScheduler().alphas_cumprod)):
        with pytest.raises(ValueError, match=r"exp_karras_p must be a number in \[0, 10\], got "):
            build()
    assert ExpKarrasScheduler(exp_karras_p=np.float32(2.0)).config.exp_karras_p == 2.0  # numpy and 0-d tensors too
    ExpKarrasScheduler(exp_karras_p=torch.tensor(10.0)).set_timesteps(1000)


@pytest.mark.parametrize("n", [2000, 3000])
def test_more_steps_than_the_noise_table_run_to_the_end(n):
    # the first sigmas share model timestep 999: diffusers' index rule would start at the second and overrun
    sched = ExpKarrasScheduler(exp_karras_p=0.0)
    sched.set_timesteps(n)
    assert sched.timesteps[0] == sched.timesteps[1]
    sample = torch.ones(1, 1, 2, 2)
    for t in sched.timesteps:
        sample = sched.step(torch.zeros_like(sample), t, sample).prev_sample
    assert sched.step_index == n and torch.isfinite(sample).all()


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_a_bad_step_count_is_refused_as_such_when_ending_at_sigma_min(steps):
    with pytest.raises(ValueError, match="number of steps must be an integer >= 1, got"):
        ExpKarrasScheduler(final_sigmas_type="sigma_min").set_timesteps(steps)


def test_flow_matching_configs_and_mu_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="config describes a flow-matching model"):
        ExpKarrasScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="flow-matching"):
        ExpKarrasScheduler.from_config(DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                   prediction_type="flow_prediction").config)
    with pytest.raises(ValueError, match="mu is the dynamic shift"):
        ExpKarrasScheduler().set_timesteps(8, mu=0.5)


def test_edm_configs_are_refused():
    """Playground v2.5's EDM schedulers (continuous sigmas 0.002 to 80) have no DDPM noise table: refused, not
    given SD's."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    from direct_distill.schedulers import alphas_cumprod_from_config

    for source in (EDMEulerScheduler(), EDMDPMSolverMultistepScheduler()):
        with pytest.raises(ValueError, match="config describes an EDM model .continuous sigmas from 0.002 to 80"):
            ExpKarrasScheduler.from_config(source.config)
        with pytest.raises(ValueError, match="describes an EDM model"):
            alphas_cumprod_from_config(source.config)


@pytest.mark.parametrize("lambda_min_clipped", [-5.1, -3.0])
def test_lambda_min_clipped_starts_where_diffusers_starts(lambda_min_clipped):
    """The cosine schedule's last timesteps have a huge sigma; clipping log-SNR starts the run below them."""
    config = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=lambda_min_clipped)
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(10)
    sched = ExpKarrasScheduler(**config)
    sched.set_timesteps(10)
    assert sched.timesteps[0] == ref.timesteps[0] < 999
    assert sched.sigmas[0] == pytest.approx(ref.sigmas[0].item(), rel=1e-4)
    assert -torch.log(sched.sigmas[0]) >= lambda_min_clipped
    assert sched.timesteps[-1] == 0


def test_learned_variance_output_is_read_as_its_mean_half():
    # diffusers reads the first 3 channels: learned variance belongs to pixel-space (RGB) models.
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps, variance = toy_eps_model(x, None), torch.randn(1, 3, 8, 8)
    outputs = []
    for variance_type, output in ((None, eps), ("learned_range", torch.cat([eps, variance], dim=1))):
        sched = ExpKarrasScheduler(variance_type=variance_type)
        sched.set_timesteps(6)
        outputs.append(sched.step(output, sched.timesteps[0], x).prev_sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_zero_terminal_snr_starts_at_diffusers_finite_sigma_max():
    ref = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched = ExpKarrasScheduler.from_config(ref.config)
    sched.set_timesteps(8)
    ref.set_timesteps(8)
    assert sched.sigmas[0] == pytest.approx(ref.sigmas[0].item(), rel=1e-4) and sched.sigmas[0] == pytest.approx(4096)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_diffusers(sched, x)).all()


def test_final_sigma_min_takes_n_real_steps_to_sigma_min():
    sched = ExpKarrasScheduler(final_sigmas_type="sigma_min", solver_order=2)
    sched.set_timesteps(6)
    table = sigma_table(alphas_cumprod_from_config(sched.config))
    assert len(sched.sigmas) == 7 and sched.sigmas[-1] == pytest.approx(table[0].item(), rel=1e-6)
    assert bool((sched.sigmas[1:] < sched.sigmas[:-1]).all())  # no zero-length last step
    torch.testing.assert_close(sched.sigmas[:-1], exp_karras_sigmas(7, 1.0, alphas_cumprod=sched.alphas_cumprod)[:6]
                               .float())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_diffusers(sched, x)).all()


def test_step_counts_may_be_numpy_or_tensor_integers_and_timesteps_stay_within_the_table():
    reference = ExpKarrasScheduler()
    reference.set_timesteps(4)
    for n in (np.int64(4), torch.tensor(4)):  # as diffusers' own schedulers take them
        scheduler = ExpKarrasScheduler()
        scheduler.set_timesteps(n)
        assert torch.equal(scheduler.timesteps, reference.timesteps) and torch.equal(scheduler.sigmas, reference.sigmas)
    for n in (4.0, True, 0, "4"):
        with pytest.raises(ValueError, match="number of steps must be an integer >= 1"):
            ExpKarrasScheduler().set_timesteps(n)
    scheduler = ExpKarrasScheduler()
    scheduler.set_timesteps(timesteps=[999, 100])
    assert scheduler.timesteps.tolist() == [999, 100]
    for timesteps in ([1500, 100], [1000, 500, 100]):  # were clamped to 999 without a word
        with pytest.raises(ValueError, match=r"timesteps must lie in 0\.\.999 \(the model's training timesteps\), "
                                             f"got {timesteps[0]}"):
            scheduler.set_timesteps(timesteps=timesteps)


def test_a_deis_config_gives_dpm_solver_plus_plus_on_its_noise_table():
    from diffusers import DEISMultistepScheduler

    source = DEISMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = ExpKarrasScheduler.from_config(source.config)
    assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)
    torch.testing.assert_close(scheduler.alphas_cumprod, source.alphas_cumprod)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == exp_karras_timesteps(4, 1.0).round().int().tolist()


def test_configs_whose_table_it_cannot_rebuild_are_refused_by_name():
    """CogVideoX's SNR shift, a VE model's sigma range and a class with no beta table were each sampled on a
    substitute table (SD's, or SD's betas over 2,000 steps)."""
    from diffusers import CogVideoXDDIMScheduler, SASolverScheduler, ScoreSdeVeScheduler

    with pytest.raises(ValueError, match="shifts its table's SNR \\(snr_shift_scale 3.0, as CogVideoX's\\)"):
        ExpKarrasScheduler.from_config(CogVideoXDDIMScheduler(snr_shift_scale=3.0).config)
    with pytest.raises(ValueError, match="describes a sigma range \\(0.01 to 1348.0\\) with no beta table"):
        ExpKarrasScheduler.from_config(ScoreSdeVeScheduler().config)
    with pytest.raises(ValueError, match="is ScoreSdeVeScheduler's, which has no beta table"):
        ExpKarrasScheduler.from_config({"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000})
    # SA-Solver's own algorithm is not DPM-Solver's: the table is kept, the solver is DPM-Solver++
    sa = ExpKarrasScheduler.from_config(SASolverScheduler().config)
    assert sa.config.algorithm_type == "dpmsolver++"


def test_a_misspelt_final_sigmas_type_is_refused():
    """Anything but "sigma_min" was read as "zero" (all NaN with dpmsolver); DPM-Solver's own check missed it."""
    with pytest.raises(ValueError, match="final_sigmas_type must be 'zero' or 'sigma_min', got 'sigma-min'"):
        ExpKarrasScheduler(final_sigmas_type="sigma-min", algorithm_type="dpmsolver")


@pytest.mark.parametrize("p", [np.float32(2.0), np.int64(2), torch.tensor(2.0)])
def test_a_numpy_or_torch_p_saves_as_a_plain_number(p, tmp_path):
    scheduler = ExpKarrasScheduler(exp_karras_p=p)
    scheduler.save_pretrained(tmp_path)
    assert ExpKarrasScheduler.from_pretrained(tmp_path).config.exp_karras_p == 2.0
    assert type(scheduler.config.exp_karras_p) is float


def test_half_precision_noising_at_zero_terminal_snr_keeps_the_noise():
    """The first sigma, 4096, squared overflows float16: diffusers' add_noise gave all zeros."""
    scheduler = ExpKarrasScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(0)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    full = scheduler.add_noise(x0, noise, scheduler.timesteps[:1])
    for dtype in (torch.float16, torch.bfloat16):
        half = scheduler.add_noise(x0.to(dtype), noise.to(dtype), scheduler.timesteps[:1])
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), full, atol=1e-2, rtol=1e-2)
