"""SFD, simple and fast distillation (seed 004, Algorithm 2), with a LoRA student: the student is trained only at
the few timesteps it samples at, along its own trajectory, against a multi-step DPM-Solver teacher.

One training step draws an NFE ``n`` from the supported set, noise and prompts, and runs both trajectories
from the same noise over the student's ``n`` timesteps (``trailing_timesteps(n, p)``). At each student step:

- teacher: K steps of DPM-Solver++(2M) (diffusers' ``DPMSolverMultistepScheduler``, the bare UNet: adapters
  off) from its latent at ``t_i`` to ``t_(i+1)``, the substeps spaced uniformly in t (DPM-Solver's
  "time-uniform", its choice for latent models). By default the teacher continues its own trajectory, as in
  Algorithm 2 (``teacher_from="teacher"``); ``"student"`` restarts it from the student's latent instead.
- student: one first-order step (DDIM, i.e. ComfyUI's euler in VE coordinates) from its own latent, the
  detached result of its previous step, so it learns to correct the error it has accumulated.
- loss: ``d(x_student, x_teacher)`` on the VE latents ``x = z / a_t`` (the paper's EDM coordinates,
  ComfyUI's), L1 by default, averaged over the ``n`` steps.

Departures from the paper, on purpose: one optimizer update per whole trajectory (the ``n`` step losses are
averaged) rather than one per step, so that each loop step is a pure function of the weights and the step
number and resume stays exact; and no NFE conditioning (SFD-v): a LoRA file read by the stock loaders cannot
add an input, so one LoRA serves every NFE through its timesteps alone. Distillation is at guidance 1 with a
fraction of empty prompts, as the paper does for Stable Diffusion: CFG still applies when sampling.

Timesteps: the paper tunes t_min (its Figure 5); the trailing grid (p = 0: 999, 749, 499, 249 for 4 steps)
puts the last student call at t = T/n - 1 and ends on the clean latent, the convention of few-step SD
samplers; ``schedule_p > 0`` spaces the steps like exp-Karras.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .lora import CLEAN, STUDENT, LoraSpec, LoraStudent, drop_prompts, trailing_timesteps
from .loop import TrainConfig, cost_record, train

DISTANCES = ("l1", "l2")
TEACHER_FROM = ("teacher", "student")


@dataclass
class SFDConfig:
    """One LoRA student for every NFE in ``nfes``; ``steps`` updates of one trajectory batch each."""

    nfes: tuple[int, ...] = (2, 3, 4, 5)
    default_nfe: int = 4
    schedule_p: float = 0.0           # 0: trailing grid, uniform in t; > 0: exp-Karras-like spacing
    teacher_substeps: int = 4          # K: DPM-Solver++(2M) steps of the teacher per student step
    teacher_from: str = "teacher"      # "teacher": Algorithm 2, the teacher's own trajectory; "student": restart
    distance: str = "l1"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    lora: LoraSpec = field(default_factory=LoraSpec)
    p_uncond: float = 0.1             # fraction of empty prompts (the unconditional branch, for CFG)
    guidance: float = 1.0             # the guidance recorded as recommended in the student file
    latent_size: int | None = None    # latent height = width (default: the UNet's sample_size)
    seed: int = 0
    checkpoint_every: int = 500
    tensorboard: bool = False


class SFD:
    """The SFD method for the training loop: batches of (NFE, noise, prompts), the trajectory loss."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], config: SFDConfig):
        from diffusers import DPMSolverMultistepScheduler

        if config.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {config.distance!r}")
        if config.teacher_from not in TEACHER_FROM:
            raise ValueError(f"teacher_from must be one of {TEACHER_FROM}, got {config.teacher_from!r}")
        if not config.nfes or config.default_nfe not in config.nfes:
            raise ValueError(f"default_nfe {config.default_nfe} must be one of the NFEs {list(config.nfes)}")
        if isinstance(config.teacher_substeps, bool) or not isinstance(config.teacher_substeps, int) \
                or config.teacher_substeps < 1:
            raise ValueError(f"teacher_substeps must be an integer >= 1, got {config.teacher_substeps!r}")
        if not prompts:
            raise ValueError("SFD needs at least one prompt")
        self.student, self.prompts, self.config = student, list(prompts), config
        self.modules = {"lora": student.adapters}
        self.timesteps = {n: trailing_timesteps(n, config.schedule_p, student.num_train_timesteps)
                          for n in sorted(set(config.nfes))}
        unet = student.unet
        size = config.latent_size or unet.config.sample_size
        self.latent_shape = (unet.config.in_channels, size, size)
        # The teacher's solver; the last substep of a segment is first order (needed where it ends at sigma 0).
        self.solver = DPMSolverMultistepScheduler.from_config(
            student.scheduler_config, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
            lower_order_final=True, final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, thresholding=False,
            prediction_type=student.prediction_type)

    def batch(self, step: int) -> dict:
        nfes = sorted(self.timesteps)
        n = nfes[int(torch.randint(len(nfes), ()))]
        B = self.config.batch_size
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (B,)).tolist()]
        return {"nfe": n, "noise": torch.randn(B, *self.latent_shape),
                "cond": self.student.embed(drop_prompts(prompts, self.config.p_uncond))}

    @torch.no_grad()
    def teacher_segment(self, z: torch.Tensor, t_from: int, t_to: int, cond: torch.Tensor) -> torch.Tensor:
        """``teacher_substeps`` DPM-Solver++(2M) steps of the bare UNet from ``z`` at ``t_from`` to ``t_to``
        (-1: the clean latent), the substeps uniform in t on integer timesteps."""
        points = torch.linspace(t_from, t_to, self.config.teacher_substeps + 1, dtype=torch.float64)
        points = torch.unique_consecutive(points.round().long())
        self.solver.set_timesteps(timesteps=points[:-1].tolist())
        if t_to != CLEAN:  # set_timesteps ends at sigma 0: end at t_to's sigma instead
            a, s = self.student.alpha_sigma(torch.tensor([t_to]))
            self.solver.sigmas[-1] = float(s / a)
        for t in self.solver.timesteps:
            out = self.student.unet_output(z, t, cond, adapter=None)
            z = self.solver.step(out, t, z).prev_sample
        return z

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        n, cond = batch["nfe"], batch["cond"]
        ts = self.timesteps[n] + [CLEAN]
        x = x_teacher = batch["noise"]
        losses = []
        for t, t_next in zip(ts, ts[1:]):
            start = x_teacher if self.config.teacher_from == "teacher" else x
            x_teacher = self.teacher_segment(start, t, t_next, cond)
            x_next = self.student.ddim_step(x, t, t_next, cond, STUDENT)
            a, _ = self.student.alpha_sigma(torch.tensor([t_next]))
            diff = (x_next - x_teacher) / a  # on VE latents
            losses.append(diff.abs().mean() if self.config.distance == "l1" else diff.pow(2).mean())
            x = x_next.detach()
        return torch.stack(losses).mean()


