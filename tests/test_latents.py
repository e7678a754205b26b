"""`python -m direct_distill latents`: an image folder becomes the latents file the data methods train on, at the
size asked, resuming where an interrupted run stopped; and the real-model commands from single-file teachers."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from direct_distill.models.io import read_safetensors
from direct_distill.training import latents
from direct_distill.training.data import (check_latents_file, encode_images, load_images, read_image_folder,
                                          read_latents_file)

from ldm_layout import family_pipeline, write_ldm


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Ten images of assorted sizes and modes, nine captioned, one in a subfolder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        path = folder / ("sub" if i == 9 else "") / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        size = (40 + 7 * i, 64 - 3 * i)
        pixels = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("RGB" if i % 3 else "L").save(path)
        if i != 4:
            path.with_suffix(".txt").write_text(f"a picture number {i}\n")
    return folder


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An SD1.x-shaped single-file teacher and the VAE it holds."""
    from direct_distill.lab.teacher import build_tokenizer

    folder = tmp_path_factory.mktemp("teacher")
    build_tokenizer(folder / "tokenizer")
    pipe = family_pipeline("sd1", folder / "tokenizer")
    return write_ldm(pipe, "sd1", folder / "sd1.safetensors"), pipe.vae


def test_image_folder_becomes_a_latents_file_at_the_size_asked(image_folder, teacher_file, tmp_path, capsys):
    path, vae = teacher_file
    out = tmp_path / "data_32.safetensors"
    assert latents.main(["--teacher", str(path), "--data", str(image_folder), "--size", "32", "--out", str(out),
                         "--batch-size", "3"]) == 0
    count, prompts = check_latents_file(out)
    assert count == 10 and prompts[4] == "" and prompts[0] == "a picture number 0" and prompts[9].endswith("9")
    tensors, metadata = read_safetensors(out)
    assert tensors["latents"].shape == tensors["std"].shape == (10, 4, 4, 4)   # 32 px through an 8x VAE
    assert float(metadata["vae_scaling_factor"]) == vae.config.scaling_factor
    # another model's VAE (SDXL's factor against SD1.x's): the file is refused, not trained on 1.4x too large
    other = copy.deepcopy(vae)
    other.register_to_config(scaling_factor=0.13025)
    with pytest.raises(ValueError, match=f"encoded by a VAE of scaling factor {vae.config.scaling_factor:g}, the "
                                         "teacher's is 0.13025: they were made for another model"):
        read_latents_file(out, vae=other)
    assert len(read_latents_file(out, vae=vae).latents) == 10
    paths = sorted(p for p in image_folder.rglob("*.png"))
    with torch.no_grad():
        mean, std = encode_images(vae, load_images(paths, 3, 32), progress=False)
    torch.testing.assert_close(tensors["latents"], mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(tensors["std"], std, rtol=0, atol=1e-5)
    assert not (tmp_path / "data_32.safetensors.work").exists()
    output = capsys.readouterr()
    assert "SD1.x" in output.out and "1 without a caption" in output.out and "10/10" in output.err
    latents.main(["--teacher", str(path), "--data", str(image_folder), "--size", "32", "--out", str(out)])
    assert "already holds these 10 images at 32 px" in capsys.readouterr().out
    assert not (tmp_path / "data_32.safetensors.work").exists()  # the re-run leaves no folder of its own behind


def test_an_interrupted_encoding_resumes_with_the_parts_left(image_folder, teacher_file, tmp_path, monkeypatch,
                                                            capsys):
    path, _ = teacher_file
    monkeypatch.setattr(latents, "PART", 4)   # parts of 4, 4 and 2 images
    loaded = []
    real_load = latents.load_images

    def load_then_stop(paths, channels, size):
        if len(loaded) == 6:
            raise KeyboardInterrupt   # the run is stopped during the second part
        loaded.extend(paths)
        return real_load(paths, channels, size)

    monkeypatch.setattr(latents, "load_images", load_then_stop)
    args = ["--teacher", str(path), "--data", str(image_folder), "--size", "64", "--batch-size", "2"]
    assert latents.main([*args, "--out", str(tmp_path / "x.safetensors")]) == 130  # one line, no traceback
    assert "latents: stopped; run the same command again to resume from the parts in" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "x.safetensors.work").iterdir()) == [".lock", "part_00000.safetensors"]
    assert not (tmp_path / "x.safetensors").exists()
    loaded.clear()
    monkeypatch.setattr(latents, "load_images", lambda *a: (loaded.extend(a[0]), real_load(*a))[1])
    latents.main([*args, "--out", str(tmp_path / "x.safetensors")])
    assert len(loaded) == 6   # the first part was not encoded again
    resumed = read_safetensors(tmp_path / "x.safetensors")[0]
    latents.main([*args, "--out", str(tmp_path / "fresh.safetensors")])
    fresh = read_safetensors(tmp_path / "fresh.safetensors")[0]
    assert resumed["latents"].shape == (10, 4, 8, 8)
    torch.testing.assert_close(resumed["latents"], fresh["latents"], rtol=0, atol=0)


