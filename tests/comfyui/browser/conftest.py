"""A real ComfyUI server (started once, the repository installed as a custom node) and headless Chromium driven by
playwright, both for this folder's tests only (playwright's event loop must not outlive them: the in-process
tests beside them run asyncio themselves). Skipped with the reason when playwright or Chromium is missing.

The server runs on a base directory of its own (models, user, output under a temporary folder), holding the
files the example workflows name: a random-weights SD1.5-shaped checkpoint, a student made for it by the
project's own LoRA writer or a few-step LoRA as the releases write them (tests/lora_releases.py); the shortcut is
written once the server has created models/shortcuts.
"""

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from ..conftest import COMFYUI_PATH, REPO_ROOT

CHROMIUM = os.environ.get("DD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
WORKFLOWS = REPO_ROOT / "workflows"
SERVER_START_S = 300
SHORTCUT_BAND = (200.0, 600.0)  # takes 7 of 12 exp_karras steps (t = 255), as in shortcut_7plus1.json
STUDENT_NFES = (2, 4)

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None


def pytest_collection_modifyitems(config, items):
    reason = ("playwright is not installed" if sync_playwright is None
              else None if Path(CHROMIUM).is_file() else f"no Chromium at {CHROMIUM} (set DD_CHROMIUM)")
    if reason:
        for item in items:
            if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
                item.add_marker(pytest.mark.skip(reason=f"browser tests: {reason}"))


def file_widgets() -> dict[str, dict[str, str | None]]:
    """{"checkpoints" | "shortcuts" | "loras": {file name: preset}} that the example workflows ask for; the preset
    (Load Distilled Student's widget: "from file" for a Direct Distill student) only for loras."""
    wanted = {"checkpoints": {}, "shortcuts": {}, "loras": {}}
    for path in sorted(WORKFLOWS.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] == "CheckpointLoaderSimple":
                wanted["checkpoints"][values[0]] = None
            elif node["type"] == "DirectDistillLoadShortcut":
                wanted["shortcuts"][values[0]] = None
            elif node["type"] == "DirectDistillLoadStudent":
                wanted["loras"][values[0]] = values[3]
    return wanted


@pytest.fixture(scope="package")
def comfy_base(tmp_path_factory, comfy_loaded):
    """The server's base directory, with the repository linked into custom_nodes and the model files."""
    from ..tiny_models import write_sd15_shaped_checkpoint  # comfy is importable only once COMFYUI_PATH is set

    base = tmp_path_factory.mktemp("comfy_base")
    user = base / "user" / "default"
    user.mkdir(parents=True)
    # A returning user: a new one gets the templates browser and an empty graph on the first visit.
    (user / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-direct-distill").symlink_to(REPO_ROOT, target_is_directory=True)
    wanted = file_widgets()
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    first, *others = sorted(wanted["checkpoints"])
    unet = write_sd15_shaped_checkpoint(checkpoints / first)
    for name in others:
        os.link(checkpoints / first, checkpoints / name)
    loras = base / "models" / "loras"
    loras.mkdir()
    for name, preset in sorted(wanted["loras"].items()):
        if preset == "from file":
            write_student(loras / name, unet)
        else:  # a few-step LoRA as the releases ship them (kohya names, LCM-LoRA's modules)
            from lora_releases import random_layers, target_modules, write_release

            write_release(loras / name, random_layers(target_modules(unet), scale=0.01), "kohya")
    return {"path": base, "unet": unet, "shortcuts": sorted(wanted["shortcuts"])}


def write_student(path: Path, unet):
    """A 4-NFE student (also NFE 2) for ``unet``, with random LoRA weights, by the training module's writer."""
    import copy

    lora = importlib.import_module(f"{_package()}.training.lora")
    grid = importlib.import_module(f"{_package()}.schedulers.grids").trailing_timesteps
    student = copy.deepcopy(unet)
    adapters = lora.add_lora(student, lora.LoraSpec(rank=4, alpha=4.0))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type="epsilon")
    lora.write_student(path, student, scheduler_config=sd, method="sfd", teacher="tests/sd15-shaped",
                       nfe_timesteps={n: grid(n) for n in STUDENT_NFES}, default_nfe=4,
                       comfy_sampler="euler", guidance=1.0)


def write_shortcut(path: Path, unet):
    """A lab-preset shortcut for ``unet`` (random weights), band SHORTCUT_BAND."""
    package = _package()
    nafnet = importlib.import_module(f"{package}.models.nafnet")
    shortcut_file = importlib.import_module(f"{package}.models.shortcut_file")
    student_file = importlib.import_module(f"{package}.models.student_file")
    fingerprint = student_file.shape_fingerprint(student_file.unet_parameter_shapes(unet))
    stage = lambda name: {**nafnet.PRESETS[name], "in_channels": 4, "out_channels": 4}  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nafnet.TwoStageShortcut.from_configs(stage("lab_stage1"), stage("lab_stage2"))
    shortcut_file.save_shortcut(path, model, t_band=SHORTCUT_BAND, teacher="tests/sd15-shaped",
                                teacher_unet_shape_fingerprint=fingerprint, latent_channels=4)


def _package() -> str:
    """The name under which the repository is imported in this process (tests/comfyui's conftest loaded it)."""
    init = str(REPO_ROOT / "__init__.py")
    return next(name for name, module in list(sys.modules.items()) if getattr(module, "__file__", None) == init)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="package")
