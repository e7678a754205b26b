"""Training data of the methods: prompt files, data latents (the latents file, image folders with captions) and
their encoding by a teacher's VAE."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.io import FileFormatError, atomic_save_file, json_metadata, read_safetensors, tensor_problem
from .config import Settings, SettingError, setting

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENTS_FORMAT = "direct_distill.latents"
VAE_SCALE_KEY = "vae_scaling_factor"  # in a latents file's metadata: the scaling factor of the VAE that encoded it
FOLDER_HINT = ("a folder of images (" + ", ".join(IMAGE_SUFFIXES) + "), each captioned by a .txt file of the "
               "same name (image.png + image.txt)")


@dataclass
class DataSource(Settings):
    """Where a method that trains on data gets it (neither: the preset's data, for its own teacher)."""

    group = "data"

    data: Path | None = setting(None, help=f"{FOLDER_HINT}, encoded by the teacher's VAE at the UNet's size")
    latents: Path | None = setting(None, help="instead of --data: a latents file, 'latents' (N, C, H, W) (VAE "
                                              "latents times the scaling factor), optionally their posterior "
                                              "'std' and one prompt per latent in its metadata; --prompts gives "
                                              "one per latent or one for all")

    def check(self) -> None:
        if self.data is not None and self.latents is not None:
            raise SettingError("latents", "give --data or --latents, not both")


# --- prompts -------------------------------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file (one prompt per line)")
    # utf-8-sig: Notepad's byte-order mark would otherwise be three tokens of the first prompt
    prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def drop_prompts(prompts: Sequence[str], p_uncond: float) -> list[str]:
    """Each prompt replaced by the empty prompt with probability ``p_uncond`` (global RNG): distilling at
    guidance 1 on both branches keeps classifier-free guidance usable with the student."""
    drop = (torch.rand(len(prompts)) < p_uncond).tolist()
    return ["" if d else p for p, d in zip(prompts, drop)]


def sample_prompts(prompts: Sequence[str], batch_size: int) -> list[str]:
    """``batch_size`` prompts drawn uniformly (global RNG), with replacement."""
    return [prompts[i] for i in torch.randint(len(prompts), (batch_size,)).tolist()]


# --- data latents --------------------------------------------------------------------------------------------


class LatentData:
    """Training pairs (x0, prompt) drawn from the global RNG: VAE latents (times the scaling factor).

    Args:
        latents: ``(N, C, H, W)`` posterior means (or samples).
        prompts: N prompts, one for all, or None (the empty prompt).
        latent_std: optional ``(N, C, H, W)`` posterior std; x0 is then a fresh posterior sample each time.
    """

    def __init__(self, latents: torch.Tensor, prompts: Sequence[str] | str | None = None,
                 latent_std: torch.Tensor | None = None):
        if latents.ndim != 4 or len(latents) == 0:
            raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got shape {tuple(latents.shape)}")
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts or ""]
        if len(prompts) not in (1, len(latents)):
            raise ValueError(f"{len(prompts)} prompts for {len(latents)} latents: give one per latent or one for all")
        if latent_std is not None and latent_std.shape != latents.shape:
            raise ValueError("latent_std must have the shape of latents")
        self.latents, self.prompts, self.latent_std = latents.float(), list(prompts), latent_std

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(self.latents), (batch_size,))
        x0 = self.latents[idx]
        if self.latent_std is not None:
            x0 = x0 + self.latent_std[idx].float() * torch.randn_like(x0)
        prompts = self.prompts * batch_size if len(self.prompts) == 1 else [self.prompts[i] for i in idx.tolist()]
        return x0, prompts[:batch_size]


def write_latents_file(path: str | os.PathLike, latents: torch.Tensor, std: torch.Tensor | None = None,
                       prompts: Sequence[str] | None = None, metadata: dict | None = None) -> Path:
    """The latents file the data methods train on: ``latents`` (N, C, H, W), VAE latents times the scaling factor,
    optionally their posterior ``std``, and optionally one prompt per latent (metadata ``prompts``)."""
    if prompts is not None and len(prompts) != len(latents):
        raise ValueError(f"{len(prompts)} prompts for {len(latents)} latents")
    tensors = {"latents": latents} if std is None else {"latents": latents, "std": std}
    meta = {"format": LATENTS_FORMAT, **(metadata or {})}
    if prompts is not None:
        meta["prompts"] = list(prompts)
    return atomic_save_file(tensors, path, meta)