def test_a_work_folder_the_user_named_keeps_everything_but_the_parts(image_folder, teacher_file, tmp_path):
    path, _ = teacher_file
    work = tmp_path / "mystuff"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    from safetensors.torch import save_file  # a part of another folder's encoding, under a name this run does not use

    save_file({"latents": torch.zeros(1)}, str(work / "part_00042.safetensors"), metadata={"part_key": "other"})
    assert latents.main(["--teacher", str(path), "--data", str(image_folder), "--size", "32", "--work", str(work),
                         "--out", str(tmp_path / "x.safetensors")]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "part_00042.safetensors"]


def small_folder(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"caption {i}")
    return folder


def test_an_edited_caption_is_read_again(teacher_file, tmp_path):
    path, _ = teacher_file
    folder = small_folder(tmp_path / "images")
    args = ["--teacher", str(path), "--data", str(folder), "--size", "32", "--out", str(tmp_path / "x.safetensors")]
    latents.main(args)
    (folder / "im0.txt").write_text("a red dress")
    latents.main(args)
    assert check_latents_file(tmp_path / "x.safetensors")[1] == ["a red dress", "caption 1", "caption 2"]


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    grey16 = tmp_path / "grey16.png"  # mid-grey in 16 bits: 0 in [-1, 1], not white
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(grey16)
    assert Image.open(grey16).mode.startswith("I")
    assert load_images([grey16], 3, 16).abs().max() < 0.01
    # a phone photo: stored 32 wide and 16 high, EXIF orientation 6 (rotate 90 degrees clockwise to view)
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # the stored left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = load_images([tmp_path / "phone.jpg"], 1, 16)[0, 0]  # viewed 16 x 32: the white half on top
    assert upright[:8].mean() > 0.9 and upright[8:].mean() < -0.9
    # a cut-out: transparent around a mid-grey square, the transparent pixels stored black; seen on white
    cut = np.zeros((16, 16, 4), dtype=np.uint8)
    cut[4:12, 4:12] = (128, 128, 128, 255)
    Image.fromarray(cut, "RGBA").save(tmp_path / "cut.png")
    Image.fromarray(cut[..., [0, 3]], "LA").save(tmp_path / "cut_grey.png")
    Image.fromarray(cut[..., 0], "L").convert("P").save(tmp_path / "cut_palette.png", transparency=0)  # GIF-like
    for name in ("cut.png", "cut_grey.png", "cut_palette.png"):
        seen = load_images([tmp_path / name], 3, 16)[0]
        assert seen[:, 0].min() > 0.99 and seen[:, 8, 8].abs().max() < 0.01, name


