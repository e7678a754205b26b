"""One code path for sampling the lab teacher: fixed seeds and labels, any sigma schedule, timed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..schedulers import ExpKarrasScheduler
from .data import CLASS_NAMES


@dataclass
class Samples:
    images: torch.Tensor      # N x 1 x 32 x 32 in [-1, 1]
    latents: torch.Tensor     # N x 4 x 8 x 8, the final latents (VAE-scaled)
    labels: torch.Tensor      # N
    seconds_per_image: float


def load_teacher(path=None):
    from diffusers import StableDiffusionPipeline

    from . import TEACHER_DIR, LabInputMissing

    path = path or TEACHER_DIR
    if not (path / "model_index.json").is_file():
        raise LabInputMissing(f"no lab teacher at {path}: train it with "
                                "`python -m direct_distill teacher vae|unet|decoder|export`")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    return pipe


def seeded_noise_and_labels(n: int, seed: int, latent_shape=(4, 8, 8)):
    """Balanced labels (n/10 per class) and standard-normal initial latents, both from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASS_NAMES)
    noise = torch.randn((n, *latent_shape), generator=g)
    return noise, labels


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, batch: int = 500) -> torch.Tensor:
    vae = pipe.vae
    out = [vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample for i in range(0, len(latents), batch)]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def sample_teacher(pipe, sigmas: torch.Tensor | None, guidance: float, n: int, seed: int, batch: int = 500,
                   callback=None, desc: str = "sampling", steps: int | None = None) -> Samples:
    """``pipe``'s scheduler over ``sigmas`` (VE, ending in 0; DPM-Solver++ 2M for the lab teacher), or over
    its own schedule for ``steps`` (a student's), for ``n`` balanced prompts from the seeded noise.
    ``callback`` is passed to the pipeline as ``callback_on_step_end``."""
    schedule = {"sigmas": sigmas.tolist()} if sigmas is not None else {"num_inference_steps": steps}
    noise, labels = seeded_noise_and_labels(n, seed)
    latents = []
    start = time.perf_counter()
    for i in tqdm(range(0, n, batch), desc=desc, leave=False):
        prompts = [CLASS_NAMES[int(c)] for c in labels[i:i + batch]]
        out = pipe(prompts, **schedule, guidance_scale=guidance, output_type="latent",
                   latents=noise[i:i + batch], callback_on_step_end=callback)
        latents.append(out.images)
    latents = torch.cat(latents)
    images = decode(pipe, latents)
    seconds = (time.perf_counter() - start) / n
    return Samples(images=images, latents=latents, labels=labels, seconds_per_image=seconds)
