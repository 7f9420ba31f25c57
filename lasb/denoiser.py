"""Stage-2 network: diffusers UNet2DModel on the latent, time input n = bridge step index."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

from lasb.config import DenoiserConfig


def build_unet(cfg: DenoiserConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:  # attention only at the coarsest level, where the grid is small
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels * (2 if cfg.cond_x1 else 1),
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
    )


class Denoiser(nn.Module):
    """eps(x_n, n[, x1]) -> (x_n - x0) / sigma_n."""

    def __init__(self, unet: UNet2DModel, cond_x1: bool = False):
        super().__init__()
        self.unet = unet
        self.cond_x1 = cond_x1

    def forward(self, x_n: torch.Tensor, n: torch.Tensor, x1: torch.Tensor | None = None):
        inp = torch.cat([x_n, x1], dim=1) if self.cond_x1 else x_n
        return self.unet(inp, n).sample


def build_denoiser(cfg: DenoiserConfig, latent_channels: int, latent_size: int) -> Denoiser:
    return Denoiser(build_unet(cfg, latent_channels, latent_size), cfg.cond_x1)


def load_denoiser(folder: str, cond_x1: bool) -> Denoiser:
    return Denoiser(UNet2DModel.from_pretrained(folder, use_safetensors=True), cond_x1)
