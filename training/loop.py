"""The one training loop: a method supplies its modules, ``batch(step)`` and ``loss(step, batch)``;
this drives them with accelerate, a cosine LR, grad clipping, progress, TensorBoard and exact resume.

Exact resume rests on one rule: before each step the loop seeds torch, ``random`` and numpy from
``(seed, step, process)``, so a method that draws its batch and noise from the global RNGs makes
every step a pure function of the weights, the optimizer state and the step number, and those
three are what the checkpoint stores. A run stopped after step k and resumed ends bit-identical to
an uninterrupted one.

Two-player methods (a GAN's generator and discriminator, a score-distillation generator and its fake
score) declare ``players``: one optimizer each, over the modules it names. Their ``loss`` then yields
``(player, loss)`` pairs, and the loop updates that player before drawing the next pair, so a later
loss sees the earlier players' new weights (alternating updates, as GANs are trained).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.io import FileFormatError
from .checkpoint import load_training_state, save_training_state

CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointMismatch(ValueError):
    """A run folder's checkpoint written by a run of other settings (seed, number of steps, the method's own
    ``TrainConfig.settings``): resuming would not continue that run."""


class NonFiniteLoss(FloatingPointError):
    """A step's loss is NaN or infinite: training stops before the weights take it in."""


class Method(Protocol):
    """What a distillation method hands the loop.

    ``modules``: the modules whose state is checkpointed; their parameters with
    ``requires_grad`` are the ones trained (a LoRA method passes a module holding just its adapters).
    ``batch(step)``: the inputs of one step, drawn from the global RNGs (the loop seeds them).
    ``loss(step, batch)``: a scalar to minimise; it may also draw from the global RNGs.

    Optional:
    ``players``: ``{name: Player}``, one optimizer per player; ``loss`` then returns ``(name, loss)`` pairs
    (an iterable, best a generator, or a mapping), each applied to its player's parameters alone before the
    next pair is drawn. A player may be left out of a step (e.g. a generator updated every k-th step).
    ``after_step(step)``: called once the updates of step ``step`` are done; the scalars it returns, if
    any, are logged (TensorBoard and the console), e.g. an evaluation every N steps.
    """

    modules: dict[str, torch.nn.Module]

    def batch(self, step: int) -> Any: ...

    def loss(self, step: int, batch: Any) -> torch.Tensor | Iterable[tuple[str, torch.Tensor]]: ...


