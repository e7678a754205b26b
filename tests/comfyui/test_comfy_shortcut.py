"""The NAFNet shortcut inside a real ComfyUI: the loader, the Shortcut KSampler (equal to ComfyUI's own sampler
plus models/handoff.py, and to the diffusers-side maths), the SAMPLER node under SamplerCustomAdvanced, the
t-band refusal, and the example workflows (structure, widget values, and a run on tiny models)."""

import asyncio
import importlib
import json
import logging
from pathlib import Path

import comfy.sample
import comfy.samplers
import comfy.utils
import comfy_extras.nodes_custom_sampler as custom_sampler
import folder_paths
import latent_preview
import nodes
import pytest
import torch
from comfy_api.latest import io

from .tiny_models import TINY_UNET_CONFIG, tiny_conditioning, tiny_sd15_model

LOADER, KSAMPLER, SAMPLER = "DirectDistillLoadShortcut", "DirectDistillShortcutKSampler", "DirectDistillShortcutSampler"
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
T_BAND = (200.0, 600.0)  # 20 exp_karras steps: K = 6..13 (t = 571..216); 12 steps: K = 7 (t = 255)
STEPS, K, CFG, SEED = 20, 7, 5.0, 3


def dd(comfy_loaded, name):
    """A module of the very copy of the package that ComfyUI loaded."""
    return importlib.import_module(f"{comfy_loaded.__name__}.{name}")


def run_node(node_type, **inputs) -> tuple:
    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    if issubclass(cls, io.ComfyNode):
        return tuple(cls.execute(**inputs).result)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


