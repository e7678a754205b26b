"""The lab's defaults for `distill`, which the entry point hands the training runner: the lab teacher and where
its students go, the class names as prompts, guidance 2, Fashion-MNIST latents, and FD evaluations."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.io import read_safetensors
from ..training.data import LatentData, encode_images, read_latents_file, vae_checksum, write_latents_file
from ..training.runner import Preset
from . import SHORTCUT_PATH, STUDENTS_DIR, TEACHER_DIR
from .data import CLASS_NAMES, load_fashion_mnist

WORK_DIR = Path(__file__).resolve().parent / "work"


def lab_out(method: str) -> Path:
    return SHORTCUT_PATH if method == "shortcut" else STUDENTS_DIR / f"{method}.safetensors"


def lab_work(method: str) -> Path:
    return WORK_DIR / method


def lab_latents(pipe, work: Path, accelerator) -> LatentData:
    """Fashion-MNIST (train) encoded by the teacher's VAE, with class-name prompts; cached in ``work`` as a
    latents file until the VAE changes."""
    cache = work / "fashion_mnist_latents.safetensors"
    checksum = vae_checksum(pipe.vae)
    if cache.is_file() and read_safetensors(cache)[1].get("vae_checksum") == checksum:
        return read_latents_file(cache)
    images, labels = load_fashion_mnist("train")
    mean, std = encode_images(pipe.vae.to(accelerator.device).float(), images.to(accelerator.device))
    prompts = [CLASS_NAMES[i] for i in labels.tolist()]
    write_latents_file(cache, mean, std, prompts, {"vae_checksum": checksum})
    return LatentData(mean.cpu(), prompts, latent_std=std.cpu())


def lab_evaluation(pipe, samples: int = 1000):
    """The one-step methods' evaluate hook: FD (lab classifier features, against the test set) and class accuracy
    of ``samples`` student samples, balanced over the ten classes, decoded by the teacher's VAE."""
    from .evaluator import Evaluator
    from .sampling import decode

    evaluator = Evaluator()
    labels = torch.arange(samples) % len(CLASS_NAMES)
    prompts = [CLASS_NAMES[i] for i in labels.tolist()]

    def evaluate(step: int, generate) -> dict[str, float]:
        latents = generate(prompts)
        images = decode(pipe, latents.to(pipe.vae.device, pipe.vae.dtype)).float().cpu()
        return {"fd": evaluator.fd(images), "accuracy": evaluator.accuracy(images, labels)}

    return evaluate


LAB = Preset(
    name="lab", teacher=TEACHER_DIR, teacher_name="lab/assets/teacher", out=lab_out, work=lab_work,
    prompts=CLASS_NAMES, values={"guidance": 2.0, "eval_every": 500}, latents=lab_latents,
    evaluation=lab_evaluation,
    describe={"prompts": "the ten class names", "data": "Fashion-MNIST (train) encoded by the teacher's VAE"})
