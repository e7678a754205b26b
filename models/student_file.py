"""The student file: a LoRA on the teacher's UNet in one safetensors file, with how to sample it.

Tensors use the kohya key form, the one form that both ``pipe.load_lora_weights(path)`` (diffusers)
and ComfyUI's stock LoraLoader (``comfy.sd.load_lora_for_models``) apply to every UNet layer::

    lora_unet_<module path, '.' -> '_'>.lora_down.weight   peft's lora_A
    lora_unet_<module path, '.' -> '_'>.lora_up.weight     peft's lora_B
    lora_unet_<module path, '.' -> '_'>.alpha              scalar; both scale by alpha / rank

e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``. Why this form: ComfyUI
does not match peft keys (``unet.<module>.lora_A.weight``) for the attention projections (it expects
diffusers' old ``attn1.processor.to_q`` spelling there), but matches ``lora_unet_<diffusers path>``
for every module (comfy.lora.model_lora_keys_unet maps each diffusers name through
comfy.utils.unet_to_diffusers); it treats a missing ``.alpha`` as alpha = rank, so ``.alpha`` is
always written. diffusers (loaders/lora_conversion_utils.py,
``_convert_unet_lora_key``) turns every '_' back into '.' and then repairs the names it knows:
checked for every Linear and Conv2d of SD1.x- and SDXL-shaped UNets (``to_out_0``, ``proj_in``,
``ff_net_0_proj``, ``time_emb_proj``, ``conv_shortcut``, ``time_embedding_linear_1``, ``conv_in``,
samplers' ``conv`` included) it restores the module name exactly, except SDXL's
``add_embedding.linear_1/2``, which it collapses to a non-existent ``add_embedding.linear``. Those two
are written under their LDM names ``label_emb_0_0`` / ``label_emb_0_2``, which diffusers maps back to
``add_embedding.linear_1/2`` and ComfyUI finds in its own state dict. The file holds nothing but
``lora_unet_*`` tensors: diffusers takes the kohya path only when every key has such a prefix.

Metadata (JSON strings): ``format`` and ``format_version``, then every field of :class:`StudentInfo`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch

from .io import FileFormatError, atomic_save_file, json_metadata, read_safetensors, tensor_problem

FORMAT_NAME = "direct_distill.student"
FORMAT_VERSION = 1

# Samplers a student may recommend: ComfyUI sampler name -> (diffusers scheduler class, solver order).
# euler and ddim are the same first-order step (DDIM is Euler in ComfyUI's VE coordinates, and
# DPM-Solver++ of order 1).
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", 1),
    "ddim": ("DDIMScheduler", 1),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", 2),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers cannot restore these module names from their kohya spelling (see the module docstring).
_KOHYA_NAME_OVERRIDES = {"add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2"}

# Config fields of a UNet2DConditionModel that change what it computes without changing any
# parameter shape (the shapes themselves are fingerprinted too).
_ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                        "mid_block_type", "up_block_types", "cross_attention_dim", "attention_head_dim",
                        "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
                        "norm_num_groups", "norm_eps", "act_fn", "time_embedding_type", "addition_embed_type",
                        "class_embed_type", "resnet_time_scale_shift")
# Per-block fields that configs spell either as one value or as one value per block.
_PER_BLOCK_FIELDS = ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
                     "cross_attention_dim")


@dataclasses.dataclass
class StudentInfo:
    """How to sample a student: what the safetensors metadata of a student file says.

    Args:
        method: the distillation method that made it ("progressive", "sfd", "gdd", "disback", ...).
        teacher: the teacher it was distilled from (a hub id or path).
        teacher_unet_fingerprint: ``unet_fingerprint(teacher.unet)``; loaders refuse other UNets.
        prediction_type: what the student's UNet predicts: "epsilon", "v_prediction" or "sample".
        teacher_prediction_type: what the teacher's UNet predicts, which the model it is loaded onto must
            share; empty (files that do not say): the same as ``prediction_type``. A student may read its UNet's
            output otherwise than its teacher does (a one-step student of an epsilon teacher predicting the
            sample: see training/sfd.py); the loaders then sample it with its own.
        nfe_schedules: for every supported number of UNet evaluations n, the exact
            ``{"timesteps": [n integer training timesteps], "sigmas": [n + 1 VE sigmas ending in 0]}`` it
            was trained for, in sampling order. ``timesteps[i]`` is what the UNet is called with at
            ``sigmas[i]``: the noise-table entry nearest to it in log-sigma, ComfyUI's rule (schedulers'
            ``sigma_to_model_timestep``), checked against the pipeline's noise table by ``load_student``.
        default_nfe: the NFE used when the user asks for none; a key of ``nfe_schedules``.
        comfy_sampler: recommended sampler, a ComfyUI sampler name (a key of ``SAMPLERS``).
        guidance: recommended classifier-free guidance (diffusers' ``guidance_scale``, ComfyUI's
            ``cfg``; 1.0 means none).
        diffusers_scheduler: the diffusers scheduler class of the same sampler; filled in from
            ``comfy_sampler`` when empty.
        rank, alpha, target_modules: the LoRA's rank, alpha and (diffusers) module names; filled in by
            ``save_student``.
        teacher_unet_config: the teacher's ``unet_architecture``, to name what differs on a mismatch.
        extra: any further JSON-serialisable facts (training steps, losses, ...).
    """

    method: str
    teacher: str
    teacher_unet_fingerprint: str
    prediction_type: str
    nfe_schedules: dict[int, dict[str, list[float]]]
    default_nfe: int
    comfy_sampler: str
    guidance: float
    diffusers_scheduler: str = ""
    teacher_prediction_type: str = ""
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = dataclasses.field(default_factory=list)
    teacher_unet_config: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("method", "teacher", "teacher_unet_fingerprint"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.teacher_prediction_type = self.teacher_prediction_type or self.prediction_type
        if self.teacher_prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"teacher_prediction_type must be one of {PREDICTION_TYPES}, got "
                             f"{self.teacher_prediction_type!r}")
        self.nfe_schedules = _checked_schedules(self.nfe_schedules)
        if isinstance(self.default_nfe, bool) or not isinstance(self.default_nfe, int) \
                or self.default_nfe not in self.nfe_schedules:
            raise ValueError(f"default_nfe {self.default_nfe!r} is not among the NFEs with a schedule "
                             f"{sorted(self.nfe_schedules)}")
        if self.comfy_sampler not in SAMPLERS:
            raise ValueError(f"comfy_sampler must be one of {sorted(SAMPLERS)}, got {self.comfy_sampler!r}")
        expected = SAMPLERS[self.comfy_sampler][0]
        if self.diffusers_scheduler not in ("", expected):
            raise ValueError(f"diffusers_scheduler {self.diffusers_scheduler!r} is not the diffusers counterpart "
                             f"of ComfyUI's {self.comfy_sampler!r} ({expected})")
        self.diffusers_scheduler = expected
        if not _is_number(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        self.guidance = float(self.guidance)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None:
            if not _is_number(self.alpha) or self.alpha <= 0:
                raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
            self.alpha = float(self.alpha)
        if not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must be module names, got {self.target_modules!r}")
        self.target_modules = sorted(self.target_modules)
        for name in ("teacher_unet_config", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {getattr(self, name)!r}")

    @property
    def solver_order(self) -> int:
        """Order of the recommended sampler's step (1: Euler/DDIM, 2: DPM++ 2M)."""
        return SAMPLERS[self.comfy_sampler][1]


