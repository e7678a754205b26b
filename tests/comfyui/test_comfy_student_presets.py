"""Few-step LoRAs published by others, in a real ComfyUI: Load Distilled Student with a preset places every tensor
of every layout on SD1.5- and SDXL-shaped models (where ComfyUI's stock loader drops some), with the effect
load_student has in diffusers; hands out each preset's published sigmas, sampler and cfg; runs TCD through
SamplerCustomAdvanced; refuses a LoRA of another family in one error; and the drag-in workflow runs. Also our own
student of an SDXL teacher, and LoRAs in the original UNet's names, read as ComfyUI's own loader reads them."""

import copy
import functools
import importlib
import json
import logging
import types
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.utils
import comfy_extras.nodes_custom_sampler as custom_sampler
import folder_paths
import nodes
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from lora_releases import (LAYOUTS, PUBLISHED, SD_SCHEDULER, SGM_LAYOUT, TEXT_ENCODER_TARGETS, TINY_SD15_UNET,
                           TINY_SDXL_UNET, effective_alpha, published_timesteps, random_layers, target_modules, unet,
                           write_release)

from .test_comfy_shortcut import builtin_nodes  # noqa: F401 (a fixture)
from .test_comfy_shortcut import FRONTEND_ONLY, check_links, run_node, run_workflow, widget_values
from .test_comfy_student_lora import comfy_model_from
from .tiny_models import TINY_UNET_CONFIG, TinySD15, tiny_conditioning, tiny_sd15_model

LOADER = "DirectDistillLoadStudent"
WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "tcd_sd15_lora.json"

# lora_releases' toy UNets in ComfyUI's terms: SD1.5's tree (four levels, two res blocks each, attention on the
# first three) and SDXL's (three levels, transformer depths 0, 2, 10, linear projections, the added embedding).
SD15_TREE = {**TINY_UNET_CONFIG, "image_size": 8, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "num_heads": 2}
SDXL_TREE = {**TINY_UNET_CONFIG, "image_size": 8, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 64, "num_heads": -1,
             "num_head_channels": 32, "use_linear_in_transformer": True, "adm_in_channels": 80,
             "num_classes": "sequential"}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 2, "vocab_size": 49408}


class SD15Tree(TinySD15):
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}


class SDXLTree(TinySD15):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}


@pytest.fixture(scope="module")
def dd(comfy_loaded):
    """direct_distill's modules, from the very copy ComfyUI loaded."""
    return lambda name: importlib.import_module(f"{comfy_loaded.__name__}.{name}")


@pytest.fixture(scope="module")
def loras(comfy_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


@pytest.fixture(scope="module")
def sd15():
    """(diffusers UNet with SD1.5's tree, the same weights as a ComfyUI MODEL)."""
    model = unet(TINY_SD15_UNET)
    return model, comfy_model_from(model, SD15Tree(dict(SD15_TREE)))


@pytest.fixture(scope="module")
def sdxl():
    model = unet(TINY_SDXL_UNET)
    return model, comfy_model_from(model, SDXLTree(dict(SDXL_TREE)))


def test_an_sdxl_model_has_the_shape_fingerprint_of_its_diffusers_twin(dd, sd15, sdxl):
    """ComfyUI's table names SDXL's label embedding as class_embedding too: the ComfyUI side had 4 names more, and
    every SDXL shortcut was refused on its own teacher."""
    identity, files = dd("nodes.model_identity"), dd("models.student_file")
    for model, comfy_model in (sd15, sdxl):
        assert identity.unet_parameter_shapes(comfy_model) == files.unet_parameter_shapes(model)
        assert identity.unet_shape_fingerprint(comfy_model) == files.shape_fingerprint(
            files.unet_parameter_shapes(model))


def tiny_clip():
    """An SD1.x CLIP of two layers of width 32: the text encoder the diffusers side's tiny pipelines have."""
    clip_l = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP)
    target = types.SimpleNamespace(params={}, tokenizer=comfy.sd1_clip.SD1Tokenizer,
                                   clip=functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_l))
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # comfy's layers skip initialisation (checkpoints overwrite them)
        for parameter in clip.cond_stage_model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return clip


def load(model, name, preset="from file", nfe=0, strength=1.0, clip=None):
    return run_node(LOADER, model=model, student_name=name, nfe=nfe, strength=strength, preset=preset, clip=clip)


