"""DisBack (seed 002: Zhang et al., "Distribution Backtracking Builds A Faster Convergence Trajectory for One-step
Diffusion Distillation"): a one-step generator trained by score distillation, first against the intermediate
models of a recorded degradation path, last one first, and only then against the teacher.

Everything is a LoRA adapter of the one teacher UNet:

- ``"student"``: the generator, called once on pure noise at the noisiest timestep (x0 from its output, read as
  the teacher's prediction type or as ``student_prediction``), as a 1-step student file samples it. The score
  models below (degrade, fake) keep the teacher's reading.
- ``"degrade"``: stage one, degradation recording. A copy of the teacher (B = 0) is fine-tuned by the ordinary
  denoising loss on samples of the *initial* generator, so it drifts from the teacher's distribution toward the
  generator's; its weights are checkpointed ``path_checkpoints`` (K) times, evenly over ``degradation_steps``.
  Node 0 is the teacher itself, node K the most degraded, a score model of the initial generator.
- ``"fake"``: the fake score, trained all along stage two by the same denoising loss on the current generator's
  samples. It starts as node K (which already models the initial generator).

Stage two, distribution backtracking: ``steps_per_node`` updates against node K, then K - 1, ..., then 1, and the
remaining steps against the teacher (node 0). Each step updates the fake score on a generator batch, then the
generator by the score difference on the same (noised) samples: the "real" score is the current node (with
classifier-free guidance ``real_guidance``), the "fake" score the fake LoRA, and the generator's sample moves
along ``x0_fake - x0_real`` normalised by ``mean |x - x0_real|`` (DMD's form, the one DisBack's code uses)
through ``loss = 0.5 |x - sg(x - grad)|^2``. No gradient goes through either score model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.io import atomic_save_file, read_safetensors
from ..schedulers.prediction import denoising_target
from .config import (RunConfig, Settings, SettingError, check_warmup, run_config, setting, student_prediction_setting,
                     training_record)
from .data import drop_prompts, sample_prompts
from .lora import Conditioning, LoraAdapters, LoraStudent
from .loop import Player, cost_record
from .one_step import BEST_FILE, BestGenerator, EvalConfig, one_step_sample, write_one_step_student
from .runner import Job, MethodEntry, settle

DEGRADE = "degrade"
FAKE = "fake"
TEACHER_NODE = 0


@dataclass
class DisBackConfig(Settings):
    """Stage one records ``path_checkpoints`` nodes in ``degradation_steps``; stage two runs ``steps`` updates,
    ``steps_per_node`` against each node (last first) and the rest against the teacher.

    ``path_checkpoints=0`` turns backtracking off: no stage one, the fake score starts as the teacher and the
    teacher is the target from the first step (plain score distillation, the paper's baseline). The generator,
    degrade and fake adapters all have the shape ``run.lora``; ``run.lr`` is the generator's learning rate."""

    run: RunConfig = run_config(lora={}, batch_size=32, lr=1e-4)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    degradation_steps: int = setting(400, ge=1, help="length of stage one (degradation recording)")
    path_checkpoints: int = setting(4, ge=0, help="nodes recorded along the degradation path (evenly spaced); 0 "
                                                  "turns backtracking off (no stage one: the fake score starts as "
                                                  "the teacher, the baseline the paper compares to)")
    steps_per_node: int = setting(250, ge=1, help="stage-two steps against each node; the rest of --steps distils "
                                                  "the teacher")
    steps: int = setting(2000, ge=1, help="stage-two steps")
    fake_lr: float = setting(1e-4, gt=0, help="fake score's learning rate")
    degradation_lr: float = setting(1e-4, gt=0, help="the degrade adapter's learning rate in stage one")
    fake_updates: int = setting(1, ge=1, help="fake-score updates per generator update")
    score_timesteps: tuple[int, int] = setting((20, 980), ge=0, metavar=("LO", "HI"),
                                               help="the generator's loss noises its samples to a timestep uniform "
                                                    "in [LO, HI]")
    real_guidance: float | None = setting(None, ge=0, preset="guidance", fallback=7.5,
                                          help="CFG of the real score (node or teacher); the student then samples "
                                               "at guidance 1")
    p_uncond: float = setting(0.1, ge=0, le=1, help="fraction of empty prompts (so that the nodes' unconditional "
                                                    "branch degrades too)")
    latent_size: int | None = setting(None, ge=1, teacher_default="latent_size",
                                      help="latent height = width (default: the UNet's)")
    student_prediction: str | None = student_prediction_setting()

    def check(self) -> None:
        check_warmup(self, "steps", *(("degradation_steps",) if self.path_checkpoints else ()))
        K, L, N = self.path_checkpoints, self.degradation_steps, self.steps_per_node
        if K > L:
            raise SettingError("path_checkpoints", f"need path_checkpoints ({K}) = 0 (no backtracking) or "
                                                   f"1 <= path_checkpoints <= degradation_steps ({L})")
        if self.steps <= K * N:
            raise SettingError("steps", f"stage two needs steps ({self.steps}) > path_checkpoints x steps_per_node "
                                        f"({K} x {N}): the teacher must be the last target")
        lo, hi = self.score_timesteps
        if lo > hi:
            raise SettingError("score_timesteps", f"need LO <= HI, got {list(self.score_timesteps)}")

    def node_steps(self) -> list[int]:
        """The stage-one steps after which nodes 1..K are recorded (K evenly spaced, the last at the end)."""
        K, L = self.path_checkpoints, self.degradation_steps
        return [round(k * L / K) for k in range(1, K + 1)]

    def schedule(self) -> list[tuple[int, int]]:
        """Stage two as ``[(node, steps)]`` in the order visited: K, K-1, ..., 1, then the teacher (node 0)."""
        K, N = self.path_checkpoints, self.steps_per_node
        return [(k, N) for k in range(K, 0, -1)] + [(TEACHER_NODE, self.steps - K * N)]

    def node_at(self, step: int) -> int:
        """The path node stage-two step ``step`` distils against."""
        return max(self.path_checkpoints - step // self.steps_per_node, TEACHER_NODE)


@dataclass
class DisBackResult:
    path: Path                                          # the student file
    node_files: list[Path]                              # nodes 1..K of the degradation path (with a work folder)
    schedule: list[tuple[int, int]]                     # (node, steps) of stage two, in order
    visited: list[int]                                  # the node of every stage-two step run here
    losses: dict[str, float]                            # last losses ("degrade", "fake", "generator")
    evaluations: list[tuple[int, dict[str, float]]]

    def summary(self) -> str:
        return f"DisBack one-step student written to {self.path}"


class PromptBatches:
    """The batches of both stages (prompts with empty ones, their embeddings, the generator's noise, a timestep
    and noise for the denoising loss) and that loss, the one the teacher was trained with."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig):
        if not prompts:
            raise ValueError("DisBack needs at least one prompt")
        self.student, self.prompts, self.latent_shape, self.config = student, list(prompts), latent_shape, config

    def draw(self) -> dict:
        B = self.config.run.batch_size
        prompts = drop_prompts(sample_prompts(self.prompts, B), self.config.p_uncond)
        return {"cond": self.student.embed(prompts), "noise": torch.randn(B, *self.latent_shape),
                "t": torch.randint(self.student.num_train_timesteps, (B,)), "eps": torch.randn(B, *self.latent_shape)}

    def denoising_loss(self, x0: torch.Tensor, batch: dict, adapter: str) -> torch.Tensor:
        """The diffusion loss of ``adapter`` on clean latents ``x0``."""
        t, eps = batch["t"], batch["eps"]
        a, s = self.student.alpha_sigma(t)
        out = self.student.unet_output(a * x0 + s * eps, t, batch["cond"], adapter)
        return F.mse_loss(out, denoising_target(self.student.prediction_type, x0, eps, a, s))


class DegradationRecording:
    """Stage one: the degrade adapter learns the initial generator's samples; nodes 1..K are its checkpoints,
    kept in ``nodes`` and, with ``node_dir``, written there (by the main process) as they are taken."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig,
                 node_dir: Path | None, is_main_process: bool = True):
        self.student, self.batches = student, PromptBatches(student, prompts, latent_shape, config)
        self.degrade = LoraAdapters(student.unet, DEGRADE).requires_grad_(True)
        self.modules = {"degrade": self.degrade}
        self.record_at = {s: k for k, s in enumerate(config.node_steps(), start=1)}
        self.node_dir, self.is_main_process = node_dir, is_main_process
        self.nodes: dict[int, dict[str, torch.Tensor]] = {}

    def batch(self, step: int) -> dict:
        return self.batches.draw()

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        with torch.no_grad():  # the generator as it starts (its LoRA untrained): what the path degrades toward
            x0 = one_step_sample(self.student, batch["noise"], batch["cond"])
        return self.batches.denoising_loss(x0, batch, DEGRADE)

    def after_step(self, step: int) -> None:
        k = self.record_at.get(step + 1)
        if k is not None:
            self.nodes[k] = {key: v.detach().cpu().clone() for key, v in self.degrade.state_dict().items()}
            if self.node_dir is not None and self.is_main_process:
                atomic_save_file(self.nodes[k], node_file(self.node_dir, k),
                                 {"format": "direct_distill.disback_node", "node": k, "step": step + 1})


class DistributionBacktracking:
    """Stage two: the fake score and the generator, against the path's nodes in reverse order, then the teacher."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig,
                 path: dict[int, dict[str, torch.Tensor]], evaluation: BestGenerator | None = None):
        lo, hi = config.score_timesteps
        if hi >= student.num_train_timesteps:
            raise SettingError("score_timesteps", f"must lie below the teacher's {student.num_train_timesteps} "
                                                  f"timesteps, got {[lo, hi]}")
        missing = sorted(set(range(1, config.path_checkpoints + 1)) - path.keys())
        if missing:
            raise ValueError(f"the degradation path lacks nodes {missing}")
        self.student, self.config, self.path, self.evaluation = student, config, path, evaluation
        self.batches = PromptBatches(student, prompts, latent_shape, config)
        self.degrade = LoraAdapters(student.unet, DEGRADE).requires_grad_(False)
        self.fake = LoraAdapters(student.unet, FAKE)
        if config.path_checkpoints:
            with torch.no_grad():
                self.fake.load_state_dict(path[config.path_checkpoints])  # a score model of the initial generator
        # else the fake score starts as the teacher (the adapter's B = 0): no backtracking
        self.fake.requires_grad_(True)
        self.modules = {"generator": student.adapters, "fake": self.fake}
        self.players = {"fake": Player(("fake",), lr=config.fake_lr),
                        "generator": Player(("generator",), lr=config.run.lr)}
        self.latent_shape = latent_shape
        self.visited: list[int] = []
        self._loaded: int | None = None

    def real_adapter(self, node: int) -> str | None:
        """The adapter carrying path node ``node`` (None: the bare teacher), loading its weights if needed."""
        if node == TEACHER_NODE:
            return None
        if self._loaded != node:
            with torch.no_grad():
                self.degrade.load_state_dict(self.path[node])
            self._loaded = node
        return DEGRADE

    def batch(self, step: int) -> dict:
        batch = self.batches.draw()
        lo, hi = self.config.score_timesteps
        B = self.config.run.batch_size
        batch["t_score"] = torch.randint(lo, hi + 1, (B,))
        batch["eps_score"] = torch.randn(B, *self.latent_shape)
        return batch

    def real_x0(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, adapter: str | None) -> torch.Tensor:
        """The real score's clean-latent prediction, with classifier-free guidance ``real_guidance``."""
        return self.student.denoise(z, t, cond, adapter, self.config.real_guidance)[0]

    def loss(self, step: int, batch: dict):
        node = self.config.node_at(step)
        self.visited.append(node)
        real = self.real_adapter(node)
        cond = batch["cond"]
        update_generator = (step + 1) % self.config.fake_updates == 0
        with torch.set_grad_enabled(update_generator):
            x = one_step_sample(self.student, batch["noise"], cond)
        yield "fake", self.batches.denoising_loss(x.detach(), batch, FAKE)
        if not update_generator:
            return
        t = batch["t_score"]
        a, s = self.student.alpha_sigma(t)
        z = a * x.detach() + s * batch["eps_score"]
        with torch.no_grad():
            x0_real = self.real_x0(z, t, cond, real)
            x0_fake = self.student.denoise(z, t, cond, FAKE)[0]
            weight = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
            grad = torch.nan_to_num((x0_fake - x0_real) / weight)
        yield "generator", 0.5 * F.mse_loss(x, (x - grad).detach())

    def after_step(self, step: int) -> dict[str, float] | None:
        return self.evaluation.after_step(step) if self.evaluation is not None else None


def node_file(node_dir: Path, k: int) -> Path:
    return node_dir / f"node_{k}.safetensors"


def train_disback(job: Job, config: DisBackConfig) -> DisBackResult:
    """Record the degradation path, distil a one-step student of ``job.pipe`` back along it for ``job.prompts``
    (DisBack needs no data), and write its file to ``job.out`` (NFE 1 at the noisiest timestep, guidance 1).

    The work folder holds ``degradation/`` (stage one's checkpoint and the path's nodes,
    ``path/node_<k>.safetensors``) and ``backtracking/`` (stage two's checkpoint). ``job.evaluate`` is called every
    ``config.evaluation.eval_every`` stage-two steps, as in ``train_gdd``.
    """
    config = settle(config)
    run, evaluation = config.run, config.evaluation
    schedule = config.schedule()
    student = job.student(run.lora, run.seed, frozen_adapters=[DEGRADE, FAKE],
                          student_prediction=config.student_prediction)
    size = config.latent_size or student.unet.config.sample_size
    latent_shape = (student.unet.config.in_channels, size, size)
    node_dir = job.stage_dir("degradation") / "path" if job.work is not None else None
    main = job.accelerator.is_main_process

    path: dict[int, dict[str, torch.Tensor]] = {}
    stage1 = None
    if config.path_checkpoints:
        recording = DegradationRecording(student, job.prompts, latent_shape, config, node_dir, main)
        stage1 = job.train(recording, run, config.degradation_steps, "disback: degradation", stage="degradation",
                           lr=config.degradation_lr)
        path = dict(recording.nodes)
    for k in range(1, config.path_checkpoints + 1):
        if k not in path:  # recorded by an earlier run of this work folder
            file = node_file(node_dir, k) if node_dir is not None else None
            if file is None or not file.is_file():
                raise FileNotFoundError(f"degradation path node {k} is missing ({file}); delete "
                                        f"{job.stage_dir('degradation') or 'the work folder'} to record it again")
            path[k] = read_safetensors(file)[0]

    best = BestGenerator(student, latent_shape, run.batch_size, job.evaluate, evaluation.eval_every,
                         job.stage_dir("backtracking") / BEST_FILE if job.work is not None else None, main)
    backtracking = DistributionBacktracking(student, job.prompts, latent_shape, config, path, best)
    stage2 = job.train(backtracking, run, config.steps,
                       "disback: backtracking" if config.path_checkpoints else "disback: no backtracking",
                       stage="backtracking", seed=run.seed + 1)
    selected = best.select(evaluation.keep_best)
    losses = {**({"degrade": stage1.loss} if stage1 is not None and stage1.loss is not None else {}),
              **stage2.losses}
    seconds = (stage1.seconds if stage1 is not None else 0.0) + stage2.seconds
    job.on_main(lambda: write_one_step_student(student, job.out, method="disback", teacher=job.teacher, extra={
        "schedule": [{"node": k, "steps": n} for k, n in schedule], "node_steps": config.node_steps(),
        "backtracking": config.path_checkpoints > 0, "real_guidance": config.real_guidance, "final_losses": losses,
        "evaluations": best.evaluations, "selected": selected or {"step": config.steps, "fd": None},
        "training": training_record(config, job.inputs), **cost_record(seconds, job.accelerator)}))
    return DisBackResult(path=job.out, node_files=[node_file(node_dir, k) for k in sorted(path)] if node_dir else [],
                         schedule=schedule, visited=backtracking.visited, losses=losses,
                         evaluations=best.evaluations)


METHOD = MethodEntry(
    DisBackConfig, train_disback,
    summary="DisBack: one-step score distillation along a recorded degradation path (seed 002)",
    description="Stage one tunes a copy of the teacher toward the initial one-step generator's samples and records "
                "--path-checkpoints nodes; stage two trains the generator by score distillation (a LoRA fake "
                "score) against those nodes, last first, --steps-per-node each, then against the teacher. "
                "Re-running resumes.")
