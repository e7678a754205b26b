"""TimeEmbedNAFNet, the two-stage shortcut, its presets and its safetensors file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from direct_distill.models import (FileFormatError, TimeEmbedNAFNet, TwoStageShortcut, load_shortcut,
                                   save_shortcut)
from direct_distill.models.nafnet import PRESETS, TimeNAFBlock, count_macs, main
from direct_distill.models.shortcut_file import read_shortcut_metadata

FINGERPRINT = "0123456789abcdef"  # stands for shape_fingerprint(unet_parameter_shapes(teacher.unet))


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Unit-gain random weights and branch scales, so that every block and the time embedding matter.

    Fresh NAFNet blocks are the identity (beta = gamma = 0), and with default initialisation
    their branches are too small to move the output much.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() > 1:  # weights: std 1/sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module


def lab_shortcut(seed: int = 0, stage2: bool = True) -> TwoStageShortcut:
    torch.manual_seed(seed)
    model = TwoStageShortcut.from_configs(PRESETS["lab_stage1"], PRESETS["lab_stage2"] if stage2 else None)
    return randomized(model, seed).eval()


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (5, 13), (16, 12)])
def test_output_has_the_input_shape_even_when_not_divisible(size):
    net = randomized(TimeEmbedNAFNet(**PRESETS["lab_stage1"]))
    x = torch.randn(2, 4, *size)
    assert net(x, torch.tensor([10.0, 500.5])).shape == x.shape
    assert net(x, 42.0).shape == x.shape  # scalar t is broadcast over the batch


def test_every_fresh_block_is_the_identity():
    """NAFNet's init: zero branch scales make each block pass its input through, whatever its branches compute."""
    net = TimeEmbedNAFNet(**PRESETS["lab_stage1"])
    blocks = [m for m in net.modules() if isinstance(m, TimeNAFBlock)]
    config = PRESETS["lab_stage1"]
    assert len(blocks) == sum(config["enc_blocks"]) + config["middle_blocks"] + sum(config["dec_blocks"])
    temb = torch.randn(2, net.config["time_dim"])
    with torch.no_grad():
        for block in blocks:
            x = torch.randn(2, block.conv2.out_channels, 8, 8)
            assert torch.equal(block(x, temb), x)
            # The branches themselves are not zero: a unit scale changes the output.
            block.beta.fill_(1.0)
            assert not torch.allclose(block(x, temb), x, atol=1e-3)


def test_fresh_network_is_its_global_residual_plus_the_ending_conv():
    net = TimeEmbedNAFNet(**PRESETS["lab_stage1"])
    torch.nn.init.zeros_(net.ending.weight)
    torch.nn.init.zeros_(net.ending.bias)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(net(x, 100.0), x)


def test_time_conditioning_changes_the_output():
    net = randomized(TimeEmbedNAFNet(**PRESETS["lab_stage1"]))
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([50.0, 150.0]))
    assert (out[0] - out[1]).abs().max() > 0.05


def test_two_stage_forward_is_stage2_of_stage1_and_stage2_is_optional():
    model = lab_shortcut()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([120.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model.stage2(model.stage1(x, t), t))
        model.stage2 = None
        torch.testing.assert_close(model(x, t), model.stage1(x, t))


def test_count_macs_counts_conv_and_linear():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 10))
    expected = 8 * 25 * 4 * 9 + 8 * 25 * 1 * 9 + 10 * 200
    assert count_macs(net, (torch.zeros(1, 4, 5, 5),)) == expected


@pytest.mark.parametrize("name, params", [("paper_stage1", 57.5e6), ("paper_stage2", 13.5e6)])
def test_paper_presets_match_the_papers_size_and_cost(name, params):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = TimeEmbedNAFNet(**PRESETS[name])
        macs = count_macs(net, (torch.zeros(1, 4, 64, 64), torch.zeros(1)))
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.05)
    assert macs == pytest.approx(3.9e9, rel=0.05)


@pytest.mark.parametrize("name", ["lab_stage1", "lab_stage2"])
def test_lab_presets_are_small(name):
    n = sum(p.numel() for p in TimeEmbedNAFNet(**PRESETS[name]).parameters())
    assert 0.3e6 <= n <= 1e6


