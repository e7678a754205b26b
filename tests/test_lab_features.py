"""The lab's label-free feature network (SimCLR on the training images, no labels) and the VAE's perceptual term in
it: a distance that is zero for identical images and grows with the change, training that learns and resumes
bit-exactly, a saved file that loads back frozen or is refused, and the teacher CLI's checks of the new flag."""

import pytest
import torch

from direct_distill.lab import features as lab_features
from direct_distill.lab.data import DATA_DIR, load_fashion_mnist
from direct_distill.lab.features import (FEATURES_FILE, ContrastiveTraining, FeatureConfig, FeatureNet,
                                         load_feature_net, perceptual_distance, train_features)
from direct_distill.lab.teacher import VAEConfig, VAETraining, build_vae
from direct_distill.models.io import FileFormatError, atomic_save_file
from direct_distill.training.loop import TrainConfig, train

needs_data = pytest.mark.skipif(not (DATA_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST not installed at {DATA_DIR}")


def _images(n=16):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1).round()


def test_perceptual_distance_is_zero_for_the_same_images_and_grows_with_the_change():
    torch.manual_seed(0)
    net = FeatureNet().eval()
    x = _images(8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = float(perceptual_distance(net, x, x.clone()))
        small, large = (float(perceptual_distance(net, x + s * noise, x)) for s in (0.02, 0.3))
    assert same == 0.0
    assert 0 < small < large


def test_augment_keeps_the_shape_and_draws_a_different_view_each_time():
    x = _images(4)
    torch.manual_seed(0)
    a, b = lab_features.augment(x), lab_features.augment(x)
    assert a.shape == x.shape and not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(lab_features.augment(x), a), "views are drawn from the global RNG (exact resume)"


@needs_data
def test_contrastive_training_learns_to_pair_the_views_of_real_images():
    torch.manual_seed(0)
    images = load_fashion_mnist("train")[0][:2000]
    config = FeatureConfig(batch_size=32)
    method = ContrastiveTraining(FeatureNet(config.channels), images, config)
    losses = []
    optimizer = torch.optim.Adam(method.net.parameters(), 2e-3)
    for step in range(60):
        loss = method.loss(step, method.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)  # chance: log(63) = 4.14


class Killed(Exception):
    pass


def test_feature_training_resumes_bit_exactly_and_saves_a_frozen_net(tmp_path, monkeypatch):
    images = _images(24)
    monkeypatch.setattr(lab_features, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    config = FeatureConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)
    train_features(config, tmp_path / "whole")

    torch.manual_seed(config.seed)
    method = ContrastiveTraining(FeatureNet(config.channels), images, config)
    draw = method.batch

    def batch(step):
        if step == 3:
            raise Killed
        return draw(step)

    method.batch = batch
    with pytest.raises(Killed):
        train(method, TrainConfig(steps=4, lr=config.lr, warmup_steps=1, final_lr_fraction=0.0,
                                  weight_decay=config.weight_decay, seed=config.seed,
                                  run_dir=tmp_path / "killed" / "features", checkpoint_every=2, desc="test"))
    train_features(config, tmp_path / "killed")

    whole = load_feature_net(tmp_path / "whole" / "features" / FEATURES_FILE)
    resumed = load_feature_net(tmp_path / "killed" / "features" / FEATURES_FILE)
    assert not any(p.requires_grad for p in whole.parameters()) and not whole.training
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_file_that_is_not_a_feature_network_is_refused_by_name(tmp_path):
    vae_like = tmp_path / "vae.safetensors"
    atomic_save_file({"encoder.conv_in.weight": torch.zeros(32, 1, 3, 3)}, vae_like)
    with pytest.raises(FileFormatError, match=f"{vae_like} is not a lab feature network"):
        load_feature_net(vae_like)
    wrong_width = tmp_path / "wide.safetensors"
    atomic_save_file(FeatureNet(16).state_dict(), wrong_width, {"channels": 32})
    with pytest.raises(FileFormatError, match="is not a lab feature network"):
        load_feature_net(wrong_width)


def test_the_vae_loss_adds_the_weighted_perceptual_distance():
    torch.manual_seed(0)
    net = FeatureNet().eval().requires_grad_(False)
    vae, x = build_vae(), _images(4)
    with pytest.raises(ValueError, match="feature network"):
        VAETraining(vae, x, VAEConfig(perceptual_weight=1.0))
    plain = VAETraining(vae, x, VAEConfig(kl_weight=0.0))
    weighted = VAETraining(vae, x, VAEConfig(kl_weight=0.0, perceptual_weight=2.0), features=net)
    with torch.no_grad():
        torch.manual_seed(1)
        base = float(plain.loss(0, x))
        torch.manual_seed(1)
        total = float(weighted.loss(0, x))
        torch.manual_seed(1)
        rec = vae.decode(vae.encode(x).latent_dist.sample()).sample
        assert total == pytest.approx(base + 2.0 * float(perceptual_distance(net, rec, x)), rel=1e-5)
    assert total > base


def test_the_teacher_cli_checks_the_perceptual_weight_and_trains_with_it(tmp_path, monkeypatch, capsys):
    import direct_distill.lab.teacher as teacher

    images = _images(24)
    for module in (teacher, lab_features):
        monkeypatch.setattr(module, "load_fashion_mnist", lambda split: (images, torch.arange(24) % 10))
    for argv, message in ((["unet", "--perceptual-weight", "1"], "applies to the vae and decoder stages"),
                          (["vae", "--perceptual-weight", "-1"], "must be a finite number >= 0"),
                          (["vae", "--perceptual-weight", "nan"], "must be a finite number >= 0"),
                          (["features", "--out", str(tmp_path / "t")], "--out applies to the export stage; features "
                                                                       "writes into --work"),
                          (["export", "--steps", "5"], "--steps applies to the training stages; export trains")):
        with pytest.raises(SystemExit):
            teacher.main(argv + ["--work", str(tmp_path)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run `python -m direct_distill teacher features` first"):
        teacher.main(["vae", "--perceptual-weight", "1", "--steps", "2", "--work", str(tmp_path)])
    assert not (tmp_path / "vae").exists(), "refused before anything was trained"
    monkeypatch.setattr(teacher, "VAEConfig", lambda **kw: VAEConfig(**dict(kw, batch_size=4, eval_every=0)))
    monkeypatch.setattr(teacher, "FeatureConfig", lambda **kw: FeatureConfig(**dict(kw, batch_size=8)))
    teacher.main(["features", "--steps", "2", "--work", str(tmp_path)])
    teacher.main(["vae", "--perceptual-weight", "1", "--steps", "2", "--work", str(tmp_path)])
    assert (tmp_path / "vae" / "model" / "config.json").is_file()
    capsys.readouterr()
    # the finished stage resumed under another weight, or on another feature network, is not relabelled
    with pytest.raises(SystemExit):
        teacher.main(["vae", "--perceptual-weight", "0.5", "--steps", "2", "--work", str(tmp_path)])
    assert "perceptual_weight 1.0 there, 0.5 here" in capsys.readouterr().err
    net = tmp_path / "features" / FEATURES_FILE
    atomic_save_file({k: v + 1e-3 for k, v in lab_features.read_safetensors(net)[0].items()}, net, {"channels": "16"})
    with pytest.raises(SystemExit):
        teacher.main(["vae", "--perceptual-weight", "1", "--steps", "2", "--work", str(tmp_path)])
    err = capsys.readouterr().err
    assert "written by a run with other settings (feature_network '" in err and "perceptual_weight" not in err
