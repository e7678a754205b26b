"""LoRA files in the layouts few-step releases ship in, read into one form and written back in the one form that
diffusers' ``load_lora_weights`` and ComfyUI's LoRA loader apply identically.

Layouts read (a file may mix UNet and text-encoder tensors):

- kohya: ``lora_unet_<module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight``, with or without ``.alpha``
  (without it both loaders scale by 1, i.e. alpha = rank); text encoders ``lora_te_`` (SD1.x), ``lora_te1_`` /
  ``lora_te2_`` (SDXL).
- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` or ``.lora.down.weight`` / ``.lora.up.weight``
  (also ``.lora_linear_layer.down/up`` and the attention-processor spelling ``.processor.to_q_lora.down``), prefixes
  ``unet.``, ``text_encoder.``, ``text_encoder_2.``; alpha from ``<module>.alpha`` tensors or the
  ``lora_adapter_metadata`` entry diffusers writes (``<component>.lora_alpha``, ``.alpha_pattern``), else rank.

Module names are kept in kohya's underscore spelling until they are resolved against the modules a model has
(:func:`resolve_layers`): an underscore name is ambiguous on its own (``to_out_0``), the model's names are not. A
kohya name may spell a UNet module either way the trainers do: diffusers' (``down_blocks_1_attentions_0_...``) or
the original LDM/SGM UNet's (``input_blocks_4_1_...``, what kohya's SDXL trainer and LoRA extraction write, and what
ComfyUI reads natively); :func:`sgm_names` relates the two on the model at hand.
The form written (:func:`kohya_state_dict`) is ``models.student_file``'s: kohya names with an explicit ``.alpha``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import torch

from .student_file import kohya_name

PRESET_METADATA_KEY = "direct_distill.preset"  # the few-step preset a file was stamped with (its name, plain text)

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^(?P<name>lora_(?:unet|te[12]?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<component>unet|text_encoder_2|text_encoder)\.(?P<module>.+?)"
    r"(?:\.lora_(?P<peft>[AB])\.weight|\.lora\.(?P<dot>down|up)\.weight"
    r"|\.lora_linear_layer\.(?P<linear>down|up)\.weight"
    r"|_lora\.(?P<proc>down|up)\.weight|\.(?P<alpha>alpha))$")


class LoraLayoutError(ValueError):
    """A LoRA state dict has tensors in no known layout, or halves that do not pair up."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update ``(alpha / rank) * up @ down`` (for a Conv2d, ``down`` carries the kernel)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this layer updates."""
        return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
               ) -> dict[tuple[str, str], LoraLayer]:
    """Read any supported layout.

    Returns:
        ``{(component, module name in kohya's underscore spelling): LoraLayer}``, the component "unet",
        "text_encoder" or "text_encoder_2".

    Raises:
        LoraLayoutError naming the first tensor in no known layout, or a layer missing a half.
    """
    if not tensors:
        raise LoraLayoutError("the file holds no tensors")
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, tensor in tensors.items():
        target, part = _split_key(key)
        if part == "alpha":
            if tensor.numel() != 1:
                raise LoraLayoutError(f"{key} has {tensor.numel()} values; an alpha is one number")
            alphas[target] = float(tensor.float().item())
            continue
        if part in halves.setdefault(target, {}):
            raise LoraLayoutError(f"two {part} tensors for {target[1]} ({key})")
        halves[target][part] = tensor
    unpaired = sorted(t for t in set(halves) | set(alphas) if set(halves.get(t, ())) != {"down", "up"})
    if unpaired:
        component, name = unpaired[0]
        raise LoraLayoutError(f"{component} layer {name} lacks its "
                              f"{' and '.join(sorted({'down', 'up'} - set(halves.get(unpaired[0], ()))))} half")
    adapter_alphas = _adapter_metadata_alphas(metadata or {})
    layers = {}
    for target, h in halves.items():
        down, up = h["down"], h["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
                up.shape[2:] not in ((), (1, 1)):
            raise LoraLayoutError(f"{target[0]} layer {target[1]}: shapes {tuple(down.shape)} (down) and "
                                  f"{tuple(up.shape)} (up) are not a Linear or Conv2d LoRA")
        alpha = alphas.get(target)
        if alpha is None:
            alpha = adapter_alphas(target, down.shape[0])
        layers[target] = LoraLayer(down=down, up=up, alpha=float(down.shape[0] if alpha is None else alpha))
    return dict(sorted(layers.items()))


def resolve_layers(layers: dict[tuple[str, str], LoraLayer], modules: dict[str, dict[str, tuple[int, ...]]]
                   ) -> tuple[dict[tuple[str, str], LoraLayer], list[str]]:
    """Put each layer on a module of a model.

    Args:
        layers: :func:`parse_lora`'s output.
        modules: ``{component: {module name (diffusers' dotted spelling): weight shape}}``, the model's Linear and
            Conv2d layers; a component the model lacks is absent.

    Returns:
        ``({(component, module name): layer}, problems)``: problems name, one line per kind, the layers that match
        no module and those whose shape is not the module's; empty when every layer fits.
    """
    by_underscore = {component: _underscore_names(component, names) for component, names in modules.items()}
    resolved, missing, wrong = {}, [], []
    for (component, name), layer in layers.items():
        module = by_underscore.get(component, {}).get(name)
        if module is None:
            missing.append(f"{component} {name}")
        elif tuple(modules[component][module]) != layer.weight_shape:
            wrong.append(f"{component} {module} (LoRA for {layer.weight_shape}, model has "
                         f"{tuple(modules[component][module])})")
        else:
            resolved[(component, module)] = layer
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} of {len(layers)} layers have other shapes in this model, e.g. {wrong[0]}")
    if missing:
        problems.append(f"{len(missing)} of {len(layers)} layers name no layer of this model, e.g. {missing[0]}")
    return resolved, problems