def save_student(path: str | os.PathLike, unet_lora_state: dict[str, torch.Tensor], *, rank: int, alpha: float,
                 metadata: StudentInfo) -> Path:
    """Write a UNet LoRA and its sampling metadata to one safetensors file, atomically.

    Args:
        path: destination ``.safetensors`` file.
        unet_lora_state: the UNet's LoRA tensors, peft-style (``peft.get_peft_model_state_dict(unet)``:
            ``<module>.lora_A.weight`` / ``.lora_B.weight``, optionally prefixed ``unet.``) or in
            diffusers' form (``unet.<module>.lora.down.weight`` / ``.lora.up.weight``).
        rank: the LoRA rank; every pair must have it.
        alpha: the LoRA alpha; the update is ``(alpha / rank) * B @ A`` in both loaders.
        metadata: how to sample the student; ``rank``, ``alpha`` and ``target_modules`` are filled in
            (and must agree if already set).
    """
    pairs = _lora_pairs(unet_lora_state)
    for name, value in (("rank", rank), ("alpha", alpha), ("target_modules", list(pairs))):
        if getattr(metadata, name) not in (None, [], value):
            raise ValueError(f"metadata.{name} is {getattr(metadata, name)!r} but the LoRA has {value!r}")
    # replace() validates again, and leaves the caller's object alone.
    info = dataclasses.replace(metadata, rank=rank, alpha=alpha, target_modules=list(pairs))
    if len({kohya_name(m) for m in pairs}) != len(pairs):
        raise ValueError("two LoRA modules have the same kohya name (their paths differ only in '.' vs '_')")
    tensors = {}
    for module, (down, up) in pairs.items():
        if down.shape[0] != rank or up.shape[1] != rank:
            raise ValueError(f"LoRA of {module} has rank {down.shape[0]} (lora_A) / {up.shape[1]} (lora_B), "
                             f"not {rank}")
        name = kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(info.alpha, dtype=torch.float32)
    return atomic_save_file(tensors, path, _to_metadata(info))


