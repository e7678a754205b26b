"""ExpKarrasScheduler: diffusers' DPM-Solver++ (2M by default) on the exponential-Karras sigmas."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
# SchedulerMixin by name in this module: a pipeline saved with this scheduler is loaded again by diffusers'
# from_pretrained, which looks its loadable base classes up in the module model_index.json names.
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from .noise import add_noise_in_float32, not_a_vp_table, sigma_to_model_timestep, t_to_sigma, vp_sigma_table
from .sigmas import _check_steps, check_exp_karras_p, exp_karras_sigmas_from_table

# The sigma-spacing settings of DPMSolverMultistepScheduler (and of the other schedulers' configs) with the
# values that ask for nothing: here the spacing is exp-Karras by definition. from_config drops them from a
# swapped-in config; the constructor refuses any other value.
_SPACING_FLAGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
                  "time_shift_type": "exponential", "timestep_spacing": "linspace"}
# Other schedulers' sigma-shaping keys, meaningless here.
_FOREIGN_SPACING_KEYS = ("interpolation_type", "sigma_min", "sigma_max", "timestep_type",
                         "preset", "pipeline_default_steps")  # the last two: a few-step preset's pinned steps
# A DPM-Solver config's solver choices: a student's scheduler steps with its own (DDIM or DPM++ 2M).
SOLVER_KEYS = ("solver_order", "algorithm_type", "solver_type", "lower_order_final", "thresholding",
               "dynamic_thresholding_ratio", "sample_max_value")
# What a StudentScheduler's config holds of the student alone: its schedules, and the model's own prediction type
# (its ``prediction_type`` is how the student's output is read).
_STUDENT_KEYS = ("nfe_schedules", "default_nfe", "pipeline_default_steps", "teacher_prediction_type", "model_scheduler")


class ExpKarrasScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++ multistep sampling on the exponential-Karras schedule of Li & Zhang (2025).

    The solver is diffusers' :class:`DPMSolverMultistepScheduler`, unchanged; only the sigmas differ.
    The sigmas are log-sigma interpolated in the model's noise table as ComfyUI holds it (float64 values rounded
    to float32), so a ComfyUI run computes the same sigmas bit for bit (with zero terminal SNR all but the first:
    diffusers clips the last alpha-bar to 2^-24, ComfyUI to 4.9e-8, so 4096 here is 4518.8 there); the UNet is
    called at the nearest integer timestep of each sigma, exactly as ComfyUI calls it, so both front doors make
    identical model calls.

    Swap it into any SD/SDXL pipeline::

        pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)

    Args:
        exp_karras_p (`float`, defaults to 1.0):
            Curvature of the schedule: 0 is uniform in t; larger values take bigger steps near t_max and
            finer ones near t = 0.
        Every other argument is `DPMSolverMultistepScheduler`'s and means what it means there: the noise table
        (`beta_*`, `trained_betas`, `rescale_betas_zero_snr`), `prediction_type`, `variance_type`, the solver
        (`solver_order`, `algorithm_type`, `solver_type`, `lower_order_final`, `euler_at_final`, thresholding),
        `final_sigmas_type`, and `lambda_min_clipped` (the schedule starts at the last timestep whose
        log-SNR is at least this). Its sigma-spacing flags (`use_karras_sigmas`, `use_exponential_sigmas`,
        `use_beta_sigmas`, `use_lu_lambdas`, `use_flow_sigmas`, `flow_shift`, `use_dynamic_shifting`,
        `time_shift_type`, `timestep_spacing`) are accepted only at the values that ask for nothing, since the
        spacing is exp-Karras; `from_config` drops them from another scheduler's config. `steps_offset` (1, as
        SD's pipelines expect of a scheduler config) has nothing to offset here.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

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
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        timestep_spacing: str = "linspace",
        steps_offset: int = 1,
    ):
        exp_karras_p = check_exp_karras_p(exp_karras_p, "ExpKarrasScheduler")
        self.register_to_config(exp_karras_p=exp_karras_p)  # a plain float: numpy's and torch's do not save as JSON
        if final_sigmas_type not in ("zero", "sigma_min"):  # any other value was read as "zero"
            raise ValueError(f"ExpKarrasScheduler: final_sigmas_type must be 'zero' or 'sigma_min', got "
                             f"{final_sigmas_type!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
            raise ValueError(f"ExpKarrasScheduler: steps_offset must be an integer, got {steps_offset!r}")
        given = dict(use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                     use_beta_sigmas=use_beta_sigmas, use_lu_lambdas=use_lu_lambdas, use_flow_sigmas=use_flow_sigmas,
                     flow_shift=flow_shift, use_dynamic_shifting=use_dynamic_shifting,
                     time_shift_type=time_shift_type, timestep_spacing=timestep_spacing)
        asked = {k: v for k, v in given.items() if v != _SPACING_FLAGS[k]}
        if asked:
            raise ValueError("ExpKarrasScheduler: " + ", ".join(f"{k}={v!r}" for k, v in asked.items())
                             + " asks for another sigma spacing; this scheduler's spacing is exp-Karras (shape it "
                             "with exp_karras_p). ExpKarrasScheduler.from_config(config) drops such settings from "
                             "another scheduler's config.")
        if not (isinstance(lambda_min_clipped, (int, float)) and not isinstance(lambda_min_clipped, bool)
                and not math.isnan(lambda_min_clipped)):
            raise ValueError(f"ExpKarrasScheduler: lambda_min_clipped must be a number, got {lambda_min_clipped!r}")
        self._sigma_table = vp_sigma_table(
            "ExpKarrasScheduler", prediction_type=prediction_type, num_train_timesteps=num_train_timesteps,
            beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas,
            rescale_betas_zero_snr=rescale_betas_zero_snr)
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, solver_order=solver_order,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
            euler_at_final=euler_at_final, final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped, variance_type=variance_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr, steps_offset=steps_offset, **given)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Builds the scheduler from any diffusers scheduler config (PNDM, DDIM, Euler, DPM, ...), dropping the
        settings that ask for another sigma spacing (use_karras_sigmas=True, timestep_spacing="leading", ...). The
        noise table is the source's own, also where it left it at its class's defaults (DDPM's linear 1e-4 to
        0.02): diffusers' from_config would give those keys this class's defaults, SD's table. From a student's
        scheduler (``load_student``) it takes the model's prediction type and its own solver (:func:`models_config`):
        the way back to the model once the student's adapter is deleted."""
        if config is not None:
            config = models_config(config)
            reason = not_a_vp_table(config)
            if reason:
                raise ValueError(f"ExpKarrasScheduler: this scheduler config {reason}; exp-Karras needs a discrete VP "
                                 "(DDPM-style) noise schedule")
            if config.get("algorithm_type") not in (None, *_DPM_ALGORITHMS):  # DEIS's own, SA-Solver's data_prediction:
                config["algorithm_type"] = "dpmsolver++"  # DPM-Solver++ is what this class runs
            config = {**_source_class_defaults(config), **config}
            config = {k: v for k, v in config.items() if k not in _FOREIGN_SPACING_KEYS
                      and (k not in _SPACING_FLAGS or v == _SPACING_FLAGS[k])}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """diffusers' ``add_noise``, in float32 for half-precision latents (:func:`noise.add_noise_in_float32`)."""
        return add_noise_in_float32(super().add_noise, original_samples, noise, timesteps)

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
            mu: the dynamic shift of flow-matching models; refused (there is no shift on a VP noise table).
            timesteps (`list[float]`, *optional*): explicit training timesteps (fractional allowed), descending;
                their sigmas are taken from the model's noise table.
            sigmas (`list[float]` or `torch.Tensor`, *optional*): explicit descending VE sigmas, one per step (a
                trailing 0 is taken as the end). Overrides the exp-Karras formula (used for cross-checks and for
                students trained at fixed sigmas).
        Either way the run ends at 0, or at the table's smallest sigma if ``final_sigmas_type="sigma_min"``; the
        sigmas given must lie above it.
        """
        if mu is not None:
            raise ValueError("ExpKarrasScheduler.set_timesteps: mu is the dynamic shift of flow-matching models; "
                             "this scheduler samples a discrete VP model")
        given = sum(x is not None for x in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise ValueError("ExpKarrasScheduler.set_timesteps: pass exactly one of num_inference_steps, "
                             "timesteps or sigmas")
        table = self._sigma_table
        end_at_sigma_min = self.config.final_sigmas_type == "sigma_min"
        if num_inference_steps is not None:
            num_inference_steps = _check_steps(num_inference_steps)
            # lambda_min_clipped: the schedule starts at the last timestep whose log-SNR, -log(sigma), reaches it.
            usable = int((-table.log() >= self.config.lambda_min_clipped).sum())
            if usable < 2:
                raise ValueError(f"ExpKarrasScheduler: lambda_min_clipped={self.config.lambda_min_clipped} leaves "
                                 f"{usable} timestep(s) of the noise table; it needs at least 2")
            # Ending at sigma_min, the grid's last point (t = 0) is where the run ends rather than a step, so
            # the grid has one point more: n steps between t_max and t = 0 either way.
            grid = num_inference_steps + 1 if end_at_sigma_min else num_inference_steps
            # From the table as ComfyUI holds it (float32): a ComfyUI run computes the same sigmas bit for bit.
            steps = exp_karras_sigmas_from_table(grid, self.config.exp_karras_p, table=table[:usable].float())[:-1]
            steps = steps[:num_inference_steps]
        else:
            values = torch.as_tensor(sigmas if sigmas is not None else timesteps, dtype=torch.float64).flatten()
            if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                raise ValueError("ExpKarrasScheduler.set_timesteps: sigmas/timesteps must be finite and >= 0")
            last = self.config.num_train_timesteps - 1
            if timesteps is not None and bool((values.round() > last).any()):  # exact fractional ones pass
                raise ValueError(f"ExpKarrasScheduler.set_timesteps: timesteps must lie in 0..{last} (the model's "
                                 f"training timesteps), got {values.max().item():g}")
            steps = t_to_sigma(values, table.float()) if timesteps is not None else values
            if steps[-1] == 0:
                steps = steps[:-1]
        full = torch.cat([steps, table[:1] if end_at_sigma_min else steps.new_zeros(1)])
        stored = full.float()  # what the solver steps between: two sigmas equal in float32 are a step of length 0
        if steps.numel() < 1 or not bool((steps > 0).all()) or not bool((stored[1:] < stored[:-1]).all()):
            raise ValueError("ExpKarrasScheduler.set_timesteps: sigmas/timesteps must strictly decrease to the final "
                             f"sigma ({'sigma_min' if end_at_sigma_min else '0'}, final_sigmas_type="
                             f"{self.config.final_sigmas_type!r})")
        self.sigmas = stored
        self.timesteps = sigma_to_model_timestep(full[:-1], table).to(device)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep):
        """A run from its first timestep starts at index 0. Past 1,000 steps the first sigmas share the model
        timestep 999, and diffusers' rule (the second of repeated timesteps, for image-to-image runs starting in the
        middle) would start one step late and run past the last sigma."""
        if self.begin_index is None and self.timesteps.numel() > 1:
            t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
            if bool(self.timesteps[0] == t) and bool(self.timesteps[1] == self.timesteps[0]):
                self._step_index = 0
                return
        super()._init_step_index(timestep)


def with_defaults_kept(config) -> dict:
    """A scheduler config as a plain dict with every value its scheduler used, the defaulted ones included:
    diffusers lists those in ``_use_default_values`` and ``from_config`` would replace them by the new class's."""
    config = dict(config)
    config.pop("_use_default_values", None)
    return config