def diffusers_pipeline(model):
    cls = StableDiffusionXLPipeline if model.config.addition_embed_type else StableDiffusionPipeline
    extra = {} if cls is StableDiffusionXLPipeline else dict(safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False)
    components = dict(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(model),
                      scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True), **extra)
    if cls is StableDiffusionXLPipeline:
        components.update(text_encoder_2=None, tokenizer_2=None)
    return cls(**components)


@torch.no_grad()
def unet_outputs(model, patched):
    """(diffusers UNet output, ComfyUI's patched UNet output) on the same inputs (SDXL's added embedding as y)."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 321])
    c = torch.randn(2, 7, model.config.cross_attention_dim, generator=g)
    kwargs, comfy_kwargs = {}, {}
    if model.config.addition_embed_type:
        text_embeds, time_ids = torch.randn(2, 32, generator=g), torch.randn(2, 6, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        comfy_kwargs["y"] = torch.cat([text_embeds, model.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    comfy.model_management.load_models_gpu([patched])  # applies the LoRA patches to the weights
    try:
        comfy_out = patched.model.diffusion_model(x, timesteps=t, context=c, **comfy_kwargs)
    finally:
        patched.unpatch_model()
    return model(x, t, c, **kwargs).sample, comfy_out


def record_timesteps(calls):
    """A forward pre-hook for ComfyUI's UNet that appends each call's timesteps to ``calls``."""
    def hook(module, args, kwargs):
        calls.append((args[1] if len(args) > 1 else kwargs["timesteps"]).tolist())
    return hook


def no_lora_warnings(caplog):
    return not [r for r in caplog.records if "lora" in r.getMessage().lower()]


@pytest.mark.parametrize("layout", [*LAYOUTS, SGM_LAYOUT])
def test_every_layout_is_placed_whole_with_the_effect_load_student_has(dd, loras, sd15, caplog, layout):
    model, comfy_model = sd15
    layers = random_layers(target_modules(model))
    write_release(loras / f"sd15_{layout}.safetensors", layers, layout)
    with caplog.at_level(logging.WARNING):
        patched, *_ = load(comfy_model, f"sd15_{layout}.safetensors", preset="hyper-sd15-8step")
    assert no_lora_warnings(caplog), caplog.text
    assert len(patched.patches) == len(layers) and not comfy_model.patches

    pipe = diffusers_pipeline(model)
    dd("pipelines").load_student(pipe, loras / f"sd15_{layout}.safetensors", preset="hyper-sd15-8step")
    diffusers_out, comfy_out = unet_outputs(pipe.unet, patched)
    assert (diffusers_out - unet_outputs(model, comfy_model)[0]).abs().max() > 1e-2  # the LoRA does something ...
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=0)  # ... the same in both front doors


def test_comfyuis_stock_loader_drops_peft_attention_keys_that_the_student_loader_places(loras, sd15, caplog):
    model, comfy_model = sd15
    path = write_release(loras / "peft_for_stock.safetensors", random_layers(target_modules(model)), "peft")
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(comfy_model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0)
    dropped = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert dropped and all(".attn" in m and ".to_" in m for m in dropped)  # the reason the node rewrites keys


@pytest.mark.parametrize("layout", ["kohya", "peft", SGM_LAYOUT])
def test_an_sdxl_lora_is_placed_whole_with_the_effect_load_student_has(dd, loras, sdxl, caplog, layout):
    model, comfy_model = sdxl
    layers = random_layers(target_modules(model))
    write_release(loras / f"sdxl_{layout}.safetensors", layers, layout)
    with caplog.at_level(logging.WARNING):
        patched, sigmas, sampler, cfg, clip = load(comfy_model, f"sdxl_{layout}.safetensors", preset="dmd2-sdxl-4step")
    assert no_lora_warnings(caplog), caplog.text
    assert len(patched.patches) == len(layers) and clip is None
    pipe = diffusers_pipeline(model)
    dd("pipelines").load_student(pipe, loras / f"sdxl_{layout}.safetensors", preset="dmd2-sdxl-4step")
    diffusers_out, comfy_out = unet_outputs(pipe.unet, patched)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=0)


def test_a_student_distilled_from_an_sdxl_teacher_has_the_effect_load_student_gives_it(dd, loras, sdxl, caplog):
    """Our own SDXL student (a LoRA on every layer the methods adapt), from file: placed whole by Load Distilled
    Student on an SDXL model, with its schedule, and the same UNet output as under diffusers' load_student."""
    from peft import LoraConfig, get_peft_model_state_dict

    model, comfy_model = sdxl
    files, noise = dd("models.student_file"), dd("schedulers.noise")
    trained = copy.deepcopy(model)
    torch.manual_seed(1)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8.0, init_lora_weights=False,
                                   target_modules=list(dd("training.config").DEFAULT_TARGET_MODULES)))
    schedules = dd("schedulers.grids").student_schedules({4: [999, 749, 499, 249]},
                                                         noise.alphas_cumprod_from_config(SD_SCHEDULER))
    info = files.StudentInfo(method="sfd", teacher="tests/tiny-sdxl",
                             teacher_unet_fingerprint=files.unet_fingerprint(model),
                             teacher_unet_config=files.unet_architecture(model), prediction_type="epsilon",
                             nfe_schedules=schedules, default_nfe=4, comfy_sampler="euler", guidance=1.0)
    lora = get_peft_model_state_dict(trained)
    files.save_student(loras / "sdxl_student.safetensors", lora, rank=4, alpha=8.0, metadata=info)
    with caplog.at_level(logging.WARNING):
        patched, sigmas, sampler, cfg, clip = load(comfy_model, "sdxl_student.safetensors")
    assert no_lora_warnings(caplog), caplog.text
    assert len(patched.patches) == len(lora) // 2 and cfg == 1.0
    torch.testing.assert_close(sigmas.double(), torch.tensor(schedules[4]["sigmas"], dtype=torch.float64))
    pipe = diffusers_pipeline(model)
    dd("pipelines").load_student(pipe, loras / "sdxl_student.safetensors")
    diffusers_out, comfy_out = unet_outputs(pipe.unet, patched)
    assert (diffusers_out - unet_outputs(model, comfy_model)[0]).abs().max() > 1e-2
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tree, preset", [("sd15", "hyper-sd15-8step"), ("sdxl", "dmd2-sdxl-4step")])
def test_a_lora_in_the_original_unets_names_does_what_comfyuis_own_loader_makes_of_it(loras, sd15, sdxl, caplog, tree,
                                                                                       preset):
    """ComfyUI reads kohya names in the LDM/SGM UNet's spelling (input_blocks_4_1_...) natively: the student loader
    places such a file on the same weights with the same effect."""
    model, comfy_model = sd15 if tree == "sd15" else sdxl
    layers = random_layers(target_modules(model))
    path = write_release(loras / f"{tree}_sgm_stock.safetensors", layers, SGM_LAYOUT)
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(comfy_model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0)
        ours, *_ = load(comfy_model, path.name, preset=preset)
    assert no_lora_warnings(caplog), caplog.text
    assert set(ours.patches) == set(stock.patches) and len(stock.patches) == len(layers)
    stock_out, ours_out = unet_outputs(model, stock)[1], unet_outputs(model, ours)[1]
    assert (stock_out - unet_outputs(model, comfy_model)[1]).abs().max() > 1e-2
    torch.testing.assert_close(ours_out, stock_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_text_encoder_layers_reach_the_clip_with_their_alpha(loras, sd15, layout):
    model, comfy_model = sd15
    clip = tiny_clip()
    te_modules = {k.removeprefix("clip_l.transformer.")[:-len(".weight")]: tuple(v.shape)
                  for k, v in clip.cond_stage_model.state_dict().items()
                  if k.endswith(".weight") and v.ndim == 2 and any(f".{t}." in k for t in TEXT_ENCODER_TARGETS)}
    te_layers = random_layers(te_modules, seed=4)
    name = f"te_{layout}.safetensors"
    write_release(loras / name, random_layers(target_modules(model)), layout, te_layers=te_layers)
    with pytest.raises(ValueError, match=f"{name}: this LoRA also changes the text encoder \\({len(te_layers)} "
                                         "layers\\): connect the checkpoint's CLIP"):
        load(comfy_model, name, preset="lcm-sd15")
    alone, sigmas, *_ = load(comfy_model, name, preset="lcm-sd15", strength=0)  # 0 is the model alone: no CLIP needed
    assert not alone.patches and len(sigmas) == 5

    _, _, _, _, patched_clip = load(comfy_model, name, preset="lcm-sd15", clip=clip, strength=0.5)
    original = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    comfy.model_management.load_models_gpu([patched_clip.patcher], force_full_load=True)  # applies the patches
    try:
        state = patched_clip.cond_stage_model.state_dict()
        for module, (down, up, alpha) in te_layers.items():
            key = f"clip_l.transformer.{module}.weight"
            expected = 0.5 * effective_alpha(layout, alpha, down.shape[0]) / down.shape[0] * (up @ down)
            torch.testing.assert_close(state[key] - original[key], expected, atol=1e-6, rtol=0)
    finally:
        patched_clip.patcher.unpatch_model()


def test_a_second_few_step_lora_on_a_model_that_has_one_is_refused(loras, sd15):
    """Two Load Distilled Student nodes in a row stacked both LoRAs: LCM under TCD's schedule, or an epsilon LoRA's
    change read as x0 by a student. diffusers' load_student switches the earlier one off; here the MODEL is the
    user's wiring, so it is refused, also through a style LoRA in between."""
    model, comfy_model = sd15
    write_release(loras / "stacked_lcm.safetensors", random_layers(target_modules(model)), "kohya")
    write_release(loras / "stacked_style.safetensors", random_layers(target_modules(model), seed=3), "kohya")
    lcm, *_ = load(comfy_model, "stacked_lcm.safetensors", preset="lcm-sd15")
    style = comfy.utils.load_torch_file(str(loras / "stacked_style.safetensors"))
    styled, _ = comfy.sd.load_lora_for_models(lcm, None, style, 0.5, 0)
    for upstream in (lcm, styled):
        with pytest.raises(ValueError, match="stacked_lcm.safetensors: this MODEL already carries the few-step LoRA "
                                             "stacked_lcm.safetensors \\(a Load Distilled Student upstream\\)"):
            load(upstream, "stacked_lcm.safetensors", preset="tcd-sd15")
    assert "direct_distill_few_step_lora" not in comfy_model.model_options  # the checkpoint's MODEL is untouched
    alone, *_ = load(comfy_model, "stacked_lcm.safetensors", preset="lcm-sd15", strength=0)  # 0: the model alone
    load(alone, "stacked_lcm.safetensors", preset="tcd-sd15")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_gives_the_published_sigmas_sampler_and_cfg(loras, sd15, sdxl, name):
    recipe = PUBLISHED[name]
    family = "sdxl" if "sdxl" in name else "sd15"
    model, comfy_model = sdxl if family == "sdxl" else sd15
    file = loras / f"{family}_release.safetensors"
    if not file.exists():
        write_release(file, random_layers(target_modules(model)), "kohya")
    patched, sigmas, sampler, cfg, _ = load(comfy_model, file.name, preset=name)
    table = comfy_model.get_model_object("model_sampling").sigmas
    expected = published_timesteps(name, recipe["steps"])
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == pytest.approx(table[expected].tolist() + [0.0])
    assert cfg == 1.0 if recipe["guidance"] == (0.0,) else recipe["guidance"][0] <= cfg <= recipe["guidance"][-1]
    if recipe["sampler"] == "tcd":
        assert isinstance(sampler, comfy.samplers.KSAMPLER) and sampler.extra_options["gamma"] == recipe["eta"]
    else:
        assert sampler.sampler_function is comfy.samplers.sampler_object(recipe["sampler"]).sampler_function


def test_a_tcd_preset_samples_through_sampler_custom_advanced(loras, sd15):
    model, comfy_model = sd15
    write_release(loras / "tcd.safetensors", random_layers(target_modules(model)), "kohya",
                  {"direct_distill.preset": "tcd-sd15"})  # as `stamp` writes it: the preset comes from the file
    patched, sigmas, sampler, cfg, _ = load(comfy_model, "tcd.safetensors", nfe=6)
    calls = []
    hook = patched.model.diffusion_model.register_forward_pre_hook(record_timesteps(calls), with_kwargs=True)
    try:
        def run(sampler):
            guider = comfy.samplers.CFGGuider(patched)
            guider.set_conds(tiny_conditioning(0, 7), tiny_conditioning(1, 7))
            guider.set_cfg(cfg)
            return custom_sampler.SamplerCustomAdvanced().sample(
                custom_sampler.Noise_RandomNoise(4), guider, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)})[0]
        first = run(sampler)
        assert [t[0] for t in calls] == published_timesteps("tcd-sd15", 6) and cfg == 1.0
        (standalone,) = run_node("DirectDistillSamplerTCD", gamma=0.3)
        torch.testing.assert_close(run(standalone)["samples"], first["samples"])  # same seed, same noise draws
    finally:
        hook.remove()
    assert bool(torch.isfinite(first["samples"]).all())


