"""diffusers' own LCM, TCD, Euler and DDIM schedulers, set up as a few-step preset's source says, with the preset's
step counts and timesteps pinned so that ``pipe(prompt)`` samples the way the LoRA was made to be sampled."""

from __future__ import annotations

import contextlib
import inspect
import logging

from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler
# SchedulerMixin by name in this module: a pipeline saved with this scheduler is loaded again by diffusers'
# from_pretrained, which looks its loadable base classes up in the module model_index.json names.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .few_step_presets import PRESETS, FewStepPreset, describe_nfes
from .pinned_steps import FollowsAdapter, ImageToImageGuard
from .scheduling_exp_karras import model_prediction_type, model_scheduler_record


class _PinnedTimesteps(FollowsAdapter, ImageToImageGuard):
    """``set_timesteps(n)`` runs a preset's timesteps for n steps, with the parent scheduler's own rule (or the
    preset's fixed timesteps); n left out, or the pipeline's own default (50 for SD and SDXL, which a pipeline passes
    when its caller names none, so it cannot be told from an asked 50), means the preset's default. Explicit
    ``timesteps=`` / ``sigmas=`` pass through untouched. The step itself is the parent's, unchanged; an
    image-to-image run needs ``num_inference_steps`` (see ``ImageToImageGuard``)."""

    preset: FewStepPreset | None = None
    pipeline_default_steps: int | None = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """The parent's ``from_config``; the preset and the pipeline's default step count recorded in the config
        (``preset_scheduler`` records them, so a saved pipeline reloads pinned) are set again."""
        config = dict(config or {})
        name, default_steps = config.pop("preset", None), config.pop("pipeline_default_steps", None)
        model = config.pop("model_scheduler", None)
        made = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = made[0] if return_unused_kwargs else made
        if name is not None:
            if name not in PRESETS:
                raise ValueError(f"{cls.__name__}: unknown preset {name!r} in the scheduler config")
            _pin(scheduler, PRESETS[name], default_steps, model)
        return made

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # diffusers' retrieve_timesteps passes timesteps= / sigmas= only to a set_timesteps whose signature names
        # them: show the parent's (LCM and TCD take timesteps, Euler both, DDIM neither).
        parent = next(base for base in cls.__mro__[1:] if base.__module__.startswith("diffusers.")
                      and "set_timesteps" in vars(base))

        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            return _PinnedTimesteps.set_timesteps(self, num_inference_steps, device, **kwargs)

        set_timesteps.__signature__ = inspect.signature(parent.set_timesteps)
        set_timesteps.__doc__ = _PinnedTimesteps.set_timesteps.__doc__
        cls.set_timesteps = set_timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        """The preset's timesteps for ``num_inference_steps`` (None or the pipeline's default: its default NFE);
        explicit ``timesteps=`` / ``sigmas=``, where the parent scheduler takes them, are its own."""
        self._check_adapter()
        self._record_steps(num_inference_steps)
        if self.preset is None or kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            return super().set_timesteps(num_inference_steps, device=device, **kwargs)
        preset, n = self.preset, num_inference_steps
        if n is None or n == self.pipeline_default_steps:
            n = preset.default_nfe
        if n not in preset.nfes:
            raise ValueError(f"preset {preset.name} samples with num_inference_steps {describe_nfes(preset.nfes)} "
                             f"(default {preset.default_nfe}), got {num_inference_steps}")
        if preset.spacing == "fixed":
            with _quiet_custom_timestep_notice():
                return super().set_timesteps(device=device, timesteps=list(preset.fixed_timesteps), **kwargs)
        return super().set_timesteps(n, device=device, **kwargs)

    def _steps_hint(self) -> str:
        return f"preset {self.preset.name}'s {describe_nfes(self.preset.nfes)}"


@contextlib.contextmanager
def _quiet_custom_timestep_notice():
    """LCM and TCD warn that timesteps off their 50-step grid may give unexpected results; a fixed preset is off it
    on purpose (the timesteps its LoRA was trained at), so that one notice is muted."""
    class CustomTimestepNotice(logging.Filter):
        def filter(self, record):
            return "custom timestep schedule" not in record.getMessage()

    loggers = [logging.getLogger(f"diffusers.schedulers.scheduling_{name}") for name in ("lcm", "tcd")]
    notice = CustomTimestepNotice()
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


class PresetLCMScheduler(_PinnedTimesteps, LCMScheduler):
    """LCMScheduler with a preset's timesteps pinned (LCM-LoRA; DMD2 at its training timesteps)."""


class PresetTCDScheduler(_PinnedTimesteps, TCDScheduler):
    """TCDScheduler with a preset's step counts pinned (TCD; Hyper-SD's unified 1-step LoRA)."""


class PresetEulerScheduler(_PinnedTimesteps, EulerDiscreteScheduler):
    """EulerDiscreteScheduler with "trailing" spacing and a preset's step counts pinned (SDXL-Lightning)."""


class PresetDDIMScheduler(_PinnedTimesteps, DDIMScheduler):
    """DDIMScheduler with "trailing" spacing and a preset's step counts pinned (Hyper-SD, PCM)."""


# sampler -> (class, the config its sources set on top of the pipeline's scheduler config)
_SCHEDULERS = {
    "lcm": (PresetLCMScheduler, {}),
    "tcd": (PresetTCDScheduler, {}),
    # SDXL-Lightning's card: the pipeline's Euler with trailing spacing; none of the sigma-shaping flags a pipeline
    # switched to (DPM++ 2M Karras, ...) may carry over.
    "euler": (PresetEulerScheduler, {"timestep_spacing": "trailing", "use_karras_sigmas": False,
                                     "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                     "timestep_type": "discrete", "interpolation_type": "linear",
                                     "final_sigmas_type": "zero"}),
    # PCM's card: trailing, clip_sample=False (DDIM's default True clips latents), set_alpha_to_one=False
    "ddim": (PresetDDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}),
}


def preset_scheduler(preset: FewStepPreset, config, pipeline_default_steps: int | None = None):
    """The diffusers scheduler of ``preset``, built on a pipeline's scheduler config (its noise table and
    prediction type), as the preset's source builds it, with the preset pinned (see ``_PinnedTimesteps``).

    Args:
        preset: the few-step preset.
        config: the pipeline's scheduler config (``pipe.scheduler.config``).
        pipeline_default_steps: the ``num_inference_steps`` the pipeline passes when its caller gives none.
    """
    cls, overrides = _SCHEDULERS[preset.sampler]
    # only what the class takes: the pipeline's config may be another scheduler's (PNDM's skip_prk_steps, ...); the
    # model's own prediction type, also after a student of ours that read its output as another
    taken = inspect.signature(cls.__init__).parameters
    model = model_scheduler_record(config)  # for the way back: ExpKarrasScheduler.from_config(this config)
    config = {**{k: v for k, v in dict(config).items() if k in taken},
              "prediction_type": model_prediction_type(config)}
    scheduler = cls.from_config(config, **overrides)
    _pin(scheduler, preset, pipeline_default_steps, model)
    return scheduler


def _pin(scheduler, preset: FewStepPreset, pipeline_default_steps: int | None, model_scheduler: dict | None) -> None:
    scheduler.preset = preset
    scheduler.pipeline_default_steps = pipeline_default_steps
    # in the config too: save_pretrained writes it, from_config reads it back
    scheduler.register_to_config(preset=preset.name, pipeline_default_steps=pipeline_default_steps,
                                 model_scheduler=model_scheduler)
