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

Loss: by default the student keeps the teacher's output parameterisation (epsilon for SD), so the LoRA starts as
the identity and both front doors sample it with the model's own parameterisation. With ``student_prediction``
its output is read as v (or x0) instead, and so is every later round's teacher, the previous student: the
paper's case for other parameterisations at few steps, where the clean latent from an epsilon output at
t = 999 multiplies its error by 1/alpha; the first round then also learns the change of reading. The output
is converted to the clean latent x^ and the loss is ``w(t) |x^ - x~|^2`` with truncated-SNR weighting
``w = max(SNR, 1)`` (Table 1's best with x and v targets) or ``w = SNR + 1``, which is exactly the MSE of the implied v.

Guidance: by default the first round's teacher samples with classifier-free guidance ``guidance`` and every
student samples without it, one UNet call per step (guided distillation, as Meng et al. 2023 distil guided
models; later rounds' teachers are guided students already). With ``sample_with_cfg`` the teacher runs at
guidance 1 instead, with a fraction ``p_uncond`` of empty prompts, so the student learns both branches and CFG
is applied when sampling, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..schedulers.grids import CLEAN, trailing_timesteps
from .config import (RunConfig, Settings, SettingError, check_warmup, distilled_guidance, guidance_setting, run_config,
                     sample_with_cfg_setting, sampling_guidance, setting, student_prediction_setting,
                     training_record)
from .data import DataSource, drop_prompts
from .lora import STUDENT, Conditioning, LoraStudent
from .loop import cost_record
from .runner import Job, MethodEntry, settle

TEACHER = "teacher"
WEIGHTINGS = ("truncated_snr", "snr+1")


@dataclass
class ProgressiveConfig(Settings):
    """Rounds ``teacher_steps -> teacher_steps/2 -> ... -> student_steps``, each ``steps_per_round`` updates."""

    run: RunConfig = run_config(lora={}, batch_size=64, lr=3e-4, warmup_steps=100)
    source: DataSource = field(default_factory=DataSource)
    teacher_steps: int = setting(32, ge=2, help="DDIM steps of the bare teacher that the first round distils")
    student_steps: int = setting(1, ge=1, help="steps of the final student (teacher-steps / student-steps: a "
                                               "power of 2)")
    steps_per_round: int = setting(1500, ge=1, help="training steps of each round")
    weighting: str = setting("truncated_snr", choices=WEIGHTINGS,
                             help="loss weight on the x-space error: max(SNR, 1), or SNR + 1 (the v-space MSE)")
    p_uncond: float = setting(0.1, ge=0, le=1, help="fraction of empty prompts (the unconditional branch, so that "
                                                    "CFG stays usable)")
    guidance: float | None = guidance_setting("files")
    sample_with_cfg: bool = sample_with_cfg_setting("files")
    student_prediction: str | None = student_prediction_setting()
    save_rounds: bool = setting(True, flag="--no-save-rounds", changeable=True,
                                help="write the final student only, not every round's (<out>_nfe<N>)")

    def check(self) -> None:
        check_warmup(self, "steps_per_round")
        ratio = self.teacher_steps / self.student_steps
        if ratio < 2 or not float(ratio).is_integer() or 2 ** round(math.log2(ratio)) != ratio:
            raise SettingError("teacher_steps", f"must be student_steps ({self.student_steps}) times a power of 2 "
                                                f"(at least 2), got {self.teacher_steps}")
        try:  # the teacher's grid, checked here against SD's 1,000 training timesteps (the run checks its own)
            trailing_timesteps(self.teacher_steps)
        except ValueError as err:
            raise SettingError("teacher_steps", str(err)) from None

    def rounds(self) -> list[int]:
        """The student step count of each round, e.g. 32 -> 1: [16, 8, 4, 2, 1]."""
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

    def summary(self) -> str:
        return "\n".join(f"{n}-step student written to {path}" for n, path in sorted(self.round_paths.items(),
                                                                                    reverse=True))


def ddim_x0_target(z_t: torch.Tensor, z_next: torch.Tensor, a_t, s_t, a_next, s_next) -> torch.Tensor:
    """The clean-latent prediction x~ whose DDIM step from ``z_t`` lands exactly on ``z_next`` (seed 003)."""
    ratio = s_next / s_t
    return (z_next - ratio * z_t) / (a_next - ratio * a_t)


class ProgressiveRound:
    """One round: a student of ``n`` DDIM steps learns two steps of ``teacher_adapter`` (None: the bare UNet)."""

    def __init__(self, student: LoraStudent, data: Callable, n: int, config: ProgressiveConfig,
                 teacher_adapter: str | None):
        self.student, self.data, self.n, self.config = student, data, n, config
        self.teacher_adapter = teacher_adapter
        # The bare UNet samples with CFG; a previous round's student has the guidance in it already.
        self.teacher_guidance = 1.0 if config.sample_with_cfg or teacher_adapter is not None else config.guidance
        self.modules = {"lora": student.adapters}
        # The teacher's 2n-step grid, noisiest first, ending at the clean latent; the student's is every other point.
        self.grid = torch.tensor(trailing_timesteps(2 * n, num_train_timesteps=student.num_train_timesteps) + [CLEAN])
        if self.grid[::2][:-1].tolist() != trailing_timesteps(n, num_train_timesteps=student.num_train_timesteps):
            raise AssertionError("the 2n-step grid does not contain the n-step grid")

    def batch(self, step: int) -> dict:
        x0, prompts = self.data(self.config.run.batch_size)
        return {"x0": x0, "k": torch.randint(self.n, (len(x0),)), "noise": torch.randn_like(x0),
                "cond": self.student.embed(drop_prompts(prompts, self.config.p_uncond))}

    def timesteps(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, t', t''): where student step ``k`` starts, the teacher's midpoint, where it ends."""
        grid = self.grid.to(k.device)
        return grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]

    @torch.no_grad()
    def target(self, z: torch.Tensor, k: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x~ from two DDIM steps of the round's teacher, from ``z`` at the start of student step ``k``."""
        t, t_mid, t_next = self.timesteps(k)
        z_mid = self.student.ddim_step(z, t, t_mid, cond, self.teacher_adapter, self.teacher_guidance)
        z_next = self.student.ddim_step(z_mid, t_mid, t_next, cond, self.teacher_adapter, self.teacher_guidance)
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


def train_progressive(job: Job, config: ProgressiveConfig) -> ProgressiveResult:
    """Distil ``job.pipe`` progressively into a LoRA student of ``config.student_steps`` DDIM steps, on
    ``job.data``.

    The final student goes to ``job.out``; with ``config.save_rounds`` each earlier round's is written beside it
    as ``<stem>_nfe<N>.safetensors``. Each file samples at its round's N trailing timesteps (N = 4: 999, 749, 499,
    249) with the first-order sampler ("ddim"; DDIM is ComfyUI's euler), at guidance 1 (or ``config.guidance``
    with ``sample_with_cfg``). Round checkpoints go to ``<work>/round_<2N>to<N>``.
    """
    config = settle(config)
    run, rounds = config.run, config.rounds()
    student = job.student(run.lora, run.seed, frozen_adapters=[TEACHER] if len(rounds) > 1 else [],
                          student_prediction=config.student_prediction)
    paths, losses = {}, {}
    seconds = 0.0  # the rounds so far: a round's student cost every round before it too
    for r, n in enumerate(rounds):
        teacher_adapter = TEACHER if r else None  # round 0: the bare UNet
        if r:
            student.freeze_student_as(TEACHER)  # the previous round's student, frozen
        result = job.train(ProgressiveRound(student, job.data, n, config, teacher_adapter), run,
                           config.steps_per_round, f"progressive {2 * n}->{n}", stage=f"round_{2 * n}to{n}",
                           seed=run.seed + r)  # each round its own batches
        losses[n] = result.loss
        seconds += result.seconds
        if n == rounds[-1] or config.save_rounds:
            paths[n] = round_path(job.out, n, rounds[-1])
            job.on_main(lambda: student.write(
                paths[n], method="progressive", teacher=job.teacher,
                nfe_timesteps={n: trailing_timesteps(n, num_train_timesteps=student.num_train_timesteps)},
                default_nfe=n, comfy_sampler="ddim", guidance=sampling_guidance(config), extra={
                    "round": f"{2 * n}->{n}", "rounds": [f"{2 * m}->{m}" for m in rounds],
                    "teacher_sampler": "ddim", "distilled_at_guidance": distilled_guidance(config),
                    "final_loss": result.loss,
                    "training": training_record(config, job.inputs), **cost_record(seconds, job.accelerator)}))
    return ProgressiveResult(path=paths[rounds[-1]], round_paths=paths, losses=losses)


def _outputs(config: ProgressiveConfig, out: Path) -> list[Path]:
    rounds = config.rounds()
    return [round_path(out, n, rounds[-1]) for n in rounds if n == rounds[-1] or config.save_rounds]


METHOD = MethodEntry(
    ProgressiveConfig, train_progressive, outputs=_outputs,
    summary="progressive distillation into a LoRA student (seed 003)",
    description="Rounds of two teacher DDIM steps -> one student step, N -> N/2, from --teacher-steps down to "
                "--student-steps, on data latents. Writes the final student to --out and each earlier round's "
                "beside it (<out>_nfe<N>). Re-running resumes.")