def check_latents_file(path: str | os.PathLike) -> tuple[int, list[str] | None]:
    """``(number of latents, prompts or None)`` of a latents file, from its header alone (nothing is loaded);
    one clear error if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such latents file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = set(f.keys()), dict(f.metadata() or {})
            shape = f.get_slice("latents").get_shape() if "latents" in keys else None
            std_shape = f.get_slice("std").get_shape() if "std" in keys else shape
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{path}: not a readable safetensors file ({err})") from None
    if shape is None:
        raise FileFormatError(f"{path}: no 'latents' tensor (a latents file holds 'latents' (N, C, H, W), VAE "
                              "latents times the scaling factor, and optionally their posterior 'std')")
    if len(shape) != 4 or shape[0] == 0:
        raise FileFormatError(f"{path}: 'latents' must be a non-empty (N, C, H, W) tensor, got shape {shape}")
    if std_shape != shape:
        raise FileFormatError(f"{path}: 'std' has shape {std_shape}, 'latents' {shape}")
    prompts = json_metadata(metadata, "prompts", path) if "prompts" in metadata else None
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != shape[0]
                                or not all(isinstance(p, str) for p in prompts)):
        raise FileFormatError(f"{path}: metadata 'prompts' must list one prompt per latent ({shape[0]}), each a string")
    return shape[0], prompts


def read_latents_file(path: str | os.PathLike, prompts: Sequence[str] | None = None, vae=None) -> LatentData:
    """A latents file as training data; ``prompts`` (one per latent or one for all) replace the file's own. With
    ``vae`` (the teacher's), a file that records another VAE's scaling factor (SD1.x's 0.18215 against SDXL's
    0.13025: same channels, latents 1.4x too large) is refused."""
    count, own = check_latents_file(path)
    tensors, metadata = read_safetensors(path)
    for name in ("latents", "std"):
        tensor = tensors.get(name)
        if tensor is not None and (what := tensor_problem(tensor, dtypes=None)):
            raise FileFormatError(f"{path}: '{name}' holds {what}: not VAE latents")
    recorded = metadata.get(VAE_SCALE_KEY)
    try:
        recorded = None if recorded is None else float(recorded)
    except ValueError:
        raise FileFormatError(f"{path}: metadata '{VAE_SCALE_KEY}' is {recorded!r}, not a number") from None
    if vae is not None and recorded is not None and not math.isclose(recorded, vae.config.scaling_factor,
                                                                      rel_tol=1e-6):
        raise ValueError(f"{path}: encoded by a VAE of scaling factor {recorded:g}, the teacher's is "
                         f"{vae.config.scaling_factor:g}: they were made for another model; encode the images with "
                         "this teacher (python -m direct_distill latents)")
    return LatentData(tensors["latents"], prompts if prompts is not None else own, latent_std=tensors.get("std"))


# --- images --------------------------------------------------------------------------------------------------


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The images of a data folder (searched recursively, sorted) and their captions: ``image.png`` is captioned
    by ``image.txt`` beside it; an image without one gets the empty prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data folder; expected {FOLDER_HINT}")
    # hidden files are not images of the set (macOS writes ._name.png beside each copied name.png)
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not images:
        raise ValueError(f"{folder}: the data folder holds no images; expected {FOLDER_HINT}")
    prompts = []
    for path in images:
        caption = path.with_suffix(".txt")
        try:  # utf-8-sig: a caption saved by Notepad starts with a byte-order mark, not with text
            prompts.append(caption.read_text(encoding="utf-8-sig").strip() if caption.is_file() else "")
        except UnicodeDecodeError as err:
            raise ValueError(f"{caption}: not UTF-8 text ({err.reason} at byte {err.start}); save the caption as "
                             "UTF-8") from None
    return images, prompts


def load_images(paths: Sequence[Path], channels: int, size: int) -> torch.Tensor:
    """Images as ``(N, channels, size, size)`` in [-1, 1]: centre-cropped to a square, resized (bicubic)."""
    import numpy as np
    from PIL import Image, ImageOps

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = _opaque(_eight_bit(ImageOps.exif_transpose(image)))  # upright, 0-255, on white
                image = image.convert("L" if channels == 1 else "RGB")
        except OSError as err:
            raise ValueError(f"{path}: not a readable image ({err})") from None
        except Image.DecompressionBombError as err:  # PIL's guard against images that would fill the memory
            raise ValueError(f"{path}: too large to decode safely ({err}); downscale it") from None
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        image = image.resize((size, size), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        out.append((array[None] if channels == 1 else array.permute(2, 0, 1)) / 127.5 - 1)
    return torch.stack(out)


def _opaque(image):
    """An image with transparency (RGBA, LA, a palette or grey with a transparent colour) laid on white, as a page
    shows it: PIL's own conversion drops the alpha and keeps whatever colour the transparent pixels hold (black, in
    most cut-outs)."""
    from PIL import Image

    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image
    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


def _eight_bit(image):
    """16- and 32-bit single-channel images (``I;16``, ``I``) scaled to 8 bits: PIL's own conversion clips them at
    255, which turns a 16-bit grey white."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(array.max())
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


