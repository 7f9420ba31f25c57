"""Latent codec (stage 1): diffusers AutoencoderKL or VQModel with a measured latent scale.

Images enter as float tensors in [-1, 1], (B, 3, H, W). `encode` returns latents multiplied by
the model's `scaling_factor`, measured on training data so that latents have unit std: the
bridge's largest std is ~0.19, so unscaled latents would see almost no noise.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn
from torch.nn import functional as F

from lasb import storage
from lasb.config import CodecConfig


def build_codec_model(cfg: CodecConfig) -> nn.Module:
    n = len(cfg.block_out_channels)
    common = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "mid_block_add_attention": False,  # attention over the full latent grid is costly on CPU
        "scaling_factor": 1.0,
    }
    if cfg.kind == "vq":
        return VQModel(num_vq_embeddings=cfg.num_vq_embeddings, **common)
    return AutoencoderKL(**common)


class Codec(nn.Module):
    """Encoder/decoder pair with the latent scale; one interface for KL and VQ models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_vq = isinstance(model, VQModel)

    @property
    def scale(self) -> float:
        return float(self.model.config.scaling_factor)

    def set_scale(self, scale: float) -> None:
        self.model.register_to_config(scaling_factor=float(scale))

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_vq:
            return self.model.encode(x).latents  # pre-quantisation; decode() quantises
        return self.model.encode(x).latent_dist.mode()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_raw(x) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z / self.scale).sample

    def forward(self, x: torch.Tensor, perceptual=None, perceptual_weight: float = 0.0,
                kl_weight: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss: reconstruction L1 (+ feature loss) + KL or VQ commitment.
        It is the forward pass so that DDP synchronises its gradients."""
        if self.is_vq:
            h = self.model.encode(x).latents
            out = self.model.decode(h)
            recon, reg = out.sample, out.commit_loss.mean()
        else:
            post = self.model.encode(x).latent_dist
            recon = self.model.decode(post.sample()).sample
            reg = kl_weight * post.kl().mean()
        l1 = F.l1_loss(recon, x)
        total = l1 + reg
        logs = {"l1": float(l1.detach())}
        if perceptual is not None and perceptual_weight > 0:
            p = perceptual(recon, x)
            total = total + perceptual_weight * p
            logs["perceptual"] = float(p.detach())
        return total, logs


def build_codec(cfg: CodecConfig) -> Codec:
    return Codec(build_codec_model(cfg))


def load_codec(folder: str, kind: str) -> Codec:
    """Load from a folder (local or s3://) in diffusers save_pretrained layout (safetensors)."""
    if not storage.is_local(folder):  # from_pretrained reads local files: copy the folder first
        fs, path = storage.filesystem(folder)
        local = tempfile.mkdtemp(prefix="lasb-codec-")
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        folder = local
    cls = VQModel if kind == "vq" else AutoencoderKL
    return Codec(cls.from_pretrained(folder, use_safetensors=True))


@torch.no_grad()
def measure_scale(codec: Codec, batches) -> float:
    """1 / std of raw latents over some training batches (diffusers' scaling_factor)."""
    values = [codec.encode_raw(x).flatten() for x in batches]
    std = torch.cat(values).std().item()
    if not std > 0:
        raise RuntimeError("codec latents have zero variance; stage 1 training failed")
    return 1.0 / std
