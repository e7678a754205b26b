"""Sigma schedules (exp_karras and the peers ComfyUI users pick: karras, align_your_steps, gits, beta, ...), the VP
noise table and its sigma<->t maps, the VP<->VE latent conversion, and ExpKarrasScheduler for diffusers."""

from .noise import (alphas_cumprod_from_config, sigma_table, sigma_to_model_timestep, sigma_to_t, t_to_sigma,
                    ve_to_vp, vp_to_ve)
from .named import SCHEDULE_NAMES, schedule_sigmas
from .published import align_your_steps_sigmas, gits_sigmas
from .sigmas import (beta_sigmas, exp_karras_sigmas, exp_karras_sigmas_from_table, exp_karras_timesteps,
                     exponential_sigmas, karras_sigmas, kl_optimal_sigmas, polyexponential_sigmas, sgm_uniform_sigmas,
                     sigmas_for_denoise, simple_sigmas, uniform_t_sigmas)
from .grids import CLEAN, student_schedules, trailing_timesteps
from .prediction import PREDICTION_TYPES, denoising_target, split_prediction

__all__ = [
    "SCHEDULE_NAMES", "ExpKarrasScheduler", "align_your_steps_sigmas", "alphas_cumprod_from_config", "beta_sigmas",
    "exp_karras_sigmas", "exp_karras_sigmas_from_table", "exp_karras_timesteps", "exponential_sigmas", "gits_sigmas",
    "karras_sigmas", "kl_optimal_sigmas", "polyexponential_sigmas", "schedule_sigmas", "sgm_uniform_sigmas",
    "sigma_table", "sigma_to_model_timestep", "sigma_to_t", "sigmas_for_denoise", "simple_sigmas", "t_to_sigma",
    "uniform_t_sigmas", "ve_to_vp", "vp_to_ve",
    "CLEAN", "PREDICTION_TYPES", "denoising_target", "split_prediction", "student_schedules", "trailing_timesteps",
]


def __getattr__(name):
    # diffusers is imported only when the scheduler class is asked for, so the pure schedule
    # functions stay importable (and fast to import) inside ComfyUI.
    if name == "ExpKarrasScheduler":
        from .scheduling_exp_karras import ExpKarrasScheduler
        return ExpKarrasScheduler
    raise AttributeError(name)
