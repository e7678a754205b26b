"""The one runner of every method: the settings and files are checked before anything loads, then the teacher,
the method's inputs, and the method's run on the shared loop (a :class:`Job`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.io import (FolderInUse, atomic_write_text, check_replaceable, check_writable, check_writable_folder,
                         hold_folder)
from ..models.student_file import FORMAT_NAME as STUDENT_FORMAT
from .config import RunConfig, Settings, SettingError, flag_of, kind, leaves, record, replace_settings
from .data import (LatentData, check_latents_file, encode_image_folder, parameter_sums, read_image_folder,
                   read_latents_file, read_prompts)
from .loop import TrainResult, train

SETTINGS_FILE = "settings.json"  # in the work folder: the settings of the run it holds


@dataclass(frozen=True)
class MethodEntry:
    """What a method module registers (``METHOD``): its config dataclass, whose fields are its CLI, and the
    function running it, ``train(job, config) -> result`` (``result.summary()`` is what the CLI prints)."""

    config: type[Settings]
    train: Callable[[Job, Any], Any]
    summary: str       # one line, for `distill --help`
    description: str   # the method's own --help
    writes: str = STUDENT_FORMAT  # the format of the file it writes (an existing one of another is not replaced)
    # every file a run writes, from its config and --out (progressive's rounds beside it): each is checked as --out
    outputs: Callable[[Any, Path], list[Path]] = lambda config, out: [out]


@dataclass
class Preset:
    """Defaults a front end hands the runner for a teacher of its own (the lab's): they apply when ``--teacher``
    is that teacher, and a teacher of the user's gets none of them.

    Args:
        name: how the help text calls it ("lab").
        teacher: the teacher folder, the default ``--teacher``.
        teacher_name: the teacher's name recorded in the files written.
        out, work: method name -> the default output file, work folder.
        prompts: the prompts of the methods that take prompts.
        values: settings declared with ``preset=<key>`` (guidance, eval_every), by key.
        latents: ``(pipe, work, accelerator) -> LatentData``, the training data of the data methods.
        evaluation: ``(pipe, samples) -> evaluate hook`` of the one-step methods (FD and accuracy).
        describe: help-text names of the defaults that are not paths ("prompts", "data").
    """

    name: str
    teacher: Path
    teacher_name: str
    out: Callable[[str], Path]
    work: Callable[[str], Path]
    prompts: Sequence[str]
    values: dict[str, Any] = field(default_factory=dict)
    latents: Callable[..., LatentData] | None = None
    evaluation: Callable[..., Callable] | None = None
    describe: dict[str, str] = field(default_factory=dict)

    def applies(self, teacher: Path) -> bool:
        return Path(teacher).resolve() == Path(self.teacher).resolve()


@dataclass
class Job:
    """What a method's run is handed: the teacher pipeline, its inputs, where its files go, the accelerator.

    Args:
        pipe: the teacher, a diffusers pipeline.
        out: the file to write.
        work: checkpoints and intermediate files (a re-run resumes exactly); None keeps none.
        teacher: the teacher's name recorded in the files (default: the pipeline's ``name_or_path``).
        prompts: the prompts of a method that takes prompts.
        data: ``batch_size -> (x0 latents, prompts)`` drawing from the global RNG (e.g. ``LatentData``), for a
            method that trains on data.
        evaluate: the one-step methods' evaluate hook (``one_step.Evaluate``), or None.
        accelerator: an ``accelerate.Accelerator``; one is made if None.
        inputs: a digest of what each input file held (:func:`input_contents`), recorded in the file written.
    """

    pipe: Any
    out: Path
    work: Path | None = None
    teacher: str | None = None
    prompts: Sequence[str] | None = None
    data: Callable | None = None
    evaluate: Callable | None = None
    accelerator: Any = None
    inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        from accelerate import Accelerator

        self.out = Path(self.out)
        self.work = Path(self.work) if self.work is not None else None
        if self.teacher is None and self.pipe is not None:
            self.teacher = str(getattr(self.pipe, "name_or_path", "") or "unknown")
        self.accelerator = self.accelerator or Accelerator()

    def student(self, spec, seed: int, frozen_adapters: Sequence[str] = (), student_prediction: str | None = None):
        """A :class:`LoraStudent` on the teacher, its LoRA initialised from ``seed``, on the accelerator's device."""
        from .lora import LoraStudent

        torch.manual_seed(seed)  # the LoRA's initial A
        return LoraStudent(self.pipe, spec, frozen_adapters, student_prediction).to(self.accelerator.device)

    def stage_dir(self, stage: str | None = None) -> Path | None:
        """The work folder of one stage of the run (the work folder itself for None); None without one."""
        if self.work is None:
            return None
        return self.work / stage if stage else self.work

    def train(self, method, run: RunConfig, steps: int, desc: str, stage: str | None = None,
              **changes) -> TrainResult:
        """Run ``method`` on the loop for ``steps`` steps with the run's settings (``changes`` to some of them),
        checkpointing in :meth:`stage_dir`."""
        return train(method, run.train_config(steps, self.stage_dir(stage), desc, **changes), self.accelerator)

    def on_main(self, write: Callable[[], Any]) -> None:
        """``write()`` on the main process alone, the others waiting for it."""
        if self.accelerator.is_main_process:
            write()
        self.accelerator.wait_for_everyone()


