"""LoRA distillation of an SDXL-style teacher (two text encoders, the added embedding of pooled text and size ids):
the student conditions the UNet as StableDiffusionXLPipeline does, and an SFD run from the command line on an SDXL
folder writes a student that load_student samples with exactly its training-time update."""

import copy

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from peft import set_peft_model_state_dict

from direct_distill.models.student_file import read_student
from direct_distill.pipelines import load_student
from direct_distill.schedulers.few_step_presets import PRESETS
from direct_distill.schedulers.grids import CLEAN, student_schedules
from direct_distill.schedulers.noise import alphas_cumprod_from_config
from direct_distill.schedulers.scheduling_presets import preset_scheduler
from direct_distill.schedulers.scheduling_student import StudentScheduler
from direct_distill.training.cli import main
from direct_distill.training.config import LoraSpec
from direct_distill.training.lora import STUDENT, LoraStudent


def test_the_student_conditions_an_sdxl_unet_as_its_pipeline_does(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    seen = []

    def record(module, args, kwargs, output):
        seen.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    pipe("bag", num_inference_steps=1, guidance_scale=3.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    handle.remove()
    (args, kwargs, output), = seen
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)  # the pipeline's CFG batch: empty prompt, "bag"
    uncond, conditional = output.chunk(2)
    student = LoraStudent(pipe, LoraSpec(rank=2, alpha=4.0))
    ours = student.unet_output(args[0][:1], int(args[1]), student.embed(["bag"]), adapter=None, guidance=3.0)
    torch.testing.assert_close(ours, uncond + 3.0 * (conditional - uncond), atol=1e-5, rtol=1e-5)
    empty = student.embed([""])  # SDXL's pipeline gives the empty prompt zeros (force_zeros_for_empty_prompt)
    assert not empty.context.any() and not empty.pooled.any()


def test_an_sfd_student_of_an_sdxl_folder_samples_as_it_was_trained(tiny_sdxl_pipeline, tmp_path, capsys):
    bare = copy.deepcopy(tiny_sdxl_pipeline)
    tiny_sdxl_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")
    out = tmp_path / "sdxl_sfd.safetensors"
    assert main(["sfd", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out), "--nfe", "1", "--default-nfe", "1", "--steps", "2", "--batch-size", "2",
                 "--rank", "2", "--teacher-substeps", "2", "--lr", "1e-2", "--warmup-steps", "0",
                 "--guidance", "2"]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    lora, info = read_student(out)
    assert info.teacher_unet_config["addition_embed_type"] == "text_time"
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)

    reference = LoraStudent(copy.deepcopy(bare), LoraSpec(rank=info.rank, alpha=info.alpha))
    set_peft_model_state_dict(reference.unet, lora, adapter_name=STUDENT)
    pipe = copy.deepcopy(bare)
    load_student(pipe, out)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    latent = pipe("bag", latents=noise.clone(), guidance_scale=info.guidance, output_type="latent").images
    assert calls == [999]
    with torch.no_grad():
        expected = reference.ddim_step(noise, 999, CLEAN, reference.embed(["bag"]))
    torch.testing.assert_close(latent, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["student", "sdxl-lightning-4step", "hyper-sdxl-4step", "tcd-sdxl", "lcm-sdxl"])
def test_base_and_refiner_split_a_pinned_schedule_at_denoising_end_and_start(tiny_sdxl_pipeline, scheduler):
    """SDXL's ensemble of expert denoisers: the base stops at denoising_end=0.5 and the image-to-image pipeline
    goes on from denoising_start=0.5. Under a scheduler that pins the LoRA's steps, the two halves run the four
    steps between them, once each, and (for the deterministic samplers) land on the whole run's latent."""
    base = tiny_sdxl_pipeline
    config = base.scheduler.config
    if scheduler == "student":
        schedules = student_schedules({4: [999, 749, 499, 249]}, alphas_cumprod_from_config(config))
        base.scheduler = StudentScheduler.from_config(config, nfe_schedules={"4": schedules[4]}, default_nfe=4)
    else:
        base.scheduler = preset_scheduler(PRESETS[scheduler], config, 50)
    refiner = StableDiffusionXLImg2ImgPipeline(**base.components)
    refiner.set_progress_bar_config(disable=True)
    calls = []
    base.unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))
    run = dict(num_inference_steps=4, guidance_scale=1.0, output_type="latent")

    whole = base("bag", generator=torch.Generator().manual_seed(0), **run).images
    steps = list(calls)
    calls.clear()
    half = base("bag", denoising_end=0.5, generator=torch.Generator().manual_seed(0), **run).images
    first = list(calls)
    calls.clear()
    out = refiner("bag", image=half, denoising_start=0.5, generator=torch.Generator().manual_seed(0), **run).images
    assert len(steps) == 4 and (first, calls) == (steps[:2], steps[2:])
    if scheduler != "lcm-sdxl":  # LCM noises again after every step: its halves draw other noise than the whole run
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