def kohya_state_dict(layers: dict[tuple[str, str], LoraLayer], *, two_text_encoders: bool) -> dict[str, torch.Tensor]:
    """Resolved layers (:func:`resolve_layers`) as kohya tensors with an explicit ``.alpha`` each: the form both
    loaders read with the same effect. ``two_text_encoders`` names SDXL's ``lora_te1_`` / ``lora_te2_``."""
    prefixes = {"text_encoder": "lora_te1_" if two_text_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for (component, module), layer in layers.items():
        if component == "unet":
            name = kohya_name(module)
        elif component in prefixes:
            name = prefixes[component] + module.replace(".", "_")
        else:
            raise ValueError(f"unknown LoRA component {component!r}")
        out[f"{name}.lora_down.weight"] = layer.down
        out[f"{name}.lora_up.weight"] = layer.up
        out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


def lora_family(layers: dict[tuple[str, str], LoraLayer]) -> str | None:
    """"sd15" or "sdxl" from which modules a LoRA touches (SD1.x has attention in the first down block and a fourth
    block, in the original UNet's names attention in input blocks 1 and 2 and input/output blocks past 8; SDXL has
    none of these, but transformer depths above one, an added embedding and a second text encoder); None when the
    names say neither or both."""
    names = [name for component, name in layers if component == "unet"]
    sd15 = any(re.match(r"(down_blocks_0_attentions|down_blocks_3_|up_blocks_3_|input_blocks_[12]_1_"
                        r"|input_blocks_1[01]_|output_blocks_(9|1[01])_)", n) for n in names)
    sdxl = (any(re.search(r"transformer_blocks_[1-9]", n) or n.startswith(("add_embedding", "label_emb"))
                for n in names) or any(component == "text_encoder_2" for component, _ in layers))
    if sd15 != sdxl:
        return "sd15" if sd15 else "sdxl"
    return None


def unet_family(unet_parameter_names) -> str:
    """"sdxl" for a UNet with SDXL's added (text and size) embedding, else "sd15" (SD1.x-style)."""
    return "sdxl" if any(name.startswith("add_embedding.") for name in unet_parameter_names) else "sd15"


def stamped_preset(metadata: dict[str, str]) -> str | None:
    """The preset name ``python -m direct_distill stamp`` wrote into a file's metadata, if any."""
    return metadata.get(PRESET_METADATA_KEY) or None


def _split_key(key: str) -> tuple[tuple[str, str], str]:
    """((component, underscore module name), "down" | "up" | "alpha") of one tensor key."""
    match = _KOHYA_KEY.match(key)
    if match:
        name = match["name"]
        prefix = next(p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p))
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match["part"]]
        return (_KOHYA_PREFIXES[prefix], name[len(prefix):]), part
    match = _DIFFUSERS_KEY.match(key)
    if match:
        module = match["module"]
        if match["proc"]:  # attention-processor spelling: attn1.processor.to_q_lora.down
            module = module.replace(".processor.", ".")
            module = module[:-len("to_out")] + "to_out.0" if module.endswith(".to_out") else module
        half = match["peft"] or match["dot"] or match["linear"] or match["proc"]
        part = "alpha" if match["alpha"] else ("down" if half in ("A", "down") else "up")
        return (match["component"], module.replace(".", "_")), part
    kind = next((what for pattern, what in _OTHER_FORMATS if re.search(pattern, key)), None)
    if kind:
        raise LoraLayoutError(f"tensor {key!r} is {kind}, not a plain LoRA: only plain LoRA is read (kohya "
                              "lora_unet_/lora_te*_ or diffusers/peft unet./text_encoder*.)")
    raise LoraLayoutError(f"tensor {key!r} is in no LoRA layout this reads (kohya lora_unet_/lora_te*_ "
                          "or diffusers/peft unet./text_encoder*. with lora_A/lora_B or lora.down/lora.up)")


