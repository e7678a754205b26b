"""The generated command line and the runner: every registered method's flags come from its config dataclass,
bad values and missing inputs are refused in one line naming the flag before anything loads, a work folder
resumes only under its own settings, Ctrl-C says how to resume, a preset applies to its own teacher only, and a
new method is one module plus one registry line."""

import hashlib
import os
import json
import re
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch

import direct_distill.training.teachers as teachers
from direct_distill.models.io import atomic_save_file, read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.training import registry
from direct_distill.training.cli import build_parser, main
from direct_distill.training.config import RunConfig, Settings, flag, leaves, run_config, setting
from direct_distill.training.runner import SETTINGS_FILE, MethodEntry, Preset
from direct_distill.training.sfd import SFD


@pytest.fixture
def teacher(tiny_sd_pipeline, tmp_path):
    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")
    return tmp_path / "teacher"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a teacher is loaded."""
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))


def sfd_args(teacher, *more):
    """A tiny SFD run: one step, one NFE, one teacher substep."""
    return ["sfd", "--teacher", str(teacher), "--prompts", str(teacher.parent / "prompts.txt"), "--nfe", "1",
            "--default-nfe", "1", "--steps", "2", "--batch-size", "1", "--rank", "2", "--teacher-substeps", "1",
            "--checkpoint-every", "1", "--warmup-steps", "0", *more]


def refusal(run, capsys) -> str:
    """The message of a refused command line (SystemExit's, or what argparse printed)."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    code = exit_info.value.code
    return code if isinstance(code, str) else capsys.readouterr().err.strip()


def test_help_lists_the_registry_and_every_setting_of_each_method_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in registry.METHODS:
        assert f"{name} {registry.entry(name).summary}" in text
    for name in registry.METHODS:
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        listed = re.findall(r"(?m)^ {2}(?:-h, )?(--[\w-]+)", capsys.readouterr().out)
        flags = [flag(f) for f, _, _ in leaves(registry.entry(name).config())]
        assert sorted(listed) == sorted(flags + ["--help"]), name


@pytest.mark.parametrize("method, args, message", [
    ("sfd", ["--steps", "0"], "distill sfd: --steps: must be >= 1, got 0"),
    ("sfd", ["--steps", "3"], "distill sfd: --warmup-steps: 100 warmup steps, --steps 3: the learning rate would "
                              "never reach --lr; give --warmup-steps below 3"),
    ("progressive", ["--steps-per-round", "100"], "distill progressive: --warmup-steps: 100 warmup steps, "
                                                  "--steps-per-round 100"),
    ("disback", ["--warmup-steps", "300", "--degradation-steps", "300"], "distill disback: --warmup-steps: 300 "
                                                                        "warmup steps, --degradation-steps 300"),
    ("shortcut", ["--warmup-steps", "10", "--stage2-steps", "5"], "distill shortcut: --warmup-steps: 10 warmup "
                                                                 "steps, --stage2-steps 5"),
    ("shortcut", ["--guidance", "0.5"], "distill shortcut: --guidance: must be >= 1, got 0.5"),
    ("progressive", ["--p-uncond", "1.5"], "distill progressive: --p-uncond: must be <= 1, got 1.5"),
    ("gdd", ["--batch-size", "0"], "distill gdd: --batch-size: must be >= 1, got 0"),
    ("disback", ["--latent-size", "0"], "distill disback: --latent-size: must be >= 1, got 0"),
    ("shortcut", ["--trajectories", "0"], "distill shortcut: --trajectories: must be >= 1, got 0"),
    ("shortcut", ["--capture-band", "380", "400"], "distill shortcut: --capture-band: no step of a 20-step run hands "
                                                   "off in [380.0, 400.0]"),
    ("shortcut", ["--capture-band", "300", "200"], "distill shortcut: --capture-band: need LO <= HI"),
    ("shortcut", ["--trajectories", "1", "--holdout", "0.5"], "distill shortcut: --holdout: 0.5 of 1 trajectories "
                                                               "leaves none to train on"),
    ("shortcut", ["--height", "100"], "distill shortcut: --height: must be a multiple of 8"),
    ("shortcut", ["--schedule", "beta", "--exp-karras-p", "2"], "distill shortcut: --exp-karras-p: shapes the "
                                                                 "exp_karras schedule only; --schedule is beta"),
    ("shortcut", ["--exp-karras-p", "30"], "distill shortcut: --exp-karras-p: must be <= 10.0, got 30.0"),
    ("sfd", ["--schedule-p", "11"], "distill sfd: --schedule-p: must be <= 10.0, got 11.0"),
    ("sfd", ["--lr", "0"], "distill sfd: --lr: must be > 0"),
    ("sfd", ["--rank", "0"], "distill sfd: --rank: must be >= 1, got 0"),
    ("sfd", ["--max-grad-norm", "nan"], "distill sfd: --max-grad-norm: expected a finite number"),
    ("gdd", ["--disc-timesteps", "300", "200"], "distill gdd: --disc-timesteps: need LO <= HI"),
    ("disback", ["--steps", "1000"], "distill disback: --steps: stage two needs steps (1000) > path_checkpoints x "
                                     "steps_per_node (4 x 250)"),
    ("sfd", ["--steps", "many"], "distill sfd: argument --steps: invalid int value: 'many'"),
    ("sfd", ["--distance", "l3"], "distill sfd: argument --distance: invalid choice: 'l3'"),
    ("sfd", [], "distill sfd: --teacher: "),  # a teacher that is not there
    ("progressive", ["--teacher-steps", "2048", "--student-steps", "1024"],
     "distill progressive: --teacher-steps: 2048 steps do not fit the teacher's 1000 timesteps"),
])
def test_bad_values_are_refused_in_one_line_naming_the_flag_before_anything_loads(method, args, message, tmp_path,
                                                                                 nothing_loads, capsys):
    text = refusal(lambda: main([method, "--teacher", str(tmp_path / "nowhere"), *args]), capsys)
    assert message in text and "\n" not in text
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("method, message", [
    ("sfd", "--prompts: required for a teacher other than the toy's"),
    ("disback", "--prompts: required for a teacher other than the toy's"),
    ("shortcut", "--prompts: required for a teacher other than the toy's"),
    ("progressive", "--data: required for a teacher other than the toy's: progressive trains on data"),
    ("gdd", "--data: required for a teacher other than the toy's: gdd trains on data"),
])
def test_a_teacher_of_ones_own_needs_prompts_or_data_before_anything_loads(method, message, tmp_path,
                                                                          nothing_loads, capsys):
    (tmp_path / "mine").mkdir()
    preset = toy_preset(tmp_path / "toy", tmp_path)
    args = [method, "--teacher", str(tmp_path / "mine")]
    out = ["--out", str(tmp_path / "x.safetensors")]
    assert refusal(lambda: main(args, preset), capsys) == f"distill {method}: --out: required for a teacher other " \
                                                          "than the toy's"
    assert refusal(lambda: main(args + out, preset), capsys).startswith(f"distill {method}: {message}")


def test_prompts_that_a_data_method_would_not_use_are_refused_before_anything_loads(tmp_path, nothing_loads,
                                                                                       capsys):
    """--data images bring their captions: --prompts beside them would be recorded and never used."""
    from PIL import Image

    (tmp_path / "mine").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "prompts.txt").write_text("zzzunique\n")
    for method in ("progressive", "gdd"):
        text = refusal(lambda: main([method, "--teacher", str(tmp_path / "mine"), "--data", str(tmp_path / "images"),
                                     "--prompts", str(tmp_path / "prompts.txt"),
                                     "--out", str(tmp_path / "x.safetensors")]), capsys)
        assert text == (f"distill {method}: --prompts: applies to --latents, not --data: the images bring their own "
                        "captions (same-name .txt files)")


