"""The student file (save_student/read_student) and load_student, on tiny SD and SDXL pipelines."""

import copy
import dataclasses
import functools
import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from direct_distill.models.io import FileFormatError, atomic_save_file, read_safetensors
from direct_distill.models.nafnet import TimeEmbedNAFNet, TwoStageShortcut
from direct_distill.models.shortcut_file import save_shortcut
from direct_distill.models.student_file import (StudentInfo, kohya_name, read_student, save_student,
                                                unet_architecture, unet_fingerprint)
from direct_distill.pipelines import load_student
from direct_distill.schedulers import ExpKarrasScheduler, alphas_cumprod_from_config, sigma_table, t_to_sigma
from direct_distill.schedulers.scheduling_student import StudentScheduler

RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: the alpha / rank scale must survive both loaders
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
STUDENT_TIMESTEPS = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}
SD_NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_TABLE = sigma_table(alphas_cumprod_from_config(SD_NOISE))


def nfe_schedules(timesteps=STUDENT_TIMESTEPS, table=SD_TABLE):
    return {n: {"timesteps": t, "sigmas": t_to_sigma(torch.tensor(t), table).tolist() + [0.0]}
            for n, t in timesteps.items()}


def student_info(unet, **changes) -> StudentInfo:
    fields = dict(method="progressive", teacher="tests/tiny-sd", teacher_unet_fingerprint=unet_fingerprint(unet),
                  teacher_unet_config=unet_architecture(unet), prediction_type="epsilon",
                  nfe_schedules=nfe_schedules(), default_nfe=4, comfy_sampler="ddim", guidance=1.5,
                  extra={"steps": 10})
    return StudentInfo(**{**fields, **changes})


def add_lora(unet, targets=TARGETS, seed=1, alpha=ALPHA):
    """The peft LoRA a distillation method would train: random A and (non-zero) B."""
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    return unet


def unet_inputs(context_dim=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 321.5]),
            torch.randn(2, 7, context_dim, generator=g))


def lora_wrapped(unet):
    return {name for name, module in unet.named_modules() if getattr(module, "lora_A", None)}


@torch.no_grad()
def unet_out(unet, inputs, **kwargs):
    return unet(*inputs, **kwargs).sample