def test_captions_and_hidden_files_as_users_save_them(tmp_path):
    folder = small_folder(tmp_path / "images", n=2)
    (folder / "._im0.png").write_bytes(b"\x00\x05\x16\x07 mac resource fork")  # not an image of the set
    (folder / "im0.txt").write_bytes("\ufeffa red dress".encode("utf-8"))   # Notepad's byte-order mark
    paths, prompts = read_image_folder(folder)
    assert [p.name for p in paths] == ["im0.png", "im1.png"] and prompts == ["a red dress", "caption 1"]
    (folder / "im1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"im1.txt: not UTF-8 text \(unexpected end of data at byte 3\)"):
        read_image_folder(folder)


def test_an_unreadable_image_is_one_line_naming_it(teacher_file, tmp_path):
    path, _ = teacher_file
    folder = small_folder(tmp_path / "images", n=2)
    (folder / "im1.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"^latents: .*im1.png: not a readable image"):
        latents.main(["--teacher", str(path), "--data", str(folder), "--size", "32",
                      "--out", str(tmp_path / "x.safetensors")])


def test_an_image_past_pils_pixel_limit_is_one_line_naming_it(teacher_file, tmp_path, monkeypatch):
    from PIL import Image

    path, _ = teacher_file
    folder = small_folder(tmp_path / "images", n=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 images as a 20000x20000 one is to PIL's default
    with pytest.raises(SystemExit, match=r"^latents: .*im0.png: too large to decode safely \(Image size \(1024 "
                                         r"pixels\) exceeds limit .*\); downscale it"):
        latents.main(["--teacher", str(path), "--data", str(folder), "--size", "32",
                      "--out", str(tmp_path / "x.safetensors")])


def test_a_vae_that_overflows_float16_is_one_line_from_the_command(teacher_file, tmp_path, monkeypatch):
    import copy

    path, vae = teacher_file
    vae = copy.deepcopy(vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e3)
        vae.encoder.conv_in.bias.fill_(6e4)
    monkeypatch.setattr(latents, "load_teacher_vae", lambda _, dtype: vae.to(dtype))
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit, match=r"^latents: the VAE gave non-finite latents for images 0-1 in float16"):
        latents.main(["--teacher", str(path), "--data", str(small_folder(tmp_path / "images", n=2)), "--size", "32",
                      "--out", str(out), "--dtype", "float16"])
    assert not out.exists()


def test_a_full_disk_is_one_line_and_the_parts_written_stay(teacher_file, tmp_path, monkeypatch):
    path, _ = teacher_file
    monkeypatch.setattr(latents, "PART", 2)
    real_save, saved = latents.atomic_save_file, []

    def disk_fills(tensors, target, metadata=None):
        if saved:
            raise OSError(28, "No space left on device", str(target))
        saved.append(real_save(tensors, target, metadata))

    monkeypatch.setattr(latents, "atomic_save_file", disk_fills)
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit, match=r"^latents: \[Errno 28\] No space left on device: '.*part_00001"):
        latents.main(["--teacher", str(path), "--data", str(small_folder(tmp_path / "images", n=4)), "--size", "32",
                      "--out", str(out)])
    assert not out.exists() and (tmp_path / "x.safetensors.work" / "part_00000.safetensors").is_file()


def test_bad_requests_fail_before_the_vae_loads(image_folder, teacher_file, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    path, _ = teacher_file
    monkeypatch.setattr(latents, "load_teacher_vae", lambda *a: pytest.fail("the VAE was loaded"))
    (tmp_path / "file").write_text("")
    base = ["--teacher", str(path), "--size", "64"]
    cases = [
        (["--data", str(tmp_path / "none"), "--out", str(tmp_path / "a.safetensors")], "no such data folder"),
        (["--data", str(tmp_path), "--out", str(tmp_path / "a.safetensors")], "holds no images"),
        (["--data", str(image_folder), "--out", str(tmp_path / "file" / "a.safetensors")], "--out: .*cannot write"),
        (["--data", str(image_folder), "--out", str(tmp_path / "a.safetensors"), "--batch-size", "0"],
         "--batch-size: must be >= 1"),
        (["--data", str(image_folder)], "--out: required"),
        (["--data", str(image_folder), "--out", str(path)], f"--out: {path} is what --teacher reads; write elsewhere"),
        (["--data", str(image_folder), "--out", str(tmp_path / "student.safetensors")],
         "--out: .*student.safetensors exists and holds a student file, this run writes a latents file"),
        (["--data", str(image_folder), "--out", str(tmp_path / "b.safetensors"), "--work",
          str(tmp_path / "b.safetensors")], "--work: .*b.safetensors is --out itself"),
    ]
    save_file({"w": torch.zeros(1)}, str(tmp_path / "student.safetensors"),
              metadata={"format": '"direct_distill.student"'})  # a student, trained for hours
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            latents.main(base + extra)
    with pytest.raises(SystemExit, match="--size: must be >= 8, got 0"):
        latents.main(["--teacher", str(path), "--data", str(image_folder), "--out", "x", "--size", "0"])
    # a value argparse cannot read: one line naming it, not the usage of every flag
    with pytest.raises(SystemExit) as exit_:
        latents.main(["--teacher", str(path), "--data", str(image_folder), "--out", "x", "--size", "abc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "python -m direct_distill latents: argument --size: invalid int value: 'abc' (see --help)\n"


def test_a_size_the_vae_cannot_take_is_refused(image_folder, teacher_file, tmp_path):
    path, _ = teacher_file
    with pytest.raises(SystemExit, match="--size: 60 pixels: the VAE downsamples by 8"):
        latents.main(["--teacher", str(path), "--data", str(image_folder), "--size", "60",
                      "--out", str(tmp_path / "a.safetensors")])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_teachers_run_the_real_model_commands(family, image_folder, tmp_path, monkeypatch, capsys):
    """The README's real-model path, offline, at 64 px: SD1.x: image folder -> latents -> progressive student;
    SD2.x (v-prediction): an SFD student from prompts; SDXL (LoRA students take SD1.x/2.x UNets): the shortcut."""
    import socket

    from direct_distill.__main__ import main
    from direct_distill.lab.teacher import build_tokenizer
    from direct_distill.models.student_file import read_student

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    tokenizer = tmp_path / "tokenizer"
    build_tokenizer(tokenizer)
    teacher = write_ldm(family_pipeline(family, tokenizer), family, tmp_path / f"{family}.safetensors",
                        dtype=torch.float16)
    (tmp_path / "prompts.txt").write_text("a shirt\na boot\n")
    out = tmp_path / "student.safetensors"
    common = ["--teacher", str(teacher), "--tokenizer", str(tokenizer), "--out", str(out), "--cpu",
              "--checkpoint-every", "0"]
    if family == "sd1":
        assert main(["latents", "--teacher", str(teacher), "--data", str(image_folder), "--size", "64",
                     "--out", str(tmp_path / "data.safetensors"), "--cpu"]) == 0
        assert main(["distill", "progressive", *common, "--latents", str(tmp_path / "data.safetensors"),
                     "--teacher-steps", "4", "--student-steps", "2", "--steps-per-round", "2", "--warmup-steps", "0",
                     "--batch-size", "2", "--rank", "2"]) == 0
    elif family == "sd2":
        assert main(["distill", "sfd", *common, "--prompts", str(tmp_path / "prompts.txt"), "--nfe", "1", "2",
                     "--default-nfe", "2", "--steps", "2", "--warmup-steps", "0", "--batch-size", "2", "--rank", "2",
                     "--teacher-substeps", "1", "--latent-size", "8"]) == 0
    else:
        assert main(["distill", "shortcut", *common, "--prompts", str(tmp_path / "prompts.txt"),
                     "--trajectories", "6", "--teacher-steps", "4", "--capture-band", "200", "260", "--height", "64",
                     "--width", "64", "--sample-batch-size", "3", "--stage1-steps", "2", "--stage2-steps", "2",
                     "--batch-size", "2"]) == 0
    assert f"{dict(sd1='SD1.x', sd2='SD2.x', sdxl='SDXL')[family]} checkpoint" in capsys.readouterr().out
    assert out.is_file()
    if family != "sdxl":
        student = read_student(out)[1]
        assert student.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


def test_latents_that_overflow_float16_are_one_error_not_a_file(teacher_file):
    """SDXL's VAE overflows in float16; here a VAE whose first convolution does: no NaN latents go to training."""
    import copy

    vae = copy.deepcopy(teacher_file[1]).to(torch.float16)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e3)
        vae.encoder.conv_in.bias.fill_(6e4)  # near float16's largest, 65504
    pixels = torch.rand(3, 3, 32, 32, dtype=torch.float16) * 2 - 1
    with pytest.raises(FloatingPointError, match=r"non-finite latents for images 0-2 in float16 \(SDXL's VAE overflows "
                                                 r"in float16\): encode with --dtype bfloat16 or float32"):
        encode_images(vae, pixels)
