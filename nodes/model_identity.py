"""Which UNet a ComfyUI MODEL is, and whether a LoRA fits it: checked before anything is patched, since ComfyUI
itself logs one line per key it cannot place or shape it cannot apply and then samples the unmodified model."""

import comfy.lora
import comfy.lora_convert
import comfy.model_sampling
import comfy.utils

from ..models.student_file import shape_fingerprint

_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")


def unet_parameter_shapes(model) -> dict[str, list[int]]:
    """{parameter name: shape} of an SD-class (SD1.x/2.x/XL) MODEL's UNet, under diffusers' names: what
    ``models.student_file.unet_parameter_shapes`` gives for the same UNet built by diffusers."""
    base = model.model
    to_comfy = comfy.utils.unet_to_diffusers(base.model_config.unet_config)  # diffusers name -> ComfyUI name
    if not to_comfy:
        raise ValueError(f"this model ({type(base).__name__}) is not a UNet of the SD1.x/2.x/XL kind")
    state = base.diffusion_model.state_dict()
    # ComfyUI's table names its label embedding twice, as class_embedding and add_embedding: a diffusers UNet has
    # the one its kind builds (SDXL's sequential ADM: add_embedding)
    sdxl_like = base.model_config.unet_config.get("num_classes") == "sequential"
    other = "class_embedding." if sdxl_like else "add_embedding."
    return {name: list(state[key].shape) for name, key in to_comfy.items()
            if key in state and not name.startswith(other)}


# diffusers' prediction types and ComfyUI's classes, most derived first: V_PREDICTION and X0 derive from EPS.
PREDICTIONS = (("sample", comfy.model_sampling.X0), ("v_prediction", comfy.model_sampling.V_PREDICTION),
               ("epsilon", comfy.model_sampling.EPS))


def predicts(model_sampling) -> str | None:
    """What a model predicts, in diffusers' words (None for none of them: flow matching, EDM, ...)."""
    return next((kind for kind, cls in PREDICTIONS if isinstance(model_sampling, cls)), None)


def sampling_kind(model_sampling) -> str:
    """How a model samples, by ComfyUI's classes: ``model_sampling`` is an instance of a class ComfyUI generates
    (always named ModelSampling) from a sampling class and a prediction class, e.g. "ModelSamplingContinuousEDM with
    EDM prediction" or "ModelSamplingDiscreteFlow with CONST prediction"."""
    bases = [b.__name__ for b in type(model_sampling).__bases__ if b is not object]
    if type(model_sampling).__name__ != "ModelSampling" or not bases:
        return type(model_sampling).__name__
    return bases[0] + "".join(f" with {b} prediction" for b in bases[1:])


def check_checkpoint_noise_table(model_sampling, name: str) -> None:
    """Refuses a model whose noise table is not its checkpoint's 1000 steps (ModelSamplingDiscrete set to lcm keeps
    50): the timesteps a file was made for would be read on another table."""
    if len(model_sampling.sigmas) != 1000:
        raise ValueError(f"{name}: this model's noise table has {len(model_sampling.sigmas)} steps, not the 1000 of "
                         "the checkpoint (a ModelSamplingDiscrete node set to lcm?): connect the checkpoint's MODEL")


def unet_shape_fingerprint(model) -> str:
    """``models.student_file.shape_fingerprint`` of the MODEL's UNet: equal to that of the diffusers UNet of the
    same architecture, so a file can name the UNet it was made for in a way both front doors check."""
    return shape_fingerprint(unet_parameter_shapes(model))


def lora_mismatches(model, lora: dict, clip=None) -> list[str]:
    """What keeps ``lora`` (a state dict as ComfyUI's LoRA loaders read it) from applying fully to ``model`` (and
    ``clip``, when given): tensors ComfyUI would leave unloaded and layers whose shape the model does not have,
    one line per kind; empty when every tensor lands on a weight of its shape."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    targets = dict(model.model.state_dict())
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        targets.update(clip.cond_stage_model.state_dict())
    lora = comfy.lora_convert.convert_lora(lora)
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)

    placed = {f"{x}.{suffix}" for x in key_map for suffix in ("alpha", "dora_scale")} & lora.keys()
    wrong = []
    for target, patch in patches.items():
        placed |= getattr(patch, "loaded_keys", set())
        weights = getattr(patch, "weights", None)
        if not isinstance(target, str) or target not in targets or weights is None or len(weights) < 2:
            continue
        up, down = weights[0], weights[1]
        made_for = (up.shape[0], down.shape[1], *down.shape[2:])
        if tuple(targets[target].shape) != made_for:
            wrong.append(f"{target} (LoRA for {made_for}, model has {tuple(targets[target].shape)})")
    if not patches:
        return [f"none of its {len(lora)} tensors names a layer of this model"]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} of {len(patches)} layers have other shapes in this model, e.g. {wrong[0]}")
    unplaced = sorted(lora.keys() - placed)
    text_encoder = [k for k in unplaced if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_encoder and clip is None:
        problems.append(f"{len(text_encoder)} tensors are for the text encoder (e.g. {text_encoder[0]}): connect "
                        "the CLIP input so they are applied too")
    others = [k for k in unplaced if k not in text_encoder or clip is not None]
    if others:
        problems.append(f"{len(others)} tensors name no layer of this model, e.g. {others[0]}")
    return problems
