"""LoRA students on a teacher pipeline's UNet: the peft adapters, teacher and student calls in x0/eps form, and
the one writer of student files (``models.student_file.save_student``).

Every LoRA method (progressive, sfd, gdd, disback) builds a :class:`LoraStudent` on the teacher pipeline,
hands ``student.adapters`` to the training loop (only the adapter weights are trained and checkpointed)
and ends with ``student.write(...)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.student_file import StudentInfo, save_student, unet_architecture, unet_fingerprint
from ..schedulers.grids import student_schedules
from ..schedulers.noise import alphas_cumprod_from_config
from ..schedulers.prediction import PREDICTION_TYPES, split_prediction
from .config import LoraSpec, SettingError

STUDENT = "student"


def add_lora(unet, spec: LoraSpec, adapter_name: str = STUDENT) -> LoraAdapters:
    """Add a LoRA adapter to a diffusers UNet and freeze everything else; returns its weights as a module.

    The adapter starts as peft initialises it (B = 0), so the adapted UNet is the bare UNet until trained.
    Adapter weights are kept in float32 whatever the UNet's dtype (peft casts inputs to them).
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # peft warns whenever a second adapter is added: here that is the plan
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha,
                                        target_modules=list(spec.target_modules)), adapter_name=adapter_name)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise SettingError("target_modules", f"{list(spec.target_modules)} do not fit this UNet: {err}") from None
    adapters = LoraAdapters(unet, adapter_name).float()
    adapters.requires_grad_(True)
    return adapters


class LoraAdapters(torch.nn.Module):
    """The lora_A / lora_B layers of one adapter of a UNet, gathered as a module of their own.

    They are the very layers inside the UNet (shared, not copied): what the training loop trains, moves and
    checkpoints, while the UNet's own weights stay out of the checkpoint.
    """

    def __init__(self, unet, adapter_name: str):
        super().__init__()
        self.adapter_name = adapter_name
        self.layers = torch.nn.ModuleDict()
        for name, module in _tuner_layers(unet):
            if adapter_name in getattr(module, "lora_A", {}):
                self.layers[name.replace(".", "-")] = torch.nn.ModuleDict(
                    {"A": module.lora_A[adapter_name], "B": module.lora_B[adapter_name]})
        if not self.layers:
            raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")


@contextmanager
def active_adapter(unet, name: str | None, layers: Sequence[torch.nn.Module] | None = None):
    """Run ``unet`` with only adapter ``name`` applied (``None``: the bare teacher UNet); restores the active
    adapters, their enabled state and every ``requires_grad`` flag afterwards (peft's switches change them).
    ``layers``: the UNet's peft layers, if the caller keeps them (finding them walks the whole UNet)."""
    layers = [module for _, module in _tuner_layers(unet)] if layers is None else layers
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    saved = [(m, list(m.active_adapters), m.disable_adapters) for m in layers]
    try:
        for m in layers:
            if name is None:
                m.enable_adapters(False)
            else:
                m.enable_adapters(True)
                m.set_adapter([name])
        yield unet
    finally:
        for m, names, disabled in saved:
            m.set_adapter(names)
            m.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def copy_adapter(unet, source: str, target: str) -> None:
    """Copy the weights of adapter ``source`` into adapter ``target`` (same rank and target modules)."""
    copied = 0
    for _, module in _tuner_layers(unet):
        if source in getattr(module, "lora_A", {}):
            for half in (module.lora_A, module.lora_B):
                half[target].weight.copy_(half[source].weight)
            copied += 1
    if not copied:
        raise ValueError(f"the UNet has no LoRA adapter named {source!r}")


