"""SFD with a LoRA student on a tiny SD pipeline: the teacher's DPM-Solver segments, the loss wiring, one file for
several NFEs whose schedules drive load_student's sampling with exactly the training-time update, and exact resume."""

import copy

import pytest
import torch
from peft import set_peft_model_state_dict

from direct_distill.models.io import read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.pipelines import load_student
from direct_distill.schedulers.grids import CLEAN
from direct_distill.training.config import LoraSpec, RunConfig, SettingError
from direct_distill.training.lora import STUDENT, Conditioning, LoraStudent
from direct_distill.training.runner import Job
from direct_distill.training.sfd import SFD, SFDConfig, capture_pool, train_sfd

PROMPTS = ["t-shirt", "trouser", "bag"]


def config(**kw):
    run = RunConfig(batch_size=2, lr=1e-2, checkpoint_every=2, lora=LoraSpec(rank=2, alpha=4.0))
    return SFDConfig(**{**dict(run=run, nfes=(2, 3), default_nfe=3, teacher_substeps=2, steps=4, guidance=1.0), **kw})


def job(pipe, out, work=None, accelerator=None):
    return Job(pipe, out, work, teacher="tests/tiny-sd", prompts=PROMPTS, accelerator=accelerator)


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), Conditioning(torch.randn(2, 7, 32, generator=g))


@pytest.mark.parametrize("t_from, t_to", [(999, 666), (332, CLEAN)])
def test_teacher_segment_is_dpm_solver_on_the_bare_unet(tiny_sd_pipeline, t_from, t_to):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0))
    with torch.no_grad():
        for p in student.adapters.parameters():  # a student far from the teacher: it must not enter the target
            p.normal_()
    noise, cond = inputs()
    # One substep is one DDIM step of the bare UNet; two are DDIM through the midpoint (both first order: the
    # first step has no history, the last is first order by design).
    one = SFD(student, PROMPTS, config(teacher_substeps=1)).teacher_segment(noise, t_from, t_to, cond)
    two = SFD(student, PROMPTS, config(teacher_substeps=2)).teacher_segment(noise, t_from, t_to, cond)
    mid = round((t_from + t_to) / 2)
    with torch.no_grad():
        torch.testing.assert_close(one, student.ddim_step(noise, t_from, t_to, cond, None), atol=1e-4, rtol=1e-4)
        via_mid = student.ddim_step(student.ddim_step(noise, t_from, mid, cond, None), mid, t_to, cond, None)
        torch.testing.assert_close(two, via_mid, atol=1e-4, rtol=1e-4)
    # Three substeps take one second-order (DPM-Solver++ 2M) step: not the DDIM chain.
    three = SFD(student, PROMPTS, config(teacher_substeps=3)).teacher_segment(noise, t_from, t_to, cond)
    assert (three - two).abs().max() > 1e-4