@dataclass
class Plan:
    """A run with everything resolved and checked, nothing loaded yet."""

    method: str
    entry: MethodEntry
    config: Settings
    preset: Preset | None      # set when the preset applies (its teacher is the teacher)
    teacher_name: str
    prompts: list[str] | None

    @property
    def run(self) -> RunConfig:
        return self.config.run


def settle(config: Settings, values: dict[str, Any] | None = None) -> Settings:
    """``config`` with every setting declared ``preset=<key>`` and left None given ``values[key]``, or its
    fallback where ``values`` has none."""
    values = values or {}
    unset = {f.name: values.get(f.metadata["preset"], f.metadata["fallback"])
             for f, _, value in leaves(config) if f.metadata["preset"] and value is None}
    return replace_settings(config, **unset) if unset else config


def prepare(method: str, config: Settings, preset: Preset | None = None) -> Plan:
    """Resolve the teacher, files, prompts and data of a run and check them, loading nothing (the work folder is
    made, to know it can be written); every problem is a :class:`SettingError` naming the setting."""
    from .registry import entry as registry_entry

    entry = registry_entry(method)
    if not isinstance(config, entry.config):
        raise TypeError(f"{method} takes a {entry.config.__name__}, got {type(config).__name__}")
    run = config.run
    teacher = run.teacher if run.teacher is not None else (preset.teacher if preset else None)
    if teacher is None:
        raise SettingError("teacher", "required: a diffusers folder or a single checkpoint file")
    if not teacher.exists():
        raise SettingError("teacher", f"{teacher}: no such teacher folder or file")
    own = preset if preset is not None and preset.applies(teacher) else None
    other = f"required for a teacher other than the {preset.name}'s" if preset else "required"
    out = run.out if run.out is not None else (own.out(method) if own else None)
    if out is None:
        raise SettingError("out", other)
    work = run.work if run.work is not None else (own.work(method) if own else out.with_suffix(".work"))
    if os.path.realpath(out) == os.path.realpath(work):
        raise SettingError("out", f"{out} is also the work folder (--work, or --out's name with .work): give "
                                  "--out a file name of its own")
    config = replace_settings(settle(config, own.values if own else {}), teacher=teacher, out=out, work=work)

    prompts = None
    if run.prompts is not None:
        try:
            prompts = read_prompts(run.prompts)
        except (FileNotFoundError, ValueError) as err:
            raise SettingError("prompts", str(err)) from None
    plan = Plan(method, entry, config, own, own.teacher_name if own else str(teacher), prompts)
    source = _data_source(config)
    if source is not None:
        _check_data(plan, source, other)
    elif plan.prompts is None:
        if own is None:
            raise SettingError("prompts", f"{other}: a text file of prompts, one per line")
        plan.prompts = list(own.prompts)
    evaluation = _evaluation(config)
    if evaluation is not None and evaluation.eval_every and (own is None or own.evaluation is None):
        raise SettingError("eval_every", "evaluations need the preset's evaluator"
                           + (f": they are for the {preset.name} teacher only" if preset else ""))
    outputs = entry.outputs(config, plan.run.out)
    try:
        for path in outputs:
            check_writable(path, "the output file")
        check_writable_folder(plan.run.work, "the work folder")
    except PermissionError as err:
        raise SettingError("work" if "work folder" in str(err) else "out", str(err)) from None
    inputs = {"--teacher": plan.run.teacher, "--prompts": plan.run.prompts, "--tokenizer": plan.run.tokenizer,
              "--latents": source and source.latents, "--data": source and source.data}
    try:
        for path in outputs:  # progressive writes its rounds beside --out: none may replace an input either
            check_replaceable(path, inputs, entry.writes)
    except ValueError as err:
        raise SettingError("out", str(err)) from None
    return plan


