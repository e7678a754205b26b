"""Every schedule by the name ComfyUI knows it by, for one model's noise table: one entry point for the
lab's comparison and the front doors."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .published import align_your_steps_sigmas, gits_sigmas
from .sigmas import (beta_sigmas, checked_table, exp_karras_sigmas_from_table, exponential_sigmas, karras_sigmas,
                     kl_optimal_sigmas, polyexponential_sigmas, sgm_uniform_sigmas, simple_sigmas)


def _ends(table: torch.Tensor) -> tuple[float, float]:
    return float(table[0]), float(table[-1])


# name -> f(num_steps, table, **the schedule's own parameters, at their usual defaults)
_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": lambda n, table, rho=7.0: karras_sigmas(n, *_ends(table), rho),
    "exponential": lambda n, table: exponential_sigmas(n, *_ends(table)),
    "polyexponential": lambda n, table, rho=1.0: polyexponential_sigmas(n, *_ends(table), rho),
    "kl_optimal": lambda n, table: kl_optimal_sigmas(n, *_ends(table)),
    "normal": lambda n, table: exp_karras_sigmas_from_table(n, 0.0, table=table),
    "sgm_uniform": lambda n, table: sgm_uniform_sigmas(n, table=table),
    "simple": lambda n, table: simple_sigmas(n, table=table),
    "beta": lambda n, table, alpha=0.6, beta=0.6: beta_sigmas(n, alpha, beta, table=table),
    "align_your_steps": lambda n, table, model="SD1": align_your_steps_sigmas(n, model),
    "gits": lambda n, table, coeff=1.20: gits_sigmas(n, coeff, table=table),
    "exp_karras": lambda n, table, p=1.0: exp_karras_sigmas_from_table(n, p, table=table),
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def schedule_sigmas(name: str, num_steps: int, table: torch.Tensor, **params) -> torch.Tensor:
    """``num_steps`` sigmas plus 0 of the schedule ``name`` (one of :data:`SCHEDULE_NAMES`) for the model whose
    noise table is ``table`` (the sigma of every training timestep, ascending). ``params`` are the schedule's own
    settings (``rho`` of karras and polyexponential, ``alpha``/``beta`` of beta, ``model`` of align_your_steps,
    ``coeff`` of gits, ``p`` of exp_karras); the others take none."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; the schedules are {', '.join(SCHEDULE_NAMES)}")
    schedule = _SCHEDULES[name]
    accepted = list(inspect.signature(schedule).parameters)[2:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"schedule {name!r} takes {', '.join(accepted) or 'no parameters'}, not {', '.join(unknown)}")
    return schedule(num_steps, checked_table(table), **params)


def family_params(name: str, family: str) -> dict:
    """The parameters of schedule ``name`` that follow from the model family ("sd15", "sdxl"): Align Your Steps
    publishes one table per family; every other schedule is the same function of the noise table for both."""
    return {"model": "SDXL"} if name == "align_your_steps" and family == "sdxl" else {}
