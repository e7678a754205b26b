"""The lab teacher's training runs on the shared loop: the VAE (with its patch discriminator) and the UNet (with its
EMA) each resume bit-exactly, and the adversarial term switches on when configured."""

import dataclasses
import os
import stat

import pytest
import torch

from direct_distill.lab.teacher import (UNetConfig, UNetTraining, VAEConfig, VAETraining,
                                        build_text_encoder, build_tokenizer, build_unet, build_vae, prompt_ids)
from direct_distill.lab.data import DATA_DIR
from direct_distill.training.loop import CheckpointMismatch, TrainConfig, train


def _images(n=16):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1).round()  # binary-ish "garments"


def _vae_method(config):
    torch.manual_seed(0)
    return VAETraining(build_vae(), _images(), config, held_out=_images(8))


class Killed(Exception):
    pass


def _run(method, steps, run_dir, kill_at=None):
    """Train ``steps`` steps (checkpointing every 2); with ``kill_at``, die as the step of that index starts."""
    if kill_at is not None:
        draw = method.batch

        def batch(step):
            if step == kill_at:
                raise Killed
            return draw(step)

        method.batch = batch
    try:
        return train(method, TrainConfig(steps=steps, lr=1e-3, run_dir=run_dir, checkpoint_every=2, desc="test"))
    except Killed:
        return None


def _states(method):
    return {f"{name}.{k}": v.clone() for name, m in method.modules.items() for k, v in m.state_dict().items()}


def test_vae_training_resumes_bit_exactly_across_the_adversarial_start(tmp_path):
    config = VAEConfig(steps=4, batch_size=4, disc_start=2, disc_channels=32, eval_every=2)
    untrained = _vae_method(config).discriminator.net[0].weight
    before = _vae_method(config)
    _run(before, 4, tmp_path / "before", kill_at=2)
    assert torch.equal(before.discriminator.net[0].weight, untrained), "before disc_start it is not trained"
    whole = _vae_method(config)
    _run(whole, 4, tmp_path / "whole")
    killed = _vae_method(config)
    _run(killed, 4, tmp_path / "killed", kill_at=3)
    resumed = _vae_method(config)
    _run(resumed, 4, tmp_path / "killed")
    for key, value in _states(whole).items():
        assert torch.equal(value, _states(resumed)[key]), key
    assert not torch.equal(whole.discriminator.net[0].weight, untrained), "after disc_start it learns"


def test_vae_training_without_the_adversarial_term_has_no_discriminator(tmp_path):
    whole = _vae_method(VAEConfig(steps=4, batch_size=4, eval_every=0))
    assert set(whole.modules) == {"vae"} and not hasattr(whole, "players")
    _run(whole, 4, tmp_path / "whole")
    _run(_vae_method(VAEConfig(batch_size=4, eval_every=0)), 4, tmp_path / "killed", kill_at=3)
    resumed = _vae_method(VAEConfig(batch_size=4, eval_every=0))
    _run(resumed, 4, tmp_path / "killed")
    for key, value in _states(whole).items():
        assert torch.equal(value, _states(resumed)[key]), key


def test_vae_reports_held_out_psnr_every_eval_steps():
    method = _vae_method(VAEConfig(batch_size=4, eval_every=3))
    assert method.after_step(1) is None
    scores = method.after_step(2)
    assert set(scores) == {"held_out_psnr"} and 0 < scores["held_out_psnr"] < 60


def _unet_method(tmp_path, config):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tmp_path / "tok")
    text = build_text_encoder(tokenizer)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(20, 4, 8, 8, generator=g), torch.rand(20, 4, 8, 8, generator=g) * 0.1
    return UNetTraining(build_unet(text.config.hidden_size), text, prompt_ids(tokenizer), mean, std,
                        torch.arange(20) % 10, config)


