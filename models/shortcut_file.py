"""The shortcut file: both NAFNet stages in one safetensors file, with what is needed to use them.

Tensors are the state dict of a TwoStageShortcut (``stage1.*``, ``stage2.*``). Metadata (JSON
strings): format name and version, both architecture configs, the t-band the shortcut was trained
for (training timesteps), the teacher's name and the fingerprint of its UNet's parameter shapes
(``student_file.shape_fingerprint``, which ComfyUI's side computes too), the latent channels, and free-form
``extra``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .io import (WEIGHT_DTYPES, FileFormatError, atomic_save_file, json_metadata, read_safetensors,
                 read_safetensors_header)
from .nafnet import TimeEmbedNAFNet, TwoStageShortcut

FORMAT_NAME = "direct_distill.shortcut"
FORMAT_VERSION = 2
METADATA_KEYS = ("format", "format_version", "stage1_config", "stage2_config", "t_band", "teacher",
                 "teacher_unet_shape_fingerprint", "latent_channels", "extra")


STORED_DTYPES = WEIGHT_DTYPES


def save_shortcut(path: str | os.PathLike, model: TwoStageShortcut, *, t_band: tuple[float, float], teacher: str,
                  teacher_unet_shape_fingerprint: str, latent_channels: int, extra: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` and its metadata to one safetensors file, atomically.

    Args:
        path: destination ``.safetensors`` file.
        model: the trained shortcut (stage 2 may be absent).
        t_band: (t_lo, t_hi), the training timesteps the shortcut may take over at.
        teacher: the teacher it was distilled from (a hub id or path).
        teacher_unet_shape_fingerprint: ``shape_fingerprint(unet_parameter_shapes(teacher.unet))`` (both in
            ``student_file``); both samplers refuse a model of other UNet shapes.
        latent_channels: channels of the teacher's latents; must match the model.
        extra: any further JSON-serialisable facts (training steps, schedule, ...).
        dtype: the weights' dtype in the file (float16 halves it; the samplers compute in the teacher's dtype).
    """
    if dtype not in STORED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, STORED_DTYPES))}, got {dtype}")
    lo, hi = (float(v) for v in t_band)
    if not 0 <= lo <= hi <= 1000:
        raise ValueError(f"t_band must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1000, got {tuple(t_band)}")
    if not isinstance(teacher_unet_shape_fingerprint, str) or not teacher_unet_shape_fingerprint:
        raise ValueError("teacher_unet_shape_fingerprint must be a non-empty string, "
                         f"got {teacher_unet_shape_fingerprint!r}")
    if latent_channels != model.stage1.config["in_channels"]:
        raise ValueError(f"latent_channels={latent_channels} but stage 1 takes {model.stage1.config['in_channels']}")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stage1_config": model.stage1.config,
        "stage2_config": model.stage2.config if model.stage2 is not None else None,
        "t_band": [lo, hi],
        "teacher": teacher,
        "teacher_unet_shape_fingerprint": teacher_unet_shape_fingerprint,
        "latent_channels": latent_channels,
        "extra": extra or {},
    }
    # Every entry JSON-encoded here (atomic_save_file would leave plain strings raw): uniform to read.
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return atomic_save_file(tensors, path, {k: json.dumps(v) for k, v in metadata.items()})


def load_shortcut(path: str | os.PathLike) -> TwoStageShortcut:
    """Read a file written by ``save_shortcut``; any mismatch raises one FileFormatError naming it.

    The returned shortcut carries ``t_band``, ``teacher``, ``teacher_unet_shape_fingerprint``,
    ``latent_channels`` and ``metadata`` (every metadata entry, decoded), and is in eval mode with the
    dtype stored in the file.
    """
    tensors, raw = read_safetensors(path)
    meta = _checked_metadata(raw, tensors, path)
    with torch.device("meta"):
        stage1 = _build(meta["stage1_config"], "stage1_config", path)
        stage2 = _build(meta["stage2_config"], "stage2_config", path) if meta["stage2_config"] is not None else None
        try:
            model = TwoStageShortcut(stage1, stage2)
        except ValueError as err:
            raise FileFormatError(f"{path}: {err}") from None
    if meta["latent_channels"] != stage1.config["in_channels"]:
        raise FileFormatError(f"{path}: metadata says {meta['latent_channels']} latent channels "
                              f"but stage 1 takes {stage1.config['in_channels']}")
    _check_tensors(model.state_dict(), tensors, path)
    # clone: fresh, aligned storage (views into the read buffer can take slower, differently-rounding kernels)
    model.load_state_dict({k: v.clone() for k, v in tensors.items()}, assign=True)
    model.eval()
    model.t_band = tuple(meta["t_band"])
    model.teacher = meta["teacher"]
    model.teacher_unet_shape_fingerprint = meta["teacher_unet_shape_fingerprint"]
    model.latent_channels = meta["latent_channels"]
    model.metadata = meta
    return model


