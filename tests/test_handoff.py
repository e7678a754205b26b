"""models/handoff.py: the one hand-off both front doors use (VE and VP latents give the same x0, at the
UNet's own integer timestep; the trained t-band is enforced unless forced)."""

import pytest
import torch

from direct_distill.models.handoff import (check_handoff_at_sigma, handoff_steps_in_band, handoff_timestep,
                                           shortcut_from_ve, shortcut_from_vp)
from direct_distill.models.nafnet import TwoStageShortcut
from direct_distill.schedulers import alphas_cumprod_from_config, exp_karras_sigmas, sigma_table

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def table():
    return sigma_table(alphas_cumprod_from_config(SD))


def tiny_shortcut(band=(200.0, 600.0)):
    torch.manual_seed(0)
    config = dict(width=8, enc_blocks=[1], middle_blocks=1, dec_blocks=[1])
    shortcut = TwoStageShortcut.from_configs(config, config)
    with torch.no_grad():
        for parameter in shortcut.parameters():  # NAFNet zero-inits its branch scales: make every part count
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    shortcut.t_band, shortcut.teacher = band, "tiny"
    return shortcut


@pytest.mark.parametrize("t", [250, 400, 573])
def test_ve_and_vp_latents_of_the_same_state_give_the_same_x0(table, t):
    shortcut = tiny_shortcut()
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = table[t].float()
    x_ve = x0 + sigma * eps
    x_vp = x0 / (1 + sigma**2).sqrt() + sigma / (1 + sigma**2).sqrt() * eps  # a_t x0 + s_t eps
    from_ve = shortcut_from_ve(shortcut, x_ve, sigma, table)
    from_vp = shortcut_from_vp(shortcut, x_vp, t)
    torch.testing.assert_close(from_ve, from_vp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_vp, shortcut(x_vp, torch.tensor([float(t)])), rtol=0, atol=0)
    assert not from_ve.requires_grad


def test_the_shortcut_runs_at_the_nearest_integer_timestep(table):
    shortcut, seen = tiny_shortcut(), []
    shortcut.stage1.time_mlp.register_forward_pre_hook(lambda module, args: seen.append(args))
    between = (table[300].log() * 0.7 + table[301].log() * 0.3).exp()  # nearer 300 in log-sigma
    assert handoff_timestep(between, table) == 300
    x = torch.randn(1, 4, 8, 8)
    out = shortcut_from_ve(shortcut, x, between, table)
    vp = x / (1 + between.float() ** 2).sqrt()
    torch.testing.assert_close(out, shortcut(vp, torch.tensor([300.0])), rtol=1e-6, atol=1e-6)
    # the exp_karras sigmas sit on the table's integer timesteps, so ComfyUI's sigmas give the diffusers timesteps
    sigmas = exp_karras_sigmas(20, 1.0, alphas_cumprod=alphas_cumprod_from_config(SD))
    assert [handoff_timestep(s, table) for s in sigmas[7:13]] == [512, 456, 403, 352, 304, 259]


def test_outside_the_band_both_doors_refuse_unless_forced(table):
    shortcut, x = tiny_shortcut(band=(250.0, 350.0)), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"t=400\.00 is outside the band .*\[250, 350\] \(teacher: tiny\)"):
        shortcut_from_vp(shortcut, x, 400)
    with pytest.raises(ValueError, match=r"t=400\.00 is outside the band"):
        shortcut_from_ve(shortcut, x, table[400], table)
    with pytest.raises(ValueError, match=r"t=400\.00 is outside the band"):
        check_handoff_at_sigma(shortcut, table[400], table)
    assert check_handoff_at_sigma(shortcut, table[400], table, force=True) == 400
    assert torch.isfinite(shortcut_from_vp(shortcut, x, 400, force=True)).all()
    assert torch.isfinite(shortcut_from_ve(shortcut, x, table[400], table, force=True)).all()
    shortcut.t_band = None  # a freshly built shortcut knows no band
    assert torch.isfinite(shortcut_from_vp(shortcut, x, 999)).all()


def test_steps_in_band_name_the_hand_offs_that_fit(table):
    sigmas = exp_karras_sigmas(20, 1.0, alphas_cumprod=alphas_cumprod_from_config(SD))
    assert handoff_steps_in_band((249.7, 361.3), sigmas, table) == [10, 11, 12]
    assert handoff_steps_in_band(None, sigmas, table) == list(range(1, 20))


def test_bad_hand_offs_say_what_is_wrong(table):
    shortcut = tiny_shortcut()
    with pytest.raises(ValueError, match="sigma=0"):
        shortcut_from_ve(shortcut, torch.randn(1, 4, 8, 8), 0.0, table)
    with pytest.raises(ValueError, match=r"takes \(B, 4, H, W\) latents .*got shape \(1, 3, 8, 8\)"):
        shortcut_from_vp(shortcut, torch.randn(1, 3, 8, 8), 300)


def test_x0_comes_back_in_the_latents_dtype_while_the_shortcut_keeps_its_own(table):
    shortcut = tiny_shortcut()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    out = shortcut_from_ve(shortcut, x, table[300], table)
    assert out.dtype == torch.float64 and next(shortcut.parameters()).dtype == torch.float32
    torch.testing.assert_close(out, shortcut_from_vp(shortcut, x.float() / (1 + table[300].float() ** 2).sqrt(), 300)
                               .double(), rtol=1e-5, atol=1e-5)
