"""Sigma schedules (karras, exponential, exp_karras, ...), the VP noise table and its sigma<->t maps,
the VP<->VE latent conversion, and ExpKarrasScheduler for diffusers."""

from .noise import (alphas_cumprod_from_config, sigma_table, sigma_to_model_timestep, sigma_to_t, t_to_sigma,
                    ve_to_vp, vp_to_ve)
from .sigmas import (exp_karras_sigmas, exp_karras_sigmas_from_table, exp_karras_timesteps, exponential_sigmas,
                     karras_sigmas, sigmas_for_denoise, uniform_t_sigmas)

__all__ = [
    "ExpKarrasScheduler", "alphas_cumprod_from_config", "exp_karras_sigmas", "exp_karras_sigmas_from_table", "exp_karras_timesteps",
    "exponential_sigmas", "karras_sigmas", "sigma_table", "sigma_to_model_timestep", "sigma_to_t", "sigmas_for_denoise", "t_to_sigma",
    "uniform_t_sigmas", "ve_to_vp", "vp_to_ve",
]


def __getattr__(name):
    # diffusers is imported only when the scheduler class is asked for, so the pure schedule
    # functions stay importable (and fast to import) inside ComfyUI.
    if name == "ExpKarrasScheduler":
        from .scheduling_exp_karras import ExpKarrasScheduler
        return ExpKarrasScheduler
    raise AttributeError(name)
