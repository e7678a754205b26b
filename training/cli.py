"""`python -m direct_distill distill <method>`: the command line of every registered method, generated from its
config dataclass (each flag's type, default, bounds and help are its field's), run by the one runner."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

from ..models.io import FileFormatError
from .config import Settings, SettingError, flag, flag_of, kind, leaves, replace_settings
from .loop import CheckpointMismatch
from .registry import METHODS, entry
from .runner import Preset, execute, prepare


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line naming the flag, not the usage of every flag."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    """The parser of every registered method; ``preset``'s defaults are named in the help."""
    parser = OneLineParser(prog="python -m direct_distill distill",
                           description="Distil a diffusers teacher on a CPU, one GPU, or several processes "
                                       "(torchrun / accelerate launch). Each method's --help lists its settings.")
    sub = parser.add_subparsers(dest="method", required=True, metavar="method", title="methods")
    for name in METHODS:
        method = entry(name)
        p = sub.add_parser(name, help=method.summary, description=method.description)
        add_arguments(p, method.config(), preset, name)
    return parser


def add_arguments(parser: argparse.ArgumentParser, defaults: Settings, preset: Preset | None, method: str) -> None:
    """One flag per setting of ``defaults``, in a group per nested settings dataclass; a flag left out keeps
    the default."""
    group = None
    hints = {f.name: hint for f, hint, _ in leaves(defaults)}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            add_arguments(parser, value, preset, method)
        elif f.name in hints:
            group = group or parser.add_argument_group(defaults.group or method)
            _add_flag(group, f, hints[f.name], value, preset, method)


def _add_flag(group, f, hint, value, preset: Preset | None, method: str) -> None:
    scalar, optional, length = kind(hint)
    kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, value, preset, method))
    if scalar is bool:
        kwargs["action"] = "store_false" if value else "store_true"
    else:
        kwargs["type"] = _converter(scalar, optional)
        if length is not None:
            kwargs["nargs"] = "+" if length < 0 else length
        for key in ("choices", "metavar"):
            if f.metadata[key] is not None:
                kwargs[key] = f.metadata[key]
    group.add_argument(flag(f), **kwargs)


def main(argv: list[str] | None = None, preset: Preset | None = None) -> int:
    args = vars(build_parser(preset).parse_args(argv))
    method = args.pop("method")
    defaults = entry(method).config()
    prog = f"distill {method}"

    def refuse(err: SettingError) -> SystemExit:
        return SystemExit(f"{prog}: {flag_of(defaults, err.name)}: {err.problem}")

    try:
        plan = prepare(method, replace_settings(defaults, **args), preset)
    except SettingError as err:
        raise refuse(err) from None
    try:
        execute(plan)
    except SettingError as err:
        raise refuse(err) from None
    except (FloatingPointError, CheckpointMismatch) as err:  # a non-finite loss; float16's overflow checks
        raise SystemExit(f"{prog}: {err}") from None
    except FileFormatError as err:  # a damaged checkpoint or stage file in the work folder
        raise SystemExit(f"{prog}: {err}; delete that file to compute it again (a checkpoint: the stage restarts), "
                         f"or give another --work folder") from None
    except OSError as err:  # a full disk, a folder gone: the work folder keeps what was saved before
        raise SystemExit(f"{prog}: {err}; run the same command again to resume from the last checkpoint in "
                         f"{plan.run.work}") from None
    except KeyboardInterrupt:
        print(f"\n{prog}: stopped; run the same command again to resume from the last checkpoint in "
              f"{plan.run.work}", file=sys.stderr)
        return 130
    return 0


def _converter(scalar: type, optional: bool):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        return scalar(text)

    convert.__name__ = scalar.__name__  # argparse names it in "invalid int value"
    return convert


def _help(f, value, preset: Preset | None, method: str) -> str:
    """The field's help and what it is when not given."""
    meta, name = f.metadata, f.name
    own = f" for the {preset.name} teacher" if preset else ""
    if isinstance(value, bool) or "(default:" in meta["help"]:
        note = None
    elif meta["preset"]:
        given = preset.values.get(meta["preset"]) if preset else None
        note = f"default: {meta['fallback']}" + (f"; {given}{own}" if given is not None else "")
    elif name == "teacher":
        note = f"default: the {preset.name} teacher, {_show(preset.teacher)}" if preset else "required"
    elif name == "out":
        note = "required" + (f"; default {_show(preset.out(method))}{own}" if preset else "")
    elif name == "work":
        note = "default: <out>.work" + (f"; {_show(preset.work(method))}{own}" if preset else "")
    elif value is None and preset and name in preset.describe:
        note = f"default{own}: {preset.describe[name]}"
    elif value is None or value == ():
        note = None
    else:
        note = "default: " + " ".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                      for v in (value if isinstance(value, tuple) else (value,)))
    text = meta["help"] + (f" ({note})" if note else "")
    return text.replace("%", "%%")


def _show(path: Path) -> str:
    """A path as the help shows it: relative to the current folder when inside it."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)