def test_cli_prints_params_gmacs_and_the_sum_of_both_stages(capsys):
    main(["--preset", "paper", "--latent", "4x64x64"])
    out = capsys.readouterr().out
    assert "paper_stage1" in out and "paper_stage2" in out and "total" in out and "GMACs" in out


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = lab_shortcut()
    path = save_shortcut(tmp_path / "shortcut.safetensors", model, t_band=(30, 160), teacher="lab/fashion-ldm",
                         teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=4, extra={"steps": 123})
    loaded = load_shortcut(path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([40.0, 150.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    assert loaded.t_band == (30.0, 160.0) and loaded.teacher == "lab/fashion-ldm" and loaded.latent_channels == 4
    assert loaded.teacher_unet_shape_fingerprint == FINGERPRINT
    assert read_shortcut_metadata(path) == loaded.metadata  # the header alone says the same
    assert loaded.metadata["extra"] == {"steps": 123}
    assert loaded.stage2.config == model.stage2.config
    assert all(p.requires_grad for p in loaded.parameters())  # fine-tunable after loading


def test_round_trip_without_stage2(tmp_path):
    model = lab_shortcut(stage2=False)
    save_shortcut(tmp_path / "s1.safetensors", model, t_band=(0, 999), teacher="t",
                  teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=4)
    assert load_shortcut(tmp_path / "s1.safetensors").stage2 is None


def test_save_refuses_wrong_latent_channels_or_band(tmp_path):
    with pytest.raises(ValueError, match="latent_channels"):
        save_shortcut(tmp_path / "a.safetensors", lab_shortcut(), t_band=(30, 160), teacher="t",
                      teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=16)
    with pytest.raises(ValueError, match="t_band"):
        save_shortcut(tmp_path / "a.safetensors", lab_shortcut(), t_band=(160, 30), teacher="t",
                      teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=4)
    with pytest.raises(ValueError, match="teacher_unet_shape_fingerprint"):
        save_shortcut(tmp_path / "a.safetensors", lab_shortcut(), t_band=(30, 160), teacher="t",
                      teacher_unet_shape_fingerprint="", latent_channels=4)


def rewrite(src, dst, edit_metadata=None, edit_tensors=None):
    """Copy a shortcut file with its metadata or tensors altered."""
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_metadata:
        edit_metadata(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def set_config_width(meta, width):
    config = json.loads(meta["stage1_config"])
    meta["stage1_config"] = json.dumps({**config, "width": width})


MALFORMED = {
    "not_safetensors": "not a readable safetensors",
    "missing_metadata": "no 'format' metadata entry",
    "lora_file": "looks like a LoRA",
    "other_format": "format 'direct_distill.student'",
    "corrupt_config": "'stage1_config' is not valid JSON",
    "missing_band": "no 't_band' entry",
    "reversed_band": r"'t_band' must be \[t_lo, t_hi\] with 0 <= t_lo <= t_hi <= 1000, got \[300, 100\]",
    "nan_band": r"'t_band' must be .* got \[nan, 100\]",
    "missing_fingerprint": "no 'teacher_unet_shape_fingerprint' entry",
    "older_version": "shortcut format version 1; this code reads version 2",
    "bad_config": "not a valid TimeEmbedNAFNet config",
    "shape_mismatch": "wrong shape",
    "missing_tensor": "missing 1 tensors",
    "mixed_dtypes": "tensors of dtype torch.float16, torch.float32: a shortcut's weights are all of one of",
    "int_tensors": "tensors of dtype torch.int32",
    "extra_list": "metadata 'extra' must be an object, got list",
    "extra_p_text": "metadata 'extra' entries exp_karras_p are not of the kind the samplers read",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_file_format_error_naming_the_file(tmp_path, case):
    good = save_shortcut(tmp_path / "good.safetensors", lab_shortcut(), t_band=(30, 160), teacher="t",
                         teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=4)
    bad = tmp_path / f"{case}.safetensors"
    if case == "not_safetensors":
        bad.write_bytes(b"\x10\x00 random bytes, not safetensors")
    elif case == "missing_metadata":
        save_file({"w": torch.zeros(2)}, str(bad))
    elif case == "lora_file":
        save_file({"unet.down.0.lora_A.weight": torch.zeros(4, 2)}, str(bad), metadata={"format": "pt"})
    elif case == "other_format":
        rewrite(good, bad, lambda m: m.update(format='"direct_distill.student"'))
    elif case == "corrupt_config":
        rewrite(good, bad, lambda m: m.update(stage1_config="{width: 32"))
    elif case == "missing_band":
        rewrite(good, bad, lambda m: m.pop("t_band"))
    elif case == "reversed_band":
        rewrite(good, bad, lambda m: m.update(t_band="[300, 100]"))
    elif case == "nan_band":
        rewrite(good, bad, lambda m: m.update(t_band="[NaN, 100]"))
    elif case == "missing_fingerprint":
        rewrite(good, bad, lambda m: m.pop("teacher_unet_shape_fingerprint"))
    elif case == "older_version":
        rewrite(good, bad, lambda m: m.update(format_version="1"))
    elif case == "bad_config":
        rewrite(good, bad, lambda m: m.update(stage1_config=json.dumps({"depth": 3})))
    elif case == "shape_mismatch":
        rewrite(good, bad, lambda m: set_config_width(m, 16))
    elif case == "missing_tensor":
        rewrite(good, bad, edit_tensors=lambda t: t.pop("stage2.ending.bias"))
    elif case == "mixed_dtypes":  # failed at the first hand-off: float input, half bias
        rewrite(good, bad, edit_tensors=lambda t: t.update({"stage2.ending.bias": t["stage2.ending.bias"].half()}))
    elif case == "int_tensors":
        rewrite(good, bad, edit_tensors=lambda t: t.update({k: v.int() for k, v in t.items()}))
    elif case == "extra_list":  # failed at the first step, reading the schedule from it
        rewrite(good, bad, lambda m: m.update(extra="[1, 2]"))
    elif case == "extra_p_text":
        rewrite(good, bad, lambda m: m.update(extra=json.dumps({"schedule": "exp_karras", "exp_karras_p": "abc"})))
    with pytest.raises(FileFormatError, match=MALFORMED[case]) as err:
        load_shortcut(bad)
    assert bad.name in str(err.value)
    if case not in ("bad_config", "shape_mismatch", "missing_tensor", "mixed_dtypes", "int_tensors"):  # tensors
        with pytest.raises(FileFormatError, match=MALFORMED[case]):
            read_shortcut_metadata(bad)


def test_check_handoff_refuses_timesteps_outside_the_band_unless_forced(tmp_path):
    save_shortcut(tmp_path / "s.safetensors", lab_shortcut(), t_band=(30, 160), teacher="lab",
                  teacher_unet_shape_fingerprint=FINGERPRINT, latent_channels=4)
    shortcut = load_shortcut(tmp_path / "s.safetensors")
    for t in (30.0, 95.5, 160):
        shortcut.check_handoff(t)
    for t in (29.9, 500.0):
        with pytest.raises(ValueError, match=r"outside the band .*\[30, 160\]"):
            shortcut.check_handoff(t)
    shortcut.check_handoff(500.0, force=True)
