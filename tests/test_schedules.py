"""The schedule functions: the seed's landmarks, published values, diffusers' own Karras and exponential sigmas,
limits, shapes and bad input."""

import math

import pytest
import torch

from direct_distill.schedulers import (SCHEDULE_NAMES, align_your_steps_sigmas, alphas_cumprod_from_config,
                                       beta_sigmas, exp_karras_sigmas, exp_karras_timesteps, exponential_sigmas,
                                       gits_sigmas, karras_sigmas, kl_optimal_sigmas, polyexponential_sigmas,
                                       schedule_sigmas, sgm_uniform_sigmas, sigma_table, sigma_to_t, sigmas_for_denoise,
                                       simple_sigmas, t_to_sigma, uniform_t_sigmas, ve_to_vp, vp_to_ve)

SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", prediction_type="epsilon")

SD_AC = alphas_cumprod_from_config(SD_SCHEDULER_CONFIG)
SD_TABLE = sigma_table(SD_AC)


def test_sd_noise_table_matches_diffusers(sd_scheduler_config):
    from diffusers import PNDMScheduler

    ref = PNDMScheduler.from_config(sd_scheduler_config).alphas_cumprod
    torch.testing.assert_close(SD_AC.float(), ref, rtol=1e-6, atol=0)
    assert SD_TABLE[0] == pytest.approx(0.0292, abs=1e-4)
    assert SD_TABLE[-1] == pytest.approx(14.6146, abs=1e-3)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_table_matches_diffusers(beta_schedule):
    """Lin et al.'s rescaling, with diffusers' finite stand-in for the last (zero) alpha-bar."""
    from diffusers import DPMSolverMultistepScheduler

    config = dict(SD_SCHEDULER_CONFIG, beta_schedule=beta_schedule, rescale_betas_zero_snr=True)
    ours = alphas_cumprod_from_config(config)
    ref = DPMSolverMultistepScheduler(**config).alphas_cumprod.double()
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=1e-4, atol=0)
    table = sigma_table(ours)
    assert bool((table[1:] > table[:-1]).all()), "sigma keeps increasing up to the last timestep"
    if ref[-2] > ref[-1]:  # where diffusers' own table increases to the end, its last entry too
        assert ours[-1] == ref[-1] == 2.0**-24


def test_seed_landmarks_at_20_steps():
    """Seed 000 §3.1 (20 sigmas plus the appended zero): exp-Karras' third-to-last sigma sits at
    t ~= 31; Karras' fourth-to-last at t ~= 6 and its last two non-zero ones under one step."""
    ek = exp_karras_sigmas(20, 1.0, alphas_cumprod=SD_AC)
    assert len(ek) == 21 and ek[-1] == 0
    assert sigma_to_t(ek[-3], SD_TABLE).item() == pytest.approx(31, abs=1.0)
    kr = karras_sigmas(20, float(SD_TABLE[0]), float(SD_TABLE[-1]))
    assert sigma_to_t(kr[-4], SD_TABLE).item() == pytest.approx(6, abs=1.0)
    assert sigma_to_t(kr[-3], SD_TABLE).item() < 2.0
    assert sigma_to_t(kr[-2], SD_TABLE).item() < 1.0


def test_exp_karras_timesteps_are_even_in_exponential_time_space():
    """Seed 000 §3.1: the steps are uniform in s = log(1 + t (e^p - 1) / t_max) / p, from s = 1 at t_max to 0."""
    n, p = 12, 1.7
    t = exp_karras_timesteps(n, p)
    s = torch.log1p(t * math.expm1(p) / 999) / p
    torch.testing.assert_close(s, torch.linspace(1, 0, n, dtype=torch.float64))
    sig = exp_karras_sigmas(n, p, alphas_cumprod=SD_AC)
    assert sig[0] == pytest.approx(SD_TABLE[-1].item()) and sig[-2] == pytest.approx(SD_TABLE[0].item())
    torch.testing.assert_close(sigma_to_t(sig[:-1], SD_TABLE), t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 20, 50])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_sigmas_strictly_decrease_then_zero(n, p):
    sig = exp_karras_sigmas(n, p, alphas_cumprod=SD_AC)
    assert sig.shape == (n + 1,) and sig[-1] == 0
    assert sig[0] == pytest.approx(SD_TABLE[-1].item())
    assert bool((sig[:-1][1:] < sig[:-1][:-1]).all()) and bool((sig[:-1] > 0).all())


