"""Few-step LoRA files as the releases write them, on UNets with SD1.5's and SDXL's module trees (tiny widths, the
real names), for the tests of both front doors; nothing is downloaded.

Where the key names come from:

- LCM-LoRA: diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py (the LCM-LoRA recipe)
  saves ``get_module_kohya_state_dict``: ``lora_unet_<module, '.' -> '_'>.lora_down/lora_up.weight`` and ``.alpha``
  over the target modules below; stable-diffusion.cpp's LoRA tests (PR #955) list lcm-lora-sdv1-5 as
  "unet | lora_down+lora_up+alpha".
- PCM: G-U-N/Phased-Consistency-Model code/text_to_image_sd15|sdxl writes the same function over the same targets.
- DMD2: tianweiy/DMD2 main/sdxl/extract_lora_module.py: the same kohya names and targets, fp16, alpha 8.
- Hyper-SD: its files have the size of the above at rank 64 in fp32 (SD1.5 269 MB, SDXL 787 MB against LCM-LoRA's
  fp16 135 / 394 MB): the same module set.
- The other layouts the releases' files circulate in (kohya without ``.alpha``; diffusers/peft ``unet.<module>`` with
  ``lora_A``/``lora_B`` or ``lora.down``/``lora.up``, as diffusers' ``save_lora_weights`` writes; text-encoder keys)
  are written here by the rules of the tools that write them, over the same modules.
"""

import copy
import json

import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler, TCDScheduler,
                       UNet2DConditionModel)
from safetensors.torch import save_file

from direct_distill.models.lora_layouts import sgm_names

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

# peft target_modules of the LCM-LoRA, PCM and DMD2 writers (suffix match on module names)
RELEASE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                   "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LAYOUTS = ("kohya", "kohya-no-alpha", "peft", "diffusers", "peft-metadata-alpha")
# kohya names in the original LDM/SGM UNet's spelling (input_blocks_4_1_...), as kohya's SDXL trainer and LoRA
# extraction write them; the names are models.lora_layouts.sgm_names', which the tests check against diffusers' and
# ComfyUI's own readers of such files.
SGM_LAYOUT = "kohya-sgm"

# The module trees of SD1.5's and SDXL's UNets at toy widths (channels multiples of 32 for GroupNorm).
TINY_SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=2,
    norm_num_groups=32)
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(1, 2, 2), cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
# The real ones, whose widths a LoRA for them has (built on the meta device: names and shapes, no weights).
REAL_SD15_UNET = dict(
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
REAL_SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def unet(config, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def meta_unet(config):
    """A UNet with the config's real names and shapes and no storage."""
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def target_modules(model, targets=RELEASE_TARGETS) -> dict[str, tuple[int, ...]]:
    """{module name: weight shape} of the Linear and Conv2d layers peft's target_modules (suffix match) picks."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in targets):
            out[name] = tuple(module.weight.shape)
    return out


def random_layers(modules, *, rank=4, alpha=8.0, seed=1, dtype=torch.float32, scale=0.1):
    """{module: (down, up, alpha)} random low-rank updates (a nonzero up, unlike a fresh LoRA) for those modules."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, shape in sorted(modules.items()):
        kernel = tuple(shape[2:])
        down = torch.randn(rank, shape[1], *kernel, generator=g) * scale
        up = torch.randn(shape[0], rank, *(1,) * len(kernel), generator=g) * scale
        layers[name] = (down.to(dtype), up.to(dtype), alpha)
    return layers


def release_tensors(unet_layers, layout, *, te_layers=None, te2_layers=None):
    """(tensors, metadata) of a LoRA file in ``layout`` (one of LAYOUTS) holding these layers."""
    tensors, metadata = {}, {}
    components = [("unet", unet_layers), ("text_encoder", te_layers or {}), ("text_encoder_2", te2_layers or {})]
    sdxl = bool(te2_layers)
    sgm = sgm_names(unet_layers) if layout == SGM_LAYOUT else {}
    for component, layers in components:
        for module, (down, up, alpha) in layers.items():
            if layout.startswith("kohya"):
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                          "text_encoder_2": "lora_te2_"}[component]
                name = prefix + (sgm[module] if component == "unet" and sgm else module).replace(".", "_")
                tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
                if layout in ("kohya", SGM_LAYOUT):
                    tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
            elif layout in ("peft", "peft-metadata-alpha"):
                tensors[f"{component}.{module}.lora_A.weight"] = down
                tensors[f"{component}.{module}.lora_B.weight"] = up
            elif layout == "diffusers":
                tensors[f"{component}.{module}.lora.down.weight"] = down
                tensors[f"{component}.{module}.lora.up.weight"] = up
            else:
                raise ValueError(layout)
        if layout == "peft-metadata-alpha" and layers:
            # diffusers' save_lora_weights(..., unet_lora_adapter_metadata=LoraConfig(...).to_dict())
            alpha = next(iter(layers.values()))[2]
            metadata.setdefault("lora_adapter_metadata", {}).update(
                {f"{component}.r": next(iter(layers.values()))[0].shape[0], f"{component}.lora_alpha": alpha})
    if "lora_adapter_metadata" in metadata:
        metadata["lora_adapter_metadata"] = json.dumps(metadata["lora_adapter_metadata"])
    return tensors, metadata


def effective_alpha(layout, alpha, rank):
    """The alpha a layout carries: without an ``.alpha`` tensor or adapter metadata, every loader takes rank."""
    return float(alpha) if layout in ("kohya", SGM_LAYOUT, "peft-metadata-alpha") else float(rank)


def write_release(path, unet_layers, layout, extra_metadata=None, **text_encoders):
    tensors, metadata = release_tensors(unet_layers, layout, **text_encoders)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **metadata, **(extra_metadata or {})})
    return path


