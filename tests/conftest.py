"""Tiny diffusers pipelines built from configs (random weights, nothing downloaded)."""

import pytest
import torch

SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True,
                           set_alpha_to_one=False, prediction_type="epsilon")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Toy models run fastest on one thread, and a two-core machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="session")
def sd_scheduler_config():
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SD_SCHEDULER_CONFIG).config


def _tiny_text_encoder(tokenizer, hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                         layers_per_block=1, norm_num_groups=32, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture
def tiny_vae():
    """An AutoencoderKL with SD's structure at toy size (32 px images, 16x16 latents)."""
    torch.manual_seed(0)
    return _tiny_vae().eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from direct_distill.lab.teacher import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def tiny_sd_pipeline(tiny_tokenizer, sd_scheduler_config):
    """A StableDiffusionPipeline with SD1.5's structure at toy size (16x16 latents)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tiny_tokenizer), tokenizer=tiny_tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(sd_scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sdxl_pipeline(tiny_tokenizer):
    """A StableDiffusionXLPipeline with SDXL's structure (two text encoders, text_time embedding)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80, norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tiny_tokenizer),
        text_encoder_2=_tiny_text_encoder(tiny_tokenizer, projection=True), tokenizer=tiny_tokenizer,
        tokenizer_2=tiny_tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def check_one_step_student():
    """Asserts that a one-step student file, loaded into a copy of ``bare`` with ``load_student``, makes
    one UNet call at t = 999 and lands on the training-time generator's sample (LoRA ``lora``, ``spec``, its
    output read as the file's prediction type)."""
    import copy

    from peft import set_peft_model_state_dict

    from direct_distill.models.student_file import read_student
    from direct_distill.pipelines import load_student
    from direct_distill.training.lora import STUDENT, Conditioning, LoraStudent
    from direct_distill.training.one_step import one_step_sample

    def check(bare, path, lora, spec):
        pipe = copy.deepcopy(bare)
        load_student(pipe, path)
        calls = []
        pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
        g = torch.Generator().manual_seed(3)
        noise, cond = torch.randn(2, 4, 16, 16, generator=g), Conditioning(torch.randn(2, 7, 32, generator=g))
        latent = pipe(prompt_embeds=cond.context, latents=noise.clone(), guidance_scale=1.0,
                      output_type="latent").images
        assert calls == [999]
        reference = LoraStudent(copy.deepcopy(bare), spec, student_prediction=read_student(path)[1].prediction_type)
        set_peft_model_state_dict(reference.unet, lora, adapter_name=STUDENT)
        with torch.no_grad():
            torch.testing.assert_close(latent, one_step_sample(reference, noise, cond), atol=1e-4, rtol=1e-4)

    return check
