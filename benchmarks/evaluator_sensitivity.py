"""Prints how much class accuracy the lab's evaluator loses to small degradations of the 10,000 test images,
beside the committed VAE's round trip: Gaussian blur and Gaussian noise tuned to the round trip's PSNR, and the
round trip's own error scaled down. It tells how close to lossless a VAE must be for the 1-point accuracy goal.

Needs the lab's data (Debian's dataset-fashion-mnist) and its committed evaluator; about 5 minutes on one thread.
Run: python benchmarks/evaluator_sensitivity.py
"""

import torch
import torch.nn.functional as F

from direct_distill.lab.data import load_fashion_mnist
from direct_distill.lab.evaluator import Evaluator
from direct_distill.lab.sampling import decode, load_teacher
from direct_distill.lab.teacher import psnr
from direct_distill.training.data import encode_images


def gaussian_blur(images: torch.Tensor, sigma: float, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur, edges replicated."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(images.shape[1], 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), k, groups=images.shape[1])
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3), groups=images.shape[1])


def tuned(degrade, images: torch.Tensor, target_db: float, lo: float, hi: float) -> tuple[float, torch.Tensor]:
    """The strength in [lo, hi] at which ``degrade(images, strength)`` scores ``target_db`` (bisection; PSNR falls
    as strength grows)."""
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if psnr(degrade(images, mid), images) > target_db else (lo, mid)
    return mid, degrade(images, mid)


@torch.no_grad()
def main():
    evaluator, pipe = Evaluator(), load_teacher()
    x, y = load_fashion_mnist("test")
    recon = decode(pipe, encode_images(pipe.vae, x)[0])
    target = psnr(recon, x)
    real = evaluator.accuracy(x, y)

    def row(name, images):
        acc = evaluator.accuracy(images, y)
        print(f"{name:<40} {psnr(images, x):6.2f} dB  accuracy {acc:.4f} ({100 * (acc - real):+.2f} points)")

    print(f"10,000 test images: accuracy {real:.4f}")
    row("VAE round trip (posterior mean)", recon)
    sigma, blurred = tuned(gaussian_blur, x, target, 0.05, 3.0)
    row(f"Gaussian blur, sigma {sigma:.2f} px", blurred)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    std, noisy = tuned(lambda im, s: (im + s * noise).clamp(-1, 1), x, target, 0.0, 1.0)
    row(f"Gaussian noise, std {std:.3f}", noisy)
    for scale in (0.75, 0.5, 0.25):
        row(f"images + {scale:.2f} x the round trip's error", x + scale * (recon - x))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
