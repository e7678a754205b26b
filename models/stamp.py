"""`python -m direct_distill stamp`: list the few-step presets, or write one into a LoRA file's metadata so that
both front doors sample it right with nothing else given."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..schedulers.few_step_presets import PRESETS, describe_nfes, get_preset
from .io import FileFormatError, atomic_save_file, is_direct_distill_file, read_safetensors, read_safetensors_header
from .few_step_lora import family_mismatches
from .lora_layouts import PRESET_METADATA_KEY, LoraLayoutError, parse_lora

def stamp(path: str | os.PathLike, preset_name: str, out: str | os.PathLike | None = None) -> Path:
    """Write ``preset_name`` into the metadata of the LoRA file ``path`` (to ``out``, or in place), atomically;
    the tensors are written back unchanged, byte for byte. In place, a symbolic link's target is stamped (the link
    and any other links to it see the stamp). Refuses (ValueError) a preset name not in the table, a folder as the
    file to write, a Direct Distill file (it carries its own schedule) and a LoRA whose layers do not fit the
    preset's family."""
    preset = get_preset(preset_name)
    target = Path(path).resolve() if out is None else Path(out)
    if target.is_dir():
        raise ValueError(f"{target}: is a folder; give --out a file name")
    if out is not None and target.exists() and target.resolve() != Path(path).resolve():
        try:  # replaced only where it is stamp's own output, as a re-run expects
            held = read_safetensors_header(target)[1]
        except FileFormatError:
            held = {}
        if PRESET_METADATA_KEY not in held:
            raise ValueError(f"{target} exists and is not a stamped LoRA (a student, a checkpoint, another file?): "
                             "give --out another name, or move it away first")
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
    return atomic_save_file(tensors, target, {**metadata, PRESET_METADATA_KEY: preset.name})


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
    except (ValueError, OSError) as err:  # OSError: a folder missing, a file in the way, no permission, a full disk
        print(f"stamp: {err}", file=sys.stderr)
        return 1
    print(f"{written}: stamped with preset {args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