def test_the_tcd_sampler_refuses_a_flow_model(comfy_loaded):
    """Its re-noising is SD's (x0 + sigma noise): on a flow model (SD3, Flux) it kept the data term unscaled."""
    model = tiny_sd15_model(model_type=comfy.model_base.ModelType.FLOW)
    (tcd,) = run_node("DirectDistillSamplerTCD", gamma=0.3)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny_conditioning(0, 7), tiny_conditioning(1, 7))
    guider.set_cfg(1.0)
    with pytest.raises(ValueError, match="TCD Sampler: it re-noises as x0 \\+ sigma \\* noise, which this model "
                                         "does not sample by \\(ModelSamplingDiscreteFlow with CONST prediction\\)"):
        custom_sampler.SamplerCustomAdvanced().sample(custom_sampler.Noise_RandomNoise(4), guider, tcd,
                                                      torch.tensor([1.0, 0.5, 0.0]),
                                                      {"samples": torch.zeros(1, 4, 8, 8)})


def test_a_preset_on_a_zero_terminal_snr_table_is_refused(builtin_nodes, loras, sd15):  # noqa: F811
    """A ModelSamplingDiscrete node with zsnr rescales the table (first sigma 4518): the preset's timesteps were made
    on SD's, and an epsilon model cannot start from there."""
    model, comfy_model = sd15
    write_release(loras / "zsnr_preset.safetensors", random_layers(target_modules(model)), "kohya")
    (zsnr,) = run_node("ModelSamplingDiscrete", model=comfy_model, sampling="eps", zsnr=True)
    with pytest.raises(ValueError, match="zsnr_preset.safetensors: this model's noise table is rescaled to zero "
                                         "terminal SNR \\(first sigma 4519\\): preset hyper-sd15-2step"):
        load(zsnr, "zsnr_preset.safetensors", preset="hyper-sd15-2step")


