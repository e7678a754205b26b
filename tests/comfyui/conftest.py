"""Runs tests/comfyui against the real ComfyUI checkout named by COMFYUI_PATH, on the CPU; without
COMFYUI_PATH every module here is reported as skipped (never imported, so modules may import comfy)."""

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO_ROOT = Path(__file__).resolve().parents[2]


if not COMFYUI_PATH:
    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip("COMFYUI_PATH is not set: tests/comfyui runs against a ComfyUI checkout, "
                        "e.g. COMFYUI_PATH=/path/to/ComfyUI pytest tests/comfyui")

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)

else:
    sys.path.insert(0, str(Path(COMFYUI_PATH).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported
    import comfy.model_management
    import comfy.utils

    assert comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU
    comfy.utils.PROGRESS_BAR_ENABLED = False

    def load_repo_as_custom_node() -> bool:
        """What ComfyUI does at start-up for a folder in custom_nodes/ (it never raises: check the result)."""
        import nodes

        return asyncio.run(nodes.load_custom_node(str(REPO_ROOT), ignore=set(), module_parent="custom_nodes"))

    @pytest.fixture(scope="session")
    def load_repo():
        """Loads the repository as a custom node again; returns ComfyUI's success flag."""
        return load_repo_as_custom_node

    @pytest.fixture(scope="session")
    def comfy_loaded():
        """The repository loaded as a custom node; returns the package module ComfyUI registered
        (under a name of its own choosing).

        exp_karras is first taken out of ComfyUI's tables (in place), so that what the tests see is what
        loading the folder registers: pytest collects the repository root as a package (it has an
        __init__.py) and imports it as `main`-or-whatever-the-clone-is-called, which inside ComfyUI's
        environment already registers the scheduler.
        """
        import comfy.samplers

        comfy.samplers.SCHEDULER_HANDLERS.pop("exp_karras", None)
        while "exp_karras" in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.remove("exp_karras")
        assert load_repo_as_custom_node(), "ComfyUI failed to load the repository (see the log above)"
        init = str(REPO_ROOT / "__init__.py")
        return [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == init][-1]

    @pytest.fixture(scope="session")
    def dd_schedulers(comfy_loaded):
        """direct_distill.schedulers, from the very copy ComfyUI loaded."""
        return importlib.import_module(comfy_loaded.__name__ + ".schedulers")
