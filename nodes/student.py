"""Distilled students in ComfyUI: one loader that applies a student's LoRA (ours, or a few-step LoRA published by
others with its preset) and hands out how to sample it (the SIGMAS of the chosen NFE, its SAMPLER and the
recommended cfg) for SamplerCustomAdvanced, and the TCD sampler ComfyUI lacks. File formats and presets are
models/' and schedulers/'; here is only the wiring."""

import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..models.few_step_lora import preset_and_layers
from ..models.io import is_direct_distill_file, read_safetensors
from ..models.lora_layouts import kohya_state_dict, resolve_layers, unet_family
from ..models.student_file import read_student
from ..schedulers.few_step_presets import PRESETS, describe_nfes
from ..schedulers.tcd import sample_tcd
from .model_identity import (PREDICTIONS, check_checkpoint_noise_table, lora_mismatches, predicts, sampling_kind,
                             unet_parameter_shapes)

FOLDER_NAME = "loras"  # a student is a LoRA: it lives with the user's other LoRAs
FROM_FILE = "from file"
# ComfyUI's text-encoder prefixes (cond_stage_model's state dict) -> the diffusers component of a LoRA.
# model_options key of a MODEL this node put a few-step LoRA on: a second one downstream is refused
APPLIED_KEY = "direct_distill_few_step_lora"
_CLIP_COMPONENTS = {"sd15": {"clip_l.transformer.": "text_encoder"},
                    "sdxl": {"clip_l.transformer.": "text_encoder", "clip_g.transformer.": "text_encoder_2"}}


def _model_sampling(model, name: str, prediction_type: str):
    """The model's ModelSamplingDiscrete, refused if it is not a discrete VP model of ``prediction_type``."""
    model_sampling = model.get_model_object("model_sampling")
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"{name}: a student samples a discrete VP model (SD1.x/2.x/XL-style noise schedule); this "
                         f"model samples with {sampling_kind(model_sampling)}")
    model_predicts = predicts(model_sampling)
    if model_predicts != prediction_type:
        raise ValueError(f"{name}: the student was distilled from a model predicting {prediction_type}, this MODEL "
                         f"predicts {model_predicts}: another model, or a ModelSamplingDiscrete node or a student read "
                         f"as {model_predicts} upstream (connect the checkpoint's MODEL)")
    return model_sampling


def _check_model(model, info, schedule, name: str):
    """The model's ModelSamplingDiscrete; refuses a model the student cannot have been distilled from: another
    parameterisation or noise table."""
    model_sampling = _model_sampling(model, name, info.teacher_prediction_type)
    check_checkpoint_noise_table(model_sampling, name)
    timesteps = model_sampling.timestep(torch.tensor(schedule["sigmas"][:-1], dtype=torch.float32)).tolist()
    if timesteps != schedule["timesteps"]:
        raise ValueError(f"{name}: its sigmas fall on timesteps {timesteps} of this model's noise schedule, not the "
                         f"{schedule['timesteps']} it was trained at: it was distilled from another model")
    return model_sampling


def _sampling_as(model, model_sampling, prediction_type: str):
    """``model_sampling``'s noise table with the model's output read as ``prediction_type`` (what ComfyUI's
    ModelSamplingDiscrete node does, keeping the table itself)."""
    parameterisation = dict(PREDICTIONS)[prediction_type]

    class StudentSampling(comfy.model_sampling.ModelSamplingDiscrete, parameterisation):
        pass

    sampling = StudentSampling(model.model.model_config)
    sampling.set_sigmas(model_sampling.sigmas.detach().clone())
    return sampling


def _sample_tcd(model, x, sigmas, *, gamma: float, **kwargs):
    # the noise table is the sampled model's own (KSamplerX0Inpaint -> CFGGuider -> BaseModel)
    model_sampling = model.inner_model.inner_model.model_sampling
    if not isinstance(model_sampling, comfy.model_sampling.EPS):  # its re-noising is x0 + sigma * noise
        raise ValueError(f"TCD Sampler: it re-noises as x0 + sigma * noise, which this model does not sample by "
                         f"({sampling_kind(model_sampling)}): use it with SD1.x/2.x/XL-style models")
    return sample_tcd(model, x, sigmas, gamma=gamma, sigma_table=model_sampling.sigmas, **kwargs)