def lora_state_dict(unet, adapter_name: str = STUDENT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One adapter's weights, peft-style (``<module>.lora_A.weight`` / ``.lora_B.weight``), as ``dtype`` on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def write_student(path: str | os.PathLike, unet, *, adapter_name: str = STUDENT, scheduler_config,
                  method: str, teacher: str, nfe_timesteps: dict[int, Sequence[int]], default_nfe: int,
                  comfy_sampler: str, guidance: float, prediction_type: str | None = None,
                  extra: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter ``adapter_name`` of ``unet`` as a student file: the one LoRA writer of every method.

    Args:
        path: the ``.safetensors`` file (written atomically).
        unet: the teacher UNet carrying the adapter.
        scheduler_config: the teacher's scheduler config (its noise table gives each timestep's sigma).
        method, teacher: recorded as they are.
        nfe_timesteps: ``{n: [n integer timesteps, noisiest first]}`` the student was trained to sample at.
        default_nfe: the NFE used when none is asked for.
        comfy_sampler: the sampler whose update the student was trained for ("ddim"/"euler": first order).
        guidance: recommended classifier-free guidance.
        prediction_type: what the adapted UNet predicts (default: the scheduler config's, the teacher's, which
            is recorded as ``teacher_prediction_type``).
        extra: further JSON-serialisable facts (training settings, losses, ...).
        dtype: the stored weights' dtype (the loaders cast them to the model's).
    """
    config = unet.peft_config[adapter_name]
    teacher_predicts = _get(scheduler_config, "prediction_type", "epsilon")
    info = StudentInfo(
        method=method, teacher=teacher, teacher_unet_fingerprint=unet_fingerprint(unet),
        teacher_unet_config=unet_architecture(unet), teacher_prediction_type=teacher_predicts,
        prediction_type=prediction_type or teacher_predicts,
        nfe_schedules=student_schedules(nfe_timesteps, alphas_cumprod_from_config(scheduler_config)),
        default_nfe=default_nfe, comfy_sampler=comfy_sampler, guidance=guidance, extra=extra or {})
    return save_student(path, lora_state_dict(unet, adapter_name, dtype), rank=config.r, alpha=float(config.lora_alpha),
                        metadata=info)


# --- the student on its teacher ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioning:
    """What a batch's UNet calls are conditioned on: the text encoder's hidden states and, for an SDXL-style UNet
    (``addition_embed_type="text_time"``), the pooled text embeddings its added embedding takes (with the size and
    crop ids, which :meth:`LoraStudent.unet_output` makes from the latents' size)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.context)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        pooled = [p.pooled for p in parts]
        return Conditioning(torch.cat([p.context for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled))


class LoraStudent:
    """A teacher pipeline's UNet carrying the trainable adapter ``"student"`` (and any frozen ones).

    ``adapters`` is what a method hands the loop as its module. ``denoise(z, t, cond, adapter)`` runs the UNet
    with one adapter (or none: the teacher) at integer timesteps and returns ``(x0, eps)`` in the VP
    parameterisation ``z = a_t x0 + s_t eps``, whatever the UNet predicts. ``t = -1`` is the clean end.

    Args:
        pipe: an SD1.x/2.x- or SDXL-style diffusers pipeline (a UNet conditioned on text embeddings, SDXL's also on
            the pooled embedding and size ids; a discrete VP noise schedule; ``encode_prompt``).
        spec: the student LoRA's shape.
        frozen_adapters: names of further adapters of the same shape, frozen (e.g. a previous round's teacher).
        student_prediction: what the UNet's output means with the student adapter on (``denoise`` reads it so,
            ``write`` records it); default the teacher's ``prediction_type``, which every other adapter keeps
            but a frozen copy of the student (:meth:`freeze_student_as`).
    """

    def __init__(self, pipe, spec: LoraSpec, frozen_adapters: Iterable[str] = (),
                 student_prediction: str | None = None):
        unet = pipe.unet
        added = unet.config.get("addition_embed_type")
        if added not in (None, "text_time") or unet.config.get("class_embed_type"):
            raise ValueError("LoRA distillation supports UNets conditioned on text embeddings (SD1.x/2.x) and on "
                             f"SDXL's pooled text and size ids; this one also takes {added or 'class labels'}")
        self.text_time = added == "text_time"
        # SDXL's pipelines condition the unconditional branch on zeros, not on the encoded empty prompt
        self.zero_empty_prompt = self.text_time and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        if getattr(unet, "peft_config", None):
            raise ValueError(f"the teacher UNet already carries adapters {sorted(unet.peft_config)}; distil from "
                             "a bare teacher")
        self.pipe, self.unet, self.spec = pipe, unet, spec
        self.scheduler_config = dict(pipe.scheduler.config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"teacher prediction type {self.prediction_type!r} is not a discrete VP parameterisation")
        self.student_prediction = student_prediction or self.prediction_type
        if self.student_prediction not in PREDICTION_TYPES:
            raise ValueError(f"student prediction {self.student_prediction!r}: choose one of {PREDICTION_TYPES}")
        self._readings = {STUDENT: self.student_prediction}  # adapter -> its output's meaning; others: the teacher's
        alphas_cumprod = alphas_cumprod_from_config(self.scheduler_config)
        if self.student_prediction == "epsilon" and self.scheduler_config.get("rescale_betas_zero_snr"):
            # abar at the noisiest step is 2^-24 there: the clean latent multiplies epsilon's error by 4096
            raise ValueError("the teacher's noise schedule ends at zero signal (rescale_betas_zero_snr): a student "
                             "reading its output as epsilon cannot give a clean latent from its noisiest step; read "
                             "it as v_prediction or sample (--student-prediction)")
        # index t + 1: entry 0 is the clean end (abar = 1), entries 1.. the training timesteps 0..T-1
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod]).float()
        self.num_train_timesteps = len(alphas_cumprod)
        for name in frozen_adapters:
            add_lora(unet, spec, name).requires_grad_(False)
        self.adapters = add_lora(unet, spec, STUDENT)
        self.unet.set_adapter(STUDENT)
        self.unet.eval()
        self._layers = [module for _, module in _tuner_layers(unet)]
        self._embeddings: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device) -> LoraStudent:
        """Move the UNet (adapters included) and the text encoders; the VAE is not used here."""
        self.unet.to(device)
        self.adapters.float()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).to(device)
        self._embeddings.clear()
        return self

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` of integer timesteps ``t`` (``-1``: 1 and 0), shaped to broadcast over latents."""
        abar = self._abar.to(self.device)[torch.as_tensor(t, device=self.device).long() + 1].reshape(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of ``prompts`` as the pipeline computes it (float32, on the UNet's device), each distinct
        prompt encoded once; the empty prompt is SDXL's zeros where its pipeline uses them."""
        missing = sorted(set(prompts) - self._embeddings.keys())
        if missing:
            if len(self._embeddings) + len(missing) > 4096:  # captioned data: keep the cache bounded
                self._embeddings.clear()
            encoded = self.pipe.encode_prompt(prompt=missing, device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
            context = encoded[0].float()
            pooled = encoded[2].float() if self.text_time else [None] * len(missing)
            for prompt, c, p in zip(missing, context, pooled):
                if prompt == "" and self.zero_empty_prompt:
                    c, p = torch.zeros_like(c), torch.zeros_like(p)
                self._embeddings[prompt] = (c, p)
        context = torch.stack([self._embeddings[p][0] for p in prompts]).to(self.device)
        pooled = torch.stack([self._embeddings[p][1] for p in prompts]).to(self.device) if self.text_time else None
        return Conditioning(context, pooled)

    def denoise(self, z: torch.Tensor, t: torch.Tensor | int, cond: Conditioning, adapter: str | None = STUDENT,
                guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` from the UNet at integer timestep(s) ``t >= 0`` with adapter ``adapter`` alone (and
        classifier-free ``guidance``, see :meth:`unet_output`), its output read as ``student_prediction`` with
        the student adapter and its frozen copies, else as the teacher's ``prediction_type``."""
        t = torch.as_tensor(t, device=z.device).long().expand(z.shape[0])
        a, s = self.alpha_sigma(t)
        predicts = self._readings.get(adapter, self.prediction_type)
        return split_prediction(self.unet_output(z, t, cond, adapter, guidance), z.float(), a, s, predicts)

    def unet_output(self, z: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                    adapter: str | None = STUDENT, guidance: float = 1.0) -> torch.Tensor:
        """The UNet's own output (float32) at integer timestep(s) ``t >= 0`` with adapter ``adapter`` alone.

        ``guidance`` other than 1 applies classifier-free guidance against the empty prompt, as the pipelines do
        (``uncond + guidance (cond - uncond)`` on the output, one batched call). An SDXL UNet gets the size ids its
        pipeline gives an image of the latents' size, uncropped: ``(h, w, 0, 0, h, w)``."""
        t = torch.as_tensor(t, device=z.device).long().expand(z.shape[0])
        if int(t.min()) < 0:
            raise ValueError("the UNet is not called at the clean end (t = -1)")
        if guidance != 1.0:
            z, t, cond = torch.cat([z, z]), torch.cat([t, t]), Conditioning.cat([self.embed([""] * len(z)), cond])
        dtype = self.unet.dtype
        added = None
        if self.text_time:
            h, w = (self.vae_scale_factor * d for d in z.shape[-2:])
            ids = torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=z.device).expand(len(z), 6)
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": ids}
        with active_adapter(self.unet, adapter, self._layers):
            out = self.unet(z.to(dtype), t, encoder_hidden_states=cond.context.to(dtype),
                            added_cond_kwargs=added).sample.float()
        if guidance == 1.0:
            return out
        uncond, conditional = out.chunk(2)
        return uncond + guidance * (conditional - uncond)

    def freeze_student_as(self, adapter: str) -> None:
        """Copy the student's weights into the frozen adapter ``adapter``, which from then on reads its output as
        the student does (a previous round's student as the teacher of the next)."""
        copy_adapter(self.unet, STUDENT, adapter)
        self._readings[adapter] = self.student_prediction

    def ddim_step(self, z: torch.Tensor, t, t_next, cond: Conditioning, adapter: str | None = STUDENT,
                  guidance: float = 1.0):
        """One deterministic DDIM step from ``t`` to ``t_next`` (``-1``: to the clean latent): the update of the
        first-order samplers (diffusers' DDIM / DPM-Solver++ order 1, ComfyUI's euler and ddim)."""
        x0, eps = self.denoise(z, t, cond, adapter, guidance)
        a, s = self.alpha_sigma(t_next)
        return a * x0 + s * eps

    def write(self, path: str | os.PathLike, **info) -> Path:
        """``write_student`` of the student adapter with the teacher's scheduler config and the student's
        prediction type, stored as the spec's ``save_dtype``."""
        return write_student(path, self.unet, adapter_name=STUDENT, scheduler_config=self.scheduler_config,
                             prediction_type=self.student_prediction, dtype=getattr(torch, self.spec.save_dtype),
                             **info)


def _tuner_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def _get(config, key, default):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
