"""A UNet's output in each prediction type (epsilon, v, sample) and the clean latent and noise it implies, in
the VP parameterisation ``z = a x0 + s eps`` with ``a^2 + s^2 = 1``."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def split_prediction(out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` of a UNet output ``out`` at ``z = a x0 + s eps``."""
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    if prediction_type == "v_prediction":  # v = a eps - s x0
        return a * z - s * out, s * z + a * out
    if prediction_type == "sample":
        return out, (z - a * out) / s
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def denoising_target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    """What a UNet of this prediction type should output at ``z = a x0 + s eps`` (its training target)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
