"""load_student: a student file, ours or a few-step LoRA published by others, onto a diffusers pipeline, as its LoRA
and its scheduler."""

from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch

from ..models.few_step_lora import preset_and_layers
from ..models.io import is_direct_distill_file, read_safetensors
from ..models.lora_layouts import kohya_state_dict, resolve_layers, unet_family
from ..models.student_file import StudentInfo, bare_unet, read_student, unet_mismatches
from ..schedulers.few_step_presets import FewStepPreset
from ..schedulers.pinned_steps import FEW_STEP_ADAPTERS
from ..schedulers.scheduling_presets import preset_scheduler
from ..schedulers.scheduling_exp_karras import model_prediction_type
from ..schedulers.scheduling_student import StudentScheduler


def load_student(pipe, path: str | os.PathLike, *, preset: str | None = None, adapter_name: str = "student",
                 scale: float = 1.0) -> StudentInfo | FewStepPreset:
    """Apply a few-step LoRA to ``pipe`` and sample the way it was made to be sampled.

    A Direct Distill student (``save_student``'s file) carries its schedule: the LoRA is loaded with
    ``pipe.load_lora_weights`` and ``pipe.scheduler`` becomes a :class:`StudentScheduler` holding the student's exact
    timesteps and sigmas, so ``pipe(prompt)`` runs ``info.default_nfe`` steps and ``num_inference_steps=k`` runs any
    ``k`` in ``info.nfe_schedules`` (others raise ValueError).

    A LoRA from elsewhere (LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, DMD2, PCM; any layout of
    ``models.lora_layouts``) needs ``preset`` (``python -m direct_distill stamp --list`` names them), unless its file
    was stamped with one. ``pipe.scheduler`` becomes the diffusers scheduler its source prescribes (LCMScheduler,
    TCDScheduler, or Euler / DDIM with trailing spacing) with the preset's step counts and timesteps pinned.

    Guidance stays a per-call argument of diffusers pipelines (their own default is 7.5): pass the returned
    ``guidance``, and for TCD its ``gamma`` as ``eta`` (harmless for the other samplers)::

        info = load_student(pipe, "Hyper-SD15-8steps-lora.safetensors", preset="hyper-sd15-8step")
        image = pipe(prompt, guidance_scale=info.guidance, eta=getattr(info, "gamma", 0.0)).images[0]

    Everything is checked before the pipeline is touched: a malformed file raises FileFormatError; a LoRA made for
    another UNet (an SDXL LoRA on SD1.5, ...) or, for our students, a pipeline whose scheduler predicts another
    type than the teacher's (SD2's 768-v against the 512 base), a preset of another family, a taken
    ``adapter_name``, ValueError.

    Adapters already active in ``pipe`` (a style LoRA) stay active at the scales they had: the few-step LoRA is
    added beside them (``pipe.set_adapters`` re-weights them all, as in diffusers' own LCM-LoRA + style recipe). A
    few-step LoRA loaded here before, in this pipeline or another sharing its UNet (``Img2ImgPipeline(**pipe.
    components)``), is switched off: two at once sample as neither, and the new scheduler is the new LoRA's alone.
    It stays loaded (``pipe.delete_adapters(name)`` frees it, ``pipe.set_adapters`` and ``load_student``'s
    scheduler bring it back).

    Args:
        pipe: a diffusers pipeline with a UNet and LoRA loading (SD, SDXL, ...).
        path: the ``.safetensors`` file.
        preset: for a LoRA from elsewhere, the name of its few-step preset; None uses the one stamped in the file.
        adapter_name: the name of the LoRA adapter in ``pipe`` (to disable or delete it later).
        scale: strength of the LoRA (1.0 = as trained; ComfyUI's ``strength_model``). A student whose output is read
            as another prediction than its teacher's (``info.prediction_type`` against ``teacher_prediction_type``)
            takes 1.0 only: at any other scale its output would mix the two; for the same reason, disabling or
            deleting its adapter later calls for a scheduler that reads the model's own output again:
            ``ExpKarrasScheduler.from_config(pipe.scheduler.config)`` does (it builds the scheduler the student
            replaced, kept in the student scheduler's config as ``model_scheduler``, from which a diffusers
            scheduler class can be built too).

    Returns:
        our student's metadata (method, schedules, sampler, guidance, ...), or the few-step preset applied.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{path}: scale must be a finite number (the LoRA's strength, 1.0 as trained), got {scale!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"{path}: adapter_name must be a non-empty string (the adapter's name in the pipeline), "
                         f"got {adapter_name!r}")
    tensors, metadata = read_safetensors(path)
    if is_direct_distill_file(metadata):
        if preset is not None:
            raise ValueError(f"{path}: a Direct Distill student's file says how it samples; preset= is for "
                             "few-step LoRAs from elsewhere")
        return _load_own_student(pipe, path, adapter_name, scale)
    return _load_preset_lora(pipe, path, tensors, metadata, preset, adapter_name, scale)


def _load_own_student(pipe, path, adapter_name: str, scale: float) -> StudentInfo:
    lora, info = read_student(path)
    problems = unet_mismatches(info, lora, pipe.unet)
    if problems:
        raise ValueError(f"{path}: this student was made for another UNet: " + "; ".join(problems))
    predicts = model_prediction_type(pipe.scheduler.config)
    if predicts != info.teacher_prediction_type:
        raise ValueError(f"{path}: the student was distilled from a model predicting {info.teacher_prediction_type}, "
                         f"this pipeline's scheduler predicts {predicts}: it was distilled from another model")
    if info.prediction_type != info.teacher_prediction_type and scale != 1.0:
        raise ValueError(f"{path}: this student's output is read as {info.prediction_type} where its model predicts "
                         f"{info.teacher_prediction_type}: at scale {scale:g} the output would be part one, part the "
                         "other; use scale 1")
    _check_adapter_name(pipe, path, adapter_name)
    _check_unfused(pipe, path)
    _check_lora_enabled(pipe, path)
    try:
        scheduler = StudentScheduler.from_config(
            pipe.scheduler.config, nfe_schedules={str(k): v for k, v in info.nfe_schedules.items()},
            default_nfe=info.default_nfe, pipeline_default_steps=_default_steps(pipe),
            prediction_type=info.prediction_type, teacher_prediction_type=info.teacher_prediction_type,
            solver_order=info.solver_order)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

    active = _adapters_kept_on(pipe)
    with _quiet_text_encoder_notice():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    _activate(pipe, [*active, adapter_name])
    _hand_over(pipe, scheduler, adapter_name, scale)
    return info


def _load_preset_lora(pipe, path, tensors, metadata, preset_name, adapter_name: str, scale: float) -> FewStepPreset:
    family = unet_family(name for name, _ in pipe.unet.named_parameters())
    preset, layers = preset_and_layers(str(path), tensors, metadata, preset_name, family, how_to_choose="pass preset=",
                                       model="this pipeline's UNet")
    resolved, problems = resolve_layers(layers, _lora_targets(pipe))
    if problems:
        raise ValueError(f"{path}: this LoRA does not fit this pipeline: " + "; ".join(problems))
    _check_adapter_name(pipe, path, adapter_name)
    _check_unfused(pipe, path)
    _check_lora_enabled(pipe, path)
    scheduler = preset_scheduler(preset, pipe.scheduler.config, _default_steps(pipe))

    state = kohya_state_dict(resolved, two_text_encoders=getattr(pipe, "text_encoder_2", None) is not None)
    active = _adapters_kept_on(pipe)
    with _quiet_text_encoder_notice():
        pipe.load_lora_weights(state, adapter_name=adapter_name)
    _activate(pipe, [*active, adapter_name])
    applied = sum(_adapted_layers(getattr(pipe, component, None), adapter_name)
                  for component in ("unet", "text_encoder", "text_encoder_2"))
    if applied != len(resolved):
        pipe.delete_adapters(adapter_name)
        raise ValueError(f"{path}: diffusers applied {applied} of the LoRA's {len(resolved)} layers; nothing was kept")
    _hand_over(pipe, scheduler, adapter_name, scale)
    return preset


def _hand_over(pipe, scheduler, adapter_name: str, scale: float) -> None:
    """The loaded few-step LoRA at ``scale``, and the pipeline on its scheduler, tied to its adapter."""
    if scale != 1.0:
        _set_adapter_scale(pipe, adapter_name, scale)
    scheduler.follow_adapter(pipe.unet, adapter_name)
    pipe.scheduler = scheduler
    _few_step_adapters(pipe).add(adapter_name)


def _lora_targets(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {Linear/Conv2d module name: weight shape}} of the pipeline's UNet and text encoders."""
    targets = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        layers = {}
        for name, module in model.named_modules():
            parts = name.split(".")
            if any(part.startswith("lora_") for part in parts) or parts[-1] == "base_layer":
                continue
            module = getattr(module, "base_layer", module)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[name] = tuple(module.weight.shape)
        targets[component] = layers
    return targets


