"""SD1.x / SD2.x / SDXL single-file checkpoints (the original LDM layout, as in ComfyUI's models/checkpoints) as
diffusers pipelines, offline: the family is read from the weights, the configs from their shapes."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.io import FileFormatError, read_safetensors

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")   # HF CLIP layout
OPEN_CLIP = ("cond_stage_model.model.", "conditioner.embedders.0.model.", "conditioner.embedders.1.model.")
# read beside the models: the noise table and markers of the parameterisation
EXTRA_KEYS = ("betas", "v_pred", "ztsnr")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD's noise table (1000 steps, betas linear in sqrt from 0.00085 to 0.012) and its samplers' settings
SD_NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False,
                skip_prk_steps=True)


@dataclass(frozen=True)
class Family:
    """What the weights do not say: the attention heads, the latent scale, the usual sampler, the native size."""

    name: str
    label: str
    unet_heads: int | None          # a fixed head count (SD1) ...
    unet_head_channels: int | None  # ... or a fixed width per head (SD2, SDXL)
    vae_scaling_factor: float
    scheduler: str
    sample_size: int                # latent side of the native resolution
    v_sample_size: int | None = None  # the native latent side of the family's v-prediction models


FAMILIES = {
    "sd1": Family("sd1", "SD1.x", 8, None, 0.18215, "PNDMScheduler", 64),
    "sd2": Family("sd2", "SD2.x", None, 64, 0.18215, "DDIMScheduler", 64, v_sample_size=96),
    "sdxl": Family("sdxl", "SDXL", None, 64, 0.13025, "EulerDiscreteScheduler", 128),
}
CLIP_HEAD_CHANNELS = 64  # CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 text towers: 12, 16, 20 heads of 64
OPEN_CLIP_PAD = "!"      # OpenCLIP towers pad with "!" (token 0), OpenAI's CLIP with its end token


def prefixed(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _with_text_model(state: dict, prefix: str) -> dict:
    """``state`` with the CLIP-L tower under ``prefix + "text_model."``: checkpoints saved with older transformers
    hold it without that level (``cond_stage_model.transformer.encoder...``), which ComfyUI reads too."""
    if any(k.startswith(prefix + "text_model.") for k in state):
        return state
    return {prefix + "text_model." + k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _present(keys, prefixes) -> str | None:
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)


def detect_family(keys, path: str | os.PathLike = "checkpoint") -> tuple[str, dict[str, str]]:
    """``(family, text-encoder prefixes)`` of an LDM-layout state dict's keys: ``{"clip_l": ..., "open_clip":
    ...}`` as present. Raises FileFormatError naming what is missing or not supported."""
    keys = list(keys)
    if any(k.startswith("lora_") or ".lora_" in k or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        raise FileFormatError(f"{path}: a LoRA, not a checkpoint: give the checkpoint it was made for")
    edm = [k for k in keys if k in ("edm_mean", "edm_std") or k.startswith("edm_vpred.")]
    if edm:
        model = "Playground v2.5" if "edm_mean" in edm else "CosXL"
        raise FileFormatError(f"{path}: an EDM model ({model}: its {', '.join(sorted(edm))} markers): it samples "
                              "continuous EDM sigmas, not SD's discrete noise table, which every method here needs")
    if not any(k.startswith(UNET) for k in keys):
        hint = (" (it looks like a diffusers-layout UNet: load the diffusers folder instead)"
                if any(k.startswith(("down_blocks.", "unet.")) for k in keys) else "")
        raise FileFormatError(f"{path}: no UNet weights under '{UNET}': not an SD1.x/2.x/XL checkpoint{hint}")
    if not any(k.startswith(VAE) for k in keys):
        raise FileFormatError(f"{path}: no VAE weights under '{VAE}' (a UNet-only file?); a teacher needs the "
                              "full checkpoint")
    adm = any(k.startswith(UNET + "label_emb.") for k in keys)
    clip_l = _present(keys, CLIP_L)
    open_clip = _present(keys, OPEN_CLIP)
    if adm and clip_l and open_clip == "conditioner.embedders.1.model.":
        return "sdxl", {"clip_l": clip_l, "open_clip": open_clip}
    if adm and open_clip == "conditioner.embedders.0.model." and not clip_l:
        raise FileFormatError(f"{path}: an SDXL refiner (one OpenCLIP encoder, aesthetic-score conditioning) is not "
                              "a text-to-image teacher")
    if adm and open_clip and not clip_l:
        raise FileFormatError(f"{path}: an SD2 image-conditioned model (unCLIP or the x4 upscaler: class-label "
                              "conditioning beside OpenCLIP) is not a text-to-image teacher")
    if not adm and open_clip and not clip_l:
        return "sd2", {"open_clip": open_clip}
    if not adm and clip_l and not open_clip:
        return "sd1", {"clip_l": clip_l}
    found = ", ".join(name for name, p in (("CLIP-L", clip_l), ("OpenCLIP", open_clip), ("ADM labels", adm)) if p)
    raise FileFormatError(f"{path}: text encoders ({found or 'none'}) fit none of SD1.x, SD2.x or SDXL")


# --- configs from the weights' shapes -----------------------------------------------------------------------

def _count(state: dict, prefix: str) -> int:
    """How many numbered children ``prefix<N>.`` the state dict has."""
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def unet_config(unet: dict, family: Family, sample_size: int, pooled_dim: int | None = None) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of an LDM UNet state dict (keys without ``UNET``);
    ``pooled_dim`` is the width of SDXL's pooled text embedding."""
    n_in = _count(unet, "input_blocks.")
    first_down = next((n for n in range(n_in) if f"input_blocks.{n}.0.op.weight" in unet), None)
    attn_key = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if first_down is None or n_in % first_down or attn_key is None:
        raise FileFormatError("UNet: the blocks do not follow the SD layout (per level: resnets with cross-attention, "
                              "then a downsampler)")
    layers = first_down - 1
    levels = n_in // first_down
    channels, depths = [], []
    for level in range(levels):
        block = 1 + level * first_down
        channels.append(unet[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0])
        depths.append(_count(unet, f"input_blocks.{block}.1.transformer_blocks."))
    mid_depth = _count(unet, "middle_block.1.transformer_blocks.")
    if not mid_depth or depths[-1] not in (0, mid_depth):
        raise FileFormatError("UNet: the middle block's transformer depth does not fit the SD layout")
    # diffusers' middle block takes the last level's depth: that entry is free when the last level has no attention
    depths_config = [d or 1 for d in depths[:-1]] + [mid_depth]
    config = dict(
        sample_size=sample_size,
        in_channels=unet["input_blocks.0.0.weight"].shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        transformer_layers_per_block=depths_config if len(set(depths_config)) > 1 else depths_config[0],
        cross_attention_dim=unet[attn_key].shape[1],
        attention_head_dim=(family.unet_heads if family.unet_heads is not None
                            else [max(1, c // family.unet_head_channels) for c in channels]),
        use_linear_projection=unet[attn_key.split("transformer_blocks.")[0] + "proj_in.weight"].ndim == 2,
        upcast_attention=family.name == "sd2",  # SD2.1's attention overflows in float16 otherwise
        norm_num_groups=32,
    )
    time_dim = unet["time_embed.0.weight"].shape[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in unet:
        # SDXL's extra embedding: the pooled text embedding and six size/crop numbers, each sinusoidally embedded
        total = unet["label_emb.0.0.weight"].shape[1]
        if pooled_dim is None or (total - pooled_dim) % 6:
            raise FileFormatError(f"UNet: a {total}-wide added embedding fits no pooled text width {pooled_dim}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(total - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=total)
    return config


def vae_config(vae: dict, family: Family, sample_size: int) -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM first-stage state dict (keys without ``VAE``)."""
    levels = _count(vae, "encoder.down.")
    return dict(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        latent_channels=vae["post_quant_conv.weight"].shape[0],
        block_out_channels=[vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=_count(vae, "encoder.down.0.block."),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=32,
        sample_size=sample_size * 8,
        scaling_factor=family.vae_scaling_factor,
    )


def clip_l_config(text: dict, tokenizer) -> dict:
    """The ``CLIPTextConfig`` of an OpenAI-CLIP text tower in transformers' layout (keys from ``text_model.``)."""
    hidden = text["text_model.embeddings.token_embedding.weight"].shape[1]
    return dict(
        vocab_size=text["text_model.embeddings.token_embedding.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(text, "text_model.encoder.layers."),
        num_attention_heads=_clip_heads(hidden),
        max_position_embeddings=text["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        projection_dim=hidden,
        **_token_ids(tokenizer),
    )


def open_clip_config(text: dict, tokenizer, layers: int) -> dict:
    """The ``CLIPTextConfig`` of an OpenCLIP text tower (keys from its ``model.``), keeping ``layers`` layers."""
    hidden = text["token_embedding.weight"].shape[1]
    projection = text.get("text_projection")
    return dict(
        vocab_size=text["token_embedding.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_clip_heads(hidden),
        max_position_embeddings=text["positional_embedding"].shape[0],
        hidden_act="gelu",
        projection_dim=projection.shape[1] if projection is not None else hidden,
        **_token_ids(tokenizer),
    )


def _clip_heads(hidden: int) -> int:
    if hidden % CLIP_HEAD_CHANNELS:
        raise FileFormatError(f"text encoder width {hidden} is not a multiple of CLIP's {CLIP_HEAD_CHANNELS}-wide "
                              "heads")
    return hidden // CLIP_HEAD_CHANNELS


def _token_ids(tokenizer) -> dict:
    # the pooled output is read at the first end token
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


# --- tokenizer ----------------------------------------------------------------------------------------------

PACKAGE_ROOT = Path(__file__).parents[1]
# Hub repositories whose cached tokenizer is CLIP's BPE vocabulary (every SD family uses the same one).
HUB_TOKENIZERS = (("openai/clip-vit-large-patch14", ""),
                  ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                  ("runwayml/stable-diffusion-v1-5", "tokenizer"),
                  ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                  ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"))


def comfyui_tokenizer_folders() -> list[Path]:
    """ComfyUI's copy of CLIP's vocabulary: beside this package when it is installed as a custom node
    (``ComfyUI/custom_nodes/<this>/``), or in the ``comfy`` package when that is importable."""
    folders = [root.parent.parent / "comfy" / "sd1_tokenizer" for root in (PACKAGE_ROOT, PACKAGE_ROOT.resolve())]
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "sd1_tokenizer" for p in spec.submodule_search_locations]
    return folders


def _tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def _cached_tokenizer_folder(repo: str, subfolder: str) -> Path | None:
    """The folder of ``repo``'s tokenizer in the local Hugging Face cache, if its files are there."""
    from huggingface_hub import constants, try_to_load_from_cache

    for name in ("tokenizer.json", "vocab.json"):
        found = try_to_load_from_cache(repo, f"{subfolder}/{name}" if subfolder else name,
                                       cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str) and _tokenizer_files(Path(found).parent):
            return Path(found).parent
    return None


def find_tokenizer(explicit: str | os.PathLike | None = None):
    """``(CLIPTokenizer, where it came from)``: ``explicit`` if given, else a tokenizer in the local Hugging Face
    cache, else ComfyUI's. Nothing is downloaded. Raises FileNotFoundError saying where it looked."""
    from huggingface_hub import constants
    from transformers import CLIPTokenizer

    if explicit is not None:
        if not _tokenizer_files(Path(explicit)):
            raise FileNotFoundError(f"--tokenizer {explicit}: not a CLIP tokenizer folder (no tokenizer.json, nor "
                                    "vocab.json with merges.txt)")
        return CLIPTokenizer.from_pretrained(str(explicit), local_files_only=True), str(explicit)
    for repo, subfolder in HUB_TOKENIZERS:
        folder = _cached_tokenizer_folder(repo, subfolder)
        if folder is not None:
            tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            return tok, f"{repo} in the Hugging Face cache"
    for folder in comfyui_tokenizer_folders():
        if _tokenizer_files(folder):
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), str(folder)
    raise FileNotFoundError(
        "no CLIP tokenizer found: a single-file checkpoint carries none. Pass --tokenizer FOLDER (a folder with "
        "vocab.json and merges.txt, e.g. the 'tokenizer' folder of any SD pipeline, or ComfyUI's "
        "comfy/sd1_tokenizer); none was in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}: {', '.join(r for r, _ in HUB_TOKENIZERS)}) nor in ComfyUI "
        f"({', '.join(str(f) for f in comfyui_tokenizer_folders())})")


def _tokenizer_for(tokenizer, max_length: int, vocab_size: int, pad: str | None, what: str):
    """A copy of ``tokenizer`` fitted to a text encoder: its context length and pad token (None: the end token),
    checked against its vocabulary size."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = max_length
    pad = pad or tok.eos_token
    if pad not in tok.get_vocab():
        raise FileFormatError(f"the tokenizer has no '{pad}' token, which the {what} pads with")
    tok.pad_token = pad
    if len(tok) != vocab_size:
        raise FileFormatError(f"the tokenizer has {len(tok)} tokens but the {what} embeds {vocab_size}: not the "
                              "vocabulary this model was trained with")
    return tok


# --- prediction type ----------------------------------------------------------------------------------------

def decide_prediction_type(family: Family, state: dict, metadata: dict, requested: str | None) -> tuple[str, str]:
    """``(prediction type, why)``: as requested, else as the file marks it (a ``v_pred`` key, ModelSpec
    metadata), else for SD2.x from the weights (below), else epsilon."""
    if requested is not None:
        if requested not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {requested!r}: choose one of {', '.join(PREDICTION_TYPES)}")
        return requested, "as requested"
    if "v_pred" in state:
        return "v_prediction", "the file's v_pred marker"
    spec = metadata.get("modelspec.prediction_type")
    if spec is not None:
        kind = {"v": "v_prediction", "v_prediction": "v_prediction", "v-prediction": "v_prediction",
                "epsilon": "epsilon", "eps": "epsilon"}.get(spec.strip().lower())
        if kind is None:
            raise FileFormatError(f"metadata modelspec.prediction_type {spec!r} is neither epsilon nor v")
        return kind, "the file's modelspec.prediction_type"
    if family.name == "sd2":
        # ComfyUI's test: in the 768-px v-prediction models the first norm of the last output transformer has
        # a bias of clearly non-zero spread; the 512-px epsilon model's stays near zero.
        n = _count(state, UNET + "output_blocks.") - 1
        bias = state.get(f"{UNET}output_blocks.{n}.1.transformer_blocks.0.norm1.bias")
        if bias is not None:
            v = float(bias.float().std(unbiased=False)) > 0.09
            return ("v_prediction" if v else "epsilon"), "from the weights (SD2's 768-v and 512 models differ)"
    return "epsilon", f"the {family.label} default"


# --- the pipeline -------------------------------------------------------------------------------------------

def _empty(factory):
    """A module built without initialising its weights (they are all assigned from the checkpoint)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _assign(module, state: dict, what: str, ignorable: tuple[str, ...] = ()):
    """``module`` given every weight from ``state``: a missing, misshaped or unknown weight is an error, except
    unknown ones named in ``ignorable`` (extras some exporters keep)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(k for k in set(state) - set(expected) if k not in ignorable and k.split(".")[-1] not in ignorable)
    misshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unknown or misshaped:
        parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                 (("missing", missing), ("unknown", unknown), ("misshaped", misshaped)) if keys]
        raise FileFormatError(f"the {what} weights do not fit the layout read from them ({'; '.join(parts)})")
    module.load_state_dict({k: state[k] for k in expected}, assign=True)
    return module.eval()


def _text_encoder(cls, config: dict, convert, what: str):
    from transformers import CLIPTextConfig

    model = _empty(lambda: cls(CLIPTextConfig(**config)))
    weights = convert(model)
    if not hasattr(model, "text_model"):  # transformers' CLIPTextModel has no text_model wrapper
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    ignorable = ("position_ids",) if hasattr(model, "text_projection") else ("position_ids", "text_projection.weight")
    return _assign(model, weights, what, ignorable)


def _text_encoders(state: dict, family: str, encoders: dict[str, str], tokenizer) -> tuple[dict, int, int | None]:
    """``(pipeline parts, width of the text features, width of the pooled embedding)``: the text encoders and
    their tokenizers."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts, context, pooled = {}, 0, None
    if "clip_l" in encoders:
        config = clip_l_config(prefixed(state, encoders["clip_l"]), tokenizer)
        what = "CLIP-L text encoder"
        parts["text_encoder"] = _text_encoder(CLIPTextModel, config, lambda m: convert_ldm_clip_checkpoint(state),
                                              what)
        parts["tokenizer"] = _tokenizer_for(tokenizer, config["max_position_embeddings"], config["vocab_size"],
                                            None, what)
        context += config["hidden_size"]
    if "open_clip" in encoders:
        prefix = encoders["open_clip"]
        text = prefixed(state, prefix)
        layers = _count(text, "transformer.resblocks.")
        if family == "sd2":
            layers = sd2_text_depth(layers, text["ln_final.weight"].shape[0])
            text = {k: v for k, v in text.items()
                    if not k.startswith("transformer.resblocks.") or int(k.split(".")[2]) < layers}
        config = open_clip_config(text, tokenizer, layers)
        what = "OpenCLIP text encoder"
        model = _text_encoder(CLIPTextModelWithProjection if family == "sdxl" else CLIPTextModel, config,
                              lambda m: convert_open_clip_checkpoint(m, {prefix + k: v for k, v in text.items()},
                                                                     prefix=prefix), what)
        second = "_2" if family == "sdxl" else ""
        parts["text_encoder" + second] = model
        parts["tokenizer" + second] = _tokenizer_for(tokenizer, config["max_position_embeddings"],
                                                     config["vocab_size"], OPEN_CLIP_PAD, what)
        context += config["hidden_size"]
        pooled = config["projection_dim"]
    return parts, context, pooled


def sd2_text_depth(layers: int, width: int) -> int:
    """The layers of an SD2 OpenCLIP tower that its text encoder keeps. SD2 conditions on the penultimate layer,
    so a tower one layer short gives it as its (normed) output: ViT-H/14 (width 1024) has 24, of which 23 are
    kept, and a file exported from diffusers holds only those 23 (all kept). A tower of another width is taken to
    be whole, its last layer dropped."""
    full = {1024: 24}.get(width)
    return layers - 1 if full is None or layers >= full else layers


def _vae(state: dict, family: Family, sample_size: int):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = vae_config(prefixed(state, VAE), family, sample_size)
    return _assign(_empty(lambda: AutoencoderKL(**config)), convert_ldm_vae_checkpoint(state, config), "VAE")


def _pipeline(state: dict, name: str, encoders: dict[str, str], tokenizer, prediction: str):
    """The diffusers pipeline of a checkpoint's state dict (family ``name``), in the file's dtype."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    family = FAMILIES[name]
    sample_size = family.v_sample_size if prediction == "v_prediction" and family.v_sample_size else family.sample_size
    parts, context, pooled = _text_encoders(state, name, encoders, tokenizer)
    config = unet_config(prefixed(state, UNET), family, sample_size, pooled if name == "sdxl" else None)
    if (config["in_channels"], config["out_channels"]) != (4, 4):
        raise FileFormatError(f"the UNet maps {config['in_channels']} channels to {config['out_channels']}: an "
                              "inpainting or image-conditioned model, not a text-to-image teacher")
    if context != config["cross_attention_dim"]:
        raise FileFormatError(f"the UNet attends to {config['cross_attention_dim']}-wide text features, the text "
                              f"encoders give {context}")
    parts["unet"] = _assign(_empty(lambda: UNet2DConditionModel(**config)),
                            convert_ldm_unet_checkpoint(state, config), "UNet")
    parts["vae"] = _vae(state, family, sample_size)

    noise = dict(SD_NOISE, prediction_type=prediction)
    betas = state.get("betas")
    # SD's own table, stored in the file's precision (bfloat16 keeps 8 bits: 0.4 % apart), is SD's own table
    rtol = max(1e-3, torch.finfo(betas.dtype).eps) if betas is not None and betas.is_floating_point() else 1e-3
    if betas is not None and not torch.allclose(betas.double(), _sd_betas(), rtol=rtol, atol=1e-7):
        noise["trained_betas"] = betas.double().tolist()
    scheduler = getattr(diffusers, family.scheduler).from_config(noise)
    if name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(scheduler=scheduler, **parts)
    return diffusers.StableDiffusionPipeline(scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **parts)


def _read(path: Path, wanted: tuple[str, ...]) -> tuple[dict, dict, str, dict[str, str]]:
    """``(state, metadata, family name, text-encoder prefixes)``: the weights under ``wanted`` (and the extra keys)
    of a checkpoint whose family is read from all its keys."""
    names = []

    def select(key: str) -> bool:
        names.append(key)
        return key.startswith(wanted) or key in EXTRA_KEYS

    state, metadata = read_safetensors(path, select)
    return (state, metadata, *detect_family(names, path))


@contextmanager
def _naming(path: Path, family: Family):
    """Errors of reading a checkpoint's parts, with the file's name."""
    try:
        yield
    except KeyError as err:
        raise FileFormatError(f"{path}: not a whole {family.label} checkpoint (no weight {err})") from None
    except FileFormatError as err:
        raise FileFormatError(f"{path}: {err}") from None


def load_ldm_vae(path: str | os.PathLike):
    """``(AutoencoderKL, description)``: the VAE of an SD1.x/2.x/XL single-file checkpoint alone (the file's dtype),
    for encoding data without loading the rest."""
    path = Path(path)
    state, _, name, _ = _read(path, (VAE,))
    family = FAMILIES[name]
    with _naming(path, family):
        vae = _vae(state, family, family.sample_size)
    return vae, f"{path.name}: the VAE of an {family.label} checkpoint"


def load_ldm_checkpoint(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        prediction_type: str | None = None):
    """``(pipeline, description)`` of an SD1.x/2.x/XL single-file checkpoint (safetensors), built offline; the
    weights keep the file's dtype.

    Args:
        path: the ``.safetensors`` file (original LDM layout: ``model.diffusion_model.*``, ``first_stage_model.*``
            and the text encoders).
        tokenizer: a CLIP tokenizer folder; by default one is looked for (see :func:`find_tokenizer`).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; by default read from the file
            (see :func:`decide_prediction_type`).

    Raises FileFormatError (naming the file) for a file that is none of these checkpoints, FileNotFoundError when
    no tokenizer is found.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    state, metadata, name, encoders = _read(path, (UNET, VAE, *CLIP_L, *OPEN_CLIP))
    if "clip_l" in encoders:
        state = _with_text_model(state, encoders["clip_l"])
    family = FAMILIES[name]
    base_tokenizer, tokenizer_source = find_tokenizer(tokenizer)
    with _naming(path, family):
        prediction, why = decide_prediction_type(family, state, metadata, prediction_type)
        pipe = _pipeline(state, name, encoders, base_tokenizer, prediction)
    size = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    description = (f"{path.name}: {family.label} checkpoint ({size:.1f} M-parameter UNet), {prediction} ({why}), "
                   f"tokenizer from {tokenizer_source}")
    if "ztsnr" in state:
        description += "; marked zero-terminal-SNR, but SD's own noise table is used"
    return pipe, description


def _sd_betas() -> torch.Tensor:
    n = SD_NOISE["num_train_timesteps"]
    return torch.linspace(SD_NOISE["beta_start"] ** 0.5, SD_NOISE["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