@pytest.fixture(scope="module")
def twin_unets():
    """The same random tiny SD1.5-shaped UNet twice: as a ComfyUI MODEL and as a diffusers UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_UNET_CONFIG["context_dim"],
            attention_head_dim=TINY_UNET_CONFIG["num_heads"], norm_num_groups=32).eval()  # diffusers: head *count*
    model = tiny_sd15_model()
    state = unet.state_dict()
    to_comfy = comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG)  # diffusers key -> comfy key (a superset)
    model.model.diffusion_model.load_state_dict({to_comfy[key]: value for key, value in state.items()})
    return model, unet


@pytest.fixture(scope="module")
def shortcut_dir(comfy_loaded, twin_unets, tmp_path_factory):
    """A shortcuts folder registered with folder_paths, holding a random lab-preset shortcut of the twin UNets."""
    nafnet, shortcut_file = dd(comfy_loaded, "models.nafnet"), dd(comfy_loaded, "models.shortcut_file")
    student_file = dd(comfy_loaded, "models.student_file")
    fingerprint = student_file.shape_fingerprint(student_file.unet_parameter_shapes(twin_unets[1]))
    stage = lambda name: {**nafnet.PRESETS[name], "in_channels": 4, "out_channels": 4}  # noqa: E731
    model = nafnet.TwoStageShortcut.from_configs(stage("lab_stage1"), stage("lab_stage2"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # random everywhere (NAFNet zero-inits its branch scales)
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("shortcuts")
    shortcut_file.save_shortcut(folder / "tiny_shortcut.safetensors", model, t_band=T_BAND, teacher="tiny-sd15",
                                teacher_unet_shape_fingerprint=fingerprint, latent_channels=4)
    shortcut_file.save_shortcut(folder / "tiny_shortcut_fp16.safetensors", model, t_band=T_BAND, teacher="tiny-sd15",
                                teacher_unet_shape_fingerprint=fingerprint, latent_channels=4, dtype=torch.float16)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    folder_paths.add_model_folder_path("direct_distill_shortcuts", str(folder))
    return folder


@pytest.fixture(scope="module")
def shortcut(shortcut_dir):
    (loaded,) = run_node(LOADER, shortcut_name="tiny_shortcut.safetensors")
    return loaded


def empty_latent(size=8):
    return {"samples": torch.zeros(1, 4, size, size)}


def shortcut_ksampler(model, shortcut, steps=STEPS, handoff_step=K, force=False, scheduler="exp_karras", **kw):
    inputs = dict(model=model, shortcut=shortcut, seed=SEED, steps=steps, handoff_step=handoff_step, force=force,
                  cfg=CFG, sampler_name="dpmpp_2m", scheduler=scheduler, positive=tiny_conditioning(0),
                  negative=tiny_conditioning(1), latent_image=empty_latent(), denoise=1.0)
    (out,) = run_node(KSAMPLER, **{**inputs, **kw})
    return out["samples"]


def test_nodes_and_the_shortcuts_folder_are_registered(comfy_loaded, load_repo, shortcut_dir):
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[LOADER] == "Load Shortcut (NAFNet)"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[KSAMPLER] == "Shortcut KSampler"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[SAMPLER] == "Shortcut Sampler"
    for node_id in (LOADER, KSAMPLER, SAMPLER):
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["description"] and all(opts.get("tooltip") for _, opts in info["input"]["required"].values())
    assert load_repo()  # registering twice adds nothing
    paths, extensions = folder_paths.folder_names_and_paths["direct_distill_shortcuts"]
    default = str(Path(folder_paths.models_dir) / "shortcuts")
    assert paths.count(default) == 1 and str(shortcut_dir) in paths and ".safetensors" in extensions
    options = nodes.NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]["shortcut_name"]
    assert "tiny_shortcut.safetensors" in options[1]["options"]


def test_loader_gives_the_shortcut_and_names_a_malformed_file(comfy_loaded, shortcut, shortcut_dir):
    assert type(shortcut).__name__ == "ComfyShortcut"
    loaded = shortcut.shortcut
    assert loaded.t_band == T_BAND and loaded.teacher == "tiny-sd15" and loaded.latent_channels == 4
    with pytest.raises(ValueError, match="broken.safetensors") as err:
        run_node(LOADER, shortcut_name="broken.safetensors")
    assert type(err.value).__name__ == "FileFormatError"


def test_shortcut_ksampler_is_comfy_sampling_then_the_handoff(comfy_loaded, twin_unets, shortcut):
    """Reference by hand: ComfyUI's own dpmpp_2m over sigmas[:K+1], then handoff.shortcut_from_ve at sigmas[K]
    on the latent the sampler works on (process_in: VAE latent times the scaling factor, VE-scaled)."""
    handoff = dd(comfy_loaded, "models.handoff")
    model, _ = twin_unets
    out = shortcut_ksampler(model, shortcut)

    model_sampling = model.get_model_object("model_sampling")
    latent_format = model.get_model_object("latent_format")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "exp_karras", STEPS)
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, SEED)
    after_k = comfy.sample.sample_custom(model, noise, CFG, comfy.samplers.sampler_object("dpmpp_2m"), sigmas[:K + 1],
                                         tiny_conditioning(0), tiny_conditioning(1), latent, seed=SEED)
    x0 = handoff.shortcut_from_ve(shortcut.shortcut, latent_format.process_in(after_k), sigmas[K],
                                  model_sampling.sigmas)
    expected = latent_format.process_out(x0)
    assert out.shape == (1, 4, 8, 8) and bool(torch.isfinite(out).all())
    # Only the process_out/process_in round trip of the reference's latent differs (float rounding).
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # The shortcut really took over: its output is not the latent it was handed.
    assert (out - after_k).abs().max() > 0.1


def test_shortcut_ksampler_warns_once_when_the_scheduler_is_not_the_one_the_shortcut_learnt(
        comfy_loaded, twin_unets, shortcut, caplog):
    model, _ = twin_unets
    with caplog.at_level(logging.WARNING):
        shortcut_ksampler(model, shortcut)  # a file with no schedule recorded: exp_karras, as the capture's default
    assert not [r for r in caplog.records if "learnt to finish" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        shortcut_ksampler(model, shortcut, scheduler="beta", handoff_step=10)
    (warning,) = [r.getMessage() for r in caplog.records if "learnt to finish" in r.getMessage()]
    assert "learnt to finish exp_karras runs; the beta scheduler" in warning and "Pick the exp_karras" in warning


def test_shortcut_ksampler_equals_the_diffusers_side(comfy_loaded, twin_unets, shortcut, sd_scheduler_config):
    """The same UNet in diffusers: ExpKarrasScheduler (DPM-Solver++ 2M) for K steps from the same noise (VP noise =
    VE noise / sqrt(1 + sigma_0^2), i.e. the unit noise itself), then handoff.shortcut_from_vp at timesteps[K]."""
    handoff, schedulers = dd(comfy_loaded, "models.handoff"), dd(comfy_loaded, "schedulers")
    model, unet = twin_unets
    out = shortcut_ksampler(model, shortcut)

    scheduler = schedulers.ExpKarrasScheduler.from_config(sd_scheduler_config)
    scheduler.set_timesteps(STEPS)
    latents = comfy.sample.prepare_noise(empty_latent()["samples"], SEED) * scheduler.init_noise_sigma
    context = torch.cat([tiny_conditioning(1)[0][0], tiny_conditioning(0)[0][0]])  # uncond, cond
    with torch.no_grad():
        for t in scheduler.timesteps[:K]:
            eps_uncond, eps_cond = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t,
                                        encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(eps_uncond + CFG * (eps_cond - eps_uncond), t, latents).prev_sample
    x0 = handoff.shortcut_from_vp(shortcut.shortcut, latents, scheduler.timesteps[K])
    scale = model.get_model_object("latent_format").scale_factor  # ComfyUI returns VAE-space latents
    torch.testing.assert_close(out * scale, x0, rtol=1e-4, atol=1e-4)


def test_shortcut_sampler_under_sampler_custom_advanced_equals_shortcut_ksampler(comfy_loaded, twin_unets, shortcut):
    model, _ = twin_unets
    (sampler,) = run_node(SAMPLER, sampler=comfy.samplers.sampler_object("dpmpp_2m"), shortcut=shortcut,
                          handoff_step=K, force=False)
    assert isinstance(sampler, comfy.samplers.KSAMPLER)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny_conditioning(0), tiny_conditioning(1))
    guider.set_cfg(CFG)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "exp_karras", STEPS)
    output, denoised = custom_sampler.SamplerCustomAdvanced().sample(
        custom_sampler.Noise_RandomNoise(SEED), guider, sampler, sigmas, empty_latent())
    expected = shortcut_ksampler(model, shortcut)
    torch.testing.assert_close(output["samples"], expected, rtol=0, atol=0)
    # The preview callback's last call carries the shortcut's x0, so denoised_output is the result too.
    torch.testing.assert_close(denoised["samples"], expected, rtol=0, atol=0)


def test_a_noise_mask_keeps_its_area_through_the_hand_off_as_comfys_own_samplers_do(comfy_loaded, twin_unets,
                                                                                     shortcut):
    model, _ = twin_unets
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0  # denoise the right half, keep the left
    latent = {"samples": image, "noise_mask": mask}
    out = shortcut_ksampler(model, shortcut, latent_image=latent)
    (stock,) = run_node("KSampler", model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="dpmpp_2m",
                        scheduler="exp_karras", positive=tiny_conditioning(0), negative=tiny_conditioning(1),
                        latent_image=latent, denoise=1.0)
    torch.testing.assert_close(stock["samples"][..., :4], image[..., :4], rtol=0, atol=1e-5)  # ComfyUI's rule
    torch.testing.assert_close(out[..., :4], image[..., :4], rtol=0, atol=1e-5)
    assert (out[..., 4:] - image[..., 4:]).abs().max() > 0.1
    # a mask of ones denoises everything: the run without a mask
    whole = shortcut_ksampler(model, shortcut, latent_image={"samples": image, "noise_mask": torch.ones(1, 1, 8, 8)})
    torch.testing.assert_close(whole, shortcut_ksampler(model, shortcut, latent_image={"samples": image}),
                               rtol=1e-5, atol=1e-5)


def test_progress_runs_k_steps_then_completes_on_the_shortcut(comfy_loaded, twin_unets, shortcut, monkeypatch):
    calls = []

    def recording_callback(model, steps, x0_output_dict=None):
        return lambda step, x0, x, total: calls.append((step, total, x0.clone()))

    monkeypatch.setattr(latent_preview, "prepare_callback", recording_callback)
    out = shortcut_ksampler(twin_unets[0], shortcut)
    assert [(step, total) for step, total, _ in calls] == [(i, STEPS) for i in range(K)] + [(STEPS - 1, STEPS)]
    scale = twin_unets[0].get_model_object("latent_format").scale_factor
    torch.testing.assert_close(calls[-1][2] / scale, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("handoff_step, t", [(2, 841), (15, 136)])
def test_a_handoff_outside_the_band_is_refused_before_any_step_unless_forced(
        comfy_loaded, twin_unets, shortcut, handoff_step, t):
    model = twin_unets[0].clone()
    calls = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"t={t}\.00 is outside the band .*handoff_step 6 to 13 lies in the band"):
            shortcut_ksampler(model, shortcut, handoff_step=handoff_step)
        assert not calls
        forced = shortcut_ksampler(model, shortcut, handoff_step=handoff_step, force=True)
    finally:
        hook.remove()
    assert len(calls) == handoff_step and bool(torch.isfinite(forced).all())


def test_a_model_of_another_unet_is_refused_before_any_step(comfy_loaded, shortcut):
    other = tiny_sd15_model(model_channels=64)
    calls = []
    hook = other.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"^this shortcut was distilled from tiny-sd15 \(UNet shape fingerprint "
                                             r"\w+\), but the MODEL sampled here has UNet shape fingerprint \w+: a "
                                             r"shortcut only works on its own teacher$"):
            shortcut_ksampler(other, shortcut)
        (sampler,) = run_node(SAMPLER, sampler=comfy.samplers.sampler_object("euler"), shortcut=shortcut,
                              handoff_step=K, force=True)
        guider = comfy.samplers.CFGGuider(other)
        guider.set_conds(tiny_conditioning(0), tiny_conditioning(1))
        sigmas = comfy.samplers.calculate_sigmas(other.get_model_object("model_sampling"), "exp_karras", STEPS)
        with pytest.raises(ValueError, match="a shortcut only works on its own teacher"):  # force is for the band
            custom_sampler.SamplerCustomAdvanced().sample(custom_sampler.Noise_RandomNoise(SEED), guider, sampler,
                                                          sigmas, empty_latent())
    finally:
        hook.remove()
    assert not calls


def test_a_model_on_another_noise_table_is_refused_before_any_step(comfy_loaded, builtin_nodes, twin_unets,
                                                                   shortcut):
    # ModelSamplingDiscrete set to lcm keeps 50 of the 1000 sigmas: a timestep of that table is not the band's
    model, _ = twin_unets
    node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]
    (lcm,) = run_node("ModelSamplingDiscrete", model=model, sampling="lcm", zsnr=False) \
        if issubclass(node, io.ComfyNode) else getattr(node(), node.FUNCTION)(model, "lcm", False)
    calls = []
    hook = lcm.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="noise table has 50 steps, not the 1000 of the checkpoint"):
            shortcut_ksampler(lcm, shortcut, force=True)
    finally:
        hook.remove()
    assert not calls


def test_handoff_step_must_leave_steps_to_replace(comfy_loaded, twin_unets, shortcut):
    comfy.model_management.unload_all_models()
    with pytest.raises(ValueError, match="handoff_step=20: the shortcut takes over after 1 to 19 of the 20"):
        shortcut_ksampler(twin_unets[0], shortcut, handoff_step=STEPS)
    with pytest.raises(ValueError, match="after 1 or more of at least 2 sampling steps; this run has 1"):
        shortcut_ksampler(twin_unets[0], shortcut, steps=1, handoff_step=1)
    assert not comfy.model_management.current_loaded_models  # refused before the teacher and shortcut loaded


def test_denoise_0_returns_the_latent_as_it_came_as_ksampler_does(comfy_loaded, twin_unets, shortcut):
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    (out,) = run_node(KSAMPLER, model=twin_unets[0], shortcut=shortcut, seed=SEED, steps=STEPS, handoff_step=K,
                      force=False, cfg=CFG, sampler_name="dpmpp_2m", scheduler="exp_karras",
                      positive=tiny_conditioning(0), negative=tiny_conditioning(1), latent_image=latent, denoise=0.0)
    assert out["samples"] is latent["samples"]  # was "this run has -1" sampling steps


def test_the_shortcut_sampler_refuses_sigmas_that_do_not_end_at_0(comfy_loaded, twin_unets, shortcut):
    """The high part of a SplitSigmas ends above 0, where the next sampler takes over: the shortcut's latent is
    clean, not that sigma's."""
    model, _ = twin_unets
    (sampler,) = run_node(SAMPLER, sampler=comfy.samplers.sampler_object("dpmpp_2m"), shortcut=shortcut,
                          handoff_step=K, force=False)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny_conditioning(0), tiny_conditioning(1))
    guider.set_cfg(CFG)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "exp_karras", STEPS)
    with pytest.raises(ValueError, match=f"the shortcut finishes a run: its sigmas must end at 0, these end at "
                                         f"{float(sigmas[14]):.4g}"):
        custom_sampler.SamplerCustomAdvanced().sample(custom_sampler.Noise_RandomNoise(SEED), guider, sampler,
                                                      sigmas[:15], empty_latent())


