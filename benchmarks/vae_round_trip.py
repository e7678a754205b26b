"""Prints a lab VAE's round trip (encode to the posterior mean, decode) against the images themselves, in the lab's
metric: PSNR and class accuracy on the 10,000 test images, and on the report's sets of 1,000 floor images (the
grid's three, or --sets) the accuracy and FD, with the issue's goals judged as the report judges them (accuracy
within 1 point of the images', FD within 2x theirs; a goal met when its 95 % interval over the sets clears it).

The VAE: the committed teacher's (default), a diffusers AutoencoderKL folder (``teacher vae`` writes
``<work>/vae/model``), or a ``teacher vae``/``decoder`` checkpoint, to follow a run while it trains.

Needs the lab's data (Debian's dataset-fashion-mnist) and its committed evaluator; about 4 minutes on one thread.
Run: python benchmarks/vae_round_trip.py [VAE folder | checkpoint.safetensors] [--sets N]
"""

from pathlib import Path

import torch

from direct_distill.lab import TEACHER_DIR
from direct_distill.lab.benchmark import REAL_FLOOR, VAE_FLOOR, Floor, Results, vae_goals
from direct_distill.lab.data import load_fashion_mnist
from direct_distill.lab.evaluator import Evaluator, floor_images
from direct_distill.lab.teacher import build_vae, psnr
from direct_distill.training.checkpoint import load_training_state


def load_vae(source: Path):
    """A diffusers VAE folder, or the VAE in a lab teacher stage's training checkpoint."""
    from diffusers import AutoencoderKL

    if source.suffix == ".safetensors":
        vae = build_vae()
        load_training_state(source, {"vae": vae}, {})
        return vae.eval()
    return AutoencoderKL.from_pretrained(source).eval()


@torch.no_grad()
def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(x).latent_dist.mean).sample for x in images.split(500)]).clamp(-1, 1)


def main(source: Path, sets: int = 3) -> None:
    vae, evaluator = load_vae(source), Evaluator()
    x, y = load_fashion_mnist("test")
    rec = round_trip(vae, x)
    real_acc, rec_acc = evaluator.accuracy(x, y), evaluator.accuracy(rec, y)
    print(f"VAE {source}")
    print(f"10,000 test images: PSNR {psnr(rec, x):.2f} dB, accuracy {rec_acc:.4f} against the images' {real_acc:.4f} "
          f"({100 * (rec_acc - real_acc):+.2f} points)")
    floors = []
    for s in range(sets):
        images, labels = floor_images(1000, s)
        rec = round_trip(vae, images)
        real = Floor(REAL_FLOOR, s, 1000, evaluator.fd(images), evaluator.accuracy(images, labels))
        own = Floor(VAE_FLOOR, s, 1000, evaluator.fd(rec), evaluator.accuracy(rec, labels))
        floors += [real, own]
        print(f"floor set {s}: FD {own.fd:.3f} against the images' {real.fd:.3f} ({own.fd / real.fd:.2f}x), accuracy "
              f"{own.accuracy:.3f} against {real.accuracy:.3f} ({100 * (own.accuracy - real.accuracy):+.1f} points)")
    for goal in vae_goals(Results(floors=floors)):
        print(f"{goal.goal}: {goal.measured} — {goal.status.strip('*')}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", nargs="?", type=Path, default=TEACHER_DIR / "vae",
                        help="a VAE folder or checkpoint (default: the committed teacher's)")
    parser.add_argument("--sets", type=int, default=3, help="floor sets of 1,000 images (the report's goals: 10)")
    args = parser.parse_args()
    if args.sets < 1:
        parser.error(f"--sets must be >= 1, got {args.sets}")
    main(args.vae, args.sets)
