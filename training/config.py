"""Settings of a distillation run as dataclasses: each field is declared once, with its help text and bounds, and
the command line, the validation and the record kept in the output files all follow from it."""

from __future__ import annotations

import dataclasses
import math
import operator
import typing
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, ClassVar

from ..schedulers.prediction import PREDICTION_TYPES
from .loop import TrainConfig

# Every transformer block (attention projections, feed-forward, its input and output projections) and every
# resnet (both convolutions, the shortcut, the time projection) and resampler: the modules few-step LoRAs for
# SD1.x/2.x/XL adapt (LCM-LoRA's set), named as diffusers names them.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                          "upsamplers.0.conv")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class SettingError(ValueError):
    """A setting out of its bounds or contradicting another; ``name`` is the field (the CLI's flag)."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name}: {problem}")


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple | None = None, flag: str | None = None, metavar: str | tuple | None = None,
            changeable: bool = False, preset: str | None = None, fallback: Any = None,
            teacher_default: str | None = None) -> Any:
    """A dataclass field of a run setting.

    Args:
        help: what the setting does (the CLI's help text).
        ge, gt, le, lt: bounds of a number (of each element of a tuple).
        choices: the values allowed.
        flag: the CLI flag, if not ``--field-name``; a bool field that defaults to True needs one (it stores False).
        metavar: the CLI's placeholder(s) for the value.
        changeable: may differ between runs of one work folder (where files go, logging), unlike every setting
            that shapes the result.
        preset: ``None`` means "the value the preset gives under this key" (e.g. the lab's guidance), or
            ``fallback`` where no preset applies; the runner resolves it.
        teacher_default: ``None`` means the teacher's own value of this (``"prediction_type"``, ``"latent_size"``,
            ``"image_size"``): a re-run that spells that value out resumes the run that left it to the teacher.
    """
    metadata = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=choices, flag=flag, metavar=metavar,
                    changeable=changeable, preset=preset, fallback=fallback, teacher_default=teacher_default)
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class Settings:
    """Base of the settings dataclasses: every field is checked against its declaration on construction, then
    :meth:`check` looks at the fields together. ``group`` titles the fields in the CLI's help."""

    group: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if not f.metadata.get("help"):
                continue  # a nested settings dataclass: checked when it was built
            setattr(self, f.name, _checked(f, _hints(type(self))[f.name], getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields; raise :class:`SettingError` naming the field at fault."""


def save_dtype_setting(what: str, note: str = "") -> Any:
    """The dtype ``what`` is stored as in the written file; training itself stays float32."""
    return setting("float32", choices=DTYPE_NAMES, changeable=True,
                   help=f"dtype of {what} in the written file (training stays float32; float16 halves the file{note})")


@dataclass
class LoraSpec(Settings):
    """Shape of a LoRA: ``W + (alpha / rank) B A`` on each target module (names matched as peft does)."""

    group = "the student's LoRA"

    rank: int = setting(16, help="LoRA rank", ge=1)
    alpha: float = setting(16.0, help="LoRA alpha (the update is alpha/rank B A)", gt=0)
    target_modules: tuple[str, ...] = setting(DEFAULT_TARGET_MODULES,
                                              help="UNet modules that get the LoRA (peft name matching)")
    save_dtype: str = save_dtype_setting("the LoRA weights", ", as most published LoRAs are stored")


def guidance_setting(what: str) -> Any:
    """A few-step method's ``guidance``: the CFG its students (``what``) reproduce."""
    return setting(None, ge=1, preset="guidance", fallback=7.5,
                   help=f"the classifier-free guidance the {what} reproduce: the teacher's trajectories are distilled "
                        "at this CFG and the student samples without it (guidance 1)")


def sample_with_cfg_setting(what: str) -> Any:
    """A few-step method's ``sample_with_cfg``: leave the guidance to sampling instead of distilling it."""
    return setting(False, help=f"distil at guidance 1 and leave CFG to sampling instead (the papers' setting; the "
                               f"{what} then recommend --guidance)")


def student_prediction_setting() -> Any:
    """A student's ``student_prediction``: what its UNet output is read as, with the student adapter on."""
    return setting(None, choices=PREDICTION_TYPES, teacher_default="prediction_type",
                   help="what the student's UNet output is read as (default: the teacher's prediction type); "
                        "v_prediction or sample for a one-step student of an epsilon teacher, whose clean latent at "
                        "t=999 would otherwise amplify the output's error by 1/alpha (14.6 on SD's noise schedule)")


def sampling_guidance(config) -> float:
    """The CFG a few-step student samples at: 1 where the teacher's guidance was distilled into it."""
    return config.guidance if config.sample_with_cfg else 1.0


def distilled_guidance(config) -> float:
    """The CFG of the teacher trajectories a few-step student learnt."""
    return 1.0 if config.sample_with_cfg else config.guidance


@dataclass
class RunConfig(Settings):
    """What every method's run shares: its files, optimisation, checkpoints, logging and (for a LoRA student)
    the LoRA's shape. Each method's config embeds one, with that method's defaults (:func:`run_config`)."""

    group = "the run: teacher, files, optimisation, checkpoints, logging"

    teacher: Path | None = setting(None, help="diffusers folder or single checkpoint file of the teacher")
    out: Path | None = setting(None, help="the file to write", changeable=True)
    work: Path | None = setting(None, changeable=True,
                                help="checkpoints and intermediate files; re-running into the same folder resumes, "
                                     "with the same settings only")
    prompts: Path | None = setting(None, help="a text file of prompts, one per line")
    dtype: str = setting("float32", choices=DTYPE_NAMES, help="teacher dtype (what is trained stays float32)")
    tokenizer: Path | None = setting(None, help="a single-file teacher's CLIP tokenizer folder (default: found in the "
                                                "Hugging Face cache or ComfyUI)")
    prediction_type: str | None = setting(None, choices=("epsilon", "v_prediction"),
                                          teacher_default="prediction_type",
                                          help="what the teacher predicts, overriding its config or what its "
                                               "file suggests")
    cpu: bool = setting(False, help="run on the CPU even where a GPU is present", changeable=True)
    batch_size: int = setting(32, help="training batch per process", ge=1)
    lr: float = setting(1e-4, help="peak learning rate", gt=0)
    warmup_steps: int = setting(0, help="linear warmup before the cosine decay", ge=0)
    max_grad_norm: float | None = setting(1.0, help="gradient clipping norm ('none': no clipping)", gt=0)
    seed: int = setting(0, help="seed of every random draw (batches, noise, initial weights)", ge=0)
    checkpoint_every: int = setting(500, help="steps between checkpoints (one is also written at the end; "
                                              "0: at the end only)", ge=0, changeable=True)
    tensorboard: bool = setting(False, help="log to <work>/.../tensorboard", changeable=True)
    log_every: int = setting(10, help="steps between TensorBoard scalars", ge=1, changeable=True)
    lora: LoraSpec | None = None  # the student's LoRA; None for a method that trains no LoRA

    def train_config(self, steps: int, run_dir: str | Path | None, desc: str, **changes) -> TrainConfig:
        """The loop's settings of one stage of the run (``changes``: what that stage sets otherwise)."""
        return TrainConfig(**{**dict(
            steps=steps, lr=self.lr, warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
            seed=self.seed, run_dir=run_dir, checkpoint_every=self.checkpoint_every, tensorboard=self.tensorboard,
            log_every=self.log_every, desc=desc), **changes})


def check_warmup(config: Settings, *stages: str) -> None:
    """Refuse a warmup (``config.run.warmup_steps``) as long as one of the training stages it warms up (the
    settings named ``stages``): the stage would end before the learning rate reached ``--lr``, and the file would
    record an ``--lr`` it never trained at."""
    warmup = config.run.warmup_steps
    for name in stages:
        steps = getattr(config, name)
        if warmup >= steps:
            raise SettingError("warmup_steps", f"{warmup} warmup steps, {flag_of(config, name)} {steps}: the learning "
                                               f"rate would never reach --lr; give --warmup-steps below {steps}")


def run_config(lora: dict | None = None, **defaults) -> Any:
    """A method config's ``run`` field: a :class:`RunConfig` with the method's defaults; ``lora``: the defaults
    of its LoRA (``{}``: :class:`LoraSpec`'s), None for a method without one."""
    return field(default_factory=lambda: RunConfig(**defaults, lora=None if lora is None else LoraSpec(**lora)))


# --- walking the fields --------------------------------------------------------------------------------------


def leaves(config: Settings) -> Iterator[tuple[dataclasses.Field, Any, Any]]:
    """``(field, type, value)`` of every setting of ``config``, nested settings flattened (None ones skipped)."""
    hints = _hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from leaves(value)
        elif f.metadata.get("help"):
            yield f, hints[f.name], value


def record(config: Settings, changeable: bool = True) -> dict[str, Any]:
    """The settings as a flat JSON-ready dict (paths as strings, tuples as lists); ``changeable=False`` leaves
    out those that may differ between runs of one work folder."""
    out = {}
    for f, _, value in leaves(config):
        if changeable or not f.metadata["changeable"]:
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def training_record(config: Settings, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """What an output file records of the settings that made it: :func:`record` without the changeable ones and
    without paths (where things lay on one machine), and ``inputs``, what the input files held (the runner's
    digests, ``Job.inputs``)."""
    paths = {f.name for f, hint, _ in leaves(config) if kind(hint)[0] is Path}
    return {**{k: v for k, v in record(config, changeable=False).items() if k not in paths}, **(inputs or {})}


def flag(f: dataclasses.Field) -> str:
    """The CLI flag of a field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_of(config: Settings, name: str) -> str:
    """The CLI flag of the setting ``name`` of ``config`` (the name itself if it is none of them)."""
    return next((flag(f) for f, _, _ in leaves(config) if f.name == name), name)


def replace_settings(config: Settings, **values) -> Settings:
    """``config`` with some leaf settings changed, wherever they are nested (checked again)."""
    changes = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            inner = {k: v for k, v in values.items() if k in {g.name for g, _, _ in leaves(value)}}
            if inner:
                changes[f.name] = replace_settings(value, **inner)
        elif f.name in values:
            changes[f.name] = values[f.name]
    return dataclasses.replace(config, **changes)


def kind(hint) -> tuple[type, bool, int | None]:
    """``(scalar type, optional?, tuple length)`` of a setting's type: length None for a scalar, -1 for
    ``tuple[X, ...]``."""
    optional = False
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not NoneType]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return args[0], optional, -1 if len(args) == 2 and args[1] is Ellipsis else len(args)
    return hint, optional, None


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(f: dataclasses.Field, hint, value):
    """``value`` of field ``f`` as its type (a path from a string, a tuple from a list), or SettingError."""
    scalar, optional, length = kind(hint)
    if value is None:
        if optional:
            return None
        raise SettingError(f.name, "a value is required")
    if length is None:
        return _scalar(f, scalar, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise SettingError(f.name, f"expected a sequence of {scalar.__name__}, got {value!r}")
    if length >= 0 and len(value) != length:
        raise SettingError(f.name, f"expected {length} values, got {len(value)}")
    return tuple(_scalar(f, scalar, v) for v in value)


def _scalar(f: dataclasses.Field, scalar: type, value):
    meta, name = f.metadata, f.name
    if scalar is Path:
        if not isinstance(value, (str, Path)):
            raise SettingError(name, f"expected a path, got {value!r}")
        return Path(value)
    if scalar is bool:
        if not isinstance(value, bool):
            raise SettingError(name, f"expected True or False, got {value!r}")
        return value
    if scalar is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingError(name, f"expected an integer, got {value!r}")
    if scalar is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingError(name, f"expected a finite number, got {value!r}")
        value = float(value)
    if scalar is str and not isinstance(value, str):
        raise SettingError(name, f"expected a string, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise SettingError(name, f"expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    for bound, holds, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                               ("lt", operator.lt, "<")):
        if meta[bound] is not None and not holds(value, meta[bound]):
            raise SettingError(name, f"must be {word} {meta[bound]}, got {value!r}")
    return value
