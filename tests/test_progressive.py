"""Progressive distillation with LoRA students on a tiny SD pipeline: the x~ target against diffusers' DDIM, the
rounds and their files (applied by load_student, whose schedule drives sampling), and exact resume across rounds."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from direct_distill.models.io import read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.pipelines import load_student
from direct_distill.schedulers.grids import trailing_timesteps
from direct_distill.training.config import LoraSpec, RunConfig, SettingError
from direct_distill.training.data import LatentData
from direct_distill.training.lora import STUDENT, Conditioning, LoraStudent
from direct_distill.training.progressive import (TEACHER, ProgressiveConfig, ProgressiveRound, ddim_x0_target,
                                                 train_progressive)
from direct_distill.training.runner import Job

PROMPTS = ["t-shirt", "trouser", "bag"]


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), [PROMPTS[i % 3] for i in range(n)]


def config(**kw):
    run = RunConfig(batch_size=2, lr=1e-2, checkpoint_every=2, lora=LoraSpec(rank=2, alpha=4.0))
    return ProgressiveConfig(**{**dict(run=run, teacher_steps=4, student_steps=1, steps_per_round=3, guidance=1.0),
                                **kw})


def job(pipe, out, work=None, accelerator=None):
    return Job(pipe, out, work, teacher="tests/tiny-sd", data=LatentData(*data()), accelerator=accelerator)


def ddim(steps, prediction_type="epsilon"):
    """diffusers' DDIM on the trailing grid, ending at alpha = 1: the sampler a progressive student is trained for."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", timestep_spacing="trailing", set_alpha_to_one=True,
                              steps_offset=0, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


