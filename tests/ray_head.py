"""A real Ray head for tests: ``ray start --head`` on 127.0.0.1 with its own ports and temp dir.

Other Ray clusters may run on the same machine (other test sessions, other people). This head
never touches them: its ports are free ones picked here, its temp dir is its own (so it does
not become the ``ray.init()`` default in /tmp/ray), and stopping it ends exactly the processes
it started. ``ray stop`` is not used: in Ray 2.60 it stops every Ray process on the machine.
Token authentication is on, with a token of its own; the job CLI is run with the same
environment (``RayHead.env``).

``ray_node`` adds a worker node to such a head, on the same machine: its own ports, temp dir and
process group, so that a test can kill that one node (``RayNode.kill``) and leave the head, and
anyone else's Ray, running.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # ray, semisup and python of this environment


@dataclass(frozen=True)
class RayHead:
    """A running head: its job server URL, temp dir, and the environment to talk to it with."""

    dashboard_url: str
    gcs_address: str
    temp_dir: Path
    env: dict[str, str]

    def ray(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> str:
        """Run ``ray ARGS`` (e.g. ``job status ID``) against this head; returns its output."""
        result = subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"ray {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout + result.stderr


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextlib.contextmanager
def ray_head(
    num_cpus: float = 2, object_store_mb: int = 400, resources: dict[str, float] | None = None
) -> Iterator[RayHead]:
    """Start a head node; stop every process it started when the block ends.

    ``resources``: custom resources of the head (e.g. ``{"node_head": 1}``), for placement.
    """
    # short: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs, dashboard, client, agent, agent_grpc, metrics = free_ports(6)
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--metrics-export-port",
        str(metrics),
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(object_store_mb * 1024**2),
        "--disable-usage-stats",
        "--resources",
        json.dumps(resources or {}),
    ]
    group = _ray_start(command, env)
    try:
        yield RayHead(
            dashboard_url=f"http://127.0.0.1:{dashboard}",
            gcs_address=f"127.0.0.1:{gcs}",
            temp_dir=temp_dir,
            env=env,
        )
    finally:
        stop_process_group(group)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_start(command: list[str], env: dict[str, str]) -> int:
    """Run ``ray start ...`` in a session of its own; returns its process group.

    Every daemon it starts shares that process group, so we can find them all (and only them).
    """
    start = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = start.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        stop_process_group(start.pid)
        raise
    if start.returncode != 0:
        stop_process_group(start.pid)
        raise RuntimeError(f"ray start failed ({start.returncode}):\n{output.decode()[-3000:]}")
    return start.pid


@dataclass(frozen=True)
class RayNode:
    """A worker node of a ``RayHead``: its process group and temp dir."""

    group: int
    temp_dir: Path
    resources: dict[str, float]

    def raylet_pids(self) -> list[int]:
        """The PIDs of this node's raylet (one while it runs)."""
        return [proc.pid for proc in _group_members(self.group) if _is_raylet(proc)]

    def kill(self) -> None:
        """Lose this node as a machine is lost: SIGKILL its raylet, then every other process it
        started (workers would notice their raylet is gone and exit; this does not wait)."""
        for pid in self.raylet_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_process_group(self.group, grace_s=0.0)


@contextlib.contextmanager
def ray_node(
    head: RayHead,
    num_cpus: float = 1,
    object_store_mb: int = 200,
    resources: dict[str, float] | None = None,
) -> Iterator[RayNode]:
    """Add a worker node to ``head`` on this machine (127.0.0.1, its own ports and temp dir);
    stop every process it started when the block ends. Waits until the head lists it alive."""
    temp_dir = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp"))
    manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    command = [
        str(BIN / "ray"),
        "start",
        "--address",
        head.gcs_address,
        "--node-ip-address",
        "127.0.0.1",
        "--node-manager-port",
        str(manager),
        "--object-manager-port",
        str(objects),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(object_store_mb * 1024**2),
        "--disable-usage-stats",
        "--resources",
        json.dumps(resources or {}),
    ]
    group = _ray_start(command, head.env)
    node = RayNode(group=group, temp_dir=temp_dir, resources=dict(resources or {}))
    try:
        _wait_for_raylet(node)
        yield node
    finally:
        stop_process_group(group)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_raylet(node: RayNode, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not node.raylet_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker node of {node.temp_dir} started no raylet")
        time.sleep(0.5)


def _is_raylet(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.name() == "raylet" or Path(proc.exe()).name == "raylet"
    return False


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == group:
                members.append(proc)
    return members


def stop_process_group(group: int, grace_s: float = 5.0) -> None:
    """End the processes of process group ``group`` and all their descendants.

    Ray's worker processes start sessions of their own, so they are found as descendants of the
    raylet rather than by their group. SIGTERM first, SIGKILL after ``grace_s``.
    """
    members = _group_members(group)
    found = {proc.pid: proc for proc in members}
    for proc in members:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in proc.children(recursive=True)})
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(found.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
