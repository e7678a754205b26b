"""DisBack (seed 002: Zhang et al., "Distribution Backtracking Builds A Faster Convergence Trajectory for One-step
Diffusion Distillation"): a one-step generator trained by score distillation, first against the intermediate
models of a recorded degradation path, last one first, and only then against the teacher.

Everything is a LoRA adapter of the one teacher UNet:

- ``"student"``: the generator, called once on pure noise at the noisiest timestep (x0 from its epsilon), as a
  1-step student file samples it.
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

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.io import atomic_save_file, read_safetensors
from .gdd import BEST_FILE, Evaluate, PeriodicEvaluation, one_step_sample, sample_function, write_one_step_student
from .lora import LoraAdapters, LoraSpec, LoraStudent, drop_prompts, split_prediction
from .loop import Player, TrainConfig, add_seconds, cost_record, train

DEGRADE = "degrade"
FAKE = "fake"
TEACHER_NODE = 0


@dataclass
class DisBackConfig:
    """Stage one records ``path_checkpoints`` nodes in ``degradation_steps``; stage two runs ``steps`` updates,
    ``steps_per_node`` against each node (last first) and the rest against the teacher.

    ``path_checkpoints=0`` turns backtracking off: no stage one, the fake score starts as the teacher and the
    teacher is the target from the first step (plain score distillation, the paper's baseline)."""

    degradation_steps: int = 400
    path_checkpoints: int = 4
    steps_per_node: int = 250
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4                  # generator
    fake_lr: float = 1e-4             # fake score
    degradation_lr: float = 1e-4      # the degrade adapter in stage one
    fake_updates: int = 1             # fake-score updates per generator update (stage-two steps per generator step)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    lora: LoraSpec = field(default_factory=LoraSpec)  # generator, degrade and fake adapters alike
    score_timesteps: tuple[int, int] = (20, 980)  # the generator's loss noises its samples to t in this range
    real_guidance: float = 1.0        # CFG of the real score (node or teacher); the student then samples at 1
    p_uncond: float = 0.1             # fraction of empty prompts (so the nodes' unconditional branch degrades too)
    latent_size: int | None = None    # latent height = width (default: the UNet's sample_size)
    eval_every: int = 0               # stage-two steps between calls of the evaluate hook (0: never)
    keep_best: bool = True            # with evaluations: write the generator of the lowest FD, not the last
    seed: int = 0
    checkpoint_every: int = 500
    tensorboard: bool = False

    def node_steps(self) -> list[int]:
        """The stage-one steps after which nodes 1..K are recorded (K evenly spaced, the last at the end)."""
        K, L = self.path_checkpoints, self.degradation_steps
        if isinstance(K, bool) or not isinstance(K, int) or K < 0 or (K > 0 and (not isinstance(L, int) or L < K)):
            raise ValueError(f"need path_checkpoints ({K}) = 0 (no backtracking) or 1 <= path_checkpoints <= "
                             f"degradation_steps ({L})")
        return [round(k * L / K) for k in range(1, K + 1)]

    def schedule(self) -> list[tuple[int, int]]:
        """Stage two as ``[(node, steps)]`` in the order visited: K, K-1, ..., 1, then the teacher (node 0)."""
        K, N = self.path_checkpoints, self.steps_per_node
        if not isinstance(N, int) or N < 1 or self.steps <= K * N:
            raise ValueError(f"stage two needs steps ({self.steps}) > path_checkpoints x steps_per_node "
                             f"({K} x {N}): the teacher must be the last target")
        return [(k, N) for k in range(K, 0, -1)] + [(TEACHER_NODE, self.steps - K * N)]

    def node_at(self, step: int) -> int:
        """The path node stage-two step ``step`` distils against."""
        return max(self.path_checkpoints - step // self.steps_per_node, TEACHER_NODE)


@dataclass
class DisBackResult:
    path: Path                                          # the student file
    node_files: list[Path]                              # nodes 1..K of the degradation path (with a work_dir)
    schedule: list[tuple[int, int]]                     # (node, steps) of stage two, in order
    visited: list[int]                                  # the node of every stage-two step run here
    losses: dict[str, float]                            # last losses run here ("degrade", "fake", "generator")
    evaluations: list[tuple[int, dict[str, float]]]


def denoising_target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    """What a UNet of this prediction type should output at ``z = a x0 + s eps``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return x0


class _PromptBatches:
    """Shared batch drawing: prompts (with empty ones), their embeddings and the generator's noise."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig):
        if not prompts:
            raise ValueError("DisBack needs at least one prompt")
        self.student, self.prompts, self.latent_shape, self.config = student, list(prompts), latent_shape, config

    def draw(self) -> dict:
        B = self.config.batch_size
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (B,)).tolist()]
        prompts = drop_prompts(prompts, self.config.p_uncond)
        return {"cond": self.student.embed(prompts), "noise": torch.randn(B, *self.latent_shape),
                "t": torch.randint(self.student.num_train_timesteps, (B,)), "eps": torch.randn(B, *self.latent_shape)}

    def denoising_loss(self, x0: torch.Tensor, batch: dict, adapter: str) -> torch.Tensor:
        """The diffusion loss of ``adapter`` on clean latents ``x0`` (what the teacher was trained with)."""
        t, eps = batch["t"], batch["eps"]
        a, s = self.student.alpha_sigma(t)
        out = self.student.unet_output(a * x0 + s * eps, t, batch["cond"], adapter)
        return F.mse_loss(out, denoising_target(self.student.prediction_type, x0, eps, a, s))


