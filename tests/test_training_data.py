"""The methods' data: prompt files, the latents file (header checks before anything loads), image folders with
captions, and their encoding by a teacher's VAE (diffusers' own posterior), cached until something changes."""

import numpy as np
import pytest
import torch

from direct_distill.models.io import FileFormatError, atomic_save_file
from direct_distill.training.data import (LatentData, check_latents_file, encode_image_folder, encode_images,
                                          load_images, read_image_folder, read_latents_file, read_prompts,
                                          write_latents_file)


def images_folder(root, sizes=(("a.png", (40, 32)), ("b.jpg", (32, 32)), ("more/c.png", (32, 48)))):
    from PIL import Image

    (root / "more").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, size in sizes:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "a.txt").write_text("a bag\n")
    (root / "more" / "c.txt").write_text("a coat")
    return root


def test_prompt_files_skip_blank_lines_and_an_empty_one_is_refused(tmp_path):
    (tmp_path / "p.txt").write_text("a bag\n\n  a coat  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a bag", "a coat"]
    (tmp_path / "notepad.txt").write_bytes("\ufeffa bag\r\na coat\r\n".encode("utf-8"))  # byte-order mark, CRLF
    assert read_prompts(tmp_path / "notepad.txt") == ["a bag", "a coat"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        read_prompts(tmp_path / "nowhere.txt")


def test_latent_data_draws_posterior_samples_with_their_prompts():
    latents, std = torch.randn(5, 4, 2, 2), torch.full((5, 4, 2, 2), 0.5)
    data = LatentData(latents, [f"p{i}" for i in range(5)], latent_std=std)
    torch.manual_seed(0)
    x0, prompts = data(64)
    torch.manual_seed(0)
    idx = torch.randint(5, (64,))
    noise = torch.randn_like(latents[idx])
    torch.testing.assert_close(x0, latents[idx] + 0.5 * noise)
    assert prompts == [f"p{i}" for i in idx.tolist()]
    assert LatentData(latents, "one for all")(3)[1] == ["one for all"] * 3
    with pytest.raises(ValueError, match="2 prompts for 5 latents"):
        LatentData(latents, ["a", "b"])


def test_a_latents_file_round_trips_and_a_bad_one_is_named_from_its_header(tmp_path):
    latents, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    path = write_latents_file(tmp_path / "l.safetensors", latents, std, ["a", "b", "c"])
    assert check_latents_file(path) == (3, ["a", "b", "c"])
    data = read_latents_file(path)
    assert torch.equal(data.latents, latents) and torch.equal(data.latent_std, std) and data.prompts == ["a", "b", "c"]
    assert read_latents_file(path, ["x"]).prompts == ["x"]  # given prompts win over the file's
    assert check_latents_file(write_latents_file(tmp_path / "bare.safetensors", latents)) == (3, None)

    atomic_save_file({"images": latents}, tmp_path / "other.safetensors")
    atomic_save_file({"latents": latents[0]}, tmp_path / "flat.safetensors")
    atomic_save_file({"latents": latents, "std": std[:2]}, tmp_path / "std.safetensors")
    atomic_save_file({"latents": latents}, tmp_path / "prompts.safetensors", {"prompts": ["a"]})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for name, message in [("other", "no 'latents' tensor"), ("flat", "must be a non-empty \\(N, C, H, W\\)"),
                          ("std", "'std' has shape"), ("prompts", "one prompt per latent \\(3\\)"),
                          ("junk", "not a readable safetensors file")]:
        with pytest.raises(FileFormatError, match=f"{name}.safetensors: .*{message}"):
            check_latents_file(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="no such latents file"):
        check_latents_file(tmp_path / "nowhere.safetensors")
    # what only reading finds: a prompt that is no string (failed in the tokenizer, unnamed), NaN or integer
    # latents (trained on, or cast), a scaling factor that is no number
    atomic_save_file({"latents": latents}, tmp_path / "numbers.safetensors", {"prompts": ["a", 7, None]})
    atomic_save_file({"latents": latents * float("nan")}, tmp_path / "nan.safetensors")
    atomic_save_file({"latents": latents.int()}, tmp_path / "int.safetensors")
    atomic_save_file({"latents": latents}, tmp_path / "scale.safetensors", {"vae_scaling_factor": "sdxl"})
    for name, message in [("numbers", "one prompt per latent \\(3\\), each a string"),
                          ("nan", "'latents' holds non-finite"), ("int", "'latents' holds dtype torch.int32"),
                          ("scale", "'vae_scaling_factor' is 'sdxl'")]:
        with pytest.raises(FileFormatError, match=f"{name}.safetensors: .*{message}"):
            read_latents_file(tmp_path / f"{name}.safetensors")


def test_image_folders_are_read_recursively_with_same_name_captions(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder.*image.png \\+ image.txt"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        read_image_folder(tmp_path / "empty")
    paths, captions = read_image_folder(images_folder(tmp_path / "images"))
    assert [p.name for p in paths] == ["a.png", "b.jpg", "c.png"] and captions == ["a bag", "", "a coat"]
    pixels = load_images(paths, 3, 32)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert load_images(paths[:1], 1, 16).shape == (1, 1, 16, 16)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        load_images(read_image_folder(tmp_path / "images")[0], 3, 32)


def test_encoding_is_the_vaes_posterior_times_its_scaling_factor(tiny_vae):
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    mean, std = encode_images(tiny_vae, images, batch_size=2)
    with torch.no_grad():
        posterior = tiny_vae.encode(images).latent_dist
    torch.testing.assert_close(mean, posterior.mean * tiny_vae.config.scaling_factor)
    torch.testing.assert_close(std, posterior.std * tiny_vae.config.scaling_factor)


def test_an_encoded_folder_is_cached_until_its_files_change(tiny_vae, tmp_path, monkeypatch):
    import direct_distill.training.data as data_module

    folder, cache = images_folder(tmp_path / "images"), tmp_path / "cache.safetensors"
    data = encode_image_folder(tiny_vae, folder, 32, cache)
    assert data.latents.shape == (3, 4, 16, 16) and data.prompts == ["a bag", "", "a coat"]
    assert check_latents_file(cache) == (3, ["a bag", "", "a coat"])
    pixels = load_images(read_image_folder(folder)[0], 3, 32)
    torch.testing.assert_close(data.latents, encode_images(tiny_vae, pixels)[0])

    monkeypatch.setattr(data_module, "load_images", pytest.fail)  # cached: nothing is read again
    assert torch.equal(encode_image_folder(tiny_vae, folder, 32, cache).latents, data.latents)
    monkeypatch.undo()
    (folder / "b.txt").write_text("a shoe")  # a caption changed: encoded again
    assert encode_image_folder(tiny_vae, folder, 32, cache).prompts == ["a bag", "a shoe", "a coat"]
    assert encode_image_folder(tiny_vae, folder, 16, cache).latents.shape == (3, 4, 8, 8)  # another size


def test_a_folder_is_encoded_a_few_images_per_vae_call(tiny_vae, tmp_path, monkeypatch):
    """distill --data encodes at the teacher's resolution: 64 images per VAE call would need about 20 GB at 512 px;
    it takes ENCODE_BATCH_SIZE (8), as `latents` does by default."""
    import shutil

    import direct_distill.training.data as data_module
    from direct_distill.training.latents import LatentsConfig

    folder = images_folder(tmp_path / "images")
    for k in range(17):  # 20 images in all
        shutil.copy(folder / "a.png", folder / f"copy{k}.png")
    calls = []
    encode = tiny_vae.encode
    monkeypatch.setattr(tiny_vae, "encode", lambda x: (calls.append(len(x)), encode(x))[1])
    assert len(encode_image_folder(tiny_vae, folder, 32).latents) == 20
    assert calls == [8, 8, 4] and data_module.ENCODE_BATCH_SIZE == 8 == LatentsConfig().batch_size


def test_an_image_folder_edited_in_place_is_another_input(tmp_path):
    """Its digest (what the work folder records) follows each image's bytes, not only its size."""
    import shutil

    from PIL import Image

    from direct_distill.training.data import DataSource
    from direct_distill.training.progressive import ProgressiveConfig
    from direct_distill.training.runner import input_contents

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("a bag")
    config = ProgressiveConfig(source=DataSource(data=folder))
    before = input_contents(config)
    assert list(before) == ["content of --data"] and input_contents(config) == before
    size = (folder / "a.png").stat().st_size
    shutil.copytree(folder, tmp_path / "copy")  # the same images elsewhere, newer files: the same input
    assert input_contents(ProgressiveConfig(source=DataSource(data=tmp_path / "copy"))) == before
    Image.new("RGB", (8, 8), (30, 20, 10)).save(folder / "a.png")  # other pixels, the same size in bytes
    assert (folder / "a.png").stat().st_size == size and input_contents(config) != before