@torch.no_grad()
def merged(model, layers, layout, strength=1.0):
    """A copy of ``model`` with each update (alpha / rank) * up @ down added to its weight: the reference effect."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, (down, up, alpha) in layers.items():
        weight = modules[name].weight
        rank = down.shape[0]
        delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape)
        weight += (strength * effective_alpha(layout, alpha, rank) / rank * delta).to(weight.dtype)
    return model


# The recipes of the sources, as their model cards write them: the diffusers scheduler and its config, the steps,
# explicit timesteps, guidance_scale (0 = none), eta, and the ComfyUI sampler they name.
_DDIM = (DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False))
_EULER = (EulerDiscreteScheduler, dict(timestep_spacing="trailing"))
PUBLISHED = {
    **{f"lcm-{f}": dict(scheduler=(LCMScheduler, {}), steps=4, range=(2, 8), guidance=(0.0, 1.0, 2.0), sampler="lcm")
       for f in ("sd15", "sdxl")},  # "2 - 8 steps", "disable guidance_scale or use values between 1.0 and 2.0"
    **{f"tcd-{f}": dict(scheduler=(TCDScheduler, {}), steps=4, range=(4, 49), guidance=(0.0,), eta=0.3, sampler="tcd")
       for f in ("sd15", "sdxl")},  # num_inference_steps=4 (4 to 50: 50 reads as a pipeline's default), eta=0.3
    **{f"hyper-{f}-1step": dict(scheduler=(TCDScheduler, {}), steps=1, range=(1, 8), guidance=(0.0,), eta=1.0,
                                sampler="tcd") for f in ("sd15", "sdxl")},  # unified LoRA: "1 to 8 steps", no timesteps
    **{f"hyper-{f}-{n}step": dict(scheduler=_DDIM, steps=n, guidance=(0.0,), sampler="ddim")
       for f in ("sd15", "sdxl") for n in (2, 4, 8)},
    **{f"hyper-{f}-{n}step-cfg": dict(scheduler=_DDIM, steps=n, guidance=(5.0, 8.0), sampler="ddim")
       for f in ("sd15", "sdxl") for n in (8, 12)},  # "support 5~8 guidance scales"
    **{f"sdxl-lightning-{n}step": dict(scheduler=_EULER, steps=n, guidance=(0.0,), sampler="euler") for n in (2, 4, 8)},
    "dmd2-sdxl-4step": dict(scheduler=(LCMScheduler, {}), steps=4, timesteps=[999, 749, 499, 249], guidance=(0.0,),
                            sampler="lcm"),
    **{f"pcm-{f}-smallcfg-{n}step": dict(scheduler=_DDIM, steps=n, guidance=(1.0, 2.0), sampler="ddim")
       for f in ("sd15", "sdxl") for n in (2, 4, 8, 16)},  # "SmallCFG ... CFG value 1-2"
    **{f"pcm-{f}-normalcfg-{n}step": dict(scheduler=_DDIM, steps=n, guidance=g, sampler="ddim")
       for f in ("sd15", "sdxl") for n, g in ((4, (2.5, 3.5)), (8, (3.0, 6.0)), (16, (2.0, 9.0)))},
}


def published_timesteps(name, steps):
    """The timesteps the source's own recipe runs: its diffusers scheduler, configured as the card does."""
    recipe = PUBLISHED[name]
    cls, config = recipe["scheduler"]
    scheduler = cls.from_config(PNDMScheduler(**SD_SCHEDULER).config, **config)
    if "timesteps" in recipe:
        scheduler.set_timesteps(timesteps=recipe["timesteps"])
    else:
        scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]
