"""The shortcut method (seed 000, §3.4 and §4.2): two TimeEmbedNAFNets trained on teacher trajectories.

The teacher's trajectories are captured first (``trajectories.capture_trajectories``): runs of one or more
lengths from the same noise, keeping the latent after every step whose next UNet call falls in the hand-off band,
so the shortcut sees the very latents a K+1 run of each length hands it (7 of 12 steps and 12 of 20 hand off at
the same noise level, from different latents). Stage 1 learns (x_t, t) -> final latent from the captured pairs;
stage 2 learns (frozen stage 1's output, t) -> final latent. The paper's losses are L1 for the first 5/6 of stage
1 and L2 after, L2 for stage 2. Plain L2 spends itself on the few low latent frequencies that hold nearly all the
energy, and its error is the fine detail the VAE decodes as texture: the default ``whitened`` loss divides each
frequency's squared error by the targets' mean power there, so every frequency counts alike. Both stages run in
the shared loop (cosine LR, checkpoints, exact resume) and end in one file written by ``save_shortcut``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.lora_layouts import unet_family
from ..models.nafnet import PRESETS, SIZES as NAFNET_SIZES, TimeEmbedNAFNet, TwoStageShortcut
from ..models.shortcut_file import FORMAT_NAME as SHORTCUT_FORMAT, save_shortcut
from ..schedulers.named import SCHEDULE_NAMES, family_params, schedule_sigmas
from ..schedulers.noise import alphas_cumprod_from_config, sigma_table
from ..schedulers.sigmas import EXP_KARRAS_P_MAX, exp_karras_timesteps
from .config import (RunConfig, Settings, SettingError, check_warmup, run_config, save_dtype_setting, setting,
                     training_record)
from .loop import cost_record
from .runner import Job, MethodEntry, settle
from .trajectories import Trajectories, capture_trajectories, load_trajectories

LOSSES = ("whitened", "paper")


@dataclass
class ShortcutConfig(Settings):
    """The teacher runs to capture and the settings of both stages (the paper: Adam, weight decay 0, cosine
    annealing, L1 for 5/6 of stage 1; here the whitened loss unless ``loss="paper"``)."""

    run: RunConfig = run_config(batch_size=64, lr=1e-3)
    trajectories: int = setting(2000, ge=1, help="teacher runs to capture, of each length")
    teacher_steps: tuple[int, ...] = setting((20,), ge=2, metavar="N",
                                             help="steps of the teacher's runs (DPM++ 2M on --schedule); with several "
                                                  "lengths (e.g. 20 12) one run of each from the same noise, and the "
                                                  "shortcut learns the hand-off latents of each")
    capture_band: tuple[float, float] = setting((250.0, 360.0), ge=0, metavar=("LO", "HI"),
                                                help="keep the latent after every step whose next UNet call's "
                                                     "timestep lies in [LO, HI] (of 20 steps: steps 10, 11 and 12, "
                                                     "the paper's)")
    schedule: str = setting("exp_karras", choices=SCHEDULE_NAMES,
                            help="the teacher runs' schedule, by the name ComfyUI knows it by; the shortcut learns "
                                 "to finish runs of this schedule, so sample with it")
    exp_karras_p: float = setting(1.0, ge=0, le=EXP_KARRAS_P_MAX, help="p of the exp_karras schedule")
    guidance: float | None = setting(None, ge=1, preset="guidance", fallback=7.5, help="the teacher's CFG (1: none)")
    height: int | None = setting(None, ge=8, teacher_default="image_size",
                                 help="image height of the teacher runs (default: the pipeline's)")
    width: int | None = setting(None, ge=8, teacher_default="image_size",
                                help="image width of the teacher runs (default: the pipeline's)")
    sample_batch_size: int = setting(250, ge=1, changeable=True, help="trajectories per teacher call")
    shard_size: int = setting(500, ge=1, help="trajectories per file")
    nafnet: str = setting("lab", choices=NAFNET_SIZES, help="NAFNet sizes of both stages")
    stage2: bool = setting(True, flag="--no-stage2", help="train stage 1 only")
    stage1_steps: int = setting(3000, ge=1, help="training steps of stage 1")
    stage2_steps: int = setting(1500, ge=1, help="training steps of stage 2")
    loss: str = setting("whitened", choices=LOSSES,
                        help="whitened: each latent frequency's squared error over the targets' mean power there "
                             "(both stages); paper: L1 for --l1-fraction of stage 1, then L2, and L2 for stage 2")
    l1_fraction: float = setting(5 / 6, ge=0, le=1, help="with --loss paper, the fraction of stage 1 trained with "
                                                         "L1 (then L2)")
    holdout: float = setting(1 / 6, ge=0, lt=1, help="fraction of trajectories held out for PSNR (the paper: "
                                                     "20k of 120k)")
    save_dtype: str = save_dtype_setting("the weights")
    band_margin: float = setting(0.1, ge=0, help="widen the captured t-range by this fraction of its width on "
                                                 "each side")

    def check(self) -> None:
        check_warmup(self, "stage1_steps", *(("stage2_steps",) if self.stage2 else ()))
        lo, hi = self.capture_band
        if lo > hi:
            raise SettingError("capture_band", f"need LO <= HI, got {list(self.capture_band)}")
        if self.schedule != "exp_karras" and self.exp_karras_p != 1.0:
            raise SettingError("exp_karras_p", f"shapes the exp_karras schedule only; --schedule is {self.schedule}")
        if len(set(self.teacher_steps)) != len(self.teacher_steps):
            raise SettingError("teacher_steps", f"each length once, got {list(self.teacher_steps)}")
        # Other schedules need the teacher's noise table: checked once it is loaded, before any capture.
        for n in self.teacher_steps if self.schedule == "exp_karras" else ():
            timesteps = exp_karras_timesteps(n, self.exp_karras_p).round()
            if not band_steps(timesteps, self.capture_band):
                raise SettingError("capture_band", f"no step of a {n}-step run hands off in {list(self.capture_band)} "
                                                   f"(its timesteps: {timesteps.int().tolist()})")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise SettingError(name, f"must be a multiple of 8 (the VAE's scale), got {getattr(self, name)}")
        if heldout_count(self.trajectories, self.holdout) >= self.trajectories:
            raise SettingError("holdout", f"{self.holdout} of {self.trajectories} trajectories leaves none to train on")


@dataclass
class ShortcutResult:
    path: Path
    t_band: tuple[float, float]
    shortcut: TwoStageShortcut
    heldout_psnr: dict = field(default_factory=dict)   # {"input" | "stage1" | "stage1+2": {"all": dB, "t=...": dB}}

    def summary(self) -> str:
        lo, hi = self.t_band
        return f"shortcut written to {self.path} (t-band [{lo:.1f}, {hi:.1f}])"


class PairSet:
    """(x_t, t) -> x0 pairs, flat: every capture step of every trajectory of every run length, each labelled with
    the run it comes from (``"20 steps, t=259"``) for per-run scores."""

    def __init__(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, labels: list[str]):
        self.x_t, self.t, self.x0, self.labels = x_t, t, x0, labels

    @classmethod
    def of(cls, captures: list[Trajectories], ids: torch.Tensor) -> PairSet:
        """The pairs of trajectories ``ids`` of every capture."""
        x_t, t, x0, labels = [], [], [], []
        for data in captures:
            steps = data.config["num_inference_steps"]
            for k, timestep in enumerate(data.timesteps.tolist()):
                x_t.append(data.latents[ids, k])
                t.append(torch.full((len(ids),), timestep))
                x0.append(data.final[ids])
                labels += [f"{steps} steps, t={timestep:.1f}"] * len(ids)
        return cls(torch.cat(x_t), torch.cat(t), torch.cat(x0), labels)

    def __len__(self) -> int:
        return len(self.x0)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x_t[idx], self.t[idx], self.x0[idx]


class _PairMethod:
    """Random pairs as batches, for the shared loop."""

    def __init__(self, pairs: PairSet, batch_size: int):
        self.pairs, self.batch_size = pairs, batch_size

    def batch(self, step: int):
        return self.pairs.take(torch.randint(len(self.pairs), (self.batch_size,)))


def spectral_power(x0: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The mean power of ``x0``'s 2-D spectrum (``fft2``) per channel and frequency: the whitened loss's scale,
    floored at a millionth of its mean so that no frequency divides by zero."""
    total = sum(torch.fft.fft2(part.float()).abs().pow(2).sum(0) for part in x0.split(chunk))
    power = total / len(x0)
    return power.clamp_min(1e-6 * float(power.mean()))


