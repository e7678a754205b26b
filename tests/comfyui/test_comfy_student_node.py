"""Load Distilled Student inside a real ComfyUI: the LoRA, sigmas, sampler and cfg it hands out for a student file
written by training/lora.py, its refusals, sampling under SamplerCustomAdvanced against load_student in diffusers,
and the example workflow student_4step.json (structure, widget values, a run on tiny models)."""

import copy
import importlib
import json
import logging
from pathlib import Path

import comfy.model_base
import comfy.model_sampling
import comfy.samplers
import comfy_extras.nodes_custom_sampler as custom_sampler
import folder_paths
import nodes
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from .test_comfy_shortcut import builtin_nodes  # noqa: F401 (a fixture)
from .test_comfy_shortcut import FRONTEND_ONLY, check_links, run_node, run_workflow, widget_values
from .test_comfy_student_lora import SD15_LATENT_SCALE, comfy_model_from, diffusers_twin_of_tiny_sd15
from .tiny_models import tiny_conditioning, tiny_sd15_model

LOADER = "DirectDistillLoadStudent"
WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "student_4step.json"
NFES, DEFAULT_NFE, GUIDANCE = (2, 3, 4), 4, 1.5
SD_NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


@pytest.fixture(scope="module")
def dd(comfy_loaded):
    """direct_distill's modules, from the very copy ComfyUI loaded."""
    return lambda name: importlib.import_module(f"{comfy_loaded.__name__}.{name}")


