"""The committed lab students, in a real ComfyUI: the lab teacher's UNet loaded as a ComfyUI model, each student
applied by ComfyUI's stock LoRA loader, gives the UNet that diffusers' load_student gives, at the student's own
timesteps. (The lab VAE is 1-channel, which ComfyUI's VAE class cannot load; the UNet is SD1.5-shaped.)"""

import copy
import importlib
import logging
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import pytest
import torch

from .test_comfy_student_lora import comfy_model_from
from .tiny_models import TinySD15

REPO = Path(__file__).resolve().parents[2]
STUDENTS = sorted((REPO / "lab" / "assets" / "students").glob("*.safetensors"))

# The lab UNet (lab/teacher.py build_unet) in comfy's openaimodel terms: three levels of 32, 64, 64 channels,
# one res block each, cross-attention on the first two; diffusers' attention_head_dim 8 is its head count.
LAB_UNET_CONFIG = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
    transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    context_dim=64, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_checkpoint=False, use_temporal_attention=False,
    use_temporal_resblock=False, dtype=torch.float32,
)


class LabSD15(TinySD15):
    unet_extra_config = {"num_heads": 8, "num_head_channels": -1}


@pytest.fixture(scope="module")
def lab(comfy_loaded):
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(REPO / "lab" / "assets" / "teacher")
    teacher.set_progress_bar_config(disable=True)
    pipelines = importlib.import_module(f"{comfy_loaded.__name__}.pipelines")
    return teacher, pipelines.load_student


@pytest.mark.skipif(not STUDENTS, reason="no lab student is committed yet")
@pytest.mark.parametrize("path", STUDENTS, ids=[p.stem for p in STUDENTS])
@torch.no_grad()
def test_committed_student_gives_the_same_unet_in_comfyui_and_diffusers(lab, path, caplog):
    teacher, load_student = lab
    pipe = copy.deepcopy(teacher)
    info = load_student(pipe, path)

    comfy_model = comfy_model_from(teacher.unet, LabSD15(dict(LAB_UNET_CONFIG)))
    with caplog.at_level(logging.WARNING):
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(comfy_model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text
    assert len(patched.patches) == len(info.target_modules)

    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor(info.nfe_schedules[info.default_nfe]["timesteps"])
    x = torch.randn(len(timesteps), 4, 8, 8, generator=g)
    ids = teacher.tokenizer(["sneaker"] * len(timesteps), padding="max_length", return_tensors="pt",
                            max_length=teacher.tokenizer.model_max_length, truncation=True).input_ids
    c = teacher.text_encoder(ids)[0]
    comfy.model_management.load_models_gpu([patched])
    try:
        comfy_out = patched.model.diffusion_model(x, timesteps=timesteps, context=c)
    finally:
        patched.unpatch_model()
    diffusers_out = pipe.unet(x, timesteps, c).sample
    assert (diffusers_out - teacher.unet(x, timesteps, c).sample).abs().max() > 1e-3  # the student differs ...
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=0)  # ... identically in both doors
