"""Few-step LoRAs published by others, in diffusers: every layout they ship in applied fully with the effect of
adding (alpha / rank) up @ down to each weight, each preset sampling as its source prescribes (the recipe written
out here from the model cards, not read from the preset table), the refusals, and the stamp command."""

import copy
import inspect
import json

import pytest
import torch
from conftest import _tiny_text_encoder, _tiny_vae
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, TCDScheduler)
from lora_releases import (LAYOUTS, PUBLISHED, REAL_SD15_UNET, REAL_SDXL_UNET, SD_SCHEDULER, SGM_LAYOUT,
                           TEXT_ENCODER_TARGETS, TINY_SD15_UNET, TINY_SDXL_UNET, merged, meta_unet, published_timesteps,
                           random_layers, target_modules, unet, write_release)

from direct_distill.__main__ import main as cli
from direct_distill.models.io import FileFormatError, read_safetensors
from direct_distill.models.lora_layouts import LoraLayoutError, parse_lora, resolve_layers, sgm_names
from direct_distill.models.stamp import stamp
from direct_distill.pipelines import load_student
from direct_distill.schedulers.few_step_presets import PRESETS, presets_for
from direct_distill.schedulers import ExpKarrasScheduler, student_schedules
from direct_distill.schedulers.scheduling_presets import preset_scheduler
from direct_distill.schedulers.scheduling_student import StudentScheduler

