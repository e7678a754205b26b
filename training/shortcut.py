"""The shortcut method (seed 000, §3.4 and §4.2): two TimeEmbedNAFNets trained on teacher trajectories.

Stage 1 learns (x_t, t) -> final latent from the captured pairs, L1 for the first 5/6 of its steps
and L2 after; stage 2 learns (frozen stage 1's output, t) -> final latent with L2. Both run in the
shared loop (cosine LR, checkpoints, exact resume) and end in one file written by ``save_shortcut``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.nafnet import PRESETS, TimeEmbedNAFNet, TwoStageShortcut
from ..models.shortcut_file import save_shortcut
from .loop import TrainConfig, add_seconds, cost_record, train
from .trajectories import Trajectories, load_trajectories


@dataclass
class ShortcutConfig:
    """Settings of both stages (the paper: Adam, weight decay 0, cosine annealing, L1 for 5/6)."""

    stage1_preset: str = "lab_stage1"
    stage2_preset: str | None = "lab_stage2"   # None: stage 1 only
    stage1_steps: int = 3000
    stage2_steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    l1_fraction: float = 5 / 6
    holdout: float = 1 / 6          # fraction of trajectories kept out of training (the paper: 20k of 120k)
    band_margin: float = 0.1        # t-band = captured [t_lo, t_hi] widened by this fraction of its width
    seed: int = 0
    checkpoint_every: int = 500
    tensorboard: bool = False


@dataclass
class ShortcutResult:
    path: Path
    t_band: tuple[float, float]
    shortcut: TwoStageShortcut
    heldout_psnr: dict = field(default_factory=dict)   # {"input" | "stage1" | "stage1+2": {"all": dB, "t=...": dB}}


class PairSet:
    """(x_t, t) -> x0 pairs: every capture step of every trajectory, indexed flat."""

    def __init__(self, latents: torch.Tensor, timesteps: torch.Tensor, final: torch.Tensor):
        self.latents, self.timesteps, self.final = latents, timesteps, final
        self.steps = len(timesteps)

    def __len__(self) -> int:
        return len(self.final) * self.steps

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        traj, k = idx // self.steps, idx % self.steps
        return self.latents[traj, k], self.timesteps[k], self.final[traj]


class _PairMethod:
    """Random pairs as batches, for the shared loop."""

    def __init__(self, pairs: PairSet, batch_size: int):
        self.pairs, self.batch_size = pairs, batch_size

    def batch(self, step: int):
        return self.pairs.take(torch.randint(len(self.pairs), (self.batch_size,)))


class DenoiseStage(_PairMethod):
    """Stage 1: (x_t, t) -> x0, L1 for the first ``l1_steps`` steps, then L2 (Zhao et al., via §3.4)."""

    def __init__(self, net: TimeEmbedNAFNet, pairs: PairSet, batch_size: int, l1_steps: int):
        super().__init__(pairs, batch_size)
        self.modules = {"stage1": net}
        self.net, self.l1_steps = net, l1_steps

    def loss(self, step: int, batch) -> torch.Tensor:
        x_t, t, x0 = batch
        loss_fn = F.l1_loss if step < self.l1_steps else F.mse_loss
        return loss_fn(self.net(x_t, t), x0)


class DeblurStage(_PairMethod):
    """Stage 2: frozen stage 1's output -> x0 with L2."""

    def __init__(self, stage1: TimeEmbedNAFNet, net: TimeEmbedNAFNet, pairs: PairSet, batch_size: int):
        super().__init__(pairs, batch_size)
        self.stage1 = stage1.requires_grad_(False).eval()
        self.modules = {"stage2": net}
        self.net = net

    def loss(self, step: int, batch) -> torch.Tensor:
        x_t, t, x0 = batch
        with torch.no_grad():
            rough = self.stage1(x_t, t)
        return F.mse_loss(self.net(rough, t), x0)


@torch.no_grad()
def heldout_psnr(model, pairs: PairSet, device, batch_size: int = 256) -> dict[str, float]:
    """PSNR of ``model(x_t, t)`` against x0 on held-out pairs, in latent space, overall and per timestep.

    PSNR = 10 log10(R^2 / MSE), where R = max - min over all held-out target latents (their data
    range; latents have no fixed peak like 255) and MSE is over every element. ``model=None`` scores
    the input x_t itself, a baseline.
    """
    peak = float(pairs.final.max() - pairs.final.min())
    sq_err = torch.zeros(pairs.steps, dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(pairs)))
        x_t, t, x0 = (v.to(device) for v in pairs.take(idx))
        pred = x_t if model is None else model(x_t, t)
        err = (pred.float() - x0).pow(2).flatten(1).sum(1).double().cpu()
        sq_err.index_add_(0, idx % pairs.steps, err)
    per_step = pairs.final.numel()  # elements scored at each capture step

    def psnr(sq: torch.Tensor, count: int) -> float:
        return float(10 * torch.log10(peak**2 / (sq / count)))

    scores = {"all": psnr(sq_err.sum(), per_step * pairs.steps)}
    scores.update({f"t={float(t):.1f}": psnr(sq_err[k], per_step) for k, t in enumerate(pairs.timesteps)})
    return scores


def split_trajectories(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle trajectory ids with ``seed``; the last ``round(n * holdout)`` (at least one) are held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(n * holdout)) if holdout > 0 else 0
    if n_held >= n:
        raise ValueError(f"holdout={holdout} of {n} trajectories leaves none to train on")
    return perm[:n - n_held], perm[n - n_held:]


