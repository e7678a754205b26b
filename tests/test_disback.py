"""DisBack on a tiny SD pipeline: the degradation path's checkpoints, stage two's reverse visit of them ending on the
teacher, the real score's guidance, the one-step file sampled by load_student with one UNet call at t = 999, and exact
resume across both stages."""

import copy

import pytest
import torch

from direct_distill.models.io import read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.training.config import LoraSpec, RunConfig, SettingError
from direct_distill.training.disback import (DEGRADE, FAKE, DisBackConfig, DistributionBacktracking,
                                             DegradationRecording, train_disback)
from direct_distill.training.lora import STUDENT, LoraAdapters, LoraStudent
from direct_distill.training.runner import Job

PROMPTS = ["t-shirt", "trouser", "bag"]


def config(**kw):
    run = RunConfig(batch_size=2, lr=1e-2, checkpoint_every=2, lora=LoraSpec(rank=2, alpha=4.0))
    return DisBackConfig(**{**dict(run=run, degradation_steps=4, path_checkpoints=2, steps_per_node=2, steps=5,
                                   fake_lr=1e-2, degradation_lr=1e-2, real_guidance=2.0), **kw})


def job(pipe, out, work=None, accelerator=None):
    return Job(pipe, out, work, teacher="tests/tiny-sd", prompts=PROMPTS, accelerator=accelerator)


def test_path_is_recorded_then_visited_last_node_first_and_the_student_is_one_call_at_999(
        tiny_sd_pipeline, tmp_path, accelerator, monkeypatch, check_one_step_student):
    bare = copy.deepcopy(tiny_sd_pipeline)
    used = []  # (node, real adapter, its weights) of every generator update
    real_x0 = DistributionBacktracking.real_x0

    def spy(self, z, t, cond, adapter):
        weights = None if adapter is None else {k: v.clone() for k, v in self.degrade.state_dict().items()}
        used.append((self.visited[-1], adapter, weights))
        return real_x0(self, z, t, cond, adapter)

    monkeypatch.setattr(DistributionBacktracking, "real_x0", spy)
    out = tmp_path / "disback.safetensors"
    result = train_disback(job(tiny_sd_pipeline, out, tmp_path / "work", accelerator), config())

    # Stage one: K = 2 checkpoints of the degrade adapter, after steps 2 and 4, each moved off the teacher.
    assert config().node_steps() == [2, 4]
    assert result.node_files == [tmp_path / "work/degradation/path/node_1.safetensors",
                                 tmp_path / "work/degradation/path/node_2.safetensors"]
    nodes = {k: read_safetensors(f)[0] for k, f in enumerate(result.node_files, start=1)}
    for k in (1, 2):
        assert any(v.abs().max() > 0 for key, v in nodes[k].items() if key.endswith("B.weight")), k
    assert any(not torch.equal(nodes[1][key], nodes[2][key]) for key in nodes[1])

    # Stage two: node 2, node 1 (2 steps each), then the teacher for the rest; the real score is exactly that node.
    assert result.schedule == [(2, 2), (1, 2), (0, 1)] and result.visited == [2, 2, 1, 1, 0]
    assert [u[0] for u in used] == result.visited
    for node, adapter, weights in used:
        if node == 0:
            assert adapter is None
        else:
            assert adapter == DEGRADE and all(torch.equal(weights[k], nodes[node][k]) for k in nodes[node])
    assert set(result.losses) == {"degrade", "fake", "generator"}

    lora, info = read_student(out)
    assert info.method == "disback" and info.default_nfe == 1 and info.nfe_schedules[1]["timesteps"] == [999]
    assert (info.comfy_sampler, info.guidance, info.extra["real_guidance"]) == ("euler", 1.0, 2.0)
    assert info.extra["train_seconds"] > 0 and info.extra["backtracking"] is True
    assert info.extra["schedule"] == [{"node": 2, "steps": 2}, {"node": 1, "steps": 2}, {"node": 0, "steps": 1}]
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)

    # In a fresh pipeline: one UNet call at t = 999, landing exactly on the training-time generator's sample.
    check_one_step_student(bare, out, lora, LoraSpec(rank=2, alpha=4.0))


