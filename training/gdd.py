"""GDD and GDD-I (seed 001: Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"): a one-step
generator initialised from the teacher and trained by a GAN loss against real data alone, with no distillation
or regression loss.

Generator: the teacher UNet plus a LoRA, called once at the noisiest training timestep (t = T - 1 = 999 for SD)
on pure noise with the prompt; its clean-latent prediction is the sample. This is exactly what a 1-step student
file samples with any first-order sampler, in diffusers and in ComfyUI. The output is read as the teacher's
prediction type, or as ``student_prediction``: read as epsilon, x0 = (z - 0.998 eps) / 0.068 at t = 999 on SD's
noise table, and every change of the output reaches the sample 14.6 times larger; read as v, the output is the
sample up to sign (x0 = 0.068 z - 0.998 v). The generator then starts from noise instead of the teacher's blurry
one-call sample, and the GAN builds it from there.

Variants (the paper fine-tunes whole networks; here the trainable part is a LoRA, so the variants differ in
where the LoRA goes):

- ``"gdd-i"``: every convolution stays the teacher's, frozen and without a LoRA; every linear layer gets one
  (attention projections, feed-forward, time-embedding MLP and the resnets' time projections). The paper's
  finding is that a diffusion model is an "innate" one-step generator once its convolutions are kept fixed;
  GDD-I usually beats GDD there.
- ``"gdd"``: the LoRA goes on every linear and every convolution (resnet convs and shortcuts, down/up
  samplers, conv_in/conv_out, 1x1 projections): the whole UNet adapts.

Normalisation layers cannot carry a LoRA and stay the teacher's in both.

Discriminator: no pretrained vision backbone is available offline, so it is built like the paper's projected
discriminator on frozen features: the bare teacher UNet (adapters off) reads the sample noised to a random
timestep in ``disc_timesteps`` with the prompt, forward hooks take the output of every down block and of the mid
block (the forward stops there), and one small trainable conv head per level turns each into a map of logits.

Loss (the paper's code): non-saturating, ``G: softplus(-D(fake))``, ``D: softplus(D(fake)) + softplus(-D(real))``
(or the hinge loss), each summed over the feature levels; the generator is updated first, then the discriminator
on fresh samples of the updated generator. R1 on real latents, ``gamma / 2 * |grad_x D(x)|^2``, is applied lazily
every ``r1_every`` steps with weight ``r1_every`` (StyleGAN2's lazy regularisation, as the paper's code does);
Adam with betas (0, 0.99) and constant learning rates. What is evaluated and written is an exponential moving
average of the generator's weights (``ema_decay``), the usual way to sample a GAN's generator (StyleGAN's code
evaluates its EMA): the generator keeps circling where the two players balance, and its last weights are one
arbitrary point on that circle. In the lab, without it, FD swung between 8.5 and 9.7 from one evaluation to the
next (every 100 steps), and with it stayed within 8.9-9.3 over 1,500 steps (the generator read as epsilon);
``--ema-decay 0`` evaluates and keeps the raw weights instead, whose luckiest swing can score lower.

Real data: latents with prompts (``data.LatentData``): a latents file, or a folder of captioned images encoded by
the teacher's VAE (``data.encode_image_folder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import (LoraSpec, RunConfig, Settings, SettingError, check_warmup, run_config, setting,
                     student_prediction_setting, training_record)
from .data import DataSource, drop_prompts
from .lora import Conditioning, LoraStudent
from .loop import Player, cost_record
from .one_step import BEST_FILE, BestGenerator, EvalConfig, GeneratorEMA, one_step_sample, write_one_step_student
from .runner import Job, MethodEntry, settle

VARIANTS = ("gdd-i", "gdd")
GAN_LOSSES = ("non_saturating", "hinge")


@dataclass
class GDDConfig(Settings):
    """GDD-I by default; ``steps`` updates of the generator and of the discriminator each. The LoRA's targets
    default to the variant's (``run.lora.target_modules`` empty)."""

    run: RunConfig = run_config(lora=dict(target_modules=()), batch_size=32, lr=2e-4, max_grad_norm=None)
    source: DataSource = field(default_factory=DataSource)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    variant: str = setting("gdd-i", choices=VARIANTS,
                           help="gdd-i: every convolution frozen and without LoRA; gdd: LoRA on convolutions too")
    steps: int = setting(1500, ge=1, help="training steps (one update of each player)")
    disc_lr: float = setting(4e-4, gt=0, help="discriminator heads' learning rate (--lr: the generator's)")
    betas: tuple[float, float] = setting((0.0, 0.99), ge=0, lt=1, metavar=("B1", "B2"),
                                         help="Adam betas of both players (the learning rates stay constant)")
    gan_loss: str = setting("non_saturating", choices=GAN_LOSSES, help="the GAN loss")
    r1_gamma: float = setting(1e-4, ge=0, help="R1 weight on real latents (0: none)")
    r1_every: int = setting(16, ge=1, help="lazy R1: applied every this many steps")
    disc_timesteps: tuple[int, int] = setting((0, 250), ge=0, metavar=("LO", "HI"),
                                              help="the discriminator reads samples noised to a timestep uniform "
                                                   "in [LO, HI]")
    disc_hidden: int = setting(64, ge=1, help="channels of each discriminator head")
    p_uncond: float = setting(0.1, ge=0, le=1, help="fraction of empty prompts (real and fake alike)")
    student_prediction: str | None = student_prediction_setting()
    ema_decay: float = setting(0.999, ge=0, lt=1,
                               help="decay of the generator's exponential moving average, which is what is evaluated "
                                    "and written; after n updates it is min(decay, (1+n)/(10+n)), so 0.999 binds "
                                    "only past ~9,000 steps (0: no average, the generator's own weights)")

    def check(self) -> None:
        check_warmup(self, "steps")
        lo, hi = self.disc_timesteps
        if lo > hi:
            raise SettingError("disc_timesteps", f"need LO <= HI, got {list(self.disc_timesteps)}")

    def lora_spec(self, unet) -> LoraSpec:
        """The generator's LoRA on ``unet``: the given targets, or the variant's (see ``gdd_lora_spec``)."""
        return gdd_lora_spec(unet, self.variant, self.run.lora)


