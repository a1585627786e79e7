"""The embedded digits dataset: real images, labels, scaling and resizing."""

import pytest
import torch

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
