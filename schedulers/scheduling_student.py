"""StudentScheduler: diffusers' DPM-Solver++ on a distilled student's fixed timesteps and sigmas, per NFE."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
# SchedulerMixin by name in this module: a pipeline saved with this scheduler is loaded again by diffusers'
# from_pretrained, which looks its loadable base classes up in the module model_index.json names.
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from .noise import add_noise_in_float32, sigma_to_model_timestep, vp_sigma_table
from .pinned_steps import FollowsAdapter, ImageToImageGuard
from .scheduling_exp_karras import SOLVER_KEYS, model_scheduler_record, with_defaults_kept

# What a pipeline's scheduler config may carry that is not the student's: the schedule parameter of another
# scheduler, a preset's name, and solver choices (a student steps as it was trained, DDIM or DPM++ 2M).
_NOT_THE_STUDENTS = ("exp_karras_p", "preset") + SOLVER_KEYS


class StudentScheduler(FollowsAdapter, ImageToImageGuard, DPMSolverMultistepScheduler):
    """Samples a distilled student at exactly the timesteps and sigmas it was trained for.

    A student supports a few step counts (NFEs), each with its own schedule; ``set_timesteps(n)`` takes
    the table's entry for ``n`` and refuses any other ``n``. The step is diffusers'
    :class:`DPMSolverMultistepScheduler`, unchanged: ``solver_order=1`` is DDIM (Euler in ComfyUI's
    terms), ``solver_order=2`` is DPM++ 2M. ``direct_distill.pipelines.load_student`` builds it from a
    student file; by hand::

        pipe.scheduler = StudentScheduler.from_config(pipe.scheduler.config, nfe_schedules=table, default_nfe=4)

    Args:
        nfe_schedules (`dict`): ``{"n": {"timesteps": [n integers], "sigmas": [n + 1 floats ending in 0]}}``,
            in sampling order; each timestep must be the one the UNet is called with at its sigma (the
            nearest entry of the noise table, ComfyUI's rule), so both front doors make the same calls.
        default_nfe (`int`): the entry used when no step count is asked for.
        pipeline_default_steps (`int`, *optional*): the ``num_inference_steps`` a pipeline passes when its
            caller gives none (50 for the SD and SDXL pipelines). It is read as "unspecified", i.e.
            ``default_nfe``, unless it is itself a supported NFE. An image-to-image run therefore passes
            ``num_inference_steps`` with its ``strength`` (see ``ImageToImageGuard``).
        teacher_prediction_type (`str`, *optional*): what the model predicts where the student reads its output
            as another ``prediction_type``; recorded only, so that the next student loaded checks the model, not
            this student.
        model_scheduler (`dict`, *optional*): the config of the scheduler the student's replaced, the model's own
            (``from_config`` records it): ``ExpKarrasScheduler.from_config(this config)`` builds it again, its
            schedule parameter and solver included, once the student's adapter is deleted.
        Other arguments are those of `DPMSolverMultistepScheduler` (the noise table, prediction type and
        solver); the sigma-shaping flags (`use_karras_sigmas`, ...) are not taken, the schedule being fixed.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["ExpKarrasScheduler"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Builds the scheduler from any diffusers scheduler config, keeping its noise table (also where it was
        left at its class's defaults) and prediction type. An ExpKarrasScheduler config's schedule parameter, a
        few-step preset's name and the solver the pipeline was set to (DPM++ 2M SDE, thresholding, ...) are
        dropped without a warning: a student samples with its own deterministic step at its own timesteps. The
        whole config is kept aside as ``model_scheduler``, for the way back."""
        if config is not None:
            config = with_defaults_kept(config)
            if "nfe_schedules" not in config:  # another scheduler's: its solver is not the student's
                model = model_scheduler_record(config)
                # what the student takes of it, quietly: an LCM or TCD preset's own keys are no concern of a student
                taken = inspect.signature(cls.__init__).parameters
                config = {k: v for k, v in config.items() if k not in _NOT_THE_STUDENTS and k in taken}
                config["model_scheduler"] = model
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @register_to_config
    def __init__(
        self,
        nfe_schedules: dict | None = None,
        default_nfe: int | None = None,
        pipeline_default_steps: int | None = None,
        teacher_prediction_type: str | None = None,
        model_scheduler: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        solver_order: int = 1,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        steps_offset: int = 1,
    ):
        if solver_order not in (1, 2):
            raise ValueError(f"StudentScheduler: solver_order must be 1 (DDIM/Euler) or 2 (DPM++ 2M), "
                             f"got {solver_order!r}")
        table = vp_sigma_table(
            "StudentScheduler", prediction_type=prediction_type, num_train_timesteps=num_train_timesteps,
            beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas,
            rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._schedules = _checked_schedules(nfe_schedules, table)
        if default_nfe not in self._schedules:
            raise ValueError(f"StudentScheduler: default_nfe {default_nfe!r} is not among the supported NFEs "
                             f"{sorted(self._schedules)}")
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, rescale_betas_zero_snr=rescale_betas_zero_snr,
            solver_order=solver_order, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
            final_sigmas_type="zero", steps_offset=steps_offset)

    def _reads_other_prediction(self) -> str | None:
        model = self.config.teacher_prediction_type
        return None if model in (None, self.config.prediction_type) else model

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """diffusers' ``add_noise``, in float32 for half-precision latents (:func:`noise.add_noise_in_float32`)."""
        return add_noise_in_float32(super().add_noise, original_samples, noise, timesteps)

    @property
    def supported_nfes(self) -> list[int]:
        """The step counts this student was trained for."""
        return sorted(self._schedules)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ):
        """Sets the student's own timesteps and sigmas for ``num_inference_steps`` UNet evaluations.

        Args:
            num_inference_steps (`int`, *optional*): one of ``supported_nfes``; ``None`` (or the
                pipeline's own default, see ``pipeline_default_steps``) means ``default_nfe``.
            device (`str` or `torch.device`, *optional*): where the timesteps live.
            mu, timesteps, sigmas: not taken (the schedule is the student's); accepted for signature
                compatibility and refused if given.
        """
        if timesteps is not None or sigmas is not None:
            raise ValueError("StudentScheduler samples at the student's own timesteps; pass num_inference_steps "
                             f"among {self.supported_nfes}, not timesteps or sigmas")
        self._check_adapter()
        self._record_steps(num_inference_steps)
        n = num_inference_steps
        if n is None or (n == self.config.pipeline_default_steps and n not in self._schedules):
            n = self.config.default_nfe
        if n not in self._schedules:
            raise ValueError(f"this student samples with num_inference_steps in {self.supported_nfes} "
                             f"(default {self.config.default_nfe}), got {num_inference_steps}")
        t, s = self._schedules[n]
        self.sigmas = s.float()
        self.timesteps = t.to(device)
        self.num_inference_steps = n
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _steps_hint(self) -> str:
        return f"this student's {', '.join(map(str, self.supported_nfes))}"


def _checked_schedules(schedules, table: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{nfe: (timesteps, sigmas)} from the config's table, each sigma checked against the noise table."""
    if not isinstance(schedules, dict) or not schedules:
        raise ValueError("StudentScheduler: nfe_schedules must be a non-empty {nfe: {'timesteps', 'sigmas'}} table")
    out = {}
    for key, entry in schedules.items():
        n = int(key)
        t = torch.as_tensor(entry["timesteps"], dtype=torch.float64)
        s = torch.as_tensor(entry["sigmas"], dtype=torch.float64)
        if t.shape != (n,) or s.shape != (n + 1,) or s[-1] != 0:
            raise ValueError(f"StudentScheduler: nfe_schedules[{key}] needs {n} timesteps and {n + 1} sigmas ending "
                             f"in 0, got {t.numel()} and {s.numel()}")
        # ComfyUI calls the UNet at the table entry nearest each sigma; the student is the same in both
        # front doors only if its timesteps are exactly those.
        expected = sigma_to_model_timestep(s[:-1], table)
        if not torch.equal(t, expected.double()):
            raise ValueError(f"StudentScheduler: nfe_schedules[{key}] timesteps {t.tolist()} are not the model "
                             f"timesteps of its sigmas under this noise schedule ({expected.tolist()}): "
                             "a student for another model?")
        t = expected
        out[n] = (t, s)
    return out
