"""A few-step LoRA from elsewhere: its preset, its family, whether it is one for a model, checked the same way by
both front doors and the stamp command."""

from __future__ import annotations

from ..schedulers.few_step_presets import FewStepPreset, get_preset, presets_for
from .io import FileFormatError
from .lora_layouts import LoraLayer, LoraLayoutError, lora_family, parse_lora, stamped_preset

FAMILY_NAMES = {"sd15": "SD1.x", "sdxl": "SDXL"}
# Widths the real models' layers take in, where a LoRA shows which family it was made for: the cross-attention
# context (attn2's to_k / to_v) and each text encoder's hidden size.
_FAMILY_WIDTHS = {
    "sd15": {("unet", "attn2_to_k"): 768, ("unet", "attn2_to_v"): 768, ("text_encoder", "self_attn_q_proj"): 768},
    "sdxl": {("unet", "attn2_to_k"): 2048, ("unet", "attn2_to_v"): 2048, ("text_encoder", "self_attn_q_proj"): 768,
             ("text_encoder_2", "self_attn_q_proj"): 1280},
}


def preset_and_layers(name: str, tensors, metadata: dict[str, str], preset_name: str | None, family: str, *,
                      how_to_choose: str, model: str) -> tuple[FewStepPreset, dict[tuple[str, str], LoraLayer]]:
    """The preset of a LoRA file (``preset_name``, else the one stamped in its metadata) and its layers
    (``parse_lora``), refused with one error naming the file (``name``) when there is no preset, when it is of
    another family than the model's (``family``), or when the layers are those of another family.

    Args:
        how_to_choose: how a user gives a preset in this front door ("pass preset=", ...), for the error.
        model: what the model is called in this front door ("this pipeline's UNet", ...), for the errors.
    """
    chosen = preset_name or stamped_preset(metadata)
    if chosen is None:
        raise ValueError(f"{name}: not a Direct Distill student and not stamped with a few-step preset; "
                         f"{how_to_choose}, one of the {FAMILY_NAMES[family]} presets: "
                         + ", ".join(p.name for p in presets_for(family)))
    try:
        preset = get_preset(chosen)
        layers = parse_lora(tensors, metadata)
    except LoraLayoutError as err:
        raise FileFormatError(f"{name}: {err}") from None
    except ValueError as err:
        stamped = "" if preset_name else (f" (the preset stamped in the file, by another version of this package?"
                                          f" {how_to_choose} to choose one)")
        raise ValueError(f"{name}: {err}{stamped}") from None
    if preset.family != family:
        raise ValueError(f"{name}: preset {preset.name} is for {FAMILY_NAMES[preset.family]} models, {model} is "
                         f"{FAMILY_NAMES[family]}-style; its presets: "
                         + ", ".join(p.name for p in presets_for(family)))
    made_for = lora_family(layers)
    if made_for not in (None, family):
        raise ValueError(f"{name}: this LoRA was made for {FAMILY_NAMES[made_for]} (the layers it changes), {model} "
                         f"is {FAMILY_NAMES[family]}-style")
    return preset, layers


def family_mismatches(layers: dict[tuple[str, str], LoraLayer], family: str) -> list[str]:
    """Why a LoRA (``parse_lora``'s layers) cannot be one for the real models of ``family``, with no model at hand:
    the family its layer names say, and layers whose input width is not that family's. Empty when it fits."""
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
