"""load_student: a student file onto a diffusers pipeline, as its LoRA and its scheduler."""

from __future__ import annotations

import contextlib
import inspect
import os

from ..models.student_file import StudentInfo, read_student, unet_mismatches
from ..schedulers.scheduling_student import StudentScheduler


def load_student(pipe, path: str | os.PathLike, *, adapter_name: str = "student", scale: float = 1.0) -> StudentInfo:
    """Apply a student (``save_student``'s file) to ``pipe`` and sample the way it was trained.

    Loads the LoRA with ``pipe.load_lora_weights`` and replaces ``pipe.scheduler`` by a
    :class:`StudentScheduler` holding the student's exact timesteps and sigmas, so ``pipe(prompt)``
    runs ``info.default_nfe`` steps, and ``pipe(prompt, num_inference_steps=k)`` runs ``k`` for any
    ``k`` in ``info.nfe_schedules`` (any other ``k`` raises ValueError). Guidance stays a per-call
    argument of diffusers pipelines: pass ``guidance_scale=info.guidance``, the student's recommended
    value (the pipelines' own default is 7.5)::

        info = load_student(pipe, "student.safetensors")
        image = pipe(prompt, guidance_scale=info.guidance).images[0]

    Everything is checked before the pipeline is touched: a malformed file raises FileFormatError,
    a student made for another UNet or noise schedule, or a taken ``adapter_name``, ValueError.

    Args:
        pipe: a diffusers pipeline with a UNet and LoRA loading (SD, SDXL, ...).
        path: the student ``.safetensors`` file.
        adapter_name: the name of the LoRA adapter in ``pipe`` (to disable or delete it later).
        scale: strength of the LoRA (1.0 = as trained; ComfyUI's ``strength_model``).

    Returns:
        the student's metadata: method, schedules, recommended sampler and guidance, ...
    """
    lora, info = read_student(path)
    problems = unet_mismatches(info, lora, pipe.unet)
    if problems:
        raise ValueError(f"{path}: this student was made for another UNet: " + "; ".join(problems))
    if adapter_name in (getattr(pipe.unet, "peft_config", None) or {}):
        raise ValueError(f"{path}: the pipeline's UNet already has an adapter named {adapter_name!r}; "
                         "pass another adapter_name or delete it first (pipe.delete_adapters)")
    try:
        scheduler = StudentScheduler.from_config(
            pipe.scheduler.config, nfe_schedules={str(k): v for k, v in info.nfe_schedules.items()},
            default_nfe=info.default_nfe, pipeline_default_steps=_default_steps(pipe),
            prediction_type=info.prediction_type, solver_order=info.solver_order)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

    with _quiet_text_encoder_notice():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    if scale != 1.0:
        _set_adapter_scale(pipe.unet, adapter_name, scale)
    pipe.scheduler = scheduler
    return info


@contextlib.contextmanager
def _quiet_text_encoder_notice():
    """A student is a UNet LoRA by design: diffusers' notice that the file has no text-encoder keys is muted
    (its other warnings, e.g. keys that did not load, still show)."""
    import logging

    class NoTextEncoderNotice(logging.Filter):
        def filter(self, record):
            return not record.getMessage().startswith("No LoRA keys associated to")

    logger = logging.getLogger("diffusers.loaders.lora_base")
    notice = NoTextEncoderNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _default_steps(pipe) -> int | None:
    """The num_inference_steps the pipeline's __call__ uses when its caller gives none."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, int) else None


def _set_adapter_scale(unet, adapter_name: str, scale: float) -> None:
    # What pipe.set_adapters does per layer, without re-weighting or deactivating the user's other adapters.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
            module.set_scale(adapter_name, scale)
