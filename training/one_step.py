"""The one-step generator of the one-step methods (a LoRA student called once, on pure noise, at the noisiest
timestep), its student file, and the periodic evaluation that keeps its weights of the lowest FD."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.io import atomic_save_file, atomic_write_text, read_safetensors
from .config import Settings, setting
from .lora import STUDENT, Conditioning, LoraStudent

BEST_FILE = "best_generator.safetensors"  # in the work folder: the lowest-FD generator so far

# evaluate(step, generate) -> scalars to log, or None; generate(prompts, seed=0) -> one-step latents (CPU)
Evaluate = Callable[[int, Callable[..., torch.Tensor]], "dict[str, float] | None"]


def one_step_timestep(student: LoraStudent) -> int:
    """The timestep a one-step student is called at: the noisiest of the noise table (999 for SD)."""
    return student.num_train_timesteps - 1


def one_step_sample(student: LoraStudent, noise: torch.Tensor, cond: Conditioning,
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


class GeneratorEMA(torch.nn.Module):
    """An exponential moving average of a module's trainable weights (the generator's LoRA): after each update,
    ``ema <- d * ema + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the
    average follows the first steps closely. A GAN generator's weights keep circling around where the two
    players balance; their average is the usual sample of it (StyleGAN's code evaluates an EMA).

    The averages and the update count are buffers: the training loop checkpoints them with the other modules,
    so a resumed run goes on with the same average.
    """

    def __init__(self, source: torch.nn.Module, decay: float):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.source, self.decay = [source], decay  # a list: not a submodule, so its weights stay out of this state
        self.names = [name for name, p in source.named_parameters() if p.requires_grad]
        params = dict(source.named_parameters())
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", params[name].detach().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(self.source[0].named_parameters())
        for i, name in enumerate(self.names):
            yield getattr(self, f"w{i}"), params[name]

    @torch.no_grad()
    def update(self) -> None:
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for average, weight in self._pairs():
            average.lerp_(weight.detach().to(average.dtype), 1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_source(self) -> None:
        for average, weight in self._pairs():
            weight.copy_(average)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The source holds the averaged weights inside the block, its own again after it."""
        saved = [weight.detach().clone() for _, weight in self._pairs()]
        self.copy_to_source()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, weight), own in zip(self._pairs(), saved):
                    weight.copy_(own)


@dataclass
class EvalConfig(Settings):
    """Evaluations of a one-step student along its training (by the evaluate hook a preset brings)."""

    group = "evaluations"

    eval_every: int | None = setting(None, ge=0, preset="eval_every", fallback=0,
                                     help="steps between evaluations of the student (FD, accuracy) by the "
                                          "preset's evaluator; 0: none")
    eval_samples: int = setting(1000, ge=1, help="samples per evaluation")
    keep_best: bool = setting(True, flag="--keep-last",
                              help="write the last generator, not the one of the lowest FD among the evaluations")


class BestGenerator:
    """The loop's ``after_step`` of a one-step method, composed into it: update ``ema`` (if any); every ``every``
    steps, hand ``evaluate`` a sampler of the current generator (its EMA weights, with ``ema``) and log what it
    returns; keep the generator's weights at the lowest ``fd`` seen, in ``best_file`` too (if set) so that a
    resumed run still knows them, and the evaluations beside it (``evaluations.json``) so that the file a resumed
    run writes records all of them. Choosing the checkpoint by FD rather than taking the last is the usual GAN
    practice.

    Args:
        student: the generator (its ``adapters`` are the weights kept).
        latent_shape, batch_size: of the samples ``generate`` makes.
        evaluate: the hook (None: no evaluations).
        every: steps between evaluations (0: none).
        best_file: where the best weights are kept across runs (None: in memory only).
        is_main_process: whether this process writes ``best_file``.
        ema: the generator's moving average (None: the generator's own weights are evaluated and kept).
    """

    def __init__(self, student: LoraStudent, latent_shape: Sequence[int], batch_size: int,
                 evaluate: Evaluate | None, every: int, best_file: Path | None = None, is_main_process: bool = True,
                 ema: GeneratorEMA | None = None):
        self.student, self.evaluate, self.every, self.ema = student, evaluate, every, ema
        self.generate = sample_function(student, latent_shape, batch_size)
        self.best_file, self.is_main_process = best_file, is_main_process
        self.evaluations: list[tuple[int, dict[str, float]]] = []
        self.best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # (step, fd, generator weights)
        if best_file is not None and best_file.is_file():
            weights, meta = read_safetensors(best_file)
            self.best = (int(meta["step"]), float(meta["fd"]), weights)
        self.evaluations_file = best_file.with_name("evaluations.json") if best_file is not None else None
        if self.evaluations_file is not None and self.evaluations_file.is_file():
            self.evaluations = [(int(step), scalars) for step, scalars
                                in json.loads(self.evaluations_file.read_text())]

    def _weights(self) -> contextlib.AbstractContextManager:
        """Inside the block, the generator holds the weights that are evaluated and written."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def after_step(self, step: int) -> dict[str, float] | None:
        if self.ema is not None:
            self.ema.update()
        if self.evaluate is None or not self.every or (step + 1) % self.every:
            return None
        with self._weights():
            scalars = self.evaluate(step + 1, self.generate)
            weights = {k: v.detach().cpu().clone() for k, v in self.student.adapters.state_dict().items()}
        if not scalars:
            return None
        scalars = {k: float(v) for k, v in scalars.items()}
        # a resumed run evaluates again the steps after its checkpoint: the new evaluation replaces the old
        self.evaluations = [e for e in self.evaluations if e[0] < step + 1] + [(step + 1, scalars)]
        if self.evaluations_file is not None and self.is_main_process:
            atomic_write_text(self.evaluations_file, json.dumps(self.evaluations))
        fd = scalars.get("fd")
        if fd is not None and (self.best is None or fd < self.best[1]):
            self.best = (step + 1, fd, weights)
            if self.best_file is not None and self.is_main_process:
                atomic_save_file(weights, self.best_file, {"step": str(step + 1), "fd": repr(fd)})
        return scalars

    def select(self, keep_best: bool) -> dict | None:
        """Put the weights to write into the generator: the best-FD ones with ``keep_best`` (returns their
        ``{"step", "fd"}``), else (or with no evaluation) the last ones, averaged with ``ema`` (returns None)."""
        if keep_best and self.best is not None:
            return self.select_best()
        if self.ema is not None:
            self.ema.copy_to_source()
        return None

    def select_best(self) -> dict | None:
        """Load the best-FD weights into the generator; returns ``{"step", "fd"}`` of them, or None if none."""
        if self.best is None:
            return None
        step, fd, weights = self.best
        with torch.no_grad():
            self.student.adapters.load_state_dict(weights)
        return {"step": step, "fd": fd}
