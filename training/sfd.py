"""SFD, simple and fast distillation (seed 004, Algorithm 2), with a LoRA student: the student is trained only at
the few timesteps it samples at, along its own trajectory, against a multi-step DPM-Solver teacher.

One training step draws an NFE ``n`` from the supported set, noise and prompts, and runs both trajectories
from the same noise over the student's ``n`` timesteps (``trailing_timesteps(n, p)``). At each student step:

- teacher: K steps of DPM-Solver++(2M) (diffusers' ``DPMSolverMultistepScheduler``, the bare UNet: adapters
  off) from its latent at ``t_i`` to ``t_(i+1)``, the substeps spaced uniformly in t (DPM-Solver's
  "time-uniform", its choice for latent models). By default the teacher continues its own trajectory, as in
  Algorithm 2 (``teacher_from="teacher"``): one solver run over every segment's substeps, its multistep history
  carried across the student's timesteps; ``"student"`` restarts it from the student's latent at each of them
  instead (its first substep there first order).
- student: one first-order step (DDIM, i.e. ComfyUI's euler in VE coordinates) from its own latent, the
  detached result of its previous step, so it learns to correct the error it has accumulated.
- loss: ``d(x_student, x_teacher)`` on the VE latents ``x = z / a_t`` (the paper's EDM coordinates,
  ComfyUI's), L1 by default, averaged over the ``n`` steps.

Departures from the paper, on purpose: one optimizer update per whole trajectory (the ``n`` step losses are
averaged) rather than one per step, so that each loop step is a pure function of the weights and the step
number and resume stays exact; and no NFE conditioning (SFD-v): a LoRA file read by the stock loaders cannot
add an input, so one LoRA serves every NFE through its timesteps alone; and by default the teacher samples
with classifier-free guidance and the student learns the guided trajectories, sampling at guidance 1 with one
UNet call per step. ``sample_with_cfg`` distils at guidance 1 with a fraction of empty prompts instead, as the
paper does for Stable Diffusion, and leaves CFG to sampling. ``teacher_restarts`` restarts the teacher's solver at
each student timestep of its own trajectory, as the lab's first SFD students were made (``sfd_2step``): 0.015 worse
in FD at 2 NFE, level at 4, for the NFE 2 + 4 student.

Teacher pool (``pool > 0``, a departure for speed): with ``teacher_from="teacher"`` the teacher's trajectory
depends on the noise and the prompt alone, never on the student, so its latents at the student's timesteps can
be computed once for ``pool`` draws of (noise, prompt) and reused: each step then draws its batch from that pool
and runs the student alone. At NFE 1 this is the one-step distillation of Luhman & Luhman (2021) on SFD's
targets. The teacher runs about 3/4 of an online step's time; the pool's capture time is added to the training
seconds the file records.

What the student predicts (``student_prediction``): by default its UNet's output means what the teacher's does.
At NFE 1 from an epsilon teacher that is ill-conditioned: the clean latent at t=999 is ``(z - s eps) / a`` with
a = 0.068 on SD's schedule, so the student must reproduce its noisy input to within a fourteenth of the error
allowed in the result (progressive distillation's argument for v and x0 at few steps). ``v_prediction`` or
``sample`` reads the student's output so instead; the file records it and the loaders sample it so (diffusers'
scheduler gets that prediction type, ComfyUI's model its sampling object), while the teacher keeps its own.
In the lab it made the one-step student (FD 3.02 as epsilon, 0.495 as v at equal steps) and hurt the 2- and
4-step ones, whose LoRA then has to change the output's meaning at every timestep they sample.

Timesteps: the paper tunes t_min (its Figure 5); the trailing grid (p = 0: 999, 749, 499, 249 for 4 steps)
puts the last student call at t = T/n - 1 and ends on the clean latent, the convention of few-step SD
samplers; ``schedule_p > 0`` spaces the steps like exp-Karras. At NFE 1 the one step goes from pure noise to the
clean latent, so the student learns the teacher's whole ``teacher_substeps``-step solution from that noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.io import FileFormatError, atomic_save_file, read_safetensors, readable
from ..schedulers.grids import CLEAN, trailing_timesteps
from ..schedulers.sigmas import EXP_KARRAS_P_MAX
from .config import (RunConfig, Settings, SettingError, check_warmup, distilled_guidance, guidance_setting, run_config,
                     sample_with_cfg_setting, sampling_guidance, setting, student_prediction_setting, training_record)
from .data import drop_prompts, sample_prompts
from .lora import STUDENT, Conditioning, LoraStudent
from .loop import cost_record
from .runner import Job, MethodEntry, settle

DISTANCES = ("l1", "l2")
TEACHER_FROM = ("teacher", "student")


@dataclass
class SFDConfig(Settings):
    """One LoRA student for every NFE in ``nfes``; ``steps`` updates of one trajectory batch each."""

    run: RunConfig = run_config(lora={}, batch_size=32, lr=3e-4, warmup_steps=100)
    nfes: tuple[int, ...] = setting((2, 3, 4, 5), ge=1, flag="--nfe", metavar="N",
                                    help="the NFEs the student is trained for (one LoRA for all)")
    default_nfe: int = setting(4, ge=1, help="the NFE the file samples at when none is asked for")
    schedule_p: float = setting(0.0, ge=0, le=EXP_KARRAS_P_MAX, help="the student's timesteps: 0, the trailing grid "
                                                                      "(uniform in t); > 0, exp-Karras spacing")
    teacher_substeps: int = setting(4, ge=1, help="DPM-Solver++(2M) teacher steps per student step")
    teacher_from: str = setting("teacher", choices=TEACHER_FROM,
                                help="the teacher continues its own trajectory (Algorithm 2) or restarts from the "
                                     "student's")
    teacher_restarts: bool = setting(False, help="restart the teacher's solver at each student timestep of its own "
                                                 "trajectory (first order there), as the lab's first SFD students "
                                                 "were made; by default it is one DPM-Solver++(2M) run")
    distance: str = setting("l1", choices=DISTANCES, help="distance of the student's and the teacher's latents")
    steps: int = setting(2000, ge=1, help="training steps")
    p_uncond: float = setting(0.1, ge=0, le=1, help="fraction of empty prompts (the unconditional branch, so that "
                                                    "CFG stays usable)")
    guidance: float | None = guidance_setting("file")
    sample_with_cfg: bool = sample_with_cfg_setting("file")
    latent_size: int | None = setting(None, ge=1, teacher_default="latent_size",
                                      help="latent height = width (default: the UNet's)")
    student_prediction: str | None = student_prediction_setting()
    pool: int = setting(0, ge=0, help="0: the teacher runs beside the student at every step; N: the teacher's "
                                      "trajectories from N draws of noise and prompt are computed once (kept in the "
                                      "work folder) and each step draws its batch from them (--teacher-from teacher)")

    def check(self) -> None:
        check_warmup(self, "steps")
        self.nfes = tuple(sorted(set(self.nfes)))  # one student per NFE: `--nfe 4 2` is `--nfe 2 4`
        if self.pool and self.teacher_from != "teacher":
            raise SettingError("pool", "a teacher pool needs --teacher-from teacher (a teacher restarted from the "
                                       "student's latent cannot be computed ahead)")
        if self.default_nfe not in self.nfes:
            raise SettingError("default_nfe", f"must be one of the NFEs {list(self.nfes)}, got {self.default_nfe}")
        for n in self.nfes:
            try:
                trailing_timesteps(n, self.schedule_p)
            except ValueError as err:
                raise SettingError("nfes", str(err)) from None


class SFD:
    """The SFD method for the training loop: batches of (NFE, noise, prompts), the trajectory loss."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], config: SFDConfig):
        from diffusers import DPMSolverMultistepScheduler

        if not prompts:
            raise ValueError("SFD needs at least one prompt")
        self.student, self.prompts, self.config = student, list(prompts), config
        self.modules = {"lora": student.adapters}
        self.timesteps = {n: trailing_timesteps(n, config.schedule_p, student.num_train_timesteps)
                          for n in sorted(set(config.nfes))}
        unet = student.unet
        size = config.latent_size or unet.config.sample_size
        self.latent_shape = (unet.config.in_channels, size, size)
        self.pool: TeacherPool | None = None  # set by capture_pool
        # The teacher's solver; the last substep before sigma 0 is first order (diffusers' lower_order_final).
        self.solver = DPMSolverMultistepScheduler.from_config(
            student.scheduler_config, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
            lower_order_final=True, final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, thresholding=False,
            prediction_type=student.prediction_type)

    def batch(self, step: int) -> dict:
        nfes = sorted(self.timesteps)
        n = nfes[int(torch.randint(len(nfes), ()))]
        B = self.config.run.batch_size
        if self.pool is not None:
            ids = torch.randint(len(self.pool.prompts), (B,))
            return {"nfe": n, "noise": self.pool.noise[ids], "targets": self.pool.targets[n][ids],
                    "cond": self.student.embed([self.pool.prompts[i] for i in ids.tolist()])}
        prompts = sample_prompts(self.prompts, B)
        return {"nfe": n, "noise": torch.randn(B, *self.latent_shape),
                "cond": self.student.embed(drop_prompts(prompts, self.config.p_uncond))}

    @torch.no_grad()
    def teacher_trajectory(self, noise: torch.Tensor, cond: Conditioning, n: int) -> torch.Tensor:
        """The teacher's latents at the ends of the ``n`` student steps from ``noise``: ``(B, n, C, H, W)``. One
        DPM-Solver++(2M) run over every segment's substeps, its history carried across the segments' ends (the
        paper's teacher trajectory is one solver run); restarting at each end would make the first substep of
        every segment first order."""
        ts = self.timesteps[n] + [CLEAN]
        if self.config.teacher_restarts:
            x, out = noise, []
            for t, t_next in zip(ts, ts[1:]):
                x = self.teacher_segment(x, t, t_next, cond)
                out.append(x)
            return torch.stack(out, dim=1)
        segments = [self._substeps(t, t_next) for t, t_next in zip(ts, ts[1:])]
        points = torch.cat([segments[0][:1]] + [segment[1:] for segment in segments])
        ends = set(torch.tensor([len(segment) - 1 for segment in segments]).cumsum(0).tolist())
        self.solver.set_timesteps(timesteps=points[:-1].tolist())  # the run ends at sigma 0
        z, out = noise, []
        for i, t in enumerate(self.solver.timesteps):
            model_output = self.student.unet_output(z, t, cond, None, distilled_guidance(self.config))
            z = self.solver.step(model_output, t, z).prev_sample
            if i + 1 in ends:
                out.append(z)
        return torch.stack(out, dim=1)

    def _substeps(self, t_from: int, t_to: int) -> torch.Tensor:
        """The integer timesteps of a segment's ``teacher_substeps`` substeps, both ends included, uniform in t."""
        points = torch.linspace(t_from, t_to, self.config.teacher_substeps + 1, dtype=torch.float64)
        return torch.unique_consecutive(points.round().long())

    @torch.no_grad()
    def teacher_segment(self, z: torch.Tensor, t_from: int, t_to: int, cond: Conditioning) -> torch.Tensor:
        """``teacher_substeps`` DPM-Solver++(2M) steps of the bare UNet from ``z`` at ``t_from`` to ``t_to``
        (-1: the clean latent), the substeps uniform in t on integer timesteps: the teacher restarted from a
        latent (``teacher_from="student"``), its first substep first order."""
        points = self._substeps(t_from, t_to)
        self.solver.set_timesteps(timesteps=points[:-1].tolist())
        if t_to != CLEAN:  # set_timesteps ends at sigma 0: end at t_to's sigma instead
            a, s = self.student.alpha_sigma(torch.tensor([t_to]))
            self.solver.sigmas[-1] = float(s / a)
        for t in self.solver.timesteps:
            out = self.student.unet_output(z, t, cond, None, distilled_guidance(self.config))
            z = self.solver.step(out, t, z).prev_sample
        return z

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        n, cond = batch["nfe"], batch["cond"]
        ts = self.timesteps[n] + [CLEAN]
        x = batch["noise"]
        targets = batch.get("targets")  # the pool's, else the teacher's own run when it never restarts
        if targets is None and self.config.teacher_from == "teacher":
            targets = self.teacher_trajectory(x, cond, n)
        losses = []
        for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
            x_teacher = targets[:, i] if targets is not None else self.teacher_segment(x, t, t_next, cond)
            x_next = self.student.ddim_step(x, t, t_next, cond, STUDENT)
            a, _ = self.student.alpha_sigma(torch.tensor([t_next]))
            diff = (x_next - x_teacher) / a  # on VE latents
            losses.append(diff.abs().mean() if self.config.distance == "l1" else diff.pow(2).mean())
            x = x_next.detach()
        return torch.stack(losses).mean()