def comfy_server(comfy_base):
    """{"url", "path", "log", ...}: ComfyUI's main.py on the CPU, on a free loopback port."""
    base = comfy_base["path"]
    port = _free_port()
    log = base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                get_json(f"{url}/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield {**comfy_base, "url": url, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="package")
def shortcut_names(comfy_server):
    """The shortcut files the workflows name, written into the models/shortcuts folder the server created."""
    folder = comfy_server["path"] / "models" / "shortcuts"
    assert folder.is_dir(), "the server did not create models/shortcuts"
    for name in comfy_server["shortcuts"]:
        write_shortcut(folder / name, comfy_server["unet"])
    return comfy_server["shortcuts"]


@pytest.fixture(scope="package")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Frontend:
    """One page of the ComfyUI frontend; requests leave only for the loopback server."""

    def __init__(self, browser, url: str):
        self.url = url
        self.aborted, self.errors = [], []
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.route("**/*", self._route)
        self.page.on("pageerror", lambda err: self.errors.append(f"{err}\n{err.stack}"))
        self.page.goto(url)
        self.page.wait_for_function("window.comfyAPI?.app?.app?.graph?.nodes?.length > 0", timeout=120_000)

    def _route(self, route):
        if route.request.url.startswith(self.url + "/") or route.request.url == self.url:
            route.continue_()
        else:
            self.aborted.append(route.request.url)
            route.abort()

    def js(self, expression: str, arg=None):
        """Evaluates ``expression``, a function of (app, arg), in the page."""
        return self.page.evaluate(f"async (arg) => {{ const app = window.comfyAPI.app.app; "
                                  f"const api = window.comfyAPI.api.api; return await ({expression})(app, arg); }}",
                                  arg)

    def load(self, workflow: dict):
        """Opens a workflow as the user would (the saved view restored), waiting for its first frame."""
        self.js("(app, w) => app.loadGraphData(w, true, true)", workflow)
        self.page.wait_for_timeout(500)

    def our_errors(self) -> list[str]:
        """Page errors raised in this project's extension."""
        return [e for e in self.errors if "/extensions/comfyui-direct-distill/" in e]


@pytest.fixture(scope="package")
def frontend(comfy_server, shortcut_names, browser):  # comfy_loaded runs asyncio before playwright starts its loop
    page = Frontend(browser, comfy_server["url"])
    yield page
    page.page.close()


def copy_if_asked(source: Path, destination: Path):
    """Copies a picture the test took into the repository when DD_WRITE_PICTURES=1 (the README's screenshot,
    the workflow thumbnails)."""
    if os.environ.get("DD_WRITE_PICTURES") == "1":
        destination.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, destination)