class UNetCalls:
    """Counts the UNet's forward calls and records their batch sizes and timesteps."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        sample, t = args[:2] if len(args) >= 2 else (args[0], kwargs["timestep"])
        self.calls.append((sample.shape[0], float(torch.as_tensor(t).flatten()[0])))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a peft-wrapped UNet, the student file saved from it, the info as saved), shared: read-only tests."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    info = student_info(unet)
    trained = add_lora(unet)
    path = save_student(tmp_path_factory.mktemp("saved") / "student.safetensors", get_peft_model_state_dict(trained),
                        rank=RANK, alpha=ALPHA, metadata=info)
    return trained, path, info


@pytest.fixture
def student(tiny_sd_pipeline, tmp_path):
    """(pipeline without the LoRA, the peft-wrapped UNet it was saved from, file, info as saved)."""
    trained = add_lora(copy.deepcopy(tiny_sd_pipeline.unet))
    info = student_info(tiny_sd_pipeline.unet)
    path = save_student(tmp_path / "student.safetensors", get_peft_model_state_dict(trained), rank=RANK, alpha=ALPHA,
                        metadata=info)
    return tiny_sd_pipeline, trained, path, info


# --- the file is read the same by diffusers as by peft -------------------------------------------------


def test_load_lora_weights_reproduces_the_peft_unet(student):
    pipe, trained, path, _ = student
    inputs = unet_inputs()
    base = unet_out(pipe.unet, inputs)
    pipe.load_lora_weights(str(path))
    loaded = unet_out(pipe.unet, inputs)
    assert (loaded - base).abs().max() > 1e-2  # the LoRA does something ...
    torch.testing.assert_close(loaded, unet_out(trained, inputs), atol=1e-5, rtol=0)  # ... and exactly that


def test_every_linear_and_conv_of_an_sd_unet_survives_the_key_form(tiny_sd_pipeline, tmp_path):
    # Module names with underscores (to_out_0, proj_in, ff_net_0_proj, time_emb_proj, conv_shortcut, ...).
    pipe = tiny_sd_pipeline
    modules = [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    trained = add_lora(copy.deepcopy(pipe.unet), targets=modules)
    path = save_student(tmp_path / "all.safetensors", get_peft_model_state_dict(trained), rank=RANK, alpha=ALPHA,
                        metadata=student_info(pipe.unet))
    pipe.load_lora_weights(str(path))
    assert lora_wrapped(pipe.unet) == set(modules)
    inputs = unet_inputs()
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(trained, inputs), atol=1e-5, rtol=0)


def test_every_linear_and_conv_of_an_sdxl_unet_survives_the_key_form(tiny_sdxl_pipeline, tmp_path):
    # SDXL's add_embedding.linear_1/2 need their LDM names (label_emb_0_0/2) for diffusers to find them.
    pipe = tiny_sdxl_pipeline
    modules = [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert "add_embedding.linear_1" in modules and kohya_name("add_embedding.linear_1") == "lora_unet_label_emb_0_0"
    trained = add_lora(copy.deepcopy(pipe.unet), targets=modules)
    path = save_student(tmp_path / "xl.safetensors", get_peft_model_state_dict(trained), rank=RANK, alpha=ALPHA,
                        metadata=student_info(pipe.unet, comfy_sampler="dpmpp_2m"))
    load_student(pipe, path)
    assert lora_wrapped(pipe.unet) == set(modules)
    inputs = unet_inputs(context_dim=64)
    cond = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}}
    torch.testing.assert_close(unet_out(pipe.unet, inputs, **cond), unet_out(trained, inputs, **cond),
                               atol=1e-5, rtol=0)
    calls = UNetCalls(pipe.unet)
    pipe("a shirt", num_inference_steps=2, output_type="latent")
    assert [t for _, t in calls.calls] == [999, 499] and pipe.scheduler.config.solver_order == 2


def test_file_holds_kohya_keys_and_an_alpha_for_every_module(saved):
    _, path, _ = saved
    tensors, metadata = read_safetensors(path)
    assert all(k.startswith("lora_unet_") for k in tensors)  # diffusers' kohya path needs every key so
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[f"{name}.lora_down.weight"].shape == (RANK, 32)
    assert tensors[f"{name}.lora_up.weight"].shape == (32, RANK)
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(tensors) // 3 and all(a.ndim == 0 and a.item() == ALPHA for a in alphas)
    assert {k: json.loads(v) for k, v in metadata.items()}["format"] == "direct_distill.student"


# --- load_student ---------------------------------------------------------------------------------------


def test_load_student_applies_the_lora_and_the_schedule(student):
    pipe, trained, path, saved = student
    info = load_student(pipe, path)
    assert info == dataclasses.replace(saved, rank=RANK, alpha=ALPHA, target_modules=info.target_modules)
    inputs = unet_inputs()
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(trained, inputs), atol=1e-5, rtol=0)

    assert isinstance(pipe.scheduler, StudentScheduler) and pipe.scheduler.config.solver_order == 1  # ddim
    pipe.scheduler.set_timesteps(info.default_nfe)
    assert pipe.scheduler.timesteps.tolist() == info.nfe_schedules[info.default_nfe]["timesteps"]
    torch.testing.assert_close(pipe.scheduler.sigmas.double(),
                               torch.tensor(info.nfe_schedules[info.default_nfe]["sigmas"], dtype=torch.float64))

    calls = UNetCalls(pipe.unet)
    pipe("a shirt", output_type="latent")  # the pipeline's defaults: 50 steps asked, guidance 7.5 (CFG on)
    assert calls.calls == [(2, t) for t in info.nfe_schedules[info.default_nfe]["timesteps"]]
    calls.calls.clear()
    pipe("a shirt", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert calls.calls == [(1, 999.0), (1, 499.0)]
    with pytest.raises(ValueError, match=r"num_inference_steps in \[1, 2, 4\] \(default 4\), got 3"):
        pipe("a shirt", num_inference_steps=3, output_type="latent")


def test_image_to_image_runs_the_students_own_steps_or_says_what_to_pass(student):
    """diffusers' img2img keeps strength's share of the steps it asked for: of its default 50, a start past the
    student's 4 steps, which would return the noised image undenoised, or within them, which would run fewer of
    them than the strength asks, so both are refused; with a step count of the student's, strength picks the last
    of its timesteps as usual."""
    pipe, _, path, _ = student
    load_student(pipe, path)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = UNetCalls(pipe.unet)
    with pytest.raises(ValueError, match=r"sliced off the first 25 of 50 steps, but this scheduler samples 4: nothing "
                                         r"would be denoised. Pass num_inference_steps \(one of this student's 1, 2, "
                                         r"4\) with strength or denoising_start"):
        img2img("a shirt", image=image, strength=0.5, guidance_scale=1.0, output_type="latent")
    assert calls.calls == []
    # at 0.95, step 3 of the 4: one step where 3.8 were meant
    with pytest.raises(ValueError, match=r"sliced off the first 3 of 50 steps, but this scheduler samples 4: 1 of "
                                         r"them would run, not the share of 4 the strength asks"):
        img2img("a shirt", image=image, strength=0.95, guidance_scale=1.0, output_type="latent")
    assert calls.calls == []
    img2img("a shirt", image=image, strength=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    assert calls.calls == [(1, 499.0), (1, 249.0)]
    calls.calls.clear()
    img2img("a shirt", image=image, strength=1.0, guidance_scale=1.0, output_type="latent")  # all of the default 4
    assert calls.calls == [(1, t) for t in (999.0, 749.0, 499.0, 249.0)]


def test_a_pipeline_saved_with_a_students_scheduler_loads_again_with_it(student, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, _, path, info = student
    load_student(pipe, path)
    pipe.save_pretrained(tmp_path / "saved")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert type(again.scheduler) is StudentScheduler and again.scheduler.supported_nfes == sorted(info.nfe_schedules)


def test_student_scheduler_saves_and_reloads_its_table(student, tmp_path):
    pipe, _, path, info = student
    load_student(pipe, path)
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    again = StudentScheduler.from_pretrained(tmp_path / "scheduler")
    assert again.supported_nfes == [1, 2, 4] and again.config.default_nfe == 4
    again.set_timesteps(2)
    assert again.timesteps.tolist() == [999.0, 499.0]


def test_the_way_back_builds_the_scheduler_the_student_replaced(student, tmp_path):
    """The README's way back to the model (delete the adapter, ExpKarrasScheduler.from_config of the student's
    scheduler config) gives the scheduler the user had, its curvature and solver included, also after a second
    student and from a saved pipeline (before: p 2.5 and solver_order 3 came back as the defaults, 1.0 and 2)."""
    pipe, _, path, _ = student
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config, exp_karras_p=2.5, solver_order=3,
                                                    final_sigmas_type="sigma_min", euler_at_final=True)
    before = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    load_student(pipe, path)
    pipe.delete_adapters("student")
    load_student(pipe, path, adapter_name="again")
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    for config in (pipe.scheduler.config, StudentScheduler.from_pretrained(tmp_path / "scheduler").config):
        back = ExpKarrasScheduler.from_config(config)
        assert {k: v for k, v in back.config.items() if not k.startswith("_")} == before


def test_load_student_scale_is_the_lora_strength(student):
    pipe, trained, path, _ = student
    # Strength 0.5 at alpha 8 is the same update as strength 1 at alpha 4.
    reference = add_lora(copy.deepcopy(pipe.unet), alpha=ALPHA / 2)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(trained))
    load_student(pipe, path, scale=0.5)
    inputs = unet_inputs()
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(reference, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [float("nan"), "0.5", True])
def test_a_scale_that_is_no_finite_number_is_refused_before_anything_changes(student, scale):
    pipe, _, path, _ = student
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match=f"student.safetensors: scale must be a finite number .* got {scale!r}"):
        load_student(pipe, path, scale=scale)
    assert_unchanged(pipe, before)
    load_student(pipe, path)  # and the name is still free


@pytest.mark.parametrize("adapter_name", [None, "", 3])
def test_an_adapter_name_that_is_no_string_is_refused_before_anything_changes(student, adapter_name):
    """None once loaded the student under diffusers' own name, switched off, and the teacher sampled on the
    student's schedule without a word."""
    pipe, _, path, _ = student
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match=f"student.safetensors: adapter_name must be a non-empty string .* got "
                                         f"{adapter_name!r}"):
        load_student(pipe, path, adapter_name=adapter_name)
    assert_unchanged(pipe, before)


