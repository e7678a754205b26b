"""Teachers for distillation: a diffusers pipeline from a folder or a single checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a folder (any text-to-image pipeline) or an SD1.x single file."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path)
    elif path.is_file():
        pipe = StableDiffusionPipeline.from_single_file(path)
    else:
        raise SystemExit(f"{path}: no such teacher folder or file")
    # Cast after loading: the loaders' dtype argument changed name across diffusers versions.
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
