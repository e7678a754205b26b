"""The lab as a preset of the training CLI: its Fashion-MNIST latents (the teacher's VAE, cached), and the README's
commands for the committed lab shortcut and students, which must still mean the settings those files were trained
with."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from direct_distill.lab import SHORTCUT_PATH, STUDENTS_DIR, TEACHER_DIR
from direct_distill.lab.distill_preset import LAB, lab_latents
from direct_distill.models import load_shortcut
from direct_distill.models.student_file import read_student
from direct_distill.training.cli import build_parser
from direct_distill.training.config import leaves, replace_settings, training_record
from direct_distill.training.registry import entry
from direct_distill.training.runner import prepare, with_teacher_values
from direct_distill.training.teachers import load_teacher

README = Path(__file__).resolve().parents[1] / "README.md"


def test_lab_data_is_the_dataset_encoded_by_the_teachers_vae_and_cached(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import direct_distill.lab.distill_preset as preset
    from direct_distill.lab.teacher import build_vae

    images, labels = torch.rand(6, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3, 8, 9])
    monkeypatch.setattr(preset, "load_fashion_mnist", lambda split: (images, labels))
    monkeypatch.setattr(preset, "DATA_CACHE", tmp_path / "lab_work" / "data_latents.safetensors")
    torch.manual_seed(0)
    pipe = SimpleNamespace(vae=build_vae().eval())
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    data = lab_latents(pipe, tmp_path, accelerator)
    with torch.no_grad():
        post = pipe.vae.encode(images).latent_dist
    torch.testing.assert_close(data.latents, post.mean * pipe.vae.config.scaling_factor)
    torch.testing.assert_close(data.latent_std, post.std * pipe.vae.config.scaling_factor)
    assert data.prompts[-2:] == ["bag", "ankle boot"]
    monkeypatch.setattr(preset, "load_fashion_mnist", pytest.fail)  # cached: the dataset is not read again,
    assert torch.equal(lab_latents(pipe, tmp_path / "another_run", accelerator).latents, data.latents)  # by any run
    assert not (tmp_path / "another_run").exists()
    # the lab's folder not writable (here: its place is a file): the run's own work folder keeps the cache
    (tmp_path / "read_only").write_text("")
    monkeypatch.setattr(preset, "DATA_CACHE", tmp_path / "read_only" / "data_latents.safetensors")
    monkeypatch.setattr(preset, "load_fashion_mnist", lambda split: (images, labels))
    assert torch.equal(lab_latents(pipe, tmp_path / "run", accelerator).latents, data.latents)
    assert (tmp_path / "run" / "data_latents.safetensors").is_file()
    monkeypatch.setattr(preset, "load_fashion_mnist", pytest.fail)
    assert torch.equal(lab_latents(pipe, tmp_path / "run", accelerator).latents, data.latents)


def readme_lab_commands() -> list[list[str]]:
    """The `distill` commands the README gives for the committed lab shortcut and students."""
    section = README.read_text().split("The committed lab shortcut and students", 1)[1].split("```bash", 1)[1].split("```")[0]
    lines = re.sub(r"\\\n\s*", " ", section).splitlines()
    return [shlex.split(line.split("#")[0])[4:] for line in lines if "distill" in line]


def flat(training: dict) -> dict:
    """A student file's recorded settings with the LoRA's under the CLI's names."""
    out = dict(training)
    out.update(out.pop("lora", {}))
    out.update({new: out.pop(old) for old, new in (("lora_rank", "rank"), ("lora_alpha", "alpha")) if old in out})
    return out


@pytest.mark.skipif(not (TEACHER_DIR / "model_index.json").is_file(), reason="the lab teacher is not built")
def test_the_readme_commands_of_the_committed_files_still_mean_their_recorded_settings(tmp_path):
    commands = readme_lab_commands()
    assert [c[0] for c in commands] == ["shortcut", "progressive", "progressive", "sfd", "sfd", "sfd", "gdd", "disback",
                                         "disback"]
    parser = build_parser(LAB)
    teacher = load_teacher(TEACHER_DIR, torch.float32)
    for args in commands:
        values = vars(parser.parse_args(args))
        method = values.pop("method")
        values["work"] = tmp_path / "work"  # prepare() creates the work folder: not in the repository
        plan = prepare(method, replace_settings(entry(method).config(), **values), LAB)
        assert plan.preset is LAB
        out = README.parent / plan.run.out  # the README's paths are relative to the repository
        if method == "shortcut":
            assert out == SHORTCUT_PATH
            recorded = load_shortcut(out).metadata["extra"]["training"]
        else:
            assert out.parent == STUDENTS_DIR and out.is_file()
            recorded = flat(read_student(out)[1].extra["training"])
        now = training_record(with_teacher_values(plan.config, teacher))
        shared = sorted(recorded.keys() & now.keys() - {"target_modules"} if method == "gdd" else
                        recorded.keys() & now.keys())
        assert len(shared) >= 12, method
        # files written before the record resolved what was left to the teacher hold None there
        left = {f.name for f, _, _ in leaves(plan.config) if f.metadata["teacher_default"]}
        assert {k: now[k] for k in shared} == {k: now[k] if k in left and recorded[k] is None else recorded[k]
                                               for k in shared}, args