def randomise(adapters, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("adapter,student_prediction", [(None, None), (TEACHER, None), (None, "v_prediction"),
                                                        (TEACHER, "v_prediction")])
def test_target_makes_one_student_ddim_step_land_where_two_teacher_ddim_steps_land(tiny_sd_pipeline, adapter,
                                                                                  student_prediction):
    pipe = tiny_sd_pipeline
    student = LoraStudent(pipe, LoraSpec(rank=2, alpha=4.0), frozen_adapters=[TEACHER],
                          student_prediction=student_prediction)
    randomise(student.adapters, 1)
    if adapter == TEACHER:  # a later round: the teacher is the previous student, a frozen copy read as it was
        student.freeze_student_as(TEACHER)
    randomise(student.adapters, 2)  # the student differs from its teacher: it must not enter the target
    method = ProgressiveRound(student, LatentData(*data()), 2, config(student_prediction=student_prediction),
                              adapter)
    g = torch.Generator().manual_seed(5)
    z, cond = torch.randn(2, 4, 16, 16, generator=g), student.embed(["t-shirt", "bag"])
    k = torch.tensor([0, 1])  # student steps 999 -> 499 and 499 -> clean
    x_tilde = method.target(z, k, cond)

    # the bare UNet is read as the teacher's epsilon whatever the student's reading; a previous student as its own
    teacher_reads = student_prediction if adapter == TEACHER and student_prediction else "epsilon"
    teacher_ddim, student_ddim = ddim(4, teacher_reads), ddim(2)
    assert teacher_ddim.timesteps.tolist() == [999, 749, 499, 249] and student_ddim.timesteps.tolist() == [999, 499]
    if adapter == TEACHER:
        pipe.unet.set_adapter(TEACHER)
    else:
        pipe.unet.disable_adapters()
    for b in range(2):
        zb, cb = z[b:b + 1], cond.context[b:b + 1]
        x = zb
        with torch.no_grad():  # two teacher steps by diffusers' DDIM
            for t in teacher_ddim.timesteps[2 * b: 2 * b + 2]:
                x = teacher_ddim.step(pipe.unet(x, t, cb).sample, t, x).prev_sample
        # one student DDIM step whose x0 prediction is x~ (given to DDIM as the epsilon it implies)
        t = student_ddim.timesteps[b]
        a, s = student_ddim.alphas_cumprod[t].sqrt(), (1 - student_ddim.alphas_cumprod[t]).sqrt()
        eps = (zb - a * x_tilde[b:b + 1]) / s
        landed = student_ddim.step(eps, t, zb).prev_sample
        torch.testing.assert_close(landed, x, atol=2e-4, rtol=1e-4)  # float32, x0 amplified 1/a_999 ~ 15x
        assert (x - zb).abs().max() > 0.1  # the teacher moved


def test_ddim_x0_target_inverts_a_ddim_step():
    g = torch.Generator().manual_seed(0)
    z, x0, eps = (torch.randn(3, 4, generator=g) for _ in range(3))
    a, a2 = 0.3, 0.8
    s, s2 = (1 - a**2) ** 0.5, (1 - a2**2) ** 0.5
    z_next = a2 * x0 + s2 * (z - a * x0) / s
    torch.testing.assert_close(ddim_x0_target(z, z_next, a, s, a2, s2), x0)
    torch.testing.assert_close(ddim_x0_target(z, x0, a, s, 1.0, 0.0), x0)  # to the clean end: x~ is z'' itself


def test_rounds_halve_the_steps_and_refuse_other_ratios():
    assert config(teacher_steps=32, student_steps=1).rounds() == [16, 8, 4, 2, 1]
    assert config(teacher_steps=8, student_steps=4).rounds() == [4]
    for teacher_steps, student_steps in [(12, 1), (4, 4), (2, 4)]:
        with pytest.raises(SettingError, match="teacher_steps: must be student_steps .* times a power of 2"):
            config(teacher_steps=teacher_steps, student_steps=student_steps)
    with pytest.raises(SettingError, match="student_steps: must be >= 1"):
        config(teacher_steps=8, student_steps=0)


def test_students_of_every_round_load_and_sample_their_schedule(tiny_sd_pipeline, tmp_path, accelerator):
    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "progressive.safetensors"
    result = train_progressive(job(tiny_sd_pipeline, out, accelerator=accelerator), config(guidance=1.0))
    assert result.path == out and set(result.round_paths) == {2, 1}
    assert result.round_paths[2] == tmp_path / "progressive_nfe2.safetensors"
    assert all(loss is not None and loss > 0 for loss in result.losses.values())
    seconds = {}
    for n, timesteps in [(2, [999, 499]), (1, [999])]:
        lora, info = read_student(result.round_paths[n])
        seconds[n] = info.extra["train_seconds"]
        assert info.method == "progressive" and info.nfe_schedules[n]["timesteps"] == timesteps
        assert list(info.nfe_schedules) == [n] and info.default_nfe == n
        assert (info.comfy_sampler, info.prediction_type, info.rank, info.alpha) == ("ddim", "epsilon", 2, 4.0)
        assert info.extra["round"] == f"{2 * n}->{n}" and info.extra["distilled_at_guidance"] == 1.0
        assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from zero
    assert 0 < seconds[2] < seconds[1]  # the 1-step student's cost includes the round that made its teacher

    # The 2-step student in a fresh pipeline: its LoRA, its timesteps, and exactly its training-time DDIM updates.
    pipe = copy.deepcopy(bare)
    info = load_student(pipe, result.round_paths[2])
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    g = torch.Generator().manual_seed(3)
    noise, cond = torch.randn(1, 4, 16, 16, generator=g), Conditioning(torch.randn(1, 7, 32, generator=g))
    latent = pipe(prompt_embeds=cond.context, latents=noise.clone(), guidance_scale=1.0,
                  output_type="latent").images
    assert calls == [999, 499]
    reference = LoraStudent(copy.deepcopy(bare), LoraSpec(rank=2, alpha=4.0))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(reference.unet, read_student(result.round_paths[2])[0], adapter_name=STUDENT)
    with torch.no_grad():
        x = noise
        for t, t_next in zip(trailing_timesteps(2), trailing_timesteps(2)[1:] + [-1]):
            x = reference.ddim_step(x, t, t_next, cond)
    torch.testing.assert_close(latent, x, atol=1e-4, rtol=1e-4)
    assert info.guidance == 1.0


class Interrupted(Exception):
    pass


def test_interrupted_in_the_second_round_and_resumed_ends_bit_identical(tiny_sd_pipeline, tmp_path, accelerator,
                                                                      monkeypatch):
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(3)]
    straight = train_progressive(job(pipes[0], tmp_path / "straight.safetensors", tmp_path / "straight", accelerator),
                                 config())

    loss = ProgressiveRound.loss

    def dies_in_round_2_step_2(self, step, batch):
        if self.n == 1 and step == 2:
            raise Interrupted
        return loss(self, step, batch)

    monkeypatch.setattr(ProgressiveRound, "loss", dies_in_round_2_step_2)
    with pytest.raises(Interrupted):
        train_progressive(job(pipes[1], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config())
    monkeypatch.setattr(ProgressiveRound, "loss", loss)
    torch.manual_seed(123)  # the caller's RNG must not matter
    resumed = train_progressive(job(pipes[2], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator),
                                config())
    # Round 1 had finished: nothing was left to run, and its checkpoint still gives its last loss.
    assert resumed.losses == straight.losses
    for n in (2, 1):
        a, b = read_safetensors(straight.round_paths[n])[0], read_safetensors(resumed.round_paths[n])[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n


def test_cli_distills_a_teacher_folder_on_given_latents(tiny_sd_pipeline, tmp_path, capsys):
    from direct_distill.__main__ import main
    from direct_distill.training.data import write_latents_file

    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    write_latents_file(tmp_path / "latents.safetensors", data(4)[0])
    (tmp_path / "prompts.txt").write_text("a bag\n")
    out = tmp_path / "student.safetensors"
    args = ["distill", "progressive", "--teacher", str(tmp_path / "teacher"), "--out", str(out),
            "--teacher-steps", "4", "--student-steps", "2", "--steps-per-round", "1", "--warmup-steps", "0",
            "--batch-size", "1", "--rank", "2"]
    with pytest.raises(SystemExit, match="--data: required for a teacher other than the lab's: progressive trains "
                                         "on data; give --data FOLDER .* or --latents FILE"):
        main(args + ["--prompts", str(tmp_path / "prompts.txt")])
    with pytest.raises(SystemExit, match="--prompts: .*latents.safetensors holds no prompts"):
        main(args + ["--latents", str(tmp_path / "latents.safetensors")])
    # the earlier round's file beside --out (<out>_nfe<N>) may not replace an input either
    write_latents_file(tmp_path / "mine_nfe4.safetensors", data(4)[0])
    before = (tmp_path / "mine_nfe4.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"--out: .*mine_nfe4.safetensors is what --latents reads"):
        main([*args[:5], str(tmp_path / "mine.safetensors"), *args[6:], "--teacher-steps", "8",
              "--latents", str(tmp_path / "mine_nfe4.safetensors"), "--prompts", str(tmp_path / "prompts.txt")])
    assert (tmp_path / "mine_nfe4.safetensors").read_bytes() == before
    write_latents_file(tmp_path / "sd3.safetensors", torch.randn(4, 16, 8, 8))  # another model's 16 channels
    with pytest.raises(SystemExit, match="--latents: its latents have 16 channels, the teacher's UNet takes 4"):
        main(args + ["--latents", str(tmp_path / "sd3.safetensors"), "--prompts", str(tmp_path / "prompts.txt"),
                     "--work", str(tmp_path / "sd3.work")])
    assert main(args + ["--latents", str(tmp_path / "latents.safetensors"), "--prompts",
                        str(tmp_path / "prompts.txt")]) == 0
    _, info = read_student(out)
    assert info.nfe_schedules[2]["timesteps"] == [999, 499]
    assert info.guidance == 1.0 and info.extra["distilled_at_guidance"] == 7.5  # SD's CFG, distilled in
    assert not (tmp_path / "student_nfe2.safetensors").exists()  # one round: its file is the final one
    assert f"2-step student written to {out}" in capsys.readouterr().out


def test_a_chain_read_as_v_writes_v_students_that_sample_as_trained(tiny_sd_pipeline, tmp_path, accelerator):
    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "progressive.safetensors"
    result = train_progressive(job(tiny_sd_pipeline, out, accelerator=accelerator),
                               config(student_prediction="v_prediction"))
    for n in (2, 1):
        _, info = read_student(result.round_paths[n])
        assert info.prediction_type == "v_prediction"
        assert info.extra["training"]["student_prediction"] == "v_prediction"
    # the 1-step student in a fresh pipeline: load_student makes the scheduler read v, as training did
    pipe = copy.deepcopy(bare)
    load_student(pipe, out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(3)
    noise, cond = torch.randn(1, 4, 16, 16, generator=g), Conditioning(torch.randn(1, 7, 32, generator=g))
    latent = pipe(prompt_embeds=cond.context, latents=noise.clone(), guidance_scale=1.0, output_type="latent").images
    from peft import set_peft_model_state_dict

    landed = {}
    for reading in ("v_prediction", "epsilon"):  # the same weights read as epsilon land elsewhere
        reference = LoraStudent(copy.deepcopy(bare), LoraSpec(rank=2, alpha=4.0), student_prediction=reading)
        set_peft_model_state_dict(reference.unet, read_student(out)[0], adapter_name=STUDENT)
        with torch.no_grad():
            landed[reading] = reference.ddim_step(noise, 999, -1, cond)
    torch.testing.assert_close(latent, landed["v_prediction"], atol=1e-4, rtol=1e-4)
    assert (landed["epsilon"] - landed["v_prediction"]).abs().max() > 0.1


def test_only_the_first_rounds_teacher_samples_with_cfg(tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, LoraSpec(rank=2, alpha=4.0), frozen_adapters=["teacher"])
    sample = LatentData(*data())
    assert ProgressiveRound(student, sample, 2, config(guidance=2.5), None).teacher_guidance == 2.5
    assert ProgressiveRound(student, sample, 1, config(guidance=2.5), "teacher").teacher_guidance == 1.0
    assert ProgressiveRound(student, sample, 2, config(guidance=2.5, sample_with_cfg=True),
                            None).teacher_guidance == 1.0
