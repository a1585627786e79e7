"""Datasets. The embedded default is scikit-learn's handwritten digits: 1,797 real 8x8 grey
images with labels 0-9, shipped inside the scikit-learn wheel (no download). For real data: an
image folder (one subfolder per class) and its VAE latents, encoded once and cached.

Images come as float32 (N, C, H, W) scaled to [-1, 1], labels as int64 (N,), in a
RecordedDataset: a TensorDataset with the fingerprint of what it was made from
(onestep_models.data_record), which a run records and compares when it resumes.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from onestep_kernels.errors import ArgumentError, DataError
from onestep_models.data_record import RecordedDataset, fingerprint_digest
from onestep_models.run_dir import file_sha256, temporary_for

DIGITS_CLASSES = 10


def digits(size: int = 8) -> RecordedDataset:
    """scikit-learn's digits as a TensorDataset of (image (1, size, size), label).

    Pixel values 0..16 map linearly to [-1, 1]; `size` other than 8 resizes bilinearly
    (antialiased when shrinking) and clamps back to [-1, 1]."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ArgumentError(f"size: expected a positive int, got {size!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < 8).clamp_(-1.0, 1.0)
    labels = torch.from_numpy(bunch.target).long()
    source = hashlib.sha256(np.ascontiguousarray(bunch.images).tobytes())
    source.update(np.ascontiguousarray(bunch.target).tobytes())
    fingerprint = {"kind": "digits", "settings": {"size": size},
                   "files": {"sklearn:digits": source.hexdigest()}}
    return RecordedDataset(images.contiguous(), labels, fingerprint=fingerprint)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _visible(path: Path) -> bool:
    """Not hidden: names starting with "." (.git, .ipynb_checkpoints, .DS_Store) are no class
    and no image."""
    return not path.name.startswith(".")


def _read_image(path: Path, size: int, channels: int, name: str) -> tuple[Tensor, str]:
    """One image, resized (shorter side) and centre-cropped to size x size, in [-1, 1], and the
    sha256 of the bytes decoded; a file PIL cannot decode is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    content = path.read_bytes()  # read once: decoded and digested from the same bytes
    try:
        with Image.open(io.BytesIO(content)) as img:
            img = img.convert("L" if channels == 1 else "RGB")  # (decodes: a truncation shows)
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)),
                              max(size, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: {path} is not a readable image ({type(err).__name__}: "
                        f"{err}); remove it, or pass --skip-bad-images") from None
    image = pixels.reshape(size, size, channels).permute(2, 0, 1) / 127.5 - 1.0
    return image, hashlib.sha256(content).hexdigest()


def image_folder(root: str | Path, size: int, channels: int = 3, *, skip_bad: bool = False,
                 name: str = "root") -> tuple[RecordedDataset, list[str]]:
    """Images under root/<class name>/*, one class per subfolder (sorted names → labels 0..K-1),
    resized (shorter side) and centre-cropped to size x size, scaled to [-1, 1]. Returns the
    dataset (held in memory) and the class names.

    Hidden entries (names starting with ".") are skipped, folders and files alike. A file with
    an image extension that cannot be decoded is a DataError naming it, or with `skip_bad`
    skipped and reported once on stderr with the count. `name`: what the errors call `root`
    (the command line's "--data"). The fingerprint lists every image read (its path under
    root) with the sha256 of its bytes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: no such image folder: {root}")
    if channels not in (1, 3):
        raise ArgumentError(f"channels: expected 1 or 3, got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"{name}: {root} has no class subfolders (expected "
                        f"{name}/<class>/<image>)")
    images, labels, skipped, files = [], [], [], {}
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if not _visible(path) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                image, files[f"{cls}/{path.name}"] = _read_image(path, size, channels, name)
            except DataError:
                if not skip_bad:
                    raise
                skipped.append(path)
                continue
            images.append(image)
            labels.append(label)
    if skipped:
        print(f"{name}: skipped {len(skipped)} unreadable image(s) (first: {skipped[0]})",
              file=sys.stderr)
    if not images:
        raise DataError(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    fingerprint = {"kind": "folder",
                   "settings": {"size": size, "channels": channels, "skip_bad_images": skip_bad,
                                "vae": None},
                   "files": files}
    return (RecordedDataset(torch.stack(images), torch.tensor(labels), fingerprint=fingerprint),
            classes)


VAE_SCALE = 0.18215  # Stable Diffusion's latent scale, as in DiT and the Direct Models paper


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from a local directory (config.json + weights); no download."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vae: no AutoencoderKL at {path} (expected a directory with "
                                f"config.json and weights, e.g. a local sd-vae-ft-mse)")
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()


def vae_digest(path: str | Path) -> str:
    """The sha256 of a VAE directory: every file's name and content (config and weights)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"vae: no such directory: {path}")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _visible(p)):
        digest.update(f"{file.relative_to(path)}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _images_digest(images: TensorDataset) -> str:
    """The digest a latent cache is keyed on: the images' fingerprint when they carry one, or
    else their tensors' bytes."""
    if isinstance(images, RecordedDataset):
        return fingerprint_digest(images.fingerprint)
    digest = hashlib.sha256()
    for t in images.tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def vae_latents(images: TensorDataset, vae_path: str | Path, cache: str | Path,
                batch_size: int = 32, device: str | torch.device = "cpu") -> RecordedDataset:
    """Encode images ([-1, 1], 3 channels) once through the VAE: latents = mean of the
    posterior x 0.18215 (the mean, not a sample, so the cache is deterministic), cached as
    safetensors at `cache`, keyed on the images' fingerprint and the VAE's digest (replaced
    images or other VAE weights encode again). The result's fingerprint is the images' with
    the VAE's digest in its settings."""
    from safetensors.torch import load_file, save_file

    cache = Path(cache)
    x, *rest = images.tensors
    vae_sha256 = vae_digest(vae_path)
    key = {"data": _images_digest(images), "vae": vae_sha256}
    fingerprint = (images.fingerprint if isinstance(images, RecordedDataset)
                   else {"kind": "tensors", "settings": {}, "files": {"images": key["data"]}})
    fingerprint = {**fingerprint, "settings": {**fingerprint["settings"], "vae": vae_sha256}}
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if f.metadata() == key:
                loaded = load_file(str(cache))
                tensors = [loaded["latents"]] + ([loaded["labels"]] if "labels" in loaded else [])
                return RecordedDataset(*tensors, fingerprint=fingerprint)
    vae = load_vae(vae_path).to(device)
    latents = torch.cat([vae.encode(x[i:i + batch_size].to(device)).latent_dist.mean.cpu()
                         for i in range(0, len(x), batch_size)]) * VAE_SCALE
    tensors = {"latents": latents.float().contiguous()}
    if rest:
        tensors["labels"] = rest[0].contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(cache)  # (under torchrun every process encodes and writes the cache)
    save_file(tensors, str(tmp), metadata=key)
    tmp.replace(cache)
    return RecordedDataset(*tensors.values(), fingerprint=fingerprint)


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, batch_size: int = 32) -> torch.Tensor:
    """Latents (x 0.18215) back to images in [-1, 1]."""
    out = [vae.decode(latents[i:i + batch_size] / VAE_SCALE).sample.clamp(-1, 1)
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out)
