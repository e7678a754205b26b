"""GDD / GDD-I on a tiny SD pipeline: the one-step file sampled by load_student with one UNet call at t = 999, GDD-I's
frozen convolutions, the teacher-feature discriminator and its R1 term, the evaluate hook, the data folder's errors,
and exact resume of the two-player loop."""

import copy

import numpy as np
import pytest
import torch

from direct_distill.models.io import read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.training.config import LoraSpec, RunConfig, SettingError
from direct_distill.training.data import LatentData
from direct_distill.training.gdd import GDD, GDDConfig, TeacherFeatures, gdd_lora_spec, train_gdd
from direct_distill.training.lora import Conditioning, LoraStudent
from direct_distill.training.one_step import EvalConfig
from direct_distill.training.runner import Job

PROMPTS = ["t-shirt", "trouser", "bag"]


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), [PROMPTS[i % 3] for i in range(n)]


def config(target_modules=(), eval_every=0, keep_best=True, **kw):
    run = RunConfig(batch_size=2, lr=1e-2, max_grad_norm=None, checkpoint_every=2,
                    lora=LoraSpec(rank=2, alpha=4.0, target_modules=target_modules))
    return GDDConfig(**{**dict(run=run, evaluation=EvalConfig(eval_every=eval_every, keep_best=keep_best), steps=3,
                               disc_lr=1e-2, r1_every=2), **kw})


def job(pipe, out, work=None, accelerator=None, evaluate=None):
    return Job(pipe, out, work, teacher="tests/tiny-sd", data=LatentData(*data()), evaluate=evaluate,
               accelerator=accelerator)


def convs(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_gdd_i_student_is_one_unet_call_at_999_in_a_fresh_pipeline(tiny_sd_pipeline, tmp_path, accelerator,
                                                                   check_one_step_student):
    bare = copy.deepcopy(tiny_sd_pipeline)
    before = {name: m.weight.detach().clone() for name, m in convs(tiny_sd_pipeline.unet).items()}
    out = tmp_path / "gdd.safetensors"
    result = train_gdd(job(tiny_sd_pipeline, out, accelerator=accelerator), config())
    assert result.path == out and set(result.losses) == {"generator", "discriminator"}

    # GDD-I: no convolution carries a LoRA, and every one keeps the teacher's weights; every linear layer has one.
    unet = tiny_sd_pipeline.unet
    for name, conv in convs(unet).items():
        assert not hasattr(conv, "lora_A") and torch.equal(conv.weight, before[name]), name
    lora, info = read_student(out)
    conv_names = set(convs(bare.unet))
    linear_names = {name for name, m in bare.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(info.target_modules) == linear_names and not conv_names & set(info.target_modules)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from zero

    assert info.method == "gdd" and info.extra["variant"] == "gdd-i" and info.default_nfe == 1
    assert info.extra["train_seconds"] > 0
    assert info.nfe_schedules[1]["timesteps"] == [999] and info.nfe_schedules[1]["sigmas"][1] == 0.0
    assert info.nfe_schedules[1]["sigmas"][0] == pytest.approx(((1 - 0.0047) / 0.0047) ** 0.5, rel=0.01)  # sigma_max
    assert (info.comfy_sampler, info.guidance, info.prediction_type) == ("euler", 1.0, "epsilon")

    # In a fresh pipeline: one UNet call at t = 999, landing exactly on the training-time generator's sample.
    check_one_step_student(bare, out, lora, config().lora_spec(bare.unet))


@pytest.mark.parametrize("predicts", ["v_prediction", "sample"])
def test_a_generator_read_as_v_or_x0_is_recorded_and_sampled_so(tiny_sd_pipeline, tmp_path, accelerator,
                                                                 check_one_step_student, predicts):
    bare = copy.deepcopy(tiny_sd_pipeline)
    out = tmp_path / "gdd.safetensors"
    train_gdd(job(tiny_sd_pipeline, out, accelerator=accelerator), config(student_prediction=predicts))
    lora, info = read_student(out)
    assert (info.prediction_type, info.teacher_prediction_type) == (predicts, "epsilon")
    assert info.extra["training"]["student_prediction"] == predicts
    check_one_step_student(bare, out, lora, config().lora_spec(bare.unet))


def test_plain_gdd_puts_the_lora_on_convolutions_too_and_gdd_i_refuses_them(tiny_sd_pipeline):
    unet = tiny_sd_pipeline.unet
    assert set(convs(unet)) <= set(config(variant="gdd").lora_spec(unet).target_modules)
    assert set(config().lora_spec(unet).target_modules).isdisjoint(convs(unet))
    assert config(target_modules=("to_q",)).lora_spec(unet).target_modules == ("to_q",)
    with pytest.raises(SettingError, match="target_modules: GDD-I keeps the convolutions frozen"):
        config(target_modules=("to_q", "conv1")).lora_spec(unet)
    with pytest.raises(ValueError, match="variant"):
        gdd_lora_spec(unet, "gdd-ii", LoraSpec(target_modules=()))


def test_discriminator_reads_the_bare_teacher_and_stops_after_the_mid_block(tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, config(variant="gdd").lora_spec(tiny_sd_pipeline.unet))
    features = TeacherFeatures(student)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 400])
    cond = Conditioning(torch.randn(2, 7, 32, generator=g))
    up_calls = []
    for block in tiny_sd_pipeline.unet.up_blocks:
        block.register_forward_hook(lambda *a: up_calls.append(1))
    with torch.no_grad():
        bare = features(z, t, cond)
        for p in student.adapters.parameters():  # the generator's LoRA must not reach the discriminator
            p.normal_()
        assert [f.shape[1:] for f in bare] == [(32, 8, 8), (64, 8, 8), (64, 8, 8)]  # down blocks, mid block
        assert all(torch.equal(a, b) for a, b in zip(bare, features(z, t, cond)))
    assert not up_calls