@pytest.mark.parametrize("sampling, predicts", [("v_prediction", "v_prediction"), ("x0", "sample")])
def test_a_model_that_predicts_otherwise_than_the_recorded_teacher_is_refused(comfy_loaded, builtin_nodes, twin_unets,
                                                                             shortcut, sampling, predicts):
    """SD2's 768-v and 512 base share their shapes; V_PREDICTION and X0 derive from EPS in ComfyUI."""
    import copy

    node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]
    (other,) = run_node("ModelSamplingDiscrete", model=twin_unets[0], sampling=sampling, zsnr=False) \
        if issubclass(node, io.ComfyNode) else getattr(node(), node.FUNCTION)(twin_unets[0], sampling, False)
    recorded = copy.deepcopy(shortcut.shortcut)
    recorded.metadata = {**recorded.metadata, "extra": {"training": {"prediction_type": "epsilon"}}}
    with pytest.raises(ValueError, match=f"distilled from tiny-sd15, a model predicting epsilon, but the MODEL "
                                         f"sampled here predicts {predicts}"):
        shortcut_ksampler(other, type(shortcut)(recorded))
    shortcut_ksampler(other, shortcut)  # a file that records no prediction type is not checked


def test_the_warning_points_to_the_sigmas_node_for_a_schedule_the_list_lacks(comfy_loaded, shortcut, caplog):
    shortcut_nodes = dd(comfy_loaded, "nodes.shortcut")
    cases = [({"schedule": "exp_karras", "exp_karras_p": 3.0}, "exp_karras",
              "learnt to finish exp_karras (p=3.0) runs; the exp_karras scheduler hands it latents it was not "
              "trained on, where its jump is less accurate. The scheduler list has no exp_karras (p=3.0): make its "
              "sigmas with the ExpKarras Scheduler node at p=3.0 and sample with the Shortcut Sampler in "
              "SamplerCustomAdvanced."),
             ({"schedule": "align_your_steps"}, "karras", "The scheduler list has no align_your_steps: make its "
              "sigmas with the AlignYourStepsScheduler node and sample with the Shortcut Sampler"),
             ({"schedule": "beta"}, "karras", "learnt to finish beta runs; the karras scheduler hands it latents it "
              "was not trained on, where its jump is less accurate. Pick the beta scheduler.")]
    for extra, scheduler, message in cases:
        model = shortcut_nodes.TwoStageShortcut.from_configs(shortcut.shortcut.stage1.config,
                                                             shortcut.shortcut.stage2.config)
        model.metadata = {"extra": extra}
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            shortcut_nodes.warn_other_schedule(model, scheduler)
        (warning,) = [r.getMessage() for r in caplog.records]
        assert warning.startswith("Direct Distill: this shortcut ") and message in warning
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # the list's entry of that name: quiet where it is the same schedule
            shortcut_nodes.warn_other_schedule(model, extra["schedule"])
        assert bool(caplog.records) == (extra["schedule"] != "beta")