@dataclass
class SFDResult:
    path: Path
    loss: float | None


def train_sfd(pipe, prompts: Sequence[str], out: str | os.PathLike, *, config: SFDConfig | None = None,
              work_dir: str | os.PathLike | None = None, teacher: str | None = None,
              accelerator=None) -> SFDResult:
    """Distil ``pipe`` into one LoRA student for every NFE of ``config.nfes`` and write its file.

    Args:
        pipe: the teacher, an SD1.x/2.x-style diffusers pipeline (its UNet gets the adapter).
        prompts: the prompts trajectories are drawn for (no data is needed: SFD follows the teacher's ODE).
        out: the student file: every NFE's exact timesteps and sigmas, default ``config.default_nfe``,
            sampler "euler" (the first-order step it was trained as), the recorded guidance.
        config: NFEs, schedule, teacher solver and optimisation (default ``SFDConfig()``).
        work_dir: checkpoints (a re-run resumes exactly); None keeps none.
        teacher: the teacher's name recorded in the file (default: the pipeline's ``name_or_path``).
        accelerator: an ``accelerate.Accelerator`` to share; one is made if None.
    """
    from accelerate import Accelerator

    config = config or SFDConfig()
    accelerator = accelerator or Accelerator()
    torch.manual_seed(config.seed)  # the LoRA's initial A
    student = LoraStudent(pipe, config.lora).to(accelerator.device)
    method = SFD(student, prompts, config)
    result = train(method, TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
        seed=config.seed, run_dir=work_dir, checkpoint_every=config.checkpoint_every,
        tensorboard=config.tensorboard, desc="sfd"), accelerator)
    out = Path(out)
    if accelerator.is_main_process:
        student.write(out, method="sfd", teacher=teacher or str(getattr(pipe, "name_or_path", "") or "unknown"),
                      nfe_timesteps=method.timesteps, default_nfe=config.default_nfe, comfy_sampler="euler",
                      guidance=config.guidance, extra={
                          "teacher_solver": "dpmpp_2m", "teacher_substeps": config.teacher_substeps,
                          "teacher_from": config.teacher_from, "distance": config.distance,
                          "distilled_at_guidance": 1.0, "nfe_conditioning": False, "final_loss": result.loss,
                          "training": asdict(config), **cost_record(result.seconds, accelerator)})
    accelerator.wait_for_everyone()
    return SFDResult(path=out, loss=result.loss)