class WhitenedL2:
    """Squared error per latent frequency over the targets' mean power there, averaged: for white targets it is
    L2 (up to a constant); for latents, whose power falls steeply with frequency, the fine detail counts as much
    as the coarse shape."""

    def __init__(self, power: torch.Tensor):
        self.power = power

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.power = self.power.to(pred.device)
        return (torch.fft.fft2((pred - target).float()).abs().pow(2) / self.power).mean()


class DenoiseStage(_PairMethod):
    """Stage 1: (x_t, t) -> x0 with ``loss``; the paper's: L1 for the first ``l1_steps`` steps, then L2 (Zhao et
    al., via §3.4)."""

    def __init__(self, net: TimeEmbedNAFNet, pairs: PairSet, batch_size: int, l1_steps: int,
                 loss: WhitenedL2 | None = None):
        super().__init__(pairs, batch_size)
        self.modules = {"stage1": net}
        self.net, self.l1_steps, self.whitened = net, l1_steps, loss

    def loss(self, step: int, batch) -> torch.Tensor:
        x_t, t, x0 = batch
        loss_fn = self.whitened or (F.l1_loss if step < self.l1_steps else F.mse_loss)
        return loss_fn(self.net(x_t, t), x0)


class DeblurStage(_PairMethod):
    """Stage 2: frozen stage 1's output -> x0 with ``loss`` (the paper's: L2)."""

    def __init__(self, stage1: TimeEmbedNAFNet, net: TimeEmbedNAFNet, pairs: PairSet, batch_size: int,
                 loss: WhitenedL2 | None = None):
        super().__init__(pairs, batch_size)
        self.stage1 = stage1.requires_grad_(False).eval()
        self.modules = {"stage2": net}
        self.net, self.loss_fn = net, loss or F.mse_loss

    def loss(self, step: int, batch) -> torch.Tensor:
        x_t, t, x0 = batch
        with torch.no_grad():
            rough = self.stage1(x_t, t)
        return self.loss_fn(self.net(rough, t), x0)


