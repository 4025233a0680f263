"""A real Ray head for tests: ``ray start --head`` on 127.0.0.1 with its own ports and temp dir.

Other Ray clusters may run on the same machine (other test sessions, other people). This head
never touches them: its ports are free ones picked here, its temp dir is its own (so it does
not become the ``ray.init()`` default in /tmp/ray), and stopping it ends exactly the processes
it started. ``ray stop`` is not used: in Ray 2.60 it stops every Ray process on the machine.
Token authentication is on, with a token of its own; the job CLI is run with the same
environment (``RayHead.env``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
def ray_head(num_cpus: int = 2, object_store_mb: int = 400) -> Iterator[RayHead]:
    """Start a head node; stop every process it started when the block ends."""
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
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--object-store-memory", str(object_store_mb * 1024**2), "--disable-usage-stats",
    ]  # fmt: skip
    # its own session: every daemon it starts shares its process group, so we can find them all
    start = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    group = start.pid
    try:
        output, _ = start.communicate(timeout=180)
        if start.returncode != 0:
            raise RuntimeError(f"ray start failed ({start.returncode}):\n{output.decode()[-3000:]}")
        yield RayHead(
            dashboard_url=f"http://127.0.0.1:{dashboard}",
            gcs_address=f"127.0.0.1:{gcs}",
            temp_dir=temp_dir,
            env=env,
        )
    finally:
        stop_process_group(group)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(group: int, grace_s: float = 5.0) -> None:
    """End the processes of process group ``group`` and all their descendants.

    Ray's worker processes start sessions of their own, so they are found as descendants of the
    raylet rather than by their group. SIGTERM first, SIGKILL after ``grace_s``.
    """
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == group:
                members.append(proc)
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
