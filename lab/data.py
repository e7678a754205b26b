"""Fashion-MNIST from Debian's dataset-fashion-mnist package, as tensors; no download."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from . import LabInputMissing

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetMissingError(LabInputMissing):
    pass


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None):
    """Images as float32 in [-1, 1], padded to 1x32x32, and int64 labels."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install Debian's package: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`, "
            "or set FASHION_MNIST_DIR to a folder holding the four idx .gz files.")
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div(127.5).sub(1.0)
    images = torch.nn.functional.pad(images[:, None], (2, 2, 2, 2), value=-1.0)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    return images, labels
