"""Integer timestep grids a few-step student samples at, and their entries in a student file."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .noise import sigma_table
from .sigmas import exp_karras_timesteps

CLEAN = -1  # the timestep index of the clean end of a trajectory (alpha = 1, sigma = 0)


def trailing_timesteps(n: int, p: float = 0.0, num_train_timesteps: int = 1000) -> list[int]:
    """The ``n`` integer timesteps a student samples at, noisiest first; its last step lands on the clean latent.

    The first ``n`` of ``n + 1`` exp-Karras timesteps (:func:`exp_karras_timesteps` with ``t_max = T``), rounded,
    minus one: at ``p = 0`` this is DDIM's "trailing" grid ``T (n - i) / n - 1`` (4 steps: 999, 749, 499, 249),
    on which ``n`` steps halve exactly into ``n / 2`` (progressive distillation); ``p > 0`` puts bigger steps
    at high noise. The point after the last is the clean end (:data:`CLEAN`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of student steps must be an integer >= 1, got {n!r}")
    grid = exp_karras_timesteps(n + 1, p, t_max=float(num_train_timesteps))[:n]
    t = [int(v) - 1 for v in torch.round(grid).tolist()]
    clash = next((i for i, (a, b) in enumerate(zip(t, t[1:] + [CLEAN])) if a <= b), None)
    if clash is not None:
        if n > num_train_timesteps:
            raise ValueError(f"{n} steps do not fit the teacher's {num_train_timesteps} timesteps: use at most "
                             f"{num_train_timesteps}")
        raise ValueError(f"{n} steps at p={p} do not give distinct integer timesteps (step {clash + 1} falls on "
                         f"timestep {t[clash]}, as the next one does): use fewer steps or a smaller p")
    return t


def student_schedules(nfe_timesteps: dict[int, Sequence[int]], alphas_cumprod: torch.Tensor) -> dict:
    """``{n: {"timesteps": [...], "sigmas": [... , 0]}}`` for a student file: each sigma is the noise table's
    entry of its timestep, so both front doors call the UNet at exactly these timesteps."""
    table = sigma_table(alphas_cumprod)
    out = {}
    for n, timesteps in sorted(nfe_timesteps.items()):
        t = [int(v) for v in timesteps]
        if len(t) != n or min(t) < 0 or max(t) >= len(table):
            raise ValueError(f"NFE {n}: need {n} timesteps in [0, {len(table) - 1}], got {t}")
        out[int(n)] = {"timesteps": t, "sigmas": table[torch.tensor(t)].tolist() + [0.0]}
    return out
