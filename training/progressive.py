"""Progressive distillation (seed 003: Salimans & Ho 2022, Algorithm 2) with LoRA students: in each round a
student learns to take in one DDIM step what the round's teacher takes in two, and the steps halve, N -> N/2.

The teacher of the first round is the bare UNet sampled with DDIM; the teacher of every later round is the
previous round's student. That student is kept frozen as a second adapter ("teacher") of the same UNet, a
copy of the student adapter, and the new student starts from the same weights (Algorithm 2: student <-
teacher). Two small adapters on one UNet: no second UNet in memory, and the teacher is exactly the previous
round's file.

Target: one student DDIM step from ``z_t`` must land where two teacher DDIM steps land (``z_t''``), so the
student's clean-latent prediction must be (seed 003, Algorithm 2)::

    x~ = (z_t'' - (s_t'' / s_t) z_t) / (a_t'' - (s_t'' / s_t) a_t)

Loss: the student keeps the teacher's output parameterisation (epsilon for SD), so the LoRA starts as the
identity and both front doors sample it with the model's own parameterisation; its output is converted to
the clean latent x^ and the loss is ``w(t) |x^ - x~|^2`` with truncated-SNR weighting ``w = max(SNR, 1)``
(Table 1's best with x and v targets) or ``w = SNR + 1``, which is exactly the MSE of the implied v.

Guidance: the teacher runs at guidance 1 on the conditional prompt, with a fraction ``p_uncond`` of empty
prompts, so the student learns both branches and classifier-free guidance still applies when sampling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .lora import CLEAN, STUDENT, LoraSpec, LoraStudent, copy_adapter, drop_prompts, trailing_timesteps
from .loop import TrainConfig, add_seconds, cost_record, train

TEACHER = "teacher"
WEIGHTINGS = ("truncated_snr", "snr+1")


@dataclass
class ProgressiveConfig:
    """Rounds ``teacher_steps -> teacher_steps/2 -> ... -> student_steps``, each ``steps_per_round`` updates."""

    teacher_steps: int = 32          # DDIM steps of the bare teacher that the first round distils
    student_steps: int = 1           # steps of the final student; teacher_steps / student_steps a power of 2
    steps_per_round: int = 1500
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    lora: LoraSpec = field(default_factory=LoraSpec)
    weighting: str = "truncated_snr"  # "truncated_snr": max(SNR, 1); "snr+1": the v-space MSE
    p_uncond: float = 0.1             # fraction of empty prompts (the unconditional branch, for CFG)
    guidance: float = 1.0             # the guidance recorded as recommended in the student files
    save_rounds: bool = True          # also write every intermediate round's student (<out>_nfe<N>.safetensors)
    seed: int = 0
    checkpoint_every: int = 500
    tensorboard: bool = False

    def rounds(self) -> list[int]:
        """The student step count of each round, e.g. 32 -> 1: [16, 8, 4, 2, 1]."""
        ratio = self.teacher_steps / self.student_steps if self.student_steps >= 1 else 0
        if (isinstance(self.teacher_steps, bool) or not isinstance(self.teacher_steps, int)
                or not isinstance(self.student_steps, int) or self.student_steps < 1 or ratio < 2
                or not float(ratio).is_integer() or 2 ** round(math.log2(ratio)) != ratio):
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be student_steps ({self.student_steps}) "
                             "times a power of 2 (at least 2)")
        n, out = self.teacher_steps, []
        while n > self.student_steps:
            n //= 2
            out.append(n)
        return out


@dataclass
class ProgressiveResult:
    path: Path                              # the final student
    round_paths: dict[int, Path]            # NFE -> student file of that round (the final one included)
    losses: dict[int, float | None]         # NFE -> last training loss of that round (None: nothing left to run)


class LatentData:
    """Training pairs (x0, prompt) drawn from the global RNG: VAE latents (times the scaling factor).

    Args:
        latents: ``(N, C, H, W)`` posterior means (or samples).
        prompts: N prompts, one for all, or None (the empty prompt).
        latent_std: optional ``(N, C, H, W)`` posterior std; x0 is then a fresh posterior sample each time.
    """

    def __init__(self, latents: torch.Tensor, prompts: Sequence[str] | str | None = None,
                 latent_std: torch.Tensor | None = None):
        if latents.ndim != 4 or len(latents) == 0:
            raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got shape {tuple(latents.shape)}")
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts or ""]
        if len(prompts) not in (1, len(latents)):
            raise ValueError(f"{len(prompts)} prompts for {len(latents)} latents: give one per latent or one for all")
        if latent_std is not None and latent_std.shape != latents.shape:
            raise ValueError("latent_std must have the shape of latents")
        self.latents, self.prompts, self.latent_std = latents.float(), list(prompts), latent_std

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(self.latents), (batch_size,))
        x0 = self.latents[idx]
        if self.latent_std is not None:
            x0 = x0 + self.latent_std[idx].float() * torch.randn_like(x0)
        prompts = self.prompts * batch_size if len(self.prompts) == 1 else [self.prompts[i] for i in idx.tolist()]
        return x0, prompts[:batch_size]


def ddim_x0_target(z_t: torch.Tensor, z_next: torch.Tensor, a_t, s_t, a_next, s_next) -> torch.Tensor:
    """The clean-latent prediction x~ whose DDIM step from ``z_t`` lands exactly on ``z_next`` (seed 003)."""
    ratio = s_next / s_t
    return (z_next - ratio * z_t) / (a_next - ratio * a_t)


class ProgressiveRound:
    """One round: a student of ``n`` DDIM steps learns two steps of ``teacher_adapter`` (None: the bare UNet)."""

    def __init__(self, student: LoraStudent, data: Callable, n: int, config: ProgressiveConfig,
                 teacher_adapter: str | None):
        if config.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {config.weighting!r}")
        self.student, self.data, self.n, self.config = student, data, n, config
        self.teacher_adapter = teacher_adapter
        self.modules = {"lora": student.adapters}
        # The teacher's 2n-step grid, noisiest first, ending at the clean latent; the student's is every other point.
        self.grid = torch.tensor(trailing_timesteps(2 * n, num_train_timesteps=student.num_train_timesteps) + [CLEAN])
        if self.grid[::2][:-1].tolist() != trailing_timesteps(n, num_train_timesteps=student.num_train_timesteps):
            raise AssertionError("the 2n-step grid does not contain the n-step grid")

    def batch(self, step: int) -> dict:
        x0, prompts = self.data(self.config.batch_size)
        return {"x0": x0, "k": torch.randint(self.n, (len(x0),)), "noise": torch.randn_like(x0),
                "cond": self.student.embed(drop_prompts(prompts, self.config.p_uncond))}

    def timesteps(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, t', t''): where student step ``k`` starts, the teacher's midpoint, where it ends."""
        grid = self.grid.to(k.device)
        return grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]

    @torch.no_grad()
    def target(self, z: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x~ from two DDIM steps of the round's teacher, from ``z`` at the start of student step ``k``."""
        t, t_mid, t_next = self.timesteps(k)
        z_mid = self.student.ddim_step(z, t, t_mid, cond, self.teacher_adapter)
        z_next = self.student.ddim_step(z_mid, t_mid, t_next, cond, self.teacher_adapter)
        return ddim_x0_target(z, z_next, *self.student.alpha_sigma(t), *self.student.alpha_sigma(t_next))

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        x0, k, cond = batch["x0"], batch["k"], batch["cond"]
        t = self.timesteps(k)[0]
        a, s = self.student.alpha_sigma(t)
        z = a * x0 + s * batch["noise"]
        x_tilde = self.target(z, k, cond)
        x_hat, _ = self.student.denoise(z, t, cond, STUDENT)
        snr = (a / s) ** 2
        weight = snr.clamp(min=1.0) if self.config.weighting == "truncated_snr" else snr + 1
        return (weight * (x_hat - x_tilde) ** 2).mean()


def round_path(out: Path, n: int, final: int) -> Path:
    """The file of the round with ``n`` student steps: ``out`` itself for the final round."""
    return out if n == final else out.with_name(f"{out.stem}_nfe{n}{out.suffix}")


def train_progressive(pipe, data: torch.Tensor | Callable, out: str | os.PathLike, *,
                      prompts: Sequence[str] | str | None = None, config: ProgressiveConfig | None = None,
                      work_dir: str | os.PathLike | None = None, teacher: str | None = None,
                      accelerator=None) -> ProgressiveResult:
    """Distil ``pipe`` progressively into a LoRA student of ``config.student_steps`` DDIM steps.

    Args:
        pipe: the teacher, an SD1.x/2.x-style diffusers pipeline (its UNet gets the adapters).
        data: ``(N, C, H, W)`` data latents (VAE latents times the scaling factor) with ``prompts``, or a
            callable ``batch_size -> (x0 latents, prompts)`` drawing from the global RNG (e.g. ``LatentData``).
        out: the final student file; with ``config.save_rounds`` each earlier round's student is written
            beside it as ``<stem>_nfe<N>.safetensors``.
        prompts: with a tensor ``data``: one prompt per latent, one for all, or None (the empty prompt).
        config: rounds, steps and optimisation (default ``ProgressiveConfig()``).
        work_dir: checkpoints go to ``work_dir/round_<2N>to<N>`` (a re-run resumes exactly); None keeps none.
        teacher: the teacher's name recorded in the files (default: the pipeline's ``name_or_path``).
        accelerator: an ``accelerate.Accelerator`` to share; one is made if None.

    Each file samples at its round's N trailing timesteps (N = 4: 999, 749, 499, 249) with the first-order
    sampler ("ddim"; DDIM is ComfyUI's euler), at the recorded guidance.
    """
    from accelerate import Accelerator

    config = config or ProgressiveConfig()
    rounds = config.rounds()
    accelerator = accelerator or Accelerator()
    sample = data if callable(data) else LatentData(data, prompts)
    torch.manual_seed(config.seed)  # the LoRA's initial A
    student = LoraStudent(pipe, config.lora, frozen_adapters=[TEACHER] if len(rounds) > 1 else []).to(
        accelerator.device)
    out = Path(out)
    name = teacher or str(getattr(pipe, "name_or_path", "") or "unknown")
    paths, losses = {}, {}
    seconds: float | None = 0.0  # the rounds so far: a round's student cost every round before it too
    for r, n in enumerate(rounds):
        teacher_adapter = TEACHER if r else None  # round 0: the bare UNet
        if r:
            copy_adapter(student.unet, STUDENT, TEACHER)  # the previous round's student, frozen
        result = train(ProgressiveRound(student, sample, n, config, teacher_adapter), TrainConfig(
            steps=config.steps_per_round, lr=config.lr, warmup_steps=config.warmup_steps,
            max_grad_norm=config.max_grad_norm, seed=config.seed + r,  # each round its own batches
            run_dir=Path(work_dir) / f"round_{2 * n}to{n}" if work_dir is not None else None,
            checkpoint_every=config.checkpoint_every, tensorboard=config.tensorboard,
            desc=f"progressive {2 * n}->{n}"), accelerator)
        losses[n] = result.loss
        seconds = add_seconds(seconds, result.seconds)
        if n == rounds[-1] or config.save_rounds:
            paths[n] = round_path(out, n, rounds[-1])
            if accelerator.is_main_process:
                student.write(paths[n], method="progressive", teacher=name,
                              nfe_timesteps={n: trailing_timesteps(n, num_train_timesteps=student.num_train_timesteps)},
                              default_nfe=n, comfy_sampler="ddim", guidance=config.guidance, extra={
                                  "round": f"{2 * n}->{n}", "rounds": [f"{2 * m}->{m}" for m in rounds],
                                  "teacher_sampler": "ddim", "distilled_at_guidance": 1.0,
                                  "final_loss": result.loss, "training": asdict(config),
                                  **cost_record(seconds, accelerator)})
            accelerator.wait_for_everyone()
    return ProgressiveResult(path=paths[rounds[-1]], round_paths=paths, losses=losses)