def test_an_sdxl_lora_on_sd15_is_one_clear_error_before_patching(loras, sd15, sdxl, caplog):
    model, _ = sdxl
    write_release(loras / "xl_on_sd15.safetensors", random_layers(target_modules(model)), "kohya")
    _, comfy_model = sd15
    before = dict(comfy_model.patches)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        load(comfy_model, "xl_on_sd15.safetensors", preset="lcm-sd15")
    assert str(err.value) == ("xl_on_sd15.safetensors: this LoRA was made for SDXL (the layers it changes), this model "
                              "is SD1.x-style")
    with pytest.raises(ValueError, match="preset dmd2-sdxl-4step is for SDXL models, this model is SD1.x-style; its "
                                         "presets: lcm-sd15, "):
        load(comfy_model, "xl_on_sd15.safetensors", preset="dmd2-sdxl-4step")
    with pytest.raises(ValueError, match="not stamped with a few-step preset; choose its preset, one of the SD1.x "
                                         "presets: lcm-sd15, tcd-sd15, "):
        load(comfy_model, "xl_on_sd15.safetensors")
    assert no_lora_warnings(caplog) and comfy_model.patches == before


def test_the_tcd_workflow_is_valid_and_runs_the_loras_steps(comfy_loaded, builtin_nodes, loras, sd15):  # noqa: F811
    model, comfy_model = sd15
    workflow = json.loads(WORKFLOW.read_text())
    (loader,) = [node for node in workflow["nodes"] if node["type"] == LOADER]
    write_release(loras / loader["widgets_values"][0], random_layers(target_modules(model)), "peft")
    values = widget_values(loader)
    unknown = {node["type"] for node in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) - FRONTEND_ONLY
    assert not unknown, f"node types ComfyUI does not know: {unknown}"
    check_links(workflow)
    for node in workflow["nodes"]:
        if node["type"] not in FRONTEND_ONLY:
            widget_values(node)
    assert values == {"student_name": "TCD-SD15-LoRA.safetensors", "nfe": 0, "strength": 1.0, "preset": "tcd-sd15"}
    calls = []
    hook = comfy_model.model.diffusion_model.register_forward_pre_hook(record_timesteps(calls), with_kwargs=True)
    try:
        (image,) = run_workflow(workflow, comfy_model, latent_size=8).values()
    finally:
        hook.remove()
    # four TCD steps at LCM's timesteps, without an unconditional pass (cfg 1 reached the guider by its link)
    assert calls == [[999], [759], [499], [259]] and image.shape == (1, 4, 8, 8) and bool(torch.isfinite(image).all())