class DegradationRecording(_PromptBatches):
    """Stage one: the degrade adapter learns the initial generator's samples; nodes 1..K are its checkpoints,
    kept in ``nodes`` and, with ``node_dir``, written there as they are taken."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig,
                 node_dir: Path | None):
        super().__init__(student, prompts, latent_shape, config)
        self.degrade = LoraAdapters(student.unet, DEGRADE).requires_grad_(True)
        self.modules = {"degrade": self.degrade}
        self.record_at = {s: k for k, s in enumerate(config.node_steps(), start=1)}
        self.node_dir = node_dir
        self.nodes: dict[int, dict[str, torch.Tensor]] = {}

    def batch(self, step: int) -> dict:
        return self.draw()

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        with torch.no_grad():  # the generator as it starts (its LoRA untrained): what the path degrades toward
            x0 = one_step_sample(self.student, batch["noise"], batch["cond"])
        return self.denoising_loss(x0, batch, DEGRADE)

    def after_step(self, step: int) -> None:
        k = self.record_at.get(step + 1)
        if k is not None:
            self.nodes[k] = {key: v.detach().cpu().clone() for key, v in self.degrade.state_dict().items()}
            if self.node_dir is not None:
                atomic_save_file(self.nodes[k], node_file(self.node_dir, k),
                                 {"format": "direct_distill.disback_node", "node": k, "step": step + 1})


class DistributionBacktracking(PeriodicEvaluation, _PromptBatches):
    """Stage two: the fake score and the generator, against the path's nodes in reverse order, then the teacher."""

    def __init__(self, student: LoraStudent, prompts: Sequence[str], latent_shape, config: DisBackConfig,
                 path: dict[int, dict[str, torch.Tensor]], evaluate: Evaluate | None = None):
        super().__init__(student, prompts, latent_shape, config)
        lo, hi = config.score_timesteps
        if not 0 <= lo <= hi < student.num_train_timesteps:
            raise ValueError(f"score_timesteps must be 0 <= lo <= hi < {student.num_train_timesteps}, got "
                             f"{config.score_timesteps}")
        if config.fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {config.fake_updates}")
        config.schedule()  # validates the step counts
        missing = sorted(set(range(1, config.path_checkpoints + 1)) - path.keys())
        if missing:
            raise ValueError(f"the degradation path lacks nodes {missing}")
        self.path, self.evaluate = path, evaluate
        self.degrade = LoraAdapters(student.unet, DEGRADE).requires_grad_(False)
        self.fake = LoraAdapters(student.unet, FAKE)
        if config.path_checkpoints:
            with torch.no_grad():
                self.fake.load_state_dict(path[config.path_checkpoints])  # a score model of the initial generator
        # else the fake score starts as the teacher (the adapter's B = 0): no backtracking
        self.fake.requires_grad_(True)
        self.modules = {"generator": student.adapters, "fake": self.fake}
        self.players = {"fake": Player(("fake",), lr=config.fake_lr),
                        "generator": Player(("generator",), lr=config.lr)}
        self.generate = sample_function(student, latent_shape, config.batch_size)
        self.visited: list[int] = []
        self.evaluations: list[tuple[int, dict[str, float]]] = []
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
        batch = self.draw()
        lo, hi = self.config.score_timesteps
        batch["t_score"] = torch.randint(lo, hi + 1, (self.config.batch_size,))
        batch["eps_score"] = torch.randn(self.config.batch_size, *self.latent_shape)
        return batch

    def real_x0(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, adapter: str | None) -> torch.Tensor:
        """The real score's clean-latent prediction, with classifier-free guidance ``real_guidance``."""
        g = self.config.real_guidance
        a, s = self.student.alpha_sigma(t)
        if g == 1.0:
            out = self.student.unet_output(z, t, cond, adapter)
        else:
            uncond = self.student.embed([""] * len(z))
            out_u, out_c = self.student.unet_output(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, cond]),
                                                    adapter).chunk(2)
            out = out_u + g * (out_c - out_u)
        return split_prediction(out, z.float(), a, s, self.student.prediction_type)[0]

    def loss(self, step: int, batch: dict):
        node = self.config.node_at(step)
        self.visited.append(node)
        real = self.real_adapter(node)
        cond = batch["cond"]
        update_generator = (step + 1) % self.config.fake_updates == 0
        with torch.set_grad_enabled(update_generator):
            x = one_step_sample(self.student, batch["noise"], cond)
        yield "fake", self.denoising_loss(x.detach(), batch, FAKE)
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