@dataclass
class GDDResult:
    path: Path
    variant: str
    losses: dict[str, float]                            # last generator / discriminator loss
    evaluations: list[tuple[int, dict[str, float]]]     # (step, scalars) of the evaluate hook in this run

    def summary(self) -> str:
        return f"{self.variant.upper()} one-step student written to {self.path}"


# --- the variants ------------------------------------------------------------------------------------------


def gdd_lora_targets(unet, variant: str) -> tuple[str, ...]:
    """The UNet modules that get the LoRA: every linear layer (``"gdd-i"``), or every linear and convolution
    (``"gdd"``); full module names, so peft matches each exactly."""
    if variant not in VARIANTS:
        raise ValueError(f"GDD variant must be one of {VARIANTS}, got {variant!r}")
    kinds = (torch.nn.Linear,) if variant == "gdd-i" else (torch.nn.Linear, torch.nn.Conv2d)
    return tuple(name for name, m in unet.named_modules() if type(m) in kinds)


def gdd_lora_spec(unet, variant: str, spec: LoraSpec) -> LoraSpec:
    """``spec`` with the variant's targets if it names none (``target_modules=()``); GDD-I refuses targets that
    are convolutions."""
    targets = tuple(spec.target_modules) or gdd_lora_targets(unet, variant)
    if variant == "gdd-i":
        convs = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
        hit = sorted(c for c in convs if any(c == t or c.endswith("." + t) for t in targets))
        if hit:
            raise SettingError("target_modules", f"GDD-I keeps the convolutions frozen, but the LoRA targets name "
                                                 f"{len(hit)} of them (e.g. {hit[0]}); use variant 'gdd' or other "
                                                 "targets")
    return dataclasses.replace(spec, target_modules=targets)


# --- the discriminator -------------------------------------------------------------------------------------