@pytest.mark.parametrize("backtracking", [True, False])
def test_a_generator_read_as_v_keeps_the_score_models_on_the_teachers_reading(tiny_sd_pipeline, tmp_path,
                                                                              accelerator, check_one_step_student,
                                                                              monkeypatch, backtracking):
    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "disback.safetensors"
    readings = []  # what each adapter's output is read as, in both stages
    denoise = LoraStudent.denoise

    def spy(self, z, t, cond, adapter=None, guidance=1.0):
        readings.append((adapter, self.student_prediction if adapter == STUDENT else self.prediction_type))
        return denoise(self, z, t, cond, adapter, guidance)

    monkeypatch.setattr(LoraStudent, "denoise", spy)
    train_disback(job(tiny_sd_pipeline, out, accelerator=accelerator),
                  config(student_prediction="v_prediction", **({} if backtracking else {"path_checkpoints": 0})))
    assert {r for a, r in readings if a == STUDENT} == {"v_prediction"}
    assert {r for a, r in readings if a != STUDENT} == {"epsilon"} and any(a == FAKE for a, _ in readings)
    lora, info = read_student(out)
    assert (info.prediction_type, info.teacher_prediction_type) == ("v_prediction", "epsilon")
    assert info.extra["training"]["student_prediction"] == "v_prediction"
    check_one_step_student(bare, out, lora, LoraSpec(rank=2, alpha=4.0))


def test_stage_one_degrades_toward_the_initial_generator_and_the_fake_score_starts_at_the_last_node(
        tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0), frozen_adapters=[DEGRADE, FAKE])
    recording = DegradationRecording(student, PROMPTS, (4, 16, 16), config(), None)
    torch.manual_seed(0)
    batch = recording.batch(0)
    # The denoising loss of the degrade adapter on the initial generator's samples (the teacher's own x0 at 999),
    # which is the diffusion loss with target epsilon.
    with torch.no_grad():
        x0 = student.denoise(batch["noise"], 999, batch["cond"], None)[0]
        a, s = student.alpha_sigma(batch["t"])
        eps = student.unet_output(a * x0 + s * batch["eps"], batch["t"], batch["cond"], None)
        expected = torch.nn.functional.mse_loss(eps, batch["eps"])
        torch.testing.assert_close(recording.loss(0, batch), expected)
    assert list(recording.modules) == ["degrade"] and all(p.requires_grad for p in recording.degrade.parameters())

    path = {k: {key: torch.full_like(v, float(k)) for key, v in recording.degrade.state_dict().items()}
            for k in (1, 2)}
    method = DistributionBacktracking(student, PROMPTS, (4, 16, 16), config(), path)
    assert all(torch.equal(v, path[2][k]) for k, v in method.fake.state_dict().items())
    assert set(method.players) == {"fake", "generator"}
    assert not any(p.requires_grad for p in method.degrade.parameters())
    assert method.real_adapter(1) == DEGRADE
    assert all(torch.equal(v, path[1][k]) for k, v in LoraAdapters(student.unet, DEGRADE).state_dict().items())
    assert method.real_adapter(0) is None


def test_real_score_applies_classifier_free_guidance(tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0), frozen_adapters=[DEGRADE, FAKE])
    path = {k: LoraAdapters(student.unet, DEGRADE).state_dict() for k in (1, 2)}
    method = DistributionBacktracking(student, PROMPTS, (4, 16, 16), config(real_guidance=3.0), path)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([300, 700])
    cond = student.embed(["bag", "coat"])
    with torch.no_grad():
        x_c = student.denoise(z, t, cond, None)[0]
        x_u = student.denoise(z, t, student.embed(["", ""]), None)[0]
        torch.testing.assert_close(method.real_x0(z, t, cond, None), x_u + 3.0 * (x_c - x_u), atol=1e-4, rtol=1e-4)


def test_without_backtracking_there_is_no_stage_one_and_the_teacher_is_the_only_target(
        tiny_sd_pipeline, tmp_path, accelerator, monkeypatch):
    started = []
    init = DistributionBacktracking.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.append({k: v.clone() for k, v in self.fake.state_dict().items()})

    monkeypatch.setattr(DistributionBacktracking, "__init__", spy)
    out = tmp_path / "plain.safetensors"
    result = train_disback(job(tiny_sd_pipeline, out, tmp_path / "work", accelerator), config(path_checkpoints=0))
    assert result.node_files == [] and not (tmp_path / "work/degradation").exists()
    assert result.schedule == [(0, 5)] and result.visited == [0] * 5
    assert set(result.losses) == {"fake", "generator"}
    # The fake score started as the teacher: every LoRA B of its adapter was zero.
    bs = [v for k, v in started[0].items() if k.endswith("B.weight")]
    assert bs and all(v.abs().max() == 0 for v in bs)
    assert read_student(out)[1].extra["backtracking"] is False


