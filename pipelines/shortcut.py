"""The shortcut as a diffusers ``callback_on_step_end``: after K teacher steps, jump to the final latent."""

from __future__ import annotations

import copy
import os

import torch

from ..models.handoff import check_handoff_step, check_teacher, fitting_steps_hint, shortcut_from_vp
from ..models.nafnet import TwoStageShortcut
from ..models.shortcut_file import load_shortcut, trained_schedule
from ..models.student_file import shape_fingerprint, unet_parameter_shapes
from ..schedulers.named import schedule_sigmas
from ..schedulers.scheduling_exp_karras import model_prediction_type
from ..schedulers.noise import alphas_cumprod_from_config, sigma_table


def next_unet_input(pipe, steps_done: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP latent and timestep that UNet call ``steps_done + 1`` would get, seen from a step-end callback.

    ``scale_model_input`` is what the pipeline itself applies before each UNet call: the identity for
    schedulers that keep VP latents (DPM-Solver, DDIM, PNDM, ExpKarrasScheduler) and the division by
    ``sqrt(1 + sigma^2)`` for those that keep VE latents (Euler, Heun, LMS), so the result is VP
    either way. The timestep is the integer one the UNet would be called with.
    """
    t = pipe.scheduler.timesteps[_timestep_index(pipe, steps_done)]
    return pipe.scheduler.scale_model_input(latents, t), t


def _run_start(pipe, steps_done: int) -> int:
    """Index in ``pipe.scheduler.timesteps`` of this run's first UNet call (an img2img run skips some)."""
    scheduler = pipe.scheduler
    if getattr(scheduler, "step_index", None) is not None:  # it counts the steps an img2img run skipped too
        return scheduler.step_index - steps_done
    # DDIM, PNDM: the run is the last pipe._num_timesteps of the scheduler's timesteps
    run = getattr(pipe, "_num_timesteps", None)
    return len(scheduler.timesteps) - run if isinstance(run, int) and run <= len(scheduler.timesteps) else 0


def _run_length(pipe, steps_done: int) -> int:
    """The UNet calls this run makes: ``pipe._num_timesteps`` where the pipeline sets it (an SDXL run cut short by
    ``denoising_end`` stops before the scheduler's last timesteps), else the timesteps from its start on."""
    left = len(pipe.scheduler.timesteps) - _run_start(pipe, steps_done)
    run = getattr(pipe, "_num_timesteps", None)
    return min(run, left) if isinstance(run, int) and not isinstance(run, bool) and run > 0 else left


def _timestep_index(pipe, steps_done: int, ahead: int = 0) -> int:
    """Index in ``pipe.scheduler.timesteps`` of the UNet call ``ahead`` calls after the next one."""
    start, length = _run_start(pipe, steps_done), _run_length(pipe, steps_done)
    index = start + steps_done + ahead
    if index >= start + length:
        raise ValueError(f"a {length}-step run has no step left after step {steps_done + ahead} to hand off at; "
                         "hand off earlier (handoff_step < num_inference_steps) or run more steps")
    return index


class ShortcutCallback:
    """Replace the last teacher steps by the NAFNet shortcut (seed 000, §3.4).

    After ``handoff_step`` UNet calls the callback feeds the latent the next call would get (VP-scaled)
    and that call's timestep to the shortcut, returns its clean latent as ``latents`` and stops the
    denoising loop (``pipe._interrupt``); the pipeline then decodes that latent as usual::

        cb = ShortcutCallback("shortcut.safetensors", handoff_step=12)
        image = pipe(prompt, num_inference_steps=20, callback_on_step_end=cb).images[0]

    A shortcut learns to finish runs of one schedule (``distill shortcut --schedule``, exp_karras by default);
    ``cb.sigmas(n, pipe.scheduler)`` gives an n-step run of it for ``pipe(..., sigmas=...)``.

    Args:
        shortcut: a ``TwoStageShortcut`` or the path of a shortcut file (read with ``load_shortcut``).
        handoff_step: K >= 1, the number of teacher UNet calls before the hand-off.
        force: hand off even when the timestep lies outside the band the shortcut was trained for
            (otherwise a ValueError is raised at the first step, before any more UNet calls).

    A hand-off that leaves no step to replace (``handoff_step >= num_inference_steps``) is refused at the first
    step with the message ComfyUI's Shortcut nodes give (``models.handoff.check_handoff_step``).

    A pipeline whose UNet is not the shortcut's teacher (by the shapes of its parameters, and by what it predicts
    where the file records its teacher's prediction type) is refused at the first step, and so is an inpainting
    pipeline (it puts the kept area back after each step; none follows the hand-off). The shortcut computes in
    that UNet's dtype, whatever its file stores (``distill shortcut --save-dtype``), on a copy: the file's weights
    stay as they were read.

    The hand-off itself is ``models.handoff.shortcut_from_vp``, the same code ComfyUI's nodes run.
    """

    tensor_inputs = ["latents"]

    def __init__(self, shortcut: TwoStageShortcut | str | os.PathLike, handoff_step: int, force: bool = False):
        if isinstance(shortcut, (str, os.PathLike)):
            shortcut = load_shortcut(shortcut)
        if isinstance(handoff_step, bool) or not isinstance(handoff_step, int) or handoff_step < 1:
            raise ValueError(f"handoff_step must be an integer >= 1 (teacher steps before the hand-off), "
                             f"got {handoff_step!r}")
        self.shortcut = shortcut.eval()
        self.handoff_step = handoff_step
        self.force = force
        self._copies: dict[tuple, TwoStageShortcut] = {}  # (device, dtype) -> the shortcut cast there

    def _running(self, device: torch.device, dtype: torch.dtype) -> TwoStageShortcut:
        """The shortcut on ``device`` in ``dtype``: itself where it is there already, else a cast copy, kept for
        the next run. Casting it in place would round a float32 file's weights for good after one run in
        bfloat16, and change a shortcut object the caller still holds."""
        weight = next(self.shortcut.parameters())
        if (weight.device, weight.dtype) == (device, dtype):
            return self.shortcut
        key = (str(device), dtype)
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(self.shortcut).to(device, dtype)
        return self._copies[key]

    @torch.no_grad()
    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        steps_done = step_index + 1
        if steps_done > self.handoff_step:
            return callback_kwargs
        if step_index == 0:
            if hasattr(pipe, "mask_processor"):
                raise ValueError(f"ShortcutCallback does not run {type(pipe).__name__}: an inpainting pipeline puts "
                                 "the kept area back after each step, and after the hand-off no step follows, so "
                                 "the kept area would change; ComfyUI's Shortcut KSampler keeps it (noise mask)")
            check_handoff_step(self.handoff_step, _run_length(pipe, steps_done))
            check_teacher(self.shortcut, shape_fingerprint(unet_parameter_shapes(pipe.unet)), "the pipeline's UNet",
                          model_prediction_type(pipe.scheduler.config))
        latents = callback_kwargs["latents"]
        # The hand-off timestep is known from the first step on, so a bad band fails before any wasted step.
        ahead = self.handoff_step - steps_done
        handoff_t = pipe.scheduler.timesteps[_timestep_index(pipe, steps_done, ahead)]
        try:
            self.shortcut.check_handoff(float(handoff_t), self.force)
        except ValueError as err:  # name the hand-off steps of this run that the band takes
            start = _run_start(pipe, steps_done)
            run = pipe.scheduler.timesteps[start:start + _run_length(pipe, steps_done)]  # what this run calls
            lo, hi = self.shortcut.t_band
            fits = [k for k in range(1, len(run)) if lo <= float(run[k]) <= hi]
            raise ValueError(f"{err} ({fitting_steps_hint(fits, len(run))})") from None
        if ahead:
            return callback_kwargs
        x_t, t = next_unet_input(pipe, steps_done, latents)
        # computes in the UNet's dtype, whatever the file stores
        shortcut = self._running(latents.device, pipe.unet.dtype)
        callback_kwargs["latents"] = shortcut_from_vp(shortcut, x_t, t, self.force)
        pipe._interrupt = True
        return callback_kwargs

    @property
    def schedule(self) -> tuple[str, dict]:
        """The schedule of the runs the shortcut was trained on (``models.shortcut_file.trained_schedule``)."""
        return trained_schedule(self.shortcut)

    def sigmas(self, num_inference_steps: int, scheduler) -> list[float]:
        """The ``num_inference_steps + 1`` sigmas, ending at 0, of a run of the schedule the shortcut was trained
        on, on ``scheduler``'s noise table: ``pipe(..., sigmas=cb.sigmas(11, pipe.scheduler))`` with a scheduler
        that takes sigmas (``ExpKarrasScheduler``, ``EulerDiscreteScheduler``) runs those 11 steps."""
        name, params = self.schedule
        table = sigma_table(alphas_cumprod_from_config(scheduler.config))
        return schedule_sigmas(name, num_inference_steps, table, **params).tolist()
