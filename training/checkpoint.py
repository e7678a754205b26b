"""Training state (modules, optimizer, step, RNG) as one safetensors file, for exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.io import FileFormatError, atomic_save_file, read_safetensors


def save_training_state(path: str | os.PathLike, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], step: int,
                        extra: dict | None = None) -> Path:
    """Save everything needed to continue training exactly where it stopped."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"step": step, "extra": extra or {}}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value
    optim_meta = {}
    for name, opt in optimizers.items():
        state = opt.state_dict()
        scalars = {}
        for idx, pstate in state["state"].items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{name}.{idx}.{key}"] = value
                else:
                    scalars[f"{idx}.{key}"] = value
        optim_meta[name] = {"param_groups": state["param_groups"], "scalars": scalars}
    meta["optimizers"] = optim_meta
    tensors["rng.torch"] = torch.get_rng_state()
    return atomic_save_file(tensors, path, {"training_state": json.dumps(meta)})


def load_training_state(path: str | os.PathLike, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
    """Restore a state written by :func:`save_training_state`; returns ``(step, extra)``."""
    tensors, metadata = read_safetensors(path)
    if "training_state" not in metadata:
        raise FileFormatError(f"{path}: not a Direct Distill training checkpoint (no 'training_state' metadata)")
    meta = json.loads(metadata["training_state"])
    for name, module in modules.items():
        prefix = f"module.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise FileFormatError(f"{path}: checkpoint does not match module '{name}' "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, opt in optimizers.items():
        if name not in meta["optimizers"]:
            raise FileFormatError(f"{path}: checkpoint has no optimizer '{name}'")
        om = meta["optimizers"][name]
        state: dict[int, dict] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[field] = value
        for key, value in om["scalars"].items():
            idx, field = key.split(".", 1)
            state.setdefault(int(idx), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), meta.get("extra", {})