def loaded_models():
    return [loaded.model for loaded in comfy.model_management.current_loaded_models]


def test_comfys_model_management_loads_and_offloads_the_shortcut_with_the_teacher(comfy_loaded, twin_unets, shortcut):
    management = comfy.model_management
    management.unload_all_models()
    model = twin_unets[0]
    shortcut_ksampler(model, shortcut)
    patcher = shortcut.patcher(model.load_device, torch.float32)
    assert patcher.model is shortcut.shortcut  # the file's own weights: same dtype, nothing copied
    assert patcher in loaded_models() and patcher.loaded_size() == patcher.model_size() > 0
    assert patcher.load_device == model.load_device and patcher.offload_device == management.unet_offload_device()
    assert {p.device for p in patcher.model.parameters()} == {torch.device(model.load_device)}
    management.unload_all_models()
    assert patcher not in loaded_models() and patcher.loaded_size() == 0
    assert {p.device for p in patcher.model.parameters()} == {torch.device(patcher.offload_device)}
    # The next run loads it again, through the same patcher.
    shortcut_ksampler(model, shortcut)
    assert patcher in loaded_models()


def test_the_shortcut_runs_in_the_teachers_compute_dtype(comfy_loaded, shortcut):
    model = tiny_sd15_model(manual_cast_dtype=torch.bfloat16)  # float32 weights computing in bfloat16
    dtypes = []
    patcher = shortcut.patcher(model.load_device, torch.bfloat16)
    hook = patcher.model.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    try:
        out = shortcut_ksampler(model, shortcut)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16] and bool(torch.isfinite(out).all()) and out.dtype == torch.float32
    assert {p.dtype for p in patcher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in shortcut.shortcut.parameters()} == {torch.float32}  # the file's weights are kept
    assert patcher in loaded_models()


