"""Datasets. The embedded default is scikit-learn's handwritten digits: 1,797 real 8x8 grey
images with labels 0-9, shipped inside the scikit-learn wheel (no download).

Images come as float32 (N, C, H, W) scaled to [-1, 1], labels as int64 (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

DIGITS_CLASSES = 10


def digits(size: int = 8) -> TensorDataset:
    """scikit-learn's digits as a TensorDataset of (image (1, size, size), label).

    Pixel values 0..16 map linearly to [-1, 1]; `size` other than 8 resizes bilinearly
    (antialiased when shrinking) and clamps back to [-1, 1]."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < 8).clamp_(-1.0, 1.0)
    labels = torch.from_numpy(bunch.target).long()
    return TensorDataset(images.contiguous(), labels)
