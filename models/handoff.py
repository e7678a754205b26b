"""The shortcut hand-off, once for both front doors: a teacher latent at noise level sigma -> clean latent x0.

The shortcut takes diffusers' VP-scaled latent and the teacher's integer training timestep (the one the
UNet itself would be called with at that sigma). ComfyUI holds VE latents ``x0 + sigma eps``; both hold
latents already multiplied by the VAE scaling factor. The result needs no conversion back: at sigma = 0
the VE and VP latents coincide.
"""

from __future__ import annotations

import torch

from ..schedulers.noise import sigma_to_model_timestep, ve_to_vp
from .nafnet import TwoStageShortcut
from .shortcut_file import teacher_prediction_type


def handoff_timestep(sigma: torch.Tensor | float, sigma_table: torch.Tensor) -> int:
    """The integer training timestep of ``sigma``: the nearest entry of the model's noise table.

    Computed on the CPU in float64 (the table has a thousand entries; some devices lack float64).
    """
    sigma = torch.as_tensor(sigma).detach().cpu().reshape(())
    if not float(sigma) > 0:
        raise ValueError(f"cannot hand off at sigma={float(sigma):g}: the shortcut takes over from a noisy "
                         "latent (sigma > 0), i.e. before the last step of the run")
    return int(sigma_to_model_timestep(sigma, torch.as_tensor(sigma_table).detach().cpu()))


def check_handoff_step(handoff_step: int, steps: int) -> None:
    """The hand-off must leave at least one teacher step before it and one it replaces
    (``steps``: the run's teacher steps, the hand-off step's included). Both front doors call it."""
    if steps < 2:
        raise ValueError(f"the shortcut takes over after 1 or more of at least 2 sampling steps; this run has {steps}")
    if not 1 <= handoff_step < steps:
        raise ValueError(f"handoff_step={handoff_step}: the shortcut takes over after 1 to {steps - 1} of the "
                         f"{steps} sampling steps")


def check_teacher(shortcut: TwoStageShortcut, unet_shape_fingerprint: str, model: str = "this model",
                  prediction_type: str | None = None) -> None:
    """Refuse (ValueError) a model other than the one the shortcut was distilled from, told apart by the
    fingerprint of its UNet's parameter shapes (``student_file.shape_fingerprint``; a shortcut that records no
    teacher, freshly built, is not checked) and by what it predicts (``prediction_type``, where the shortcut's file
    records its teacher's: SD2's 768-v and 512 base share their shapes)."""
    expected = shortcut.teacher_unet_shape_fingerprint
    if expected is not None and unet_shape_fingerprint != expected:
        raise ValueError(f"this shortcut was distilled from {shortcut.teacher} (UNet shape fingerprint {expected}), "
                         f"but {model} has UNet shape fingerprint {unet_shape_fingerprint}: a shortcut only works on "
                         "its own teacher")
    recorded = teacher_prediction_type(shortcut)
    if None not in (recorded, prediction_type) and recorded != prediction_type:
        raise ValueError(f"this shortcut was distilled from {shortcut.teacher}, a model predicting {recorded}, but "
                         f"{model} predicts {prediction_type}: another model of the same shapes, or a "
                         "ModelSamplingDiscrete node or a student upstream")


def check_handoff_at_sigma(shortcut: TwoStageShortcut, sigma: torch.Tensor | float, sigma_table: torch.Tensor,
                           force: bool = False) -> int:
    """Refuse (ValueError) a hand-off at ``sigma`` outside the shortcut's trained band unless ``force``;
    returns the hand-off timestep. Lets a sampler fail before it spends any steps."""
    t = handoff_timestep(sigma, sigma_table)
    shortcut.check_handoff(t, force)
    return t


def handoff_steps_in_band(t_band: tuple[float, float] | None, sigmas: torch.Tensor,
                          sigma_table: torch.Tensor) -> list[int]:
    """The hand-off steps K (1 .. len(sigmas) - 2) of a run on ``sigmas`` whose timestep lies in ``t_band``
    (a shortcut's ``t_band``; None: every step)."""
    lo, hi = t_band or (float("-inf"), float("inf"))
    return [k for k in range(1, len(sigmas) - 1) if lo <= handoff_timestep(sigmas[k], sigma_table) <= hi]


def fitting_steps_hint(fits: list[int], steps: int) -> str:
    """What a refused hand-off's message adds: the hand-off steps of the run (``handoff_steps_in_band``) that
    fit."""
    if fits:
        return f"with these {steps} steps, handoff_step {fits[0]} to {fits[-1]} lies in the band"
    return f"no step of these {steps} steps lies in the band: change the steps or the schedule"


def shortcut_from_vp(shortcut: TwoStageShortcut, x_vp: torch.Tensor, t: torch.Tensor | float,
                     force: bool = False) -> torch.Tensor:
    """The shortcut's clean latent from diffusers' VP latent ``x_vp`` at training timestep ``t``.

    Args:
        shortcut: a TwoStageShortcut (its ``t_band``, when set, is enforced).
        x_vp: (B, C, H, W) latent, VP-scaled and multiplied by the VAE scaling factor.
        t: the teacher's timestep at this latent (a number or a one-element tensor).
        force: hand off even outside the band the shortcut was trained for.

    The shortcut is moved to ``x_vp``'s device (in place) and runs in its own dtype; x0 comes back in
    ``x_vp``'s dtype.
    """
    t = float(torch.as_tensor(t).reshape(()))
    shortcut.check_handoff(t, force)
    return _run(shortcut, x_vp, t)


def shortcut_from_ve(shortcut: TwoStageShortcut, x_ve: torch.Tensor, sigma: torch.Tensor | float,
                     sigma_table: torch.Tensor, force: bool = False) -> torch.Tensor:
    """The shortcut's clean latent from a k-diffusion (ComfyUI) latent ``x_ve = x0 + sigma eps``.

    Args:
        shortcut: a TwoStageShortcut (its ``t_band``, when set, is enforced).
        x_ve: (B, C, H, W) latent, VE-scaled and multiplied by the VAE scaling factor.
        sigma: the exact noise level of ``x_ve``; it sets the VP scaling.
        sigma_table: the model's VE sigma per integer training timestep (ComfyUI's
            ``model_sampling.sigmas``); the shortcut runs at the timestep nearest ``sigma``, as the UNet does.
        force: hand off even outside the band the shortcut was trained for.
    """
    t = check_handoff_at_sigma(shortcut, sigma, sigma_table, force)
    return _run(shortcut, ve_to_vp(x_ve, torch.as_tensor(sigma).detach().reshape(())), t)


@torch.no_grad()
def _run(shortcut: TwoStageShortcut, x_vp: torch.Tensor, t: float) -> torch.Tensor:
    if x_vp.ndim != 4 or x_vp.shape[1] != shortcut.latent_channels:
        raise ValueError(f"the shortcut takes (B, {shortcut.latent_channels}, H, W) latents "
                         f"(teacher: {shortcut.teacher}); got shape {tuple(x_vp.shape)}")
    weight = next(shortcut.parameters())
    if weight.device != x_vp.device:
        shortcut.to(x_vp.device)
    return shortcut(x_vp.to(weight.dtype), torch.tensor([t], device=x_vp.device)).to(x_vp.dtype)