def execute(plan: Plan):
    """Run a prepared plan: the work folder is held for the run (a second run into it is refused), its settings
    are checked (or recorded), then the teacher, the inputs and the method load and run; returns the method's
    result."""
    accelerator = make_accelerator(plan.run.cpu)
    try:
        with hold_folder(plan.run.work, hold=accelerator.is_local_main_process):
            return _execute(plan, accelerator)
    except FolderInUse as err:
        raise SettingError("work", str(err)) from None


def _execute(plan: Plan, accelerator):
    from .teachers import load_teacher

    config, run = plan.config, plan.run
    contents = input_contents(config)  # read once: a latents file may be gigabytes
    check_work_folder(run.work, plan.method, config, accelerator, contents=contents)
    pipe = load_teacher(run.teacher, getattr(torch, run.dtype), tokenizer=run.tokenizer,
                        prediction_type=run.prediction_type)
    check_work_folder(run.work, plan.method, config, accelerator, pipe, contents)
    config = with_teacher_values(config, pipe)  # what ran, as the files written record it
    data = None
    source = _data_source(config)
    if source is not None:
        with accelerator.main_process_first():
            if source.data is not None:
                vae = pipe.vae.to(accelerator.device).float()
                size = pipe.unet.config.sample_size * pipe.vae_scale_factor
                try:
                    data = encode_image_folder(vae, source.data, size, run.work / "folder_latents.safetensors")
                except ValueError as err:  # an image that cannot be read
                    raise SettingError("data", str(err)) from None
            elif source.latents is not None:
                try:
                    data = read_latents_file(source.latents, plan.prompts, vae=pipe.vae)
                except ValueError as err:
                    raise SettingError("latents", str(err)) from None
            else:
                data = plan.preset.latents(pipe, run.work, accelerator)
    if data is not None and data.latents.shape[1] != pipe.unet.config.in_channels:
        flag = "latents" if source.latents is not None else "data"
        raise SettingError(flag, f"its latents have {data.latents.shape[1]} channels, the teacher's UNet takes "
                                 f"{pipe.unet.config.in_channels}: they were encoded by another model's VAE")
    evaluation = _evaluation(config)
    evaluate = (plan.preset.evaluation(pipe, evaluation.eval_samples)
                if evaluation is not None and evaluation.eval_every else None)
    job = Job(pipe, run.out, run.work, teacher=plan.teacher_name, prompts=plan.prompts, data=data,
              evaluate=evaluate, accelerator=accelerator, inputs=contents)
    del pipe  # the job holds the teacher: a method that is done with it can let it go
    result = plan.entry.train(job, config)
    if accelerator.is_main_process:
        print(result.summary())
    return result


def run(method: str, config: Settings, preset: Preset | None = None):
    """:func:`prepare` then :func:`execute`: distil with ``method`` as ``config`` says."""
    return execute(prepare(method, config, preset))


def make_accelerator(cpu: bool = False):
    """An ``accelerate.Accelerator``. Several processes started on a machine without a GPU (``torchrun``,
    ``accelerate launch --multi_gpu``) run on the CPU, joined by gloo: without ``cpu=True`` accelerate would
    leave each process on its own, all of them writing the same files."""
    from accelerate import Accelerator

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return Accelerator(cpu=cpu or (several and (device is None or device.type == "mps")))