def node_file(node_dir: Path, k: int) -> Path:
    return node_dir / f"node_{k}.safetensors"


def train_disback(pipe, prompts: Sequence[str], out: str | os.PathLike, *, config: DisBackConfig | None = None,
                  work_dir: str | os.PathLike | None = None, teacher: str | None = None,
                  evaluate: Evaluate | None = None, accelerator=None) -> DisBackResult:
    """Record the degradation path, distil a one-step student back along it, and write the student file.

    Args:
        pipe: the teacher, an SD1.x/2.x-style diffusers pipeline (its UNet gets the adapters).
        prompts: the prompts the generator is trained for (DisBack needs no data).
        out: the student file (NFE 1 at the noisiest timestep, guidance 1).
        config: path, schedule, guidance and optimisation (default ``DisBackConfig()``).
        work_dir: ``degradation/`` (stage one's checkpoint and the path's nodes, ``path/node_<k>.safetensors``)
            and ``backtracking/`` (stage two's checkpoint); a re-run resumes exactly. None keeps none.
        teacher: the teacher's name recorded in the file (default: the pipeline's ``name_or_path``).
        evaluate: called every ``config.eval_every`` stage-two steps as ``evaluate(step, generate)`` (see
            ``train_gdd``); the scalars it returns are logged and kept.
        accelerator: an ``accelerate.Accelerator`` to share; one is made if None.
    """
    from accelerate import Accelerator

    config = config or DisBackConfig()
    schedule = config.schedule()
    config.node_steps()
    accelerator = accelerator or Accelerator()
    torch.manual_seed(config.seed)  # the LoRAs' initial A
    student = LoraStudent(pipe, config.lora, frozen_adapters=[DEGRADE, FAKE]).to(accelerator.device)
    size = config.latent_size or student.unet.config.sample_size
    latent_shape = (student.unet.config.in_channels, size, size)
    work = Path(work_dir) if work_dir is not None else None
    node_dir = work / "degradation" / "path" if work is not None else None
    common = dict(warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
                  checkpoint_every=config.checkpoint_every, tensorboard=config.tensorboard)

    path: dict[int, dict[str, torch.Tensor]] = {}
    stage1 = None
    if config.path_checkpoints:
        recording = DegradationRecording(student, prompts, latent_shape, config, node_dir)
        stage1 = train(recording, TrainConfig(
            steps=config.degradation_steps, lr=config.degradation_lr, seed=config.seed,
            run_dir=work / "degradation" if work is not None else None, desc="disback: degradation", **common),
            accelerator)
        path = dict(recording.nodes)
    for k in range(1, config.path_checkpoints + 1):
        if k not in path:  # recorded by an earlier run of this work folder
            file = node_file(node_dir, k) if node_dir is not None else None
            if file is None or not file.is_file():
                raise FileNotFoundError(f"degradation path node {k} is missing ({file}); delete "
                                        f"{work / 'degradation' if work else 'the work folder'} to record it again")
            path[k] = read_safetensors(file)[0]

    backtracking = DistributionBacktracking(student, prompts, latent_shape, config, path, evaluate)
    backtracking.track_best(work / "backtracking" / BEST_FILE if work is not None and config.keep_best else None)
    stage2 = train(backtracking, TrainConfig(
        steps=config.steps, lr=config.lr, seed=config.seed + 1,
        run_dir=work / "backtracking" if work is not None else None, desc="disback: backtracking" if config.path_checkpoints else "disback: no backtracking", **common),
        accelerator)
    selected = backtracking.select_best() if config.keep_best else None
    losses = {**({"degrade": stage1.loss} if stage1 is not None and stage1.loss is not None else {}),
              **stage2.losses}
    out = Path(out)
    if accelerator.is_main_process:
        write_one_step_student(student, out, method="disback",
                               teacher=teacher or str(getattr(pipe, "name_or_path", "") or "unknown"), extra={
                                   "schedule": [{"node": k, "steps": n} for k, n in schedule],
                                   "node_steps": config.node_steps(), "backtracking": config.path_checkpoints > 0,
                                   "real_guidance": config.real_guidance,
                                   "final_losses": losses, "evaluations": backtracking.evaluations,
                                   "selected": selected or {"step": config.steps, "fd": None},
                                   "training": asdict(config),
                                   **cost_record(add_seconds(stage1.seconds if stage1 is not None else 0.0,
                                                             stage2.seconds), accelerator)})
    accelerator.wait_for_everyone()
    return DisBackResult(path=out, node_files=[node_file(node_dir, k) for k in sorted(path)] if node_dir else [],
                         schedule=schedule, visited=backtracking.visited, losses=losses,
                         evaluations=backtracking.evaluations)