def test_r1_penalises_the_discriminators_gradient_on_real_latents(tiny_sd_pipeline):
    student = LoraStudent(tiny_sd_pipeline, config().lora_spec(tiny_sd_pipeline.unet))
    method = GDD(student, LatentData(*data()), (4, 16, 16), config(r1_every=4))
    torch.manual_seed(0)
    batch = method.batch(0)

    def disc_loss(step, gamma):
        method.config.r1_gamma = gamma
        torch.manual_seed(1)  # the same discriminator noise each time
        losses = dict(method.loss(step, batch))  # drawn without updates: the weights stay as they are
        return losses["discriminator"].item()

    base = disc_loss(0, 0.0)
    assert disc_loss(0, 1.0) > base + 1e-6
    assert disc_loss(0, 2.0) - base == pytest.approx(2 * (disc_loss(0, 1.0) - base), rel=1e-3)  # linear in gamma
    assert disc_loss(1, 1.0) == pytest.approx(base)  # lazy: only every r1_every steps


def test_evaluate_hook_gets_the_current_generator_every_n_steps(tiny_sd_pipeline, tmp_path, accelerator):
    seen = []

    def evaluate(step, generate):
        a, b = generate(["bag", "coat", "bag"]), generate(["bag", "coat", "bag"])
        assert a.shape == (3, 4, 16, 16) and torch.equal(a, b)  # seeded noise: the same samples each time
        assert not torch.allclose(a, generate(["bag", "coat", "bag"], seed=1))
        seen.append(step)
        return {"fd": float(step)}

    result = train_gdd(job(tiny_sd_pipeline, tmp_path / "s.safetensors", accelerator=accelerator, evaluate=evaluate),
                       config(steps=4, eval_every=2))
    assert seen == [2, 4] and result.evaluations == [(2, {"fd": 2.0}), (4, {"fd": 4.0})]
    assert read_student(tmp_path / "s.safetensors")[1].extra["evaluations"] == [[2, {"fd": 2.0}], [4, {"fd": 4.0}]]


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_run_ends_bit_identical(tiny_sd_pipeline, tmp_path, accelerator, monkeypatch):
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(3)]
    train_gdd(job(pipes[0], tmp_path / "straight.safetensors", tmp_path / "straight", accelerator), config(steps=4))
    loss = GDD.loss

    def dies_in_step_3(self, step, batch):
        for name, value in loss(self, step, batch):
            if step == 3 and name == "discriminator":  # after the generator's update of that step
                raise Interrupted
            yield name, value

    monkeypatch.setattr(GDD, "loss", dies_in_step_3)
    with pytest.raises(Interrupted):
        train_gdd(job(pipes[1], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator),
                  config(steps=4))
    monkeypatch.setattr(GDD, "loss", loss)
    torch.manual_seed(99)  # the caller's RNG must not matter
    train_gdd(job(pipes[2], tmp_path / "resumed.safetensors", tmp_path / "resumed", accelerator), config(steps=4))
    a, b = (read_safetensors(tmp_path / f"{name}.safetensors")[0] for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep_best", [True, False])
def test_a_resumed_run_records_every_evaluation(tiny_sd_pipeline, tmp_path, accelerator, monkeypatch, keep_best):
    """The file of a run interrupted after its evaluation at step 2 and resumed records the evaluations of both
    parts, each step once (before: those after the resume only)."""
    loss = GDD.loss

    def dies_in_step_3(self, step, batch):
        for name, value in loss(self, step, batch):
            if step == 3 and name == "discriminator":
                raise Interrupted
            yield name, value

    def evaluate(step, generate):
        return {"fd": float(step)}

    settings = config(steps=4, eval_every=1, keep_best=keep_best)
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(2)]
    monkeypatch.setattr(GDD, "loss", dies_in_step_3)
    with pytest.raises(Interrupted):
        train_gdd(job(pipes[0], tmp_path / "s.safetensors", tmp_path / "work", accelerator, evaluate), settings)
    monkeypatch.setattr(GDD, "loss", loss)
    result = train_gdd(job(pipes[1], tmp_path / "s.safetensors", tmp_path / "work", accelerator, evaluate), settings)
    assert result.evaluations == [(k, {"fd": float(k)}) for k in (1, 2, 3, 4)]
    assert read_student(tmp_path / "s.safetensors")[1].extra["evaluations"] == [[k, {"fd": float(k)}]
                                                                                for k in (1, 2, 3, 4)]


