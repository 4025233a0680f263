"""``semisup submit``: a thin wrapper over Ray's job SDK for submitting semisup commands.

It ships the current folder as the job's ``working_dir`` without data, outputs and virtual
environments, streams the job's logs, and returns the job's exit status. Everything it does is
also one ``ray job submit`` command (see cluster/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from semisup.config import read_yaml

# Never shipped to the cluster: environments, version control, data and every kind of output.
# (gitignore patterns, as Ray's working_dir "excludes"; a leading "/" anchors at the folder.)
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/.venv",
    "/.git",
    "/data",
    "/outputs",
    "/runs",
    "/demo_out",
    "/bench/out",
    "*.zarr",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
)
DEFAULT_ENV_VARS: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # fail fast when Train workers cannot be placed, instead of retrying forever
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
}
EXIT_STATUS = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def job_runtime_env(
    working_dir: str | Path = ".", extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The runtime_env of a semisup job: ``working_dir`` with ``DEFAULT_EXCLUDES``, the env vars.

    ``extra`` (e.g. a runtime_env YAML) is merged in: its ``excludes`` and ``env_vars`` extend
    the defaults; any other key replaces the default one.
    """
    extra = dict(extra or {})
    excludes = [
        *DEFAULT_EXCLUDES,
        *(p for p in extra.pop("excludes", []) if p not in DEFAULT_EXCLUDES),
    ]
    env_vars = {**DEFAULT_ENV_VARS, **extra.pop("env_vars", {})}
    working_dir = str(Path(working_dir).resolve())
    return {"working_dir": working_dir, "excludes": excludes, "env_vars": env_vars, **extra}


def load_runtime_env(path: Path) -> dict[str, Any]:
    """A runtime_env YAML file (a mapping of runtime_env keys)."""
    if not path.is_file():
        raise FileNotFoundError(f"--runtime-env {path}: not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--runtime-env {path}: expected a mapping of runtime_env keys")
    return data


def submit_job(
    entrypoint: Sequence[str],
    *,
    address: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    wait: bool = True,
    log: Any = sys.stdout,
) -> tuple[str, int | None]:
    """Submit ``entrypoint`` as a Ray job; with ``wait``, stream its logs until it ends.

    ``address``: the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS,
    as for ``ray job submit``). Returns (submission id, exit status: 0 when the job succeeded,
    else its driver's exit code or 1; None without ``wait``).
    """
    from ray.job_submission import JobSubmissionClient

    # talks to the cluster's job server over HTTP (with the token when token auth is on)
    client = JobSubmissionClient(address)
    # uploads working_dir (minus excludes) and starts the entrypoint on the head node
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env=dict(runtime_env or job_runtime_env()),
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
    )
    print(f"[submit] job {job_id} submitted to {client.get_address()}", file=sys.stderr)
    if not wait:
        print(f"[submit] follow it with: ray job logs --follow {job_id}", file=sys.stderr)
        return job_id, None
    try:
        asyncio.run(_stream_logs(client, job_id, log))
    except KeyboardInterrupt:
        print(
            f"\n[submit] stopped following; the job runs on (ray job stop {job_id})",
            file=sys.stderr,
        )
        return job_id, 130
    return job_id, job_exit_status(client, job_id)


async def _stream_logs(client: Any, job_id: str, log: Any) -> None:
    async for lines in client.tail_job_logs(job_id):  # ends when the job does
        print(lines, end="", file=log, flush=True)


def job_exit_status(client: Any, job_id: str) -> int:
    """0 for a job that succeeded; else its driver's exit code, or 1 (130 if stopped)."""
    info = client.get_job_info(job_id)
    status = str(info.status)
    print(f"[submit] job {job_id}: {status}", file=sys.stderr)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return int(code) if code else EXIT_STATUS.get(status, 1)


# ---------------------------------------------------------------------------------------------
# Command line: `semisup submit`

EXAMPLE = (
    "semisup submit --address http://127.0.0.1:8265 -- "
    "semisup run --config cluster/smoke.yaml --set pipeline.out=/shared/runs/smoke"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup submit`` flags."""
    parser.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS"
        " or $RAY_ADDRESS)",
    )
    parser.add_argument(
        "--working-dir",
        type=Path,
        default=Path("."),
        help="folder shipped as the job's working_dir, without data and outputs (default: .)",
    )
    parser.add_argument(
        "--runtime-env",
        type=Path,
        default=None,
        help="runtime_env YAML merged into the defaults, e.g. cluster/runtime_env.yaml",
    )
    parser.add_argument("--submission-id", default=None, help="job id (default: generated)")
    parser.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the driver (default 0: it only coordinates)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="return after submitting; do not stream the logs"
    )
    parser.add_argument(
        "entrypoint", nargs=argparse.REMAINDER, help="the command the job runs, after --"
    )
    parser.epilog = f"example:\n  {EXAMPLE}"


def run_cli(args: argparse.Namespace) -> int:
    """Submit the command as a Ray job and follow its logs; returns the job's exit status."""
    entrypoint = list(args.entrypoint)
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]
    if not entrypoint:
        raise ValueError("no command given; put it after --, e.g. " + EXAMPLE)
    if not args.working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {args.working_dir}: not a folder")
    extra = load_runtime_env(args.runtime_env) if args.runtime_env else None
    _, status = submit_job(
        entrypoint,
        address=args.address,
        runtime_env=job_runtime_env(args.working_dir, extra),
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        wait=not args.no_wait,
    )
    return status or 0
