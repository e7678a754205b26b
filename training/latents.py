"""`python -m direct_distill latents`: a folder of captioned images encoded by a teacher's VAE, at the size asked,
into the latents file the data methods train on; with progress, resuming where an interrupted run stopped."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.io import (LOCK_NAME, FileFormatError, FolderInUse, atomic_save_file, check_replaceable,
                         check_writable, check_writable_folder, hold_folder, read_safetensors)
from .cli import OneLineParser, add_arguments
from .config import DTYPE_NAMES, Settings, SettingError, flag_of, replace_settings, setting
from .data import (ENCODE_BATCH_SIZE, FOLDER_HINT, LATENTS_FORMAT, VAE_SCALE_KEY, encode_images, load_images,
                   read_image_folder, vae_checksum, write_latents_file)
from .runner import make_accelerator
from .teachers import DTYPES, load_teacher_vae

PART = 256   # images per part file: the most an interrupted run encodes again


def _key(*items) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _listing(folder: Path, paths: list[Path]) -> list:
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def encode_folder(vae, folder: str | os.PathLike, size: int, out: str | os.PathLike, *,
                  batch_size: int = ENCODE_BATCH_SIZE,
                  work: str | os.PathLike | None = None, accelerator=None) -> Path:
    """Encode every image of ``folder`` (``data.read_image_folder``: same-name .txt captions) at ``size`` x
    ``size`` pixels with ``vae`` and write the latents file ``out`` (``data.write_latents_file``: posterior means
    and stds times the scaling factor, one prompt per latent).

    The images are encoded in parts of :data:`PART`, each kept in ``work`` (default ``<out>.work``) until ``out``
    is written: a re-run encodes only the parts not yet there, and several processes (``accelerate launch``)
    share the parts. A part is encoded again when the VAE, the size or its images change.
    """
    folder, out = Path(folder), Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    accelerator = accelerator or make_accelerator()
    with hold_folder(work, hold=accelerator.is_local_main_process):  # a second run into it would mix their parts
        return _encode_folder(vae, folder, size, out, batch_size, work, accelerator)


def _encode_folder(vae, folder: Path, size: int, out: Path, batch_size: int, work: Path, accelerator) -> Path:
    paths, prompts = read_image_folder(folder)
    checksum = vae_checksum(vae)
    parts = [paths[i:i + PART] for i in range(0, len(paths), PART)]
    captions = [prompts[i:i + PART] for i in range(0, len(paths), PART)]
    keys = [_key(checksum, size, _listing(folder, part), caption) for part, caption in zip(parts, captions)]
    data_key = _key(*keys)
    if out.is_file() and read_safetensors(out, select=lambda k: False)[1].get("data_key") == data_key:
        if accelerator.is_main_process:
            print(f"{out}: already holds these {len(paths)} images at {size} px")
            _remove_parts(work, set(keys))  # what this re-run made of the folder (its lock), parts out holds
        accelerator.wait_for_everyone()
        return out

    device, dtype = accelerator.device, next(vae.parameters()).dtype
    vae.to(device)
    mine = list(range(accelerator.process_index, len(parts), accelerator.num_processes))
    todo = [i for i in mine if not _part_done(work / f"part_{i:05d}.safetensors", keys[i])]
    done_images = sum(len(parts[i]) for i in mine if i not in todo)
    total = sum(len(parts[i]) for i in mine)
    with tqdm(total=total, initial=done_images, unit="image", desc=f"encode {folder.name} at {size} px",
              disable=not accelerator.is_local_main_process) as bar:
        for i in todo:
            means, stds = [], []
            for j in range(0, len(parts[i]), batch_size):
                pixels = load_images(parts[i][j:j + batch_size], vae.config.in_channels, size)
                mean, std = encode_images(vae, pixels.to(device, dtype), progress=False)
                means.append(mean.float().cpu())
                stds.append(std.float().cpu())
                bar.update(len(pixels))
            atomic_save_file({"latents": torch.cat(means), "std": torch.cat(stds)},
                             work / f"part_{i:05d}.safetensors", {"part_key": keys[i]})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stale = [i for i in range(len(parts)) if not _part_done(work / f"part_{i:05d}.safetensors", keys[i])]
        if stale:  # only another run's parts could be there: the folder is held, every part was checked
            raise FileFormatError(f"{work}: part {stale[0]} is not of these images; run the command again to "
                                  "encode it again")
        tensors = [read_safetensors(work / f"part_{i:05d}.safetensors")[0] for i in range(len(parts))]
        write_latents_file(out, torch.cat([t["latents"] for t in tensors]), torch.cat([t["std"] for t in tensors]),
                           prompts, {"data_key": data_key, "size": size, "source": str(folder),
                                     VAE_SCALE_KEY: float(vae.config.scaling_factor)})
        _remove_parts(work, set(keys))
        print(f"{out}: {len(paths)} images at {size} px -> latents {tuple(tensors[0]['latents'].shape[1:])}"
              + (f"; {prompts.count('')} without a caption (empty prompt)" if "" in prompts else ""))
    accelerator.wait_for_everyone()
    return out


def _remove_parts(work: Path, keys: set[str]) -> None:
    """This run's part files (those of its ``keys``) and then the work folder, if that left it empty: a folder
    the user named keeps everything else."""
    for path in work.glob("part_*.safetensors"):
        try:
            ours = read_safetensors(path, select=lambda k: False)[1].get("part_key") in keys
        except FileFormatError:
            ours = False
        if ours:
            path.unlink()
    (work / LOCK_NAME).unlink(missing_ok=True)  # held until this run returns; nothing is left to share
    try:
        work.rmdir()
    except OSError:  # not empty
        pass


def _part_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return read_safetensors(path, select=lambda k: False)[1].get("part_key") == key
    except FileFormatError:   # a part cut short: encode it again
        return False


@dataclass
class LatentsConfig(Settings):
    """Settings of the latents command."""

    group = "latents"

    teacher: Path | None = setting(None, help="diffusers folder or single checkpoint file of the teacher (only its "
                                              "VAE is loaded)")
    data: Path | None = setting(None, help=f"{FOLDER_HINT} (required)")
    out: Path | None = setting(None, help="the latents file to write")
    size: int | None = setting(None, ge=8, help="pixels per side: each image is centre-cropped to a square and "
                                                "resized to it (required)")
    batch_size: int = setting(ENCODE_BATCH_SIZE, ge=1, help="images per VAE call, per process")
    dtype: str = setting("float32", choices=DTYPE_NAMES, help="the VAE's dtype")
    work: Path | None = setting(None, help="the encoded parts until --out is written; a re-run resumes from them "
                                           "(default: <out>.work)")
    cpu: bool = setting(False, help="run on the CPU even where a GPU is present")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m direct_distill latents",
        description="Encode a folder of captioned images with a teacher's VAE, at the size asked, into the latents "
                    "file that progressive and gdd take (--latents). Re-running after an interruption resumes; "
                    "several processes (accelerate launch, torchrun) share the images.")
    defaults = LatentsConfig()
    add_arguments(parser, defaults, None, "latents")
    try:
        config = replace_settings(defaults, **vars(parser.parse_args(argv)))
        for name in ("teacher", "data", "out", "size"):
            if getattr(config, name) is None:
                raise SettingError(name, "required")
        work = config.work if config.work is not None else config.out.with_name(config.out.name + ".work")
        if os.path.realpath(work) == os.path.realpath(config.out):
            raise SettingError("work", f"{work} is --out itself: the parts and the file cannot share a name; give "
                                       "another folder")
        inputs = {"--teacher": config.teacher, "--data": config.data}
        for name, check in (("data", read_image_folder), ("out", lambda p: check_writable(p, "the output file")),
                            ("out", lambda p: check_replaceable(p, inputs, LATENTS_FORMAT)),
                            ("work", lambda p: check_writable_folder(p, "the work folder"))):
            if getattr(config, name) is not None:
                try:
                    check(getattr(config, name))
                except (FileNotFoundError, ValueError, PermissionError) as err:
                    raise SettingError(name, str(err)) from None
    except SettingError as err:
        raise SystemExit(f"latents: {flag_of(defaults, err.name)}: {err.problem}") from None
    vae = load_teacher_vae(config.teacher, DTYPES[config.dtype])
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if config.size % factor:
        raise SystemExit(f"latents: --size: {config.size} pixels: the VAE downsamples by {factor}; give a multiple "
                         "of it")
    try:
        encode_folder(vae, config.data, config.size, config.out, batch_size=config.batch_size, work=config.work,
                      accelerator=make_accelerator(config.cpu))
    except (ValueError, FloatingPointError, FolderInUse, OSError) as err:  # an unreadable image, a non-finite
        # latent, a second run into the work folder, a full disk: named in one line (the parts written stay)
        raise SystemExit(f"latents: {err}") from None
    except KeyboardInterrupt:
        work = config.work or config.out.with_name(config.out.name + ".work")
        print(f"\nlatents: stopped; run the same command again to resume from the parts in {work}", file=sys.stderr)
        return 130
    return 0
