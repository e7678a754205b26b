"""The schedule functions: the seed's landmarks, limits, shapes and bad input."""

import math

import pytest
import torch

from direct_distill.schedulers import (alphas_cumprod_from_config, exp_karras_sigmas, exp_karras_timesteps,
                                       exponential_sigmas, karras_sigmas, sigma_table, sigma_to_t,
                                       sigmas_for_denoise, t_to_sigma, uniform_t_sigmas, ve_to_vp, vp_to_ve)

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


def test_exp_karras_formula_and_endpoints():
    n, p = 12, 1.7
    t = exp_karras_timesteps(n, p)
    u = torch.arange(n, dtype=torch.float64) / (n - 1)
    torch.testing.assert_close(t, 999 * (torch.exp(p * (1 - u)) - 1) / (math.exp(p) - 1))
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


def test_karras_and_exponential_match_k_diffusion_form():
    lo, hi, n, rho = 0.03, 14.6, 10, 7.0
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    expect = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(karras_sigmas(n, lo, hi, rho)[:-1], expect)
    torch.testing.assert_close(exponential_sigmas(n, lo, hi)[:-1],
                               torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64)))


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
    (dict(rescale_betas_zero_snr=True), "zero-terminal"),
])
def test_unusable_configs(config, message):
    with pytest.raises(ValueError, match=message):
        alphas_cumprod_from_config({**SD_SCHEDULER_CONFIG, **config})
