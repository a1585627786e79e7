"""LPIPS(VGG) (Zhang et al., 2018), a perceptual distance, for SlimFlow's distillation:
VGG16's features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, each unit-normalised
over channels, their squared differences weighted per channel by non-negative 1x1 "lin"
layers, averaged over space and summed over the five layers.

Weights come from two local files, never downloaded: torchvision's VGG16 state dict
(`vgg16-397923af.pth`, keys features.N.weight/bias) and the lpips package's linear heads
(`vgg.pth` of LPIPS v0.1, keys linK.model.1.weight). None exists on the development machines,
so this module is tested with random weights (structure, the distance's properties, gradients)
and the SlimFlow demo uses pseudo-Huber instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep_kernels.errors import ArgumentError

# VGG16's convolutional layers, "M" a 2x2 max-pool; LPIPS taps the ReLU after the last conv
# of each block.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: inputs in [-1, 1] moved to VGG's ImageNet normalisation
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS(VGG) distance: forward(a, b) -> (B,) for images in [-1, 1] with 1 or 3 channels,
    resized to `size` (VGG pools four times: digits of 8 pixels would vanish)."""

    def __init__(self, size: int = 64):
        super().__init__()
        layers, channels = [], 3
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAPS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.size = size
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, vgg: str | Path, lins: str | Path, size: int = 64) -> "LPIPS":
        """From torchvision's VGG16 state dict and lpips' vgg.pth (local paths)."""
        from onestep_models.run_dir import CheckpointError, load_into

        model = cls(size)
        for path, prefix, target in ((vgg, "features.", model.features),
                                     (lins, "lin", None)):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
                raise CheckpointError(f"{path}: not a weights file ({type(err).__name__})") \
                    from None
            if target is not None:
                tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                load_into(target, tensors, Path(path))
            else:  # lpips names them linK.model.1.weight
                tensors = {f"{k[3]}.weight": v for k, v in state.items()
                           if k.startswith("lin") and k.endswith(".weight")}
                load_into(model.lins, tensors, Path(path))
        return model.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, taps, seen = x, [], 0
        for layer in self.features:
            out = layer(out)
            if isinstance(layer, nn.ReLU):
                seen += 1
                if seen in (2, 4, 7, 10, 13):  # relu1_2, 2_2, 3_3, 4_3, 5_3
                    taps.append(out)
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] not in (1, 3):
            raise ArgumentError(f"a, b: expected two (B, 1 or 3, H, W) images of one shape, got "
                                f"{tuple(a.shape)} and {tuple(b.shape)}")
        both = torch.cat([a, b]).float()
        if both.shape[1] == 1:
            both = both.expand(-1, 3, -1, -1)
        both = F.interpolate(both, size=(self.size, self.size), mode="bilinear",
                             align_corners=False)
        both = (both - self.shift) / self.scale
        total = 0.0
        for tap, lin in zip(self._taps(both), self.lins):
            fa, fb = (f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in tap.chunk(2))
            total = total + lin((fa - fb).square()).mean((1, 2, 3))
        return total