def test_the_teachers_trajectory_is_one_dpm_solver_run_recorded_at_the_students_timesteps(tiny_sd_pipeline):
    """Its history carried across the segments' ends (seed 004's teacher trajectory, one solver run): restarted at
    each end, the first substep of every segment was first order."""
    from diffusers import DPMSolverMultistepScheduler

    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0))
    method = SFD(student, PROMPTS, config(teacher_substeps=2))
    noise, cond = inputs()
    got = method.teacher_trajectory(noise, cond, 3)  # timesteps 999, 666, 332, then the clean latent
    solver = DPMSolverMultistepScheduler.from_config(tiny_sd_pipeline.scheduler.config, solver_order=2,
                                                     final_sigmas_type="zero", lower_order_final=True)
    solver.set_timesteps(timesteps=[999, 832, 666, 499, 332, 166])
    z, seen = noise, []
    with torch.no_grad():
        for t in solver.timesteps:
            z = solver.step(student.unet_output(z, t, cond, None, 1.0), t, z).prev_sample
            seen.append(z)
    torch.testing.assert_close(got, torch.stack([seen[1], seen[3], seen[5]], dim=1), atol=1e-5, rtol=1e-5)
    restarted = method.teacher_segment(seen[1], 666, 332, cond)  # the restart the trajectory no longer makes
    assert (restarted - seen[3]).abs().max() > 1e-4
    # --teacher-restarts: segment after segment, each restarted (the lab's first SFD students)
    x, segments = noise, []
    for t, t_next in zip([999, 666, 332], [666, 332, CLEAN]):
        x = method.teacher_segment(x, t, t_next, cond)
        segments.append(x)
    torch.testing.assert_close(SFD(student, PROMPTS, config(teacher_substeps=2, teacher_restarts=True))
                               .teacher_trajectory(noise, cond, 3), torch.stack(segments, dim=1))
    # one segment (NFE 1) is one run either way
    torch.testing.assert_close(SFD(student, PROMPTS, config(nfes=(1,), default_nfe=1)).teacher_trajectory(
        noise, cond, 1)[:, 0], method.teacher_segment(noise, 999, CLEAN, cond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher_from", ["teacher", "student"])
def test_an_untrained_student_has_zero_loss_against_a_one_substep_ddim_teacher(tiny_sd_pipeline, teacher_from):
    # B = 0: the student is the teacher, and one first-order substep is the student's own update: the loss is 0 (up
    # to float32: diffusers' solver reads its sigmas in float32). The teacher's own trajectory at one substep is
    # DPM-Solver++(2M) on the student's grid: first order here, for the check.
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0))
    method = SFD(student, PROMPTS, config(teacher_substeps=1, teacher_from=teacher_from))
    method.solver.register_to_config(solver_order=1)
    torch.manual_seed(0)
    batch = method.batch(0)
    assert batch["noise"].shape == (2, 4, 16, 16) and batch["nfe"] in (2, 3)
    assert method.loss(0, batch).item() < 1e-4
    method.config.teacher_substeps = 2
    assert method.loss(0, batch).item() > 1e-2


def test_one_student_file_for_several_nfes_samples_as_it_was_trained(tiny_sd_pipeline, tmp_path, accelerator):
    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "sfd.safetensors"
    result = train_sfd(job(tiny_sd_pipeline, out, accelerator=accelerator), config(guidance=1.0))
    assert result.path == out and result.loss > 0
    lora, info = read_student(out)
    assert info.method == "sfd" and info.teacher == "tests/tiny-sd"
    assert {n: s["timesteps"] for n, s in info.nfe_schedules.items()} == {2: [999, 499], 3: [999, 666, 332]}
    assert (info.default_nfe, info.comfy_sampler, info.prediction_type, info.guidance) == (3, "euler", "epsilon", 1.0)
    assert info.extra["teacher_solver"] == "dpmpp_2m" and info.extra["distance"] == "l1"
    assert info.extra["train_seconds"] > 0 and info.extra["device"] == "cpu"
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)

    reference = LoraStudent(copy.deepcopy(bare), LoraSpec(rank=2, alpha=4.0))
    set_peft_model_state_dict(reference.unet, lora, adapter_name=STUDENT)
    pipe = copy.deepcopy(bare)
    load_student(pipe, out)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    noise, cond = inputs()
    for n in (2, 3):
        calls.clear()
        latent = pipe(prompt_embeds=cond.context, latents=noise.clone(), num_inference_steps=n, guidance_scale=1.0,
                      output_type="latent").images
        assert calls == info.nfe_schedules[n]["timesteps"]
        x, ts = noise, info.nfe_schedules[n]["timesteps"] + [CLEAN]
        with torch.no_grad():  # the student's training-time trajectory
            for t, t_next in zip(ts, ts[1:]):
                x = reference.ddim_step(x, t, t_next, cond)
        torch.testing.assert_close(latent, x, atol=1e-4, rtol=1e-4)
    calls.clear()
    pipe(prompt_embeds=cond.context[:1], latents=noise[:1].clone(), guidance_scale=1.0, output_type="latent")
    assert calls == [999, 666, 332]  # the default NFE


