"""Hyperparameter search pieces that need no Ray (jobs/tune.py runs the search on Ray Tune).

- The search space: a YAML file mapping dotted config keys to distributions, e.g.
  ``bridge.beta_max: {loguniform: [0.1, 1.5]}``. Any key of `lasb.config.Config` may appear;
  each trial applies its values as overrides on the base config, so new keys need no code.
- The honest objective: a fixed pseudo-validation set per category, held-out normal training
  images plus synthetic defects made with a different anomaly source and seed than training.
- Accuracy against cost: the Pareto front (maximise AUROC, minimise ms per image) and a plot.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lasb.augment import AugmentConfig, perlin_noise
from lasb.config import Config, ConfigError, _merge, from_dict

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "jobs" / "search_space.yaml"

# distribution name -> number of arguments (None: any number of choices)
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "int": 2, "logint": 2,
                 "choice": None}

# The pseudo-validation set is fixed per category (so trials are comparable): keys that would
# change which images it holds, or their resolution, cannot be searched.
FIXED_KEYS = {
    "data.holdout_fraction": "it decides which training images are held out for validation",
    "data.image_size": "the validation set is fixed per category; tune one resolution per run "
                       "(pass data.image_size=... as an override)",
}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    key: str  # dotted config key, e.g. "bridge.beta_max"
    kind: str  # one of DISTRIBUTIONS, or "fixed"
    args: tuple
    encoded: bool = False  # choice values are lists/mappings, passed to searchers as YAML text

    def describe(self) -> str:
        return f"{self.key}: {self.kind}{list(self.args)}"


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _check_value(key: str, value: Any) -> None:
    """Raise ConfigError if `key` is not a config key or `value` has the wrong type for it."""
    _merge(Config(), _nested(key, value), prefix="")


def encode_choice(value: Any) -> Any:
    """Searchers (Optuna) take scalar categories only: lists/mappings travel as YAML text."""
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=True).strip()
    return value


def parse_space(raw: dict | None, source: str = "search space") -> dict[str, Dimension]:
    """Validate a search-space mapping {dotted key: {distribution: args} | fixed value}."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must be a non-empty mapping of config keys to distributions")
    space: dict[str, Dimension] = {}
    for key, spec in raw.items():
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"{source}: key {key!r} must be a dotted config key like "
                              "bridge.beta_max")
        if key in FIXED_KEYS:
            raise ConfigError(f"{source}: {key} cannot be searched: {FIXED_KEYS[key]}")
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
            kind, args = next(iter(spec.items()))
            if not isinstance(args, (list, tuple)) or not args:
                raise ConfigError(f"{source}: {key}: {kind} needs a list of arguments")
            args = tuple(args)
            want = DISTRIBUTIONS[kind]
            if want is not None and len(args) != want:
                raise ConfigError(f"{source}: {key}: {kind} takes {want} arguments, got "
                                  f"{list(args)}")
            if kind == "choice":
                for v in args:
                    _check_value(key, v)
                encoded = any(isinstance(v, (list, tuple, dict)) for v in args)
                space[key] = Dimension(key, kind, args, encoded)
                continue
            lo, hi = args[0], args[1]
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{source}: {key}: {kind} bounds must be numbers, got "
                                  f"{list(args)}")
            if not lo < hi:
                raise ConfigError(f"{source}: {key}: {kind} needs low < high, got {list(args)}")
            if kind in ("loguniform", "logint") and lo <= 0:
                raise ConfigError(f"{source}: {key}: {kind} needs a positive lower bound")
            if kind in ("int", "logint") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{source}: {key}: {kind} bounds must be integers")
            _check_value(key, lo)
            _check_value(key, hi)
            space[key] = Dimension(key, kind, args)
        elif isinstance(spec, dict) and any(k in DISTRIBUTIONS for k in spec):
            raise ConfigError(f"{source}: {key}: give exactly one distribution, got {spec}")
        else:  # a fixed value: applied to every trial, like a command-line override
            _check_value(key, spec)
            space[key] = Dimension(key, "fixed", (spec,))
    return space


def load_space(path: str | Path | None = None) -> tuple[dict[str, Dimension], dict]:
    """(validated space, raw mapping) from a YAML file (default: jobs/search_space.yaml)."""
    path = Path(path) if path else DEFAULT_SPACE
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"search space file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space file {path} is not valid YAML: {exc}") from exc
    return parse_space(raw, str(path)), raw


def decode_value(dim: Dimension, value: Any) -> Any:
    if dim.encoded and isinstance(value, str):
        return yaml.safe_load(value)
    if (isinstance(value, float) and value.is_integer() and dim.kind != "choice"
            and all(isinstance(a, int) for a in dim.args)):  # int, logint, integer quniform
        return int(value)
    return value


