"""The lab's ruler: a Fashion-MNIST classifier trained here, and from its features the Fréchet
distance (FD) of generated images to the real test set and the class accuracy of samples."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.io import FileFormatError, atomic_save_file, read_safetensors
from . import CLASSIFIER_PATH
from .data import load_fashion_mnist

FEATURE_DIM = 128


class Classifier(nn.Module):
    """A small VGG-style CNN on 1x32x32 images in [-1, 1]; ``features`` is its 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr sqrt(A B) = sum of sqrt of eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD.
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def train_classifier(out: Path = CLASSIFIER_PATH, epochs: int = 6, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> float:
    """Train on the real training images (light shift augmentation); returns test accuracy."""
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier")
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        for i in range(0, len(images) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            x = images[idx]
            dx, dy = torch.randint(-2, 3, (2,))
            x = torch.roll(x, shifts=(int(dx), int(dy)), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    test_x, test_y = load_fashion_mnist("test")
    with torch.no_grad():
        acc = float(torch.cat([model(test_x[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
                    .eq(test_y).float().mean())
    atomic_save_file(model.state_dict(), out, {"format": "direct_distill.lab_classifier",
                                               "test_accuracy": f"{acc:.4f}"})
    print(f"classifier test accuracy {acc:.4f}, saved to {out}")
    return acc


class Evaluator:
    """FD against the real test set and class accuracy, both in the trained classifier's terms."""

    def __init__(self, path: str | Path = CLASSIFIER_PATH):
        tensors, meta = read_safetensors(path)
        if meta.get("format") != "direct_distill.lab_classifier":
            raise FileFormatError(f"{path}: not a lab classifier file (format={meta.get('format')!r})")
        self.model = Classifier()
        self.model.load_state_dict(tensors)
        self.model.eval().requires_grad_(False)
        self.test_accuracy = float(meta.get("test_accuracy", "nan"))
        self._test_features = None

    @property
    def test_features(self) -> torch.Tensor:
        """Features of the 10,000 real test images (needs the dataset; accuracy alone does not)."""
        if self._test_features is None:
            self._test_features = self.features(load_fashion_mnist("test")[0])
        return self._test_features

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """128-d features of 1x32x32 images in [-1, 1]."""
        return torch.cat([self.model.features(images[i:i + batch].float()) for i in range(0, len(images), batch)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        return torch.cat([self.model(images[i:i + batch].float()).argmax(1) for i in range(0, len(images), batch)])

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.test_features)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float(self.predict(images).eq(labels).float().mean())

    def real_floor(self, n: int, seed: int = 0) -> float:
        """FD of ``n`` real training images against the test set: the best any sampler can do at that n."""
        return self.fd(floor_images(n, seed)[0])


def floor_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` training images (and labels) of seed set ``seed`` that the report's floors are measured on."""
    train_x, train_y = load_fashion_mnist("train")
    idx = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    return train_x[idx], train_y[idx]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill classifier",
                                     description="Train the lab's evaluation classifier.")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training set (>= 1)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    train_classifier(args.out, args.epochs)


if __name__ == "__main__":
    main()