def test_an_output_named_as_its_own_work_folder_is_refused_before_anything_loads(tmp_path, nothing_loads, capsys):
    """--out x.work is the default work folder of --out x.work: the run would train, then fail to write, forever."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "prompts.txt").write_text("bag\n")
    args = ["sfd", "--teacher", str(tmp_path / "mine"), "--prompts", str(tmp_path / "prompts.txt")]
    for more in (["--out", str(tmp_path / "run.work")],
                 ["--out", str(tmp_path / "x.safetensors"), "--work", str(tmp_path / "x.safetensors")]):
        text = refusal(lambda: main(args + more), capsys)
        assert text.startswith("distill sfd: --out: ") and "is also the work folder" in text
    assert not list((tmp_path / "mine").iterdir())


def test_an_output_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, nothing_loads, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "prompts.txt").write_text("bag\n")
    (tmp_path / "a-file").write_text("")
    args = ["sfd", "--teacher", str(tmp_path / "mine"), "--prompts", str(tmp_path / "prompts.txt")]
    text = refusal(lambda: main(args + ["--out", str(tmp_path / "a-file" / "x.safetensors")]), capsys)
    assert text.startswith(f"distill sfd: --out: the output file {tmp_path / 'a-file' / 'x.safetensors'}: cannot "
                           "write there")
    text = refusal(lambda: main(args + ["--out", str(tmp_path / "x.safetensors"), "--work", str(tmp_path / "a-file")]),
                   capsys)
    assert text.startswith(f"distill sfd: --work: the work folder {tmp_path / 'a-file'}: cannot write there")


def test_an_output_over_an_input_or_a_file_not_of_this_project_is_refused_before_anything_loads(tmp_path,
                                                                                             nothing_loads, capsys):
    from safetensors.torch import save_file

    (tmp_path / "mine" / "unet").mkdir(parents=True)
    (tmp_path / "prompts.txt").write_text("bag\n")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))  # a checkpoint, a LoRA of someone's
    save_file({"w": torch.zeros(1)}, str(tmp_path / "data.safetensors"), metadata={"format": "direct_distill.latents"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "short.safetensors"),
              metadata={"format": '"direct_distill.shortcut"'})
    args = ["sfd", "--teacher", str(tmp_path / "mine"), "--prompts", str(tmp_path / "prompts.txt"), "--out"]
    for out, problem in [(tmp_path / "mine" / "unet" / "w.safetensors", "is in what --teacher reads"),
                         (tmp_path / "prompts.txt", "is what --prompts reads"),
                         (tmp_path / "model.safetensors", "exists and is not a file of this project")]:
        text = refusal(lambda: main(args + [str(out)]), capsys)
        assert text == f"distill sfd: --out: {out} {problem}" + (
            "; write elsewhere" if "reads" in problem else " (a checkpoint, another LoRA?): give another name, or "
                                                            "move it away first")
    for out, held in [(tmp_path / "data.safetensors", "latents"), (tmp_path / "short.safetensors", "shortcut")]:
        text = refusal(lambda: main(args + [str(out)]), capsys)  # of this project, but not what a re-run replaces
        assert text == (f"distill sfd: --out: {out} exists and holds a {held} file, this run writes a student file: "
                        "give another name, or move it away first")
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"")
    text = refusal(lambda: main(["sfd", "--teacher", str(teacher), "--prompts", str(tmp_path / "prompts.txt"),
                                 "--out", str(teacher)]), capsys)
    assert text == f"distill sfd: --out: {teacher} is what --teacher reads; write elsewhere"


def toy_preset(teacher, root) -> Preset:
    return Preset(name="toy", teacher=teacher, teacher_name="toy-teacher", out=lambda m: root / f"{m}.safetensors",
                  work=lambda m: root / "work" / m, prompts=["bag", "coat"], values={"guidance": 3.0})


def test_a_preset_gives_its_defaults_to_its_own_teacher_only(teacher, tmp_path, capsys):
    preset = toy_preset(teacher, tmp_path)
    args = ["sfd", "--nfe", "1", "--default-nfe", "1", "--steps", "1", "--warmup-steps", "0", "--batch-size", "1",
            "--rank", "2", "--teacher-substeps", "1"]
    assert main(args, preset) == 0
    _, info = read_student(tmp_path / "sfd.safetensors")
    assert (info.teacher, info.extra["distilled_at_guidance"], info.guidance) == ("toy-teacher", 3.0, 1.0)
    training = info.extra["training"]  # the settings that made it, not where files lay
    assert (training["nfes"], training["guidance"]) == ([1], 3.0) and not {"teacher", "out", "work"} & set(training)
    assert (tmp_path / "work" / "sfd" / "checkpoint.safetensors").is_file()
    assert f"written to {tmp_path / 'sfd.safetensors'}" in capsys.readouterr().out

    import shutil

    shutil.copytree(teacher, tmp_path / "copy")  # the same weights elsewhere: the user's teacher, no preset
    mine = tmp_path / "mine.safetensors"
    assert main(args + ["--teacher", str(tmp_path / "copy"), "--out", str(mine), "--prompts",
                        str(tmp_path / "prompts.txt")], preset) == 0
    _, info = read_student(mine)
    assert (info.teacher, info.extra["distilled_at_guidance"]) == (str(tmp_path / "copy"), 7.5)
    assert (tmp_path / "mine.work" / "checkpoint.safetensors").is_file()
    training = info.extra["training"]  # what ran: the values left to the teacher resolved, the prompts' digest
    digest = hashlib.sha256((tmp_path / "prompts.txt").read_bytes()).hexdigest()[:16]
    assert (training["prediction_type"], training["student_prediction"], training["latent_size"]) == (
        "epsilon", "epsilon", 16)  # the tiny UNet's sample_size
    assert training["content of --prompts"] == f"sha256 {digest}"


def test_a_work_folder_another_run_holds_is_refused(teacher, tmp_path, capsys):
    from direct_distill.models.io import hold_folder

    work = tmp_path / "work"
    with hold_folder(work):  # a run started before, still going (its lock is released when its process ends)
        text = refusal(lambda: main(sfd_args(teacher, "--out", str(tmp_path / "s.safetensors"), "--work",
                                             str(work))), capsys)
    assert text == (f"distill sfd: --work: work folder {work} is in use by another run (pid {os.getpid()}); wait "
                    "for it to end, or give another folder")
    assert not (work / SETTINGS_FILE).exists() and not (tmp_path / "s.safetensors").exists()


def test_a_work_folder_resumes_under_its_own_settings_only(teacher, tmp_path, capsys, monkeypatch):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    args = sfd_args(teacher, "--out", str(out), "--work", str(work))
    assert main(args) == 0
    recorded = json.loads((work / SETTINGS_FILE).read_text())
    assert (recorded["method"], recorded["processes"], recorded["nfes"]) == ("sfd", 1, [1]) and "out" not in recorded

    text = refusal(lambda: main(args + ["--lr", "0.02", "--nfe", "2", "--default-nfe", "2"]), capsys)
    assert text.startswith(f"distill sfd: --work: {work} holds a run with other settings (")
    for difference in ["--default-nfe 1 there, 2 here", "--lr 0.0003 there, 0.02 here", "--nfe [1] there, [2] here"]:
        assert difference in text
    assert "\n" not in text

    # The same teacher by another path is the same run.
    monkeypatch.chdir(teacher.parent)
    assert main(["sfd", "--teacher", f"./{teacher.name}", *args[3:]]) == 0
    # Where files go and how often checkpoints are written may change: the finished run resumes as it was.
    again = tmp_path / "again.safetensors"
    assert main(args[:-4] + ["--checkpoint-every", "5", "--out", str(again), "--work", str(work)]) == 0
    a, b = read_safetensors(out)[0], read_safetensors(again)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_only_under_the_mixed_precision_it_started_with(teacher, tmp_path, capsys, monkeypatch):
    """accelerate's precision is part of the run: a bf16 run resumed in float32 (the README's real-model commands
    run bf16) gave a student that is neither, and no file said which precision trained it."""
    from accelerate.state import AcceleratorState

    out, work = tmp_path / "bf16.safetensors", tmp_path / "work"
    args = sfd_args(teacher, "--out", str(out), "--work", str(work))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)
    try:
        assert main(args) == 0
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        AcceleratorState._reset_state(True)
        text = refusal(lambda: main(args), capsys)
    finally:
        AcceleratorState._reset_state(True)
    assert text == (f"distill sfd: --work: {work} holds a run with other settings (mixed precision (accelerate's "
                    "--mixed_precision) 'bf16' there, 'no' here); re-run with its settings to resume it, or give "
                    "another --work folder")
    assert json.loads((work / SETTINGS_FILE).read_text())["mixed_precision"] == "bf16"
    assert read_student(out)[1].extra["mixed_precision"] == "bf16"


def test_a_work_folder_resumes_when_only_the_spelling_differs_and_not_when_an_input_changed(teacher, tmp_path,
                                                                                          capsys, monkeypatch):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    args = sfd_args(teacher, "--out", str(out), "--work", str(work))
    args[args.index("--nfe") + 1:args.index("--nfe") + 2] = ["2", "1"]
    assert main(args) == 0
    recorded = json.loads((work / SETTINGS_FILE).read_text())
    size = json.loads((teacher / "unet" / "config.json").read_text())["sample_size"]
    # What was left to the teacher is recorded as the teacher's value.
    assert (recorded["nfes"], recorded["latent_size"], recorded["student_prediction"],
            recorded["prediction_type"]) == ([1, 2], size, "epsilon", "epsilon")
    same = sfd_args(teacher, "--out", str(out), "--work", str(work), "--latent-size", str(size),
                    "--student-prediction", "epsilon", "--prediction-type", "epsilon")
    same[same.index("--nfe") + 1:same.index("--nfe") + 2] = ["1", "2"]
    assert main(same) == 0  # the order of --nfe and the teacher's own values spelt out: the same run

    text = refusal(lambda: main(args + ["--latent-size", "4"]), capsys)
    assert f"--latent-size {size} there, 4 here" in text  # a value the teacher's differs from is another run
    text = refusal(lambda: main(args + ["--student-prediction", "v_prediction"]), capsys)
    assert "--student-prediction 'epsilon' there, 'v_prediction' here" in text

    # the same files typed from another folder: where they lie is what counts (recorded as typed, a run started
    # with relative names was refused from anywhere else)
    monkeypatch.chdir(tmp_path)
    relative = sfd_args(Path("teacher"), "--out", "rel.safetensors", "--work", "rel")
    assert main(relative) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(sfd_args(teacher, "--out", str(tmp_path / "rel.safetensors"), "--work", str(tmp_path / "rel"))) == 0

    (teacher.parent / "prompts.txt").write_text("bag\nshirt\n")  # edited under the same name
    text = refusal(lambda: main(args), capsys)
    assert text.startswith(f"distill sfd: --work: {work} holds a run with other settings (content of --prompts "
                           "'sha256 ") and "\n" not in text
    (teacher.parent / "prompts.txt").write_text("bag\ncoat\n")

    from diffusers import UNet2DConditionModel  # another model of the same shapes where the teacher was

    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)
    unet.save_pretrained(teacher / "unet")
    text = refusal(lambda: main(args), capsys)
    assert text.startswith(f"distill sfd: --work: {work} holds a run with other settings (content of --teacher "
                           "'sums ") and "\n" not in text


def test_a_teacher_pool_computed_before_the_first_checkpoint_holds_the_folder_to_its_settings(teacher, tmp_path,
                                                                                           capsys):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    args = sfd_args(teacher, "--out", str(out), "--work", str(work), "--pool", "2")
    assert main(args) == 0
    for checkpoint in work.rglob("checkpoint.safetensors"):
        checkpoint.unlink()  # as if stopped after the pool was computed, before the first checkpoint
    assert list(work.glob("teacher_pool/*.safetensors"))
    text = refusal(lambda: main(args + ["--guidance", "1.5"]), capsys)  # the pool's targets are at 7.5
    assert "--guidance 7.5 there, 1.5 here" in text


def test_a_run_that_stopped_before_training_takes_the_settings_that_fix_it(teacher, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    load = teachers.load_teacher

    def unloadable(*args, **kwargs):
        raise ValueError("no CLIP tokenizer found")

    monkeypatch.setattr(teachers, "load_teacher", unloadable)
    with pytest.raises(ValueError, match="no CLIP tokenizer"):
        main(sfd_args(teacher, "--out", str(out), "--work", str(work)))
    assert not (work / SETTINGS_FILE).exists()  # recorded once the teacher has loaded
    monkeypatch.setattr(teachers, "load_teacher", load)
    assert main(sfd_args(teacher, "--out", str(out), "--work", str(work), "--lr", "0.02")) == 0  # not refused
    assert json.loads((work / SETTINGS_FILE).read_text())["lr"] == 0.02
    text = refusal(lambda: main(sfd_args(teacher, "--out", str(out), "--work", str(work))), capsys)
    assert "--lr 0.02 there, 0.0003 here" in text  # once it has trained, the folder is its run's


def test_a_loss_that_is_not_finite_stops_the_run_in_one_line_and_keeps_the_checkpoint(teacher, tmp_path,
                                                                                      monkeypatch, capsys):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    loss = SFD.loss
    monkeypatch.setattr(SFD, "loss", lambda self, step, batch: loss(self, step, batch) * (
        float("nan") if step == 1 else 1.0))
    text = refusal(lambda: main(sfd_args(teacher, "--out", str(out), "--work", str(work), "--checkpoint-every",
                                         "1")), capsys)
    assert text.startswith("distill sfd: sfd: the loss is not finite at step 2; nothing of this step was kept")
    assert "\n" not in text and not out.exists()
    state, _ = read_safetensors(work / "checkpoint.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_a_failed_save_stops_the_run_in_one_line(teacher, tmp_path, monkeypatch, capsys):
    import direct_distill.training.loop as loop

    def disk_full(path, *args, **kwargs):
        raise OSError(f"{path}: could not be written (No space left on device)")

    monkeypatch.setattr(loop, "save_training_state", disk_full)
    work = tmp_path / "work"
    text = refusal(lambda: main(sfd_args(teacher, "--out", str(tmp_path / "s.safetensors"), "--work", str(work))),
                   capsys)
    assert text.startswith(f"distill sfd: {work / 'checkpoint.safetensors'}: could not be written (No space left")
    assert text.endswith(f"resume from the last checkpoint in {work}") and "\n" not in text


def test_the_teacher_is_loaded_with_the_prediction_type_asked_for(teacher, tmp_path):
    out = tmp_path / "sfd.safetensors"
    assert main(sfd_args(teacher, "--out", str(out), "--prediction-type", "v_prediction")) == 0
    assert read_student(out)[1].prediction_type == "v_prediction"


def test_ctrl_c_stops_with_one_line_saying_how_to_resume(teacher, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "sfd.safetensors", tmp_path / "work"
    loss = SFD.loss

    def interrupted_at_step_1(self, step, batch):
        if step == 1:
            raise KeyboardInterrupt
        return loss(self, step, batch)

    monkeypatch.setattr(SFD, "loss", interrupted_at_step_1)
    assert main(sfd_args(teacher, "--out", str(out), "--work", str(work))) == 130
    err = capsys.readouterr().err
    assert f"distill sfd: stopped; run the same command again to resume from the last checkpoint in {work}" in err
    assert "Traceback" not in err and not out.exists()
    monkeypatch.setattr(SFD, "loss", loss)
    assert main(sfd_args(teacher, "--out", str(out), "--work", str(work))) == 0
    assert json.loads(read_safetensors(work / "checkpoint.safetensors")[1]["training_state"])["step"] == 2


# --- a method of the test's own, registered by one line ------------------------------------------------------


@dataclass
class ToyConfig(Settings):
    """Fit one number to the prompts' count."""

    run: RunConfig = run_config(batch_size=4, lr=0.1)
    steps: int = setting(3, ge=1, help="training steps")
    target: float = setting(2.0, help="the number to reach")