@dataclass
class Player:
    """One optimizer of a multi-player method: the trainable parameters of ``modules`` (names in
    ``method.modules``), with its own peak LR and Adam betas (None: the TrainConfig's)."""

    modules: tuple[str, ...]
    lr: float | None = None
    betas: tuple[float, float] | None = None


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one run (AdamW; weight_decay 0 is Adam)."""

    steps: int
    lr: float = 1e-3
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0          # the cosine ends at lr * final_lr_fraction
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0       # None: no clipping
    seed: int = 0
    run_dir: str | Path | None = None        # checkpoints (and TensorBoard logs) go here
    checkpoint_every: int = 500              # steps; a checkpoint is also written at the end
    resume: bool = True                      # continue from run_dir's checkpoint if there is one
    tensorboard: bool = False
    log_every: int = 10
    desc: str = "training"
    settings: dict | None = None             # what else defines the run (JSON values: a method's config, an
                                             # input's digest); kept in the checkpoint, a resume under others
                                             # is refused with the differences listed


@dataclass
class TrainResult:
    step: int                 # steps done in total (== config.steps)
    loss: float | None        # loss of the last step (kept in the checkpoint: a run resumed after its end
                              # reports it too); with players: the last loss applied
    losses: dict[str, float] = field(default_factory=dict)  # with players: each one's last loss
    seconds: float = 0.0      # wall-clock of all config.steps, summed over resumed runs


def cost_record(seconds: float, accelerator) -> dict:
    """What a student or shortcut file records about its training's cost: wall-clock seconds in the training
    loop (summed over stages and resumed runs), and where they were spent."""
    device = accelerator.device
    return {"train_seconds": round(seconds, 1), "device": str(device), "processes": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0, final_fraction: float = 0.0) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine annealing to the floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * final_fraction
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_step(seed: int, step: int, process: int = 0) -> None:
    """Seed torch (every device), ``random`` and numpy from (seed, step, process)."""
    words = np.random.SeedSequence([seed, step, process]).generate_state(2)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words)


BOOKKEEPING = ("steps", "seed", "eval_every", "checkpoint_every")  # checked apart, or not changing the run


def settings_of(config, **inputs: str) -> dict:
    """A method's config dataclass as ``TrainConfig.settings``: every field but the bookkeeping (the step count
    and seed the loop checks itself, how often it evaluates or checkpoints), plus a digest of each input it trains
    from (``vae=<sha256>``)."""
    return {**{k: v for k, v in asdict(config).items() if k not in BOOKKEEPING}, **inputs}


def _check_settings(checkpoint: Path, theirs: dict | None, mine: dict | None) -> None:
    """Refuse to resume a checkpoint whose recorded settings differ from this run's, naming each difference. A
    checkpoint that recorded none (written before settings were kept, or by a run that gave none) resumes."""
    if theirs is None or mine is None:
        return
    mine = json.loads(json.dumps(mine))  # as the checkpoint holds them: tuples are lists
    changed = [k for k in sorted(theirs.keys() | mine.keys()) if theirs.get(k) != mine.get(k)]
    if changed:
        listed = "; ".join(f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in changed)
        raise CheckpointMismatch(f"{checkpoint}: written by a run with other settings ({listed}); resume with its "
                                 "settings or use another run folder")


def train(method: Method, config: TrainConfig, accelerator=None) -> TrainResult:
    """Run ``method`` from its checkpoint (if any) to ``config.steps`` steps.

    Modules are moved to the accelerator's device. Under ``accelerate launch`` each process draws
    its own batches (the process index is part of the step seed) and gradients are averaged over
    processes before clipping, so no module needs wrapping; resume is then exact for the same
    number of processes.
    """
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    accelerator = accelerator or Accelerator()
    modules = {name: m.to(accelerator.device) for name, m in method.modules.items()}
    players = getattr(method, "players", None)
    groups = _player_params(players, modules, config) if players else \
        {"optimizer": ([p for m in modules.values() for p in m.parameters() if p.requires_grad], config.lr,
                       config.betas)}
    for name, (params, _, _) in groups.items():
        if not params:
            raise ValueError(f"{config.desc}: " + (f"player {name!r} has no trainable parameters" if players
                                                   else "the method has no trainable parameters"))
    optimizers = {name: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=config.weight_decay)
                  for name, (params, lr, betas) in groups.items()}
    after_step = getattr(method, "after_step", None)

    run_dir = Path(config.run_dir) if config.run_dir is not None else None
    checkpoint = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    start, seconds_before = 0, 0.0
    loss_value, losses = None, {}
    if checkpoint is not None and config.resume and checkpoint.is_file():
        start, extra = load_training_state(checkpoint, modules, optimizers)
        missing = [key for key in ("seed", "seconds") if extra.get(key) is None]
        if missing:
            raise FileFormatError(f"{checkpoint}: not a checkpoint of this loop (no {', '.join(missing)})")
        seconds_before = extra["seconds"]
        loss_value, losses = extra.get("loss"), dict(extra.get("losses") or {})
        if extra["seed"] != config.seed:
            raise CheckpointMismatch(f"{checkpoint}: written by a run with seed {extra.get('seed')}, this run has "
                                     f"seed {config.seed}; resume with the same seed or use another run folder")
        if extra.get("steps") not in (None, config.steps):  # the learning-rate schedule follows the step count
            raise CheckpointMismatch(f"{checkpoint}: written by a run of {extra['steps']} steps, this run has "
                                     f"{config.steps}; resume with the same number of steps or use another run "
                                     "folder")
        _check_settings(checkpoint, extra.get("settings"), config.settings)
    optimizers = {name: accelerator.prepare(opt) for name, opt in optimizers.items()}
    writer = _tensorboard(run_dir, accelerator) if config.tensorboard else None

    began = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - began

    def save(step: int) -> None:
        if checkpoint is not None and accelerator.is_main_process:
            save_training_state(checkpoint, modules, {n: opt.optimizer for n, opt in optimizers.items()}, step,
                                extra={"seed": config.seed, "steps": config.steps, "seconds": elapsed(),
                                       "loss": loss_value, "losses": losses,
                                       **({"settings": config.settings} if config.settings is not None else {})})
        accelerator.wait_for_everyone()

    def update(name: str, loss: torch.Tensor, step: int) -> tuple[float, float | None]:
        """Backpropagate ``loss`` into player ``name``'s parameters alone and step its optimizer."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if accelerator.num_processes > 1:  # every process stops, not one of them
            bad = accelerator.reduce(bad, reduction="sum")
        if bad.item():
            whose = f" of the {name}" if players else ""
            raise NonFiniteLoss(f"{config.desc}: the loss{whose} is not finite at step {step + 1}; nothing of this "
                                "step was kept (the work folder holds the last checkpoint): lower --lr, check the "
                                "data for NaN or infinite values, or compute in float32 (--dtype)")
        params, peak, _ = groups[name]
        if players:  # this player's parameters alone: the others' losses are not theirs to follow
            accelerator.backward(loss, inputs=params)
        else:
            accelerator.backward(loss)
        if accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        grad_norm = (accelerator.clip_grad_norm_(params, config.max_grad_norm)
                     if config.max_grad_norm is not None else None)
        lr = cosine_lr(step, config.steps, peak, config.warmup_steps, config.final_lr_fraction)
        for group in optimizers[name].param_groups:
            group["lr"] = lr
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return lr, grad_norm

    for m in modules.values():
        m.train()
    bar = tqdm(total=config.steps, initial=start, desc=config.desc,
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for step in range(start, config.steps):
        seed_step(config.seed, step, accelerator.process_index)
        batch = send_to_device(method.batch(step), accelerator.device)
        if players:
            scalars = {}
            for name, loss in _autocast_pairs(method.loss(step, batch), accelerator):
                if name not in groups:
                    raise ValueError(f"{config.desc}: the method returned a loss for {name!r}, not one of its "
                                     f"players {sorted(groups)}")
                lr, grad_norm = update(name, loss, step)
                loss_value = losses[name] = loss.detach().float().item()
                scalars.update({f"loss/{name}": loss_value, f"lr/{name}": lr})
                if grad_norm is not None:
                    scalars[f"grad_norm/{name}"] = float(grad_norm)
            postfix = {name: f"{value:.4g}" for name, value in losses.items()}
        else:
            with accelerator.autocast():
                loss = method.loss(step, batch)
            lr, grad_norm = update("optimizer", loss, step)
            loss_value = loss.detach().float().item()
            scalars = {"loss": loss_value, "lr": lr}
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            postfix = {"loss": f"{loss_value:.4g}", "lr": f"{lr:.2e}"}
        bar.update()
        bar.set_postfix(postfix)
        if writer is not None and (step + 1) % config.log_every == 0:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step + 1)
        reported = after_step(step) if after_step is not None else None
        if reported:
            bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in reported.items()))
            if writer is not None:
                for key, value in reported.items():
                    writer.add_scalar(key, value, step + 1)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save(step + 1)
    bar.close()
    if start < config.steps:
        save(config.steps)
    seconds = elapsed()
    if writer is not None:
        writer.close()
    for m in modules.values():
        m.eval()
    return TrainResult(step=config.steps, loss=loss_value, losses=losses, seconds=seconds)