def test_a_pipeline_with_fused_attention_projections_is_refused_before_anything_changes(student):
    """Its attention runs the fused to_qkv weights: the student's to_q/to_k/to_v layers would load and do nothing."""
    pipe, _, path, _ = student
    pipe.fuse_qkv_projections()
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="student.safetensors: the pipeline's attention projections are fused .*"
                                         "call pipe.unfuse_qkv_projections\\(\\) first"):
        load_student(pipe, path)
    assert_unchanged(pipe, before)
    pipe.unfuse_qkv_projections()
    load_student(pipe, path)


def test_an_image_to_image_pipeline_takes_the_students_scheduler_without_rewriting_it(student, recwarn):
    """The README's img2img step: diffusers warns about, and rewrites, a scheduler config whose steps_offset is
    not 1 (the student's was DPM-Solver's 0)."""
    pipe, _, path, _ = student
    load_student(pipe, path)
    config = dict(pipe.scheduler.config)
    StableDiffusionImg2ImgPipeline(**pipe.components)
    assert not [w for w in recwarn if "steps_offset" in str(w.message)]
    assert dict(pipe.scheduler.config) == config and config["steps_offset"] == 1


def test_an_x0_students_scheduler_refuses_to_read_the_model_once_its_adapter_is_off(student, tmp_path):
    """Its scheduler reads the UNet's output as x0: with the adapter off or deleted, that output is the model's
    epsilon. An epsilon student's scheduler still runs the model on its schedule (a fair experiment)."""
    pipe, trained, _, _ = student
    path = save_student(tmp_path / "x0.safetensors", get_peft_model_state_dict(trained), rank=RANK, alpha=ALPHA,
                        metadata=student_info(pipe.unet, prediction_type="sample", teacher_prediction_type="epsilon"))
    load_student(pipe, path)
    pipe.scheduler.set_timesteps(4)
    pipe.disable_lora()
    with pytest.raises(ValueError, match="reads the UNet's output as sample, as the student 'student' was trained "
                                         "to give, but that adapter is switched off \\(active now: none\\) and the "
                                         "model predicts epsilon: load the student again"):
        pipe.scheduler.set_timesteps(4)
    pipe.enable_lora()
    pipe.scheduler.set_timesteps(4)
    pipe.set_adapters(["student"], [0.5])  # half the student: its output read as x0 would be part epsilon
    with pytest.raises(ValueError, match="that adapter is not at strength 1"):
        pipe.scheduler.set_timesteps(4)
    pipe.set_adapters(["student"], [1.0])
    pipe.scheduler.set_timesteps(4)
    pipe.delete_adapters("student")
    with pytest.raises(ValueError, match="that adapter is deleted"):
        pipe.scheduler.set_timesteps(4)
    epsilon = save_student(tmp_path / "eps.safetensors", get_peft_model_state_dict(trained), rank=RANK, alpha=ALPHA,
                           metadata=student_info(pipe.unet))
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    load_student(pipe, epsilon, adapter_name="eps")
    pipe.disable_lora()
    pipe.scheduler.set_timesteps(4)


