"""The discrete VP noise table of SD-class models, fractional sigma<->t maps, and VP<->VE latents.

diffusers keeps latents VP-scaled (x = a_t x0 + s_t eps, a_t^2 + s_t^2 = 1); ComfyUI/k-diffusion
keeps them VE-scaled (x = x0 + sigma eps, sigma = s_t / a_t). Everything converting between the two
lives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def alphas_cumprod_from_config(config: Mapping) -> torch.Tensor:
    """``alphas_cumprod`` (float64) of a diffusers scheduler config (PNDM, DDIM, Euler, DPM, ...).

    Raises ValueError for configs that do not describe a discrete VP model.
    """
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    n = get("num_train_timesteps", 1000)
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"scheduler config: num_train_timesteps must be an integer >= 2, got {n!r}")
    reason = not_a_vp_table(config)
    if reason:
        raise ValueError(f"scheduler config {reason}; exp-Karras needs a discrete VP (DDPM-style) noise schedule")
    trained = get("trained_betas", None)
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
        if betas.shape != (n,):
            raise ValueError(f"scheduler config: trained_betas has {betas.numel()} entries, expected {n}")
    else:
        schedule = get("beta_schedule", "linear")
        start, end = get("beta_start", 0.0001), get("beta_end", 0.02)
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                                 dtype=torch.float64)
        else:
            raise ValueError(f"scheduler config: beta_schedule {schedule!r} is not one of {_BETA_SCHEDULES}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("scheduler config: betas must lie strictly between 0 and 1")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if get("rescale_betas_zero_snr", False):
        alphas_cumprod = _zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


# Keys only flow-matching schedulers' configs carry, and those of a beta table.
_FLOW_MATCHING_KEYS = ("shift", "base_shift", "max_shift")
_BETA_KEYS = ("beta_schedule", "trained_betas", "beta_start")


def not_a_vp_table(config: Mapping) -> str | None:
    """Why a diffusers scheduler config describes no discrete VP (DDPM-style) beta table that
    :func:`alphas_cumprod_from_config` rebuilds, in words completing "scheduler config ..." (a flow-matching or EDM
    model, CogVideoX's SNR shift, a VE model's sigma range, a source class with no betas); None where it does."""
    import inspect

    import diffusers

    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    has = (lambda k: k in config) if isinstance(config, Mapping) else (lambda k: get(k) is not None)
    name = str(get("_class_name", "") or "")
    if (get("prediction_type") == "flow_prediction" or get("use_flow_sigmas") or name.startswith("FlowMatch")
            or any(has(k) for k in _FLOW_MATCHING_KEYS)):
        return "describes a flow-matching model (shift or use_flow_sigmas)"
    if get("sigma_data") is not None or name.startswith("EDM"):
        return (f"describes an EDM model (continuous sigmas from {get('sigma_min')} to {get('sigma_max')}, as "
                "Playground v2.5)")
    if get("snr_shift_scale") is not None:
        return f"shifts its table's SNR (snr_shift_scale {get('snr_shift_scale')}, as CogVideoX's), not reproduced here"
    source = getattr(diffusers, name, None)
    if isinstance(source, type) and issubclass(source, diffusers.SchedulerMixin):
        if not set(_BETA_KEYS) & set(inspect.signature(source.__init__).parameters):
            return f"is {name}'s, which has no beta table"
    if not any(has(k) for k in _BETA_KEYS) and (has("sigma_max") or has("sigma_min")):
        return f"describes a sigma range ({get('sigma_min')} to {get('sigma_max')}) with no beta table"
    return None


def _zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 (Common Diffusion Noise Schedules and Sample Steps are Flawed), Algorithm 1: sqrt(abar)
    shifted to reach 0 at the last timestep and rescaled to keep the first. The last abar is then set to 2^-24,
    as diffusers' schedulers do, so that sigma_max is large (4096) but finite; where the one before is already
    smaller (DDPM's linear betas), to its log-linear extrapolation instead, so that sigma keeps increasing."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * first / (first - last)) ** 2
    rescaled[-1] = 2.0**-24 if rescaled[-2] > 2.0**-24 else rescaled[-2] ** 2 / rescaled[-3]
    return rescaled


def vp_sigma_table(owner: str, *, prediction_type: str = "epsilon", **config) -> torch.Tensor:
    """The float64 VE sigma table of a discrete VP model described by diffusers scheduler arguments,
    refusing (ValueError naming ``owner``) a prediction type that is not a VP parameterisation.

    float64 as ComfyUI builds it: diffusers' float32 table is ~1e-5 off at the smallest sigma."""
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"{owner}: prediction_type {prediction_type!r} is not a discrete VP "
                         "parameterisation (epsilon, sample or v_prediction)")
    return sigma_table(alphas_cumprod_from_config(dict(config, prediction_type=prediction_type)))


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE sigma of every integer training timestep: ``sigma_t = sqrt((1 - abar_t) / abar_t)``."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ac.ndim != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D table of values strictly between 0 and 1")
    return ((1 - ac) / ac).sqrt()