def tcd_sampler(gamma: float) -> comfy.samplers.KSAMPLER:
    """TCD's strategic stochastic sampler (schedulers/tcd.py) as a ComfyUI SAMPLER."""
    return comfy.samplers.KSAMPLER(_sample_tcd, extra_options={"gamma": gamma})


def _own_student(model, clip, path, name, nfe, strength):
    _, info = read_student(path)  # a malformed or foreign file raises FileFormatError naming it
    n = nfe or info.default_nfe
    if n not in info.nfe_schedules:
        raise ValueError(f"{name}: trained for nfe {', '.join(map(str, info.nfe_schedules))} "
                         f"(default {info.default_nfe}), not {nfe}")
    schedule = info.nfe_schedules[n]
    model_sampling = _check_model(model, info, schedule, name)
    if info.prediction_type != info.teacher_prediction_type and strength not in (0, 1):
        raise ValueError(f"{name}: this student's output is read as {info.prediction_type} where its model predicts "
                         f"{info.teacher_prediction_type}: at strength {strength:g} the output would be part one, "
                         "part the other; use strength 1 (or 0 for the model alone)")
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    problems = lora_mismatches(model, lora)
    if problems:
        raise ValueError(f"{name}: this student was made for another UNet: " + "; ".join(problems))
    if strength != 0:
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        if info.prediction_type != info.teacher_prediction_type:  # read its output as it was trained to predict
            model.add_object_patch("model_sampling", _sampling_as(model, model_sampling, info.prediction_type))
    return (model, torch.tensor(schedule["sigmas"], dtype=torch.float32),
            comfy.samplers.sampler_object(info.comfy_sampler), info.guidance, clip)


def _preset_lora(model, clip, tensors, metadata, name, preset_name, nfe, strength):
    family = unet_family(unet_parameter_shapes(model))
    preset, layers = preset_and_layers(name, tensors, metadata, None if preset_name == FROM_FILE else preset_name,
                                       family, how_to_choose="choose its preset", model="this model")
    n = nfe or preset.default_nfe
    if n not in preset.nfes:
        raise ValueError(f"{name}: preset {preset.name} samples with nfe {describe_nfes(preset.nfes)} "
                         f"(default {preset.default_nfe}), not {nfe}")
    model_sampling = _model_sampling(model, name, "epsilon")
    check_checkpoint_noise_table(model_sampling, name)
    if getattr(model_sampling, "zsnr", False):
        raise ValueError(f"{name}: this model's noise table is rescaled to zero terminal SNR (first sigma "
                         f"{float(model_sampling.sigmas[-1]):.0f}): preset {preset.name} was made on SD's table; "
                         "connect the checkpoint's MODEL without the zsnr patch")

    text_encoder = [target for target in layers if target[0] != "unet"]
    if text_encoder and clip is None:
        if strength != 0:
            raise ValueError(f"{name}: this LoRA also changes the text encoder ({len(text_encoder)} layers): connect "
                             "the checkpoint's CLIP to the clip input")
        layers = {target: layer for target, layer in layers.items() if target[0] == "unet"}  # 0: the model alone
    resolved, problems = resolve_layers(layers, _lora_targets(model, clip, family))
    if problems:
        raise ValueError(f"{name}: this LoRA does not fit this model: " + "; ".join(problems))
    lora = kohya_state_dict(resolved, two_text_encoders=family == "sdxl")
    problems = lora_mismatches(model, lora, clip)
    if problems:
        raise ValueError(f"{name}: ComfyUI would not apply all of this LoRA: " + "; ".join(problems))
    if strength != 0:
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)
    sigmas = preset.sigmas(n, model_sampling.sigmas).float()
    if preset.sampler == "tcd":
        sampler = tcd_sampler(preset.gamma)
    else:
        sampler = comfy.samplers.sampler_object(preset.sampler)
    return model, sigmas, sampler, preset.guidance, clip