def _adapted_layers(model, adapter_name: str) -> int:
    if model is None:
        return 0
    return sum(1 for m in model.modules() if adapter_name in (getattr(m, "lora_A", None) or {}))


def _few_step_adapters(pipe) -> set[str]:
    """The names of the few-step LoRAs loaded here. Kept on the UNet: pipelines built from ``pipe.components``
    share it, and its adapters."""
    return pipe.unet.__dict__.setdefault(FEW_STEP_ADAPTERS, set())


def _adapters_kept_on(pipe) -> list[str]:
    """The active adapters that stay on beside a new few-step LoRA: the user's (a style LoRA), not a few-step LoRA
    loaded here before. Two at once would sample as neither (an x0 student beside an epsilon LoRA reads part of
    the output as one, part as the other; LCM beside Hyper-SD follows one's schedule with both changing the
    output), so the new one replaces the earlier ones, which stay loaded."""
    earlier = _few_step_adapters(pipe)
    return [name for name in _active_adapters(pipe) if name not in earlier]


def _check_unfused(pipe, path) -> None:
    """Refuse a UNet whose attention projections are fused (``pipe.fuse_qkv_projections()``): its attention runs
    the fused to_qkv weights, so a LoRA's to_q / to_k / to_v layers would load and change nothing."""
    processors = getattr(bare_unet(pipe.unet), "attn_processors", {}).values()  # unfusing leaves the flag set
    if any(type(p).__name__.startswith("Fused") for p in processors):
        raise ValueError(f"{path}: the pipeline's attention projections are fused (pipe.fuse_qkv_projections()): "
                         "the LoRA's to_q/to_k/to_v layers would not apply; call pipe.unfuse_qkv_projections() "
                         "first")


