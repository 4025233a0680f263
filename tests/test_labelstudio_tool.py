"""Our tasks through a real Label Studio: import, serve the tiles, annotate, export, read back.

Label Studio pins its own Django stack, so it lives in a virtual environment of its own, cached
under ~/.cache/semisup-test-labelstudio (installed from PyPI on the first run, minutes). The
server runs on 127.0.0.1 on a free port with a temporary data folder and is stopped at the end,
by its process group only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from store_factory import SourceSpec, build_store

from semisup.labelstudio import DEFAULT_IMAGE_ROOT, export_masks, tile_name, write_tasks

pytestmark = pytest.mark.slow

VERSION = "label-studio>=1.23,<1.24"
VENV = Path.home() / ".cache" / "semisup-test-labelstudio" / "venv"
INSTALL_TIMEOUT_S = 1800  # a cold install resolves and builds about 150 packages
START_TIMEOUT_S = 900  # the first start migrates a fresh SQLite database: minutes at load 20
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the API token of the user we create
CLASSES = [f"class_{k}" for k in range(3)]  # what tests.store_factory names them


def label_studio_executable() -> Path:
    """The cached venv's ``label-studio``; installed on first use, or the test is skipped."""
    executable = VENV / "bin" / "label-studio"
    if executable.exists():
        return executable
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", VERSION],
            check=True,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot install {VERSION}: {(error.stderr or '')[-500:]}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing {VERSION} took over {INSTALL_TIMEOUT_S} s")
    return executable


@dataclass
class Server:
    url: str

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One authenticated JSON request; HTTP errors raise with the server's message."""
        return json.loads(self.get(path, method, body) or b"null")

    def get(self, path: str, method: str = "GET", body: Any = None) -> bytes:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:1000]!r}") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.skip(f"Label Studio exited ({process.returncode}): {log.read_text()[-800:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                if b"UP" in response.read():
                    return True
        except OSError:
            pass
        time.sleep(3)
    return False


@pytest.fixture
def label_studio(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A running Label Studio serving local files from ``tmp_path``/tasks; (server, that folder)."""
    executable = label_studio_executable()
    documents = tmp_path / "tasks"
    documents.mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "data"),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
    }
    command = [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        "--username",
        "annotator@example.com",
        "--password",
        "not-a-secret-1",
        "--user-token",
        TOKEN,
        "--enable-legacy-api-token",
    ]
    log = tmp_path / "label_studio.log"
    with log.open("wb") as sink:
        # its own process group: the server and its children are stopped together, nothing else
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        if not _wait_until_up(url, process, log):
            pytest.skip(f"Label Studio did not answer within {START_TIMEOUT_S} s")
        yield Server(url), documents
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _predictions(tiles: Any) -> dict[int, np.ndarray]:
    """Blocky class maps like a student's: halves, a small square, a nodata row."""
    predictions = {}
    for row in tiles.itertuples():
        mask = np.zeros((row.height, row.width), np.uint8)
        mask[:, row.width // 2 :] = 1
        mask[5:9, 3:7] = 2
        mask[-1] = 255
        predictions[int(row.tile_id)] = mask
    return predictions


@pytest.mark.timeout(INSTALL_TIMEOUT_S + START_TIMEOUT_S + 600)
def test_label_studio_imports_our_tasks_and_exports_what_we_read_back(
    label_studio: tuple[Server, Path], tmp_path: Path
) -> None:
    server, documents = label_studio
    written = build_store(
        str(tmp_path / "store.zarr"),
        [SourceSpec("scene", 64, 50, dtype="uint16")],
        tile_size=32,
        num_classes=len(CLASSES),
    )
    tiles = written.index.to_pandas()  # four tiles, three of them clipped by the raster's edge
    predictions = _predictions(tiles)
    paths = write_tasks(written.url, tiles, documents, predictions=predictions)

    project = server.api(
        "POST",
        "/api/projects",
        {"title": "semisup proposals", "label_config": paths["label_config"].read_text()},
    )
    # a local-files storage over the images authorises /data/local-files/ for this project; it is
    # never synced (that would add a task per image)
    server.api(
        "POST",
        "/api/storages/localfiles",
        {"project": project["id"], "path": str(documents / "images"), "use_blob_urls": True},
    )
    imported = server.api(
        "POST", f"/api/projects/{project['id']}/import", json.loads(paths["tasks"].read_text())
    )
    assert (imported["task_count"], imported["prediction_count"]) == (len(tiles), len(tiles))

    names = {tile_name(r.source, r.row, r.col): int(r.tile_id) for r in tiles.itertuples()}
    for name in names:  # the default image URL is served: the PNG we wrote, byte for byte
        served = server.get(f"{DEFAULT_IMAGE_ROOT}{name}.png")
        assert served == (documents / "images" / f"{name}.png").read_bytes()

    export = tmp_path / "export.json"
    export.write_bytes(
        server.get(f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    )
    assert export_masks(export, CLASSES) == {}  # predictions only: nothing annotated yet

    # an annotator accepts each pre-annotation as it is
    tasks = server.api("GET", f"/api/tasks?project={project['id']}&page_size=100")
    for task in tasks["tasks"] if isinstance(tasks, dict) else tasks:
        (prediction,) = server.api("GET", f"/api/predictions?task={task['id']}")
        server.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": prediction["result"]})
    # given a labelling config, Label Studio checks every annotation's tools and labels against
    # it: our results name the tools and classes of our config
    server.api(
        "PATCH",
        f"/api/projects/{project['id']}",
        {"label_config": paths["label_config"].read_text()},
    )
    export.write_bytes(server.get(f"/api/projects/{project['id']}/export?exportType=JSON"))
    masks = export_masks(export, CLASSES)
    assert masks.keys() == names.keys()
    for name, tile_id in names.items():
        assert np.array_equal(masks[name], predictions[tile_id]), name
