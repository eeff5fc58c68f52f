"""Ray: attach to the cluster or start a local instance, what the cluster has right now, who we are."""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = str(Path(__file__).resolve().parents[1])

_local_ray: list[bool] = []   # this process started a local Ray instance (it lives until the process ends)


def init_ray(verbose: bool) -> bool:
    """Attach to the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance.
    Returns True when the instance is a local one this process started (no autoscaler can add GPUs)."""
    import ray

    if ray.is_initialized():
        return bool(_local_ray)
    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING,
                                                "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return False
    pythonpath = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **quiet)
    _local_ray.append(True)
    return True


@dataclass(frozen=True)
class Resources:
    """What the cluster has: totals and what is free now, and the autoscaler's pending nodes."""
    gpus: float
    cpus: float
    free_gpus: float
    free_cpus: float
    pending_nodes: int | None   # None: not known (no autoscaler, or its status could not be read)

    def line(self) -> str:
        pending = f"; the autoscaler has {self.pending_nodes} nodes pending" if self.pending_nodes else ""
        return (f"the cluster has {self.free_gpus:g} of {self.gpus:g} GPUs and {self.free_cpus:g} of {self.cpus:g} "
                f"CPUs free{pending}")


def resources() -> Resources:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return Resources(total.get("GPU", 0.0), total.get("CPU", 0.0), free.get("GPU", 0.0), free.get("CPU", 0.0),
                     _pending_nodes())


def _pending_nodes() -> int | None:
    """Nodes the autoscaler is launching (Ray's v2 autoscaler status), None when that cannot be read."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return len(status.pending_launches) + len(status.pending_nodes)
    except Exception:  # noqa: BLE001 - a status line is best effort; the resources above are always shown
        return None


def process_id() -> str:
    """This process, for logs and ledgers: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_id() -> str:
    """Who holds a claim: this driver process, uniquely."""
    return f"{process_id()}:{uuid.uuid4().hex[:8]}"