class _FeaturesTaken(Exception):
    """Raised by the mid-block hook: the discriminator needs nothing after it."""


class TeacherFeatures:
    """The bare teacher UNet's down-block and mid-block outputs (adapters off), taken by forward hooks; the
    UNet's forward stops after the mid block. Frozen: gradients flow through it to its input only."""

    def __init__(self, student: LoraStudent):
        self.student = student
        unet = student.unet
        self.blocks = [*unet.down_blocks] + ([unet.mid_block] if unet.mid_block is not None else [])

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        features: list[torch.Tensor] = []

        def take(module, args, output):
            features.append((output[0] if isinstance(output, tuple) else output).float())
            if module is self.blocks[-1]:
                raise _FeaturesTaken

        handles = [block.register_forward_hook(take) for block in self.blocks]
        try:
            self.student.unet_output(z, t, cond, adapter=None)
        except _FeaturesTaken:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return features


class DiscriminatorHeads(torch.nn.Module):
    """One small conv head per feature level: conv3x3 -> SiLU -> conv1x1 to a map of logits."""

    def __init__(self, channels: Sequence[int], hidden: int = 64):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(c, hidden, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(hidden, 1, 1)) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features)]


def generator_loss(fake: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "non_saturating":
        return sum(F.softplus(-logits).mean() for logits in fake)
    return sum(-logits.mean() for logits in fake)


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "non_saturating":
        return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake))
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake))


# --- the method --------------------------------------------------------------------------------------------