def _lora_targets(model, clip, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module name (diffusers' spelling): weight shape}} of the model's UNet and, if given, its CLIP."""
    targets = {"unet": {k[:-len(".weight")]: tuple(v) for k, v in unet_parameter_shapes(model).items()
                        if k.endswith(".weight") and len(v) in (2, 4)}}
    if clip is not None:
        for key, tensor in clip.cond_stage_model.state_dict().items():
            for prefix, component in _CLIP_COMPONENTS[family].items():
                if key.startswith(prefix) and key.endswith(".weight") and tensor.ndim == 2:
                    targets.setdefault(component, {})[key[len(prefix):-len(".weight")]] = tuple(tensor.shape)
    return targets


class LoadStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillLoadStudent",
            display_name="Load Distilled Student",
            category="loaders",
            description="Applies a few-step LoRA from models/loras, a Direct Distill student or one published by "
                        "others (LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, DMD2, PCM: pick its preset), and gives "
                        "the sigmas, sampler and cfg it is sampled with: wire them into SamplerCustomAdvanced "
                        "(sigmas, sampler) and CFGGuider (model, cfg).",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint the LoRA was made for (or a fine-tune of it)."),
                io.Combo.Input("student_name", options=folder_paths.get_filename_list(FOLDER_NAME),
                               tooltip="The LoRA file, from ComfyUI/models/loras."),
                io.Int.Input("nfe", default=0, min=0, max=1000,
                             tooltip="Sampling steps (model evaluations): one of the step counts the LoRA was made "
                                     "for. 0 uses its default."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA (on the model and, if connected, the CLIP); 1.0 is as "
                                       "trained. A student reading its output as another prediction than its "
                                       "model's takes 1 or 0 only."),
                io.Combo.Input("preset", options=[FROM_FILE, *PRESETS], default=FROM_FILE,
                               tooltip="How a LoRA from elsewhere is sampled (python -m direct_distill stamp --list "
                                       "shows the sources). 'from file': a Direct Distill student, or a file "
                                       "stamped with its preset."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP, for LoRAs that also change the text encoder."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA applied."),
                io.Sigmas.Output(tooltip="The exact sigmas of this NFE."),
                io.Sampler.Output(tooltip="The sampler the LoRA was made for."),
                io.Float.Output(display_name="cfg", tooltip="The recommended classifier-free guidance scale."),
                io.Clip.Output(tooltip="The CLIP with the LoRA's text-encoder layers applied (unchanged if it has "
                                       "none; empty if none was connected)."),
            ],
        )

    @classmethod
    def execute(cls, model, student_name, nfe, strength, preset=FROM_FILE, clip=None) -> io.NodeOutput:
        earlier = model.model_options.get(APPLIED_KEY)
        if earlier is not None:
            raise ValueError(f"{student_name}: this MODEL already carries the few-step LoRA {earlier} (a Load "
                             "Distilled Student upstream): two at once sample as neither; connect the checkpoint's "
                             "MODEL instead")
        path = folder_paths.get_full_path_or_raise(FOLDER_NAME, student_name)
        tensors, metadata = read_safetensors(path)  # an unreadable file raises FileFormatError naming it
        if is_direct_distill_file(metadata):
            if preset != FROM_FILE:
                raise ValueError(f"{student_name}: a Direct Distill student's file says how it samples; set preset "
                                 f"to '{FROM_FILE}'")
            out = _own_student(model, clip, path, student_name, nfe, strength)
        else:
            out = _preset_lora(model, clip, tensors, metadata, student_name, preset, nfe, strength)
        if strength != 0:  # the patched clone says so (model_options are copied with each clone downstream)
            out[0].model_options[APPLIED_KEY] = student_name
        return io.NodeOutput(*out)


class TCDSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillSamplerTCD",
            display_name="TCD Sampler",
            category="sampling/custom_sampling/samplers",
            description="Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024): "
                        "each step jumps to a point of the trajectory set by gamma, then adds back fresh noise. "
                        "For TCD and Hyper-SD LoRAs; feed SamplerCustomAdvanced.",
            inputs=[
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Stochasticity of each step (diffusers' eta): 0 is deterministic, higher "
                                       "values blur detail; 0.3 is TCD's recommendation."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        return io.NodeOutput(tcd_sampler(gamma))


NODES = [LoadStudent, TCDSamplerNode]