class Toy:
    def __init__(self, config: ToyConfig):
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.modules = {"toy": torch.nn.ParameterList([self.weight])}
        self.config = config

    def batch(self, step):
        return torch.randn(self.config.run.batch_size)

    def loss(self, step, batch):
        return ((self.weight + 0 * batch - self.config.target) ** 2).mean()


@dataclass
class ToyResult:
    value: float

    def summary(self) -> str:
        return f"toy value {self.value:.3f}"


def train_toy(job, config: ToyConfig) -> ToyResult:
    toy = Toy(config)
    job.train(toy, config.run, config.steps, "toy")
    job.on_main(lambda: atomic_save_file({"weight": toy.weight.detach()}, job.out))
    return ToyResult(float(toy.weight.detach()))


METHOD = MethodEntry(ToyConfig, train_toy, summary="a toy method of the tests", description="Fits one number.")


def test_a_new_method_is_one_module_and_one_registry_line(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.METHODS, "toy", __name__)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["toy", "--help"])
    assert "--target TARGET" in capsys.readouterr().out
    out = tmp_path / "toy.safetensors"
    assert main(["toy", "--teacher", str(teacher), "--out", str(out), "--prompts", str(tmp_path / "prompts.txt"),
                 "--steps", "5", "--target", "1.5"]) == 0
    assert "toy value" in capsys.readouterr().out
    assert 0 < float(read_safetensors(out)[0]["weight"]) < 1.5
