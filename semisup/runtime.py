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
VERBOSE_VARIABLE = "SEMISUP_VERBOSE"  # set by `semisup --verbose`; read by every Ray start
# Ray loggers whose lines are not about the user's data or cluster, with the least level shown
# without --verbose. Ray 2.60 warns on every start of a local Ray that it turned token
# authentication on (it stays on); progress bars are off on purpose (they would interleave with
# our progress lines), which Ray Data warns about once; and Ray Data logs the traceback of a
# failed task before it raises the same error to the caller, where an input error (an
# unreadable chunk, say) becomes one line and any other error its traceback.
_QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
    "ray.data._internal.execution.streaming_executor_state": logging.CRITICAL,
    "ray.data.exceptions": logging.CRITICAL,
}


def verbose() -> bool:
    """Whether the user asked to see everything Ray logs (``semisup --verbose``)."""
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def cluster_address(config: RayConfig, local: bool = False) -> str | None:
    """The cluster to join: ``config.address``, else ``$RAY_ADDRESS``; None starts a local Ray.

    ``ray job submit`` sets ``RAY_ADDRESS`` for its entrypoint, so a job joins the cluster it was
    submitted to. ``local`` ignores both and always starts a fresh single-node Ray.
    """
    if local:
        return None
    return config.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_runtime(
    config: RayConfig, quiet: bool | None = None, local: bool = False
) -> Iterator[None]:
    """Join the cluster of ``cluster_address`` or start a local Ray; shut down only what was
    started here.

    A local Ray is always a new one (``address="local"``): without it, ``ray.init()`` would
    silently join any cluster that ``ray start`` left on this machine. A Ray that is already
    initialised in this process (a test session, a notebook) is reused. ``quiet`` (default: not
    ``verbose()``) keeps Ray's logging to warnings and errors, and its workers' output off the
    console.
    """
    import ray

    if quiet is None:
        quiet = not verbose()
    for key, value in _RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    started = False
    address = cluster_address(config, local)
    previous_api_server = os.environ.get(API_SERVER_VARIABLE)
    if quiet:
        quiet_ray_logging()
    if not ray.is_initialized():
        if address:
            # joins an existing cluster (e.g. inside `ray job submit`); its resources are its own
            ray.init(address=address, log_to_driver=not quiet)
        else:
            dashboard_port = pin_dashboard_address() if config.dashboard else None
            # a new single-node Ray; the dashboard, when on, listens on loopback only
            ray.init(
                address="local",
                num_cpus=config.num_cpus,
                num_gpus=config.num_gpus,
                object_store_memory=config.object_store_mb * 1024**2,
                include_dashboard=config.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                log_to_driver=not quiet,
                logging_level=logging.WARNING if quiet else logging.INFO,
            )
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            if previous_api_server is None:
                os.environ.pop(API_SERVER_VARIABLE, None)
            else:
                os.environ[API_SERVER_VARIABLE] = previous_api_server


def quiet_ray_logging() -> None:
    """Ray's logging at the level a user needs: warnings and errors about their work, no
    progress bars (they would interleave with our own progress lines), and none of the
    notices in ``_QUIET_LOGGERS``. Called before ``ray.init``, which logs some of them."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


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


def ensure_ray() -> None:
    """Initialise Ray in this process if nothing has: join ``$RAY_ADDRESS`` or start a new
    local Ray (never a cluster that ``ray start`` happened to leave on this machine). For
    library calls made without ``ray_runtime``; the Ray started here lives as long as the
    process, as the one Ray Data would start by itself."""
    import ray

    if not ray.is_initialized():
        if not verbose():
            quiet_ray_logging()
        ray.init(address=cluster_address(RayConfig()) or "local")
