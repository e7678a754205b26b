"""The lab's defaults for `distill`, which the entry point hands the training runner: the lab teacher and where
its students go, the class names as prompts, guidance 3 (the teacher's lowest-FD guidance in the report's sweep),
Fashion-MNIST latents, and FD evaluations."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.io import atomic_save_file, read_safetensors
from ..training.data import LatentData, encode_images, vae_checksum
from ..training.runner import Preset
from . import SHORTCUT_PATH, STUDENTS_DIR, TEACHER_DIR
from .data import CLASS_NAMES, load_fashion_mnist

WORK_DIR = Path(__file__).resolve().parent / "work"
DATA_CACHE = WORK_DIR / "data_latents.safetensors"  # one for every lab run: the encoding depends on the VAE alone


def lab_out(method: str) -> Path:
    return SHORTCUT_PATH if method == "shortcut" else STUDENTS_DIR / f"{method}.safetensors"


def lab_work(method: str) -> Path:
    return WORK_DIR / method


def lab_latents(pipe, work: Path, accelerator) -> LatentData:
    """Fashion-MNIST (train) encoded by the teacher's VAE, with class-name prompts; cached with the labels until
    the VAE changes, in ``DATA_CACHE`` for every lab run, or in the run's ``work`` folder where the lab's own
    folder cannot be written (a read-only install)."""
    checksum = vae_checksum(pipe.vae)
    caches = [DATA_CACHE, work / DATA_CACHE.name]
    for cache in caches:
        tensors, meta = read_safetensors(cache) if cache.is_file() else ({}, {})
        if meta.get("vae_checksum") == checksum:
            break
    else:
        images, labels = load_fashion_mnist("train")
        mean, std = encode_images(pipe.vae.to(accelerator.device).float(), images.to(accelerator.device))
        tensors = {"latents": mean.cpu(), "std": std.cpu(), "labels": labels}
        try:
            atomic_save_file(tensors, caches[0], {"vae_checksum": checksum})
        except OSError:
            atomic_save_file(tensors, caches[1], {"vae_checksum": checksum})
    return LatentData(tensors["latents"], [CLASS_NAMES[i] for i in tensors["labels"].tolist()],
                      latent_std=tensors["std"])


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
    prompts=CLASS_NAMES, values={"guidance": 3.0, "eval_every": 500}, latents=lab_latents,
    evaluation=lab_evaluation,
    describe={"prompts": "the ten class names", "data": "Fashion-MNIST (train) encoded by the teacher's VAE"})
