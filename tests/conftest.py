"""Shared fixtures: the real imagery folder and one Ray runtime for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before Ray is imported anywhere: fail fast instead of hanging, and keep logs quiet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEMISUP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real imagery folder (../shared/data); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real imagery folder {SHARED_DATA} is absent (set SEMISUP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dubai_dir(shared_data: Path) -> Path:
    path = shared_data / "dubai"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (2 CPUs, 512 MiB object store), shut down after.

    Always a new Ray of this process (``address="local"``): never a cluster that a ``ray start``
    (another test's, or someone else's on this machine) left for ``ray.init()`` to find. The
    dashboard is on (bound to loopback): Ray Train inside Ray Tune frees the workers of a trial
    stopped early through its state API.
    """
    import ray

    from semisup.runtime import pin_dashboard_address

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=pin_dashboard_address(),
            log_to_driver=False,
        )
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_options() -> Iterator[dict[str, str]]:
    """A real S3 endpoint (moto) on 127.0.0.1 that Ray's worker processes reach: s3fs options."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()
