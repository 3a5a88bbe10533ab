"""Ray for this process: connect to a cluster, or start a local one with this project's settings."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set environment variables for the ``with`` block only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the local cluster's processes (ensure_ray)
LOCAL_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``; without one, the
    cluster of the Ray Job this runs in, ``RAY_ADDRESS``), or start a local cluster (unless
    Ray is already initialised).

    Only a local cluster started here gets settings: token authentication off unless the
    user set ``RAY_AUTH_MODE`` (Ray would otherwise write ``~/.ray/auth_token``; its processes
    inherit the variable when they start, it is not left set in this process), and Ray
    Train's controller polling every 0.25 s instead of 2 s (each ``report`` waits one poll)
    and no preemption watcher (an actor process per trial that polls whether a node is being
    drained by an autoscaler: a cluster of this one machine has none), through this job's
    runtime environment. The dashboard stays on (loopback only): Ray Train's
    placement-group cleaner asks its state API whether a controller is still alive. An existing
    cluster keeps its own settings: its authentication is whatever its operator chose.
    """
    import ray

    from plora_ray.ray.cluster import cluster_address

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    auth = {} if "RAY_AUTH_MODE" in os.environ else {"RAY_AUTH_MODE": "disabled"}
    with _env(auth):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=1 << 30, log_to_driver=True,
                 dashboard_host="127.0.0.1",  # the Jobs API runs code: loopback only
                 runtime_env={"env_vars": dict(LOCAL_SETTINGS)})  # a copy: Ray writes into it
