"""Ray setup shared by the jobs: local Ray when no cluster is given, quiet and offline."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Measured traps on small machines (see README, "Ray on a laptop"): no usage stats, no 30-min
# silent stall of a starved Data pipeline, no duplicated worker prints, no hub access.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # long enough for a slow trainer to take its next block, short of a silent 30-min stall
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "600",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def calm_streaming_executor() -> None:
    """Worker setup hook: stop Ray Data's scheduling loop from spinning when it is idle.

    When every task is done and the consumer (the Train worker) is slower than the producer,
    StreamingExecutor's loop has nothing to `ray.wait` on and spins, taking half a core on
    the SplitCoordinator (measured on 2 cores: 56% CPU, and the 2-thread torch worker ran at
    half speed). A 5 ms nap after an idle iteration removes the spin; busy iterations, which
    block in ray.wait, are untouched.
    """
    import time

    from ray.data._internal.execution import streaming_executor as se

    if getattr(se.StreamingExecutor, "_lasb_calm", False):
        return
    step = se.StreamingExecutor._scheduling_loop_step

    def calm_step(self, topology):
        t0 = time.perf_counter()
        result = step(self, topology)
        if time.perf_counter() - t0 < 0.002:
            time.sleep(0.005)
        return result

    se.StreamingExecutor._scheduling_loop_step = calm_step
    se.StreamingExecutor._lasb_calm = True


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray sized to this machine."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ[k] for k in RAY_ENV_DEFAULTS},
                   "worker_process_setup_hook": "jobs.common.calm_streaming_executor"}
    if address:
        # inside `ray job submit` the job's runtime_env already sets env vars; Ray refuses to
        # merge overlapping keys, so only the setup hook is added here
        ray.init(address=address,
                 runtime_env={"worker_process_setup_hook": runtime_env["worker_process_setup_hook"]})
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user cluster
    ray.init(num_cpus=num_cpus or os.cpu_count(), runtime_env=runtime_env)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
