"""The shortcut end to end on tiny pipelines: trajectory capture, both training stages, the file,
and ShortcutCallback (exactly K UNet calls, then the VAE decodes the shortcut's latent)."""

import contextlib
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from direct_distill.models import load_shortcut, save_shortcut
from direct_distill.models.nafnet import PRESETS, TwoStageShortcut
from direct_distill.models.shortcut_file import trained_schedule
from direct_distill.models.student_file import shape_fingerprint, unet_parameter_shapes
from direct_distill.pipelines import ShortcutCallback
from direct_distill.schedulers import ExpKarrasScheduler
from direct_distill.training.config import RunConfig
from direct_distill.training.runner import Job
from direct_distill.training.shortcut import ShortcutConfig, handoff_band, train_shortcut
from direct_distill.training.trajectories import capture_trajectories, load_trajectories

PROMPTS = ["t-shirt", "bag", "ankle boot"]
STEPS, CAPTURE = 8, (4, 5, 6)


def identity(unet) -> str:
    """What a shortcut records of its teacher's UNet."""
    return shape_fingerprint(unet_parameter_shapes(unet))


@pytest.fixture
def pipe(tiny_sd_pipeline):
    tiny_sd_pipeline.scheduler = ExpKarrasScheduler.from_config(tiny_sd_pipeline.scheduler.config)
    return tiny_sd_pipeline