def trial_config(base: Config, space: dict[str, Dimension], params: dict) -> Config:
    """The base config with a trial's sampled values (and the space's fixed values) applied."""
    data: dict = {}
    for key, dim in space.items():
        value = dim.args[0] if dim.kind == "fixed" else decode_value(dim, params[key])
        if isinstance(value, np.generic):
            value = value.item()
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(data, base)


def decoded_params(space: dict[str, Dimension], params: dict) -> dict[str, Any]:
    """A trial's sampled values as config values (lists for encoded choices)."""
    return {k: decode_value(space[k], v) for k, v in params.items() if k in space}


# --------------------------------------------------------------------------- validation set


def procedural_textures(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Synthetic texture images (coloured Perlin noise, stripes, checkers), deterministic.

    The anomaly source for pseudo-validation defects when training paints defects with the
    image's own texture: validation defects then come from a different source.
    """
    rng = np.random.default_rng([seed, 7])
    out = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    for i in range(n):
        kind = i % 3
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == 0:
            res = int(2 ** rng.integers(1, 4))
            t = np.stack([perlin_noise((size, size), (res, res), rng) for _ in range(3)], -1)
            img = 127.5 + 110 * np.clip(t, -1, 1)
        elif kind == 1:
            angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 12)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle)
                                                          + yy * math.sin(angle)))
            img = c0 * t[..., None] + c1 * (1 - t[..., None])
        else:
            cells = int(rng.integers(2, 9))
            t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)[..., None]
            img = c0 * t + c1 * (1 - t)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def validation_set(holdout: np.ndarray, seed: int, augment: AugmentConfig, source=None):
    """(images, labels, masks): held-out normals + one synthetic defect each (lasb.calibrate)."""
    from lasb.calibrate import pseudo_validation_set

    return pseudo_validation_set(holdout, seed, augment, source)


def probe_indices(labels: np.ndarray, k: int) -> np.ndarray:
    """The first k normals and the first k defects: a cheap fixed subset for progress reports."""
    normals = np.flatnonzero(labels == 0)[:k]
    defects = np.flatnonzero(labels == 1)[:k]
    return np.concatenate([normals, defects])


# --------------------------------------------------------------------------- accuracy vs cost


def pareto_front(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated points (maximise accuracy, minimise cost).

    A point is dominated if another is at least as accurate and at least as cheap, and
    strictly better in one of the two. NaN points are never on the front.
    """
    acc = np.asarray(accuracy, dtype=float)
    cst = np.asarray(cost, dtype=float)
    ok = np.isfinite(acc) & np.isfinite(cst)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        better_eq = ok & (acc >= acc[i]) & (cst <= cst[i])
        strictly = (acc > acc[i]) | (cst < cst[i])
        if np.any(better_eq & strictly):
            front[i] = False
    return front


def budget_objective(auroc: float, ms_per_image: float, budget_ms: float | None) -> float:
    """Single-objective score: AUROC within the budget; over it, -(ms / budget) < -1, so every
    trial within budget ranks above every trial over it (and closer to budget ranks higher)."""
    if budget_ms is None or ms_per_image <= budget_ms:
        return float(auroc)
    return -float(ms_per_image) / float(budget_ms)


def plot_pareto(rows: list[dict], path: str | Path, metric: str, title: str,
                budget_ms: float | None = None) -> Path:
    """Scatter of every finished trial (accuracy vs ms/image), the front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    done = [r for r in rows if r.get("completed")]
    stopped = [r for r in rows if not r.get("completed") and r.get(metric) is not None]
    if stopped:
        ax.scatter([r["ms_per_image"] for r in stopped], [r[metric] for r in stopped],
                   marker="x", c="0.6", label="stopped early (probe subset)")
    if done:
        ax.scatter([r["ms_per_image"] for r in done], [r[metric] for r in done], c="tab:blue",
                   label="completed")
        front = sorted((r for r in done if r.get("pareto")), key=lambda r: r["ms_per_image"])
        if front:
            ax.plot([r["ms_per_image"] for r in front], [r[metric] for r in front], "-o",
                    c="tab:red", label="Pareto front")
        for r in done:
            ax.annotate(f"nfe {r.get('nfe', '?')}", (r["ms_per_image"], r[metric]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    if budget_ms is not None:
        ax.axvline(budget_ms, ls="--", c="0.4", label=f"budget {budget_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("scoring cost, ms per image (measured)")
    ax.set_ylabel(f"pseudo-validation {metric.removeprefix('pv_')}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