# --- encoding ------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 1000,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (``(N, C, H, W)`` in [-1, 1], on the VAE's device), times the VAE's
    scaling factor: what the data methods train on. A non-finite latent (SDXL's VAE overflows in float16) is one
    error, not a poisoned latents file."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode", leave=False, disable=not progress):
        posterior = vae.encode(images[i:i + batch_size]).latent_dist
        if not torch.isfinite(posterior.mean).all():
            dtype = str(next(vae.parameters()).dtype).removeprefix("torch.")
            raise FloatingPointError(
                f"the VAE gave non-finite latents for images {i}-{i + len(posterior.mean) - 1} in {dtype}"
                + (" (SDXL's VAE overflows in float16): encode with --dtype bfloat16 or float32"
                   if dtype == "float16" else ""))
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def parameter_sums(*modules) -> tuple[float, float]:
    """The sum and the sum of squares of every parameter of ``modules`` (None skipped), in float64, one parameter
    at a time: a fingerprint of weights, cheap once they are loaded."""
    def each():
        return (p.detach().double() for m in modules if m is not None for p in m.parameters())

    return float(sum(p.sum() for p in each())), float(sum((p * p).sum() for p in each()))


def vae_checksum(vae) -> str:
    """A fingerprint of a VAE's weights (the sum of every parameter) and of its scaling factor, keying cached
    encodings (which are scaled)."""
    return f"{parameter_sums(vae)[0]} x{float(vae.config.scaling_factor)!r}"


# Images per VAE call when encoding a folder: SD's VAE encoder at 512 px holds about 2.8 GB of activations for 8
# (README, Real models); 64 would need about 20 GB.
ENCODE_BATCH_SIZE = 8


def encode_image_folder(vae, folder: str | os.PathLike, size: int, cache: str | os.PathLike | None = None,
                        chunk: int = 64) -> LatentData:
    """A folder of captioned images (:func:`read_image_folder`) encoded by ``vae`` at ``size`` pixels, ``chunk``
    images read at a time and :data:`ENCODE_BATCH_SIZE` per VAE call, as posterior-sampled training latents. With
    ``cache`` (a latents file) the encoding is kept and reused until the VAE, the size or the folder's files
    change."""
    folder = Path(folder)
    paths, prompts = read_image_folder(folder)
    device = next(vae.parameters()).device
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = hashlib.sha256(json.dumps([vae_checksum(vae), size, listing, prompts]).encode()).hexdigest()
    if cache is not None and Path(cache).is_file():
        tensors, meta = read_safetensors(cache)
        if meta.get("data_key") == key:
            return LatentData(tensors["latents"], prompts, latent_std=tensors["std"])
    means, stds = [], []
    with tqdm(total=len(paths), desc=f"encode {folder.name}", unit="image", leave=False) as bar:
        for i in range(0, len(paths), chunk):
            pixels = load_images(paths[i:i + chunk], vae.config.in_channels, size).to(device)
            mean, std = encode_images(vae, pixels, batch_size=ENCODE_BATCH_SIZE, progress=False)
            means.append(mean.cpu())
            stds.append(std.cpu())
            bar.update(len(pixels))
    latents, std = torch.cat(means), torch.cat(stds)
    if cache is not None:
        write_latents_file(cache, latents, std, prompts, {"data_key": key})
    return LatentData(latents, prompts, latent_std=std)
