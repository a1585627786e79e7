"""Datasets: the embedded digits (real images, labels, scaling, resizing), image folders and
cached VAE latents (a small randomly initialised AutoencoderKL)."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from onestep_models.data import DIGITS_CLASSES, digits


def test_digits_are_the_real_scikit_learn_images():
    images, labels = digits().tensors
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(DIGITS_CLASSES))
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    # the first sample of load_digits is a zero: its centre column is dark, its sides bright
    assert labels[0].item() == 0
    zero = images[0, 0]
    assert zero[3:5, 3:5].mean() < zero[1:7, 1].mean()


def test_resize_keeps_range_and_labels():
    images, labels = digits(size=16).tensors
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(labels, digits().tensors[1])


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size:"):
        digits(size)


def test_image_folder(tmp_path):
    from PIL import Image

    from onestep_models.data import image_folder

    rng = np.random.default_rng(0)
    for name, count in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    dataset, classes = image_folder(tmp_path, 8)
    images, labels = dataset.tensors
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1, 1]
    assert images.shape == (5, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    grey, _ = image_folder(tmp_path, 4, channels=1)
    assert grey.tensors[0].shape == (5, 1, 4, 4)
    with pytest.raises(ValueError, match="^root: no such image folder"):
        image_folder(tmp_path / "missing", 8)


def _folder(root, classes=("cat", "dog"), count=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_hidden_folders_and_files_are_no_classes_and_no_images(tmp_path):
    """A notebook's .ipynb_checkpoints/ (with an image in it), an empty .git/ and macOS's ._
    files are skipped: the labels are the real classes' (on the parent commit
    .ipynb_checkpoints became class 0 and every label moved by one)."""
    import shutil

    from onestep_models.data import image_folder

    root = _folder(tmp_path / "data")
    (root / ".git").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "cat" / "0.png", root / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "dog" / "._1.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    dataset, classes = image_folder(root, 8)
    assert classes == ["cat", "dog"]
    assert dataset.tensors[1].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_an_unreadable_image_is_refused_by_name_or_skipped(tmp_path, capsys, damage):
    """A truncated PNG, a zero-byte one and a text file named .png: a DataError (exit 2 on the
    command line) naming the file and --data (on the parent commit: PIL's OSError traceback,
    no file named); with skip_bad, skipped and counted on stderr."""
    from onestep_models.data import image_folder

    root = _folder(tmp_path / "data")
    bad = root / "dog" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("not an image at all")
    with pytest.raises(ValueError, match=f"^--data: {bad} is not a readable image"):
        image_folder(root, 8, name="--data")
    dataset, classes = image_folder(root, 8, skip_bad=True, name="--data")
    assert dataset.tensors[1].tolist() == [0, 0, 1]
    assert f"--data: skipped 1 unreadable image(s) (first: {bad})" in capsys.readouterr().err


def test_the_command_line_names_the_bad_image_in_one_line(tmp_path, capsys):
    from onestep_models import cli

    root = _folder(tmp_path / "data")
    (root / "cat" / "1.png").write_bytes(b"")
    args = ["train", "direct", "--data", str(root), "--size", "8", "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data: " in err and "1.png is not a readable" in err
    assert cli.main([*args, "--skip-bad-images", "--checkpoint-every", "1"]) == 0
    assert "--data: skipped 1 unreadable image(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_vae_latents_cached(tmp_path, monkeypatch):
    """The cache is reused while the images and the VAE are the same, and encoded again when
    either changes (on the parent commit it was keyed on the VAE's path and the image count:
    replaced images of the same count reused stale latents)."""
    from diffusers import AutoencoderKL

    from onestep_models import data
    from onestep_models.data import VAE_SCALE, decode_latents, load_vae, vae_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    dataset = TensorDataset(images, torch.arange(5))
    cache = tmp_path / "latents.safetensors"
    latents = vae_latents(dataset, tmp_path / "vae", cache, batch_size=2)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * VAE_SCALE
    torch.testing.assert_close(latents.tensors[0], expected, rtol=1e-4, atol=1e-5)
    assert latents.tensors[1].tolist() == list(range(5)) and cache.is_file()
    assert latents.fingerprint["settings"]["vae"] == data.vae_digest(tmp_path / "vae")
    # the second call reads the cache: the VAE is not loaded
    encoded = []
    monkeypatch.setattr(data, "load_vae", lambda path: encoded.append(path) or load_vae(path))
    again = vae_latents(dataset, tmp_path / "vae", cache)
    assert torch.equal(again.tensors[0], latents.tensors[0]) and encoded == []
    # the same count of other images: encoded again
    other = TensorDataset(images.flip(0), torch.arange(5))
    flipped = vae_latents(other, tmp_path / "vae", cache)
    assert len(encoded) == 1
    torch.testing.assert_close(flipped.tensors[0], expected.flip(0), rtol=1e-4, atol=1e-5)
    # other VAE weights (same path, same config): encoded again
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.5)
    vae.save_pretrained(tmp_path / "vae")
    vae_latents(other, tmp_path / "vae", cache)
    assert len(encoded) == 2
    decoded = decode_latents(latents.tensors[0], load_vae(tmp_path / "vae"))
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    with pytest.raises(FileNotFoundError, match="vae"):
        load_vae(tmp_path / "missing")
