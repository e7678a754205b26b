"""Teachers from local files only: SD1.x/SD2.x (v-prediction)/SDXL single-file checkpoints in the original LDM
layout, written here from small random pipelines, load without a network and equal the pipeline they came from."""

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from direct_distill.models.io import FileFormatError
from direct_distill.training import ldm_checkpoint
from direct_distill.training.teachers import load_teacher, load_teacher_vae

from ldm_layout import family_pipeline, pipeline_to_ldm, unet_to_ldm, write_ldm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sd_architectures as sd  # noqa: E402



@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from direct_distill.lab.teacher import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


def _prompt_embeddings(pipe, family):
    if family == "sdxl":
        return pipe.encode_prompt("a shirt", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt="a boot")
    return pipe.encode_prompt("a shirt", "cpu", 1, True, negative_prompt="a boot")


@pytest.mark.parametrize("family, label, prediction", [("sd1", "SD1.x", "epsilon"), ("sd2", "SD2.x", "v_prediction"),
                                                      ("sdxl", "SDXL", "epsilon")])
def test_single_file_loads_offline_and_equals_its_source(family, label, prediction, tokenizer_dir, tmp_path,
                                                         no_network, capsys):
    source = family_pipeline(family, tokenizer_dir)
    path = write_ldm(source, family, tmp_path / f"{family}.safetensors")
    pipe = load_teacher(path, tokenizer=tokenizer_dir)
    assert f"{label} checkpoint" in capsys.readouterr().out
    assert type(pipe) is type(source)
    assert pipe.scheduler.config.prediction_type == prediction
    for key in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "layers_per_block",
                "use_linear_projection", "addition_embed_type"):
        assert _listed(pipe.unet.config[key]) == _listed(source.unet.config[key]), key
    assert pipe.vae.config.scaling_factor == source.vae.config.scaling_factor
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    context = source.unet.config.cross_attention_dim
    x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, context, generator=g)
    extra = {}
    if family == "sdxl":
        extra = dict(added_cond_kwargs={"text_embeds": torch.randn(2, 96, generator=g),
                                        "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float()})
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, cond, **extra).sample, source.unet(x, t, cond, **extra).sample,
                                   rtol=0, atol=1e-5)
        for ours, theirs in zip(_prompt_embeddings(pipe, family), _prompt_embeddings(source, family)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(pipe.vae.decode(x[:1]).sample, source.vae.decode(x[:1]).sample, rtol=0, atol=1e-5)
    # the whole sampler at 64 px, same seed: the same latent
    source.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    run = dict(prompt="a shirt", height=64, width=64, num_inference_steps=2, output_type="latent")
    latents = [p(**run, generator=torch.Generator().manual_seed(1)).images for p in (pipe, source)]
    assert latents[0].shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-4)