def test_a_float16_shortcut_file_runs_in_the_teachers_float32(comfy_loaded, twin_unets, shortcut):
    (half,) = run_node(LOADER, shortcut_name="tiny_shortcut_fp16.safetensors")
    assert {p.dtype for p in half.shortcut.parameters()} == {torch.float16}
    model = twin_unets[0]
    out, reference = shortcut_ksampler(model, half), shortcut_ksampler(model, shortcut)
    assert {p.dtype for p in half.patcher(model.load_device, torch.float32).model.parameters()} == {torch.float32}
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # rounded weights, computed in float32
    assert float((out - reference).norm() / reference.norm()) < 1e-2


def test_shortcut_sampler_refuses_a_non_ksampler(comfy_loaded, shortcut):
    with pytest.raises(TypeError, match="KSAMPLER"):
        run_node(SAMPLER, sampler=object(), shortcut=shortcut, handoff_step=K, force=False)


# --- the example workflows ------------------------------------------------------------------------

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # nodes the frontend draws, never executed
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}
FILE_WIDGETS = {("CheckpointLoaderSimple", "ckpt_name"), (LOADER, "shortcut_name")}  # lists of the user's files


@pytest.fixture(scope="module")
def builtin_nodes(comfy_loaded):
    """ComfyUI's comfy_extras nodes (SamplerCustomAdvanced, KSamplerSelect, ...) in NODE_CLASS_MAPPINGS."""
    if "SamplerCustomAdvanced" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))