@torch.no_grad()
def heldout_psnr(model, pairs: PairSet, device, batch_size: int = 256) -> dict[str, float]:
    """PSNR of ``model(x_t, t)`` against x0 on held-out pairs, in latent space, overall and per run length and
    timestep.

    PSNR = 10 log10(R^2 / MSE), where R = max - min over all held-out target latents (their data
    range; latents have no fixed peak like 255) and MSE is over every element. ``model=None`` scores
    the input x_t itself, a baseline.
    """
    peak = float(pairs.x0.max() - pairs.x0.min())
    err = []
    for start in range(0, len(pairs), batch_size):
        x_t, t, x0 = (v.to(device) for v in pairs.take(torch.arange(start, min(start + batch_size, len(pairs)))))
        pred = x_t if model is None else model(x_t, t)
        err.append((pred.float() - x0).pow(2).flatten(1).mean(1).double().cpu())
    err = torch.cat(err)

    def psnr(mse: torch.Tensor) -> float:
        return float(10 * torch.log10(peak**2 / mse.mean()))

    scores = {"all": psnr(err)}
    for label in dict.fromkeys(pairs.labels):
        scores[label] = psnr(err[torch.tensor([lab == label for lab in pairs.labels])])
    return scores


def heldout_count(n: int, holdout: float) -> int:
    """How many of ``n`` trajectories a ``holdout`` fraction keeps out: ``round(n * holdout)``, at least one."""
    return max(1, round(n * holdout)) if holdout > 0 else 0