@pytest.fixture
def shortcut():
    """Lab presets with non-zero branch scales, so that the shortcut is far from the identity."""
    torch.manual_seed(0)
    model = TwoStageShortcut.from_configs(PRESETS["lab_stage1"], PRESETS["lab_stage2"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.5)
    model.t_band = (0.0, 1000.0)
    return model.eval()


@contextlib.contextmanager
def unet_calls(pipe):
    """Record (sample, timestep) of every UNet call."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda _, args: calls.append((args[0].clone(), args[1])))
    try:
        yield calls
    finally:
        handle.remove()


def run(pipe, prompt, seed, **kw):
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(seed), **kw).images


def capture(pipe, folder, n=3, **kw):
    kw = {**dict(num_inference_steps=STEPS, capture_steps=CAPTURE, guidance_scale=2.0, seed=10, shard_size=2,
                 batch_size=2, teacher="tiny-sd"), **kw}
    return capture_trajectories(pipe, folder, PROMPTS, n, **kw)


# --- trajectories ----------------------------------------------------------------------------

def test_capture_keeps_the_next_unet_input_after_each_capture_step_and_the_final_latent(pipe, tmp_path):
    data = load_trajectories(capture(pipe, tmp_path))
    assert data.latents.shape == (3, 3, 4, 16, 16) and data.final.shape == (3, 4, 16, 16)
    assert data.prompts == PROMPTS and data.seeds.tolist() == [10, 11, 12]
    assert isinstance(pipe.scheduler, ExpKarrasScheduler)

    with unet_calls(pipe) as calls:  # trajectory 1 alone: prompt "bag", seed 11
        final = run(pipe, "bag", 11, output_type="latent")
    for j, k in enumerate(CAPTURE):
        sample, t = calls[k]  # UNet call k + 1; CFG doubles the batch
        torch.testing.assert_close(data.latents[1, j], sample[0], rtol=1e-4, atol=1e-4)
        assert data.timesteps[j] == float(t)
    torch.testing.assert_close(data.final[1], final[0], rtol=1e-4, atol=1e-4)


def test_capture_progress_moves_every_step_and_ends_on_the_count(pipe, tmp_path, monkeypatch):
    import direct_distill.training.trajectories as trajectories

    shown = []
    real = trajectories.tqdm

    class Recorded(real):
        def update(self, n=1):
            shown.append(n)
            return super().update(n)

    monkeypatch.setattr(trajectories, "tqdm", Recorded)
    capture(pipe, tmp_path, n=2, batch_size=2)
    assert len(shown) >= STEPS and sum(shown) == pytest.approx(2)  # one batch of 2: a move per step


def test_capture_resumes_by_skipping_written_shards_and_refuses_other_settings(pipe, tmp_path):
    folder = capture(pipe, tmp_path)
    first = folder / "shard-00000.safetensors"
    second = folder / "shard-00001.safetensors"
    before, stamp = load_trajectories(folder), os.stat(first).st_mtime_ns
    second.unlink()
    with pytest.raises(Exception, match="shard missing"):
        load_trajectories(folder)
    capture(pipe, folder)
    assert os.stat(first).st_mtime_ns == stamp
    after = load_trajectories(folder)
    torch.testing.assert_close(after.latents, before.latents, rtol=1e-4, atol=1e-4)
    # A shard cut short (a kill mid-copy, a full disk) is captured again, not taken as done
    second.write_bytes(second.read_bytes()[:200])
    capture(pipe, folder)
    torch.testing.assert_close(load_trajectories(folder).latents, before.latents, rtol=1e-4, atol=1e-4)
    # Another process lists diffusers' bookkeeping in another order (a set): that is the same capture.
    index = json.loads((folder / "index.json").read_text())
    index["scheduler_config"].update(_use_default_values=["timestep_spacing", "solver_order"],
                                     _diffusers_version="0.0.0")
    (folder / "index.json").write_text(json.dumps(index))
    capture(pipe, folder)
    with pytest.raises(ValueError, match="guidance_scale"):
        capture(pipe, folder, guidance_scale=3.0)
    with pytest.raises(ValueError, match="capture_steps"):
        capture(pipe, tmp_path / "other", capture_steps=(4, STEPS))


def test_capture_runs_a_named_schedule_from_its_sigmas_and_records_it(pipe, tmp_path):
    from direct_distill.schedulers.named import schedule_sigmas
    from direct_distill.schedulers.noise import sigma_table

    sigmas = schedule_sigmas("beta", STEPS, sigma_table(pipe.scheduler.alphas_cumprod))
    folder = capture(pipe, tmp_path, n=2, sigmas=sigmas, schedule="beta")
    data = load_trajectories(folder)
    assert data.config["schedule"] == "beta" and data.config["sigmas"] == pytest.approx(sigmas.tolist())
    with unet_calls(pipe) as calls:  # trajectory 1 alone, run on the beta sigmas by the pipeline itself
        final = pipe("bag", sigmas=sigmas.tolist(), guidance_scale=2.0, generator=torch.Generator().manual_seed(11),
                     output_type="latent").images
    assert len(calls) == STEPS
    for j, k in enumerate(CAPTURE):
        torch.testing.assert_close(data.latents[1, j], calls[k][0][0], rtol=1e-4, atol=1e-4)
        assert data.timesteps[j] == float(calls[k][1])
    torch.testing.assert_close(data.final[1], final[0], rtol=1e-4, atol=1e-4)
    # Not the exp-Karras run of the same length.
    assert not torch.allclose(data.final[1], run(pipe, "bag", 11, output_type="latent")[0], atol=1e-3)
    with pytest.raises(ValueError, match="5 sigmas given for a 8-step run"):
        capture(pipe, tmp_path / "other", sigmas=sigmas[:5])


# --- training --------------------------------------------------------------------------------

def test_both_stages_train_and_the_file_round_trips(pipe, tmp_path):
    data = load_trajectories(capture(pipe, tmp_path / "trajectories"))
    config = ShortcutConfig(run=RunConfig(batch_size=4, lr=1e-3, checkpoint_every=2), stage1_steps=4, stage2_steps=3,
                            holdout=0.34)
    out = tmp_path / "shortcut.safetensors"
    result = train_shortcut(Job(None, out, tmp_path / "work"), config, data)

    assert result.t_band == handoff_band(data.timesteps, config.band_margin)
    lo, hi = float(data.timesteps.min()), float(data.timesteps.max())
    assert result.t_band[0] < lo and result.t_band[1] > hi
    assert set(result.heldout_psnr) == {"input", "stage1", "stage1+2"}
    assert all(len(scores) == 1 + len(CAPTURE) for scores in result.heldout_psnr.values())

    loaded = load_shortcut(out)
    assert loaded.t_band == pytest.approx(result.t_band) and loaded.teacher == "tiny-sd"
    assert loaded.teacher_unet_shape_fingerprint == identity(pipe.unet)
    assert loaded.latent_channels == 4 and loaded.stage2 is not None
    extra = loaded.metadata["extra"]
    assert extra["captured"] == [{"num_inference_steps": STEPS, "capture_steps": list(CAPTURE),
                                  "timesteps": data.timesteps.tolist()}]
    x, t = data.latents[:2, 0], data.timesteps[0]
    with torch.no_grad():
        assert torch.equal(loaded(x, t), result.shortcut(x, t))
        assert not torch.equal(loaded(x, t), x)

    # Re-running with the same work folder resumes both (finished) stages: the same file again.
    again = train_shortcut(Job(None, tmp_path / "again.safetensors", tmp_path / "work"), config, data)
    for key, value in result.shortcut.state_dict().items():
        assert torch.equal(value, again.shortcut.state_dict()[key]), key


def test_stage1_only_writes_a_file_without_stage2(pipe, tmp_path):
    data = load_trajectories(capture(pipe, tmp_path / "trajectories", n=2))
    config = ShortcutConfig(run=RunConfig(batch_size=2), stage2=False, stage1_steps=2, holdout=0.5)
    train_shortcut(Job(None, tmp_path / "s1.safetensors"), config, data)
    assert load_shortcut(tmp_path / "s1.safetensors").stage2 is None


# --- the callback ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 5])
def test_callback_makes_exactly_k_unet_calls_and_returns_the_shortcut_of_the_next_unet_input(pipe, shortcut, k):
    with unet_calls(pipe) as full:
        run(pipe, ["bag", "coat"], 1, output_type="latent")
    with unet_calls(pipe) as cut:
        latents = run(pipe, ["bag", "coat"], 1, output_type="latent",
                      callback_on_step_end=ShortcutCallback(shortcut, handoff_step=k))
    assert len(cut) == k
    sample, t = full[k]
    with torch.no_grad():
        expected = shortcut(sample[:2], t)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_an_image_to_image_run_hands_off_at_the_timestep_after_its_kth_step(tiny_sd_pipeline, shortcut, scheduler):
    # DDIM and PNDM keep no step index: the steps img2img skipped are counted from the pipeline's own run
    import diffusers

    img2img = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline.components)
    img2img.scheduler = getattr(diffusers, scheduler).from_config(img2img.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    seen = []
    handle = shortcut.register_forward_pre_hook(lambda module, args: seen.append(float(args[1].flatten()[0])))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        with unet_calls(img2img) as calls:
            img2img("bag", image=image, strength=0.5, num_inference_steps=10, guidance_scale=1.0,
                    output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, handoff_step=2))
    finally:
        handle.remove()
    run = img2img.scheduler.timesteps[-img2img._num_timesteps:].tolist()
    assert [float(t) for _, t in calls] == run[:2] and seen == [run[2]]
    # a hand-off after the run's last call is refused at its first: the run's steps, not the scheduler's
    with pytest.raises(ValueError, match=f"handoff_step={len(run)}: the shortcut takes over after 1 to "
                                         f"{len(run) - 1} of the {len(run)} sampling steps"):
        with unet_calls(img2img) as calls:
            img2img("bag", image=image, strength=0.5, num_inference_steps=10, guidance_scale=1.0,
                    output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, handoff_step=len(run)))
    assert len(calls) == 1


def test_the_vae_decodes_the_shortcuts_latent(pipe, shortcut):
    latents = run(pipe, "dress", 2, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 4))
    decoded = []
    handle = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda _, args: decoded.append(args[0].clone()))
    try:
        image = run(pipe, "dress", 2, output_type="pt", callback_on_step_end=ShortcutCallback(shortcut, 4))
    finally:
        handle.remove()
    assert image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(decoded[0] * pipe.vae.config.scaling_factor, latents, rtol=1e-5, atol=1e-5)


def test_out_of_band_handoff_raises_before_more_steps_unless_forced(pipe, shortcut):
    pipe.scheduler.set_timesteps(STEPS)
    handoff_t = float(pipe.scheduler.timesteps[4])
    shortcut.t_band = (handoff_t + 1, handoff_t + 50)
    with unet_calls(pipe) as calls, pytest.raises(ValueError, match="outside the band"):
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 4))
    assert len(calls) == 1
    with unet_calls(pipe) as calls:
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 4, force=True))
    assert len(calls) == 4
    shortcut.t_band = (handoff_t - 1, handoff_t + 1)
    run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 4))
    # the refusal names the hand-off steps of the run that the band takes
    shortcut.t_band = (float(pipe.scheduler.timesteps[3]), float(pipe.scheduler.timesteps[2]))
    with pytest.raises(ValueError, match=f"with these {STEPS} steps, handoff_step 2 to 3 lies in the band"):
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 5))
    shortcut.t_band = (1.0, 1.5)
    with pytest.raises(ValueError, match=f"no step of these {STEPS} steps lies in the band"):
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 5))


def test_callback_takes_a_file_path_and_refuses_a_handoff_with_no_step_left(pipe, shortcut, tmp_path):
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                         teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4)
    callback = ShortcutCallback(str(path), handoff_step=2)
    assert callback.shortcut.teacher == "tiny"
    assert run(pipe, "bag", 0, output_type="latent", callback_on_step_end=callback).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match=f"handoff_step={STEPS}: the shortcut takes over after 1 to {STEPS - 1} of "
                                         f"the {STEPS} sampling steps"):  # at the first step, as ComfyUI words it
        with unet_calls(pipe) as calls:
            run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, STEPS))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="handoff_step"):
        ShortcutCallback(shortcut, 0)


def test_a_float16_file_is_half_the_size_and_runs_in_the_pipelines_dtype(pipe, shortcut, tmp_path):
    files = {dtype: save_shortcut(tmp_path / f"{dtype}.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                                  teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4,
                                  dtype=getattr(torch, dtype))
             for dtype in ("float32", "float16")}
    assert files["float16"].stat().st_size < 0.55 * files["float32"].stat().st_size
    assert {p.dtype for p in load_shortcut(files["float16"]).parameters()} == {torch.float16}
    callbacks = {dtype: ShortcutCallback(path, handoff_step=4) for dtype, path in files.items()}
    latents = {dtype: run(pipe, "coat", 3, output_type="latent", callback_on_step_end=cb)
               for dtype, cb in callbacks.items()}
    assert {p.dtype for p in callbacks["float16"].shortcut.parameters()} == {torch.float16}  # as read: a copy ran
    assert latents["float16"].dtype == torch.float32
    torch.testing.assert_close(latents["float16"], latents["float32"], rtol=1e-2, atol=1e-2)
    assert not torch.equal(latents["float16"], latents["float32"])  # the weights really were rounded
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_shortcut(tmp_path / "int.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                      teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4, dtype=torch.int8)


def test_a_run_in_bfloat16_leaves_the_shortcuts_weights_as_they_were(pipe, shortcut):
    """The callback cast the shortcut in place: after one bfloat16 run a float32 run used rounded weights."""
    weights = {k: v.clone() for k, v in shortcut.state_dict().items()}
    callback = ShortcutCallback(shortcut, handoff_step=4)
    before = run(pipe, "coat", 3, output_type="latent", callback_on_step_end=callback)
    low = copy.deepcopy(pipe).to(torch.bfloat16)
    assert run(low, "coat", 3, output_type="latent", callback_on_step_end=callback).dtype == torch.bfloat16
    assert all(torch.equal(v, weights[k]) for k, v in shortcut.state_dict().items())
    torch.testing.assert_close(run(pipe, "coat", 3, output_type="latent", callback_on_step_end=callback), before,
                               rtol=0, atol=0)


def test_a_compiled_or_fused_unet_is_still_the_shortcuts_teacher(pipe, shortcut, tmp_path):
    """torch.compile prefixes every parameter's name, fuse_qkv_projections() adds fused layers: both were taken for
    another model."""
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                         teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4)
    callback = ShortcutCallback(str(path), handoff_step=4)
    before = run(pipe, "bag", 0, output_type="latent", callback_on_step_end=callback)
    compiled, fused = copy.deepcopy(pipe), copy.deepcopy(pipe)
    compiled.unet = torch.compile(compiled.unet, backend="eager")
    fused.fuse_qkv_projections()
    for other in (compiled, fused):
        torch.testing.assert_close(run(other, "bag", 0, output_type="latent", callback_on_step_end=callback), before,
                                   rtol=1e-5, atol=1e-5)


def test_an_inpainting_pipeline_is_refused_at_the_first_step(pipe, shortcut):
    """After the hand-off no step follows, so the pipeline never puts the kept area back."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image, mask = Image.new("RGB", (size, size), "gray"), Image.new("L", (size, size), 255)
    with unet_calls(inpaint) as calls, pytest.raises(ValueError, match="ShortcutCallback does not run "
                                                                      "StableDiffusionInpaintPipeline"):
        inpaint("bag", image=image, mask_image=mask, height=size, width=size, num_inference_steps=STEPS,
                output_type="latent", callback_on_step_end=ShortcutCallback(shortcut, 4))
    assert len(calls) == 1


def test_a_shortcut_gives_as_many_channels_as_it_takes():
    with pytest.raises(ValueError, match="the shortcut takes 4-channel latents but gives 3 channels"):
        TwoStageShortcut.from_configs({**PRESETS["lab_stage1"], "in_channels": 4, "out_channels": 3})


def test_a_shortcut_trained_at_p_0_keeps_its_p():
    assert trained_schedule({"schedule": "exp_karras", "exp_karras_p": 0.0}) == ("exp_karras", {"p": 0.0})
    assert trained_schedule({}) == ("exp_karras", {"p": 1.0})  # files from before the schedule was recorded


def test_callback_gives_the_sigmas_of_the_schedule_the_shortcut_was_trained_on(pipe, shortcut, tmp_path):
    from direct_distill.schedulers.named import schedule_sigmas
    from direct_distill.schedulers.noise import alphas_cumprod_from_config, sigma_table

    table = sigma_table(alphas_cumprod_from_config(pipe.scheduler.config))  # float64, as the capture's
    # Built in code, or a file from before the schedule was recorded: exp_karras p=1, the capture's default.
    assert ShortcutCallback(shortcut, 3).sigmas(8, pipe.scheduler) == pytest.approx(
        schedule_sigmas("exp_karras", 8, table, p=1.0).tolist())
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                         teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4,
                         extra={"schedule": "beta", "exp_karras_p": 1.0})
    callback = ShortcutCallback(str(path), handoff_step=3)
    assert callback.schedule == ("beta", {})
    sigmas = callback.sigmas(8, pipe.scheduler)
    assert sigmas == pytest.approx(schedule_sigmas("beta", 8, table).tolist()) and sigmas[-1] == 0
    with unet_calls(pipe) as calls:  # an 8-step beta run handed off after 3 steps
        pipe("bag", sigmas=sigmas, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", callback_on_step_end=callback)
    assert len(calls) == 3
    pipe.scheduler.set_timesteps(sigmas=sigmas)
    assert [float(t) for _, t in calls] == pipe.scheduler.timesteps[:3].tolist()
    # Euler, SDXL's default, reads the last of the sigmas given as where the run ends: the same 8 steps to 0
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(sigmas=sigmas)
    assert len(pipe.scheduler.timesteps) == 8 and pipe.scheduler.sigmas[-1] == 0
    with unet_calls(pipe) as calls:  # handing off after 7 of the 8 is a valid hand-off of that run
        pipe("bag", sigmas=sigmas, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", callback_on_step_end=ShortcutCallback(str(path), handoff_step=7, force=True))
    assert len(calls) == 7


def test_an_sdxl_shortcut_of_align_your_steps_runs_sdxls_own_table(pipe, shortcut, tmp_path):
    from direct_distill.schedulers.named import family_params
    from direct_distill.schedulers.published import align_your_steps_sigmas

    assert family_params("align_your_steps", "sdxl") == {"model": "SDXL"}  # what distill shortcut captures with
    assert family_params("align_your_steps", "sd15") == family_params("beta", "sdxl") == {}
    sigmas = align_your_steps_sigmas(STEPS, "SDXL")
    folder = capture(pipe, tmp_path / "ays", n=2, sigmas=sigmas, schedule="align_your_steps",
                     schedule_params={"model": "SDXL"})
    assert load_trajectories(folder).config["schedule_params"] == {"model": "SDXL"}  # what the file then records
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny",
                         teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4,
                         extra={"schedule": "align_your_steps", "schedule_params": {"model": "SDXL"}})
    callback = ShortcutCallback(str(path), handoff_step=3)
    assert callback.schedule == ("align_your_steps", {"model": "SDXL"})
    assert callback.sigmas(10, pipe.scheduler) == pytest.approx(align_your_steps_sigmas(10, "SDXL").tolist())
    assert not torch.allclose(align_your_steps_sigmas(10, "SDXL"), align_your_steps_sigmas(10, "SD1"))


def test_callback_refuses_a_pipeline_of_another_teacher_at_the_first_step(pipe, tiny_sdxl_pipeline, shortcut,
                                                                         tmp_path):
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny-sdxl",
                         teacher_unet_shape_fingerprint=identity(tiny_sdxl_pipeline.unet), latent_channels=4)
    with unet_calls(pipe) as calls, pytest.raises(ValueError) as err:
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(str(path), 4))
    assert len(calls) == 1
    assert str(err.value) == (f"this shortcut was distilled from tiny-sdxl (UNet shape fingerprint "
                              f"{identity(tiny_sdxl_pipeline.unet)}), but the pipeline's UNet has UNet shape "
                              f"fingerprint {identity(pipe.unet)}: a shortcut only works on its own teacher")


