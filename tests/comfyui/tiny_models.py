"""A tiny SD1.5-shaped ComfyUI model (random weights from a config, nothing downloaded), small enough
to run ComfyUI's samplers on a CPU in well under a second."""

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

CONTEXT_DIM = 32

# comfy's openaimodel.UNetModel keyword arguments: two levels (32, 64 channels), attention on the first.
# transformer_depth lists the input blocks, transformer_depth_output the output blocks (consumed from the
# end, i.e. lowest resolution first). Channels stay multiples of 32: comfy's GroupNorm uses 32 groups.
TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 0], transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=1,
    context_dim=CONTEXT_DIM, num_heads=4, num_head_channels=-1, use_linear_in_transformer=False,
    use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_checkpoint=False,
    use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32,
)


class TinySD15(comfy.supported_models_base.BASE):
    """SD1.5's noise schedule (empty sampling_settings: betas 0.00085..0.012, 1000 steps) and latent format."""
    unet_config = {}
    # BASE.__init__ copies these over the unet config; its defaults would change the head layout.
    unet_extra_config = {"num_heads": TINY_UNET_CONFIG["num_heads"], "num_head_channels": -1}
    sampling_settings = {}
    latent_format = comfy.latent_formats.SD15
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0


def tiny_sd15_model(seed: int = 0, model_type=comfy.model_base.ModelType.EPS, manual_cast_dtype=None,
                    **unet_config) -> comfy.model_patcher.ModelPatcher:
    """A MODEL (ModelPatcher) as a checkpoint loader would return it, with small random weights (float32, computing
    in ``manual_cast_dtype`` when given, as ComfyUI runs weights its device cannot compute in); ``unet_config``
    entries replace those of TINY_UNET_CONFIG."""
    model_config = TinySD15({**TINY_UNET_CONFIG, **unet_config})
    model_config.set_inference_dtype(torch.float32, manual_cast_dtype)
    model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=None)
    # comfy's layers skip weight initialisation (checkpoints overwrite them), so fill them here.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model.to(offload), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


def tiny_conditioning(seed: int = 0, tokens: int = 7):
    """CONDITIONING for the tiny model: one random text embedding."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=generator), {}]]


def write_sd15_shaped_checkpoint(path, seed: int = 0):
    """A single-file SD1.5 checkpoint in LDM layout, as ComfyUI's checkpoint loaders read it, with random weights;
    returns its UNet as a diffusers UNet2DConditionModel (the twin a shortcut or student is made for).

    As small as ComfyUI still detects as SD1.5 (model_channels 320, context 768, conv attention projections): a
    one-level UNet (26 M parameters). CLIP-L and the VAE keep their real sizes, because ComfyUI builds both from
    fixed configs. Stored in float16 (465 MB), under the LDM names of tests/ldm_layout.py.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm_layout import clip_to_ldm, unet_to_ldm, vae_to_ldm
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=768, attention_head_dim=8).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder, "cond_stage_model.transformer.")}
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return unet
