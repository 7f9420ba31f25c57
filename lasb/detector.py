"""Detector: the one object that scores images, in tests, evaluation, batch jobs and serving.

predict(images) -> one dict per image in anomalib's vocabulary: pred_score in [0, 1] with 0.5 at
the calibrated threshold, pred_label, anomaly_map (normalised, input resolution), pred_mask,
raw_score, threshold, category, model_version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lasb import artifacts, bridge
from lasb.codec import Codec
from lasb.config import Config, ScoreConfig, config_from_yaml
from lasb.data import resize_image
from lasb.denoiser import Denoiser
from lasb.features import build_backbone, feature_distance, gaussian_smooth
from lasb.train import load_models, resolve_device, schedule_for, to_model_input

log = logging.getLogger(__name__)


@dataclass
class RawOutput:
    scores: np.ndarray  # (B,) raw image scores
    maps: np.ndarray  # (B, S, S) smoothed raw maps at the working resolution
    repaired: np.ndarray  # (B, S, S, 3) uint8, the bridge's repair of the input
    reference: np.ndarray  # (B, S, S, 3) uint8, what the repair is compared with


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def score_maps(backbone, reference: torch.Tensor, repaired: torch.Tensor,
               cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(image scores (B,), smoothed maps (B,H,W)) from the feature distance of two batches."""
    dist = feature_distance(backbone, reference, repaired)
    maps = gaussian_smooth(dist, cfg.score.sigma * cfg.data.image_size / 256)
    flat = maps.flatten(1)
    if cfg.score.image_score == "max":
        return flat.max(1).values, maps
    k = max(1, int(cfg.score.topk * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1), maps


def normalise(values: np.ndarray, threshold: float, vmin: float, vmax: float) -> np.ndarray:
    """anomalib's min-max normalisation: threshold -> 0.5, clipped to [0, 1]."""
    span = max(vmax - vmin, 1e-12)
    return np.clip((values - threshold) / span + 0.5, 0.0, 1.0)


class Detector:
    def __init__(self, cfg: Config, codec: Codec, denoiser: Denoiser,
                 calibration: dict | None = None, category: str = "", version: str = "",
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = resolve_device(device or "auto") if not isinstance(device, torch.device) \
            else device
        self.codec = codec.to(self.device).eval().requires_grad_(False)
        self.denoiser = denoiser.to(self.device).eval().requires_grad_(False)
        self.backbone = build_backbone(cfg.score.backbone, cfg.score.layers, cfg.data.image_size)
        if self.backbone is not None:
            self.backbone = self.backbone.to(self.device)
        self.sched = schedule_for(cfg)
        self.calibration = calibration
        self.category = category
        self.version = version

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, device=None, verify: bool = True, **kw) -> Detector:
        """Load a published artifact folder (hashes verified) or a training output folder."""
        folder = Path(folder)
        manifest = artifacts.verify(folder) if verify else {}
        cfg = config_from_yaml((folder / "config.yaml").read_text())
        codec, denoiser = load_models(folder, cfg)
        cal_path = folder / "calibration.json"
        calibration = json.loads(cal_path.read_text()) if cal_path.exists() else None
        kw.setdefault("category", manifest.get("category", ""))
        kw.setdefault("version", manifest.get("version", ""))
        return cls(cfg, codec, denoiser, calibration, device=device, **kw)

    @classmethod
    def load(cls, registry: str, category: str, version: str = "latest", device=None,
             cache_dir: str | None = None) -> Detector:
        folder, version = artifacts.fetch(registry, category, version, cache_dir)
        return cls.from_dir(folder, device=device, category=category, version=version)

    # -- scoring ---------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        size = self.cfg.data.image_size
        batch = np.stack([resize_image(im, size) for im in images])
        return to_model_input(torch.from_numpy(batch), self.device)

    def _noise_fn(self, batch_size: int):
        """Per-image generators: a score does not depend on what else is in the batch."""
        gens = [torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
                for _ in range(batch_size)]

        def noise(like: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.randn(like.shape[1:], generator=g, device=self.device,
                                            dtype=like.dtype) for g in gens])

        return noise

    @torch.no_grad()
    def repair(self, x: torch.Tensor, nfe: int | None = None, sampler: str | None = None,
               use_bridge: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction D(E(x)), repaired D(bridge(E(x)))) for x in [-1, 1]."""
        z1 = self.codec.encode(x)
        recon = self.codec.decode(z1)
        if not use_bridge:
            return recon, recon
        nfe = nfe or self.cfg.bridge.nfe
        sampler = sampler or self.cfg.bridge.sampler
        eps_fn = lambda x_n, n: self.denoiser(x_n, n, z1)
        z0 = bridge.sample(eps_fn, self.sched, z1, nfe, ot_ode=sampler == "ot_ode",
                           noise_fn=self._noise_fn(x.shape[0]))
        return recon, self.codec.decode(z0)

    @torch.no_grad()
    def raw(self, images: list[np.ndarray] | torch.Tensor, nfe: int | None = None,
            sampler: str | None = None, use_bridge: bool = True) -> RawOutput:
        """Raw smoothed maps and scores at the working resolution, in batches."""
        out: list[tuple] = []
        for x, recon, repaired in self.repairs(images, nfe, sampler, use_bridge):
            # codec-only baseline compares the input with its reconstruction
            reference = x if not use_bridge or self.cfg.score.compare == "input" else recon
            scores, maps = score_maps(self.backbone, reference, repaired, self.cfg)
            out.append((scores.cpu().numpy(), maps.cpu().numpy(), _to_uint8(repaired),
                        _to_uint8(reference)))
        cat = [np.concatenate([o[i] for o in out]) for i in range(4)]
        return RawOutput(*cat)

    def repairs(self, images: list[np.ndarray] | torch.Tensor, nfe: int | None = None,
                sampler: str | None = None, use_bridge: bool = True):
        """Yield (input, reconstruction, repaired) tensors batch by batch."""
        bs = self.cfg.score.batch_size
        for lo in range(0, len(images), bs):
            chunk = images[lo:lo + bs]
            x = chunk if isinstance(chunk, torch.Tensor) else self.preprocess(chunk)
            yield (x, *self.repair(x, nfe, sampler, use_bridge))

    def with_scoring(self, score: ScoreConfig) -> Detector:
        """The same models with other scoring settings (used by the pseudo-validation search)."""
        cfg = dataclasses.replace(self.cfg, score=score)
        return Detector(cfg, self.codec, self.denoiser, self.calibration, self.category,
                        self.version, self.device)

    def predict(self, images: list[np.ndarray], return_maps: bool = True) -> list[dict]:
        """Score decoded RGB uint8 images (any size); one response dict per image."""
        if self.calibration is None:
            raise RuntimeError("this detector is not calibrated: load a published artifact")
        if not images:
            return []
        cal = self.calibration
        raw = self.raw(images)
        scores = normalise(raw.scores, cal["threshold"], cal["score_min"], cal["score_max"])
        results = []
        for i, im in enumerate(images):
            r = {
                "pred_score": float(scores[i]),
                "pred_label": int(raw.scores[i] >= cal["threshold"]),
                "raw_score": float(raw.scores[i]),
                "threshold": float(cal["threshold"]),
                "category": self.category,
                "model_version": self.version,
            }
            if return_maps:
                h, w = im.shape[:2]
                m = F.interpolate(torch.from_numpy(raw.maps[i])[None, None], size=(h, w),
                                  mode="bilinear", align_corners=False)[0, 0].numpy()
                amap = normalise(m, cal["pixel_threshold"], cal["map_min"], cal["map_max"])
                r["anomaly_map"] = amap.astype(np.float32)
                r["pred_mask"] = amap >= 0.5
            results.append(r)
        return results
