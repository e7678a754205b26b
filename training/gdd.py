"""GDD and GDD-I (seed 001: Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"): a one-step
generator initialised from the teacher and trained by a GAN loss against real data alone, with no distillation
or regression loss.

Generator: the teacher UNet plus a LoRA, called once at the noisiest training timestep (t = T - 1 = 999 for SD)
on pure noise with the prompt; its clean-latent prediction (x0 from the epsilon it predicts) is the sample. This
is exactly what a 1-step student file samples with any first-order sampler, in diffusers and in ComfyUI.

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
Adam with betas (0, 0.99) and constant learning rates.

Real data: latents with prompts (the lab: Fashion-MNIST encoded by the teacher's VAE, with class names), or a
folder of images with captions (``read_image_folder``) that the CLI encodes with the teacher's VAE.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.io import atomic_save_file, read_safetensors
from .lora import STUDENT, LoraSpec, LoraStudent, drop_prompts
from .loop import Player, TrainConfig, cost_record, train
from .progressive import LatentData

VARIANTS = ("gdd-i", "gdd")
BEST_FILE = "best_generator.safetensors"  # in the work folder: the lowest-FD generator so far
GAN_LOSSES = ("non_saturating", "hinge")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# evaluate(step, generate) -> scalars to log, or None; generate(prompts, seed=0) -> one-step latents (CPU)
Evaluate = Callable[[int, Callable[..., torch.Tensor]], "dict[str, float] | None"]


@dataclass
class GDDConfig:
    """GDD-I by default; ``steps`` updates of the generator and of the discriminator each."""

    variant: str = "gdd-i"
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-4                  # generator (its LoRA)
    disc_lr: float = 4e-4             # discriminator heads (the lab: 1e-4 left them near chance)
    betas: tuple[float, float] = (0.0, 0.99)
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    lora_rank: int = 16
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ()  # UNet modules that get the LoRA (peft matching); (): the variant's
    gan_loss: str = "non_saturating"
    r1_gamma: float = 1e-4            # the paper's value (its D reads images in [-1, 1]; latents have a like scale)
    r1_every: int = 16
    disc_timesteps: tuple[int, int] = (0, 250)  # the discriminator sees samples noised to t uniform in this range
    disc_hidden: int = 64             # channels of each head
    p_uncond: float = 0.1             # fraction of empty prompts (real and fake alike)
    eval_every: int = 0               # steps between calls of the evaluate hook (0: never)
    keep_best: bool = True            # with evaluations: write the generator of the lowest FD, not the last
    seed: int = 0
    checkpoint_every: int = 500
    tensorboard: bool = False

    def lora_spec(self, unet) -> LoraSpec:
        """The generator's LoRA on ``unet``: the given targets, or the variant's (see ``gdd_lora_spec``)."""
        return gdd_lora_spec(unet, self.variant, LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.target_modules)))


@dataclass
class GDDResult:
    path: Path
    losses: dict[str, float]                            # last generator / discriminator loss run here
    evaluations: list[tuple[int, dict[str, float]]]     # (step, scalars) of the evaluate hook in this run


# --- the one-step generator (shared with DisBack) -----------------------------------------------------------


def one_step_timestep(student: LoraStudent) -> int:
    """The timestep a one-step student is called at: the noisiest of the noise table (999 for SD)."""
    return student.num_train_timesteps - 1


def one_step_sample(student: LoraStudent, noise: torch.Tensor, cond: torch.Tensor,
                    adapter: str | None = STUDENT) -> torch.Tensor:
    """The generator: one UNet call on pure noise at the noisiest timestep, its clean-latent prediction."""
    return student.denoise(noise, one_step_timestep(student), cond, adapter)[0]


def sample_function(student: LoraStudent, latent_shape: Sequence[int], batch_size: int):
    """``generate(prompts, seed=0)``: the one-step student's latents for ``prompts`` from seeded noise (the
    global RNG is untouched), on the CPU; what an evaluate hook receives."""

    @torch.no_grad()
    def generate(prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        noise = torch.randn((len(prompts), *latent_shape), generator=torch.Generator().manual_seed(seed))
        out = []
        for i in range(0, len(prompts), batch_size):
            cond = student.embed(list(prompts[i:i + batch_size]))
            out.append(one_step_sample(student, noise[i:i + batch_size].to(student.device), cond).cpu())
        return torch.cat(out)

    return generate


def write_one_step_student(student: LoraStudent, out: str | os.PathLike, *, method: str, teacher: str,
                           extra: dict) -> Path:
    """The 1-step student file: NFE 1 at the noisiest timestep (its sigma is sigma_max), a first-order sampler
    (any gives the same single step to the clean latent), guidance 1 (the student samples the conditional
    distribution directly)."""
    return student.write(out, method=method, teacher=teacher, nfe_timesteps={1: [one_step_timestep(student)]},
                         default_nfe=1, comfy_sampler="euler", guidance=1.0, extra=extra)


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
            raise ValueError(f"GDD-I keeps the convolutions frozen, but the LoRA targets name {len(hit)} of them "
                             f"(e.g. {hit[0]}); use variant 'gdd' or other targets")
    return LoraSpec(rank=spec.rank, alpha=spec.alpha, target_modules=targets)


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

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
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


class PeriodicEvaluation:
    """The loop's ``after_step`` for one-step methods: every ``config.eval_every`` steps, hand the
    ``evaluate`` hook (the lab's FD, say) a sampler of the current generator and log what it returns.

    The generator's weights at the lowest ``fd`` seen are kept (in ``best_file`` too, if set, so that a
    resumed run still knows them): ``select_best`` then puts them back, the usual GAN practice of choosing
    the checkpoint by FD rather than taking the last."""

    best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # (step, fd, generator weights)
    best_file: Path | None = None

    def after_step(self, step: int) -> dict[str, float] | None:
        every = self.config.eval_every
        if self.evaluate is None or not every or (step + 1) % every:
            return None
        scalars = self.evaluate(step + 1, self.generate)
        if scalars:
            scalars = {k: float(v) for k, v in scalars.items()}
            self.evaluations.append((step + 1, scalars))
            fd = scalars.get("fd")
            if fd is not None and (self.best is None or fd < self.best[1]):
                weights = {k: v.detach().cpu().clone() for k, v in self.student.adapters.state_dict().items()}
                self.best = (step + 1, fd, weights)
                if self.best_file is not None:
                    atomic_save_file(weights, self.best_file, {"step": str(step + 1), "fd": repr(fd)})
        return scalars

    def track_best(self, best_file: Path | None) -> None:
        """Keep the best weights in ``best_file`` (and start from the ones already there, on resume)."""
        self.best_file = best_file
        if best_file is not None and best_file.is_file():
            weights, meta = read_safetensors(best_file)
            self.best = (int(meta["step"]), float(meta["fd"]), weights)

    def select_best(self) -> dict | None:
        """Load the best-FD weights into the generator; returns ``{"step", "fd"}`` of them, or None if none."""
        if self.best is None:
            return None
        step, fd, weights = self.best
        with torch.no_grad():
            self.student.adapters.load_state_dict(weights)
        return {"step": step, "fd": fd}


class GDD(PeriodicEvaluation):
    """The GDD method for the training loop: two players, the generator's LoRA and the discriminator heads."""

    def __init__(self, student: LoraStudent, data: Callable, latent_shape: Sequence[int], config: GDDConfig,
                 evaluate: Evaluate | None = None):
        if config.gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {config.gan_loss!r}")
        lo, hi = config.disc_timesteps
        if not 0 <= lo <= hi < student.num_train_timesteps:
            raise ValueError(f"disc_timesteps must be 0 <= lo <= hi < {student.num_train_timesteps}, got "
                             f"{config.disc_timesteps}")
        if config.r1_every < 1 or config.r1_gamma < 0:
            raise ValueError("r1_every must be >= 1 and r1_gamma >= 0")
        self.student, self.data, self.config, self.evaluate = student, data, config, evaluate
        self.latent_shape = tuple(latent_shape)
        self.features = TeacherFeatures(student)
        with torch.no_grad():  # one probe call: the channels of each level
            probe = self.features(torch.zeros(1, *self.latent_shape, device=student.device),
                                  torch.zeros(1, dtype=torch.long), student.embed([""]))
        self.heads = DiscriminatorHeads([f.shape[1] for f in probe], config.disc_hidden).to(student.device)
        self.modules = {"generator": student.adapters, "discriminator": self.heads}
        self.players = {"generator": Player(("generator",), lr=config.lr, betas=config.betas),
                        "discriminator": Player(("discriminator",), lr=config.disc_lr, betas=config.betas)}
        self.generate = sample_function(student, self.latent_shape, config.batch_size)
        self.evaluations: list[tuple[int, dict[str, float]]] = []

    def batch(self, step: int) -> dict:
        real, prompts = self.data(self.config.batch_size)
        if tuple(real.shape[1:]) != self.latent_shape:
            raise ValueError(f"data latents have shape {tuple(real.shape[1:])}, the generator makes "
                             f"{self.latent_shape}")
        # The fakes are drawn for the real batch's prompts, so real and fake share one prompt distribution.
        cond = self.student.embed(drop_prompts(prompts, self.config.p_uncond))
        return {"real": real, "cond": cond, "noise": torch.randn(len(real), *self.latent_shape)}

    def discriminate(self, x0: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
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


# --- data --------------------------------------------------------------------------------------------------


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The images of a data folder (searched recursively, sorted) and their captions: ``image.png`` is captioned
    by ``image.txt`` beside it; an image without one gets the empty prompt."""
    folder = Path(folder)
    hint = ("GDD trains on real data: a folder of images (" + ", ".join(IMAGE_SUFFIXES) +
            "), each captioned by a .txt file of the same name (image.png + image.txt)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data folder. {hint}")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder}: the data folder holds no images. {hint}")
    prompts = []
    for path in images:
        caption = path.with_suffix(".txt")
        prompts.append(caption.read_text(encoding="utf-8").strip() if caption.is_file() else "")
    return images, prompts


def load_images(paths: Sequence[Path], channels: int, size: int) -> torch.Tensor:
    """Images as ``(N, channels, size, size)`` in [-1, 1]: centre-cropped to a square, resized (bicubic)."""
    import numpy as np
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
        except OSError as err:
            raise ValueError(f"{path}: not a readable image ({err})") from None
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        image = image.resize((size, size), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        out.append((array[None] if channels == 1 else array.permute(2, 0, 1)) / 127.5 - 1)
    return torch.stack(out)


# --- the run -----------------------------------------------------------------------------------------------


def train_gdd(pipe, data: torch.Tensor | Callable, out: str | os.PathLike, *,
              prompts: Sequence[str] | str | None = None, config: GDDConfig | None = None,
              work_dir: str | os.PathLike | None = None, teacher: str | None = None,
              evaluate: Evaluate | None = None, accelerator=None) -> GDDResult:
    """Train a one-step GDD / GDD-I student of ``pipe`` on real data latents and write its file.

    Args:
        pipe: the teacher, an SD1.x/2.x-style diffusers pipeline (its UNet gets the adapter).
        data: ``(N, C, H, W)`` data latents (VAE latents times the scaling factor) with ``prompts``, or a
            callable ``batch_size -> (x0 latents, prompts)`` drawing from the global RNG (e.g. ``LatentData``).
        out: the student file (NFE 1 at the noisiest timestep, guidance 1).
        prompts: with a tensor ``data``: one prompt per latent, one for all, or None (the empty prompt).
        config: variant, loss, regularisation and optimisation (default ``GDDConfig()``).
        work_dir: checkpoints (a re-run resumes exactly); None keeps none.
        teacher: the teacher's name recorded in the file (default: the pipeline's ``name_or_path``).
        evaluate: called every ``config.eval_every`` steps as ``evaluate(step, generate)``, ``generate(prompts,
            seed=0)`` giving the current student's latents; the scalars it returns (e.g. an FD) are logged and
            kept in the result and the file's metadata. With ``config.keep_best`` the file holds the generator
            of the lowest ``fd`` returned (metadata ``selected``), not the last.
        accelerator: an ``accelerate.Accelerator`` to share; one is made if None.
    """
    from accelerate import Accelerator

    config = config or GDDConfig()
    accelerator = accelerator or Accelerator()
    sample = data if callable(data) else LatentData(data, prompts)
    torch.manual_seed(config.seed)  # the LoRA's initial A and the heads' initial weights
    spec = config.lora_spec(pipe.unet)
    student = LoraStudent(pipe, spec).to(accelerator.device)
    x0, _ = sample(1)
    method = GDD(student, sample, tuple(x0.shape[1:]), config, evaluate)
    method.track_best(Path(work_dir) / BEST_FILE if work_dir is not None and config.keep_best else None)
    result = train(method, TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps, final_lr_fraction=1.0,
        betas=config.betas, max_grad_norm=config.max_grad_norm, seed=config.seed, run_dir=work_dir,
        checkpoint_every=config.checkpoint_every, tensorboard=config.tensorboard, desc=config.variant),
        accelerator)
    selected = method.select_best() if config.keep_best else None
    out = Path(out)
    if accelerator.is_main_process:
        training = asdict(config)
        training["target_modules"] = list(config.target_modules) or f"{len(spec.target_modules)} ({config.variant})"
        write_one_step_student(student, out, method="gdd",
                               teacher=teacher or str(getattr(pipe, "name_or_path", "") or "unknown"), extra={
                                   "variant": config.variant, "gan_loss": config.gan_loss,
                                   "discriminator": "teacher UNet down/mid features + conv heads",
                                   "final_losses": result.losses, "evaluations": method.evaluations,
                                   "selected": selected or {"step": config.steps, "fd": None},
                                   "training": training, **cost_record(result.seconds, accelerator)})
    accelerator.wait_for_everyone()
    return GDDResult(path=out, losses=result.losses, evaluations=method.evaluations)
