"""Teacher trajectories for the shortcut: intermediate VP latents, their timesteps and the final latent.

A capture folder holds ``index.json`` (what was run: teacher, prompts, seeds, steps, guidance,
scheduler) and one safetensors file per shard of ``shard_size`` trajectories::

    latents    (n, K, C, H, W) float32   VP latent after each capture step (the next UNet call's input)
    timesteps  (K,)            float32   the timestep of that next UNet call (fractional under exp-Karras)
    final      (n, C, H, W)    float32   the run's final latent (output_type="latent")
    seeds      (n,)            int64     trajectory i starts from the noise of seed ``seed + i``

Shards are written atomically, so an interrupted capture resumes by skipping the shards on disk.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.io import FileFormatError, atomic_save_file, atomic_write_text, read_safetensors, readable
from ..models.student_file import shape_fingerprint, unet_parameter_shapes
from .config import SettingError
from ..pipelines.shortcut import next_unet_input

INDEX_NAME = "index.json"
FORMAT_NAME = "direct_distill.trajectories"
FORMAT_VERSION = 2


@dataclass
class Trajectories:
    latents: torch.Tensor      # (N, K, C, H, W)
    timesteps: torch.Tensor    # (K,)
    final: torch.Tensor        # (N, C, H, W)
    seeds: torch.Tensor        # (N,)
    prompts: list[str]         # (N,)
    config: dict               # the capture settings from index.json


class _Recorder:
    """A step-end callback keeping the next UNet input after the chosen numbers of steps."""

    tensor_inputs = ["latents"]

    def __init__(self, capture_steps: list[int]):
        self.capture_steps = set(capture_steps)
        self.latents: dict[int, torch.Tensor] = {}
        self.timesteps: dict[int, float] = {}

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        steps_done = step_index + 1
        if steps_done in self.capture_steps:
            x_t, t = next_unet_input(pipe, steps_done, callback_kwargs["latents"])
            self.latents[steps_done] = x_t.float().cpu()
            self.timesteps[steps_done] = float(t)
        return callback_kwargs


@torch.no_grad()
def capture_trajectories(pipe, out_dir: str | os.PathLike, prompts: list[str], num_trajectories: int, *,
                         num_inference_steps: int = 20, capture_steps=(10, 11, 12), guidance_scale: float = 7.5,
                         seed: int = 0, scheduler=None, sigmas=None, schedule: str | None = None,
                         schedule_params: dict | None = None, shard_size: int = 256, batch_size: int = 16,
                         teacher: str | None = None, pipe_kwargs: dict | None = None,
                         process_index: int = 0, num_processes: int = 1) -> Path:
    """Run the teacher ``num_trajectories`` times and write the capture folder; returns it.

    Args:
        pipe: any diffusers text-to-image pipeline with ``callback_on_step_end`` (SD, SDXL, ...).
        out_dir: the capture folder; an existing one with the same settings is resumed.
        prompts: trajectory i uses ``prompts[i % len(prompts)]`` and the noise of seed ``seed + i``
            (one CPU generator per trajectory, so batching does not change the data).
        num_inference_steps: teacher steps per run.
        capture_steps: keep the latent after this many steps (the input of UNet call k + 1),
            each in 1 .. num_inference_steps - 1.
        guidance_scale: classifier-free guidance of the teacher.
        scheduler: the sampler; default an ``ExpKarrasScheduler`` (DPM-Solver++ 2M, exp-Karras
            sigmas) built from the pipeline's scheduler config. The pipeline's own scheduler is put
            back afterwards.
        sigmas: the runs' own sigmas (descending, VE, one per step, with or without a trailing 0) for a
            schedule the scheduler does not make itself (beta, align_your_steps, ...); the scheduler
            must take them in ``set_timesteps(sigmas=...)``. Recorded in the index.
        schedule: the name of the schedule ``sigmas`` come from, recorded in the index (default
            ``"custom"``); ``schedule_params``, its parameters beyond the name (SDXL's Align Your Steps table),
            recorded with it when there are any.
        shard_size, batch_size: trajectories per file and per pipeline call.
        teacher: the name stored with the data (default: the pipeline's ``name_or_path``).
        pipe_kwargs: further pipeline arguments (height, width, negative_prompt, ...).
        process_index, num_processes: under ``accelerate launch``, each process captures every
            ``num_processes``-th shard; the caller waits for all before reading.
    """
    capture_steps = sorted({int(k) for k in capture_steps})
    if not capture_steps or capture_steps[0] < 1 or capture_steps[-1] >= num_inference_steps:
        raise ValueError(f"capture_steps {capture_steps} must lie in 1 .. {num_inference_steps - 1} "
                         f"(a later teacher step must follow each)")
    if sigmas is not None:
        sigmas = [float(x) for x in sigmas]
        steps_given = len(sigmas) - (sigmas[-1] == 0.0)
        if steps_given != num_inference_steps:
            raise ValueError(f"{steps_given} sigmas given for a {num_inference_steps}-step run")
    if num_trajectories < 1 or not prompts:
        raise ValueError("need at least one trajectory and one prompt")
    if scheduler is None:
        from ..schedulers import ExpKarrasScheduler
        scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    out_dir = Path(out_dir)
    config = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "teacher": teacher or str(getattr(pipe, "name_or_path", None) or type(pipe).__name__),
        "teacher_unet_shape_fingerprint": shape_fingerprint(unet_parameter_shapes(pipe.unet)),
        "pipeline": type(pipe).__name__, "scheduler": type(scheduler).__name__,
        "scheduler_config": _settings(scheduler.config), "num_inference_steps": num_inference_steps,
        **({"schedule": schedule or "custom", "sigmas": sigmas} if sigmas is not None else {}),
        **({"schedule_params": schedule_params} if sigmas is not None and schedule_params else {}),
        "capture_steps": capture_steps, "guidance_scale": guidance_scale, "seed": seed,
        "num_trajectories": num_trajectories, "shard_size": shard_size, "prompts": list(prompts),
        "pipe_kwargs": pipe_kwargs or {},
    }
    config = json.loads(json.dumps(_strict_json(config), default=str))  # exactly as it will read back from disk
    _write_or_check_index(out_dir, config)

    shards = range(0, num_trajectories, shard_size)
    todo = [first for n, first in enumerate(shards) if n % num_processes == process_index
            and not readable(out_dir / _shard_name(n))]
    done = num_trajectories - sum(min(shard_size, num_trajectories - first) for first in todo)
    own_scheduler, own_bar = pipe.scheduler, dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=num_trajectories, initial=done, desc="trajectories", unit="traj",
               disable=process_index != 0, dynamic_ncols=True)
    try:
        for first in todo:
            n = min(shard_size, num_trajectories - first)
            parts = [_run(pipe, prompts, i, min(batch_size, first + n - i), capture_steps, config, bar)
                     for i in range(first, first + n, batch_size)]
            ids = list(range(first, first + n))
            atomic_save_file({"latents": torch.cat([p[0] for p in parts]), "timesteps": parts[0][1],
                              "final": torch.cat([p[2] for p in parts]),
                              "seeds": torch.tensor([seed + i for i in ids], dtype=torch.int64)},
                             out_dir / _shard_name(first // shard_size),
                             {"first": first, "prompts": [prompts[i % len(prompts)] for i in ids]})
    finally:
        bar.close()
        pipe.scheduler = own_scheduler
        pipe._progress_bar_config = own_bar
    return out_dir


def _run(pipe, prompts, first: int, n: int, capture_steps: list[int], config: dict, bar):
    """One pipeline call over trajectories first .. first + n - 1."""
    ids = range(first, first + n)
    recorder = _Recorder(capture_steps)
    schedule = ({"sigmas": config["sigmas"]} if "sigmas" in config
                else {"num_inference_steps": config["num_inference_steps"]})
    shown = 0

    def record_and_show(pipe, step, timestep, kwargs):  # the bar moves every step, not once per batch, by whole
        nonlocal shown                                  # trajectories: the share of the batch's steps done
        reached = n * (step + 1) // config["num_inference_steps"]
        bar.update(reached - shown)
        shown = reached
        return recorder(pipe, step, timestep, kwargs)

    out = pipe([prompts[i % len(prompts)] for i in ids], **schedule,
               guidance_scale=config["guidance_scale"], output_type="latent", callback_on_step_end=record_and_show,
               generator=[torch.Generator().manual_seed(config["seed"] + i) for i in ids], **config["pipe_kwargs"])
    bar.update(n - shown)
    latents = torch.stack([recorder.latents[k] for k in capture_steps], dim=1)
    timesteps = torch.tensor([recorder.timesteps[k] for k in capture_steps], dtype=torch.float32)
    return latents, timesteps, out.images.float().cpu()


def load_trajectories(folder: str | os.PathLike) -> Trajectories:
    """Read a complete capture folder; a missing or inconsistent shard raises FileFormatError naming it."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise FileFormatError(f"{folder}: no {INDEX_NAME}; not a trajectory capture folder")
    config = json.loads(index.read_text())
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{index}: not a version-{FORMAT_VERSION} trajectory index")
    parts, prompts = [], []
    for n, first in enumerate(range(0, config["num_trajectories"], config["shard_size"])):
        path = folder / _shard_name(n)
        if not path.is_file():
            raise FileFormatError(f"{path}: shard missing; the capture is incomplete (run it again to finish)")
        tensors, meta = read_safetensors(path)
        if parts and not torch.equal(tensors["timesteps"], parts[0]["timesteps"]):
            raise FileFormatError(f"{path}: timesteps {tensors['timesteps'].tolist()} differ from the first "
                                  f"shard's {parts[0]['timesteps'].tolist()}")
        parts.append(tensors)
        prompts += json.loads(meta["prompts"])
    return Trajectories(latents=torch.cat([p["latents"] for p in parts]), timesteps=parts[0]["timesteps"],
                        final=torch.cat([p["final"] for p in parts]), seeds=torch.cat([p["seeds"] for p in parts]),
                        prompts=prompts, config=config)


def _strict_json(value):
    """Non-finite floats (diffusers configs hold -inf) as strings, so the index stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _shard_name(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


def _settings(scheduler_config) -> dict:
    """A scheduler config without diffusers' bookkeeping (``_class_name``, ``_diffusers_version`` and
    ``_use_default_values``, a set listed in an order that changes from one process to the next)."""
    return {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}


def _write_or_check_index(folder: Path, config: dict) -> None:
    path = folder / INDEX_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        old["scheduler_config"] = _settings(old.get("scheduler_config", {}))
        changed = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
        if changed:
            raise SettingError("work", f"{folder} holds a capture made with other settings ({', '.join(changed)}); "
                                       "use another folder, or delete this one to start over")
        return
    atomic_write_text(path, json.dumps(config, indent=1, allow_nan=False))