def model_prediction_type(config) -> str:
    """What the model under a pipeline's scheduler predicts: a StudentScheduler's config reads the student's output
    as ``prediction_type`` and keeps the model's own as ``teacher_prediction_type``."""
    return config.get("teacher_prediction_type") or config.get("prediction_type", "epsilon")


# The keys that make a model's noise table (and how its output is read).
_NOISE_TABLE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "rescale_betas_zero_snr", "prediction_type")


_DPM_ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")


def _source_class_defaults(config: dict) -> dict:
    """The noise-table keys a config file leaves out, at the defaults of the diffusers class it names (a
    ``scheduler_config.json`` holding only DDPMScheduler's name means DDPM's linear 1e-4 to 0.02, not this class's
    SD table). Nothing for a class diffusers does not have."""
    import diffusers

    source = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not isinstance(source, type):
        return {}
    parameters = inspect.signature(source.__init__).parameters
    return {k: parameters[k].default for k in _NOISE_TABLE_KEYS
            if k not in config and k in parameters and parameters[k].default is not inspect.Parameter.empty}


def models_config(config) -> dict:
    """:func:`with_defaults_kept` of a pipeline's scheduler config, as the model's: where it is a student's or a
    few-step preset's scheduler config, the config of the scheduler it replaced (its ``model_scheduler``), or where
    a student's has none (saved before it was recorded), the model's prediction type and neither the student's
    schedules nor its solver."""
    config = with_defaults_kept(config)
    if config.get("model_scheduler") and ("nfe_schedules" in config or "preset" in config):
        return dict(config["model_scheduler"])
    if "nfe_schedules" not in config:
        return config
    kept = {k: v for k, v in config.items() if k not in _STUDENT_KEYS + SOLVER_KEYS}
    return {**kept, "prediction_type": model_prediction_type(config)}


def model_scheduler_record(config) -> dict:
    """What a student's or preset's scheduler keeps as ``model_scheduler`` when it replaces the scheduler of
    ``config``: the model's own scheduler config (:func:`models_config`; the one recorded where ``config`` is
    itself a student's or preset's), its class name kept, diffusers' other private keys left out."""
    return {k: v for k, v in models_config(config).items() if not k.startswith("_") or k == "_class_name"}