def test_unet_training_and_its_ema_resume_bit_exactly(tmp_path):
    config = UNetConfig(batch_size=4, ema_decay=0.9)
    whole = _unet_method(tmp_path, config)
    start = _states(whole)
    _run(whole, 4, tmp_path / "whole")
    _run(_unet_method(tmp_path, config), 4, tmp_path / "killed", kill_at=3)
    resumed = _unet_method(tmp_path, config)
    _run(resumed, 4, tmp_path / "killed")
    end, end_resumed = _states(whole), _states(resumed)
    for key in end:
        assert torch.equal(end[key], end_resumed[key]), key
    # The EMA moved toward the trained weights, and stayed between start and end (decay ramp (1+s)/(10+s)).
    key = next(k for k in end if k.startswith("ema_unet.") and k.endswith("conv_in.weight"))
    live = "unet." + key.removeprefix("ema_unet.")
    assert not torch.equal(end[key], start[key])
    assert (end[key] - start[live]).abs().sum() < (end[live] - start[live]).abs().sum()


@pytest.mark.skipif(not (DATA_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_training_cost_is_timed_on_the_training_code_and_fits_the_report():
    from direct_distill.lab.benchmark import TeacherCost
    from direct_distill.lab.teacher import decoder_config, measure_training_cost

    cost = TeacherCost(**measure_training_cost(steps=2))
    assert cost.vae_steps == VAEConfig().steps and cost.unet_steps == UNetConfig().steps
    assert cost.decoder_steps == decoder_config().steps
    assert min(cost.vae_seconds_per_step, cost.unet_seconds_per_step, cost.decoder_seconds_per_step) > 0
    assert cost.seconds == pytest.approx(cost.vae_seconds_per_step * cost.vae_steps
                                         + cost.unet_seconds_per_step * cost.unet_steps
                                         + cost.decoder_seconds_per_step * cost.decoder_steps)


@pytest.mark.skipif(not (DATA_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_training_cost_counts_the_feature_network_where_a_perceptual_term_needs_it(monkeypatch):
    import direct_distill.lab.teacher as teacher
    from direct_distill.lab.benchmark import TeacherCost, teacher_cost_terms
    from direct_distill.lab.features import FeatureConfig

    monkeypatch.setattr(teacher, "VAEConfig", lambda **kw: VAEConfig(**dict(dict(perceptual_weight=1.0), **kw)))
    cost = TeacherCost(**teacher.measure_training_cost(steps=2))
    assert cost.features_steps == FeatureConfig().steps and cost.features_seconds_per_step > 0
    assert cost.seconds == pytest.approx(cost.features_seconds_per_step * cost.features_steps
                                         + cost.vae_seconds_per_step * cost.vae_steps
                                         + cost.unet_seconds_per_step * cost.unet_steps
                                         + cost.decoder_seconds_per_step * cost.decoder_steps)
    assert teacher_cost_terms(cost).startswith(f"feature network {cost.features_seconds_per_step:.3f} s/step x "
                                               f"{cost.features_steps} + VAE ")


def test_the_unet_and_decoder_stages_resume_only_on_the_vae_they_started_from(tmp_path, monkeypatch, capsys):
    import json

    import direct_distill.lab.teacher as teacher

    images = _images(24)
    monkeypatch.setattr(teacher, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    teacher.train_vae(VAEConfig(steps=2, batch_size=4, eval_every=0), tmp_path)
    teacher.train_unet(UNetConfig(steps=2, batch_size=4), tmp_path)
    teacher.train_decoder(teacher.decoder_config(steps=2, batch_size=4, eval_every=0, disc_channels=32), tmp_path)
    # what does not change the run (how often it checkpoints or evaluates) resumes it
    teacher.train_decoder(teacher.decoder_config(steps=2, batch_size=4, eval_every=1, checkpoint_every=1,
                                                 disc_channels=32), tmp_path)
    config = tmp_path / "vae" / "model" / "config.json"  # another VAE put in its place: here, another scale
    config.write_text(json.dumps(dict(json.loads(config.read_text()), scaling_factor=0.5)))
    with pytest.raises(CheckpointMismatch, match=r"other settings \(vae '[0-9a-f]{64}' there, '[0-9a-f]{64}' "
                                                 r"here\)"):
        teacher.train_unet(UNetConfig(steps=2, batch_size=4), tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"other settings \(vae '"):
        teacher.train_decoder(teacher.decoder_config(steps=2, batch_size=4, eval_every=0, disc_channels=32),
                              tmp_path)


def test_the_saved_vae_scales_its_latents_to_unit_variance_and_caches_know_the_scale(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    import direct_distill.lab.teacher as teacher
    from direct_distill.training.data import encode_images, vae_checksum

    images = _images(24)
    monkeypatch.setattr(teacher, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    teacher.train_vae(VAEConfig(steps=2, batch_size=4, eval_every=0), tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "model").eval()
    latents, _ = encode_images(vae, images)
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)
    before = vae_checksum(vae)
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * 2)
    assert vae_checksum(vae) != before  # scaled encodings cached under the old factor are not reused


def test_the_decoder_stage_trains_the_decoder_alone_so_the_latents_keep_their_meaning(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    import direct_distill.lab.teacher as teacher

    images = _images(24)
    monkeypatch.setattr(teacher, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    with pytest.raises(SystemExit, match="teacher vae"):
        teacher.train_decoder(teacher.decoder_config(steps=2), tmp_path)
    teacher.train_vae(VAEConfig(steps=2, batch_size=4, eval_every=0), tmp_path)
    teacher.train_decoder(teacher.decoder_config(steps=3, batch_size=4, eval_every=0, disc_channels=32), tmp_path)
    before = AutoencoderKL.from_pretrained(tmp_path / "vae" / "model").state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "decoder" / "model")
    assert after.config.scaling_factor == AutoencoderKL.load_config(tmp_path / "vae" / "model")["scaling_factor"]
    for key, value in after.state_dict().items():
        same = torch.equal(value, before[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key
    umask = os.umask(0)
    os.umask(umask)
    for stage in ("vae", "decoder"):
        written = tmp_path / stage / "model" / "diffusion_pytorch_model.safetensors"
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, "not safetensors' private 0600"


def test_export_wants_the_fine_tuned_decoder_and_the_unet(tmp_path):
    import direct_distill.lab.teacher as teacher

    with pytest.raises(SystemExit, match="teacher decoder"):
        teacher.export_teacher(tmp_path, tmp_path / "out")
    (tmp_path / "decoder" / "model").mkdir(parents=True)
    (tmp_path / "decoder" / "model" / "config.json").write_text("{}")  # the decoder stage done, the UNet's not
    with pytest.raises(SystemExit, match=f"no trained UNet in {tmp_path / 'unet'}: run `python -m direct_distill "
                                         "teacher unet` first"):
        teacher.export_teacher(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_classifier_command_checks_its_epochs(capsys):
    from direct_distill.lab.evaluator import main

    with pytest.raises(SystemExit):
        main(["--epochs", "0"])
    assert "python -m direct_distill classifier: error: --epochs must be >= 1, got 0" in capsys.readouterr().err


def test_a_shortened_stage_keeps_its_warmups_share_of_the_steps():
    """``--steps`` below a stage's warmup would train at a learning rate that never reaches its peak."""
    from direct_distill.lab.teacher import decoder_config, stage_config

    assert (UNetConfig().steps, UNetConfig().warmup_steps) == (4500, 500)
    assert stage_config(UNetConfig) == UNetConfig()
    assert (stage_config(UNetConfig, 450).steps, stage_config(UNetConfig, 450).warmup_steps) == (450, 50)
    assert stage_config(VAEConfig, 2).warmup_steps == 0
    shortened = stage_config(decoder_config, 300, perceptual_weight=0.5)
    assert (shortened.warmup_steps, shortened.perceptual_weight) == (20, 0.5)
    assert dataclasses.replace(shortened, steps=1500, warmup_steps=100) == decoder_config(perceptual_weight=0.5)


def test_a_stage_resumed_with_another_step_count_is_one_line(tmp_path, monkeypatch, capsys):
    import direct_distill.lab.teacher as teacher

    images = _images(24)
    monkeypatch.setattr(teacher, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    teacher.train_vae(VAEConfig(steps=2, batch_size=4, eval_every=0), tmp_path)
    saved = (tmp_path / "vae" / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # it said "vae saved" for the 2-step VAE, as if 1 step had been asked
        teacher.main(["vae", "--steps", "1", "--work", str(tmp_path)])
    checkpoint = tmp_path / "vae" / "checkpoint.safetensors"
    assert capsys.readouterr().err == (f"python -m direct_distill teacher vae: {checkpoint}: written by a run of 2 "
                                       "steps, this run has 1; resume with the same number of steps or use another "
                                       "run folder\n")
    assert (tmp_path / "vae" / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == saved