@pytest.mark.parametrize("predicts", ["v_prediction", "sample"])
def test_a_student_reading_its_output_as_another_prediction_trains_so_and_samples_so(tiny_sd_pipeline, tmp_path,
                                                                                      accelerator, predicts):
    # The untrained student now reads the teacher's epsilon as v or x0: far from the teacher's one substep.
    student = LoraStudent(copy.deepcopy(tiny_sd_pipeline), LoraSpec(rank=2, alpha=4.0), student_prediction=predicts)
    torch.manual_seed(0)
    method = SFD(student, PROMPTS, config(teacher_substeps=1))
    assert method.loss(0, method.batch(0)).item() > 1e-2

    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "sfd.safetensors"
    train_sfd(job(tiny_sd_pipeline, out, accelerator=accelerator), config(nfes=(1, 2), default_nfe=1,
                                                                         student_prediction=predicts))
    lora, info = read_student(out)
    assert (info.prediction_type, info.teacher_prediction_type) == (predicts, "epsilon")
    reference = LoraStudent(copy.deepcopy(bare), LoraSpec(rank=2, alpha=4.0), student_prediction=predicts)
    set_peft_model_state_dict(reference.unet, lora, adapter_name=STUDENT)
    pipe = copy.deepcopy(bare)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match=f"read as {predicts} where its model predicts epsilon: at scale 0.5"):
        load_student(pipe, out, scale=0.5)  # half epsilon, half v or x0: refused, the pipeline untouched
    assert pipe.scheduler is scheduler and not getattr(pipe.unet, "peft_config", None)
    load_student(pipe, out)
    assert pipe.scheduler.config.prediction_type == predicts
    pipe.delete_adapters("student")  # and again: the scheduler it left still knows the model predicts epsilon
    load_student(pipe, out)
    assert pipe.scheduler.config.prediction_type == predicts
    noise, cond = inputs()
    for n in (1, 2):
        latent = pipe(prompt_embeds=cond.context, latents=noise.clone(), num_inference_steps=n, guidance_scale=1.0,
                      output_type="latent").images
        x, ts = noise, info.nfe_schedules[n]["timesteps"] + [CLEAN]
        with torch.no_grad():
            for t, t_next in zip(ts, ts[1:]):
                x = reference.ddim_step(x, t, t_next, cond)
        torch.testing.assert_close(latent, x, atol=1e-4, rtol=1e-4)


def test_a_zero_terminal_snr_teacher_refuses_a_student_reading_epsilon(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "rescale_betas_zero_snr": True,
                                                       "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="ends at zero signal .* cannot give a clean latent"):
        LoraStudent(copy.deepcopy(pipe), LoraSpec(rank=2, alpha=4.0), student_prediction="epsilon")
    student = LoraStudent(pipe, LoraSpec(rank=2, alpha=4.0))  # the teacher's own v
    assert student.student_prediction == "v_prediction"


def test_a_student_stored_as_float16_is_half_the_file_and_samples_as_the_float32_one(tiny_sd_pipeline, tmp_path):
    student = LoraStudent(copy.deepcopy(tiny_sd_pipeline), LoraSpec(rank=4, alpha=4.0))
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.05)
    info = dict(method="sfd", teacher="tests/tiny-sd", nfe_timesteps={2: [999, 499]}, default_nfe=2,
                comfy_sampler="euler", guidance=1.0)
    files = {}
    for name in ("float32", "float16"):
        student.spec.save_dtype = name
        files[name] = student.write(tmp_path / f"{name}.safetensors", **info)
    tensors, _ = read_safetensors(files["float16"])
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert files["float16"].stat().st_size < 0.6 * files["float32"].stat().st_size
    noise, cond = inputs()
    latents = {}
    for name, path in files.items():
        pipe = copy.deepcopy(tiny_sd_pipeline)
        load_student(pipe, path)
        assert pipe.unet.dtype == torch.float32  # the stored dtype is cast to the model's
        latents[name] = pipe(prompt_embeds=cond.context, latents=noise.clone(), guidance_scale=1.0,
                             output_type="latent").images
    torch.testing.assert_close(latents["float16"], latents["float32"], atol=2e-3, rtol=2e-3)
    assert not torch.equal(latents["float16"], latents["float32"])  # really rounded


class Interrupted(Exception):
    pass


def loss_dying_at(step: int):
    """SFD's loss, raising Interrupted at step ``step`` (a run killed there)."""
    loss = SFD.loss

    def dies(self, at, batch):
        if at == step:
            raise Interrupted
        return loss(self, at, batch)

    return dies