def read_student(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], StudentInfo]:
    """Read a file written by ``save_student``; any problem raises one FileFormatError naming the file.

    Returns:
        the LoRA tensors with peft-style keys (``<module>.lora_A.weight`` / ``.lora_B.weight``, ready
        for ``peft.set_peft_model_state_dict``), and the metadata.
    """
    tensors, raw = read_safetensors(path)
    fmt = raw.get("format")
    if fmt != json.dumps(FORMAT_NAME):
        found = "no 'format' metadata entry" if fmt is None else "format " + repr(fmt.strip('"'))
        raise FileFormatError(f"{path}: not a Direct Distill student file: {found}")
    version = json_metadata(raw, "format_version", path)
    if version != FORMAT_VERSION:
        raise FileFormatError(f"{path}: student format version {version!r}; this code reads version {FORMAT_VERSION}")
    values = {}
    for field in dataclasses.fields(StudentInfo):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required or field.name in raw:
            values[field.name] = json_metadata(raw, field.name, path)  # raises on a missing or corrupt entry
    if values["nfe_schedules"] in ({}, None):
        raise FileFormatError(f"{path}: metadata 'nfe_schedules' is empty: the file does not say how to sample it")
    try:
        info = StudentInfo(**values)
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: invalid student metadata: {err}") from None
    if info.rank is None or info.alpha is None or not info.target_modules:
        raise FileFormatError(f"{path}: metadata lacks the LoRA's rank, alpha or target_modules")
    return _peft_tensors(tensors, info, path), info


def kohya_name(module: str) -> str:
    """The kohya LoRA name of a diffusers UNet module, as both loaders read it (see the module docstring)."""
    return "lora_unet_" + _KOHYA_NAME_OVERRIDES.get(module, module.replace(".", "_"))


# the layers diffusers' fuse_qkv_projections() adds beside to_q, to_k and to_v (which stay): the same UNet
_FUSED_PROJECTIONS = frozenset({"to_qkv", "to_kv", "to_added_qkv"})


