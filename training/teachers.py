"""Teachers for distillation: a diffusers pipeline from a folder or a single SD1.x/2.x/XL checkpoint, offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .ldm_checkpoint import PREDICTION_TYPES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                 tokenizer: str | os.PathLike | None = None, prediction_type: str | None = None):
    """A diffusers pipeline in ``dtype`` (whatever the files hold), from nothing but local files.

    Args:
        path: a diffusers pipeline folder (``model_index.json``), or a single ``.safetensors`` checkpoint of
            SD1.x, SD2.x or SDXL in the original LDM layout (see ``ldm_checkpoint.load_ldm_checkpoint``).
        dtype: every component's dtype.
        tokenizer: for a single file, the CLIP tokenizer folder (default: found in the Hugging Face cache or
            ComfyUI); a folder brings its own.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``, overriding the scheduler config's (a folder) or what
            the file suggests (a single file).

    Prints one line saying what was loaded. Raises SystemExit with one line naming the problem.
    """
    from ..models.io import FileFormatError
    from .ldm_checkpoint import load_ldm_checkpoint

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise SystemExit(f"--prediction-type {prediction_type}: choose one of {', '.join(PREDICTION_TYPES)}")
    path = Path(path)
    if path.is_dir():
        if tokenizer is not None:
            raise SystemExit(f"--tokenizer is for single-file teachers; {path} has its own")
        pipe, description = _load_folder(path, prediction_type)
    elif path.is_file():
        try:
            pipe, description = load_ldm_checkpoint(path, tokenizer=tokenizer, prediction_type=prediction_type)
        except (FileFormatError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from None
    else:
        raise SystemExit(f"{path}: no such teacher folder or file")
    # Every component in one dtype: a float16 folder loaded at the default would mix float16 weights with the
    # float32 tensors the methods make.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            set_dtype(module, dtype)
    print(f"teacher: {description}, {str(dtype).removeprefix('torch.')}", flush=True)
    return pipe


def load_teacher_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The VAE of a teacher (a diffusers folder or a single checkpoint file) in ``dtype``, loading nothing else:
    what encoding data needs. Prints one line saying what was loaded; SystemExit with one line otherwise."""
    from ..models.io import FileFormatError
    from .ldm_checkpoint import load_ldm_vae

    path = Path(path)
    if path.is_dir():
        from diffusers import AutoencoderKL

        if not (path / "vae" / "config.json").is_file():
            raise SystemExit(f"{path}: not a diffusers pipeline folder with a VAE (no vae/config.json)")
        variant = "fp16" if _only_fp16_variant([path / "vae"]) else None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, variant=variant)
        except (OSError, ValueError) as err:
            raise SystemExit(f"{path / 'vae'}: diffusers cannot load it ({str(err).splitlines()[0][:300]})") from None
        description = f"{path}/vae"
    elif path.is_file():
        try:
            vae, description = load_ldm_vae(path)
        except FileFormatError as err:
            raise SystemExit(str(err)) from None
    else:
        raise SystemExit(f"{path}: no such teacher folder or file")
    set_dtype(vae, dtype).eval()
    print(f"VAE: {description}, {str(dtype).removeprefix('torch.')}", flush=True)
    return vae


def set_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``module``'s floating-point weights to ``dtype`` in place (diffusers' ``to(dtype)`` warns on every
    call, whatever the model)."""
    caster = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}.get(dtype)
    if caster is None:
        raise ValueError(f"dtype {dtype}: choose one of {', '.join(map(str, DTYPES.values()))}")
    return getattr(module, caster)()


# what a pipeline runs without: a download that left them out still makes a teacher
_OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_WEIGHTS = (".safetensors", ".bin")


def _only_fp16_variant(folders) -> bool:
    """Whether the weight files of these component folders are all the fp16 variant (``*.fp16.safetensors``), as
    ``save_pretrained(variant="fp16")`` or a variant download leaves them: diffusers loads those with
    ``variant="fp16"`` only."""
    weights = [f.name for folder in folders for f in folder.iterdir() if f.name.endswith(_WEIGHTS)]
    return bool(weights) and all(".fp16." in name for name in weights)


def _load_folder(path: Path, prediction_type: str | None):
    import json

    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise SystemExit(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise SystemExit(f"{path / 'model_index.json'}: not readable JSON ({err})") from None
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    absent = {name: None for name in _OPTIONAL_COMPONENTS if name in listed and not (path / name).is_dir()}
    missing = sorted(name for name in listed if name not in absent and not (path / name).is_dir())
    if missing:
        raise SystemExit(f"{path}: model_index.json lists {', '.join(missing)}, but the folder has no "
                         f"{'/, '.join(missing)}/ (an interrupted download?)")
    kwargs = dict(absent, **({"requires_safety_checker": False} if "safety_checker" in absent else {}))
    # a folder saved or downloaded as the fp16 variant only (unet/diffusion_pytorch_model.fp16.safetensors)
    if _only_fp16_variant(path / name for name in listed if name not in absent):
        kwargs["variant"] = "fp16"
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"{path}: diffusers cannot load this folder ({str(err).splitlines()[0][:300]})") from None
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None and not 0 < tokenizer.model_max_length <= 4096:
            raise SystemExit(f"{path / name}: a tokenizer without its settings (model_max_length "
                             f"{tokenizer.model_max_length}): its tokenizer_config.json is missing or incomplete")
    if prediction_type is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    return pipe, f"{path} ({type(pipe).__name__}, {prediction})"
