"""ExpKarrasScheduler: diffusers' DPM-Solver++ (2M by default) on the exponential-Karras sigmas."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config

from .noise import sigma_to_model_timestep, t_to_sigma, vp_sigma_table
from .sigmas import exp_karras_sigmas_from_table

# Sigma-shaping flags of other schedulers' configs: meaningless here, and dropped so a swapped-in
# config never claims, say, use_karras_sigmas=True for an exp-Karras run.
_FOREIGN_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                        "use_flow_sigmas", "interpolation_type", "sigma_min", "sigma_max", "timestep_type")


class ExpKarrasScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++ multistep sampling on the exponential-Karras schedule of Li & Zhang (2025).

    The solver is diffusers' :class:`DPMSolverMultistepScheduler`, unchanged; only the sigmas differ.
    The sigmas are exact (log-sigma interpolated in the model's float64 noise table); the UNet is called
    at the nearest integer timestep of each sigma, exactly as ComfyUI calls it, so both front doors make
    identical model calls for the same sigmas.

    Swap it into any SD/SDXL pipeline::

        pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)

    Args:
        exp_karras_p (`float`, defaults to 1.0):
            Curvature of the schedule: 0 is uniform in t; larger values take bigger steps near t_max and
            finer ones near t = 0.
        Other arguments are those of `DPMSolverMultistepScheduler`; the sigma-shaping flags
        (`use_karras_sigmas`, ...) are not taken, since the schedule is exp-Karras by definition.
    """

    _compatibles = [
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DEISMultistepScheduler",
    ]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        exp_karras_p: float = 1.0,
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        steps_offset: int = 0,
        timestep_spacing: str = "linspace",
    ):
        if (isinstance(exp_karras_p, bool) or not isinstance(exp_karras_p, (int, float))
                or not math.isfinite(exp_karras_p) or exp_karras_p < 0):
            raise ValueError(f"ExpKarrasScheduler: exp_karras_p must be a finite number >= 0, got {exp_karras_p!r}")
        self._sigma_table = vp_sigma_table(
            "ExpKarrasScheduler", prediction_type=prediction_type, num_train_timesteps=num_train_timesteps,
            beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas)
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, solver_order=solver_order,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
            euler_at_final=euler_at_final, final_sigmas_type=final_sigmas_type,
            steps_offset=steps_offset, timestep_spacing=timestep_spacing)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Builds the scheduler from any diffusers scheduler config (PNDM, DDIM, Euler, DPM, ...)."""
        if config is not None:
            config = {k: v for k, v in dict(config).items() if k not in _FOREIGN_SIGMA_FLAGS}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ):
        """Sets the exp-Karras sigmas (or given ones) for a run of ``num_inference_steps``.

        Args:
            num_inference_steps (`int`): number of model evaluations (>= 1).
            device (`str` or `torch.device`, *optional*): where the timesteps live.
            mu: not used (no dynamic shifting); accepted for signature compatibility.
            timesteps (`list[float]`, *optional*): explicit training timesteps, descending; their sigmas are
                taken from the model's noise table and 0 is appended.
            sigmas (`list[float]` or `torch.Tensor`, *optional*): explicit descending VE sigmas; a trailing 0
                is appended if absent. Overrides the exp-Karras formula (used for cross-checks and
                for students trained at fixed sigmas).
        """
        given = sum(x is not None for x in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise ValueError("ExpKarrasScheduler.set_timesteps: pass exactly one of num_inference_steps, "
                             "timesteps or sigmas")
        table = self._sigma_table
        if num_inference_steps is not None:
            full = exp_karras_sigmas_from_table(num_inference_steps, self.config.exp_karras_p, table=table)
        else:
            values = torch.as_tensor(sigmas if sigmas is not None else timesteps, dtype=torch.float64).flatten()
            if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                raise ValueError("ExpKarrasScheduler.set_timesteps: sigmas/timesteps must be finite and >= 0")
            if timesteps is not None:
                values = t_to_sigma(values, table)
            if values[-1] != 0:
                values = torch.cat([values, values.new_zeros(1)])
            if values.numel() < 2 or not bool((values[:-1] > 0).all()) or not bool((values[:-2] > values[1:-1]).all()):
                raise ValueError("ExpKarrasScheduler.set_timesteps: sigmas/timesteps must strictly decrease")
            full = values
        if self.config.final_sigmas_type == "sigma_min":
            full = torch.cat([full[:-1], table[:1]])
        self.sigmas = full.float()
        self.timesteps = sigma_to_model_timestep(full[:-1], table).to(device)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
