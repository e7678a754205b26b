"""GET /direct_distill/sigmas inside a real ComfyUI: the sigmas KSampler, BasicScheduler and the ExpKarras
Scheduler node run (SD's table, or a checkpoint's own), a shortcut's band, a student's sigmas, and one-line
HTTP 400s for bad queries."""

import asyncio
import importlib
from pathlib import Path

import comfy.sd
import comfy.samplers
import comfy_extras.nodes_custom_sampler as custom_sampler
import folder_paths
import pytest
import torch
from aiohttp.test_utils import make_mocked_request
from multidict import MultiDict
from safetensors.torch import save_file

from .test_comfy_shortcut import T_BAND, run_node
from .tiny_models import tiny_sd15_model, write_sd15_shaped_checkpoint


@pytest.fixture(scope="module")
def dd(comfy_loaded):
    return lambda name: importlib.import_module(f"{comfy_loaded.__name__}.{name}")


@pytest.fixture(scope="module")
def route(dd):
    return dd("nodes.schedule_route")


def answer(route, **query):
    return route.answer(MultiDict({k: str(v) for k, v in query.items()}))


def reply(route, query_string):
    """(status, body) of the route's handler for a raw query string."""
    response = asyncio.run(route.handle(make_mocked_request("GET", f"{route.ROUTE}?{query_string}")))
    return response.status, response.text


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_model()  # SD1.5's noise table, as the route's default


@pytest.mark.parametrize("steps, denoise, sampler", [(12, 1.0, "dpmpp_2m"), (7, 0.45, "euler"), (1, 1.0, "uni_pc"),
                                                     (20, 0.0, "euler")])
def test_answers_the_sigmas_ksampler_runs_for_every_scheduler(comfy_loaded, route, model, steps, denoise, sampler):
    assert "exp_karras" in comfy.samplers.SCHEDULER_NAMES
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        got = answer(route, scheduler=scheduler, steps=steps, denoise=denoise, sampler=sampler)
        expected = comfy.samplers.KSampler(model, steps, "cpu", sampler, scheduler, denoise).sigmas
        assert got["sigmas"] == expected.tolist(), scheduler
        assert got["schedulers"] == comfy.samplers.SCHEDULER_NAMES and got["model"] is None


def test_without_a_sampler_it_is_basic_schedulers_sigmas(comfy_loaded, route, model):
    for scheduler in ("karras", "exp_karras", "simple"):
        (expected,) = custom_sampler.BasicScheduler().get_sigmas(model, scheduler, 9, 0.5)
        assert answer(route, scheduler=scheduler, steps=9, denoise=0.5)["sigmas"] == pytest.approx(
            expected.tolist(), rel=1e-6)


def test_p_gives_the_expkarras_scheduler_nodes_sigmas(comfy_loaded, route, model):
    for p, denoise in ((0.0, 1.0), (2.5, 0.6), (1.0, 1.0)):
        (expected,) = run_node("DirectDistillExpKarrasScheduler", model=model, steps=12, p=p, denoise=denoise)
        assert answer(route, scheduler="exp_karras", steps=12, p=p, denoise=denoise)["sigmas"] == expected.tolist()
    # p = 1 is the dropdown entry
    assert answer(route, scheduler="exp_karras", steps=12, p=1)["sigmas"] == pytest.approx(
        answer(route, scheduler="exp_karras", steps=12)["sigmas"], rel=1e-6)


def test_every_step_count_the_sampler_nodes_take_is_plotted(route, model):
    """KSampler's steps widget goes to 10000 (the route stopped at 1000), and ComfyUI runs 12 steps at denoise
    0.001 (12,000 computed, the last 12 run)."""
    for steps, denoise in ((10000, 1.0), (12, 0.001)):
        sigmas = answer(route, scheduler="karras", steps=steps, denoise=denoise)["sigmas"]
        expected = comfy.samplers.KSampler(model, steps, "cpu", None, "karras", denoise).sigmas
        assert sigmas == expected.tolist() and len(sigmas) == steps + 1