def test_p_to_zero_is_uniform_in_t():
    t_small = exp_karras_timesteps(20, 1e-6)
    torch.testing.assert_close(t_small, torch.linspace(999, 0, 20, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(exp_karras_timesteps(20, 0.0), torch.linspace(999, 0, 20, dtype=torch.float64))
    torch.testing.assert_close(uniform_t_sigmas(20, alphas_cumprod=SD_AC),
                               exp_karras_sigmas(20, 0.0, alphas_cumprod=SD_AC))


def test_larger_p_takes_finer_steps_near_zero():
    last_t = [exp_karras_timesteps(20, p)[-2].item() for p in (0.5, 1.0, 2.0, 4.0)]
    assert last_t == sorted(last_t, reverse=True)


@pytest.mark.parametrize("n", [1, 4, 10, 25])
@pytest.mark.parametrize("flag, ours", [("use_karras_sigmas", karras_sigmas),
                                        ("use_exponential_sigmas", exponential_sigmas)])
def test_karras_and_exponential_equal_diffusers_own(n, flag, ours):
    """diffusers builds these from its float32 noise table's end points; given the same end points ours agree."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(**SD_SCHEDULER_CONFIG, **{flag: True})
    ref.set_timesteps(n)
    table = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt().double()
    torch.testing.assert_close(ours(n, float(table[0]), float(table[-1])).float(), ref.sigmas, rtol=1e-5, atol=0)


def test_sigma_t_maps_are_inverse_and_fractional():
    t = torch.tensor([0.0, 0.25, 10.5, 500.75, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, SD_TABLE), SD_TABLE), t, atol=1e-9, rtol=0)
    torch.testing.assert_close(t_to_sigma(torch.arange(1000.0), SD_TABLE), SD_TABLE)
    mid = t_to_sigma(10.5, SD_TABLE)
    assert mid.item() == pytest.approx(math.sqrt(SD_TABLE[10].item() * SD_TABLE[11].item()))


def test_vp_ve_conversion_round_trip():
    x0, eps, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    x_ve = x0 + sigma.view(-1, 1, 1, 1) * eps
    a = 1 / (1 + sigma**2).sqrt()
    x_vp = a.view(-1, 1, 1, 1) * x0 + (sigma * a).view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(ve_to_vp(x_ve, sigma), x_vp)
    torch.testing.assert_close(vp_to_ve(x_vp, sigma), x_ve)


def test_denoise_keeps_the_tail():
    full = exp_karras_sigmas(20, 1.0, alphas_cumprod=SD_AC)
    part = sigmas_for_denoise(lambda n: exp_karras_sigmas(n, 1.0, alphas_cumprod=SD_AC), 10, 0.5)
    torch.testing.assert_close(part, full[-11:])
    with pytest.raises(ValueError, match="denoise"):
        sigmas_for_denoise(lambda n: full, 10, 1.5)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        exp_karras_sigmas(steps, 1.0, alphas_cumprod=SD_AC)


@pytest.mark.parametrize("p", [-0.1, float("nan"), float("inf"), "1"])
def test_bad_p(p):
    with pytest.raises(ValueError, match="p must be"):
        exp_karras_sigmas(10, p, alphas_cumprod=SD_AC)


@pytest.mark.parametrize("config, message", [
    (dict(beta_schedule="cubic"), "beta_schedule"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(prediction_type="flow_prediction"), "flow-matching"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(beta_start=0.5, beta_end=1.5, beta_schedule="linear"), "betas"),
])
def test_unusable_configs(config, message):
    with pytest.raises(ValueError, match=message):
        alphas_cumprod_from_config({**SD_SCHEDULER_CONFIG, **config})


# --- the peer schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, n", [(name, n) for name in SCHEDULE_NAMES for n in (1, 2, 4, 8, 12, 20, 50, 100)
                                     if (name, n) != ("gits", 1)])  # GITS starts at 2 steps (refusal tested below)
def test_every_schedule_descends_from_sigma_max_to_zero(name, n):
    sig = schedule_sigmas(name, n, SD_TABLE)
    assert sig.dtype == torch.float64 and sig.shape == (n + 1,) and sig[-1] == 0
    assert sig[0] == pytest.approx(SD_TABLE[-1].item(), rel=1e-6)
    assert bool((sig[1:] < sig[:-1]).all()) and bool((sig[:-1] >= SD_TABLE[0] * (1 - 1e-6)).all())


def test_align_your_steps_is_the_published_sd_schedule():
    """The paper's 10-step levels fall on the SD1.5 and SDXL timesteps it publishes (diffusers keeps both lists)."""
    from diffusers.schedulers import AysSchedules

    from direct_distill.schedulers import sigma_to_model_timestep

    for model, key in (("SD1", "StableDiffusion"), ("SDXL", "StableDiffusionXL")):
        sig = align_your_steps_sigmas(10, model)
        assert sigma_to_model_timestep(sig[:-1], SD_TABLE).tolist() == AysSchedules[key + "Timesteps"]


def test_align_your_steps_interpolates_log_linearly():
    """At 20 steps every other level is a published one and those between are geometric means."""
    ten, twenty = align_your_steps_sigmas(10), align_your_steps_sigmas(20)
    torch.testing.assert_close(twenty[0:-1:2], ten[:-1])
    torch.testing.assert_close(twenty[1:-2:2], (twenty[0:-3:2] * twenty[2:-1:2]).sqrt())
    assert twenty[-2] == pytest.approx(math.sqrt(ten[-2].item() * 0.0291671582))  # the dropped sigma_min


@pytest.mark.parametrize("coeff, n, published", [
    (1.20, 10, [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                0.19894916, 0.09824532]),
    (1.20, 4, [14.61464119, 2.36326075, 0.92192322, 0.36617002]),
    (0.80, 4, [14.61464119, 11.54541874, 7.49001646, 3.07277966]),
    (1.50, 20, [14.61464119, 2.45070267, 1.41535246, 0.95350921, 0.72133851, 0.57119018, 0.4783645, 0.43325692,
                0.38853383, 0.36617002, 0.34370604, 0.32104823, 0.29807833, 0.27464288, 0.25053367, 0.22545385,
                0.19894916, 0.17026083, 0.13792117, 0.09824532]),
])
def test_gits_gives_the_published_sd15_sigmas(coeff, n, published):
    torch.testing.assert_close(gits_sigmas(n, coeff, table=SD_TABLE),
                               torch.tensor(published + [0.0], dtype=torch.float64), rtol=5e-5, atol=0)


def test_gits_beyond_20_steps_interpolates_its_20_step_schedule():
    twenty, forty = gits_sigmas(20, table=SD_TABLE), gits_sigmas(40, table=SD_TABLE)
    torch.testing.assert_close(forty[0:-1:2], twenty[:-1])


def test_kl_optimal_spaces_arctan_sigma_evenly():
    sig = kl_optimal_sigmas(9, float(SD_TABLE[0]), float(SD_TABLE[-1]))
    angle = torch.atan(sig[:-1])
    torch.testing.assert_close(angle.diff(), torch.full((8,), (angle[-1] - angle[0]).item() / 8, dtype=torch.float64))
    assert (sig[0].item(), sig[-2].item()) == pytest.approx((SD_TABLE[-1].item(), SD_TABLE[0].item()))


def test_beta_schedule_takes_beta_quantiles_as_integer_timesteps():
    t = sigma_to_t(beta_sigmas(4, table=SD_TABLE)[:-1], SD_TABLE)
    torch.testing.assert_close(t, torch.tensor([999.0, 823.0, 500.0, 176.0], dtype=torch.float64))
    # Beta(1, 1) is uniform: t_i = round(999 (1 - i / n)).
    torch.testing.assert_close(sigma_to_t(beta_sigmas(8, 1.0, 1.0, table=SD_TABLE)[:-1], SD_TABLE),
                               (999 * (1 - torch.arange(8, dtype=torch.float64) / 8)).round())
    # alpha = beta = 0.6 is symmetric (t_i + t_(n-i) = 999 up to rounding) and crowds both ends.
    t = sigma_to_t(beta_sigmas(20, table=SD_TABLE)[:-1], SD_TABLE)
    assert ((t[1:] + t.flip(0)[:-1]) - 999).abs().max() <= 1
    gaps = -t.diff()
    assert gaps[0] < gaps.max() / 2 and gaps[-1] < gaps.max() / 2
    # Where two quantiles round to one timestep it is taken once (ComfyUI's rule): fewer steps, strictly falling.
    sig = beta_sigmas(200, table=SD_TABLE)
    assert len(sig) - 1 < 200 and bool((sig[1:] < sig[:-1]).all())


def test_simple_and_sgm_uniform_timesteps():
    t = sigma_to_t(simple_sigmas(10, table=SD_TABLE)[:-1], SD_TABLE)
    torch.testing.assert_close(t, torch.arange(999, 0, -100, dtype=torch.float64))
    torch.testing.assert_close(simple_sigmas(1000, table=SD_TABLE)[:-1], SD_TABLE.flip(0))
    t = sigma_to_t(sgm_uniform_sigmas(4, table=SD_TABLE)[:-1], SD_TABLE)
    torch.testing.assert_close(t, torch.tensor([999.0, 749.25, 499.5, 249.75], dtype=torch.float64))


def test_polyexponential_rho_one_is_exponential_and_larger_rho_ends_finer():
    lo, hi = float(SD_TABLE[0]), float(SD_TABLE[-1])
    torch.testing.assert_close(polyexponential_sigmas(12, lo, hi), exponential_sigmas(12, lo, hi))
    assert polyexponential_sigmas(12, lo, hi, 2.0)[-3] < exponential_sigmas(12, lo, hi)[-3]


def test_named_schedules_are_the_functions_with_their_parameters():
    lo, hi = float(SD_TABLE[0]), float(SD_TABLE[-1])
    torch.testing.assert_close(schedule_sigmas("karras", 9, SD_TABLE, rho=5.0), karras_sigmas(9, lo, hi, 5.0))
    torch.testing.assert_close(schedule_sigmas("exp_karras", 9, SD_TABLE, p=2.0),
                               exp_karras_sigmas(9, 2.0, alphas_cumprod=SD_AC))
    torch.testing.assert_close(schedule_sigmas("normal", 9, SD_TABLE), uniform_t_sigmas(9, alphas_cumprod=SD_AC))
    torch.testing.assert_close(schedule_sigmas("gits", 9, SD_TABLE, coeff=0.85), gits_sigmas(9, 0.85, table=SD_TABLE))
    torch.testing.assert_close(schedule_sigmas("align_your_steps", 9, SD_TABLE, model="SDXL"),
                               align_your_steps_sigmas(9, "SDXL"))


@pytest.mark.parametrize("call, message", [
    (lambda: schedule_sigmas("linear_quadratic", 8, SD_TABLE), "unknown schedule 'linear_quadratic'"),
    (lambda: schedule_sigmas("karras", 8, SD_TABLE, p=1.0), "takes rho, not p"),
    (lambda: schedule_sigmas("simple", 8, SD_TABLE, rho=1.0), "takes no parameters"),
    (lambda: schedule_sigmas("simple", 8, SD_TABLE.flip(0)), "strictly increasing"),
    (lambda: gits_sigmas(1, table=SD_TABLE), "2 or more steps"),
    (lambda: gits_sigmas(8, 1.23, table=SD_TABLE), "coeff must be one of 0.80, 0.85"),
    (lambda: align_your_steps_sigmas(8, "SD3"), "model must be one of"),
    (lambda: align_your_steps_sigmas(0), "steps"),
    (lambda: beta_sigmas(8, 0.0, 0.6, table=SD_TABLE), "alpha must be"),
    (lambda: simple_sigmas(1001, table=SD_TABLE), "exceed the 1000 timesteps"),
    (lambda: kl_optimal_sigmas(8, 1.0, 0.5), "sigma_min < sigma_max"),
    (lambda: polyexponential_sigmas(8, 0.03, 14.6, rho=-1.0), "rho must be"),
    (lambda: sgm_uniform_sigmas(2.5, table=SD_TABLE), "steps"),
])
def test_peer_schedules_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
