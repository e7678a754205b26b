"""One student file, two front doors: ComfyUI's stock LoRA loader (comfy.sd.load_lora_for_models) and
diffusers' load_student give the same UNet, and sampling its schedule gives the same latent."""

import copy
import importlib
import logging

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict

from .tiny_models import TINY_UNET_CONFIG, TinySD15

RANK, ALPHA = 4, 8.0
SD15_LATENT_SCALE = 0.18215  # ComfyUI hands samplers' results through the latent format's process_out


def diffusers_twin_of_tiny_sd15() -> UNet2DConditionModel:
    """The diffusers UNet with tiny_models.TINY_UNET_CONFIG's architecture (attention_head_dim = heads)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_UNET_CONFIG["context_dim"], attention_head_dim=TINY_UNET_CONFIG["num_heads"],
        norm_num_groups=32).eval()


def comfy_model_from(unet: UNet2DConditionModel, model_config=None) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL holding the diffusers UNet's weights, as a checkpoint loader would return it (the tiny
    SD1.5 architecture unless ``model_config`` names another)."""
    model_config = model_config or TinySD15(dict(TINY_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, device=None)
    to_comfy = comfy.utils.unet_to_diffusers(model_config.unet_config)  # diffusers key -> comfy key
    state = unet.state_dict()
    assert state.keys() == to_comfy.keys() & state.keys(), "the twin has weights ComfyUI does not know"
    model.diffusion_model.load_state_dict({to_comfy[k]: v for k, v in state.items()}, strict=True)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


@pytest.fixture(scope="module")
def dd(comfy_loaded):
    """direct_distill's modules, from the very copy ComfyUI loaded."""
    return lambda name: importlib.import_module(f"{comfy_loaded.__name__}.{name}")


@pytest.fixture(scope="module", params=[("ddim", torch.float32), ("dpmpp_2m", torch.float16)],
                ids=["ddim-float32", "dpmpp_2m-float16"])
def student(request, dd, tmp_path_factory):
    """(bare diffusers UNet, student file with a LoRA on every Linear and Conv2d, its info); the second stores
    the LoRA as float16 (``--save-dtype``), which both loaders cast to the float32 model."""
    sampler, dtype = request.param
    files, noise = dd("models.student_file"), dd("schedulers.noise")
    unet = diffusers_twin_of_tiny_sd15()
    targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    trained = copy.deepcopy(unet)
    torch.manual_seed(1)
    trained.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False))
    table = noise.sigma_table(noise.alphas_cumprod_from_config(
        dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")))
    timesteps = {1: [999], 4: [999, 749, 499, 249]}
    schedules = {n: {"timesteps": t, "sigmas": noise.t_to_sigma(torch.tensor(t), table).tolist() + [0.0]}
                 for n, t in timesteps.items()}
    info = files.StudentInfo(
        method="progressive", teacher="tests/tiny-sd15", teacher_unet_fingerprint=files.unet_fingerprint(unet),
        prediction_type="epsilon", nfe_schedules=schedules, default_nfe=4, comfy_sampler=sampler, guidance=1.0)
    lora = {k: v.to(dtype) for k, v in get_peft_model_state_dict(trained).items()}
    path = files.save_student(tmp_path_factory.mktemp("student") / "student.safetensors", lora, rank=RANK,
                              alpha=ALPHA, metadata=info)
    return unet, path, files.read_student(path)[1]


@pytest.fixture
def both_doors(student, dd, caplog):
    """(diffusers pipeline after load_student, ComfyUI MODEL after the stock LoRA loader)."""
    unet, path, _ = student
    comfy_model = comfy_model_from(unet)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
                                   scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                           beta_schedule="scaled_linear", skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    dd("pipelines").load_student(pipe, path)

    with caplog.at_level(logging.WARNING):
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(comfy_model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text
    return pipe, patched


def test_comfy_matches_every_lora_module(student, both_doors):
    _, patched = both_doors
    _, _, info = student
    assert len(patched.patches) == len(info.target_modules)


@torch.no_grad()
def test_comfy_and_diffusers_unets_agree(both_doors):
    pipe, patched = both_doors
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TINY_UNET_CONFIG["context_dim"], generator=g)
    t = torch.tensor([999, 321])
    comfy.model_management.load_models_gpu([patched])  # applies the LoRA patches to the weights
    try:
        comfy_eps = patched.model.diffusion_model(x, timesteps=t, context=c)
    finally:
        patched.unpatch_model()
    diffusers_eps = pipe.unet(x, t, c).sample
    bare = copy.deepcopy(pipe.unet)
    bare.disable_adapters()
    assert (diffusers_eps - bare(x, t, c).sample).abs().max() > 1e-2  # the LoRA does something ...
    torch.testing.assert_close(comfy_eps, diffusers_eps, atol=1e-5, rtol=0)  # ... the same in both


@pytest.mark.parametrize("nfe", [1, 4])
def test_sampling_the_student_schedule_gives_the_same_latent(student, both_doors, nfe):
    pipe, patched = both_doors
    _, _, info = student
    g = torch.Generator().manual_seed(3)
    noise, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, TINY_UNET_CONFIG["context_dim"], generator=g)
    cond = [[c, {}]]
    comfy_latent = comfy.sample.sample_custom(
        patched, noise, info.guidance, comfy.samplers.sampler_object(info.comfy_sampler),
        torch.tensor(info.nfe_schedules[nfe]["sigmas"]), cond, cond, torch.zeros_like(noise), disable_pbar=True, seed=0)
    # ComfyUI scales the first latent by sqrt(1 + sigma_max^2), i.e. the VP latent is the noise itself.
    diffusers_latent = pipe(prompt_embeds=c, num_inference_steps=nfe, guidance_scale=info.guidance,
                            latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(comfy_latent * SD15_LATENT_SCALE, diffusers_latent, atol=1e-4, rtol=1e-4)