def t_to_sigma(t: torch.Tensor | float, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at fractional timestep ``t``: log-sigma interpolated linearly between integer steps."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(sigmas) - 1)
    log_sigmas = sigmas.double().log()
    low = t.floor().long()
    high = (low + 1).clamp(max=len(sigmas) - 1)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: torch.Tensor | float, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of ``sigma``: the inverse of :func:`t_to_sigma` (clamped to the table)."""
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device="cpu").log()
    log_sigmas = sigmas.detach().to("cpu", torch.float64).log()
    idx = torch.searchsorted(log_sigmas, log_sigma.clamp(log_sigmas[0], log_sigmas[-1]).contiguous())
    high = idx.clamp(1, len(sigmas) - 1)
    low = high - 1
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
    return low + w


def sigma_to_model_timestep(sigma: torch.Tensor | float, sigmas: torch.Tensor) -> torch.Tensor:
    """The integer timestep a discrete model is called with at ``sigma``: the nearest entry of the table
    in log-sigma (ComfyUI's ModelSamplingDiscrete.timestep). Both front doors feed the UNet this, so a
    diffusers run and a ComfyUI run of the same sigmas make identical model calls. Computed as ComfyUI computes
    it, in float32 (its sigmas are float32 and its ``log_sigmas`` the float64 table's logs rounded to float32):
    a sigma half-way between two timesteps in log-sigma (exp-Karras at p = 0 with an odd number of steps has
    several) is a tie that rounding decides, and both front doors must round it alike. ``sigmas`` is the float64
    table for the exact rule. Computed on the CPU (a ComfyUI model loaded on the GPU has its table there); the
    result is on the CPU."""
    log_sigma = torch.as_tensor(sigma, device="cpu").to(torch.float32).log()
    log_sigmas = sigmas.detach().to("cpu", torch.float64).log().to(torch.float32)
    return (log_sigma.reshape(-1, 1) - log_sigmas).abs().argmin(dim=1).reshape(log_sigma.shape)


def ve_to_vp(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """k-diffusion latent ``x0 + sigma eps`` to diffusers' VP latent: divide by sqrt(1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x / (1 + sigma**2).sqrt().reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def vp_to_ve(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """diffusers' VP latent to k-diffusion's ``x0 + sigma eps``: multiply by sqrt(1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x * (1 + sigma**2).sqrt().reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def add_noise_in_float32(add_noise, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
    """A DPM-Solver scheduler's ``add_noise`` worked out in float32 for half-precision latents: with zero terminal
    SNR the first sigma (4096) squared overflows float16, and diffusers' noised latent came out all zeros."""
    if original_samples.dtype in (torch.float16, torch.bfloat16):
        return add_noise(original_samples.float(), noise.float(), timesteps).to(original_samples.dtype)
    return add_noise(original_samples, noise, timesteps)