def handoff_band(timesteps: torch.Tensor, margin: float) -> tuple[float, float]:
    """The captured timesteps' range, widened on both sides by ``margin`` times its width."""
    lo, hi = float(timesteps.min()), float(timesteps.max())
    pad = margin * (hi - lo)
    return max(0.0, lo - pad), min(1000.0, hi + pad)


def build_shortcut(config: ShortcutConfig, latent_channels: int) -> TwoStageShortcut:
    def stage(name: str) -> dict:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return {**PRESETS[name], "in_channels": latent_channels, "out_channels": latent_channels}

    return TwoStageShortcut.from_configs(stage(config.stage1_preset),
                                        stage(config.stage2_preset) if config.stage2_preset else None)


def train_shortcut(trajectories: Trajectories | str | os.PathLike, out: str | os.PathLike, *,
                   config: ShortcutConfig | None = None, work_dir: str | os.PathLike | None = None,
                   teacher: str | None = None, accelerator=None) -> ShortcutResult:
    """Train both stages on a capture folder (or loaded ``Trajectories``) and write the shortcut file.

    Args:
        trajectories: what ``capture_trajectories`` wrote.
        out: the shortcut ``.safetensors`` file.
        config: presets, steps and optimisation of both stages (default ``ShortcutConfig()``).
        work_dir: checkpoints go to ``work_dir/stage1`` and ``work_dir/stage2`` (resumed when present);
            None keeps none.
        teacher: the name stored in the file (default: the one recorded with the trajectories).
        accelerator: an ``accelerate.Accelerator`` to share; one is made if None.

    The t-band written is the captured timesteps' range widened by ``config.band_margin`` of its width
    on each side (a single capture step gives a band of one timestep).
    """
    from accelerate import Accelerator

    config = config or ShortcutConfig()
    accelerator = accelerator or Accelerator()
    data = trajectories if isinstance(trajectories, Trajectories) else load_trajectories(trajectories)
    train_ids, held_ids = split_trajectories(len(data.final), config.holdout, config.seed)
    train_pairs = PairSet(data.latents[train_ids], data.timesteps, data.final[train_ids])
    held_pairs = PairSet(data.latents[held_ids], data.timesteps, data.final[held_ids])
    channels = data.final.shape[1]
    torch.manual_seed(config.seed)
    shortcut = build_shortcut(config, channels)

    def run(method, name: str, steps: int):
        return train(method, TrainConfig(
            steps=steps, lr=config.lr, warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
            seed=config.seed, run_dir=Path(work_dir) / name if work_dir is not None else None,
            checkpoint_every=config.checkpoint_every, tensorboard=config.tensorboard, desc=f"shortcut {name}"),
            accelerator)

    psnr = {}
    evaluate = len(held_ids) > 0
    if evaluate:
        psnr["input"] = heldout_psnr(None, held_pairs, accelerator.device)
        _report("nothing (x_t itself, the baseline)", psnr["input"], accelerator)
    seconds = run(DenoiseStage(shortcut.stage1, train_pairs, config.batch_size,
                               round(config.stage1_steps * config.l1_fraction)), "stage1", config.stage1_steps).seconds
    if evaluate:
        psnr["stage1"] = heldout_psnr(shortcut.stage1, held_pairs, accelerator.device)
        _report("stage 1", psnr["stage1"], accelerator)
    if shortcut.stage2 is not None:
        seconds = add_seconds(seconds, run(DeblurStage(shortcut.stage1, shortcut.stage2, train_pairs,
                                                       config.batch_size), "stage2", config.stage2_steps).seconds)
        if evaluate:
            psnr["stage1+2"] = heldout_psnr(shortcut, held_pairs, accelerator.device)
            _report("stage 1+2", psnr["stage1+2"], accelerator)

    band = handoff_band(data.timesteps, config.band_margin)
    capture = data.config
    extra = {
        "method": "shortcut", "captured_timesteps": data.timesteps.tolist(),
        "capture_steps": capture.get("capture_steps"), "num_inference_steps": capture.get("num_inference_steps"),
        "scheduler": capture.get("scheduler"),
        "exp_karras_p": capture.get("scheduler_config", {}).get("exp_karras_p"),
        "guidance_scale": capture.get("guidance_scale"), "num_trajectories": len(data.final),
        "heldout_trajectories": len(held_ids), "heldout_psnr": psnr,
        "psnr_peak": "max - min of the held-out target latents", "training": asdict(config),
        **cost_record(seconds, accelerator),  # the training loop only: capturing trajectories is not counted
    }
    out = Path(out)
    shortcut = shortcut.float().cpu().eval()
    shortcut.t_band, shortcut.teacher = band, teacher or capture.get("teacher", "unknown")
    if accelerator.is_main_process:
        save_shortcut(out, shortcut, t_band=band, teacher=shortcut.teacher, latent_channels=channels, extra=extra)
    accelerator.wait_for_everyone()
    return ShortcutResult(path=out, t_band=band, shortcut=shortcut, heldout_psnr=psnr)


def _report(name: str, scores: dict[str, float], accelerator) -> None:
    if accelerator.is_main_process:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "all")
        print(f"held-out PSNR after {name}: {scores['all']:.2f} dB ({detail})")
