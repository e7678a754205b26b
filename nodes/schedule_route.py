"""GET /direct_distill/sigmas: the sigmas a sampler node would run, for the frontend's schedule plot.

The answer comes from the functions the nodes themselves call (ComfyUI's KSampler and scheduler table, the
ExpKarras Scheduler node's function, the shortcut's band check, a student's own metadata). The route reads
nothing but its query: file names are looked up in ComfyUI's model lists, never taken as paths.
"""

import functools
import logging
import math
import os

import comfy.model_base
import comfy.model_detection
import comfy.samplers
import comfy.supported_models
import folder_paths
import torch
from aiohttp import web
from safetensors import SafetensorError, safe_open

from ..models.handoff import handoff_steps_in_band
from ..models.io import FileFormatError, is_direct_distill_file, read_safetensors_header
from ..models.lora_layouts import stamped_preset
from ..models.shortcut_file import read_shortcut_metadata
from ..models.student_file import read_student
from ..schedulers.few_step_presets import PRESETS, describe_nfes
from ..schedulers.noise import t_to_sigma
from ..schedulers.sigmas import EXP_KARRAS_P_MAX
from . import shortcut as shortcut_nodes
from . import student as student_nodes
from .schedulers import SCHEDULER_NAME, exp_karras_node_sigmas

ROUTE = "/direct_distill/sigmas"
MAX_STEPS = 10000  # the sampler nodes' steps widget
MAX_SCHEDULE = 100_000  # steps / denoise: the length of the schedule computed before denoise cuts it
P_RANGE = (0.0, EXP_KARRAS_P_MAX)  # the ExpKarras Scheduler node's p widget
PARAMETERS = ("scheduler", "steps", "p", "denoise", "sampler", "model", "shortcut", "student", "nfe", "preset")
STUDENT_PARAMETERS = ("student", "nfe", "preset", "model")
SMALL_TENSOR = 4096  # header reads load tensors up to this size (detection reads a few biases), others stay shapes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class BadQuery(ValueError):
    """A query the route refuses (HTTP 400); the message is one line naming the problem."""


def register():
    """Adds the route to ComfyUI's server, once; without a server (ComfyUI imported as a library) it does nothing."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or any(getattr(route, "path", None) == ROUTE for route in server.routes):
        return
    server.routes.get(ROUTE)(handle)


async def handle(request: web.Request) -> web.Response:
    try:
        return web.json_response(answer(request.rel_url.query))
    except BadQuery as err:
        return web.Response(status=400, text=str(err))
    except Exception:
        logging.exception("Direct Distill: %s failed on %s", ROUTE, request.rel_url.query_string)
        return web.Response(status=500, text=f"{ROUTE}: internal error (details in the ComfyUI log)")


def answer(query) -> dict:
    """The route's JSON answer for a query mapping (the parameters as strings); raises BadQuery.

    ``{"sigmas": [...], "schedulers": [names], "model": name or null}``, plus ``"shortcut": {"t_band",
    "sigma_band", "handoff_steps"}`` when a shortcut is named, and ``"nfe", "nfes"`` for a student (Load Distilled
    Student's sigmas: a Direct Distill student's own, or those of a few-step LoRA's preset on the model's table).
    """
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        raise BadQuery(f"unknown parameter {unknown[0][:40]!r}; the parameters are {', '.join(PARAMETERS)}")
    if len(query) != len(set(query)):  # aiohttp's query is a multidict
        raise BadQuery("each parameter may be given once")
    if "student" in query:
        return _student_answer(query)
    only_students = sorted(set(query) & set(STUDENT_PARAMETERS) - {"model"})
    if only_students:
        raise BadQuery(f"{only_students[0]} applies to a student only (with student=)")
    model = query.get("model")
    model_sampling = _checkpoint_model_sampling(model) if model is not None else _sd_model_sampling()
    scheduler = query.get("scheduler")
    if scheduler is None:
        raise BadQuery("scheduler is required (or student)")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise BadQuery(f"unknown scheduler {scheduler[:40]!r}; known: {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    steps = _integer(query, "steps", 1, MAX_STEPS)
    denoise = _number(query, "denoise", 0.0, 1.0, default=1.0)
    if denoise > 0 and steps / denoise > MAX_SCHEDULE:
        raise BadQuery(f"steps / denoise must be at most {MAX_SCHEDULE}, got {steps} / {denoise:g}")
    sampler = query.get("sampler")
    if sampler is not None and sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise BadQuery(f"unknown sampler {sampler[:40]!r}")
    if "p" in query:
        if scheduler != SCHEDULER_NAME or sampler is not None:
            raise BadQuery(f"p is the ExpKarras Scheduler node's curvature: only with scheduler={SCHEDULER_NAME} "
                           "and no sampler")
        sigmas = exp_karras_node_sigmas(model_sampling, steps, _number(query, "p", *P_RANGE), denoise)
    else:
        # Exactly the sigmas a KSampler node (and the Shortcut KSampler) runs: denoise and sampler included.
        sigmas = comfy.samplers.KSampler(_Sampling(model_sampling), steps, "cpu", sampler, scheduler, denoise).sigmas
    if not bool(torch.isfinite(torch.as_tensor(sigmas)).all()):  # kl_optimal at one step divides 0 by 0
        raise BadQuery(f"{scheduler} gives no finite sigmas at {steps} step{'s' if steps != 1 else ''}")
    out = {"sigmas": [float(s) for s in sigmas], "schedulers": list(comfy.samplers.SCHEDULER_NAMES), "model": model}
    if "shortcut" in query:
        out["shortcut"] = _shortcut_band(query["shortcut"], sigmas, model_sampling.sigmas)
    return out


class _Sampling:
    """What comfy.samplers.KSampler asks of a model to compute its sigmas: the model_sampling object."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        if name != "model_sampling":
            raise KeyError(name)
        return self.model_sampling