POOL_SHARD = 512   # draws per pool file
POOL_STREAM = 7    # the pool's RNG stream, apart from the loop's per-step seeds


@dataclass
class TeacherPool:
    """The teacher's trajectories for a fixed set of draws: ``noise`` (N, C, H, W), the prompt of each draw (the
    empty prompt where it was dropped), ``targets[n]`` (N, n, C, H, W) for every NFE, and the wall-clock seconds
    the teacher took to compute them (:func:`pool_seconds`)."""

    noise: torch.Tensor
    prompts: list[str]
    targets: dict[int, torch.Tensor]
    seconds: float


def capture_pool(method: SFD, size: int, seed: int, folder: Path | None, accelerator) -> TeacherPool:
    """Compute (or read back from ``folder``) the teacher pool of ``size`` draws and hand it to ``method``.

    The draws of file k come from their own generator (``seed``, k), so a capture stopped part-way resumes file by
    file with the same data; under several processes each computes every ``num_processes``-th file and all read
    them all (without a folder, each computes them all)."""
    shards = list(range(0, size, POOL_SHARD))
    share = [k for k in range(len(shards))
             if folder is None or k % accelerator.num_processes == accelerator.process_index]
    done = {k for k in share if folder is not None and readable(_pool_file(folder, k))}
    bar = tqdm(total=sum(min(POOL_SHARD, size - shards[k]) for k in share), desc="teacher pool", unit="draw",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    bar.update(sum(min(POOL_SHARD, size - shards[k]) for k in done))
    parts = {}
    for k in share:
        if k not in done:
            parts[k] = _capture_pool_shard(method, min(POOL_SHARD, size - shards[k]), seed, k, bar)
            if folder is not None:
                tensors, meta = parts[k]
                atomic_save_file(tensors, _pool_file(folder, k), meta)
    bar.close()
    if folder is not None:
        accelerator.wait_for_everyone()
        parts = {k: read_safetensors(_pool_file(folder, k)) for k in range(len(shards))}
    nfes = sorted(method.timesteps)
    for k, (tensors, meta) in parts.items():
        expected = {"noise": (min(POOL_SHARD, size - shards[k]), *method.latent_shape),
                    **{f"nfe{n}": (min(POOL_SHARD, size - shards[k]), n, *method.latent_shape) for n in nfes}}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != expected:
            raise FileFormatError(f"{_pool_file(folder, k) if folder else 'teacher pool'}: holds {found}, "
                                  f"expected {expected}; delete the work folder's teacher pool to compute it again")
    ordered = [parts[k] for k in range(len(shards))]
    method.pool = TeacherPool(
        noise=torch.cat([t["noise"] for t, _ in ordered]),
        prompts=[p for _, meta in ordered for p in json.loads(meta["prompts"])],
        targets={n: torch.cat([t[f"nfe{n}"] for t, _ in ordered]) for n in nfes},
        seconds=pool_seconds([float(meta["seconds"]) for _, meta in ordered],
                             accelerator.num_processes if folder is not None else 1))
    return method.pool


def pool_seconds(shard_seconds: list[float], processes: int) -> float:
    """The wall-clock seconds of a pool's capture from its files' own: file k is computed by process k mod
    ``processes`` (a run resumes with as many processes only), the processes side by side."""
    return max(sum(shard_seconds[p::processes]) for p in range(processes))


def _capture_pool_shard(method: SFD, count: int, seed: int, k: int, bar, batch: int = 128):
    words = np.random.SeedSequence(seed, spawn_key=(POOL_STREAM, k)).generate_state(2)
    generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
    prompts = method.prompts
    noise = torch.randn(count, *method.latent_shape, generator=generator)
    chosen = [prompts[i] for i in torch.randint(len(prompts), (count,), generator=generator).tolist()]
    dropped = (torch.rand(count, generator=generator) < method.config.p_uncond).tolist()
    chosen = ["" if d else p for p, d in zip(chosen, dropped)]
    began = time.perf_counter()
    targets = {n: [] for n in sorted(method.timesteps)}
    device = method.student.device
    for first in range(0, count, batch):
        z = noise[first:first + batch].to(device)
        cond = method.student.embed(chosen[first:first + batch])
        for n in targets:
            targets[n].append(method.teacher_trajectory(z, cond, n).cpu())
        bar.update(len(z))
    tensors = {"noise": noise, **{f"nfe{n}": torch.cat(parts) for n, parts in targets.items()}}
    return tensors, {"prompts": json.dumps(chosen), "seconds": f"{time.perf_counter() - began:.3f}"}


def _pool_file(folder: Path, k: int) -> Path:
    return folder / f"pool-{k:05d}.safetensors"


@dataclass
class SFDResult:
    path: Path
    nfes: list[int]
    loss: float | None

    def summary(self) -> str:
        return f"SFD student (NFE {', '.join(map(str, self.nfes))}) written to {self.path}"


def train_sfd(job: Job, config: SFDConfig) -> SFDResult:
    """Distil ``job.pipe`` into one LoRA student for every NFE of ``config.nfes``, on trajectories from
    ``job.prompts`` (no data is needed: SFD follows the teacher's ODE), and write it to ``job.out``: every NFE's
    exact timesteps and sigmas, default ``config.default_nfe``, sampler "euler" (the first-order step it was
    trained as), the guidance it samples at."""
    config = settle(config)
    run = config.run
    student = job.student(run.lora, run.seed, student_prediction=config.student_prediction)
    method = SFD(student, job.prompts, config)
    pool = capture_pool(method, config.pool, run.seed, job.stage_dir("teacher_pool"), job.accelerator) \
        if config.pool else None
    result = job.train(method, run, config.steps, "sfd")
    seconds = result.seconds + (pool.seconds if pool is not None else 0.0)
    job.on_main(lambda: student.write(
        job.out, method="sfd", teacher=job.teacher, nfe_timesteps=method.timesteps, default_nfe=config.default_nfe,
        comfy_sampler="euler", guidance=sampling_guidance(config), extra={
            "teacher_solver": "dpmpp_2m", "teacher_substeps": config.teacher_substeps,
            "teacher_from": config.teacher_from, "distance": config.distance,
            "distilled_at_guidance": distilled_guidance(config),
            "nfe_conditioning": False, "final_loss": result.loss, "training": training_record(config, job.inputs),
            **({"teacher_pool": {"draws": config.pool, "seconds": round(pool.seconds, 1)}} if pool else {}),
            **cost_record(seconds, job.accelerator)}))
    return SFDResult(path=job.out, nfes=sorted(method.timesteps), loss=result.loss)


METHOD = MethodEntry(
    SFDConfig, train_sfd,
    summary="SFD: one LoRA student for a set of NFEs, along its own trajectory (seed 004)",
    description="The student takes one first-order step where the teacher takes --teacher-substeps DPM-Solver++ "
                "steps, at the few timesteps it samples at, along its own trajectory; one student for every NFE "
                "of --nfe, on --prompts, with the teacher at --guidance. Re-running resumes.")
