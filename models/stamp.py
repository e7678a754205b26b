"""`python -m direct_distill stamp`: list the few-step presets, or write one into a LoRA file's metadata so that
both front doors sample it right with nothing else given."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..schedulers.few_step_presets import PRESETS, describe_nfes, get_preset
from .io import FileFormatError, atomic_save_file, read_safetensors
from .lora_layouts import PRESET_METADATA_KEY, LoraLayoutError, lora_family, parse_lora
from .student_file import is_direct_distill_file

# Widths the real models' layers take in, where a LoRA says which family it was made for: the cross-attention
# context (attn2's to_k / to_v) and each text encoder's hidden size.
_FAMILY_WIDTHS = {
    "sd15": {("unet", "attn2_to_k"): 768, ("unet", "attn2_to_v"): 768, ("text_encoder", "self_attn_q_proj"): 768},
    "sdxl": {("unet", "attn2_to_k"): 2048, ("unet", "attn2_to_v"): 2048, ("text_encoder", "self_attn_q_proj"): 768,
             ("text_encoder_2", "self_attn_q_proj"): 1280},
}


def family_mismatches(layers, family: str) -> list[str]:
    """Why a LoRA (``parse_lora``'s layers) cannot be one for ``family`` ("sd15", "sdxl"): the family its layer
    names say, and layers whose input width is not that of the family's real model. Empty when it fits."""
    made_for = lora_family(layers)
    if made_for is None:
        return ["its layer names say neither SD1.x nor SDXL"]
    if made_for != family:
        return [f"its layers are those of {made_for}, not {family}"]
    wrong = [f"{component} {name} takes {layer.down.shape[1]} features, {family} has {width}"
             for (component, name), layer in layers.items()
             for (where, suffix), width in _FAMILY_WIDTHS[family].items()
             if component == where and name.endswith(suffix) and layer.down.shape[1] != width]
    return [f"{len(wrong)} layers have another width, e.g. {wrong[0]}"] if wrong else []


def stamp(path: str | os.PathLike, preset_name: str, out: str | os.PathLike | None = None) -> Path:
    """Write ``preset_name`` into the metadata of the LoRA file ``path`` (to ``out``, or in place), atomically;
    the tensors are written back unchanged, byte for byte. Refuses (ValueError) a preset name not in the table, a
    Direct Distill file (it carries its own schedule) and a LoRA whose layers do not fit the preset's family."""
    preset = get_preset(preset_name)
    tensors, metadata = read_safetensors(path)
    if is_direct_distill_file(metadata):
        raise ValueError(f"{path}: a Direct Distill file says how it samples; stamping is for LoRAs from elsewhere")
    try:
        layers = parse_lora(tensors, metadata)
    except LoraLayoutError as err:
        raise FileFormatError(f"{path}: {err}") from None
    problems = family_mismatches(layers, preset.family)
    if problems:
        raise ValueError(f"{path}: does not fit preset {preset.name} ({preset.family}): " + "; ".join(problems))
    return atomic_save_file(tensors, path if out is None else out, {**metadata, PRESET_METADATA_KEY: preset.name})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m direct_distill stamp", description=__doc__)
    parser.add_argument("file", nargs="?", help="the LoRA .safetensors file to stamp")
    parser.add_argument("--preset", help="the preset to write (see --list)")
    parser.add_argument("--out", help="write the stamped file here instead of replacing FILE")
    parser.add_argument("--list", action="store_true", help="print the presets, one a line, name first")
    args = parser.parse_args(argv)
    if args.list:
        for p in PRESETS.values():
            print(f"{p.name}  {p.family}  steps {describe_nfes(p.nfes)} (default {p.default_nfe})  {p.sampler}"
                  f"{f' gamma {p.gamma}' if p.sampler == 'tcd' else ''}  {p.spacing}  cfg {p.guidance}  {p.source}")
        return 0
    if not args.file or not args.preset:
        parser.error("give FILE and --preset NAME, or --list")
    try:
        written = stamp(args.file, args.preset, args.out)
    except ValueError as err:
        print(f"stamp: {err}", file=sys.stderr)
        return 1
    print(f"{written}: stamped with preset {args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
