"""schedulers/tcd.py, the TCD sampler for ComfyUI, against diffusers' TCDScheduler: the same model calls, the same
latents at every step (VE against VP coordinates), the same noise draws, for gamma 0 (deterministic), 0.3 and 1."""

import pytest
import torch
from diffusers import TCDScheduler

from direct_distill.schedulers import sigma_table, ve_to_vp, vp_to_ve
from direct_distill.schedulers.few_step_presets import PRESETS
from direct_distill.schedulers.tcd import sample_tcd

SD_NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def toy_eps(x_vp, t):
    """A smooth stand-in for a UNet's epsilon prediction, different at every timestep."""
    return torch.tanh(0.7 * x_vp + 0.001 * t) - 0.1 * x_vp.flip(-1)


@pytest.mark.parametrize("gamma, nfe", [(0.0, 4), (0.3, 4), (0.3, 8), (1.0, 3)])
def test_tcd_sampler_walks_diffusers_tcd_scheduler_trajectory(gamma, nfe):
    scheduler = TCDScheduler(**SD_NOISE)
    scheduler.set_timesteps(nfe)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # its float32 table would add ~1e-6 per step
    table = sigma_table(scheduler.alphas_cumprod)
    timesteps = scheduler.timesteps.tolist()
    sigmas = torch.cat([table[timesteps], torch.zeros(1, dtype=torch.float64)])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    # diffusers, VP latents; its step draws its noise from this generator
    diffusers_x, diffusers_states, diffusers_x0 = noise.clone(), [], None
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        diffusers_states.append(diffusers_x)
        eps = toy_eps(diffusers_x, int(t))
        abar = scheduler.alphas_cumprod[int(t)].double()
        diffusers_x0 = (diffusers_x - (1 - abar).sqrt() * eps) / abar.sqrt()
        diffusers_x = scheduler.step(eps, t, diffusers_x, eta=gamma, generator=generator).prev_sample

    # ours, VE latents; the denoiser calls the same epsilon model at the sigma's timestep
    calls, ours_states = [], []

    def denoiser(x, sigma):
        s = float(sigma[0])
        t = int((table - s).abs().argmin())
        calls.append(t)
        return x - s * toy_eps(ve_to_vp(x, s), t)

    generator = torch.Generator().manual_seed(1)
    ours = sample_tcd(denoiser, vp_to_ve(noise, sigmas[0]), sigmas, disable=True, gamma=gamma, sigma_table=table,
                      noise_sampler=lambda *_: torch.randn(noise.shape, generator=generator, dtype=torch.float64),
                      callback=lambda d: ours_states.append(ve_to_vp(d["x"], d["sigma"])))

    assert calls == timesteps
    for step, (a, b) in enumerate(zip(ours_states, diffusers_states)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"latent before step {step}")
    # diffusers ends at t = 0 (sigma_min), ComfyUI at sigma = 0: both are the last step's x0 prediction
    torch.testing.assert_close(ours, diffusers_x0, atol=1e-10, rtol=0)


def test_tcd_sampler_with_a_seed_is_reproducible_and_gamma_is_checked():
    table = sigma_table(TCDScheduler(**SD_NOISE).alphas_cumprod)
    preset = PRESETS["tcd-sd15"]
    sigmas = preset.sigmas(4, table).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def denoiser(x, sigma, **extra_args):
        return x / (1 + sigma[0] ** 2).sqrt()

    def run(seed):
        return sample_tcd(denoiser, x, sigmas, extra_args={"seed": seed}, disable=True, gamma=0.3, sigma_table=table)

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
    with pytest.raises(ValueError, match=r"TCD gamma must be in \[0, 1\], got 1.5"):
        sample_tcd(denoiser, x, sigmas, disable=True, gamma=1.5, sigma_table=table)


def test_sigmas_below_the_tables_smallest_stay_real():
    # a Karras schedule with sigma_min 0.01 (ComfyUI's widget allows it) ends below the table's 0.029
    table = sigma_table(TCDScheduler(**SD_NOISE).alphas_cumprod)
    sigmas = torch.tensor([14.6, 2.0, 0.2, 0.01, 0.0], dtype=torch.float64)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    states = []
    out = sample_tcd(lambda x, sigma, **extra: x / (1 + sigma[0] ** 2).sqrt(), x, sigmas, extra_args={"seed": 1},
                     disable=True, gamma=0.3, sigma_table=table, callback=lambda d: states.append(d["x"]))
    assert not out.is_complex() and not any(state.is_complex() for state in states)
    assert bool(torch.isfinite(out).all())