def test_interrupted_and_resumed_run_ends_bit_identical(tiny_sd_pipeline, tmp_path, accelerator, monkeypatch):
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(3)]
    train_sfd(job(pipes[0], tmp_path / "straight.safetensors", tmp_path / "straight", accelerator), config())
    loss = SFD.loss
    monkeypatch.setattr(SFD, "loss", loss_dying_at(3))
    with pytest.raises(Interrupted):
        train_sfd(job(pipes[1], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config())
    monkeypatch.setattr(SFD, "loss", loss)
    torch.manual_seed(99)
    train_sfd(job(pipes[2], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config())
    a, b = (read_safetensors(tmp_path / f"{name}.safetensors")[0] for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_pool_holds_the_teachers_trajectories_and_the_loss_uses_them(tiny_sd_pipeline, accelerator):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0))
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.05)
    method = SFD(student, PROMPTS, config(pool=5, p_uncond=0.5))
    pool = capture_pool(method, 5, 0, None, accelerator)
    assert method.pool is pool and pool.seconds > 0 and pool.noise.shape == (5, 4, 16, 16)
    assert {n: t.shape for n, t in pool.targets.items()} == {2: (5, 2, 4, 16, 16), 3: (5, 3, 4, 16, 16)}
    assert set(pool.prompts) <= {"", *PROMPTS}
    # Draw 3 of the pool is the teacher's own trajectory from its noise and prompt.
    cond = student.embed(pool.prompts[3:4])
    torch.testing.assert_close(pool.targets[3][3:4], method.teacher_trajectory(pool.noise[3:4], cond, 3),
                               atol=1e-5, rtol=1e-5)
    # A batch is drawn from the pool, and the loss against its targets is the online loss from the same draws.
    torch.manual_seed(1)
    batch = method.batch(0)
    assert batch["targets"].shape[:2] == (2, batch["nfe"])
    assert any(torch.equal(batch["noise"][0], row) for row in pool.noise)
    pooled = method.loss(0, batch)
    online = method.loss(0, {k: v for k, v in batch.items() if k != "targets"})
    torch.testing.assert_close(pooled, online, atol=1e-5, rtol=1e-5)