def test_a_call_scaling_an_x0_students_lora_is_refused_and_an_epsilon_students_runs(student, tmp_path):
    """``cross_attention_kwargs={"scale": s}`` scales every LoRA for the call, past the scheduler's own check (which
    runs before, with the adapter at strength 1): an x0 student's output would be read as x0 while part epsilon."""
    pipe, trained, _, _ = student
    state = get_peft_model_state_dict(trained)
    x0 = save_student(tmp_path / "x0.safetensors", state, rank=RANK, alpha=ALPHA,
                      metadata=student_info(pipe.unet, prediction_type="sample", teacher_prediction_type="epsilon"))
    epsilon = save_student(tmp_path / "eps.safetensors", state, rank=RANK, alpha=ALPHA,
                           metadata=student_info(pipe.unet))
    load_student(pipe, x0)
    call = functools.partial(pipe, "a shirt", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    with pytest.raises(ValueError, match="cross_attention_kwargs scale 0.5 would run the student 'student' at that "
                                         "strength, but its scheduler reads the UNet's output as sample, which the "
                                         "student gives at strength 1 only \\(the model predicts epsilon\\)"):
        call(cross_attention_kwargs={"scale": 0.5})
    call(cross_attention_kwargs={"scale": 1.0})
    pipe.disable_lora()  # off (its scheduler refuses that on its own): the model's scheduler may scale other LoRAs
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    call(cross_attention_kwargs={"scale": 0.5})
    pipe.enable_lora()
    pipe.delete_adapters("student")
    load_student(pipe, epsilon)  # the same name, now an epsilon student: a scaled call is a fair experiment
    call(cross_attention_kwargs={"scale": 0.5})


def test_a_zero_terminal_snr_teachers_student_samples_on_its_table():
    # sigmas from the rescaled table (what training writes), timesteps where the UNet is called
    noise = dict(SD_NOISE, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    table = sigma_table(alphas_cumprod_from_config(noise))
    schedules = {str(k): v for k, v in nfe_schedules({2: [999, 499]}, table=table).items()}
    student = StudentScheduler.from_config(noise, nfe_schedules=schedules, default_nfe=2)
    student.set_timesteps(2)
    assert student.timesteps.tolist() == [999, 499] and student.config.rescale_betas_zero_snr
    student.set_begin_index(0)  # image-to-image at strength 1 in float16: 4096 squared overflowed, all zeros
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    half = student.add_noise(x0.half(), eps.half(), student.timesteps[:1])
    torch.testing.assert_close(half.float(), student.add_noise(x0, eps, student.timesteps[:1]), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(student.sigmas.double(), torch.tensor(schedules["2"]["sigmas"], dtype=torch.float64))
    with pytest.raises(ValueError, match="not the model timesteps of its sigmas"):  # read on the plain table
        StudentScheduler.from_config(dict(noise, rescale_betas_zero_snr=False), nfe_schedules=schedules,
                                     default_nfe=2)


def test_student_ddim_schedule_is_diffusers_ddim():
    # The "ddim" student sampler (DPM-Solver++ of order 1) at t = 999, 749, 499, 249 is DDIMScheduler's
    # 4-step "trailing" run ending at alpha = 1.
    ddim = DDIMScheduler(**SD_NOISE, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                         clip_sample=False)
    ddim.set_timesteps(4)
    student = StudentScheduler.from_config(SD_NOISE, nfe_schedules={str(k): v for k, v in nfe_schedules().items()},
                                           default_nfe=4)
    student.set_timesteps(4)
    assert ddim.timesteps.tolist() == student.timesteps.tolist()
    x0 = x1 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ddim.timesteps:
        x0 = ddim.step(torch.tanh(x0) * 0.5, t, x0).prev_sample
    for t in student.timesteps:
        x1 = student.step(torch.tanh(x1) * 0.5, t, x1).prev_sample
    torch.testing.assert_close(x0, x1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", [dict(algorithm_type="sde-dpmsolver++"), dict(thresholding=True),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(solver_type="heun", lower_order_final=False, solver_order=3)])
def test_a_student_steps_as_trained_whatever_solver_the_pipeline_was_set_to(solver):
    # a pipeline switched to DPM++ 2M SDE (or DPM-Solver, thresholding) before the student was loaded
    config = DPMSolverMultistepScheduler(**SD_NOISE, **solver).config
    schedules = {str(k): v for k, v in nfe_schedules().items()}
    student = StudentScheduler.from_config(config, nfe_schedules=schedules, default_nfe=4)
    reference = StudentScheduler.from_config(SD_NOISE, nfe_schedules=schedules, default_nfe=4)
    results = []
    for scheduler, seed in ((student, 1), (student, 2), (reference, 3)):
        scheduler.set_timesteps(4)
        x = torch.ones(1, 4, 8, 8)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(x) * 0.5, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)  # the student's own step


def test_student_scheduler_refuses_sigmas_of_another_noise_schedule():
    other = sigma_table(DDIMScheduler(beta_schedule="linear").alphas_cumprod)
    with pytest.raises(ValueError, match="are not the model timesteps of its sigmas"):
        StudentScheduler(nfe_schedules={str(k): v for k, v in nfe_schedules(table=other).items()}, default_nfe=4)


def pipeline_state(pipe):
    return (pipe.scheduler, copy.deepcopy(dict(pipe.scheduler.config)), getattr(pipe.unet, "peft_config", None),
            {k: v.clone() for k, v in pipe.unet.state_dict().items()})


def assert_unchanged(pipe, before):
    scheduler, config, peft_config, state = before
    assert pipe.scheduler is scheduler and dict(pipe.scheduler.config) == config
    assert getattr(pipe.unet, "peft_config", None) == peft_config
    after = pipe.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("change, named", [
    (dict(attention_head_dim=4), "config attention_head_dim: student [8, 8], pipeline [4, 4]"),  # same shapes
    (dict(block_out_channels=(32, 96)), "LoRA modules do not fit, e.g. mid_block.attentions.0"),
])
def test_student_for_another_unet_is_refused_before_anything_changes(student, change, named):
    pipe, _, path, _ = student
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, **change})
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="student.safetensors: this student was made for another UNet") as err:
        load_student(pipe, path)
    assert named in str(err.value)
    assert_unchanged(pipe, before)