def test_the_table_has_every_published_preset():
    assert set(PRESETS) == set(PUBLISHED)
    assert {p.name for p in presets_for("sd15")} | {p.name for p in presets_for("sdxl")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_samples_as_its_source_prescribes(name):
    recipe, preset = PUBLISHED[name], PRESETS[name]
    cls, config = recipe["scheduler"]
    scheduler = preset_scheduler(preset, PNDMScheduler(**SD_SCHEDULER).config, pipeline_default_steps=50)
    assert isinstance(scheduler, cls) and all(scheduler.config[k] == v for k, v in config.items())
    scheduler.set_timesteps(50)  # what a pipeline asks when its caller names no step count
    assert scheduler.timesteps.tolist() == published_timesteps(name, recipe["steps"]) == preset.timesteps()
    lo, hi = recipe.get("range", (recipe["steps"],) * 2)
    for n in (lo, (lo + hi) // 2, min(hi, 49)):  # 50 reads as the pipeline's default
        scheduler.set_timesteps(n)
        assert scheduler.timesteps.tolist() == published_timesteps(name, n) == preset.timesteps(n)
    with pytest.raises(ValueError, match=f"preset {name} samples with num_inference_steps"):
        scheduler.set_timesteps(hi + 1 if hi + 1 != 50 else 51)
    guidance = recipe["guidance"]
    assert preset.guidance == 1.0 if guidance == (0.0,) else guidance[0] <= preset.guidance <= guidance[-1]
    assert preset.sampler == recipe["sampler"] and preset.gamma == recipe.get("eta", 0.0)


def test_a_preset_scheduler_drops_the_sigma_flags_of_the_scheduler_it_replaces():
    # a pipeline switched to DPM++ 2M Karras, then an SDXL-Lightning LoRA: trailing Euler, not Karras sigmas
    config = DPMSolverMultistepScheduler(**SD_SCHEDULER, use_karras_sigmas=True, final_sigmas_type="sigma_min").config
    for name in ("sdxl-lightning-4step", "sdxl-lightning-8step"):
        scheduler = preset_scheduler(PRESETS[name], config, pipeline_default_steps=50)
        scheduler.set_timesteps(50)
        assert scheduler.timesteps.tolist() == published_timesteps(name, PUBLISHED[name]["steps"])
        assert not scheduler.config.use_karras_sigmas and float(scheduler.sigmas[-1]) == 0.0


@pytest.mark.parametrize("name, argument", [("lcm-sd15", "timesteps"), ("tcd-sd15", "timesteps"),
                                            ("sdxl-lightning-4step", "sigmas"), ("sdxl-lightning-4step", "timesteps")])
def test_a_preset_scheduler_takes_the_custom_schedules_its_diffusers_class_takes(tiny_tokenizer, name, argument):
    pipe = sd15_tree_pipeline(tiny_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = preset_scheduler(PRESETS[name], pipe.scheduler.config, pipeline_default_steps=50)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(round(float(args[1]))))
    schedule = {"timesteps": [999, 500], "sigmas": [14.6, 1.0, 0.0]}[argument]  # Euler's sigmas end in 0
    pipe("a fox", guidance_scale=1.0, output_type="latent", **{argument: schedule})
    assert calls == ([999, 500] if argument == "timesteps" else [999, 354])
    ddim = preset_scheduler(PRESETS["hyper-sd15-8step"], pipe.scheduler.config)
    assert "timesteps" not in inspect.signature(ddim.set_timesteps).parameters  # DDIM takes none: diffusers says so


STUDENT_SCHEDULES = {"1": student_schedules({1: [999]}, PNDMScheduler(**SD_SCHEDULER).alphas_cumprod)[1]}


def test_a_pipeline_saved_with_a_preset_loads_again_pinned_to_it(tiny_tokenizer, tmp_path):
    pipe = sd15_tree_pipeline(tiny_tokenizer)
    pipe.scheduler = preset_scheduler(PRESETS["lcm-sd15"], pipe.scheduler.config, pipeline_default_steps=50)
    pipe.save_pretrained(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert type(again.scheduler) is type(pipe.scheduler) and again.scheduler.preset == PRESETS["lcm-sd15"]
    again.scheduler.set_timesteps(50)  # the pipeline's default reads as the preset's
    assert again.scheduler.timesteps.tolist() == published_timesteps("lcm-sd15", PRESETS["lcm-sd15"].default_nfe)
    for cls in (ExpKarrasScheduler, StudentScheduler):  # switching away drops the pin without a word
        assert "preset" not in cls.from_config(again.scheduler.config, **(
            {} if cls is ExpKarrasScheduler else dict(nfe_schedules=STUDENT_SCHEDULES, default_nfe=1))).config


def test_the_way_back_from_a_preset_builds_the_scheduler_it_replaced(tiny_tokenizer, tmp_path, caplog):
    """ExpKarrasScheduler.from_config of a preset's scheduler config gives back the user's scheduler, its curvature
    and solver included, also after a student of ours loaded over the preset and from a saved pipeline (before: the
    class defaults, p 1.0 and solver_order 2)."""
    pipe = sd15_tree_pipeline(tiny_tokenizer)
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config, exp_karras_p=2.5, solver_order=3)
    before = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = preset_scheduler(PRESETS["tcd-sd15"], pipe.scheduler.config, pipeline_default_steps=50)
    pipe.save_pretrained(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    student = StudentScheduler.from_config(pipe.scheduler.config, nfe_schedules=STUDENT_SCHEDULES, default_nfe=1)
    lcm_over_student = preset_scheduler(PRESETS["lcm-sd15"], student.config, pipeline_default_steps=50)
    for config in (pipe.scheduler.config, again.scheduler.config, student.config, lcm_over_student.config):
        back = ExpKarrasScheduler.from_config(config)
        assert {k: v for k, v in back.config.items() if not k.startswith("_")} == before
    assert "not expected" not in caplog.text  # the student takes what it uses of TCD's config without a word
    assert pipe.scheduler.config.model_scheduler["exp_karras_p"] == 2.5


# --- every layout, fully applied, with the merged effect ------------------------------------------------------


def sd15_tree_pipeline(tokenizer):
    """A StableDiffusionPipeline whose UNet has SD1.5's module tree (so a LoRA's real key names) at toy width."""
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet(TINY_SD15_UNET),
        scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_tree_pipeline(tokenizer):
    """A StableDiffusionXLPipeline whose UNet has SDXL's module tree (transformer depths 1, 2, 10) at toy width."""
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tokenizer),
        text_encoder_2=_tiny_text_encoder(tokenizer, projection=True), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet(TINY_SDXL_UNET), scheduler=EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading"))


@pytest.fixture(scope="module")
def sd15_pipe(tiny_tokenizer):
    pipe = sd15_tree_pipeline(tiny_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_tokenizer):
    pipe = sdxl_tree_pipeline(tiny_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def release_layers(pipe, seed=1):
    """(unet, text_encoder, text_encoder_2) layers over the releases' modules of each model of ``pipe``."""
    te2 = getattr(pipe, "text_encoder_2", None)
    return (random_layers(target_modules(pipe.unet), seed=seed),
            random_layers(target_modules(pipe.text_encoder, TEXT_ENCODER_TARGETS), seed=seed + 1),
            random_layers(target_modules(te2, TEXT_ENCODER_TARGETS), seed=seed + 2) if te2 is not None else None)


def unet_inputs(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    dim = pipe.unet.config.cross_attention_dim
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 321]), torch.randn(2, 7, dim, generator=g))
    kwargs = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return args, kwargs


@torch.no_grad()
def assert_applied_as_merged(pipe, loaded, layers, layout):
    """Every layer is an adapter layer of ``loaded`` and its outputs are those of the merged reference models."""
    unet_layers, te_layers, te2_layers = layers
    for component, component_layers in (("unet", unet_layers), ("text_encoder", te_layers),
                                        ("text_encoder_2", te2_layers)):
        if component_layers is None:
            continue
        model = getattr(loaded, component)
        wrapped = {n for n, m in model.named_modules() if "student" in (getattr(m, "lora_A", None) or {})}
        assert wrapped == set(component_layers), f"{component}: {len(wrapped)} of {len(component_layers)} applied"
    args, kwargs = unet_inputs(pipe)
    reference = merged(pipe.unet, unet_layers, layout)(*args, **kwargs).sample
    out = loaded.unet(*args, **kwargs).sample
    assert (out - pipe.unet(*args, **kwargs).sample).abs().max() > 1e-2  # the LoRA does something ...
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)  # ... what its weights say
    ids = torch.tensor([[1, 5, 7, 2, 0, 0, 0]])
    te_reference = merged(pipe.text_encoder, te_layers, layout)(ids)[0]
    torch.testing.assert_close(loaded.text_encoder(ids)[0], te_reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_of_an_sd15_lora_applies_every_layer_in_diffusers(sd15_pipe, tmp_path, layout):
    layers = release_layers(sd15_pipe)
    path = write_release(tmp_path / "lora.safetensors", layers[0], layout, te_layers=layers[1])
    pipe = copy.deepcopy(sd15_pipe)
    preset = load_student(pipe, path, preset="lcm-sd15")
    assert preset is PRESETS["lcm-sd15"] and type(pipe.scheduler).__name__ == "PresetLCMScheduler"
    assert_applied_as_merged(sd15_pipe, pipe, layers, layout)


@pytest.mark.parametrize("tree", ["sd15", "sdxl"])
def test_a_kohya_lora_in_the_original_unets_names_applies_as_diffusers_own_loader_reads_it(
        sd15_pipe, sdxl_pipe, tmp_path, tree):
    """kohya's SDXL trainer and its LoRA extraction name UNet layers as the LDM/SGM UNet does (input_blocks_4_1_...).
    The student loaders read such files; for SDXL diffusers' own load_lora_weights reads them too, the same way (its
    SGM mapping does not handle SD1.x's tree; ComfyUI's reading of both is compared in tests/comfyui)."""
    base = sd15_pipe if tree == "sd15" else sdxl_pipe
    layers = release_layers(base)
    te = {"te_layers": layers[1]} if tree == "sd15" else {"te_layers": layers[1], "te2_layers": layers[2]}
    path = write_release(tmp_path / "lora.safetensors", layers[0], SGM_LAYOUT, **te)
    assert any(k.startswith("lora_unet_input_blocks_") for k in read_safetensors(path)[0])
    if tree == "sdxl":
        theirs = copy.deepcopy(base)
        theirs.load_lora_weights(str(path), adapter_name="student")
        assert_applied_as_merged(base, theirs, layers, SGM_LAYOUT)
    ours = copy.deepcopy(base)
    load_student(ours, path, preset=f"lcm-{tree}")
    assert_applied_as_merged(base, ours, layers, SGM_LAYOUT)


def test_the_original_unet_names_of_sd15_and_sdxl():
    """Every Linear / Conv2d layer of the real SD1.5 and SDXL UNets has one SGM name; a few of them as the original
    checkpoints spell them (their keys, less ``model.diffusion_model.`` and ``.weight``)."""
    for config, known in (
            (REAL_SD15_UNET, {"down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
                              "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
                              "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
                              "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
                              "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
                              "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
                              "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2":
                                  "output_blocks.11.1.transformer_blocks.0.ff.net.2",
                              "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection"}),
            (REAL_SDXL_UNET, {"down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
                              "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k":
                                  "input_blocks.4.1.transformer_blocks.1.attn1.to_k",
                              "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
                              "mid_block.attentions.0.transformer_blocks.9.attn2.to_v":
                                  "middle_block.1.transformer_blocks.9.attn2.to_v",
                              "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
                              "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
                              "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"})):
        model = meta_unet(config)
        names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        sgm = sgm_names(names)
        assert set(sgm) == set(names) and len(set(sgm.values())) == len(names)
        assert {k: sgm[k] for k in known} == known


@pytest.mark.parametrize("layout", ["kohya", "peft-metadata-alpha"])
def test_an_sdxl_lora_with_both_text_encoders_applies_every_layer_in_diffusers(sdxl_pipe, tmp_path, layout):
    layers = release_layers(sdxl_pipe)
    path = write_release(tmp_path / "lora.safetensors", layers[0], layout, te_layers=layers[1], te2_layers=layers[2])
    pipe = copy.deepcopy(sdxl_pipe)
    load_student(pipe, path, preset="dmd2-sdxl-4step")
    assert_applied_as_merged(sdxl_pipe, pipe, layers, layout)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    pipe("a shirt", output_type="latent", height=64, width=64, guidance_scale=PRESETS["dmd2-sdxl-4step"].guidance)
    assert calls == [999, 749, 499, 249]  # the pipeline's own 50-step default became the preset's four


def test_scale_and_a_tcd_preset_from_the_stamp_reach_the_pipeline(sd15_pipe, tmp_path):
    layers = release_layers(sd15_pipe)
    # what `stamp` writes (tested on real-width files below; it refuses these toy widths as not SD1.5's)
    path = write_release(tmp_path / "tcd.safetensors", layers[0], "kohya", {"direct_distill.preset": "tcd-sd15"})
    pipe = copy.deepcopy(sd15_pipe)
    preset = load_student(pipe, path, scale=0.5)  # the stamped preset, no preset= needed
    assert preset.name == "tcd-sd15" and isinstance(pipe.scheduler, TCDScheduler)
    args, kwargs = unet_inputs(sd15_pipe)
    with torch.no_grad():
        reference = merged(sd15_pipe.unet, layers[0], "kohya", strength=0.5)(*args, **kwargs).sample
        torch.testing.assert_close(pipe.unet(*args, **kwargs).sample, reference, atol=1e-4, rtol=0)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    pipe("a shirt", output_type="latent", guidance_scale=preset.guidance, eta=preset.gamma)
    assert calls == [999, 759, 499, 259]


def test_a_style_lora_the_user_loaded_stays_on_at_its_weight_beside_the_few_step_lora(sd15_pipe, tmp_path):
    """diffusers' LCM-LoRA + style recipe: the style LoRA loaded first keeps working, at the weight it was set to."""
    style, lcm = release_layers(sd15_pipe, seed=5)[0], release_layers(sd15_pipe, seed=1)[0]
    pipe = copy.deepcopy(sd15_pipe)
    pipe.load_lora_weights(str(write_release(tmp_path / "style.safetensors", style, "kohya")), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    load_student(pipe, write_release(tmp_path / "lcm.safetensors", lcm, "kohya"), preset="lcm-sd15")
    assert pipe.get_active_adapters() == ["style", "student"]
    args, kwargs = unet_inputs(sd15_pipe)
    with torch.no_grad():
        reference = merged(merged(sd15_pipe.unet, style, "kohya", strength=0.7), lcm, "kohya")(*args, **kwargs)
        torch.testing.assert_close(pipe.unet(*args, **kwargs).sample, reference.sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset, last_two", [("lcm-sd15", [499, 259]), ("hyper-sd15-4step", [499, 249])])
def test_image_to_image_with_a_preset_runs_its_steps_or_says_what_to_pass(sd15_pipe, tmp_path, preset, last_two):
    """LCM's scheduler takes diffusers' begin index, DDIM's has none: both stop an img2img run that sliced the
    pipeline's default 50 steps (leaving none of the LoRA's 4), and both run strength's share of 4 asked steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    path = write_release(tmp_path / "lora.safetensors", release_layers(sd15_pipe)[0], "kohya")
    pipe = copy.deepcopy(sd15_pipe)
    load_student(pipe, path, preset=preset)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    timesteps = []
    pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(int(args[1].flatten()[0])))
    with pytest.raises(ValueError, match=f"Pass num_inference_steps \\(one of preset {preset}'s"):
        img2img("a shirt", image=image, strength=0.5, guidance_scale=1.0, output_type="latent")
    img2img("a shirt", image=image, strength=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    assert timesteps == last_two


def test_older_diffusers_spellings_and_per_layer_alphas_are_read():
    down, up = torch.ones(2, 8), torch.ones(8, 2)
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": up,
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": down,
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": up,
    }
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in": 1}})}
    layers = parse_lora(tensors, metadata)
    assert {k: v.alpha for k, v in layers.items()} == {
        ("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj"): 2.0,  # no alpha given: the rank
        ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"): 4.0,
        ("unet", "mid_block_attentions_0_proj_in"): 1.0}
    rank_stabilised = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.use_rslora": True})}
    assert parse_lora(tensors, rank_stabilised)[("unet", "mid_block_attentions_0_proj_in")].alpha == pytest.approx(
        4 * 2 ** 0.5)  # scaled by alpha / sqrt(rank), as peft and diffusers scale it: alpha * sqrt(rank) / rank
    with pytest.raises(LoraLayoutError, match=r"a DoRA adapter \(unet: use_dora"):
        parse_lora(tensors, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.use_dora": True})})
    resolved, problems = resolve_layers(layers, {"unet": {"mid_block.attentions.0.proj_in": (8, 8)}})
    assert list(resolved) == [("unet", "mid_block.attentions.0.proj_in")] and problems == [
        "2 of 3 layers name no layer of this model, e.g. text_encoder text_model_encoder_layers_0_self_attn_q_proj"]


# --- refusals -----------------------------------------------------------------------------------------------


def pipeline_state(pipe):
    return pipe.scheduler, {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def assert_unchanged(pipe, before):
    scheduler, state = before
    after = pipe.unet.state_dict()
    assert pipe.scheduler is scheduler and after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not getattr(pipe.unet, "peft_config", None)


def test_an_sdxl_lora_on_sd15_is_one_clear_error_before_anything_changes(sd15_pipe, sdxl_pipe, tmp_path):
    path = write_release(tmp_path / "xl.safetensors", release_layers(sdxl_pipe)[0], "kohya")
    pipe = copy.deepcopy(sd15_pipe)
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="xl.safetensors: this LoRA was made for SDXL .*, this pipeline's UNet is "
                                         "SD1.x-style"):
        load_student(pipe, path, preset="lcm-sd15")
    with pytest.raises(ValueError, match="preset lcm-sdxl is for SDXL models, this pipeline's UNet is SD1.x-style; "
                                         "its presets: lcm-sd15, tcd-sd15, "):
        load_student(pipe, path, preset="lcm-sdxl")
    assert_unchanged(pipe, before)


def test_a_lora_of_another_width_is_named_before_anything_changes(sd15_pipe, tmp_path):
    wider = unet({**TINY_SD15_UNET, "block_out_channels": (32, 32, 64, 96)})
    path = write_release(tmp_path / "wide.safetensors", random_layers(target_modules(wider)), "kohya")
    pipe = copy.deepcopy(sd15_pipe)
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match=r"wide.safetensors: this LoRA does not fit this pipeline: \d+ of \d+ layers "
                                         r"have other shapes in this model, e.g. unet "):
        load_student(pipe, path, preset="lcm-sd15")
    assert_unchanged(pipe, before)


def test_no_preset_lists_the_presets_of_the_pipelines_family(sd15_pipe, tmp_path):
    path = write_release(tmp_path / "lcm.safetensors", release_layers(sd15_pipe)[0], "kohya")
    pipe = copy.deepcopy(sd15_pipe)
    with pytest.raises(ValueError) as err:
        load_student(pipe, path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a Direct Distill student and not stamped with a few-step preset; pass "
                              "preset=, one of the SD1.x presets: lcm-sd15, tcd-sd15, hyper-sd15-1step, ")
    assert all(p.name in message for p in presets_for("sd15")) and "sdxl" not in message
    with pytest.raises(ValueError, match="'hyper-sd15-3step' is no preset; presets: lcm-sd15, lcm-sdxl, "):
        load_student(pipe, path, preset="hyper-sd15-3step")
    from safetensors.torch import save_file

    tensors, metadata = read_safetensors(path)
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={**metadata, "direct_distill.preset": "x-9"})
    with pytest.raises(ValueError, match=r"'x-9' is no preset; .* \(the preset stamped in the file, by another "
                                         r"version of this package\? pass preset= to choose one\)$"):
        load_student(pipe, tmp_path / "future.safetensors")


@pytest.mark.parametrize("tensors, message", [
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, "unet layer conv_in lacks its up half"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, "is in no LoRA layout this reads"),
    ({"lora_unet_conv_in.dora_scale": torch.zeros(1, 4)}, "is DoRA's magnitude vector, not a plain LoRA"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 2)}, "is a LyCORIS LoHa .* not a plain LoRA"),
    ({"lora_unet_conv_in.lokr_w1": torch.zeros(2, 2)}, "is a LyCORIS LoKr .* not a plain LoRA"),
    ({"diffusion_model.input_blocks.0.0.diff": torch.zeros(4)}, "is a full weight difference"),
])
def test_a_malformed_lora_is_a_file_format_error(sd15_pipe, tmp_path, tensors, message):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileFormatError, match=message):
        load_student(copy.deepcopy(sd15_pipe), tmp_path / "bad.safetensors", preset="lcm-sd15")


def active_adapters(pipe):
    """Every adapter active on some layer of the UNet (diffusers' get_active_adapters reads the first layer only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer) for name in m.active_adapters}


def test_a_few_step_lora_replaces_the_one_loaded_before(sd15_pipe, tmp_path):
    """Two few-step LoRAs at once sample as neither (an x0 student beside an epsilon LoRA, or LCM beside Hyper-SD
    under Hyper-SD's schedule): the one loaded last replaces the earlier, which stays loaded but off, also when it
    was loaded through another pipeline sharing the UNet (img2img from pipe.components). A style LoRA stays on."""
    from peft import get_peft_model_state_dict
    from test_student_file import ALPHA, RANK, add_lora, student_info

    from direct_distill.models.student_file import save_student

    pipe = copy.deepcopy(sd15_pipe)
    style = write_release(tmp_path / "style.safetensors", release_layers(sd15_pipe, seed=7)[0], "kohya")
    pipe.load_lora_weights(str(style), adapter_name="style")
    ours = save_student(tmp_path / "ours.safetensors", get_peft_model_state_dict(add_lora(copy.deepcopy(pipe.unet))),
                        rank=RANK, alpha=ALPHA, metadata=student_info(pipe.unet, prediction_type="sample",
                                                                      teacher_prediction_type="epsilon"))
    load_student(pipe, ours)
    assert pipe.scheduler.config.prediction_type == "sample"
    assert active_adapters(pipe) == {"style", "student"}
    lcm = write_release(tmp_path / "lcm.safetensors", release_layers(sd15_pipe, seed=1)[0], "kohya")
    hyper = write_release(tmp_path / "hyper.safetensors", release_layers(sd15_pipe, seed=2)[0], "kohya")
    # the LCM-LoRA through an img2img pipeline built on the same components: the x0 student goes off, and the
    # LCM scheduler reads the model's own output (epsilon), not the student's
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    load_student(img2img, lcm, preset="lcm-sd15", adapter_name="lcm")
    assert img2img.scheduler.config.prediction_type == "epsilon"
    assert active_adapters(pipe) == {"style", "lcm"} and "student" in pipe.unet.peft_config
    # pipe's own scheduler still reads the output as x0: it refuses, the student being replaced on the shared UNet
    with pytest.raises(ValueError, match="this scheduler samples the few-step LoRA 'student', but lcm replaced it "
                                         "on the UNet"):
        pipe.scheduler.set_timesteps(4)
    # Hyper-SD after LCM: the UNet computes what Hyper-SD alone (beside the style LoRA) computes
    load_student(pipe, hyper, preset="hyper-sd15-8step", adapter_name="hyper")
    assert active_adapters(pipe) == {"style", "hyper"}
    alone = copy.deepcopy(sd15_pipe)
    alone.load_lora_weights(str(style), adapter_name="style")
    load_student(alone, hyper, preset="hyper-sd15-8step", adapter_name="hyper")
    args, kwargs = unet_inputs(sd15_pipe)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*args, **kwargs).sample, alone.unet(*args, **kwargs).sample,
                                   rtol=0, atol=1e-6)
    # and our x0 student again: read as x0 once more, the others off
    pipe.delete_adapters("student")
    load_student(pipe, ours, adapter_name="ours")
    assert pipe.scheduler.config.prediction_type == "sample" and active_adapters(pipe) == {"style", "ours"}
    # the way back to the model: ExpKarras from the student's config reads the model's output, with its own solver
    pipe.delete_adapters("ours")
    back = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    assert (back.config.prediction_type, back.config.solver_order) == ("epsilon", 2)
    assert "nfe_schedules" not in back.config and "teacher_prediction_type" not in back.config


def test_a_scheduler_whose_lora_another_pipeline_replaced_refuses_to_sample(sd15_pipe, tmp_path):
    """An epsilon student's or a preset's scheduler left on a pipeline whose UNet now carries another few-step LoRA
    (loaded through an img2img pipeline on the same components) sampled that LoRA on its own schedule."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = copy.deepcopy(sd15_pipe)
    lcm = write_release(tmp_path / "lcm.safetensors", release_layers(sd15_pipe, seed=1)[0], "kohya")
    hyper = write_release(tmp_path / "hyper.safetensors", release_layers(sd15_pipe, seed=2)[0], "kohya")
    load_student(pipe, lcm, preset="lcm-sd15", adapter_name="lcm")
    pipe.scheduler.set_timesteps(4)
    pipe.disable_lora()  # the model alone on LCM's schedule: a fair experiment, still allowed
    pipe.scheduler.set_timesteps(4)
    pipe.enable_lora()
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    load_student(img2img, hyper, preset="hyper-sd15-2step", adapter_name="hyper")
    with pytest.raises(ValueError, match="samples the few-step LoRA 'lcm', but hyper replaced it on the UNet"):
        pipe.scheduler.set_timesteps(4)
    img2img.scheduler.set_timesteps(2)  # the pipeline that loaded it samples as it should


def test_nothing_loads_onto_a_pipeline_whose_loras_are_disabled(sd15_pipe, tmp_path):
    """diffusers leaves a LoRA loaded after pipe.disable_lora() off on the layers the disabled ones share and on
    on the others: a student applied in part."""
    from peft import get_peft_model_state_dict
    from test_student_file import ALPHA, RANK, add_lora, student_info

    from direct_distill.models.student_file import save_student

    pipe = copy.deepcopy(sd15_pipe)
    ours = save_student(tmp_path / "ours.safetensors", get_peft_model_state_dict(add_lora(copy.deepcopy(pipe.unet))),
                        rank=RANK, alpha=ALPHA, metadata=student_info(pipe.unet))
    lcm = write_release(tmp_path / "lcm.safetensors", release_layers(pipe)[0], "kohya")
    load_student(pipe, lcm, preset="lcm-sd15", adapter_name="style")
    pipe.disable_lora()
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match=r"ours.safetensors: the pipeline's LoRAs are disabled "
                                         r"\(pipe.disable_lora\(\), \d+ layers\): a LoRA loaded now would be "
                                         r"applied on some layers only"):
        load_student(pipe, ours)
    assert pipe.scheduler is scheduler and "student" not in pipe.unet.peft_config
    pipe.enable_lora()
    load_student(pipe, ours)
    assert "student" in pipe.unet.peft_config


def test_a_direct_distill_student_takes_no_preset(tmp_path):
    from test_student_file import RANK, ALPHA, add_lora, student_info
    from peft import get_peft_model_state_dict

    from direct_distill.models.student_file import save_student

    model = unet(TINY_SD15_UNET)
    path = save_student(tmp_path / "ours.safetensors", get_peft_model_state_dict(add_lora(copy.deepcopy(model))),
                        rank=RANK, alpha=ALPHA, metadata=student_info(model))
    with pytest.raises(ValueError, match="ours.safetensors: a Direct Distill student's file says how it samples"):
        load_student(None, path, preset="lcm-sd15")


# --- stamp -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_shaped(tmp_path_factory):
    """Rank-1 LoRAs with the real SD1.5's and SDXL's key names and widths (as the releases', kohya with alpha), and
    the same in the original UNet's names ("sd15-sgm", "sdxl-sgm")."""
    folder = tmp_path_factory.mktemp("real")
    files = {}
    for family, config in (("sd15", REAL_SD15_UNET), ("sdxl", REAL_SDXL_UNET)):
        layers = random_layers(target_modules(meta_unet(config)), rank=1, dtype=torch.float16)
        files[family] = write_release(folder / f"{family}.safetensors", layers, "kohya")
        files[f"{family}-sgm"] = write_release(folder / f"{family}-sgm.safetensors", layers, SGM_LAYOUT)
    return files


def raw_tensors(path):
    """{name: (dtype, shape, the bytes stored)}, read from the file's own header and data section."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    data = blob[8 + size:]
    return {name: (entry["dtype"], tuple(entry["shape"]), data[entry["data_offsets"][0]:entry["data_offsets"][1]])
            for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("spelling", ["", "-sgm"])
def test_stamp_writes_the_preset_and_keeps_every_tensor_byte_for_byte(real_shaped, tmp_path, spelling, capsys):
    source = real_shaped["sdxl" + spelling]
    out = tmp_path / "stamped.safetensors"
    assert cli(["stamp", str(source), "--preset", "sdxl-lightning-4step", "--out", str(out)]) == 0
    assert "stamped with preset sdxl-lightning-4step" in capsys.readouterr().out
    assert raw_tensors(out) == raw_tensors(source)
    before, after = read_safetensors(source)[1], read_safetensors(out)[1]
    assert after == {**before, "direct_distill.preset": "sdxl-lightning-4step"} and before["format"] == "pt"
    assert cli(["stamp", str(out), "--preset", "dmd2-sdxl-4step"]) == 0  # in place, a second stamp replaces the first
    assert read_safetensors(out)[1]["direct_distill.preset"] == "dmd2-sdxl-4step"
    assert raw_tensors(out) == raw_tensors(source) and not list(tmp_path.glob(".*.tmp"))
    # --out replaces its own earlier output (a re-run), never another file
    assert cli(["stamp", str(source), "--preset", "sdxl-lightning-4step", "--out", str(out)]) == 0
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    assert cli(["stamp", str(source), "--preset", "sdxl-lightning-4step", "--out", str(notes)]) == 1
    assert "notes.safetensors exists and is not a stamped LoRA" in capsys.readouterr().err
    assert notes.read_text() == "my notes"


@pytest.mark.parametrize("spelling", ["", "-sgm"])
@pytest.mark.parametrize("family, preset, message", [
    ("sdxl", "hyper-sd15-8step", "its layers are those of sdxl, not sd15"),
    ("sd15", "sdxl-lightning-4step", "its layers are those of sd15, not sdxl"),
])
def test_stamp_refuses_a_lora_of_another_family_and_leaves_the_file(real_shaped, family, preset, message, spelling,
                                                                   capsys):
    family += spelling
    before = real_shaped[family].read_bytes()
    assert cli(["stamp", str(real_shaped[family]), "--preset", preset]) == 1
    assert message in capsys.readouterr().err and real_shaped[family].read_bytes() == before


def test_stamp_takes_an_sd15_lora_in_the_original_unets_names(real_shaped, tmp_path):
    out = stamp(real_shaped["sd15-sgm"], "hyper-sd15-8step", tmp_path / "stamped.safetensors")
    assert read_safetensors(out)[1]["direct_distill.preset"] == "hyper-sd15-8step"


def test_stamp_refuses_an_sd2_lora_for_an_sd15_preset(tmp_path):
    sd2 = {**REAL_SD15_UNET, "cross_attention_dim": 1024}
    path = write_release(tmp_path / "sd2.safetensors",
                         random_layers(target_modules(meta_unet(sd2)), rank=1, dtype=torch.float16), "kohya")
    with pytest.raises(ValueError, match="layers have another width, e.g. unet .*attn2_to_k takes 1024 features, sd15 "
                                         "has 768"):
        stamp(path, "lcm-sd15")


def test_stamp_through_a_link_stamps_its_target_and_says_what_it_cannot_write(real_shaped, tmp_path, capsys):
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(real_shaped["sd15"].read_bytes())
    link = tmp_path / "lcm.safetensors"
    link.symlink_to(blob)  # as the Hugging Face cache and shared model folders keep files
    assert cli(["stamp", str(link), "--preset", "lcm-sd15"]) == 0
    assert link.is_symlink() and read_safetensors(blob)[1]["direct_distill.preset"] == "lcm-sd15"
    capsys.readouterr()
    for out, message in [(tmp_path, f"stamp: {tmp_path}: is a folder; give --out a file name"),
                         (blob / "x.safetensors", "stamp: ")]:
        assert cli(["stamp", str(link), "--preset", "lcm-sd15", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_stamp_list_prints_every_preset_name_first(capsys):
    assert cli(["stamp", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert all("huggingface.co" in line and "arXiv:" in line for line in lines)


def test_stamp_refuses_our_own_files_and_unknown_presets(tmp_path, real_shaped):
    with pytest.raises(ValueError, match="'lcm' is no preset; presets: lcm-sd15"):
        stamp(real_shaped["sd15"], "lcm")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "shortcut.safetensors"),
              metadata={"format": json.dumps("direct_distill.shortcut")})
    with pytest.raises(ValueError, match="a Direct Distill file says how it samples"):
        stamp(tmp_path / "shortcut.safetensors", "lcm-sd15")