def test_a_pooled_run_reuses_its_pool_resumes_exactly_and_counts_the_pools_cost(tiny_sd_pipeline, tmp_path,
                                                                              accelerator, monkeypatch):
    monkeypatch.setattr("direct_distill.training.sfd.POOL_SHARD", 4)  # 7 draws: two pool files
    size = 7
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(3)]
    straight = train_sfd(job(pipes[0], tmp_path / "straight.safetensors", tmp_path / "straight", accelerator),
                         config(pool=size))
    assert sorted(p.name for p in (tmp_path / "straight" / "teacher_pool").iterdir()) == \
        ["pool-00000.safetensors", "pool-00001.safetensors"]
    _, info = read_student(straight.path)
    assert info.extra["teacher_pool"]["draws"] == size
    assert info.extra["train_seconds"] >= info.extra["teacher_pool"]["seconds"] > 0

    # Killed after the first pool file, then at step 3: the resumed run ends bit-identical to the straight one.
    real = SFD.teacher_trajectory
    calls = []

    def dies_in_the_second_file(self, noise, cond, n):
        calls.append(len(noise))
        if len(calls) > 2:  # file 0 took one call per NFE
            raise Interrupted
        return real(self, noise, cond, n)

    monkeypatch.setattr(SFD, "teacher_trajectory", dies_in_the_second_file)
    with pytest.raises(Interrupted):
        train_sfd(job(pipes[1], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config(pool=size))
    assert [p.name for p in (tmp_path / "resumed" / "teacher_pool").iterdir()] == ["pool-00000.safetensors"]
    monkeypatch.setattr(SFD, "teacher_trajectory", real)
    loss = SFD.loss
    monkeypatch.setattr(SFD, "loss", loss_dying_at(3))
    with pytest.raises(Interrupted):
        train_sfd(job(pipes[2], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config(pool=size))
    monkeypatch.setattr(SFD, "loss", loss)
    monkeypatch.setattr(SFD, "teacher_segment", lambda *a: pytest.fail("the pool on disk is not recomputed"))
    torch.manual_seed(99)
    train_sfd(job(copy.deepcopy(tiny_sd_pipeline), tmp_path / "resumed.safetensors", tmp_path / "resumed",
                  accelerator), config(pool=size))
    a, b = (read_safetensors(tmp_path / f"{name}.safetensors")[0] for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_settings_are_checked():
    for changes, message in [(dict(default_nfe=4), "default_nfe: must be one of the NFEs \\[2, 3\\], got 4"),
                             (dict(distance="huber"), "distance: expected one of l1, l2"),
                             (dict(teacher_from="data"), "teacher_from: expected one of teacher, student"),
                             (dict(teacher_substeps=0), "teacher_substeps: must be >= 1"),
                             (dict(nfes=(2, 0), default_nfe=2), "nfes: must be >= 1, got 0"),
                             (dict(nfes=(200,), default_nfe=200, schedule_p=8.0), "nfes: 200 steps at p=8.0 do not "
                                                                                 "give distinct"),
                             (dict(p_uncond=1.5), "p_uncond: must be <= 1"),
                             (dict(latent_size=0), "latent_size: must be >= 1"),
                             (dict(pool=-1), "pool: must be >= 0"),
                             (dict(pool=8, teacher_from="student"), "pool: a teacher pool needs --teacher-from "
                                                                    "teacher")]:
        with pytest.raises(SettingError, match=message):
            config(**changes)


def test_cli_distills_a_teacher_folder(tiny_sd_pipeline, tmp_path, capsys):
    from direct_distill.__main__ import main

    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")
    out = tmp_path / "sfd.safetensors"
    args = ["distill", "sfd", "--teacher", str(tmp_path / "teacher"), "--out", str(out), "--nfe", "1", "2",
            "--default-nfe", "2", "--steps", "1", "--warmup-steps", "0", "--batch-size", "1", "--rank", "2",
            "--teacher-substeps", "2"]
    with pytest.raises(SystemExit, match="--prompts: required for a teacher other than the lab's"):
        main(args)
    assert main(args + ["--prompts", str(tmp_path / "prompts.txt")]) == 0
    _, info = read_student(out)
    assert sorted(info.nfe_schedules) == [1, 2] and info.rank == 2
    assert info.guidance == 1.0 and info.extra["distilled_at_guidance"] == 7.5  # SD's CFG, distilled in
    assert info.teacher == str(tmp_path / "teacher") and (tmp_path / "sfd.work" / "checkpoint.safetensors").is_file()
    assert "SFD student (NFE 1, 2) written to" in capsys.readouterr().out


def test_the_teachers_guidance_is_distilled_into_the_student_unless_left_to_sampling(tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0))
    noise, cond = inputs()[0], student.embed(["bag", "coat"])
    guided = SFD(student, PROMPTS, config(teacher_substeps=1, guidance=2.0))
    with torch.no_grad():
        uncond = student.unet_output(noise, 999, student.embed(["", ""]), None)
        conditional = student.unet_output(noise, 999, cond, None)
        torch.testing.assert_close(student.unet_output(noise, 999, cond, None, guidance=2.0),
                                   uncond + 2.0 * (conditional - uncond), atol=1e-5, rtol=1e-5)
        x0, eps = student.denoise(noise, 999, cond, None, guidance=2.0)
    a, s = student.alpha_sigma(torch.tensor([332]))
    torch.testing.assert_close(guided.teacher_segment(noise, 999, 332, cond), a * x0 + s * eps, atol=1e-4, rtol=1e-4)
    # An untrained student (the bare UNet without CFG) is off the guided teacher, on the unguided one.
    torch.manual_seed(0)
    batch = guided.batch(0)
    assert guided.loss(0, batch).item() > 1e-3
    unguided = SFD(student, PROMPTS, config(teacher_substeps=1, guidance=2.0, sample_with_cfg=True))
    assert unguided.loss(0, batch).item() < 1e-4


def test_a_guidance_distilled_file_samples_at_guidance_1(tiny_sd_pipeline, tmp_path, accelerator):
    _, info = read_student(train_sfd(job(tiny_sd_pipeline, tmp_path / "g.safetensors", accelerator=accelerator),
                                     config(guidance=3.0, steps=1)).path)
    assert info.guidance == 1.0 and info.extra["distilled_at_guidance"] == 3.0