def test_a_pipeline_predicting_another_type_than_the_teacher_is_refused_before_anything_changes(student):
    # the UNet fingerprint cannot tell SD2's 768-v model from its 512 epsilon base: the scheduler's config can
    pipe, _, path, info = student
    assert info.teacher_prediction_type == "epsilon"
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="student.safetensors: the student was distilled from a model predicting "
                                         "epsilon, this pipeline's scheduler predicts v_prediction"):
        load_student(pipe, path)
    assert_unchanged(pipe, before)


def test_other_adapters_keep_the_fingerprint_and_a_taken_name_is_refused(student, tmp_path):
    pipe, trained, path, info = student
    fingerprint = unet_fingerprint(pipe.unet)
    load_student(pipe, path, adapter_name="first")
    assert unet_fingerprint(pipe.unet) == fingerprint == info.teacher_unet_fingerprint
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="already has an adapter named 'first'"):
        load_student(pipe, path, adapter_name="first")
    assert_unchanged(pipe, before)


# --- malformed files ------------------------------------------------------------------------------------


def rewrite(path, tensors=None, **metadata_changes):
    """A copy of a student file with some tensors or (raw string) metadata entries changed (None: removed)."""
    old_tensors, metadata = read_safetensors(path)
    for k, v in metadata_changes.items():
        if v is None:
            metadata.pop(k)
        else:
            metadata[k] = v
    out = path.with_name("bad.safetensors")
    atomic_save_file(old_tensors if tensors is None else tensors(old_tensors), out, metadata)
    return out


