"""Few-step LoRAs published by others (LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, DMD2, PCM): one table of how each
is sampled, as its model card or paper gives it, and the timesteps and sigmas that follow from it."""

from __future__ import annotations

import dataclasses
import math

import torch

from .grids import trailing_timesteps

SAMPLERS = ("lcm", "tcd", "euler", "ddim")
SPACINGS = ("trailing", "lcm", "fixed")
TRAIN_TIMESTEPS = 1000
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's and TCDScheduler's original_inference_steps (the distillation's DDIM grid)


@dataclasses.dataclass(frozen=True)
class FewStepPreset:
    """How a published few-step LoRA is sampled.

    Args:
        name: the preset's name (what ``load_student(preset=...)``, the ComfyUI node and ``stamp`` take).
        family: the base model it was distilled from: "sd15" (SD1.x) or "sdxl".
        nfes: the step counts it may be sampled with; ``default_nfe`` is the published one.
        sampler: "lcm" (LCMScheduler / ComfyUI's lcm), "tcd" (TCDScheduler / this package's TCD sampler),
            "euler" (EulerDiscreteScheduler / euler) or "ddim" (DDIMScheduler / ddim, ComfyUI's Euler step).
        spacing: how the timesteps are placed: "trailing" (diffusers' ``timestep_spacing="trailing"``),
            "lcm" (LCM's and TCD's own: n of the 50 steps of the distillation grid) or "fixed" (``fixed_timesteps``).
        guidance: recommended classifier-free guidance, 1.0 for none (diffusers' ``guidance_scale``, ComfyUI's cfg;
            a card's ``guidance_scale=0`` is 1.0 here, both meaning no guidance).
        guidance_range: the range the source recommends; ``guidance`` lies in it.
        source: where the settings come from (model card, paper).
        fixed_timesteps: the training timesteps of a "fixed" spacing, in sampling order.
        gamma: TCD's gamma, the stochasticity of each step (diffusers' ``eta``); 0 for other samplers.
    """

    name: str
    family: str
    nfes: tuple[int, ...]
    default_nfe: int
    sampler: str
    spacing: str
    guidance: float
    guidance_range: tuple[float, float]
    source: str
    fixed_timesteps: tuple[int, ...] = ()
    gamma: float = 0.0

    def __post_init__(self):
        if self.family not in ("sd15", "sdxl") or self.sampler not in SAMPLERS or self.spacing not in SPACINGS:
            raise ValueError(f"preset {self.name}: family, sampler or spacing not known")
        if self.default_nfe not in self.nfes or (self.spacing == "fixed") != bool(self.fixed_timesteps):
            raise ValueError(f"preset {self.name}: default_nfe must be one of nfes; fixed spacing needs its timesteps")
        if self.spacing == "fixed" and self.nfes != (len(self.fixed_timesteps),):
            raise ValueError(f"preset {self.name}: a fixed spacing has one step count, that of its timesteps")
        lo, hi = self.guidance_range
        if not lo <= self.guidance <= hi or not 0 <= self.gamma <= 1:
            raise ValueError(f"preset {self.name}: guidance outside its range, or gamma outside [0, 1]")

    def timesteps(self, nfe: int | None = None) -> list[int]:
        """The integer training timesteps of an ``nfe``-step run (the default if None), in sampling order."""
        n = self.default_nfe if nfe is None else nfe
        if n not in self.nfes:
            raise ValueError(f"preset {self.name} samples with {describe_nfes(self.nfes)} steps "
                             f"(default {self.default_nfe}), not {nfe}")
        if self.spacing == "fixed":
            return list(self.fixed_timesteps)
        if self.spacing == "trailing":
            return trailing_timesteps(n)
        return lcm_timesteps(n)

    def sigmas(self, nfe: int | None, table: torch.Tensor) -> torch.Tensor:
        """VE sigmas of those timesteps in the model's noise table (ascending per-timestep sigmas), then 0."""
        table = torch.as_tensor(table).detach().to("cpu", torch.float64)
        return torch.cat([table[torch.tensor(self.timesteps(nfe))], table.new_zeros(1)])


def lcm_timesteps(n: int, original_steps: int = LCM_ORIGINAL_STEPS, train_timesteps: int = TRAIN_TIMESTEPS
                  ) -> list[int]:
    """LCM's skipping-step schedule (Luo et al. 2023, §4.3; the one LCMScheduler and TCDScheduler use): the
    distillation's grid of ``original_steps`` DDIM timesteps k c - 1 (c = T / original_steps), descending, of which
    every (original_steps / n)-th is taken, the index rounded down."""
    _check_nfe(n, original_steps)
    step = train_timesteps // original_steps
    grid = [(k + 1) * step - 1 for k in reversed(range(original_steps))]
    return [grid[math.floor(i * original_steps / n)] for i in range(n)]


def describe_nfes(nfes: tuple[int, ...]) -> str:
    """"4 to 50" for a run of consecutive step counts, else "2, 4, 8"."""
    if len(nfes) > 2 and list(nfes) == list(range(nfes[0], nfes[-1] + 1)):
        return f"{nfes[0]} to {nfes[-1]}"
    return ", ".join(map(str, nfes))


def presets_for(family: str | None = None) -> list[FewStepPreset]:
    """The presets of a family ("sd15" or "sdxl"), or all of them, in table order."""
    return [p for p in PRESETS.values() if family in (None, p.family)]


def get_preset(name: str, family: str | None = None) -> FewStepPreset:
    """The preset called ``name``; one ValueError listing the presets (of ``family``) for any other name."""
    if name in PRESETS and family in (None, PRESETS[name].family):
        return PRESETS[name]
    known = presets_for(family)
    what = f"{PRESETS[name].family} preset" if name in PRESETS else "no preset"
    raise ValueError(f"{name!r} is {what}; presets{' for ' + family if family else ''}: "
                     + ", ".join(p.name for p in known))


def _check_nfe(n: int, most: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise ValueError(f"number of steps must be an integer in [1, {most}], got {n!r}")


_LCM_CARD = "https://huggingface.co/latent-consistency/lcm-lora-{}, arXiv:2311.05556"
_TCD_CARD = ("https://huggingface.co/h1t/TCD-{}-LoRA; diffusers' TCD-LoRA guide "
             "(docs/source/en/using-diffusers/inference_with_tcd_lora.md), arXiv:2402.19159")
_HYPER_CARD = "https://huggingface.co/ByteDance/Hyper-SD (model card: {}), arXiv:2404.13686"
_LIGHTNING_CARD = "https://huggingface.co/ByteDance/SDXL-Lightning (model card), arXiv:2402.13929"
_DMD2_CARD = "https://huggingface.co/tianweiy/DMD2 (model card, 4-step LoRA), arXiv:2405.14867"
_PCM_CARD = "https://huggingface.co/wangfuyun/PCM_Weights (model card: {}), arXiv:2405.18407"


def _table() -> dict[str, FewStepPreset]:
    rows = []
    for family, card in (("sd15", "sdv1-5"), ("sdxl", "sdxl")):
        # "2 to 8 steps ... either disable guidance_scale or use values between 1.0 and 2.0"
        rows.append(FewStepPreset(f"lcm-{family}", family, tuple(range(2, 9)), 4, "lcm", "lcm", 1.0, (1.0, 2.0),
                                  _LCM_CARD.format(card)))
    for family, card in (("sd15", "SD15"), ("sdxl", "SDXL")):
        # "keep num_inference_steps between 4 and 50"; guidance_scale=0; "eta ... 0.3 is recommended". 50 itself is
        # left out: it is what a diffusers pipeline asks when its caller names no count, the preset's default then.
        rows.append(FewStepPreset(f"tcd-{family}", family, tuple(range(4, 50)), 4, "tcd", "lcm", 1.0, (1.0, 1.0),
                                  _TCD_CARD.format(card), gamma=0.3))
    for family, prefix in (("sd15", "Hyper-SD15"), ("sdxl", "Hyper-SDXL")):
        # the unified 1-step LoRA ("support 1 to 8 steps"): TCDScheduler at its own timesteps (t = 999 for one
        # step), eta=1.0 ("lower eta ... for multi-steps"), guidance_scale=0. The card's t = 800 belongs to the
        # 1-step SDXL UNet, a full checkpoint, not to this LoRA.
        rows.append(FewStepPreset(f"hyper-{family}-1step", family, tuple(range(1, 9)), 1, "tcd", "lcm", 1.0,
                                  (1.0, 1.0), _HYPER_CARD.format(f"{prefix}-1step-lora"), gamma=1.0))
        for n in (2, 4, 8):  # DDIMScheduler, timestep_spacing="trailing", guidance_scale=0
            rows.append(FewStepPreset(f"hyper-{family}-{n}step", family, (n,), n, "ddim", "trailing", 1.0, (1.0, 1.0),
                                      _HYPER_CARD.format(f"{prefix}-{n}steps-lora")))
        for n in (8, 12):  # CFG-preserved: the same DDIM, "support 5~8 guidance scales"
            rows.append(FewStepPreset(f"hyper-{family}-{n}step-cfg", family, (n,), n, "ddim", "trailing", 5.0,
                                      (5.0, 8.0), _HYPER_CARD.format(f"{prefix}-{n}steps-CFG-lora")))
    for n in (2, 4, 8):  # EulerDiscreteScheduler, timestep_spacing="trailing", guidance_scale=0
        rows.append(FewStepPreset(f"sdxl-lightning-{n}step", "sdxl", (n,), n, "euler", "trailing", 1.0, (1.0, 1.0),
                                  _LIGHTNING_CARD))
    # LCMScheduler with the timesteps the LoRA was trained at, timesteps=[999, 749, 499, 249]; guidance_scale=0
    rows.append(FewStepPreset("dmd2-sdxl-4step", "sdxl", (4,), 4, "lcm", "fixed", 1.0, (1.0, 1.0), _DMD2_CARD,
                              fixed_timesteps=(999, 749, 499, 249)))
    for family in ("sd15", "sdxl"):
        # DDIM (trailing, clip_sample=False, set_alpha_to_one=False) or Euler; the step count is in the file name.
        # smallcfg: "CFG value 1-2"; normalcfg: "CFG value 2-9 ... 2.5 - 3.5 with 4 steps and 3 - 6 with 8 steps"
        for n in (2, 4, 8, 16):
            rows.append(FewStepPreset(f"pcm-{family}-smallcfg-{n}step", family, (n,), n, "ddim", "trailing", 1.0,
                                      (1.0, 2.0), _PCM_CARD.format(f"pcm_{family}_smallcfg_{n}step_converted")))
        for n, guidance, span in ((4, 3.0, (2.5, 3.5)), (8, 4.5, (3.0, 6.0)), (16, 5.0, (2.0, 9.0))):
            rows.append(FewStepPreset(f"pcm-{family}-normalcfg-{n}step", family, (n,), n, "ddim", "trailing",
                                      guidance, span, _PCM_CARD.format(f"pcm_{family}_normalcfg_{n}step_converted")))
    return {p.name: p for p in rows}


PRESETS: dict[str, FewStepPreset] = _table()
