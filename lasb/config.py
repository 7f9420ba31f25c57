"""Typed configuration: dataclasses with working defaults, YAML round trip, key=value overrides.

Presets: `tiny` (tests, seconds), `cpu` (this 2-core machine, minutes), `paper` (GPU, the
paper's sizes: 256 px, VQ f4 latent 64x64x3, N = 1000, NFE 10).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lasb.augment import AugmentConfig


@dataclass
class DataConfig:
    image_size: int = 128  # square working resolution; maps are resized back to the input size
    holdout_fraction: float = 0.15  # normal training images kept out of training for calibration
    anomaly_source: str | None = None  # texture folder for DRAEM (e.g. DTD); None = the image itself
    max_pixels: int = 64_000_000  # decompression-bomb guard


@dataclass
class CodecConfig:
    kind: str = "kl"  # "kl" (AutoencoderKL) or "vq" (VQModel)
    pretrained: str | None = None  # folder (local or s3://) in save_pretrained layout: skip stage 1
    block_out_channels: tuple[int, ...] = (16, 32, 32)  # len-1 downsamplings: 3 blocks = factor 4
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_vq_embeddings: int = 512
    steps: int = 200  # stage 1 is trained on the defective stream x1 (half of it is clean)
    lr: float = 1e-3
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.01  # feature loss with the scoring backbone keeps edges sharp


@dataclass
class BridgeConfig:
    n_steps: int = 1000  # N
    beta_max: float = 0.3
    schedule: str = "symmetric"  # symmetric | linear | cosine
    sampler: str = "stochastic"  # stochastic | ot_ode
    nfe: int = 10  # network calls at inference


@dataclass
class DenoiserConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = True  # self-attention in the lowest-resolution block
    norm_num_groups: int = 32
    cond_x1: bool = False  # also feed x1 to the network (I2SB option)
    steps: int = 800
    lr: float = 5e-4
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
    batch_size: int = 16  # per worker
    seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    torch_threads: int = 2  # per worker; 0 = int(cpus_per_worker). 2 suits a 2-core laptop
    gpus_per_worker: float = 0.0  # > 0 requests GPUs from Ray; the device is chosen automatically
    log_every: int = 50
    data_concurrency: int = 1  # Ray Data tasks making synthetic-defect pairs
    checkpoint_every: int = 200  # steps between resumable checkpoints (0 = only the final one)
    keep_checkpoints: int = 2  # Ray Train CheckpointConfig(num_to_keep)
    max_failures: int = 2  # Ray Train FailureConfig: worker restarts before the run fails
    mixed_precision: bool = True  # fp16 autocast + GradScaler, used on CUDA only


@dataclass
class ScoreConfig:
    backbone: str = "efficientnet-lite0"  # or "pixel" (fallback: colour difference)
    layers: tuple[int, ...] = (2, 4, 7)  # MBConv block indices: strides 4, 8, 16
    compare: str = "reconstruction"  # "reconstruction": D(E(x)) vs repaired; "input": x vs repaired
    sigma: float = 4.0  # Gaussian smoothing in pixels at 256 px (scaled with image_size)
    image_score: str = "max"  # "max" or "topk" (mean of the top `topk` fraction of the map)
    topk: float = 0.01
    select: bool = True  # choose layers/compare/image_score on pseudo-validation after training
    calibration_seed: int = 12345  # synthetic defects for calibration differ from training's
    batch_size: int = 16


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> Config:
        _check(self.codec.kind in ("kl", "vq"), "codec.kind", self.codec.kind, "'kl' or 'vq'")
        _check(self.bridge.sampler in ("stochastic", "ot_ode"), "bridge.sampler",
               self.bridge.sampler, "'stochastic' or 'ot_ode'")
        _check(self.bridge.schedule in ("symmetric", "linear", "cosine"), "bridge.schedule",
               self.bridge.schedule, "symmetric, linear or cosine")
        _check(1 <= self.bridge.nfe < self.bridge.n_steps, "bridge.nfe", self.bridge.nfe,
               f"between 1 and bridge.n_steps-1 ({self.bridge.n_steps - 1})")
        _check(self.bridge.beta_max > 0, "bridge.beta_max", self.bridge.beta_max, "> 0")
        _check(self.score.compare in ("reconstruction", "input"), "score.compare",
               self.score.compare, "'reconstruction' or 'input'")
        _check(self.score.image_score in ("max", "topk"), "score.image_score",
               self.score.image_score, "'max' or 'topk'")
        factor = 2 ** (len(self.codec.block_out_channels) - 1)
        _check(self.data.image_size % (factor * 4) == 0, "data.image_size", self.data.image_size,
               f"a multiple of {factor * 4} (codec factor {factor} x UNet downsampling 4)")
        _check(0 < self.data.holdout_fraction < 1, "data.holdout_fraction",
               self.data.holdout_fraction, "in (0, 1)")
        for name in ("codec.norm_num_groups", "denoiser.norm_num_groups"):
            section, _ = name.split(".")
            groups = getattr(self, section).norm_num_groups
            for ch in getattr(self, section).block_out_channels:
                _check(ch % groups == 0, f"{section}.block_out_channels", ch,
                       f"divisible by {name}={groups}")
        _check(self.train.batch_size >= 1 and self.train.workers >= 1, "train.batch_size/workers",
               (self.train.batch_size, self.train.workers), ">= 1")
        for key in ("checkpoint_every", "max_failures"):
            _check(getattr(self.train, key) >= 0, f"train.{key}", getattr(self.train, key), ">= 0")
        _check(self.train.keep_checkpoints >= 1, "train.keep_checkpoints",
               self.train.keep_checkpoints, ">= 1")
        return self

    @property
    def latent_size(self) -> int:
        return self.data.image_size // 2 ** (len(self.codec.block_out_channels) - 1)


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it."""


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config {key}={value!r}: expected {expected}")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"image_size": 32, "holdout_fraction": 0.25},
        "codec": {"block_out_channels": (16, 16), "latent_channels": 4, "steps": 40,
                  "perceptual_weight": 0.0},
        "bridge": {"n_steps": 100, "nfe": 2},
        "denoiser": {"block_out_channels": (32, 32), "attention": False, "steps": 60,
                     "lr": 1e-3, "ema_decay": 0.9},
        "train": {"batch_size": 8, "log_every": 20, "torch_threads": 1},
        "score": {"layers": (2, 4), "batch_size": 8},
    },
    "cpu": {},  # the dataclass defaults are sized for this 2-core machine
    "paper": {
        "data": {"image_size": 256},
        "codec": {"kind": "vq", "block_out_channels": (128, 256, 256), "latent_channels": 3,
                  "layers_per_block": 2, "norm_num_groups": 32, "steps": 40_000, "lr": 1e-4},
        "bridge": {"n_steps": 1000, "beta_max": 0.3, "nfe": 10},
        "denoiser": {"block_out_channels": (128, 256, 256, 512), "layers_per_block": 2,
                     "steps": 200_000, "lr": 1e-4, "ema_decay": 0.9999},
        "train": {"batch_size": 32, "gpus_per_worker": 1.0, "cpus_per_worker": 4.0,
                  "torch_threads": 0, "data_concurrency": 4},
        "score": {"batch_size": 32},
    },
}


def from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from a (partial) nested dict on top of `base` (default: dataclass defaults)."""
    cfg = base if base is not None else Config()
    return _merge(cfg, data or {}, prefix="").validate()


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    updates = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix}{key}; known keys: {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value, prefix=f"{prefix}{key}.")
        else:
            updates[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return dataclasses.replace(obj, **updates)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if value is None and type(None) in args:
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid config {key}={value!r}: expected a list")
        return tuple(_coerce(v, args[0], key) for v in value)
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif target is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"invalid config {key}={value!r}: expected {target.__name__}")


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> dict[str, Any]:
    """'bridge.nfe=4' -> {'bridge': {'nfe': 4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    parts = path.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _deep_update(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v
    return a


def load_config(
    preset: str = "cpu", path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> Config:
    """Preset, then a YAML file, then key=value overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data: dict[str, Any] = {}
    _deep_update(data, _copy(PRESETS[preset]))
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        _deep_update(data, loaded)
    for item in overrides:
        _deep_update(data, parse_override(item))
    return from_dict(data)


def _copy(d: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml(text: str) -> Config:
    return from_dict(yaml.safe_load(text) or {})