def bad_schedule(path):
    return rewrite(path, nfe_schedules=json.dumps({"4": {"timesteps": [999, 499, 749, 249],
                                                         "sigmas": [14.6, 4, 1, 0.5, 0]}}))


def shortcut_file(path):
    tiny = dict(width=8, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), in_channels=4, out_channels=4)
    out = path.with_name("shortcut.safetensors")
    save_shortcut(out, TwoStageShortcut(TimeEmbedNAFNet(**tiny)), t_band=(30, 160), teacher="t",
                  teacher_unet_shape_fingerprint="0123456789abcdef", latent_channels=4)
    return out


def not_safetensors(path):
    out = path.with_name("student.ckpt")
    out.write_bytes(b"PK\x03\x04 a pickle zip, not safetensors")
    return out


@pytest.mark.parametrize("make_bad, message", [
    (not_safetensors, r"student.ckpt: a pickled PyTorch checkpoint \(.ckpt/.pt/.bin\), not safetensors"),
    (lambda p: (p.with_name("noise.safetensors").write_bytes(b"\x10\x00 random bytes"), p.with_name(
        "noise.safetensors"))[1], "noise.safetensors: not a readable safetensors file"),
    (lambda p: p.with_name("missing.safetensors"), "missing.safetensors: no such file"),
    (lambda p: (p.with_name("a_folder.safetensors").mkdir(), p.with_name("a_folder.safetensors"))[1],
     "a_folder.safetensors: a folder, not a .safetensors file"),
    (shortcut_file, "shortcut.safetensors: not a Direct Distill student file: format 'direct_distill.shortcut'"),
    (lambda p: rewrite(p, format=None), "bad.safetensors: not a Direct Distill student file: no 'format'"),
    (lambda p: rewrite(p, nfe_schedules="{'4': [999"), "bad.safetensors: metadata entry 'nfe_schedules' is not valid"),
    (lambda p: rewrite(p, nfe_schedules=None), "bad.safetensors: metadata has no 'nfe_schedules' entry"),
    (lambda p: rewrite(p, nfe_schedules="{}"), "bad.safetensors: metadata 'nfe_schedules' is empty"),
    (bad_schedule, r"bad.safetensors: invalid student metadata: nfe_schedules\[4\]: timesteps must be"),
    (lambda p: rewrite(p, format_version="2"), "bad.safetensors: student format version 2"),
    (lambda p: rewrite(p, default_nfe="true"), "bad.safetensors: invalid student metadata: default_nfe True is not"),
    (lambda p: rewrite(p, tensors=lambda t: dict(list(t.items())[1:])), "bad.safetensors: tensors do not match"),
    (lambda p: rewrite(p, tensors=lambda t: {k: v * 2 if k.endswith(".alpha") else v for k, v in t.items()}),
     "bad.safetensors: .*alpha is 16.0, but the metadata says alpha 8.0"),
    (lambda p: rewrite(p, tensors=lambda t: {k: v if k.endswith(".alpha") else v.int() for k, v in t.items()}),
     "bad.safetensors: .*lora_down.weight holds dtype torch.int32: not the weights of a trained LoRA"),
    (lambda p: rewrite(p, tensors=lambda t: {k: v if k.endswith(".alpha") else v * float("nan")
                                             for k, v in t.items()}),
     "bad.safetensors: .*holds non-finite values"),
    (lambda p: rewrite(p, tensors=lambda t: {k: v[..., None, None] if k.endswith("lora_up.weight") else v
                                             for k, v in t.items()}),
     "bad.safetensors: .*LoRA halves do not fit each other"),
])
def test_malformed_files_raise_one_error_naming_the_file(saved, make_bad, message):
    with pytest.raises(FileFormatError, match=message):
        read_student(make_bad(saved[1]))