def check_work_folder(work: Path, method: str, config: Settings, accelerator, pipe=None,
                      contents: dict[str, str] | None = None) -> None:
    """Refuse a run whose settings differ from those recorded in ``work`` once it holds work (a checkpoint, or
    what a stage computed before its first one: a teacher pool, captured trajectories): resuming it would continue
    one run under another's name. Called twice: before the teacher loads (``pipe`` None), every setting but those
    left to the teacher; with the teacher loaded, those too, each resolved to the teacher's value (``--latent-size
    64`` on a UNet of size 64 resumes a run that gave none), and then, if the folder holds no work yet, the
    settings are recorded. A run that stopped before any work (a teacher that would not load, a setting only the
    teacher could check) takes the new settings. What the input files hold (``contents``, from
    :func:`input_contents`) is compared too: a prompts file edited under the same name is another run."""
    from .loop import CHECKPOINT_NAME

    path = work / SETTINGS_FILE
    contents = input_contents(config) if contents is None else contents
    left_to_teacher = {f.name for f, _, _ in leaves(config) if f.metadata.get("teacher_default")}
    if pipe is not None:
        config = with_teacher_values(config, pipe)
    mine = json.loads(json.dumps({"method": method, "processes": accelerator.num_processes,
                                  "mixed_precision": str(accelerator.mixed_precision),
                                  **record(config, changeable=False), **contents}))
    for f, hint, value in leaves(config):  # where a file lies, not how it was typed: resumable from elsewhere
        if kind(hint)[0] is Path and value is not None and f.name in mine:
            mine[f.name] = os.path.realpath(value)
    if pipe is not None:  # another model of the same shapes put where the teacher was is another run
        mine[TEACHER_CONTENT] = teacher_digest(pipe)
    if path.is_file() and _holds_work(work, CHECKPOINT_NAME):
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # cut short (a full disk): the run it records cannot be told
            raise SettingError("work", f"{path}: not readable ({err}); the folder's work cannot be matched to "
                                       "these settings: give another --work folder") from None
        changed = []
        for k in sorted(mine.keys() | theirs.keys()):
            if k.startswith(CONTENT_KEY) and k not in theirs:
                continue  # recorded before contents were
            if k == "mixed_precision" and k not in theirs and mine[k] == "no":
                continue  # recorded before precision was: full precision unless accelerate was told otherwise
            if k in left_to_teacher and pipe is None and None in (mine.get(k), theirs.get(k)):
                continue  # one of them is the teacher's value: compared once it has loaded
            if k == TEACHER_CONTENT and pipe is None:
                continue  # compared once the teacher has loaded
            if _same_file(mine.get(k)) != _same_file(theirs.get(k)):
                changed.append(k)
        if changed:
            listed = "; ".join(f"{_RECORDED_NAMES.get(k) or flag_of(config, k)} {theirs.get(k)!r} there, "
                               f"{mine.get(k)!r} here" for k in changed)
            raise SettingError("work", f"{work} holds a run with other settings ({listed}); re-run with its "
                                       "settings to resume it, or give another --work folder")
    elif pipe is not None and accelerator.is_main_process:
        atomic_write_text(path, json.dumps(mine, indent=1))
    accelerator.wait_for_everyone()


def _holds_work(work: Path, checkpoint_name: str) -> bool:
    """A checkpoint anywhere in ``work``, or a file a stage computed in its folder (``Job.stage_dir``: a teacher
    pool, trajectory shards); the data caches at the top are keyed by their contents and do not count."""
    return (next(work.rglob(checkpoint_name), None) is not None
            or any(next(d.rglob("*.safetensors"), None) is not None for d in work.iterdir() if d.is_dir()))


# what a settings file records that is no flag of ours, as a refusal names it
_RECORDED_NAMES = {"mixed_precision": "mixed precision (accelerate's --mixed_precision)"}
CONTENT_KEY = "content of "  # a settings-file key: what an input file held, "content of --prompts"
TEACHER_CONTENT = CONTENT_KEY + "--teacher"


