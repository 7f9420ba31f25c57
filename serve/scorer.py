"""Scoring deployment: per-category Detectors multiplexed on a replica, requests batched per model.

The multiplexed model id is ``<category>@<version>`` (the ingress resolves ``latest``), so a newly
published version is a new id: it is loaded on first use and the old one ages out of the LRU.
Serve splits each ``@serve.batch`` batch by model id, so one call of ``_predict`` always holds
requests for one Detector and runs ``Detector.predict`` (the one scoring path) once for all.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

log = logging.getLogger("lasb.serve")

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.01


class ModelUnavailable(RuntimeError):
    """The model could not be loaded; ``reason`` is safe to show to the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self):  # crosses the Ray handle boundary
        return (type(self), (self.reason,))


def model_id(category: str, version: str) -> str:
    return f"{category}@{version}"


def split_model_id(mid: str) -> tuple[str, str]:
    category, _, version = mid.partition("@")
    return category, version


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    # >= max_batch_size, or batches never fill (Serve's default of 5 caps them at 5)
    max_ongoing_requests=64,
    user_config={"max_batch_size": DEFAULT_MAX_BATCH_SIZE,
                 "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S},
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5,
)
class Scorer:
    def __init__(self, registry: str, models_per_replica: int = 3, torch_threads: int = 0,
                 device: str | None = None):
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.registry = registry
        self.device = device
        # The LRU bound is a deployment argument, so the decorator is applied here, a pattern
        # Serve detects (`_callable_uses_multiplexing` inspects instance attributes). It wraps a
        # plain function: Serve keeps its cache as an attribute of it, which a bound method
        # cannot hold.
        async def load(mid: str):
            return await self._load(mid)

        self.get_model = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings from `user_config` (serve/config.yaml), changed without a restart."""
        size = int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        wait = float(user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S))
        if size < 1 or wait < 0:
            raise ValueError(f"bad batch settings: max_batch_size={size}, "
                             f"batch_wait_timeout_s={wait}")
        self._predict.set_max_batch_size(size)
        self._predict.set_batch_wait_timeout_s(wait)
        log.info("batching: max_batch_size=%d, batch_wait_timeout_s=%g", size, wait)

    async def _load(self, mid: str):
        from lasb.detector import Detector

        category, version = split_model_id(mid)
        try:
            # verifying hashes and building the networks takes a while: keep the loop free
            det = await asyncio.to_thread(Detector.load, self.registry, category, version,
                                          self.device)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported as 503
            log.warning("cannot load %s: %s", mid, exc)
            reason = str(exc).replace(self.registry.rstrip("/"), "<registry>")
            raise ModelUnavailable(f"model {mid} could not be loaded: {reason}") from None
        log.info("loaded %s on %s", mid, det.device)
        return det

    async def score(self, image: np.ndarray, return_maps: bool) -> dict:
        """One image for the model named by the request's multiplexed model id."""
        det = await self.get_model(serve.get_multiplexed_model_id())
        return await self._predict(det, image, return_maps)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _predict(self, dets: list, images: list[np.ndarray],
                       return_maps: list[bool]) -> list[dict]:
        det = dets[0]  # one model id per batch (Serve splits batches by model id)
        # in a thread: the event loop keeps queueing the next batch while this one runs
        results = await asyncio.to_thread(det.predict, images, any(return_maps))
        for r, want in zip(results, return_maps):
            r["batch_size"] = len(images)
            if not want:
                r.pop("anomaly_map", None)
                r.pop("pred_mask", None)
        return results

    async def ping(self) -> bool:
        return True