class GDD:
    """The GDD method for the training loop: two players, the generator's LoRA and the discriminator heads."""

    def __init__(self, student: LoraStudent, data: Callable, latent_shape: Sequence[int], config: GDDConfig,
                 evaluation: BestGenerator | None = None):
        if config.disc_timesteps[1] >= student.num_train_timesteps:
            raise SettingError("disc_timesteps", f"must lie below the teacher's {student.num_train_timesteps} "
                                                 f"timesteps, got {list(config.disc_timesteps)}")
        self.student, self.data, self.config, self.evaluation = student, data, config, evaluation
        self.latent_shape = tuple(latent_shape)
        self.features = TeacherFeatures(student)
        with torch.no_grad():  # one probe call: the channels of each level
            probe = self.features(torch.zeros(1, *self.latent_shape, device=student.device),
                                  torch.zeros(1, dtype=torch.long), student.embed([""]))
        self.heads = DiscriminatorHeads([f.shape[1] for f in probe], config.disc_hidden).to(student.device)
        self.modules = {"generator": student.adapters, "discriminator": self.heads}
        if evaluation is not None and evaluation.ema is not None:  # checkpointed with the players
            self.modules["ema"] = evaluation.ema
        self.players = {"generator": Player(("generator",), lr=config.run.lr, betas=config.betas),
                        "discriminator": Player(("discriminator",), lr=config.disc_lr, betas=config.betas)}

    def batch(self, step: int) -> dict:
        real, prompts = self.data(self.config.run.batch_size)
        if tuple(real.shape[1:]) != self.latent_shape:
            raise ValueError(f"data latents have shape {tuple(real.shape[1:])}, the generator makes "
                             f"{self.latent_shape}")
        # The fakes are drawn for the real batch's prompts, so real and fake share one prompt distribution.
        cond = self.student.embed(drop_prompts(prompts, self.config.p_uncond))
        return {"real": real, "cond": cond, "noise": torch.randn(len(real), *self.latent_shape)}

    def discriminate(self, x0: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        """Logit maps of the clean latents ``x0``, read by the teacher at a random timestep of the range."""
        lo, hi = self.config.disc_timesteps
        t = torch.randint(lo, hi + 1, (len(x0),), device=x0.device)
        a, s = self.student.alpha_sigma(t)
        return self.heads(self.features(a * x0 + s * torch.randn_like(x0), t, cond))

    def loss(self, step: int, batch: dict):
        cond, noise, kind = batch["cond"], batch["noise"], self.config.gan_loss
        fake = one_step_sample(self.student, noise, cond)
        yield "generator", generator_loss(self.discriminate(fake, cond), kind)

        with torch.no_grad():  # the updated generator's samples
            fake = one_step_sample(self.student, noise, cond)
        regularise = self.config.r1_gamma > 0 and step % self.config.r1_every == 0
        real = batch["real"].detach().requires_grad_(regularise)
        with _double_backward_attention() if regularise else contextlib.nullcontext():
            real_logits = self.discriminate(real, cond)
            loss = discriminator_loss(real_logits, self.discriminate(fake, cond), kind)
            if regularise:
                grad, = torch.autograd.grad(sum(r.sum() for r in real_logits), real, create_graph=True)
                r1 = grad.square().sum(dim=(1, 2, 3)).mean()
                loss = loss + self.config.r1_every * self.config.r1_gamma / 2 * r1
        yield "discriminator", loss

    def after_step(self, step: int) -> dict[str, float] | None:
        return self.evaluation.after_step(step) if self.evaluation is not None else None


@contextlib.contextmanager
def _double_backward_attention():
    """R1 differentiates the discriminator's input gradient: the fused attention kernels have no second
    derivative, the math one has."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the default kernels on CPU are differentiable twice
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


# --- the run -----------------------------------------------------------------------------------------------


def train_gdd(job: Job, config: GDDConfig) -> GDDResult:
    """Train a one-step GDD / GDD-I student of ``job.pipe`` on the real data latents ``job.data`` and write its
    file to ``job.out`` (NFE 1 at the noisiest timestep, guidance 1).

    With ``job.evaluate`` and ``config.evaluation.eval_every``, the hook is called every that many steps as
    ``evaluate(step, generate)``, ``generate(prompts, seed=0)`` giving the current student's latents; the scalars
    it returns (e.g. an FD) are logged and kept in the result and the file's metadata. With ``keep_best`` the file
    holds the generator of the lowest ``fd`` returned (metadata ``selected``), not the last.
    """
    config = settle(config)
    run, evaluation = config.run, config.evaluation
    spec = config.lora_spec(job.pipe.unet)
    # the heads' initial weights follow from the same seed
    student = job.student(spec, run.seed, student_prediction=config.student_prediction)
    x0, _ = job.data(1)
    best = BestGenerator(student, tuple(x0.shape[1:]), run.batch_size, job.evaluate, evaluation.eval_every,
                         job.stage_dir() / BEST_FILE if job.work is not None else None,
                         job.accelerator.is_main_process,
                         GeneratorEMA(student.adapters, config.ema_decay) if config.ema_decay else None)
    method = GDD(student, job.data, tuple(x0.shape[1:]), config, best)
    result = job.train(method, run, config.steps, config.variant, final_lr_fraction=1.0, betas=config.betas)
    selected = best.select(evaluation.keep_best)
    training = training_record(config, job.inputs)
    training["target_modules"] = list(run.lora.target_modules) or f"{len(spec.target_modules)} ({config.variant})"
    job.on_main(lambda: write_one_step_student(student, job.out, method="gdd", teacher=job.teacher, extra={
        "variant": config.variant, "gan_loss": config.gan_loss,
        "discriminator": "teacher UNet down/mid features + conv heads", "final_losses": result.losses,
        "evaluations": best.evaluations, "selected": selected or {"step": config.steps, "fd": None},
        "training": training, **cost_record(result.seconds, job.accelerator)}))
    return GDDResult(path=job.out, variant=config.variant, losses=result.losses, evaluations=best.evaluations)


METHOD = MethodEntry(
    GDDConfig, train_gdd,
    summary="GDD / GDD-I: a one-step student trained by a GAN loss on real data (seed 001)",
    description="A one-step generator (teacher + LoRA at t = T - 1) trained by a GAN loss alone against real data "
                "latents; the discriminator is the frozen teacher UNet's features plus small conv heads. GDD-I (the "
                "default) keeps every convolution frozen and without LoRA; GDD puts the LoRA on convolutions too. "
                "Without --target-modules the LoRA goes where the variant says. Re-running resumes.")
