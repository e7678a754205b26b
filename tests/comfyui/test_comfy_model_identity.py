"""nodes/model_identity.py in a real ComfyUI: a MODEL's UNet named as diffusers names it (so a file's fingerprint
is checkable in both front doors), and the LoRA-fit check that keeps Load Distilled Student from patching a model
the student was not made for."""

import copy
import importlib
import logging
import shutil
from pathlib import Path

import folder_paths
import pytest
from diffusers import UNet2DConditionModel

from .test_comfy_lab_students import LAB_UNET_CONFIG, LabSD15
from .test_comfy_shortcut import run_node
from .test_comfy_student_lora import comfy_model_from, diffusers_twin_of_tiny_sd15

REPO = Path(__file__).resolve().parents[2]
LAB_STUDENT = REPO / "lab" / "assets" / "students" / "sfd.safetensors"


@pytest.fixture(scope="module")
def dd(comfy_loaded):
    """direct_distill's modules, from the very copy ComfyUI loaded."""
    return lambda name: importlib.import_module(f"{comfy_loaded.__name__}.{name}")


@pytest.fixture(scope="module")
def lab_unet():
    return UNet2DConditionModel.from_pretrained(REPO / "lab" / "assets" / "teacher" / "unet")


@pytest.mark.parametrize("which", ["tiny_sd15", "lab"])
def test_a_comfy_model_has_the_shape_fingerprint_of_its_diffusers_twin(dd, lab_unet, which):
    identity, files = dd("nodes.model_identity"), dd("models.student_file")
    unet = diffusers_twin_of_tiny_sd15() if which == "tiny_sd15" else lab_unet
    model = comfy_model_from(unet) if which == "tiny_sd15" else comfy_model_from(unet, LabSD15(dict(LAB_UNET_CONFIG)))
    assert identity.unet_parameter_shapes(model) == files.unet_parameter_shapes(unet)
    assert identity.unet_shape_fingerprint(model) == files.shape_fingerprint(files.unet_parameter_shapes(unet))
    other = diffusers_twin_of_tiny_sd15() if which == "lab" else lab_unet
    assert identity.unet_shape_fingerprint(model) != files.shape_fingerprint(files.unet_parameter_shapes(other))


def test_a_fitting_lora_has_no_mismatch_and_a_foreign_one_is_named(dd, lab_unet):
    identity = dd("nodes.model_identity")
    lora = dd("models.io").read_safetensors(LAB_STUDENT)[0]
    lab_model = comfy_model_from(lab_unet, LabSD15(dict(LAB_UNET_CONFIG)))
    assert identity.lora_mismatches(lab_model, lora) == []

    problems = identity.lora_mismatches(comfy_model_from(diffusers_twin_of_tiny_sd15()), lora)
    assert any("have other shapes in this model" in p for p in problems), problems
    assert any("name no layer of this model" in p for p in problems), problems
    renamed = {k.replace("lora_unet_", "lora_unet_no_such_"): v for k, v in lora.items()}
    assert identity.lora_mismatches(lab_model, renamed) == [f"none of its {len(lora)} tensors names a layer of "
                                                            "this model"]


def test_the_student_loader_refuses_a_student_of_another_unet_before_patching(comfy_loaded, tmp_path, caplog):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(LAB_STUDENT, folder / "lab_sfd.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder))
    model = comfy_model_from(diffusers_twin_of_tiny_sd15())  # SD's noise table and parameterisation, other UNet
    before = copy.copy(model.patches)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        run_node("DirectDistillLoadStudent", model=model, student_name="lab_sfd.safetensors", nfe=0, strength=1.0)
    assert str(err.value).startswith("lab_sfd.safetensors: this student was made for another UNet: ")
    assert "layers have other shapes in this model" in str(err.value)
    assert not [r for r in caplog.records if "lora" in r.getMessage().lower()], caplog.text
    assert model.patches == before