def _integer(query, key: str, lo: int, hi: int) -> int:
    if key not in query:
        raise BadQuery(f"{key} is required")
    try:
        value = int(query[key])
    except ValueError:
        raise BadQuery(f"{key} must be an integer, got {query[key][:40]!r}") from None
    if not lo <= value <= hi:
        raise BadQuery(f"{key} must be between {lo} and {hi}, got {query[key][:40]!r}")
    return value


def _number(query, key: str, lo: float, hi: float, default: float | None = None) -> float:
    if key not in query:
        if default is None:
            raise BadQuery(f"{key} is required")
        return default
    try:
        value = float(query[key])
    except ValueError:
        raise BadQuery(f"{key} must be a number, got {query[key][:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadQuery(f"{key} must be a finite number between {lo:g} and {hi:g}, got {query[key][:40]!r}")
    return value


def _listed(folder: str, name: str, what: str) -> tuple[str, os.stat_result]:
    """The full path and ``os.stat`` of ``name`` if it is in ComfyUI's list for ``folder``; BadQuery otherwise (a
    listed name whose file cannot be reached too: a link to a drive that is not mounted)."""
    if name not in folder_paths.get_filename_list(folder):
        raise BadQuery(f"unknown {what} {name[:200]!r}: not in ComfyUI's {what} list")
    try:
        path = folder_paths.get_full_path_or_raise(folder, name)
        return path, os.stat(path)
    except OSError as err:  # FileNotFoundError included
        raise BadQuery(f"{what} {name[:200]!r}: listed, but its file cannot be opened "
                       f"({type(err).__name__}; a link to a drive that is not mounted?)") from None


@functools.cache
def _sd_model_sampling():
    """SD1.5's noise table, built the way ComfyUI builds it for an SD1.5 checkpoint."""
    config = comfy.supported_models.SD15(dict(comfy.supported_models.SD15.unet_config))
    return comfy.model_base.model_sampling(config, comfy.model_base.ModelType.EPS)


def _checkpoint_model_sampling(name: str):
    path, stat = _listed("checkpoints", name, "model")
    if not path.lower().endswith((".safetensors", ".sft")):  # a pickle (.ckpt, .pt) is never opened here
        raise BadQuery(f"model {name[:200]!r}: not a .safetensors file, the only kind this route reads")
    return _model_sampling_of_file(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _model_sampling_of_file(path: str, size: int, mtime_ns: int):
    """A checkpoint's model_sampling by ComfyUI's own detection, from the file's header: the few small tensors
    detection reads are loaded, every other tensor is only its shape (a meta tensor)."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            state = {}
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                shape = tensor_slice.get_shape()
                if math.prod(shape) <= SMALL_TENSOR:
                    state[key] = f.get_tensor(key)
                else:
                    state[key] = torch.empty(shape, dtype=_DTYPES.get(tensor_slice.get_dtype(), torch.float16),
                                             device="meta")
    except (SafetensorError, OSError, ValueError) as err:
        raise BadQuery(f"model {name!r}: not a readable safetensors checkpoint ({str(err).splitlines()[0]})") from None
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    try:
        config = comfy.model_detection.model_config_from_unet(state, prefix, metadata=metadata)
        model_sampling = None if config is None else comfy.model_base.model_sampling(
            config, config.model_type(state, prefix))
    except Exception as err:  # detection code assumes a well-formed checkpoint
        raise BadQuery(f"model {name!r}: ComfyUI cannot detect its type ({type(err).__name__})") from None
    if model_sampling is None:
        raise BadQuery(f"model {name!r}: ComfyUI does not recognise it as a checkpoint")
    return model_sampling


def _shortcut_band(name: str, sigmas: torch.Tensor, table: torch.Tensor) -> dict:
    """The shortcut's trained band in t and in sigma, and the hand-off steps of ``sigmas`` inside it (the
    Shortcut KSampler's own check)."""
    path, _ = _listed(shortcut_nodes.FOLDER_NAME, name, "shortcut")
    try:
        meta = read_shortcut_metadata(path)
    except FileFormatError as err:
        raise BadQuery(f"shortcut {name!r}: {str(err).removeprefix(path + ': ')}") from None
    lo, hi = meta["t_band"]
    return {"t_band": [lo, hi], "sigma_band": [float(s) for s in t_to_sigma(torch.tensor([hi, lo]), table)],
            "handoff_steps": handoff_steps_in_band((lo, hi), sigmas, table)}


def _student_answer(query) -> dict:
    extra = sorted(set(query) - set(STUDENT_PARAMETERS))
    if extra:
        raise BadQuery(f"{extra[0]!r} does not apply to a student (only {', '.join(STUDENT_PARAMETERS)})")
    name = query["student"]
    path, stat = _listed(student_nodes.FOLDER_NAME, name, "student")
    nfe = _integer(query, "nfe", 0, MAX_STEPS) if "nfe" in query else 0
    preset_name = query.get("preset", student_nodes.FROM_FILE)
    if preset_name != student_nodes.FROM_FILE and preset_name not in PRESETS:
        raise BadQuery(f"unknown preset {preset_name[:40]!r}: not in Load Distilled Student's preset list")
    # the model named is checked whichever sigmas answer (a student of ours carries its own)
    model_sampling = _checkpoint_model_sampling(query["model"]) if "model" in query else None
    metadata = _header(path, stat.st_size, stat.st_mtime_ns)
    if is_direct_distill_file(metadata):
        if preset_name != student_nodes.FROM_FILE:
            raise BadQuery(f"student {name!r}: a Direct Distill student's file says how it samples; set preset to "
                           f"'{student_nodes.FROM_FILE}'")
        info = _student_info(path, stat.st_size, stat.st_mtime_ns)
        n = nfe or info.default_nfe
        if n not in info.nfe_schedules:
            raise BadQuery(f"student {name!r} was trained for nfe {', '.join(map(str, info.nfe_schedules))}, "
                           f"not {nfe}")
        sigmas, nfes = info.nfe_schedules[n]["sigmas"], list(info.nfe_schedules)
    else:  # a few-step LoRA from elsewhere: its preset's sigmas on the model's noise table, as the node takes them
        chosen = stamped_preset(metadata) if preset_name == student_nodes.FROM_FILE else preset_name
        if chosen not in PRESETS:
            raise BadQuery(f"student {name!r}: not a Direct Distill student and not stamped with a few-step preset; "
                           "choose its preset")
        preset = PRESETS[chosen]
        n = nfe or preset.default_nfe
        if n not in preset.nfes:
            raise BadQuery(f"student {name!r}: preset {preset.name} samples with nfe {describe_nfes(preset.nfes)} "
                           f"(default {preset.default_nfe}), not {nfe}")
        model_sampling = model_sampling or _sd_model_sampling()
        sigmas, nfes = [float(s) for s in preset.sigmas(n, model_sampling.sigmas)], list(preset.nfes)
    return {"sigmas": sigmas, "nfe": n, "nfes": nfes, "schedulers": list(comfy.samplers.SCHEDULER_NAMES),
            "model": query.get("model")}


@functools.lru_cache(maxsize=8)
def _header(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    try:
        return read_safetensors_header(path)[1]
    except FileFormatError as err:
        raise BadQuery(f"student {os.path.basename(path)!r}: {str(err).removeprefix(path + ': ')}") from None


@functools.lru_cache(maxsize=8)
def _student_info(path: str, size: int, mtime_ns: int):
    try:
        return read_student(path)[1]
    except FileFormatError as err:
        raise BadQuery(f"student {os.path.basename(path)!r}: {str(err).removeprefix(path + ': ')}") from None