def test_a_file_whose_halves_do_not_fit_its_own_unet_is_refused_before_anything_changes(student):
    """The layers were checked only when the fingerprint differed: a down half of another width failed deep in
    torch, and left empty LoRA containers behind."""
    pipe, _, path, _ = student
    first = next(k for k in read_safetensors(path)[0] if k.endswith("lora_down.weight"))
    bad = rewrite(path, tensors=lambda t: {**t, first: torch.zeros(t[first].shape[0], t[first].shape[1] + 5)})
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="bad.safetensors: this student was made for another UNet: 1 of .* LoRA "
                                         "modules do not fit"):
        load_student(pipe, bad)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("make_bad", [not_safetensors, shortcut_file, bad_schedule])
def test_load_student_refuses_malformed_files_before_anything_changes(student, make_bad):
    pipe, _, path, _ = student
    before = pipeline_state(pipe)
    with pytest.raises(FileFormatError, match=f"{make_bad(path)}: "):
        load_student(pipe, make_bad(path))
    assert_unchanged(pipe, before)


# --- metadata -------------------------------------------------------------------------------------------


def test_metadata_and_tensors_round_trip(saved):
    trained, path, saved = saved
    lora, info = read_student(path)
    assert info == dataclasses.replace(saved, rank=RANK, alpha=ALPHA,
                                       target_modules=sorted({k.split(".lora_")[0] for k in lora}))
    assert info.nfe_schedules[4]["timesteps"] == STUDENT_TIMESTEPS[4] and info.diffusers_scheduler == "DDIMScheduler"
    assert info.extra == {"steps": 10} and info.guidance == 1.5 and info.solver_order == 1
    expected = get_peft_model_state_dict(trained)
    assert lora.keys() == expected.keys() and all(torch.equal(lora[k], v) for k, v in expected.items())
    _, raw = read_safetensors(path)
    assert all(isinstance(json.loads(v), object) for v in raw.values())
    assert json.loads(raw["nfe_schedules"])["2"]["timesteps"] == [999.0, 499.0]


