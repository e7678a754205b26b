"""Prints a lab VAE's round trip (encode to the posterior mean, decode) against the images themselves, in the lab's
metric: PSNR and class accuracy on the 10,000 test images, and on the report's three sets of 1,000 floor images
the accuracy and FD, with the issue's goals (accuracy within 1 point of the images', FD within 2x theirs).

The VAE: the committed teacher's (default), a diffusers AutoencoderKL folder (``teacher vae`` writes
``<work>/vae/model``), or a ``teacher vae``/``decoder`` checkpoint, to follow a run while it trains.

Needs the lab's data (Debian's dataset-fashion-mnist) and its committed evaluator; about 4 minutes on one thread.
Run: python benchmarks/vae_round_trip.py [VAE folder | checkpoint.safetensors]
"""

import statistics
from pathlib import Path

import torch

from direct_distill.lab import TEACHER_DIR
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


def main(argv: list[str]) -> None:
    source = Path(argv[0]) if argv else TEACHER_DIR / "vae"
    vae, evaluator = load_vae(source), Evaluator()
    x, y = load_fashion_mnist("test")
    rec = round_trip(vae, x)
    real_acc, rec_acc = evaluator.accuracy(x, y), evaluator.accuracy(rec, y)
    print(f"VAE {source}")
    print(f"10,000 test images: PSNR {psnr(rec, x):.2f} dB, accuracy {rec_acc:.4f} against the images' {real_acc:.4f} "
          f"({100 * (rec_acc - real_acc):+.2f} points)")
    fds, gaps = [], []
    for s in range(3):
        images, labels = floor_images(1000, s)
        rec = round_trip(vae, images)
        fd_real, fd_rec = evaluator.fd(images), evaluator.fd(rec)
        acc_real, acc_rec = evaluator.accuracy(images, labels), evaluator.accuracy(rec, labels)
        fds.append((fd_rec, fd_real))
        gaps.append(100 * (acc_rec - acc_real))
        print(f"floor set {s}: FD {fd_rec:.3f} against the images' {fd_real:.3f} ({fd_rec / fd_real:.2f}x), accuracy "
              f"{acc_rec:.3f} against {acc_real:.3f} ({gaps[-1]:+.1f} points)")
    ratio = statistics.mean(f for f, _ in fds) / statistics.mean(r for _, r in fds)  # as the report: mean over mean
    gap = statistics.mean(gaps)
    print(f"floor sets: FD {ratio:.2f}x the images' (goal within 2x: {'met' if ratio <= 2 else 'missed'}), accuracy "
          f"{gap:+.2f} points (goal within 1: {'met' if gap >= -1 else 'missed'})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", nargs="?", help="a VAE folder or checkpoint (default: the committed teacher's)")
    vae = parser.parse_args().vae
    main([vae] if vae else [])