# Adapter formats that are not a low-rank update W + B A, by a key of theirs: named in the refusal.
_OTHER_FORMATS = ((r"dora_scale$|lora_magnitude_vector", "DoRA's magnitude vector"),
                  (r"\.hada_", "a LyCORIS LoHa (Hadamard product) tensor"),
                  (r"\.lokr_", "a LyCORIS LoKr (Kronecker product) tensor"),
                  (r"\.lora_mid\.", "a LyCORIS LoCon Tucker core"),
                  (r"\.diff(_b)?$|\.(diff|bias_diff)$", "a full weight difference (a model-diff patch)"))


def _adapter_metadata_alphas(metadata: dict[str, str]):
    """``alpha(target, rank)``: the alpha of a layer from diffusers' ``lora_adapter_metadata`` entry (peft's
    lora_alpha and alpha_pattern), in the ``alpha / rank`` convention: a rank-stabilised LoRA (``use_rslora``,
    scaled by alpha / sqrt(rank)) has alpha * sqrt(rank). DoRA (``use_dora``) is refused: its magnitude vector is
    no low-rank update."""
    raw = metadata.get("lora_adapter_metadata")
    config = {}
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise LoraLayoutError("metadata entry 'lora_adapter_metadata' is not valid JSON") from None
        if not isinstance(config, dict):
            raise LoraLayoutError("metadata entry 'lora_adapter_metadata' is not a JSON object")
    dora = sorted(k.split(".")[0] for k, v in config.items() if k.endswith(".use_dora") and v)
    if dora:
        raise LoraLayoutError(f"a DoRA adapter ({', '.join(dora)}: use_dora in lora_adapter_metadata): only plain "
                              "LoRA is read")

    def alpha(target, rank):
        component, name = target
        value = config.get(f"{component}.lora_alpha")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        for pattern, pattern_alpha in patterns.items():
            if name == pattern.replace(".", "_") or name.endswith("_" + pattern.replace(".", "_")):
                value = pattern_alpha
                break
        if value is not None and config.get(f"{component}.use_rslora"):
            value = value * math.sqrt(rank)
        return value

    return alpha


