"""What the schedulers that pin a LoRA's own step counts share: an image-to-image run that sliced steps the
scheduler does not run is stopped with one clear error instead of sampling nothing."""

from __future__ import annotations

import weakref


class ImageToImageGuard:
    """Mixin for a diffusers scheduler whose ``set_timesteps(n)`` may run another step count than the ``n`` asked
    (a pipeline's own default 50 read as "the LoRA's default", say 4).

    diffusers' image-to-image pipelines keep ``strength``'s share of the steps they *asked* for: from 50 asked at
    strength 0.5 they start at step 25, past the end of 4, and would return the noised input image without a single
    denoising step; at strength 0.95 they start at step 3 of the 4 run, one step where 3.8 were meant.
    ``set_begin_index`` (which they call with that start) therefore refuses any start but 0 when the steps asked
    are not the steps run; with ``num_inference_steps`` among the ones run, any start passes (SDXL's
    ``denoising_start`` included). Subclasses call :meth:`_record_steps` in ``set_timesteps`` and name their step
    counts in :meth:`_steps_hint`.
    """

    _asked_steps: int | None = None

    def _record_steps(self, asked: int | None) -> None:
        self._asked_steps = asked

    def _steps_hint(self) -> str:
        raise NotImplementedError

    def set_begin_index(self, begin_index: int = 0):
        run = len(self.timesteps) if getattr(self, "timesteps", None) is not None else None
        if run is not None and begin_index > 0 and self._asked_steps not in (None, run):
            left = "nothing would be denoised" if begin_index >= run else \
                f"{run - begin_index} of them would run, not the share of {run} the strength asks"
            raise ValueError(
                f"an image-to-image run (strength or denoising_start) sliced off the first {begin_index} of "
                f"{self._asked_steps} steps, but this scheduler samples {run}: {left}. Pass num_inference_steps (one "
                f"of {self._steps_hint()}) with strength or denoising_start; the run then keeps its share of them")
        parent = getattr(super(), "set_begin_index", None)
        if parent is not None:
            return parent(begin_index)
        self._begin_index = begin_index  # DDIM has no begin index of its own: its step needs none


# where load_student keeps, on a UNet, the names of the few-step LoRAs it loaded (pipelines sharing it share them)
FEW_STEP_ADAPTERS = "_direct_distill_few_step_adapters"
# where FollowsAdapter keeps, on a UNet, the adapters only strength 1 samples: {name: (what it predicts, the model)}
FULL_STRENGTH_ADAPTERS = "_direct_distill_full_strength_adapters"


def _active_adapters(unet) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters
            for n in m.active_adapters}


def _refuse_scaled_call(unet, args, kwargs):
    """UNet forward pre-hook: diffusers scales every LoRA by ``cross_attention_kwargs["scale"]`` for the call (the
    pipelines pass their own ``cross_attention_kwargs`` on), which a student read as x0 or v does not survive."""
    scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale", 1.0)
    if scale == 1:
        return None
    held = unet.__dict__.get(FULL_STRENGTH_ADAPTERS, {})
    hit = sorted(set(held) & _active_adapters(unet))
    if hit:
        predicts, model = held[hit[0]]
        raise ValueError(f"cross_attention_kwargs scale {scale:g} would run the student {hit[0]!r} at that strength, "
                         f"but its scheduler reads the UNet's output as {predicts}, which the student gives at "
                         f"strength 1 only (the model predicts {model}): leave the 'scale' key out")
    return None


class FollowsAdapter:
    """Mixin for the scheduler ``load_student`` gives a few-step LoRA: tied to that LoRA's adapter on the UNet
    (:meth:`follow_adapter`), ``set_timesteps`` refuses to sample once another few-step LoRA replaced it there,
    loaded through a pipeline that shares the UNet (this pipeline's scheduler would run the other LoRA on its
    schedule). A scheduler whose output reading differs from the model's (``_reads_other_prediction``: an x0 or v
    student of an epsilon model) also refuses while its adapter is off, deleted or not at strength 1: it would read
    the model's own output, or a mix, as x0; and the UNet refuses a call that scales the LoRAs for its duration
    (``cross_attention_kwargs={"scale": s}``) while that adapter is active. An epsilon student's scheduler with its
    LoRA merely off, or scaled, still runs (the model on the student's schedule is a fair experiment)."""

    _adapter = None

    def follow_adapter(self, unet, adapter_name: str) -> None:
        self._adapter = (weakref.ref(unet), adapter_name)
        model = self._reads_other_prediction()
        if FULL_STRENGTH_ADAPTERS not in unet.__dict__:
            if model is None:
                return
            unet.register_forward_pre_hook(_refuse_scaled_call, with_kwargs=True)
        held = unet.__dict__.setdefault(FULL_STRENGTH_ADAPTERS, {})
        if model is None:
            held.pop(adapter_name, None)
        else:
            held[adapter_name] = (self.config.prediction_type, model)

    def _reads_other_prediction(self) -> str | None:
        """What the model predicts where this scheduler reads its output as something else; None otherwise."""
        return None

    def _check_adapter(self) -> None:
        unet = self._adapter[0]() if self._adapter is not None else None
        if unet is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        name, tuners = self._adapter[1], [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        layers = [m for m in tuners if name in (getattr(m, "scaling", None) or {})]
        on = bool(layers) and all(not m.disable_adapters and name in m.active_adapters for m in layers)
        active = sorted(_active_adapters(unet))
        replaced = [n for n in active if n != name and n in unet.__dict__.get(FEW_STEP_ADAPTERS, ())]
        if not on and replaced:
            raise ValueError(f"this scheduler samples the few-step LoRA {name!r}, but {', '.join(replaced)} replaced "
                             "it on the UNet (load_student through a pipeline sharing it): use the scheduler "
                             f"load_student gave that pipeline, or load {name!r} again here")
        model = self._reads_other_prediction()
        if model is None:
            return
        full = on and all(abs(m.scaling[name] * m.r[name] / m.lora_alpha[name] - 1) < 1e-6 for m in layers
                          if hasattr(m, "r") and hasattr(m, "lora_alpha"))
        if not full:
            state = "deleted" if not layers else "switched off" if not on else "not at strength 1"
            raise ValueError(f"this StudentScheduler reads the UNet's output as {self.config.prediction_type}, as the "
                             f"student {name!r} was trained to give, but that adapter is {state} (active now: "
                             f"{', '.join(active) or 'none'}) and the model predicts {model}: load the student again "
                             "(load_student) or set the model's scheduler (ExpKarrasScheduler.from_config("
                             "pipe.scheduler.config))")