def test_an_sd1_file_whose_clip_lacks_the_text_model_level_loads(tokenizer_dir, tmp_path, no_network):
    # checkpoints saved with older transformers: cond_stage_model.transformer.encoder..., no text_model.
    source = family_pipeline("sd1", tokenizer_dir)
    path = write_ldm(source, "sd1", tmp_path / "new.safetensors")
    state = load_file(path)
    prefix = "cond_stage_model.transformer."
    old = {prefix + k[len(prefix + "text_model."):] if k.startswith(prefix + "text_model.") else k: v
           for k, v in state.items()}
    assert not any(k.startswith(prefix + "text_model.") for k in old)
    old[prefix + "embeddings.position_ids"] = torch.arange(77)[None].float()  # as such files hold it
    save_file(old, tmp_path / "old.safetensors")
    pipe = load_teacher(tmp_path / "old.safetensors", tokenizer=tokenizer_dir)
    with torch.no_grad():
        for ours, theirs in zip(_prompt_embeddings(pipe, "sd1"), _prompt_embeddings(source, "sd1")):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_single_file_honours_dtype_and_prediction_override(tokenizer_dir, tmp_path, no_network, capsys):
    source = family_pipeline("sd1", tokenizer_dir)
    path = write_ldm(source, "sd1", tmp_path / "sd1_fp16.safetensors", dtype=torch.float16)
    for dtype in (torch.float32, torch.bfloat16):   # a float16 file at the default float32, and cast down
        pipe = load_teacher(path, dtype, tokenizer=tokenizer_dir)
        assert pipe.scheduler.config.trained_betas is None  # SD's table, stored in float16
        assert {p.dtype for name in ("unet", "vae", "text_encoder")
                for p in getattr(pipe, name).parameters()} == {dtype}
        assert capsys.readouterr().out.strip().endswith(", " + str(dtype).removeprefix("torch."))
    bf16 = load_teacher(write_ldm(source, "sd1", tmp_path / "sd1_bf16.safetensors", dtype=torch.bfloat16),
                        tokenizer=tokenizer_dir)
    assert bf16.scheduler.config.trained_betas is None  # bfloat16 rounds SD's betas by up to 0.4 %: still SD's
    capsys.readouterr()
    pipe = load_teacher(path, tokenizer=tokenizer_dir, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert "v_prediction (as requested)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--prediction-type sample"):
        load_teacher(path, tokenizer=tokenizer_dir, prediction_type="sample")


def test_float16_folder_loads_at_the_default_dtype(tmp_path, tokenizer_dir, no_network):
    """A float16 diffusers folder comes out entirely float32 (mixed, the shortcut's capture crashed)."""
    from direct_distill.training.trajectories import capture_trajectories

    family_pipeline("sd1", tokenizer_dir).to(torch.float16).save_pretrained(tmp_path / "fp16")
    pipe = load_teacher(tmp_path / "fp16")
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    capture_trajectories(pipe, tmp_path / "traj", ["a shirt"], 2, num_inference_steps=3, capture_steps=[1],
                         guidance_scale=2.0, seed=0, batch_size=2, pipe_kwargs=dict(height=64, width=64))
    assert list((tmp_path / "traj").glob("*.safetensors"))


def test_prediction_type_from_the_file(tokenizer_dir):
    family = ldm_checkpoint.FAMILIES
    decide = ldm_checkpoint.decide_prediction_type
    assert decide(family["sdxl"], {"v_pred": torch.tensor([])}, {}, None)[0] == "v_prediction"
    assert decide(family["sd1"], {}, {"modelspec.prediction_type": "v"}, None)[0] == "v_prediction"
    assert decide(family["sd2"], {}, {"modelspec.prediction_type": "epsilon"}, None)[0] == "epsilon"
    with pytest.raises(FileFormatError, match="modelspec.prediction_type 'flow'"):
        decide(family["sd1"], {}, {"modelspec.prediction_type": "flow"}, None)
    # SD2 without markers: the last output transformer's first norm tells 768-v (spread bias) from 512 (flat)
    unet = unet_to_ldm(family_pipeline("sd2", tokenizer_dir).unet)
    key = next(k for k in unet if k.endswith("transformer_blocks.0.norm1.bias") and "output_blocks.5." in k)
    assert decide(family["sd2"], unet, {}, None) == ("v_prediction", "from the weights (SD2's 768-v and 512 models "
                                                                      "differ)")
    unet[key] = torch.zeros_like(unet[key])
    assert decide(family["sd2"], unet, {}, None)[0] == "epsilon"
    assert decide(family["sd2"], unet, {}, "v_prediction") == ("v_prediction", "as requested")
    assert decide(family["sd1"], unet, {}, None) == ("epsilon", "the SD1.x default")