def _underscore_names(component: str, names) -> dict[str, str]:
    """{underscore spelling: module name}; a UNet module is also found under its kohya override (label_emb_0_0)
    and under its original LDM/SGM name (:func:`sgm_names`)."""
    names = list(names)
    out = {}
    if component == "unet":
        out.update({sgm.replace(".", "_"): name for name, sgm in sgm_names(names).items()})
    for name in names:
        out[name.replace(".", "_")] = name
        if component == "unet":
            out[kohya_name(name).removeprefix("lora_unet_")] = name
    return out


# Inside a resnet and at the top level, the LDM/SGM UNet names its layers differently; a transformer block's layers
# keep their names.
_SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                      "conv_shortcut": "skip_connection"}
_SGM_TOP_LAYERS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                   "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
_BLOCK_LAYER = re.compile(r"^(?P<side>down|up)_blocks\.(?P<block>\d+)\."
                          r"(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")
_MID_LAYER = re.compile(r"^mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


def sgm_names(names) -> dict[str, str]:
    """``{diffusers module name: its name in the original LDM/SGM UNet}`` for the modules of a diffusers
    UNet2DConditionModel named ``names`` (its Linear and Conv2d layers, say); a module with no counterpart is left
    out.

    The block structure is read off the names: the SGM UNet numbers its input blocks through the down blocks (a
    ``[resnet, attention]`` pair per layer, then a block of its own for the downsampler, after ``conv_in`` as
    block 0), its output blocks through the up blocks (one per layer, the upsampler inside the last), and its
    middle block as ``[resnet, attention, resnet]``.
    """
    names = list(names)
    layers: dict[tuple[str, int], set[int]] = {}      # (side, block) -> indices of its resnets
    attention: set[tuple[str, int]] = set()           # blocks with attentions
    resampled: set[tuple[str, int]] = set()           # blocks with a down/upsampler
    for name in names:
        match = _BLOCK_LAYER.match(name)
        if match:
            key = (match["side"], int(match["block"]))
            layers.setdefault(key, set())
            if match["kind"] == "resnets":
                layers[key].add(int(match["index"]))
            elif match["kind"] == "attentions":
                attention.add(key)
            else:
                resampled.add(key)
    first: dict[tuple[str, int], int] = {}  # (side, block) -> SGM index of its first layer
    position = {"down": 1, "up": 0}
    for side, block in sorted(layers):
        first[side, block] = position[side]
        position[side] += len(layers[side, block]) + (side == "down" and (side, block) in resampled)

    def inside(kind: str, rest: str | None) -> str | None:
        if kind == "resnets":
            return _SGM_RESNET_LAYERS.get(rest)
        return rest

    out = {}
    for name in names:
        sgm = _SGM_TOP_LAYERS.get(name)
        if (match := _BLOCK_LAYER.match(name)) is not None:
            key, kind, index = (match["side"], int(match["block"])), match["kind"], int(match["index"])
            blocks = "input_blocks" if key[0] == "down" else "output_blocks"
            if kind in ("resnets", "attentions"):
                layer = inside(kind, match["rest"])
                sub = 0 if kind == "resnets" else 1
                sgm = layer and f"{blocks}.{first[key] + index}.{sub}.{layer}"
            elif kind == "downsamplers" and match["rest"] == "conv":
                sgm = f"{blocks}.{first[key] + len(layers[key])}.0.op"
            elif kind == "upsamplers" and match["rest"] == "conv":
                sgm = f"{blocks}.{first[key] + len(layers[key]) - 1}.{2 if key in attention else 1}.conv"
        elif (match := _MID_LAYER.match(name)) is not None:
            layer = inside(match["kind"], match["rest"])
            sub = 1 if match["kind"] == "attentions" else 2 * int(match["index"])
            sgm = layer and f"middle_block.{sub}.{layer}"
        if sgm:
            out[name] = sgm
    return out