def teacher_digest(pipe) -> str:
    """A fingerprint of the loaded teacher's weights (UNet and text encoders): :func:`data.parameter_sums`."""
    total, squares = parameter_sums(*(getattr(pipe, name, None) for name in ("unet", "text_encoder",
                                                                             "text_encoder_2")))
    return f"sums {total!r} {squares!r}"


def with_teacher_values(config: Settings, pipe) -> Settings:
    """``config`` with every setting declared ``teacher_default=`` and left None set to the loaded teacher's
    value of it: what the run does, so that the work folder and the file written record that."""
    size = pipe.unet.config.sample_size
    values = {"prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"), "latent_size": size,
              "image_size": size * int(getattr(pipe, "vae_scale_factor", 8))}
    unset = {f.name: values[f.metadata["teacher_default"]] for f, _, value in leaves(config)
             if f.metadata.get("teacher_default") and value is None}
    return replace_settings(config, **unset) if unset else config


def input_contents(config: Settings) -> dict[str, str]:
    """A digest of what each input file holds (prompts, latents; an image folder by its images' names and bytes
    and its captions: a copied folder is the same input), keyed ``"content of --flag"``."""
    import hashlib

    out = {}
    source = _data_source(config)
    for name, value in (("prompts", config.run.prompts), ("latents", source and source.latents),
                        ("data", source and source.data)):
        if value is None:
            continue
        digest = hashlib.sha256()
        if Path(value).is_dir():  # every image's bytes (one edited in place may keep its size), name and caption
            images, captions = read_image_folder(value)
            for image, caption in zip(images, captions):
                digest.update(f"{image.relative_to(value)}\0{caption}\0".encode())
                _digest_file(digest, image)
        else:
            _digest_file(digest, Path(value))
        out[CONTENT_KEY + flag_of(config, name)] = "sha256 " + digest.hexdigest()[:16]
    return out


def _digest_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)


def _same_file(value):
    """A recorded setting as compared: a path to an existing file or folder by where it leads (``teacher`` and
    ``./teacher`` are one teacher), anything else as it is."""
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def _data_source(config: Settings):
    from .data import DataSource

    return _nested(config, DataSource)


def _evaluation(config: Settings):
    from .one_step import EvalConfig

    return _nested(config, EvalConfig)


def _nested(config: Settings, kind: type):
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, kind):
            return value
        if is_dataclass(value) and (inner := _nested(value, kind)) is not None:
            return inner
    return None


def _check_data(plan: Plan, source, other: str) -> None:
    """The data of a data method exists and fits its prompts, before anything loads."""
    if plan.prompts is not None and source.data is not None:
        raise SettingError("prompts", "applies to --latents, not --data: the images bring their own captions "
                                      "(same-name .txt files)")
    if plan.prompts is not None and source.latents is None and plan.preset is not None and plan.preset.latents:
        raise SettingError("prompts", f"applies to --latents: the {plan.preset.name}'s own data brings its prompts")
    if source.data is not None:
        try:
            read_image_folder(source.data)
        except (FileNotFoundError, ValueError) as err:
            raise SettingError("data", str(err)) from None
    elif source.latents is not None:
        try:
            count, own_prompts = check_latents_file(source.latents)
        except (FileNotFoundError, ValueError) as err:
            raise SettingError("latents", str(err)) from None
        if plan.prompts is None and own_prompts is None:
            raise SettingError("prompts", f"{source.latents} holds no prompts: give one per latent ({count}) or "
                                          "one for all in a text file")
        if plan.prompts is not None and len(plan.prompts) not in (1, count):
            raise SettingError("prompts", f"{len(plan.prompts)} prompts for {count} latents: give one per latent "
                                          "or one for all")
    elif plan.preset is None or plan.preset.latents is None:
        raise SettingError("data", f"{other}: {plan.method} trains on data; give --data FOLDER (images with "
                                   "same-name .txt captions) or --latents FILE (a latents file)")
