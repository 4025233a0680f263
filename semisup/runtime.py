"""Starting and stopping Ray for a command: a local single-node Ray, or a cluster by address."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from semisup.config import RayConfig

# Settings that keep a local Ray on a small machine from hanging silently or spamming logs.
_RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Fail fast when Train workers cannot be placed, instead of retrying forever.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def ray_runtime(config: RayConfig, quiet: bool = True) -> Iterator[None]:
    """Connect to ``config.address`` or start a local Ray; shut down only what was started here.

    A Ray that is already initialised in this process (a test session, a notebook) is reused.
    """
    import ray

    for key, value in _RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    started = False
    previous_api_server = os.environ.get(API_SERVER_VARIABLE)
    if not ray.is_initialized():
        if config.address:
            # joins an existing cluster (e.g. inside `ray job submit`); its resources are its own
            ray.init(address=config.address, log_to_driver=not quiet)
        else:
            dashboard_port = pin_dashboard_address() if config.dashboard else None
            # a local single-node Ray; the dashboard, when on, listens on loopback only
            ray.init(
                num_cpus=config.num_cpus,
                object_store_memory=config.object_store_mb * 1024**2,
                include_dashboard=config.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                log_to_driver=not quiet,
                logging_level=logging.WARNING if quiet else logging.INFO,
            )
        started = True
    if quiet:
        # Ray Data's progress bars would interleave with our own progress lines.
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            if previous_api_server is None:
                os.environ.pop(API_SERVER_VARIABLE, None)
            else:
                os.environ[API_SERVER_VARIABLE] = previous_api_server


def pin_dashboard_address() -> int:
    """A free port for the dashboard of a local Ray about to start, named in the environment.

    Ray's state API (which Ray Train's placement-group cleaner queries from its own worker
    process when Train runs inside Tune) finds the dashboard through ``RAY_API_SERVER_ADDRESS``
    when set; otherwise it guesses among every Ray on the machine and fails when there are
    several. Set before ``ray.init``, the variable reaches all of the new Ray's processes.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    os.environ[API_SERVER_VARIABLE] = f"http://127.0.0.1:{port}"
    return port
