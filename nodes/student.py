"""Distilled students in ComfyUI: one loader that applies the student's LoRA and hands out how to sample it
(the SIGMAS of the chosen NFE, its SAMPLER and the recommended cfg) for SamplerCustomAdvanced. The file and
its metadata are models/student_file.py's; here is only the wiring."""

import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..models.student_file import read_student
from ..schedulers.noise import sigma_to_model_timestep
from .model_identity import lora_mismatches

FOLDER_NAME = "loras"  # a student is a LoRA: it lives with the user's other LoRAs
# ComfyUI's parameterisation classes, most derived first (V_PREDICTION and X0 subclass EPS).
_PREDICTIONS = (("sample", comfy.model_sampling.X0), ("v_prediction", comfy.model_sampling.V_PREDICTION),
                ("epsilon", comfy.model_sampling.EPS))


def _check_model(model, info, schedule, name: str) -> None:
    """Refuses a model the student cannot have been distilled from: another parameterisation or noise table."""
    model_sampling = model.get_model_object("model_sampling")
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"{name}: a student samples a discrete VP model (SD1.x/2.x/XL-style noise schedule); this "
                         f"model samples with {type(model_sampling).__name__}")
    predicts = next((kind for kind, cls in _PREDICTIONS if isinstance(model_sampling, cls)), None)
    if predicts != info.prediction_type:
        raise ValueError(f"{name}: the student predicts {info.prediction_type}, this model {predicts}: it was "
                         "distilled from another model")
    timesteps = sigma_to_model_timestep(torch.tensor(schedule["sigmas"][:-1]), model_sampling.sigmas).tolist()
    if timesteps != schedule["timesteps"]:
        raise ValueError(f"{name}: its sigmas fall on timesteps {timesteps} of this model's noise schedule, not the "
                         f"{schedule['timesteps']} it was trained at: it was distilled from another model")


class LoadStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillLoadStudent",
            display_name="Load Distilled Student",
            category="loaders",
            description="Applies a Direct Distill student (a LoRA distilled from this checkpoint, in models/loras) "
                        "and gives the exact sigmas, sampler and cfg it was trained for: wire them into "
                        "SamplerCustomAdvanced (sigmas, sampler) and CFGGuider (model, cfg).",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint the student was distilled from."),
                io.Combo.Input("student_name", options=folder_paths.get_filename_list(FOLDER_NAME),
                               tooltip="The student file, from ComfyUI/models/loras."),
                io.Int.Input("nfe", default=0, min=0, max=1000,
                             tooltip="Sampling steps (model evaluations): one of the step counts the student was "
                                     "trained for. 0 uses the student's default."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the student LoRA; 1.0 is as trained."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the student applied."),
                io.Sigmas.Output(tooltip="The student's exact sigmas for this NFE."),
                io.Sampler.Output(tooltip="The sampler whose update the student was trained for."),
                io.Float.Output(display_name="cfg", tooltip="The recommended classifier-free guidance scale."),
            ],
        )

    @classmethod
    def execute(cls, model, student_name, nfe, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER_NAME, student_name)
        _, info = read_student(path)  # a malformed or foreign file raises FileFormatError naming it
        n = nfe or info.default_nfe
        if n not in info.nfe_schedules:
            raise ValueError(f"{student_name}: trained for nfe {', '.join(map(str, info.nfe_schedules))} "
                             f"(default {info.default_nfe}), not {nfe}")
        schedule = info.nfe_schedules[n]
        _check_model(model, info, schedule, student_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        problems = lora_mismatches(model, lora)
        if problems:
            raise ValueError(f"{student_name}: this student was made for another UNet: " + "; ".join(problems))
        if strength != 0:
            model, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(model, torch.tensor(schedule["sigmas"], dtype=torch.float32),
                             comfy.samplers.sampler_object(info.comfy_sampler), info.guidance)


NODES = [LoadStudent]
