"""SD1.x/2.x/XL-shaped diffusers pipelines at toy size, and their single-file checkpoints in the original LDM
layout (as those models are distributed), so the single-file loader can be checked against its source."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

NOISE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD_DOWN, SD_UP = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _resnet(rest: str, names: dict) -> str:
    name, tail = rest.split(".", 1)
    return f"{names.get(name, name)}.{tail}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """An UNet2DConditionModel's weights under the LDM UNet's names (``model.diffusion_model.`` prefix)."""
    per_level = unet.config.layers_per_block + 1          # resnets, then the downsampler
    up_with_attention = {int(k.split(".")[1]) for k in unet.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)}
    out = {}
    for key, value in unet.state_dict().items():
        top = next((t for t in UNET_TOP if key.startswith(t + ".")), None)
        if top is not None:
            name = UNET_TOP[top] + key[len(top):]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = 1 + int(m[1]) * per_level + int(m[3])
            name = (f"input_blocks.{block}.0.{_resnet(m[4], UNET_RESNET)}" if m[2] == "resnets"
                    else f"input_blocks.{block}.1.{m[4]}")
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], UNET_RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = int(m[1]) * per_level + int(m[3])
            name = (f"output_blocks.{block}.0.{_resnet(m[4], UNET_RESNET)}" if m[2] == "resnets"
                    else f"output_blocks.{block}.1.{m[4]}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            slot = 2 if level in up_with_attention else 1   # after the attention, if the level has one
            name = f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under the LDM first stage's names (``first_stage_model.`` prefix). LDM numbers
    the decoder's levels from the finest, diffusers from the coarsest."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        part, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            rest = f"down.{m[1]}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
            rest = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            rest = f"up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
            rest = f"up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
            rest = f"mid.attn_1.{VAE_ATTENTION[m[1]]}.{m[2]}"
            if m[2] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]   # LDM's attention projections are 1x1 convolutions
        elif rest.startswith("conv_norm_out."):
            rest = "norm_out." + rest.split(".", 1)[1]
        out["first_stage_model." + (f"{part}.{rest}" if part else rest)] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights as LDM checkpoints keep OpenAI's CLIP: transformers' own names
    under ``prefix`` (``cond_stage_model.transformer.`` in SD1.x)."""
    state = text_encoder.state_dict()
    out = {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(
        text_encoder.config.max_position_embeddings)[None]  # older exports keep this buffer
    return out


def open_clip_to_ldm(text_encoder, prefix: str, extra_layer: bool = False) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under OpenCLIP's names (``prefix``: ``cond_stage_model.model.``
    in SD2.x, ``conditioner.embedders.1.model.`` in SDXL). ``extra_layer`` appends a random last layer, as SD2's
    files hold the layer after the one the model reads."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
           "text_projection": (state["text_projection.weight"].T if "text_projection.weight" in state
                               else torch.randn(hidden, hidden))}
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP_LAYER.items():
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    if extra_layer:
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{layers - 1}.")]:
            out[key.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = torch.randn_like(out[key])
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as one LDM-layout state dict of ``family`` ("sd1", "sd2" or "sdxl")."""
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if family == "sd1":
        state.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    elif family == "sd2":
        state.update(open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", extra_layer=True))
    elif family == "sdxl":
        state.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        raise ValueError(family)
    # SD's training noise table, which every original checkpoint carries
    n = 1000
    state["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64).pow(2).float()
    state["alphas_cumprod"] = torch.cumprod(1 - state["betas"].double(), 0).float()
    return state


# --- toy pipelines of each family -------------------------------------------------------------------

def _tokenizer(folder, pad=None):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder)
    tok.model_max_length = 77
    if pad:
        tok.pad_token = pad
    return tok


def _text_encoder(tok, hidden, act, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=hidden // 64, max_position_embeddings=77, hidden_act=act,
                            projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(scaling_factor=0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor)


def family_pipeline(family: str, tokenizer_dir):
    """A pipeline with the family's structure at toy size (a 64 px image is an 8x8 latent), every weight
    perturbed so that no norm is the identity."""
    import diffusers
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if family == "sd1":   # SD1: 8 heads, conv projections, OpenAI CLIP (quick_gelu)
        tok = _tokenizer(tokenizer_dir)
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(32, 64), cross_attention_dim=64,
            down_block_types=SD_DOWN, up_block_types=SD_UP, attention_head_dim=8)
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(), text_encoder=_text_encoder(tok, 64, "quick_gelu"), tokenizer=tok, unet=unet,
            scheduler=diffusers.PNDMScheduler(**NOISE, skip_prk_steps=True), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    elif family == "sd2":  # SD2: 64-wide heads, linear projections, OpenCLIP (gelu, pads with "!"), v-prediction
        tok = _tokenizer(tokenizer_dir, pad="!")
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(64, 128), cross_attention_dim=64,
            down_block_types=SD_DOWN, up_block_types=SD_UP, attention_head_dim=(1, 2), use_linear_projection=True,
            upcast_attention=True)
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(), text_encoder=_text_encoder(tok, 64, "gelu"), tokenizer=tok, unet=unet,
            scheduler=diffusers.DDIMScheduler(**NOISE, prediction_type="v_prediction"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:                  # SDXL: no attention at the first level, deeper transformers below, two text encoders
        tok, tok2 = _tokenizer(tokenizer_dir), _tokenizer(tokenizer_dir, pad="!")
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64), cross_attention_dim=64 + 128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 1), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=96 + 48)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(scaling_factor=0.13025), text_encoder=_text_encoder(tok, 64, "quick_gelu"),
            text_encoder_2=_text_encoder(tok2, 128, "gelu", projection=96), tokenizer=tok, tokenizer_2=tok2,
            unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**NOISE, timestep_spacing="leading"))
    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for p in module.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        if family == "sd2":  # what trained 768-v models look like (see decide_prediction_type)
            unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias.normal_(0, 0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_ldm(pipe, family: str, path: Path, dtype=torch.float32, metadata=None) -> Path:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pipeline_to_ldm(pipe, family).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path