def _player_params(players: dict[str, Player], modules: dict[str, torch.nn.Module], config: TrainConfig) -> dict:
    """``{player: (trainable parameters, peak lr, betas)}``; every module named exists and has one player."""
    owner: dict[str, str] = {}
    groups = {}
    for name, player in players.items():
        for module in player.modules:
            if module not in modules:
                raise ValueError(f"{config.desc}: player {name!r} trains module {module!r}, which the method does "
                                 f"not have (modules: {sorted(modules)})")
            if module in owner:
                raise ValueError(f"{config.desc}: module {module!r} is trained by both {owner[module]!r} and "
                                 f"{name!r}")
            owner[module] = name
        params = [p for module in player.modules for p in modules[module].parameters() if p.requires_grad]
        groups[name] = (params, player.lr if player.lr is not None else config.lr,
                        player.betas if player.betas is not None else config.betas)
    return groups


def _autocast_pairs(pairs: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                    accelerator) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(player, loss)`` pairs of a multi-player step, each computed under autocast (a generator's
    losses are computed as they are drawn, after the previous player's update)."""
    iterator = iter(pairs.items() if isinstance(pairs, Mapping) else pairs)
    while True:
        with accelerator.autocast():
            pair = next(iterator, None)
        if pair is None:
            return
        yield pair


def _tensorboard(run_dir: Path | None, accelerator):
    """A SummaryWriter under ``run_dir/tensorboard`` on the main process, or None (with a warning)."""
    if not accelerator.is_main_process:
        return None
    if run_dir is None:
        warnings.warn("TensorBoard logging needs a run folder; not logging", stacklevel=3)
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed (pip install tensorboard); not logging", stacklevel=3)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