def bare_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (its parameters are named ``_orig_mod.*``), else ``unet`` itself."""
    return getattr(unet, "_orig_mod", unet)


def unet_architecture(unet: torch.nn.Module) -> dict:
    """The config fields of a diffusers UNet that define its architecture, per-block fields as lists."""
    config = dict(getattr(bare_unet(unet), "config", {}) or {})
    blocks = len(config.get("down_block_types", ()) or ())
    out = {}
    for key in _ARCHITECTURE_FIELDS:
        if key not in config:
            continue
        value = config[key]
        if key in _PER_BLOCK_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool) and blocks:
            value = [value] * blocks
        out[key] = json.loads(json.dumps(value))  # tuples -> lists, as a round trip through JSON gives
    return out


def unet_parameter_shapes(unet: torch.nn.Module) -> dict[str, list[int]]:
    """{parameter name: shape} of a diffusers UNet. LoRA layers that peft or diffusers added (``lora_A``,
    ``lora_B``, ...) are left out and wrapped layers keep their own names, so adapters change nothing; nor do
    ``torch.compile`` (its wrapper's prefix) and ``fuse_qkv_projections()`` (the fused layers it adds)."""
    shapes = {}
    for name, parameter in bare_unet(unet).named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") or part in _FUSED_PROJECTIONS for part in parts):
            continue
        shapes[".".join(p for p in parts if p != "base_layer")] = list(parameter.shape)
    return shapes


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of a UNet's architecture config and the names and shapes of all its parameters
    (:func:`unet_parameter_shapes`), so a UNet with adapters loaded has the fingerprint of the bare one."""
    blob = json.dumps({"config": unet_architecture(unet), "parameters": unet_parameter_shapes(unet)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shape_fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short hash of a UNet's parameter names (diffusers' spelling) and shapes alone: what both front doors
    can compute, ComfyUI included (``nodes.model_identity.unet_parameter_shapes``), for the same architecture."""
    blob = json.dumps({k: [int(d) for d in v] for k, v in shapes.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def unet_mismatches(info: StudentInfo, lora: dict[str, torch.Tensor], unet: torch.nn.Module) -> list[str]:
    """What keeps a student (``read_student``'s output) from ``unet``, one line each; empty if it fits."""
    same = unet_fingerprint(unet) == info.teacher_unet_fingerprint
    problems = []
    if info.teacher_unet_config and not same:
        ours = unet_architecture(unet)
        for key in sorted(info.teacher_unet_config.keys() | ours.keys()):
            if info.teacher_unet_config.get(key) != ours.get(key):
                problems.append(f"config {key}: student {info.teacher_unet_config.get(key)!r}, "
                                f"pipeline {ours.get(key)!r}")
    modules = dict(bare_unet(unet).named_modules())
    wrong = []
    for module in info.target_modules:
        layer = modules.get(module)
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        down, up = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
        expected = (up.shape[0], down.shape[1], *down.shape[2:])
        if weight is None:
            wrong.append(f"{module} (not in the pipeline's UNet)")
        elif tuple(weight.shape) != expected:
            wrong.append(f"{module} (student made for weight {expected}, pipeline has {tuple(weight.shape)})")
    if wrong:
        problems.append(f"{len(wrong)} of {len(info.target_modules)} LoRA modules do not fit, e.g. "
                        + ", ".join(wrong[:3]))
    if not problems and not same:
        problems.append(f"parameter shapes differ (fingerprint {info.teacher_unet_fingerprint} != "
                        f"{unet_fingerprint(unet)})")
    return problems  # the layers are checked on a matching fingerprint too: a file's halves may not fit its own UNet


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked_schedules(schedules) -> dict[int, dict[str, list[float]]]:
    """nfe_schedules with int keys, each entry checked: n descending timesteps, n + 1 sigmas ending in 0."""
    if not isinstance(schedules, dict) or not schedules:
        raise ValueError(f"nfe_schedules must be a non-empty dict {{nfe: {{'timesteps': [...], 'sigmas': [...]}}}}, "
                         f"got {schedules!r}")
    out = {}
    for key, entry in schedules.items():
        try:
            nfe = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"nfe_schedules key {key!r} is not an integer") from None
        if nfe < 1 or str(nfe) != str(key).strip():
            raise ValueError(f"nfe_schedules key {key!r} is not an integer >= 1")
        if not isinstance(entry, dict) or set(entry) != {"timesteps", "sigmas"}:
            raise ValueError(f"nfe_schedules[{nfe}] must be {{'timesteps': [...], 'sigmas': [...]}}, got {entry!r}")
        t, s = entry["timesteps"], entry["sigmas"]
        if not (isinstance(t, list) and isinstance(s, list) and all(_is_number(v) for v in t + s)):
            raise ValueError(f"nfe_schedules[{nfe}]: timesteps and sigmas must be lists of finite numbers")
        if len(t) != nfe or len(s) != nfe + 1:
            raise ValueError(f"nfe_schedules[{nfe}]: needs {nfe} timesteps and {nfe + 1} sigmas (ending in 0), "
                             f"got {len(t)} and {len(s)}")
        if s[-1] != 0 or min(s[:-1]) <= 0 or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError(f"nfe_schedules[{nfe}]: sigmas must be > 0, strictly decrease and end in 0, got {s}")
        if min(t) < 0 or any(a <= b for a, b in zip(t, t[1:])) or any(v != int(v) for v in t):
            raise ValueError(f"nfe_schedules[{nfe}]: timesteps must be whole numbers >= 0 and strictly decrease "
                             f"(the UNet is called at integer timesteps), got {t}")
        out[nfe] = {"timesteps": [int(v) for v in t], "sigmas": [float(v) for v in s]}
    return dict(sorted(out.items()))


def _to_metadata(info: StudentInfo) -> dict[str, str]:
    values = dataclasses.asdict(info)
    values["nfe_schedules"] = {str(k): v for k, v in info.nfe_schedules.items()}
    # Every entry JSON-encoded (atomic_save_file would leave plain strings raw): uniform to read.
    return {k: json.dumps(v) for k, v in {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **values}.items()}


_PREFIXES = ("unet.", "base_model.model.")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<peft>[AB])|lora\.(?P<diffusers>down|up))\.weight$")