def test_diffusers_key_form_and_unet_prefix_are_accepted(saved, tmp_path):
    trained, path, info = saved
    peft_state = get_peft_model_state_dict(trained)
    diffusers_state = {"unet." + k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
                       for k, v in peft_state.items()}
    other = save_student(tmp_path / "d.safetensors", diffusers_state, rank=RANK, alpha=ALPHA, metadata=info)
    assert read_safetensors(other)[0].keys() == read_safetensors(path)[0].keys()


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=8), "rank 4"),
    (dict(alpha=0), "alpha must be"),
    (dict(state={"text_encoder.x.lora_A.weight": torch.zeros(4, 4)}), "not a UNet LoRA weight"),
    (dict(state={"a.lora_A.weight": torch.zeros(4, 4)}), "not both halves for a"),
    (dict(info=dict(default_nfe=3)), r"default_nfe 3 is not among .* \[1, 2, 4\]"),
    (dict(info=dict(comfy_sampler="lms")), "comfy_sampler must be one of"),
    (dict(info=dict(comfy_sampler="euler", diffusers_scheduler="DDIMScheduler")), "not the diffusers counterpart"),
    (dict(info=dict(prediction_type="flow")), "prediction_type must be"),
    (dict(info=dict(nfe_schedules={2: {"timesteps": [999.0], "sigmas": [1.0, 0.0]}})), "needs 2 timesteps"),
    (dict(info=dict(nfe_schedules={1: {"timesteps": [998.5], "sigmas": [14.0, 0.0]}}, default_nfe=1)),
     "whole numbers"),
])
def test_save_student_refuses_inconsistent_input(saved, tmp_path, kwargs, message):
    trained, _, _ = saved
    with pytest.raises(ValueError, match=message):
        info = student_info(trained, **kwargs.get("info", {}))
        save_student(tmp_path / "x.safetensors", kwargs.get("state", get_peft_model_state_dict(trained)),
                     rank=kwargs.get("rank", RANK), alpha=kwargs.get("alpha", ALPHA), metadata=info)
    assert not (tmp_path / "x.safetensors").exists()
