"""Safetensors reading and atomic writing: the only way this project touches weight files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class FileFormatError(ValueError):
    """A weight file is missing, malformed, or made for something else."""


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors via a temporary file and a rename.

    A crash mid-write leaves the previous file (if any) untouched. Metadata values that are not
    strings are stored as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a saved model is an ordinary file
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, with one clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, metadata


def json_metadata(metadata: dict[str, str], key: str, path: str | os.PathLike, default=None):
    """Decode one JSON-valued metadata entry, naming the file and key if it is absent or corrupt."""
    if key not in metadata:
        if default is not None:
            return default
        raise FileFormatError(f"{path}: metadata has no '{key}' entry")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise FileFormatError(f"{path}: metadata entry '{key}' is not valid JSON") from None
