"""Ray setup shared by the jobs: local Ray when no cluster is given, quiet and offline."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Measured traps on small machines (see README, "Ray on a laptop"): no usage stats, no 30-min
# silent stall of a starved Data pipeline, no duplicated worker prints, no hub access.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray sized to this machine."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in RAY_ENV_DEFAULTS}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars})
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user cluster
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": env_vars}, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