def write_tiny_student(dd, folder, name, **kw):
    """(bare diffusers twin of the tiny ComfyUI model, path of a student for it in ``folder``, info), written by
    the training module's one LoRA writer (``kw``: more of its arguments)."""
    lora = dd("training.lora")
    unet = diffusers_twin_of_tiny_sd15()
    trained = copy.deepcopy(unet)
    adapters = lora.add_lora(trained, dd("training.config").LoraSpec(rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    grid = dd("schedulers.grids").trailing_timesteps
    path = lora.write_student(folder / name, trained, scheduler_config=SD_NOISE, method="sfd",
                              teacher="tests/tiny-sd15", nfe_timesteps={n: grid(n) for n in NFES},
                              default_nfe=DEFAULT_NFE, comfy_sampler="euler", guidance=GUIDANCE, **kw)
    return unet, path, dd("models.student_file").read_student(path)[1]


@pytest.fixture(scope="module")
def student(dd, tmp_path_factory):
    """A student in a registered loras folder (see write_tiny_student)."""
    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return write_tiny_student(dd, folder, "tiny_student.safetensors")


def load(model, nfe=0, strength=1.0, name="tiny_student.safetensors"):
    """(MODEL, SIGMAS, SAMPLER, cfg) of the loader; its CLIP output passes the unconnected input through."""
    *outputs, clip = run_node(LOADER, model=model, student_name=name, nfe=nfe, strength=strength)
    assert clip is None
    return outputs


def test_node_is_registered_with_a_description_and_tooltips(comfy_loaded, student):
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[LOADER] == "Load Distilled Student"
    info = nodes.NODE_CLASS_MAPPINGS[LOADER].GET_NODE_INFO_V1()
    assert info["description"] and all(opts.get("tooltip") for _, opts in info["input"]["required"].values())
    assert info["output"] == ["MODEL", "SIGMAS", "SAMPLER", "FLOAT", "CLIP"] and info["output_name"][3] == "cfg"
    assert all(opts.get("tooltip") for _, opts in info["input"]["optional"].values())
    options = nodes.NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]["student_name"]
    assert "tiny_student.safetensors" in options[1]["options"]


@pytest.mark.parametrize("nfe, expected", [(0, DEFAULT_NFE), (2, 2), (3, 3)])
def test_loader_gives_the_lora_the_nfes_sigmas_its_sampler_and_cfg(comfy_loaded, student, caplog, nfe, expected):
    _, _, info = student
    model = comfy_model_from(diffusers_twin_of_tiny_sd15())
    with caplog.at_level(logging.WARNING):
        patched, sigmas, sampler, cfg = load(model, nfe)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text
    assert len(patched.patches) == len(info.target_modules) and not model.patches  # a patched clone
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == pytest.approx(info.nfe_schedules[expected]["sigmas"])
    assert sigmas.tolist()[:-1] == pytest.approx(
        [float(model.get_model_object("model_sampling").sigmas[t]) for t in info.nfe_schedules[expected]["timesteps"]])
    assert isinstance(sampler, comfy.samplers.KSAMPLER) and cfg == GUIDANCE
    assert sampler.sampler_function is comfy.samplers.sampler_object("euler").sampler_function
    unpatched, *_ = load(model, nfe, strength=0.0)
    assert unpatched is model


def test_an_nfe_the_student_was_not_trained_for_is_refused_with_the_list(comfy_loaded, student):
    with pytest.raises(ValueError, match=r"tiny_student.safetensors: trained for nfe 2, 3, 4 \(default 4\), not 5"):
        load(comfy_model_from(diffusers_twin_of_tiny_sd15()), 5)


def test_a_model_of_another_parameterisation_is_refused(comfy_loaded, student):
    with pytest.raises(ValueError, match="distilled from a model predicting epsilon, this MODEL predicts v_prediction: "
                                         "another model, or a ModelSamplingDiscrete node or a student read as "
                                         "v_prediction upstream"):
        load(tiny_sd15_model(model_type=comfy.model_base.ModelType.V_PREDICTION))


@pytest.mark.parametrize("kind, named", [("EDM", "ModelSamplingContinuousEDM with EDM prediction"),
                                         ("FLOW", "ModelSamplingDiscreteFlow with CONST prediction")])
def test_a_model_that_is_not_discrete_vp_is_refused_by_its_kind(comfy_loaded, student, kind, named):
    # ComfyUI names every generated sampling class ModelSampling: the message names what it is made of
    with pytest.raises(ValueError, match=f"a student samples a discrete VP model .*; this model samples with {named}$"):
        load(tiny_sd15_model(model_type=getattr(comfy.model_base.ModelType, kind)))


def test_the_right_checkpoint_behind_a_model_sampling_node_is_told_so(comfy_loaded, builtin_nodes, student):
    # ModelSamplingDiscrete set to lcm keeps 50 of the 1000 sigmas: the node, not the checkpoint, is named
    (lcm,) = run_node("ModelSamplingDiscrete", model=comfy_model_from(diffusers_twin_of_tiny_sd15()),
                      sampling="lcm", zsnr=False)
    with pytest.raises(ValueError, match="noise table has 50 steps, not the 1000 of the checkpoint \\(a "
                                         "ModelSamplingDiscrete node set to lcm\\?\\)"):
        load(lcm)


def test_a_malformed_file_is_named(comfy_loaded, student):
    _, path, _ = student
    (path.parent / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file") as err:
        load(comfy_model_from(diffusers_twin_of_tiny_sd15()), name="broken.safetensors")
    assert type(err.value).__name__ == "FileFormatError"


@pytest.mark.parametrize("nfe, predicts", [(2, None), (4, None), (2, "v_prediction"), (3, "sample")])
def test_sampler_custom_advanced_with_the_outputs_equals_load_student_in_diffusers(comfy_loaded, dd, student, nfe,
                                                                                    predicts):
    # predicts: a student reading its output as another prediction than its epsilon teacher's
    unet, path, info = student if predicts is None else write_tiny_student(
        dd, student[1].parent, f"tiny_student_{predicts}.safetensors", prediction_type=predicts)
    assert (info.prediction_type, info.teacher_prediction_type) == (predicts or "epsilon", "epsilon")
    model = comfy_model_from(unet)
    patched, sigmas, sampler, cfg = load(model, nfe, name=path.name)
    if predicts:  # the patched clone reads the output so; the model itself is left as it was
        with pytest.raises(ValueError, match=f"read as {predicts} where its model predicts epsilon: at strength 0.7"):
            load(model, nfe, strength=0.7, name=path.name)  # part epsilon, part v or x0
        assert load(model, nfe, strength=0.0, name=path.name)[0] is model  # the model alone, read as it predicts
        assert isinstance(patched.get_model_object("model_sampling"), {
            "v_prediction": comfy.model_sampling.V_PREDICTION, "sample": comfy.model_sampling.X0}[predicts])
        torch.testing.assert_close(patched.get_model_object("model_sampling").sigmas,
                                   model.get_model_object("model_sampling").sigmas, rtol=0, atol=0)
        assert not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    positive, negative = tiny_conditioning(0), tiny_conditioning(1)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    noise = custom_sampler.Noise_RandomNoise(3)
    comfy_latent, _ = custom_sampler.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
                                   scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                           beta_schedule="scaled_linear", skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    info = dd("pipelines").load_student(pipe, path)
    # ComfyUI scales the first latent by sqrt(1 + sigma_max^2): the VP latent is the unit noise itself.
    diffusers_latent = pipe(prompt_embeds=positive[0][0], negative_prompt_embeds=negative[0][0],
                            num_inference_steps=nfe, guidance_scale=info.guidance,
                            latents=noise.generate_noise(latent), output_type="latent").images
    torch.testing.assert_close(comfy_latent["samples"] * SD15_LATENT_SCALE, diffusers_latent, atol=1e-4, rtol=1e-4)


def test_student_4step_workflow_is_valid_and_runs_the_students_4_steps(
        comfy_loaded, builtin_nodes, student):  # noqa: F811
    unet, path, _ = student
    workflow = json.loads(WORKFLOW.read_text())
    (loader,) = [node for node in workflow["nodes"] if node["type"] == LOADER]
    name = loader["widgets_values"][0]
    (path.parent / name).write_bytes(path.read_bytes())  # the file the workflow names, in the loras folder
    unknown = {node["type"] for node in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) - FRONTEND_ONLY
    assert not unknown, f"node types ComfyUI does not know: {unknown}"
    check_links(workflow)
    for node in workflow["nodes"]:
        if node["type"] not in FRONTEND_ONLY:
            widget_values(node)
    assert widget_values(loader) == {"student_name": name, "nfe": 4, "strength": 1.0, "preset": "from file"}

    (guider,) = [node for node in workflow["nodes"] if node["type"] == "CFGGuider"]
    guider["widgets_values"] = [1.0]  # were this used rather than the student's linked cfg, no uncond pass would run
    model, calls = comfy_model_from(unet), []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        (image,) = run_workflow(workflow, model, latent_size=16).values()
    finally:
        hook.remove()
    # four steps, each a cond + uncond pair: the student's cfg 1.5 reached the guider through the link
    assert sum(calls) == 8 and image.shape == (1, 4, 16, 16) and bool(torch.isfinite(image).all())