def _lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (lora_A, lora_B)} from a peft- or diffusers-style UNet LoRA state dict."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        match = _PEFT_KEY.match(name)
        if match is None or name.startswith(("text_encoder", "lora_unet_")):
            raise ValueError(f"unet_lora_state key {key!r} is not a UNet LoRA weight in peft form "
                             "('<module>.lora_A.weight' / '.lora_B.weight') or diffusers form "
                             "('unet.<module>.lora.down.weight' / '.lora.up.weight')")
        half = "A" if (match["peft"] or match["diffusers"]) in ("A", "down") else "B"
        if half in halves.setdefault(match["module"], {}):
            raise ValueError(f"unet_lora_state has two lora_{half} tensors for {match['module']}")
        halves[match["module"]][half] = tensor
    if not halves:
        raise ValueError("unet_lora_state is empty")
    pairs = {}
    for module, h in halves.items():
        if h.keys() != {"A", "B"}:
            raise ValueError(f"unet_lora_state has lora_{''.join(h)} but not both halves for {module}")
        down, up = h["A"], h["B"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"LoRA of {module}: shapes {tuple(down.shape)} (lora_A) and {tuple(up.shape)} (lora_B) "
                             "are not a Linear or Conv2d LoRA")
        pairs[module] = (down, up)
    return dict(sorted(pairs.items()))


def _peft_tensors(tensors: dict[str, torch.Tensor], info: StudentInfo, path) -> dict[str, torch.Tensor]:
    """The file's kohya-named tensors as peft-style keys, checked against the metadata."""
    expected = {}
    for module in info.target_modules:
        name = kohya_name(module)
        expected[f"{name}.lora_down.weight"] = f"{module}.lora_A.weight"
        expected[f"{name}.lora_up.weight"] = f"{module}.lora_B.weight"
        expected[f"{name}.alpha"] = None
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        problems = ([f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []) + \
                   ([f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})"] if unexpected else [])
        raise FileFormatError(f"{path}: tensors do not match the metadata's target_modules: {'; '.join(problems)}")
    out = {}
    for key, peft_key in expected.items():
        tensor = tensors[key]
        if peft_key is None:
            if tensor.numel() != 1 or not math.isclose(tensor.item(), info.alpha, rel_tol=1e-6):
                raise FileFormatError(f"{path}: {key} is {tensor.tolist()}, but the metadata says alpha {info.alpha}")
            continue
        rank = tensor.shape[0] if key.endswith("lora_down.weight") else tensor.shape[1] if tensor.ndim > 1 else None
        if tensor.ndim not in (2, 4) or rank != info.rank:
            raise FileFormatError(f"{path}: {key} has shape {tuple(tensor.shape)}, not a rank-{info.rank} LoRA half")
        if what := tensor_problem(tensor):
            raise FileFormatError(f"{path}: {key} holds {what}: not the weights of a trained LoRA")
        out[peft_key] = tensor
    for module in info.target_modules:  # the two halves of each layer fit each other: up (out, r[, 1, 1])
        down, up = out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"]
        if up.ndim != down.ndim or up.shape[2:] not in ((), (1, 1)):
            raise FileFormatError(f"{path}: {module}'s LoRA halves do not fit each other (down "
                                  f"{tuple(down.shape)}, up {tuple(up.shape)})")
    return out