def trained_schedule(shortcut) -> tuple[str, dict]:
    """The schedule of the teacher runs a shortcut learnt to finish, as (name, parameters) for
    ``schedulers.named.schedule_sigmas``: what ``distill shortcut --schedule`` recorded in its file's ``extra``;
    exp_karras (p as recorded, else 1) for files from before the schedule was recorded and for shortcuts built in
    code. ``shortcut``: a loaded shortcut, or its file's ``extra`` dict."""
    extra = shortcut if isinstance(shortcut, dict) else ((getattr(shortcut, "metadata", None) or {}).get("extra") or {})
    name = extra.get("schedule") or "exp_karras"
    if name != "exp_karras":
        return name, dict(extra.get("schedule_params") or {})  # SDXL's Align Your Steps: {"model": "SDXL"}
    p = extra.get("exp_karras_p")  # 0 is a schedule of its own, not "unrecorded"
    return name, {"p": 1.0 if p is None else float(p)}


def teacher_prediction_type(shortcut) -> str | None:
    """What the shortcut's teacher predicts ("epsilon", "v_prediction"), as ``distill shortcut`` records it in its
    file's training record; None where it is not recorded (files from before, shortcuts built in code)."""
    extra = (getattr(shortcut, "metadata", None) or {}).get("extra") or {}
    return (extra.get("training") or {}).get("prediction_type")


def read_shortcut_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a shortcut file (``t_band`` as two floats), read from its header alone."""
    names, raw = read_safetensors_header(path)
    return _checked_metadata(raw, names, path)


def _checked_metadata(raw: dict[str, str], tensor_names, path) -> dict:
    fmt = raw.get("format")
    if fmt != json.dumps(FORMAT_NAME):
        # Other writers store a plain string here (safetensors itself writes "pt").
        found = "no 'format' metadata entry" if fmt is None else "format " + repr(fmt.strip('"'))
        hint = " (it looks like a LoRA)" if any("lora" in k.lower() for k in tensor_names) else ""
        raise FileFormatError(f"{path}: not a Direct Distill shortcut file: {found}{hint}")
    version = json_metadata(raw, "format_version", path)
    if version != FORMAT_VERSION:
        raise FileFormatError(f"{path}: shortcut format version {version!r}; this code reads version {FORMAT_VERSION}")
    meta = {k: json_metadata(raw, k, path) for k in METADATA_KEYS}  # raises on a missing or corrupt entry
    band = meta["t_band"]
    if not (isinstance(band, list) and len(band) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in band)
            and 0 <= band[0] <= band[1] <= 1000):
        raise FileFormatError(f"{path}: metadata 't_band' must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1000, "
                              f"got {band!r}")
    meta["t_band"] = [float(band[0]), float(band[1])]
    if not isinstance(meta["teacher_unet_shape_fingerprint"], str) or not meta["teacher_unet_shape_fingerprint"]:
        raise FileFormatError(f"{path}: metadata 'teacher_unet_shape_fingerprint' must be a non-empty string")
    extra = meta["extra"]
    kinds = {"schedule": str, "schedule_params": dict, "exp_karras_p": (int, float), "training": dict}
    wrong = [k for k, kind in kinds.items() if isinstance(extra, dict) and extra.get(k) is not None
             and (not isinstance(extra[k], kind) or isinstance(extra[k], bool))]
    if not isinstance(extra, dict) or wrong:  # what the samplers read of it: the schedule, the teacher's prediction
        raise FileFormatError(f"{path}: metadata 'extra' " + (f"entries {', '.join(wrong)} are not of the kind the "
                              "samplers read" if wrong else f"must be an object, got {type(extra).__name__}"))
    return meta


def _build(config, key: str, path) -> TimeEmbedNAFNet:
    if not isinstance(config, dict):
        raise FileFormatError(f"{path}: metadata '{key}' is not an architecture config: {config!r}")
    try:
        return TimeEmbedNAFNet(**config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise FileFormatError(f"{path}: metadata '{key}' is not a valid TimeEmbedNAFNet config ({err})") from None


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in found and found[k].shape != v.shape]
    problems = ([f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []) + \
               ([f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})"] if unexpected else []) + \
               ([f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]})"] if wrong else [])
    if problems:
        raise FileFormatError(f"{path}: tensors do not match the stored architecture config: {'; '.join(problems)}")
    dtypes = {t.dtype for t in found.values()}
    if len(dtypes) != 1 or not dtypes <= set(STORED_DTYPES):
        raise FileFormatError(f"{path}: tensors of dtype {', '.join(sorted(map(str, dtypes)))}: a shortcut's weights "
                              f"are all of one of {', '.join(map(str, STORED_DTYPES))}")