@pytest.fixture(scope="module")
def checkpoint(comfy_loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    write_sd15_shaped_checkpoint(folder / "tiny_sd15.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (folder / "old.ckpt").write_bytes(b"PK\x03\x04 a pickle, never opened")
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    return folder / "tiny_sd15.safetensors"


def test_a_checkpoint_gives_the_sigmas_of_that_model_loaded(comfy_loaded, route, checkpoint):
    loaded, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    assert type(loaded.model.model_config).__name__ == "SD15"
    for scheduler in ("karras", "exp_karras", "sgm_uniform"):
        got = answer(route, scheduler=scheduler, steps=10, model=checkpoint.name)
        assert got["sigmas"] == comfy.samplers.KSampler(loaded, 10, "cpu", None, scheduler, 1.0).sigmas.tolist()
        assert got["model"] == checkpoint.name


@pytest.fixture(scope="module")
def shortcut(dd, tmp_path_factory):
    """A shortcut file (band T_BAND) in a registered shortcuts folder."""
    nafnet, shortcut_file = dd("models.nafnet"), dd("models.shortcut_file")
    stage = {**nafnet.PRESETS["lab_stage1"], "in_channels": 4, "out_channels": 4}
    folder = tmp_path_factory.mktemp("shortcuts")
    shortcut_file.save_shortcut(folder / "route_shortcut.safetensors", nafnet.TwoStageShortcut.from_configs(stage),
                                t_band=T_BAND, teacher="tiny", teacher_unet_shape_fingerprint="0123456789abcdef",
                                latent_channels=4)
    folder_paths.add_model_folder_path("direct_distill_shortcuts", str(folder))
    return "route_shortcut.safetensors"


def test_a_shortcut_adds_its_band_and_the_handoff_steps_the_sampler_accepts(dd, route, model, shortcut):
    got = answer(route, scheduler="exp_karras", steps=20, sampler="dpmpp_2m", shortcut=shortcut)
    table = model.get_model_object("model_sampling").sigmas
    assert got["shortcut"]["t_band"] == list(T_BAND)
    assert got["shortcut"]["sigma_band"] == pytest.approx([float(table[600]), float(table[200])], rel=1e-6)
    assert got["shortcut"]["handoff_steps"] == list(range(6, 14))  # what the Shortcut KSampler names on a refusal
    twelve = answer(route, scheduler="exp_karras", steps=12, shortcut=shortcut)
    assert twelve["shortcut"]["handoff_steps"] == [4, 5, 6, 7]


def test_a_student_gives_its_own_sigmas(dd, route, tmp_path_factory):
    lora = dd("training.lora")
    from .test_comfy_student_lora import diffusers_twin_of_tiny_sd15

    unet = diffusers_twin_of_tiny_sd15()
    lora.add_lora(unet, lora.LoraSpec(rank=2, alpha=2.0))
    folder = tmp_path_factory.mktemp("route_loras")
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    grid = dd("schedulers.grids").trailing_timesteps
    path = lora.write_student(folder / "route_student.safetensors", unet, scheduler_config=sd, method="sfd",
                              teacher="tiny", nfe_timesteps={n: grid(n) for n in (2, 4)},
                              default_nfe=4, comfy_sampler="euler", guidance=1.0)
    folder_paths.add_model_folder_path("loras", str(folder))
    info = dd("models.student_file").read_student(path)[1]
    for nfe, expected in ((0, 4), (2, 2), (4, 4)):
        got = answer(route, student=path.name, nfe=nfe)
        assert got["sigmas"] == info.nfe_schedules[expected]["sigmas"] and got["nfe"] == expected
        assert got["nfes"] == [2, 4]
    status, text = reply(route, f"student={path.name}&nfe=3")
    assert status == 400 and text == "student 'route_student.safetensors' was trained for nfe 2, 4, not 3"
    status, text = reply(route, f"student={path.name}&preset=lcm-sd15")
    assert status == 400 and "a Direct Distill student's file says how it samples" in text
    # the model the frontend sends beside it is checked too, as without a student
    for model in ("nope.safetensors", "../../etc/passwd"):
        status, text = reply(route, f"student={path.name}&model={model}")
        assert status == 400 and text.startswith(f"unknown model {model!r}"), text


def test_a_few_step_lora_from_elsewhere_gives_its_presets_sigmas_on_the_models_table(dd, route, checkpoint,
                                                                                    tmp_path_factory):
    """As Load Distilled Student takes them: the preset chosen on the node, else the one stamped in the file."""
    presets, layouts = dd("schedulers.few_step_presets").PRESETS, dd("models.lora_layouts")
    folder = tmp_path_factory.mktemp("preset_loras")
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{layer}.lora_down.weight": torch.zeros(4, 768), f"{layer}.lora_up.weight": torch.zeros(320, 4)}
    save_file(tensors, str(folder / "lcm_like.safetensors"))
    save_file(tensors, str(folder / "stamped.safetensors"), metadata={layouts.PRESET_METADATA_KEY: "tcd-sd15"})
    folder_paths.add_model_folder_path("loras", str(folder))
    loaded, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    table = loaded.get_model_object("model_sampling").sigmas
    got = answer(route, student="lcm_like.safetensors", preset="lcm-sd15", model=checkpoint.name)
    assert got["sigmas"] == presets["lcm-sd15"].sigmas(4, table).tolist() and got["nfe"] == 4
    got = answer(route, student="stamped.safetensors", nfe=6, model=checkpoint.name)
    assert got["sigmas"] == presets["tcd-sd15"].sigmas(6, table).tolist() and got["nfes"] == list(range(4, 50))
    for query, reason in (("student=lcm_like.safetensors", "not stamped with a few-step preset; choose its preset"),
                          ("student=lcm_like.safetensors&preset=nope", "unknown preset 'nope'"),
                          ("student=lcm_like.safetensors&preset=hyper-sd15-2step&nfe=4",
                           "preset hyper-sd15-2step samples with nfe 2 (default 2), not 4")):
        status, text = reply(route, query)
        assert status == 400 and reason in text, text


BAD_QUERIES = {
    "scheduler=nonsense&steps=10": "unknown scheduler 'nonsense'",
    "steps=10": "scheduler is required",
    "scheduler=karras": "steps is required",
    "scheduler=karras&steps=0": "steps must be between 1 and 10000, got '0'",
    "scheduler=karras&steps=10001": "steps must be between 1 and 10000, got '10001'",
    f"scheduler=karras&steps={'9' * 4000}": f"steps must be between 1 and 10000, got '{'9' * 40}'",
    "scheduler=karras&steps=1e3": "steps must be an integer",
    "scheduler=karras&steps=12&denoise=nan": "denoise must be a finite number between 0 and 1",
    "scheduler=karras&steps=12&denoise=1.5": "denoise must be a finite number between 0 and 1",
    "scheduler=karras&steps=12&denoise=-inf": "denoise must be a finite number",
    "scheduler=exp_karras&steps=12&p=inf": "p must be a finite number between 0 and 10",
    "scheduler=exp_karras&steps=12&p=-1": "p must be a finite number between 0 and 10",
    "scheduler=exp_karras&steps=12&p=abc": "p must be a number",
    "scheduler=karras&steps=12&p=1": "p is the ExpKarras Scheduler node's curvature",
    "scheduler=karras&steps=10000&denoise=0.01": "steps / denoise must be at most 100000",
    "scheduler=karras&steps=12&model=old.ckpt": "model 'old.ckpt': not a .safetensors file, the only kind this "
                                                "route reads",
    "scheduler=karras&steps=12&sampler=nonsense": "unknown sampler 'nonsense'",
    "scheduler=karras&steps=12&model=nope.safetensors": "unknown model 'nope.safetensors'",
    "scheduler=karras&steps=12&model=../../../../etc/passwd": "unknown model '../../../../etc/passwd'",
    "scheduler=karras&steps=12&model=/etc/passwd": "unknown model '/etc/passwd'",
    "scheduler=karras&steps=12&model=broken.safetensors": "model 'broken.safetensors': not a readable safetensors",
    "scheduler=karras&steps=12&shortcut=nope.safetensors": "unknown shortcut 'nope.safetensors'",
    "student=nope.safetensors": "unknown student 'nope.safetensors'",
    "student=x.safetensors&scheduler=karras": "'scheduler' does not apply to a student",
    "scheduler=karras&steps=12&path=/etc": "unknown parameter 'path'",
    "scheduler=karras&steps=12&steps=13": "each parameter may be given once",
    "scheduler=kl_optimal&steps=1": "kl_optimal gives no finite sigmas at 1 step",  # ComfyUI's own 0 / 0
    "scheduler=karras&steps=12&denoise=%0A5%0A": r"denoise must be a finite number between 0 and 1, got '\n5\n'",
    "scheduler=exp_karras&steps=12&p=%0A11%0A%0A": r"p must be a finite number between 0 and 10, got '\n11\n\n'",
    f"scheduler={'x' * 100_000}&steps=12": f"unknown scheduler '{'x' * 40}'; known:",
    f"scheduler=karras&steps=12&sampler={'y' * 100_000}": f"unknown sampler '{'y' * 40}'",
    f"scheduler=karras&steps=12&{'z' * 100_000}=1": f"unknown parameter '{'z' * 40}'; the parameters are",
    "scheduler=karras&steps=12&nfe=-5": "nfe applies to a student only (with student=)",
    "scheduler=karras&steps=12&preset=nonsense": "preset applies to a student only (with student=)",
    "scheduler=karras&steps=12&model=unmounted.safetensors": "model 'unmounted.safetensors': listed, but its file "
                                                              "cannot be opened (FileNotFoundError; a link to a drive "
                                                              "that is not mounted?)",
    "scheduler=karras&steps=12&shortcut=unmounted.safetensors": "shortcut 'unmounted.safetensors': listed, but its "
                                                                "file cannot be opened",
}


@pytest.fixture(scope="module")
def dangling_links(checkpoint, shortcut):
    """A listed model and shortcut (in the tests' own folders) whose links lead nowhere: a drive not mounted."""
    shortcuts = Path(folder_paths.get_full_path_or_raise("direct_distill_shortcuts", shortcut)).parent
    for folder in (checkpoint.parent, shortcuts):
        (folder / "unmounted.safetensors").symlink_to(folder / "gone" / "model.safetensors")


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_a_bad_query_gets_400_and_one_line(route, checkpoint, shortcut, dangling_links, query):
    status, text = reply(route, query)
    assert status == 400 and text.startswith(BAD_QUERIES[query]), text[:300]
    assert "\n" not in text and "Traceback" not in text and len(text) < 1000