def test_cli_trains_on_a_folder_of_captioned_images_and_refuses_missing_data_before_loading(tiny_sd_pipeline,
                                                                                            tmp_path, capsys):
    from PIL import Image

    from direct_distill.__main__ import main

    (tmp_path / "empty").mkdir()
    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    args = ["distill", "gdd", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "gdd.safetensors"),
            "--steps", "1", "--batch-size", "1", "--rank", "2"]
    for folder, message in [("nowhere", "--data: .*nowhere: no such data folder"),
                            ("empty", "--data: .*empty: the data folder holds no images")]:
        with pytest.raises(SystemExit, match=message):
            main(args + ["--data", str(tmp_path / folder)])
    with pytest.raises(SystemExit, match="--data: required for a teacher other than the lab's: gdd trains on data"):
        main(args)
    with pytest.raises(SystemExit, match="--latents: give --data or --latents, not both"):
        main(args + ["--data", str(tmp_path / "empty"), "--latents", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "gdd.work").exists()  # refused before anything was written

    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (40, 32)), ("b.jpg", (32, 32)), ("more/c.png", (32, 48))]:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / name)
    (images / "a.txt").write_text("a bag\n")
    (images / "more" / "c.txt").write_text("a coat")
    assert main(args + ["--data", str(images)]) == 0
    assert read_student(tmp_path / "gdd.safetensors")[1].nfe_schedules[1]["timesteps"] == [999]
    assert (tmp_path / "gdd.work" / "folder_latents.safetensors").is_file()
    assert "GDD-I one-step student written to" in capsys.readouterr().out
    # an image that cannot be read: one line naming --data and the file, as `latents` says it
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"--data: .*x\.png.*not a readable image"):
        main(args + ["--data", str(broken), "--out", str(tmp_path / "broken.safetensors")])
    assert main(args + ["--data", str(images)]) == 0  # the same folder resumes (a finished run)
    (images / "more" / "c.txt").write_text("a long coat")  # a caption edited: another run
    with pytest.raises(SystemExit, match="other settings \\(content of --data 'sha256 [0-9a-f]+' there"):
        main(args + ["--data", str(images)])


