"""LoRA distillation of an SDXL-style teacher (two text encoders, the added embedding of pooled text and size ids):
the student conditions the UNet as StableDiffusionXLPipeline does, and an SFD run from the command line on an SDXL
folder writes a student that load_student samples with exactly its training-time update."""

import copy

import torch
from peft import set_peft_model_state_dict

from direct_distill.models.student_file import read_student
from direct_distill.pipelines import load_student
from direct_distill.schedulers.grids import CLEAN
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
                 "--rank", "2", "--teacher-substeps", "2", "--lr", "1e-2", "--guidance", "2"]) == 0
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