def node_inputs(node_type):
    """(name, io type or None, options) of each input, in order; io type None for a widget's list of options."""
    spec = nodes.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (io_type, *rest) in spec.get(section, {}).items():
            options = rest[0] if rest else {}
            if isinstance(io_type, list):
                yield name, "COMBO", {**options, "options": io_type}
            else:
                yield name, str(io_type), options


def widget_values(node):
    """{input name: value} of a workflow node, checked against the node's widget inputs."""
    values, found = list(node.get("widgets_values", [])), {}
    for name, io_type, options in node_inputs(node["type"]):
        if io_type not in WIDGET_TYPES or options.get("forceInput"):
            continue
        assert values, f"{node['type']} #{node['id']}: no widget value for {name}"
        value = found[name] = values.pop(0)
        where = f"{node['type']} #{node['id']} {name}={value!r}"
        if io_type == "INT":
            assert isinstance(value, int) and not isinstance(value, bool), where
        elif io_type == "FLOAT":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        elif io_type == "BOOLEAN":
            assert isinstance(value, bool), where
        elif io_type == "STRING":
            assert isinstance(value, str), where
        elif (node["type"], name) in FILE_WIDGETS:
            assert isinstance(value, str) and value.endswith(".safetensors"), where
        else:
            assert value in options["options"], f"{where} is not one of {options['options']}"
        if io_type in ("INT", "FLOAT"):
            assert options.get("min", value) <= value <= options.get("max", value), where
        if options.get("control_after_generate"):
            assert values and values.pop(0) in CONTROL_AFTER_GENERATE, f"{where}: control_after_generate value"
    assert not values, f"{node['type']} #{node['id']}: {len(values)} widget values too many: {values}"
    return found


def check_links(workflow):
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(by_id)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids) and workflow["last_link_id"] >= max(link_ids)
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        output, target = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and target["link"] == link_id, f"link {link_id}"
        assert output["type"] == target["type"] == link_type, f"link {link_id}: {output['type']} -> {target['type']}"
        cls = nodes.NODE_CLASS_MAPPINGS[by_id[src]["type"]]
        assert str(cls.RETURN_TYPES[src_slot]) == link_type, f"link {link_id}: {by_id[src]['type']} output {src_slot}"
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        sockets = {name: io_type for name, io_type, options in node_inputs(node["type"])
                   if io_type not in WIDGET_TYPES or options.get("forceInput")}
        optional = set(nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES().get("optional", {}))
        linked = {slot["name"]: slot for slot in node.get("inputs", []) if "widget" not in slot
                  and (slot["link"] is not None or slot["name"] not in optional)}
        assert set(sockets) - optional <= set(linked) <= set(sockets), \
            f"{node['type']} #{node['id']}: inputs {set(linked)} against {set(sockets)} ({optional} optional)"
        for name, slot in linked.items():
            assert slot["type"] == sockets[name] and slot["link"] is not None, f"{node['type']} #{node['id']} {name}"
        for slot in node.get("outputs", []):
            for link_id in slot["links"] or []:
                assert link_id in link_ids, f"{node['type']} #{node['id']}: dangling output link {link_id}"