def test_the_file_holds_the_generator_of_the_lowest_fd_also_after_a_resume(tiny_sd_pipeline, tmp_path, accelerator):
    from peft.utils import get_peft_model_state_dict

    from direct_distill.training.lora import STUDENT

    snapshots, fds = {}, {2: 3.0, 4: 1.0, 6: 2.0}
    pipes = [copy.deepcopy(tiny_sd_pipeline) for _ in range(2)]

    def evaluate(step, generate):
        snapshots[step] = {k: v.clone() for k, v in
                           get_peft_model_state_dict(tiny_sd_pipeline.unet, adapter_name=STUDENT).items()}
        return {"fd": fds[step]}

    work, out = tmp_path / "work", tmp_path / "s.safetensors"
    train_gdd(job(tiny_sd_pipeline, out, work, accelerator, evaluate), config(steps=6, eval_every=2))
    assert any(not torch.equal(snapshots[4][k], snapshots[6][k]) for k in snapshots[4])  # it did move on
    final = get_peft_model_state_dict(tiny_sd_pipeline.unet, adapter_name=STUDENT)
    assert all(torch.equal(final[k], snapshots[4][k]) for k in final)
    assert read_student(out)[1].extra["selected"] == {"step": 4, "fd": 1.0}

    # A re-run of the finished work folder (nothing left to train) still knows the best from its file.
    again = tmp_path / "again.safetensors"
    train_gdd(job(pipes[0], again, work, accelerator, evaluate), config(steps=6, eval_every=2))
    assert read_student(again)[1].extra["selected"] == {"step": 4, "fd": 1.0}

    train_gdd(job(pipes[1], tmp_path / "last.safetensors", accelerator=accelerator,
                  evaluate=lambda step, generate: {"fd": fds[step]}), config(steps=6, eval_every=2, keep_best=False))
    assert read_student(tmp_path / "last.safetensors")[1].extra["selected"] == {"step": 6, "fd": None}


def test_ema_update_and_applied_restore_the_generators_own_weights():
    from direct_distill.training.one_step import GeneratorEMA

    layer = torch.nn.Linear(2, 2)
    own = layer.weight.detach().clone()
    ema = GeneratorEMA(layer, 0.5)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()  # first update: d = min(0.5, 1/10) = 0.1
    with ema.applied():
        assert torch.allclose(layer.weight, own + 0.9)
    assert torch.equal(layer.weight, own + 1.0)
    assert set(dict(ema.named_buffers())) == {"w0", "w1", "updates"} and int(ema.updates) == 1
    with pytest.raises(ValueError, match="decay"):
        GeneratorEMA(layer, 1.0)


@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_the_generator_is_evaluated_and_written_as_its_moving_average(tiny_sd_pipeline, tmp_path, accelerator,
                                                                      monkeypatch, decay):
    """With ema_decay the hook sees, and the file holds, the EMA of the generator's weights after each update
    (d = min(decay, (1 + n) / (10 + n)) at update n), replayed here from its own weights; with 0, its last
    weights."""
    from peft.utils import get_peft_model_state_dict

    from direct_distill.training import one_step
    from direct_distill.training.lora import STUDENT

    held = {}  # the generator's LoRA module and its weights when training starts
    seen = []  # the generator's own weights after each update
    real_init, real_update = one_step.BestGenerator.__init__, one_step.GeneratorEMA.update

    def trainable(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def init(self, student, *args, **kwargs):
        held["module"], held["initial"] = student.adapters, trainable(student.adapters)
        real_init(self, student, *args, **kwargs)

    def update(self):
        seen.append(trainable(self.source[0]))
        real_update(self)

    monkeypatch.setattr(one_step.BestGenerator, "__init__", init)
    monkeypatch.setattr(one_step.GeneratorEMA, "update", update)
    evaluated = {}

    def evaluate(step, generate):
        evaluated[step] = trainable(held["module"])
        return {"fd": float(step)}

    out = tmp_path / "s.safetensors"
    train_gdd(job(tiny_sd_pipeline, out, accelerator=accelerator, evaluate=evaluate),
              config(steps=4, eval_every=2, keep_best=False, ema_decay=decay))
    final = trainable(held["module"])
    assert set(evaluated) == {2, 4}
    if not decay:
        assert not seen and all(torch.equal(final[n], evaluated[4][n]) for n in final)
        return
    assert len(seen) == 4
    average, averages = dict(held["initial"]), []
    for n, weights in enumerate(seen):
        d = min(decay, (1 + n) / (10 + n))
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
        averages.append(average)
    for step in (2, 4):
        assert all(torch.allclose(evaluated[step][k], averages[step - 1][k], atol=1e-6) for k in final), step
    assert all(torch.allclose(final[k], averages[-1][k], atol=1e-6) for k in final)  # what the file holds
    assert any(not torch.allclose(final[k], seen[-1][k]) for k in final)  # ... not the last weights
    written = read_student(out)[0]
    unet_lora = get_peft_model_state_dict(tiny_sd_pipeline.unet, adapter_name=STUDENT)
    assert len(written) == len(unet_lora)