def test_settings_are_checked():
    with pytest.raises(SettingError, match="steps: .*the teacher must be the last target"):
        config(steps=4)
    with pytest.raises(SettingError, match="path_checkpoints: need path_checkpoints \\(5\\) = 0"):
        config(path_checkpoints=5)
    with pytest.raises(SettingError, match="path_checkpoints: must be >= 0"):
        config(path_checkpoints=-1)
    with pytest.raises(SettingError, match="score_timesteps: need LO <= HI"):
        config(score_timesteps=(500, 20))
    with pytest.raises(SettingError, match="fake_updates: must be >= 1"):
        config(fake_updates=0)
    assert config(path_checkpoints=0).node_steps() == [] and config(path_checkpoints=0).schedule() == [(0, 5)]
    assert config(degradation_steps=10, path_checkpoints=3, steps=7).node_steps() == [3, 7, 10]
    assert [config().node_at(s) for s in range(7)] == [2, 2, 1, 1, 0, 0, 0]


class Interrupted(Exception):
    pass


def test_interrupted_in_each_stage_and_resumed_ends_bit_identical(tiny_sd_pipeline, tmp_path, accelerator,
                                                                  monkeypatch):
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(4)]
    train_disback(job(pipes[0], tmp_path / "straight.safetensors", tmp_path / "straight", accelerator), config())
    stage1, stage2 = DegradationRecording.loss, DistributionBacktracking.loss

    def dies_at_step_3(loss):
        def wrapped(self, step, batch):
            if step == 3:
                raise Interrupted
            return loss(self, step, batch)
        return wrapped

    runs = [(DegradationRecording, stage1), (DistributionBacktracking, stage2)]
    for pipe, (cls, loss) in zip(pipes[1:], runs):  # dies in stage one (after node 1), then in stage two
        monkeypatch.setattr(cls, "loss", dies_at_step_3(loss))
        with pytest.raises(Interrupted):
            train_disback(job(pipe, tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config())
        monkeypatch.setattr(cls, "loss", loss)
    torch.manual_seed(99)  # the caller's RNG must not matter
    result = train_disback(job(pipes[3], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator),
                           config())
    assert result.visited == [1, 1, 0]  # stage two resumed at its step-2 checkpoint
    for a, b in [(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"),
                 *[(tmp_path / f"straight/degradation/path/node_{k}.safetensors",
                    tmp_path / f"resumed/degradation/path/node_{k}.safetensors") for k in (1, 2)]]:
        ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a.name


def test_cli_distills_a_teacher_folder(tiny_sd_pipeline, tmp_path, capsys):
    from direct_distill.__main__ import main

    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")
    out = tmp_path / "disback.safetensors"
    args = ["distill", "disback", "--teacher", str(tmp_path / "teacher"), "--out", str(out), "--rank", "2",
            "--batch-size", "1", "--degradation-steps", "2", "--path-checkpoints", "2", "--steps-per-node", "1"]
    with pytest.raises(SystemExit, match="--prompts: required for a teacher other than the lab's"):
        main(args + ["--steps", "3"])
    args += ["--prompts", str(tmp_path / "prompts.txt")]
    with pytest.raises(SystemExit, match="--steps: .*the teacher must be the last target"):
        main(args + ["--steps", "2"])
    with pytest.raises(SystemExit, match="--eval-every: evaluations need the preset's evaluator: they are for the "
                                         "lab teacher only"):
        main(args + ["--steps", "3", "--eval-every", "1"])
    assert main(args + ["--steps", "3"]) == 0
    _, info = read_student(out)
    assert info.extra["real_guidance"] == 7.5 and info.guidance == 1.0 and info.nfe_schedules[1]["timesteps"] == [999]
    assert (tmp_path / "disback.work" / "degradation" / "path" / "node_2.safetensors").is_file()
    assert f"DisBack one-step student written to {out}" in capsys.readouterr().out