def _ldm_shapes(unet_config, vae_config, encoders):
    """The LDM-layout state dict (on the meta device) of full-size models built from reference configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_layout import clip_to_ldm, open_clip_to_ldm, vae_to_ldm

    with torch.device("meta"):
        state = {**unet_to_ldm(UNet2DConditionModel(**unet_config)), **vae_to_ldm(AutoencoderKL(**vae_config))}
        for kind, config, prefix in encoders:
            if kind == "clip":
                state.update(clip_to_ldm(CLIPTextModel(CLIPTextConfig(**config)), prefix))
            else:
                model = (CLIPTextModelWithProjection if kind == "bigg" else CLIPTextModel)(CLIPTextConfig(**config))
                state.update(open_clip_to_ldm(model, prefix))
    return state


@pytest.mark.parametrize("family, unet, encoders, diffusers_type", [
    ("sd1", sd.SD15_UNET, [("clip", sd.CLIP_L, "cond_stage_model.transformer.")], "v1"),
    ("sd2", sd.SD21_UNET, [("open_clip", sd.OPEN_CLIP_H, "cond_stage_model.model.")], "v2"),
    ("sdxl", sd.SDXL_UNET, [("clip", sd.CLIP_L, "conditioner.embedders.0.transformer."),
                            ("bigg", sd.OPEN_CLIP_BIGG, "conditioner.embedders.1.model.")], "xl_base"),
])
def test_full_size_checkpoints_give_the_published_architectures(family, unet, encoders, diffusers_type,
                                                                tokenizer_dir):
    """The configs read from full-size SD1.5 / SD2.1 / SDXL weight shapes are those architectures."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = _ldm_shapes(unet, sd.SD_VAE, encoders)
    assert infer_diffusers_model_type(state) == diffusers_type   # diffusers agrees it is that kind of file
    name, prefixes = ldm_checkpoint.detect_family(state)
    assert name == family
    fam = ldm_checkpoint.FAMILIES[name]
    pooled = sd.OPEN_CLIP_BIGG["projection_dim"] if family == "sdxl" else None
    config = ldm_checkpoint.unet_config(ldm_checkpoint.prefixed(state, ldm_checkpoint.UNET), fam, unet["sample_size"],
                                        pooled)
    for key, value in unet.items():
        assert _listed(config.get(key, value)) == _listed(value), key
    vae = ldm_checkpoint.vae_config(ldm_checkpoint.prefixed(state, ldm_checkpoint.VAE), fam, unet["sample_size"])
    assert {k: vae[k] for k in sd.SD_VAE} == {k: _listed(v) for k, v in sd.SD_VAE.items()}
    assert vae["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)

    class Vocab:   # the special tokens' ids of CLIP's BPE vocabulary
        bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 49407

    for kind, reference, prefix in encoders:
        text = ldm_checkpoint.prefixed(state, prefix)
        if kind == "clip":
            config = ldm_checkpoint.clip_l_config(text, Vocab)
        else:
            layers = reference["num_hidden_layers"] - (family == "sd2")   # SD2 reads the penultimate layer
            config = ldm_checkpoint.open_clip_config(text, Vocab, layers)
            reference = dict(reference, num_hidden_layers=layers)
        assert {k: config[k] for k in reference} == reference


def _save(tensors, path, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def test_files_that_are_no_sd_checkpoint_get_one_clear_error(tokenizer_dir, tmp_path, no_network):
    source = family_pipeline("sd1", tokenizer_dir)
    state = pipeline_to_ldm(source, "sd1")
    unet_only = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    cases = {
        "unet_only": (unet_only, "no VAE weights"),
        "diffusers_layout": ({f"unet.{k}": v for k, v in source.unet.state_dict().items()},
                             "diffusers-layout UNet"),
        "no_text_encoder": ({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")},
                            r"text encoders \(none\)"),
        "truncated_unet": ({k: v for k, v in state.items() if "output_blocks.2." not in k}, "UNet weights do not fit"),
        "inpainting": ({**state, "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 9, 3, 3)},
                       "maps 9 channels to 4: an inpainting"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(SystemExit, match=message):
            load_teacher(_save(tensors, tmp_path / f"{name}.safetensors"), tokenizer=tokenizer_dir)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(SystemExit, match="model.ckpt: a pickled PyTorch checkpoint .* only safetensors are read"):
        load_teacher(tmp_path / "model.ckpt", tokenizer=tokenizer_dir)
    refiner = {k.replace("cond_stage_model.transformer.", "x."): v for k, v in pipeline_to_ldm(
        family_pipeline("sdxl", tokenizer_dir), "sdxl").items() if not k.startswith("conditioner.embedders.0.")}
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in refiner.items()}
    with pytest.raises(SystemExit, match="SDXL refiner"):
        load_teacher(_save(refiner, tmp_path / "refiner.safetensors"), tokenizer=tokenizer_dir)
    # an SD2 file with class labels beside OpenCLIP (unCLIP, the x4 upscaler) is not taken for a refiner
    sd2 = pipeline_to_ldm(family_pipeline("sd2", tokenizer_dir), "sd2")
    unclip = {**sd2, "model.diffusion_model.label_emb.0.0.weight": torch.randn(8, 8)}
    with pytest.raises(SystemExit, match="an SD2 image-conditioned model \\(unCLIP or the x4 upscaler"):
        load_teacher(_save(unclip, tmp_path / "unclip.safetensors"), tokenizer=tokenizer_dir)
    # EDM models of SDXL's shape: named, never loaded on SD's noise table
    sdxl = pipeline_to_ldm(family_pipeline("sdxl", tokenizer_dir), "sdxl")
    for name, extra, message in (
            ("playground", {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)},
             "an EDM model \\(Playground v2.5: its edm_mean, edm_std markers\\)"),
            ("cosxl", {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
             "an EDM model \\(CosXL")):
        file = _save({**sdxl, **extra}, tmp_path / f"{name}.safetensors")
        for load in (lambda: load_teacher(file, tokenizer=tokenizer_dir), lambda: load_teacher_vae(file)):
            with pytest.raises(SystemExit, match=message):
                load()
    # a LoRA in any layout is named as one
    for name, tensors in (("kohya", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                                     "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}),
                          ("peft", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)})):
        with pytest.raises(SystemExit, match=f"{name}.safetensors: a LoRA, not a checkpoint"):
            load_teacher(_save(tensors, tmp_path / f"{name}.safetensors"), tokenizer=tokenizer_dir)


def test_an_sd2_tower_keeps_the_layers_its_text_encoder_reads():
    """SD2 reads ViT-H's penultimate layer: of a full 24-layer tower 23 are kept, and a file exported from diffusers
    holds only those 23 (the last of them was dropped too, a layer short); a tower of another width (the tests'
    tiny ones) is taken as whole."""
    assert ldm_checkpoint.sd2_text_depth(24, 1024) == 23
    assert ldm_checkpoint.sd2_text_depth(23, 1024) == 23
    assert ldm_checkpoint.sd2_text_depth(3, 32) == 2


def test_a_folder_with_a_part_missing_or_only_its_fp16_variant(tmp_path, tokenizer_dir, no_network):
    import json

    source = family_pipeline("sd1", tokenizer_dir)
    for missing in ("text_encoder", "tokenizer"):
        source.save_pretrained(tmp_path / missing)
        shutil.rmtree(tmp_path / missing / missing)
        with pytest.raises(SystemExit, match=f"model_index.json lists {missing}, but the folder has no {missing}/"):
            load_teacher(tmp_path / missing)
    # what a download that left out the safety checker still makes: a teacher
    source.save_pretrained(tmp_path / "no_safety")
    index = json.loads((tmp_path / "no_safety" / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (tmp_path / "no_safety" / "model_index.json").write_text(json.dumps(index))
    assert load_teacher(tmp_path / "no_safety").safety_checker is None
    # a folder of the fp16 variant only, as save_pretrained(variant="fp16") or a variant download leaves it
    copy = family_pipeline("sd1", tokenizer_dir).to(torch.float16)
    copy.save_pretrained(tmp_path / "variant", variant="fp16")
    pipe = load_teacher(tmp_path / "variant")
    assert pipe.unet.dtype == torch.float32 and load_teacher_vae(tmp_path / "variant").dtype == torch.float32


def _hub_cache(root: Path, repo: str, tokenizer_dir: Path) -> None:
    """A Hugging Face cache entry for ``repo`` holding the tokenizer files (the hub's on-disk layout)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)


def test_tokenizer_is_found_offline_or_named_as_missing(tokenizer_dir, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    path = write_ldm(family_pipeline("sd1", tokenizer_dir), "sd1", tmp_path / "sd1.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(ldm_checkpoint, "PACKAGE_ROOT", tmp_path / "ComfyUI" / "custom_nodes" / "direct_distill")
    monkeypatch.setattr(ldm_checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="no CLIP tokenizer found.*--tokenizer FOLDER"):
        load_teacher(path)
    with pytest.raises(SystemExit, match="not a CLIP tokenizer folder"):
        load_teacher(path, tokenizer=tmp_path)
    # ComfyUI's copy, when this package sits in ComfyUI/custom_nodes/
    comfy_tokenizer = tmp_path / "ComfyUI" / "comfy" / "sd1_tokenizer"
    shutil.copytree(tokenizer_dir, comfy_tokenizer)
    assert load_teacher(path).tokenizer.model_max_length == 77
    # the Hugging Face cache comes first
    _hub_cache(tmp_path / "hub", "openai/clip-vit-large-patch14", tokenizer_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe, description = ldm_checkpoint.load_ldm_checkpoint(path)
    assert "openai/clip-vit-large-patch14 in the Hugging Face cache" in description
    # a vocabulary that is not the text encoder's
    from direct_distill.lab.teacher import build_tokenizer

    other = build_tokenizer(tmp_path / "other")
    other.add_tokens(["extra"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="tokens but the CLIP-L text encoder embeds"):
        load_teacher(path, tokenizer=tmp_path / "other")


def test_comfyui_tokenizer_vocabulary_fits_a_full_size_clip(no_network):
    """ComfyUI's own copy of CLIP's vocabulary (used when nothing else is found) has the 49408 tokens SD's text
    encoders embed, and is fitted to their 77 positions."""
    import os

    comfy = Path(os.environ.get("COMFYUI_PATH", "/work/comfyui")) / "comfy" / "sd1_tokenizer"
    if not comfy.is_dir():
        pytest.skip(f"no ComfyUI checkout at {comfy.parents[1]} (set COMFYUI_PATH)")
    tok, source = ldm_checkpoint.find_tokenizer(comfy)
    fitted = ldm_checkpoint._tokenizer_for(tok, 77, sd.CLIP_L["vocab_size"], ldm_checkpoint.OPEN_CLIP_PAD, "x")
    assert fitted.model_max_length == 77 and fitted.pad_token_id == 0
    assert len(fitted("a photo of a cat", padding="max_length").input_ids) == 77


def test_teacher_vae_loads_alone_from_a_file_or_a_folder(tokenizer_dir, tmp_path, no_network):
    from direct_distill.training.teachers import load_teacher_vae

    source = family_pipeline("sdxl", tokenizer_dir)
    path = write_ldm(source, "sdxl", tmp_path / "sdxl.safetensors", dtype=torch.float16)
    source.save_pretrained(tmp_path / "folder")
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = source.vae.encode(image).latent_dist.mean
        for teacher, dtype, tolerance in ((path, torch.float32, 2e-2), (tmp_path / "folder", torch.bfloat16, 5e-2)):
            vae = load_teacher_vae(teacher, dtype)   # no tokenizer needed: nothing but the VAE is read
            assert {p.dtype for p in vae.parameters()} == {dtype}
            assert vae.config.scaling_factor == 0.13025
            got = vae.encode(image.to(dtype)).latent_dist.mean.float()
            torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    with pytest.raises(SystemExit, match="no VAE weights"):
        load_teacher_vae(_save({k: v for k, v in pipeline_to_ldm(source, "sdxl").items()
                                if not k.startswith("first_stage_model.")}, tmp_path / "no_vae.safetensors"))