def _check_lora_enabled(pipe, path) -> None:
    """Refuse to load under ``pipe.disable_lora()``: diffusers would leave the new LoRA off on the layers the
    disabled ones share and on elsewhere, a student applied in part."""
    disabled = sum(1 for module in _tuner_layers(pipe) if module.disable_adapters)
    if disabled:
        raise ValueError(f"{path}: the pipeline's LoRAs are disabled (pipe.disable_lora(), {disabled} layers): a "
                         "LoRA loaded now would be applied on some layers only; call pipe.enable_lora() or delete "
                         "them (pipe.delete_adapters) first")


def _check_adapter_name(pipe, path, adapter_name: str) -> None:
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if adapter_name in (getattr(getattr(pipe, component, None), "peft_config", None) or {}):
            raise ValueError(f"{path}: the pipeline's {component} already has an adapter named {adapter_name!r}; "
                             "pass another adapter_name or delete it first (pipe.delete_adapters)")


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


def _tuner_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        yield from (m for m in (model.modules() if model is not None else ()) if isinstance(m, BaseTunerLayer))


def _active_adapters(pipe) -> list[str]:
    """The adapters active in the pipeline (a style LoRA the user loaded), in the order first met."""
    names = {}
    for module in _tuner_layers(pipe):
        names.update(dict.fromkeys(module.active_adapters))
    return list(names)


def _activate(pipe, names: list[str]) -> None:
    """Keep the user's adapters on beside the one just loaded: diffusers' ``load_lora_weights`` leaves only the new
    one active. Their scales stay as the user set them (``pipe.set_adapters`` would reset them)."""
    for module in _tuner_layers(pipe):
        module.set_adapter([n for n in names if n in module.scaling])


def _set_adapter_scale(pipe, adapter_name: str, scale: float) -> None:
    # What pipe.set_adapters does per layer, without re-weighting or deactivating the user's other adapters.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for module in model.modules() if model is not None else ():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
                module.set_scale(adapter_name, scale)