def test_callback_refuses_a_pipeline_predicting_otherwise_than_the_recorded_teacher(pipe, shortcut, tmp_path):
    """SD2's 768-v and 512 base share their shapes: the file's training record tells them apart."""
    path = save_shortcut(tmp_path / "s.safetensors", shortcut, t_band=(0, 1000), teacher="tiny-v",
                         teacher_unet_shape_fingerprint=identity(pipe.unet), latent_channels=4,
                         extra={"training": {"prediction_type": "v_prediction"}})
    with unet_calls(pipe) as calls, pytest.raises(ValueError, match="this shortcut was distilled from tiny-v, a model "
                                                                    "predicting v_prediction, but the pipeline's UNet "
                                                                    "predicts epsilon"):
        run(pipe, "bag", 0, output_type="latent", callback_on_step_end=ShortcutCallback(str(path), 4))
    assert len(calls) == 1


def test_callback_on_sdxl_with_a_ve_scheduler_feeds_the_vp_unet_input(tiny_sdxl_pipeline, shortcut):
    pipe, k = tiny_sdxl_pipeline, 3  # EulerDiscreteScheduler keeps VE latents: the callback must rescale them
    kw = dict(num_inference_steps=6, guidance_scale=2.0, output_type="latent")
    with unet_calls(pipe) as full:
        pipe("bag", generator=torch.Generator().manual_seed(0), **kw)
    with unet_calls(pipe) as cut:
        latents = pipe("bag", generator=torch.Generator().manual_seed(0), **kw,
                       callback_on_step_end=ShortcutCallback(shortcut, k)).images
    assert len(cut) == k
    sample, t = full[k]
    with torch.no_grad():
        expected = shortcut(sample[:1], t)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    image = pipe("bag", generator=torch.Generator().manual_seed(0), **{**kw, "output_type": "pt"},
                 callback_on_step_end=ShortcutCallback(shortcut, k)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_callback_counts_the_steps_an_sdxl_run_cut_by_denoising_end_makes(tiny_sdxl_pipeline, shortcut):
    """SDXL's base of a base + refiner split (denoising_end=0.5) runs half of 8 steps: a hand-off after 2 runs,
    one at or after the run's end is refused at the first step (before: never handed off, and a half-denoised
    latent came back)."""
    pipe = tiny_sdxl_pipeline
    kw = dict(num_inference_steps=8, denoising_end=0.5, guidance_scale=1.0, output_type="latent")
    with unet_calls(pipe) as full:
        pipe("bag", generator=torch.Generator().manual_seed(0), **kw)
    n = len(full)
    assert n == 4
    with unet_calls(pipe) as cut:
        latents = pipe("bag", generator=torch.Generator().manual_seed(0), **kw,
                       callback_on_step_end=ShortcutCallback(shortcut, 2)).images
    sample, t = full[2]
    assert len(cut) == 2
    with torch.no_grad():
        torch.testing.assert_close(latents, shortcut(sample[:1], t), rtol=1e-4, atol=1e-4)
    for k in (n, n + 2, 7):
        with unet_calls(pipe) as calls, pytest.raises(
                ValueError, match=f"handoff_step={k}: the shortcut takes over after 1 to {n - 1} of the {n} sampling "):
            pipe("bag", **kw, callback_on_step_end=ShortcutCallback(shortcut, k))
        assert len(calls) == 1


def test_callback_refuses_a_bool_handoff_step(shortcut):
    with pytest.raises(ValueError, match="handoff_step must be an integer >= 1"):
        ShortcutCallback(shortcut, True)


def test_the_capture_progress_bar_counts_whole_trajectories(pipe, tmp_path, monkeypatch):
    """It moves every denoising step, by the trajectories of the batch those steps complete (before: fractions
    such as 1.4999999999999998/6 and an end at 6.000000000000005)."""
    from direct_distill.training import trajectories

    updates = []

    class Bar:
        def __init__(self, total, initial=0, **kwargs):
            self.total, self.n = total, initial

        def update(self, k):
            updates.append(k)
            self.n += k

        def close(self):
            updates.append(("closed", self.n, self.total))

    monkeypatch.setattr(trajectories, "tqdm", Bar)
    capture(pipe, tmp_path, n=5, batch_size=3, shard_size=3)
    assert updates[-1] == ("closed", 5, 5)
    assert all(isinstance(k, int) and k >= 0 for k in updates[:-1]) and len(updates) > 3  # per step, not per batch


def test_capture_metadata_is_plain_json(pipe, tmp_path):
    folder = capture(pipe, tmp_path, n=1)
    index = json.loads((folder / "index.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    assert index["capture_steps"] == list(CAPTURE) and index["scheduler"] == "ExpKarrasScheduler"


def test_one_shortcut_learns_the_hand_off_latents_of_runs_of_several_lengths(pipe, tmp_path):
    long = load_trajectories(capture(pipe, tmp_path / "long", n=4))
    short = load_trajectories(capture(pipe, tmp_path / "short", n=4, num_inference_steps=5, capture_steps=(2,)))
    config = ShortcutConfig(run=RunConfig(batch_size=4, lr=1e-3), stage1_steps=2, stage2=False, holdout=0.25)
    result = train_shortcut(Job(None, tmp_path / "shortcut.safetensors", None), config, [long, short])
    scores = result.heldout_psnr["stage1"]
    labels = [f"{STEPS} steps, t={t:.1f}" for t in long.timesteps.tolist()] + \
             [f"5 steps, t={float(short.timesteps[0]):.1f}"]
    assert list(scores) == ["all", *labels]
    assert result.t_band == handoff_band(torch.cat([long.timesteps, short.timesteps]), config.band_margin)
    # The same noise is held out of both captures: no held-out trajectory is trained on through the other.
    other_seeds = load_trajectories(capture(pipe, tmp_path / "other", n=4, seed=11, num_inference_steps=5,
                                            capture_steps=(2,)))
    with pytest.raises(ValueError, match="same seeds"):
        train_shortcut(Job(None, tmp_path / "x.safetensors", None), config, [long, other_seeds])


def test_the_whitened_loss_weighs_each_frequency_by_the_targets_power_there():
    from direct_distill.training.shortcut import WhitenedL2, spectral_power

    torch.manual_seed(0)
    # Smooth targets, as latents are: nearly all their power at the lowest frequencies.
    targets = F.interpolate(torch.randn(256, 4, 2, 2), size=(8, 8), mode="bilinear", align_corners=False)
    loss = WhitenedL2(spectral_power(targets))
    pred = targets[:8]
    coarse = pred + 0.1                                                   # an offset: frequency 0 only
    fine = pred + 0.1 * (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8))  # a checkerboard: the highest
    assert F.mse_loss(coarse, pred) == pytest.approx(F.mse_loss(fine, pred).item())
    assert loss(fine, pred) > 100 * loss(coarse, pred)  # the same L2, but where the targets have no power
    assert loss(pred, pred) == 0
    # White targets: every frequency has the same power, and the loss is L2 times a constant.
    white = WhitenedL2(spectral_power(torch.randn(20000, 1, 8, 8)))
    e1, e2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    zero = torch.zeros(4, 1, 8, 8)
    ratio = [float(white(e, zero) / F.mse_loss(e, zero)) for e in (e1, e2, coarse[:4, :1] - pred[:4, :1])]
    assert ratio == pytest.approx([ratio[0]] * 3, rel=0.1)


def test_the_paper_loss_is_kept_and_the_choice_recorded(pipe, tmp_path):
    data = load_trajectories(capture(pipe, tmp_path / "trajectories", n=2))
    files = {}
    for loss in ("paper", "whitened"):
        config = ShortcutConfig(run=RunConfig(batch_size=2), stage2=False, stage1_steps=2, holdout=0.5, loss=loss)
        files[loss] = train_shortcut(Job(None, tmp_path / f"{loss}.safetensors"), config, data).shortcut
        assert load_shortcut(tmp_path / f"{loss}.safetensors").metadata["extra"]["training"]["loss"] == loss
    x, t = data.latents[:2, 0], data.timesteps[0]
    with torch.no_grad():
        assert not torch.equal(files["paper"](x, t), files["whitened"](x, t))


def test_the_capture_band_picks_the_hand_off_steps_of_each_run_length():
    from direct_distill.training.shortcut import band_steps

    assert band_steps([999, 918, 841, 768, 699, 633, 571, 512, 456, 403, 352, 304, 259, 216, 175, 136, 99, 65, 31, 0],
                      (250, 360)) == [10, 11, 12]  # the paper's steps of a 20-step run
    assert band_steps([999, 862, 736, 622, 517, 422, 335, 255, 182, 116, 55, 0], (250, 360)) == [6, 7]  # 7+1
    assert band_steps([999, 500, 0], (250, 360)) == []
    with pytest.raises(Exception, match="capture_band: no step of a 4-step run"):
        ShortcutConfig(teacher_steps=(20, 4))


def test_cli_captures_the_schedule_asked_for_and_records_it_in_the_file(tiny_sd_pipeline, tmp_path):
    from direct_distill.__main__ import main
    from direct_distill.models.shortcut_file import teacher_prediction_type
    from direct_distill.schedulers.named import schedule_sigmas
    from direct_distill.schedulers.noise import sigma_table

    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")

    def distill(name: str, band=("150", "600")) -> int:
        return main(["distill", "shortcut", "--teacher", str(tmp_path / "teacher"), "--prompts",
                     str(tmp_path / "prompts.txt"), "--out", str(tmp_path / f"{name}.safetensors"), "--schedule",
                     "beta", "--trajectories", "2", "--teacher-steps", "6", "4", "--capture-band", *band,
                     "--stage1-steps", "1", "--no-stage2", "--batch-size", "2", "--holdout", "0.5"])

    assert distill("shortcut") == 0
    extra = load_shortcut(tmp_path / "shortcut.safetensors").metadata["extra"]
    assert extra["schedule"] == "beta" and extra["training"]["schedule"] == "beta"
    # the teacher's prediction type, as the front doors check it (left to the teacher, so its value)
    assert teacher_prediction_type(load_shortcut(tmp_path / "shortcut.safetensors")) == "epsilon"
    scheduler = ExpKarrasScheduler.from_config(tiny_sd_pipeline.scheduler.config)
    for captured in extra["captured"]:  # the timesteps of beta runs of each length, not of exp-Karras ones
        n = captured["num_inference_steps"]
        scheduler.set_timesteps(sigmas=schedule_sigmas("beta", n, sigma_table(scheduler.alphas_cumprod)).tolist())
        assert captured["timesteps"] == [float(scheduler.timesteps[k]) for k in captured["capture_steps"]]
        scheduler.set_timesteps(n)
        assert captured["timesteps"] != [float(scheduler.timesteps[k]) for k in captured["capture_steps"]]
    index = json.loads((tmp_path / "shortcut.work" / "trajectories" / "beta_steps6" / "index.json").read_text())
    assert index["schedule"] == "beta" and len(index["sigmas"]) == 7
    # A band no step of a beta run reaches is refused, naming the run, before anything is captured.
    with pytest.raises(SystemExit, match=r"no step of a 6-step beta run of this teacher hands off in \[1.0, 2.0\]"):
        distill("none", band=("1", "2"))
    assert not (tmp_path / "none.work" / "trajectories").exists()


def test_cli_distills_a_teacher_folder_into_one_shortcut_file(tiny_sd_pipeline, tmp_path, capsys):
    from direct_distill.__main__ import main

    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\n\ncoat\n")
    out = tmp_path / "shortcut.safetensors"
    assert main(["distill", "shortcut", "--teacher", str(tmp_path / "teacher"), "--out", str(out),
                 "--prompts", str(tmp_path / "prompts.txt"), "--trajectories", "2", "--teacher-steps", "5",
                 "--capture-band", "150", "400", "--stage1-steps", "2", "--stage2-steps", "1", "--batch-size", "2",
                 "--holdout", "0.5", "--save-dtype", "float16"]) == 0
    loaded = load_shortcut(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert loaded.teacher == str(tmp_path / "teacher") and loaded.metadata["extra"]["guidance_scale"] == 7.5
    assert loaded.teacher_unet_shape_fingerprint == identity(tiny_sd_pipeline.unet)
    assert (tmp_path / "shortcut.work" / "trajectories" / "steps5" / "index.json").is_file()
    assert loaded.metadata["extra"]["captured"][0]["capture_steps"] == [2, 3]  # t = 377, 165 of 999, 649, 377, 165, 0
    assert "held-out PSNR after stage 1+2" in capsys.readouterr().out
