"""Sigma schedules as pure functions: numbers in, a descending 1-D float64 tensor of n sigmas plus 0 out.

Schedules that read the model's noise table take it as ``table``: the VE sigma of every integer training
timestep, ascending (:func:`~.noise.sigma_table`, or ComfyUI's ``model_sampling.sigmas``)."""

from __future__ import annotations

import math
import operator

import torch

from .noise import sigma_table, t_to_sigma


def _check_steps(n: int) -> int:
    """``n`` as an int (numpy and 0-d tensor integers too), or ValueError unless it is an integer >= 1."""
    try:
        steps = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    return steps


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


def _ramp(n: int) -> torch.Tensor:
    """``u_i = i / (n - 1)`` for i = 0 .. n-1; a single step sits at u = 0 (the noisiest end)."""
    return torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)


def checked_table(table) -> torch.Tensor:
    """The noise table as a float64 CPU tensor, refused (ValueError) unless 1-D, finite, positive and
    strictly increasing with at least 2 entries."""
    # float64 on the CPU: the table may sit on a GPU (or MPS, which has no float64).
    table = torch.as_tensor(table).detach().to("cpu", torch.float64)
    if (table.ndim != 1 or table.numel() < 2 or not bool(torch.isfinite(table).all())
            or not bool((table > 0).all()) or not bool((table[1:] > table[:-1]).all())):
        raise ValueError("sigma table must be a 1-D tensor of at least 2 finite, positive, strictly increasing "
                         "values (the sigma of every training timestep)")
    return table


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma^(1/rho) spaced uniformly."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """log-sigma spaced uniformly (k-diffusion's get_sigmas_exponential)."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


EXP_KARRAS_P_MAX = 10.0  # beyond it the last timesteps of a long run fall within float32's reach of each other


def check_exp_karras_p(p: float, who: str = "exp-Karras") -> float:
    """``p`` as a float, or one ValueError naming it: a real number in [0, EXP_KARRAS_P_MAX]. At p = 25 a 50-step
    run's last sigmas are equal in float32 (a step of length 0: NaN latents); at 710 exp(p) overflows."""
    try:
        value = float(p) if not isinstance(p, (bool, str)) and getattr(p, "ndim", 0) == 0 else None
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 <= value <= EXP_KARRAS_P_MAX:
        raise ValueError(f"{who}: exp_karras_p must be a number in [0, {EXP_KARRAS_P_MAX:g}], got {p!r}")
    return value


def exp_karras_timesteps(n: int, p: float = 1.0, t_max: float = 999.0) -> torch.Tensor:
    """Seed 000 §3.1: training timesteps spaced uniformly in exponential time-space.

    ``t_i = t_max (exp(p (1 - u_i)) - 1) / (exp(p) - 1)``, ``u_i = i / (n - 1)``; ``p -> 0`` is uniform in t.
    """
    _check_steps(n)
    p = check_exp_karras_p(p)
    u = _ramp(n)
    if p < 1e-8:  # the limit p -> 0 of the formula
        return t_max * (1 - u)
    return t_max * torch.expm1(p * (1 - u)) / math.expm1(p)


def exp_karras_sigmas(num_steps: int, p: float = 1.0, *, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The exponential-Karras schedule (seed 000 §3.1): ``num_steps`` sigmas of the model's own noise
    table at :func:`exp_karras_timesteps`, then 0."""
    return exp_karras_sigmas_from_table(num_steps, p, table=sigma_table(alphas_cumprod))


def exp_karras_sigmas_from_table(num_steps: int, p: float = 1.0, *, table: torch.Tensor) -> torch.Tensor:
    """:func:`exp_karras_sigmas` for a model given by its VE sigma table (the sigma of every integer
    training timestep, ascending), such as ComfyUI's ``model_sampling.sigmas``. Returns a CPU tensor."""
    table = checked_table(table)
    t = exp_karras_timesteps(num_steps, p, t_max=float(len(table) - 1))
    return _append_zero(t_to_sigma(t, table))


def uniform_t_sigmas(num_steps: int, *, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Timesteps uniform from t_max to 0 (ComfyUI's ``normal``): exp-Karras at p = 0."""
    return exp_karras_sigmas(num_steps, 0.0, alphas_cumprod=alphas_cumprod)


def sgm_uniform_sigmas(num_steps: int, *, table: torch.Tensor) -> torch.Tensor:
    """Stability AI's sgm discretisation (ComfyUI's ``sgm_uniform``): ``n + 1`` timesteps uniform from t_max
    to 0 with the last (t = 0) dropped, ``t_i = t_max (1 - i / n)``."""
    _check_steps(num_steps)
    table = checked_table(table)
    t_max = len(table) - 1
    t = t_max * (1 - torch.arange(num_steps, dtype=torch.float64) / num_steps)
    return _append_zero(t_to_sigma(t, table))


def simple_sigmas(num_steps: int, *, table: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``simple``: every (N / n)-th entry of the N-entry noise table from the top,
    ``t_i = N - 1 - floor(i N / n)``."""
    _check_steps(num_steps)
    table = checked_table(table)
    if num_steps > len(table):  # ComfyUI repeats entries then: steps of length 0, which DPM-Solver divides by
        raise ValueError(f"simple schedule: {num_steps} steps exceed the {len(table)} timesteps of the noise table")
    stride = len(table) / num_steps
    # The product in floating point, as ComfyUI forms it: exact rational arithmetic lands one timestep
    # lower for some step counts (e.g. n = 38, i = 19), and the point is to be ComfyUI's schedule.
    t = [len(table) - 1 - math.floor(i * stride) for i in range(num_steps)]
    return _append_zero(table[t])


def beta_sigmas(num_steps: int, alpha: float = 0.6, beta: float = 0.6, *, table: torch.Tensor) -> torch.Tensor:
    """Lee et al. 2024 (Beta Sampling is All You Need, arXiv 2407.12173), as ComfyUI's ``beta``: integer
    training timesteps at the Beta(alpha, beta) quantiles of ``1 - i / n``,
    ``t_i = round(t_max F^-1(1 - i / n))``, so alpha, beta < 1 put steps near both ends. Where two quantiles round
    to one timestep it is taken once, as ComfyUI does: such a schedule has fewer steps than asked."""
    _check_steps(num_steps)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"beta schedule: {name} must be a finite number > 0, got {value!r}")
    table = checked_table(table)
    try:
        from scipy.stats import beta as beta_distribution
    except ImportError as error:  # an optional dependency (ComfyUI and the lab extra have it)
        raise ImportError("the beta schedule needs scipy for the Beta quantile function: pip install scipy") from error
    quantiles = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    t = torch.from_numpy(beta_distribution.ppf(quantiles.numpy(), alpha, beta)).mul(len(table) - 1).round().long()
    return _append_zero(table[torch.unique_consecutive(t)])


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sabour et al. 2024 (Align Your Steps), Theorem 3.1: the schedule minimising the KL divergence for a
    single-point data distribution, arctan(sigma) spaced uniformly."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    u = _ramp(n)
    return _append_zero(torch.tan((1 - u) * math.atan(sigma_max) + u * math.atan(sigma_min)))


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's get_sigmas_polyexponential: log-sigma falls from log sigma_max to log sigma_min as
    ``(1 - u)^rho``; rho = 1 is :func:`exponential_sigmas`, larger rho takes finer steps near sigma_min."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"polyexponential rho must be a finite number > 0, got {rho!r}")
    ramp = (1 - _ramp(n)) ** rho
    return _append_zero((math.log(sigma_min) + ramp * (math.log(sigma_max) - math.log(sigma_min))).exp())


def sigmas_for_denoise(schedule, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Partial denoising the way ComfyUI does it: a schedule of ``steps / denoise`` steps, keeping the
    last ``steps`` (plus the final 0). ``schedule`` maps a step count to sigmas."""
    _check_steps(steps)
    if not (0.0 < denoise <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return schedule(total)[-(steps + 1):]