def run_workflow(workflow, model, latent_size=8):
    """Executes a UI workflow with real nodes, except: the checkpoint loader gives the tiny model (CLIP and VAE are
    stand-ins), CLIPTextEncode gives tiny random conditioning, EmptyLatentImage is shrunk to latent_size, VAEDecode
    passes the latent through, and SaveImage records it. Returns {SaveImage filename_prefix: latent}."""
    by_id = {node["id"]: node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY}
    sources = {(link[3], link[4]): (link[1], link[2]) for link in workflow["links"]}
    results, saved = {}, {}
    while len(results) < len(by_id):
        ready = [node for node_id, node in by_id.items() if node_id not in results and all(
            sources[(node_id, slot)][0] in results for slot in range(len(node.get("inputs", []))))]
        assert ready, "the workflow has a cycle"
        for node in ready:
            inputs = widget_values(node)
            inputs.update({slot["name"]: results[src][src_slot] for dst_slot, slot in enumerate(node.get("inputs", []))
                           for src, src_slot in [sources[(node["id"], dst_slot)]]})
            kind = node["type"]
            if kind == "CheckpointLoaderSimple":
                results[node["id"]] = (model, "tiny clip", "tiny vae")
            elif kind == "CLIPTextEncode":
                results[node["id"]] = (tiny_conditioning(len(inputs["text"])),)
            elif kind == "EmptyLatentImage":
                results[node["id"]] = run_node(kind, **{**inputs, "width": 8 * latent_size, "height": 8 * latent_size})
            elif kind == "VAEDecode":
                results[node["id"]] = (inputs["samples"]["samples"],)
            elif kind == "SaveImage":
                saved[inputs["filename_prefix"]] = inputs["images"]
                results[node["id"]] = ()
            else:
                results[node["id"]] = run_node(kind, **inputs)
    return saved


@pytest.mark.parametrize("name", ["shortcut_7plus1.json", "exp_karras_txt2img.json"])
def test_workflow_nodes_links_and_widgets_are_valid(comfy_loaded, builtin_nodes, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    unknown = {node["type"] for node in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) - FRONTEND_ONLY
    assert not unknown, f"{name}: node types ComfyUI does not know: {unknown}"
    check_links(workflow)
    for node in workflow["nodes"]:
        if node["type"] not in FRONTEND_ONLY:
            widget_values(node)


def test_shortcut_7plus1_workflow_runs_7_steps_and_the_shortcut(comfy_loaded, builtin_nodes, twin_unets, shortcut_dir):
    workflow = json.loads((WORKFLOWS / "shortcut_7plus1.json").read_text())
    (sampler,) = [node for node in workflow["nodes"] if node["type"] == KSAMPLER]
    settings = widget_values(sampler)
    assert (settings["steps"], settings["handoff_step"], settings["scheduler"]) == (12, 7, "exp_karras")
    (loader,) = [node for node in workflow["nodes"] if node["type"] == LOADER]
    (shortcut_dir / widget_values(loader)["shortcut_name"]).write_bytes(
        (shortcut_dir / "tiny_shortcut.safetensors").read_bytes())
    model, calls = twin_unets[0].clone(), []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        (image,) = run_workflow(workflow, model).values()
    finally:
        hook.remove()
    assert len(calls) == 7 and image.shape == (1, 4, 8, 8) and bool(torch.isfinite(image).all())


def test_exp_karras_workflow_branches_give_the_same_latent(comfy_loaded, builtin_nodes, twin_unets):
    saved = run_workflow(json.loads((WORKFLOWS / "exp_karras_txt2img.json").read_text()), twin_unets[0])
    assert set(saved) == {"exp_karras_ksampler", "exp_karras_custom"}
    torch.testing.assert_close(saved["exp_karras_ksampler"], saved["exp_karras_custom"], rtol=1e-6, atol=1e-6)
