"""The students' timestep grids and the prediction-type conversions, against diffusers' own: DDIM's trailing
timesteps, a DDPM scheduler's velocity and its x0 from each prediction type."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from direct_distill.schedulers import (CLEAN, alphas_cumprod_from_config, denoising_target, sigma_table,
                                       split_prediction, student_schedules, trailing_timesteps)


def test_the_trailing_grid_at_p_0_is_ddims_trailing_spacing():
    ddim = DDIMScheduler(timestep_spacing="trailing")
    for n in range(1, 41):
        ddim.set_timesteps(n)
        assert trailing_timesteps(n) == ddim.timesteps.tolist(), n
    assert trailing_timesteps(4, num_train_timesteps=500) == [499, 374, 249, 124]


def test_n_steps_halve_into_n_over_2_and_p_puts_bigger_steps_at_high_noise():
    for n in (2, 4, 8, 16, 32):
        assert trailing_timesteps(2 * n)[::2] == trailing_timesteps(n)
    steps = -torch.diff(torch.tensor(trailing_timesteps(8, p=2.0) + [CLEAN]))
    assert (steps[:-1] >= steps[1:]).all() and steps[0] > 2 * steps[-1]
    assert trailing_timesteps(8, p=1e-12) == trailing_timesteps(8)  # the p -> 0 limit
    with pytest.raises(ValueError, match=r"do not give distinct integer timesteps \(step \d+ falls on timestep \d+, "
                                         r"as the next one does\): use fewer steps or a smaller p$"):
        trailing_timesteps(200, p=8.0)  # one line of its own size, not the 200 timesteps
    with pytest.raises(ValueError, match="1001 steps do not fit the teacher's 1000 timesteps: use at most 1000"):
        trailing_timesteps(1001)
    with pytest.raises(ValueError, match="integer >= 1"):
        trailing_timesteps(0)


def test_student_schedules_take_each_sigma_from_the_noise_table(sd_scheduler_config):
    alphas_cumprod = alphas_cumprod_from_config(sd_scheduler_config)
    table = sigma_table(alphas_cumprod)
    schedules = student_schedules({2: [999, 499], 1: [999]}, alphas_cumprod)
    assert list(schedules) == [1, 2] and schedules[2]["timesteps"] == [999, 499]
    assert schedules[2]["sigmas"] == [float(table[999]), float(table[499]), 0.0]
    with pytest.raises(ValueError, match="NFE 2: need 2 timesteps"):
        student_schedules({2: [999]}, alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_converts_to_x0_and_eps_as_diffusers_reads_it(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, thresholding=False)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z = scheduler.add_noise(x0, eps, t)
    out = denoising_target(prediction_type, x0, eps, a, s)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(out, scheduler.get_velocity(x0, eps, t))
    x0_back, eps_back = split_prediction(out, z, a, s, prediction_type)
    torch.testing.assert_close(x0_back, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=2e-4, rtol=1e-4)
    for b in range(3):  # diffusers' step reads the same x0 from the output
        step = scheduler.step(out[b:b + 1], int(t[b]), z[b:b + 1], generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(step.pred_original_sample, x0_back[b:b + 1], atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown prediction type"):
        split_prediction(out, z, a, s, "flow")