def split_trajectories(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle trajectory ids with ``seed``; the last :func:`heldout_count` are held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = heldout_count(n, holdout)
    if n_held >= n:
        raise ValueError(f"holdout={holdout} of {n} trajectories leaves none to train on")
    return perm[:n - n_held], perm[n - n_held:]


def band_steps(timesteps, band: tuple[float, float]) -> list[int]:
    """The steps k (1 .. n-1 of an n-step run with these ``timesteps``, noisiest first) after which the next UNet
    call's timestep lies in ``band``: where the run may hand off to the shortcut."""
    lo, hi = band
    return [k for k in range(1, len(timesteps)) if lo <= float(timesteps[k]) <= hi]


def handoff_band(timesteps: torch.Tensor, margin: float) -> tuple[float, float]:
    """The captured timesteps' range, widened on both sides by ``margin`` times its width."""
    lo, hi = float(timesteps.min()), float(timesteps.max())
    pad = margin * (hi - lo)
    return max(0.0, lo - pad), min(1000.0, hi + pad)


def build_shortcut(config: ShortcutConfig, latent_channels: int) -> TwoStageShortcut:
    def stage(k: int) -> dict:
        return {**PRESETS[f"{config.nafnet}_stage{k}"], "in_channels": latent_channels, "out_channels": latent_channels}

    return TwoStageShortcut.from_configs(stage(1), stage(2) if config.stage2 else None)


def distil_shortcut(job: Job, config: ShortcutConfig) -> ShortcutResult:
    """Capture ``config.trajectories`` runs of each length of the teacher ``job.pipe`` on ``job.prompts`` in
    ``<work>/trajectories/steps<N>`` (resumed shard by shard; under several processes each captures its share),
    then train both stages on them (:func:`train_shortcut`)."""
    from ..schedulers import ExpKarrasScheduler

    config = settle(config)
    if job.work is None:
        raise ValueError("the shortcut keeps its trajectories in the work folder: give the job one")
    accelerator = job.accelerator
    pipe = job.pipe.to(accelerator.device)
    size = {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
    folders = []
    runs = []
    family = unet_family(name for name, _ in pipe.unet.named_parameters())
    params = family_params(config.schedule, family)  # SDXL's own Align Your Steps table
    for n in config.teacher_steps:  # every length checked before the first capture starts
        scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config, exp_karras_p=config.exp_karras_p)
        sigmas = None
        if config.schedule != "exp_karras":
            table = sigma_table(alphas_cumprod_from_config(scheduler.config))
            sigmas = schedule_sigmas(config.schedule, n, table, **params).tolist()
        scheduler.set_timesteps(**({"sigmas": sigmas} if sigmas is not None else {"num_inference_steps": n}))
        steps = band_steps(scheduler.timesteps, config.capture_band)
        if not steps:
            raise SettingError("capture_band", f"no step of a {n}-step {config.schedule} run of this teacher hands "
                                               f"off in {list(config.capture_band)} (its timesteps: "
                                               f"{scheduler.timesteps.tolist()})")
        runs.append((n, scheduler, sigmas, steps))
    for n, scheduler, sigmas, steps in runs:
        folder = f"steps{n}" if config.schedule == "exp_karras" else f"{config.schedule}_steps{n}"
        folders.append(capture_trajectories(
            pipe, job.work / "trajectories" / folder, list(job.prompts), config.trajectories,
            num_inference_steps=n, capture_steps=steps, guidance_scale=config.guidance, seed=config.run.seed,
            scheduler=scheduler, sigmas=sigmas, schedule=config.schedule, schedule_params=params,
            shard_size=config.shard_size,
            batch_size=config.sample_batch_size, teacher=job.teacher, pipe_kwargs=size,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes))
    accelerator.wait_for_everyone()
    job.pipe = pipe = None  # training needs the trajectories alone: the teacher's memory is freed
    return train_shortcut(job, config, folders)


def train_shortcut(job: Job, config: ShortcutConfig,
                   trajectories: Trajectories | str | Path | list[Trajectories | str | Path]) -> ShortcutResult:
    """Train both stages on one or more capture folders (or loaded ``Trajectories``: runs of several lengths from
    the same seeds) and write the shortcut file ``job.out``; stage checkpoints go to ``<work>/stage1`` and
    ``<work>/stage2``. ``job.pipe`` is not used; the teacher named in the file is ``job.teacher``, else the one
    recorded with the trajectories. The same trajectory ids (the same noise) are held out of every capture.

    The t-band written is the captured timesteps' range widened by ``config.band_margin`` of its width on each
    side (a single capture step gives a band of one timestep).
    """
    config = settle(config)
    run, accelerator = config.run, job.accelerator
    captures = [t if isinstance(t, Trajectories) else load_trajectories(t)
                for t in (trajectories if isinstance(trajectories, list) else [trajectories])]
    data = captures[0]
    for other in captures[1:]:
        if not torch.equal(other.seeds, data.seeds) or \
                other.config["teacher_unet_shape_fingerprint"] != data.config["teacher_unet_shape_fingerprint"]:
            raise ValueError("the captures to train one shortcut on must hold runs of one teacher from the same seeds")
    train_ids, held_ids = split_trajectories(len(data.final), config.holdout, run.seed)
    train_pairs = PairSet.of(captures, train_ids)
    held_pairs = PairSet.of(captures, held_ids)
    channels = data.final.shape[1]
    torch.manual_seed(run.seed)
    shortcut = build_shortcut(config, channels)

    psnr = {}
    evaluate = len(held_ids) > 0
    if evaluate:
        psnr["input"] = heldout_psnr(None, held_pairs, accelerator.device)
        _report("nothing (x_t itself, the baseline)", psnr["input"], accelerator)
    loss = WhitenedL2(spectral_power(train_pairs.x0)) if config.loss == "whitened" else None
    seconds = job.train(DenoiseStage(shortcut.stage1, train_pairs, run.batch_size,
                                     round(config.stage1_steps * config.l1_fraction), loss),
                        run, config.stage1_steps, "shortcut stage1", stage="stage1").seconds
    if evaluate:
        psnr["stage1"] = heldout_psnr(shortcut.stage1, held_pairs, accelerator.device)
        _report("stage 1", psnr["stage1"], accelerator)
    if shortcut.stage2 is not None:
        seconds += job.train(DeblurStage(shortcut.stage1, shortcut.stage2, train_pairs, run.batch_size, loss),
                             run, config.stage2_steps, "shortcut stage2", stage="stage2").seconds
        if evaluate:
            psnr["stage1+2"] = heldout_psnr(shortcut, held_pairs, accelerator.device)
            _report("stage 1+2", psnr["stage1+2"], accelerator)

    band = handoff_band(torch.cat([c.timesteps for c in captures]), config.band_margin)
    capture = data.config
    extra = {
        "method": "shortcut",
        "captured": [{"num_inference_steps": c.config["num_inference_steps"],
                      "capture_steps": c.config["capture_steps"], "timesteps": c.timesteps.tolist()}
                     for c in captures],
        "scheduler": capture.get("scheduler"),
        "schedule": capture.get("schedule", "exp_karras"), "schedule_params": capture.get("schedule_params") or {},
        "exp_karras_p": capture.get("scheduler_config", {}).get("exp_karras_p"),
        "guidance_scale": capture.get("guidance_scale"), "num_trajectories": len(data.final),
        "heldout_trajectories": len(held_ids), "heldout_psnr": psnr,
        "psnr_peak": "max - min of the held-out target latents", "training": training_record(config, job.inputs),
        **cost_record(seconds, accelerator),  # the training loop only: capturing trajectories is not counted
    }
    shortcut = shortcut.float().cpu().eval()
    shortcut.t_band, shortcut.teacher = band, job.teacher or capture.get("teacher", "unknown")
    job.on_main(lambda: save_shortcut(job.out, shortcut, t_band=band, teacher=shortcut.teacher,
                                      teacher_unet_shape_fingerprint=capture["teacher_unet_shape_fingerprint"],
                                      latent_channels=channels, extra=extra,
                                      dtype=getattr(torch, config.save_dtype)))
    return ShortcutResult(path=job.out, t_band=band, shortcut=shortcut, heldout_psnr=psnr)


def _report(name: str, scores: dict[str, float], accelerator) -> None:
    if accelerator.is_main_process:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "all")
        print(f"held-out PSNR after {name}: {scores['all']:.2f} dB ({detail})")


METHOD = MethodEntry(
    ShortcutConfig, distil_shortcut, writes=SHORTCUT_FORMAT,
    summary="the two-stage NAFNet final-step shortcut (seed 000)",
    description="Capture teacher trajectories, train both NAFNet stages, write one shortcut file. Re-running the "
                "same command resumes.")
