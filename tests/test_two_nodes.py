"""Two Ray nodes on this machine, tested through ``ray job submit``.

A head (``node_head``) and a worker node (``node_worker``), each ``ray start`` with its own ports,
temp dir and one CPU, all on 127.0.0.1 (tests/ray_head.py). Checkpoints go to an S3 endpoint
(moto) as on a cluster without a shared disk; the run folder is a local path both nodes see.
Losing a node is killing the worker node's raylet (and that node's processes only).

What is compared between a two-node run and a single-node run of the same config (both with two
Train workers and two teacher actors; the single node packs them), all of it deterministic for a fixed seed: the tile index
of the store (tile ids, sources, rows, columns, splits); the pseudo-label manifest (tile ids,
sources, rows, columns, mean confidence, coverage) and the stored pseudo-label and confidence
arrays, bit for bit; the teacher's and the student's best adapters, byte for byte, and their
best validation mIoU, exactly; the stages that ran and the keys of each stage's result and of
the evaluation rows. Not compared: times, paths and the per-epoch timing fields of the reports.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ray_head import RayHead, RayNode, ray_head, ray_node

from semisup.pipeline import read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "cluster/smoke_two_nodes.yaml"
BUCKET = "checkpoints"
HEAD, WORKER = {"node_head": 1.0}, {"node_worker": 1.0}
START_TIMEOUT_S = 20  # Ray Train's wait per worker-group start in these jobs


@pytest.fixture(scope="module")
def s3_env(s3_options: dict[str, str]) -> dict[str, str]:
    """The environment a job's processes reach the S3 endpoint with (on every node)."""
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir(BUCKET)
    return {
        "AWS_ENDPOINT_URL": s3_options["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3_options["key"],
        "AWS_SECRET_ACCESS_KEY": s3_options["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    with ray_head(num_cpus=1, resources=HEAD) as running:
        yield running


@pytest.fixture
def worker(head: RayHead) -> Iterator[RayNode]:
    """A worker node for one test: a test may kill it."""
    with ray_node(head, num_cpus=1, resources=WORKER) as node:
        yield node


def runtime_env_file(folder: Path, env_vars: dict[str, str]) -> Path:
    """cluster/runtime_env.yaml with ``env_vars`` added, as a file for ``--runtime-env``."""
    runtime_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] |= env_vars
    path = folder / f"runtime_env-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(runtime_env))
    return path


def submit(
    head: RayHead, folder: Path, command: list[str], env_vars: dict[str, str], wait: bool = True
) -> str:
    """``ray job submit`` of ``command`` from the repository root; returns the job id."""
    job_id = f"two-nodes-{uuid.uuid4().hex[:8]}"
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S), **env_vars}
    head.ray(
        "job",
        "submit",
        *([] if wait else ["--no-wait"]),
        "--address",
        head.dashboard_url,
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env",
        str(runtime_env_file(folder, env)),
        "--",
        *command,
        timeout=900,
        cwd=REPO_ROOT,
    )
    return job_id


def job_status(head: RayHead, job_id: str) -> str:
    output = head.ray("job", "status", "--address", head.dashboard_url, job_id)
    match = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", output)
    if match:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[
            match.group(1)
        ]
    match = re.search(rf"Status for job '{job_id}': (\w+)", output)
    assert match, output
    return match.group(1)


def wait_for_job(head: RayHead, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := job_status(head, job_id)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(2)
    return status


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


def job_logs(head: RayHead, job_id: str) -> str:
    return head.ray("job", "logs", "--address", head.dashboard_url, job_id)


def state(head: RayHead, kind: str) -> list[dict[str, Any]]:
    """``ray list KIND --detail``: Ray's state API, dead entries included."""
    output = head.ray(
        "list",
        kind,
        "--address",
        head.dashboard_url,
        "--detail",
        "--format",
        "json",
        "--limit",
        "10000",
    )
    return json.loads(output[output.index("[") :])  # type: ignore[no-any-return]


def node_ids(head: RayHead, resource: str) -> set[str]:
    """Ids of the nodes (alive or dead) that offered the custom resource ``resource``."""
    return {node["node_id"] for node in state(head, "nodes") if resource in node["resources_total"]}


def run_command(out: Path, *overrides: str, config: str = CONFIG) -> list[str]:
    sets = [arg for override in (f"pipeline.out={out}", *overrides) for arg in ("--set", override)]
    return ["semisup", "run", "--config", config, *sets]


def s3_objects(env: dict[str, str], prefix: str) -> list[str]:
    """Keys of the checkpoint bucket under ``prefix``, listed afresh."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key="testing",
        secret="testing",
        skip_instance_cache=True,
    )
    keys: list[str] = fs.find(BUCKET)
    return [key for key in keys if key.startswith(f"{BUCKET}/{prefix}")]


# ---------------------------------------------------------------------------------------------
# What a run wrote, for comparing two runs


def tile_index(store: Path) -> Any:
    from semisup.store import read_tile_index

    columns = ["tile_id", "source", "row", "col", "split"]
    return read_tile_index(str(store)).to_pandas()[columns].sort_values("tile_id")


def pseudo_labels(store: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The compacted manifest (sorted by tile) and every source's label and confidence arrays."""
    import zarr

    from semisup.pseudo_label import read_manifest as read_label_manifest

    manifest = read_label_manifest(str(store)).to_pandas().sort_values("tile_id")
    root: Any = zarr.open_group(str(store), mode="r")
    arrays = {}
    for source in sorted(set(manifest["source"])):
        for name in ("pseudo_label", "confidence"):
            arrays[f"{source}/{name}"] = np.asarray(root[source][name][:])
    return manifest.reset_index(drop=True), arrays


def assert_same_pseudo_labels(store: Path, reference: Path) -> None:
    manifest, arrays = pseudo_labels(store)
    expected, expected_arrays = pseudo_labels(reference)
    assert manifest["tile_id"].is_unique  # one row per tile
    columns = ["tile_id", "source", "row", "col", "mean_confidence", "coverage"]
    assert manifest[columns].equals(expected[columns])
    assert arrays.keys() == expected_arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, expected_arrays[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# An uninterrupted single-node run to compare with


@pytest.fixture(scope="module")
def single_node_run(
    tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]
) -> Iterator[Path]:
    """cluster/smoke_two_nodes.yaml on one node of two CPUs (its own head, stopped after), with
    ray.placement=pack: one node cannot hold a worker per node."""
    folder = tmp_path_factory.mktemp("single")
    out = folder / "run"
    started = time.monotonic()
    with ray_head(num_cpus=2) as alone:
        command = run_command(out, f"train.storage=s3://{BUCKET}/single", "ray.placement=pack")
        job_id = submit(alone, folder, command, s3_env)
        assert job_status(alone, job_id) == "SUCCEEDED"
    print(f"single-node run: {time.monotonic() - started:.0f} s")
    yield out


# ---------------------------------------------------------------------------------------------
# 1 and 2: placement, and checkpoints in object storage


@pytest.mark.timeout(1500)
def test_spread_runs_on_both_nodes_with_the_outputs_of_one_node(
    head: RayHead, worker: RayNode, tmp_path: Path, s3_env: dict[str, str], single_node_run: Path
) -> None:
    out = tmp_path / "run"
    job_id = submit(head, tmp_path, run_command(out, f"train.storage=s3://{BUCKET}/two"), s3_env)
    assert job_status(head, job_id) == "SUCCEEDED"
    # where Ray placed the work, from its state API: in each worker group (teacher, student; a
    # placement group each) and in the teacher actor pool, one on each node
    nodes = {*node_ids(head, "node_head"), *node_ids(head, "node_worker")}
    actors = state(head, "actors")
    groups: dict[str, set[str]] = {}
    for actor in actors:
        if actor["class_name"] == "RayTrainWorker":
            groups.setdefault(actor["placement_group_id"], set()).add(actor["node_id"])
    assert len(groups) == 2 and all(group == nodes for group in groups.values()), groups
    teachers = [a["node_id"] for a in actors if "Teacher" in (a.get("repr_name") or "")]
    assert len(teachers) == 2 and set(teachers) == nodes, teachers
    # checkpoints went to object storage, none to the run folder
    for run in ("teacher", "student"):
        assert any("/train/checkpoint_" in key for key in s3_objects(s3_env, f"two/{run}-"))
        assert not (out / run / "ray").exists()
    # the same outputs as one node
    assert tile_index(out / "store.zarr").equals(tile_index(single_node_run / "store.zarr"))
    assert_same_pseudo_labels(out / "store.zarr", single_node_run / "store.zarr")
    stages, expected = read_manifest(out)["stages"], read_manifest(single_node_run)["stages"]
    assert {n: r["status"] for n, r in stages.items()} == {n: "done" for n in expected}
    for name, record in stages.items():
        assert record["result"].keys() == expected[name]["result"].keys(), name
    for run in ("teacher", "student"):
        adapter = f"{run}/best/adapter.safetensors"
        assert (out / adapter).read_bytes() == (single_node_run / adapter).read_bytes(), run
        report = json.loads((out / run / "report.json").read_text())
        expected_report = json.loads((single_node_run / run / "report.json").read_text())
        assert report["best_miou"] == expected_report["best_miou"], run
    evaluation = json.loads((out / "evaluation.json").read_text())
    reference = json.loads((single_node_run / "evaluation.json").read_text())
    assert [row.keys() for row in evaluation["rows"]] == [row.keys() for row in reference["rows"]]


# ---------------------------------------------------------------------------------------------
# 3: losing the worker node mid-training

# the teacher stage alone, long enough to be stopped between checkpoints, with workers too
# large for two on one node: the head alone cannot host the group that lost its worker node
TRAINING = (
    "pipeline.stages=[prep,teacher]",
    "train.steps_per_epoch=12",
    "train.checkpoint_every_steps=2",
    "train.max_failures=1",
    "train.cpus_per_worker=0.6",
)


def kill_after_first_checkpoint(
    head: RayHead, worker: RayNode, s3_env: dict[str, str], prefix: str, job_id: str
) -> str:
    """Wait for the teacher's first checkpoint in object storage, then kill the worker node;
    returns the node's id once the head has marked it dead."""
    (lost,) = node_ids(head, "node_worker") - dead_nodes(head)

    def checkpointed() -> bool:
        assert job_status(head, job_id) in ("PENDING", "RUNNING")
        return any("/train/checkpoint_" in key for key in s3_objects(s3_env, prefix))

    wait_until(checkpointed, "teacher checkpoint", timeout_s=600)
    worker.kill()
    wait_until(lambda: lost in dead_nodes(head), "dead worker node", timeout_s=120)
    return lost


def dead_nodes(head: RayHead) -> set[str]:
    return {node["node_id"] for node in state(head, "nodes") if node["state"] == "DEAD"}


@pytest.mark.timeout(1500)
def test_training_resumes_from_its_checkpoint_when_a_node_replaces_the_lost_one(
    head: RayHead, worker: RayNode, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    out = tmp_path / "run"
    command = run_command(out, f"train.storage=s3://{BUCKET}/replaced", *TRAINING)
    job_id = submit(head, tmp_path, command, s3_env, wait=False)
    lost = kill_after_first_checkpoint(head, worker, s3_env, "replaced/teacher-", job_id)
    assert job_status(head, job_id) == "RUNNING"  # waiting for the workers' nodes
    with ray_node(head, num_cpus=1, resources=WORKER):
        (replacement,) = node_ids(head, "node_worker") - {lost} - dead_nodes(head)
        assert wait_for_job(head, job_id, timeout_s=900) == "SUCCEEDED"
        actors = state(head, "actors")
    # the restarted workers ran on the new node, from the checkpoint written before the loss
    train_nodes = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert {lost, replacement} <= train_nodes
    report = json.loads((out / "teacher" / "report.json").read_text())
    # resumed at a checkpointed step (every 2nd), not from the start, and finished the 12 steps
    assert report["resumed_at"] and 0 < report["resumed_at"][0] < report["steps"] == 12
    assert report["resumed_at"][0] % 2 == 0
    assert read_manifest(out)["stages"]["teacher"]["attempts"] == 1  # Ray Train recovered it


@pytest.mark.timeout(1500)
def test_training_fails_naming_the_lost_node_and_the_checkpoint_when_none_replaces_it(
    head: RayHead, worker: RayNode, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    out = tmp_path / "run"
    node_wait_s = 2 * START_TIMEOUT_S
    command = run_command(
        out, f"train.storage=s3://{BUCKET}/lost", f"train.node_wait_s={node_wait_s}", *TRAINING
    )
    job_id = submit(head, tmp_path, command, s3_env, wait=False)
    lost = kill_after_first_checkpoint(head, worker, s3_env, "lost/teacher-", job_id)
    lost_at = time.monotonic()
    assert wait_for_job(head, job_id, timeout_s=600) == "FAILED"
    waited_s = time.monotonic() - lost_at
    assert waited_s < node_wait_s + 4 * START_TIMEOUT_S + 120  # bounded by node_wait_s
    logs = job_logs(head, job_id)
    match = re.search(
        r"NodeLostError: training lost node (\w+) \([\d.]+, resources "
        r"node_worker\).*the latest checkpoint, (s3://\S+), is kept",
        logs,
    )
    assert match, logs[-4000:]
    assert match.group(1) == lost
    checkpoint = match.group(2).removeprefix(f"s3://{BUCKET}/")
    # nothing already written is lost: the store, the run record, the named checkpoint
    stages = read_manifest(out)["stages"]
    assert stages["prep"]["status"] == "done" and stages["teacher"]["status"] == "failed"
    assert lost in stages["teacher"]["error"]
    assert tile_index(out / "store.zarr").shape[0] > 0
    assert any(key.startswith(f"{BUCKET}/{checkpoint}/") for key in s3_objects(s3_env, "lost/"))
    # a node comes back: the same command continues from that checkpoint
    with ray_node(head, num_cpus=1, resources=WORKER):
        rerun = submit(head, tmp_path, command, s3_env)
        assert job_status(head, rerun) == "SUCCEEDED"
    assert "[run] teacher: resuming" in job_logs(head, rerun)
    report = json.loads((out / "teacher" / "report.json").read_text())
    assert report["steps"] == 12 and report["resumed_at"]


# ---------------------------------------------------------------------------------------------
# 4: losing the worker node mid pseudo-labelling


def pseudo_label_command(store: Path, teacher: Path) -> list[str]:
    """The teacher of ``teacher`` labels every tile of ``store``, one tile per call, on two
    actors spread over the nodes, sized to fit the head alone when the worker node is lost."""
    return [
        "semisup",
        "pseudo-label",
        "--store",
        str(store),
        "--mode",
        "semantic",
        "--model",
        "tiny",
        "--checkpoint",
        str(teacher / "best"),
        "--split",
        "all",
        "--batch-size",
        "1",
        "--actors",
        "2",
        "--cpus-per-actor",
        "0.25",
        "--torch-threads",
        "1",
        "--placement",
        "spread",
        "--overwrite",
    ]


def parts(store: Path) -> int:
    folder = store / "pseudo_labels.parts"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


@pytest.mark.timeout(1500)
def test_pseudo_labelling_labels_every_tile_once_across_a_lost_node(
    head: RayHead, worker: RayNode, tmp_path: Path, single_node_run: Path, s3_env: dict[str, str]
) -> None:
    uninterrupted, interrupted = tmp_path / "uninterrupted.zarr", tmp_path / "interrupted.zarr"
    for store in (uninterrupted, interrupted):
        shutil.copytree(single_node_run / "store.zarr", store)
    teacher = single_node_run / "teacher"
    tiles = int(tile_index(uninterrupted).shape[0])
    first = submit(head, tmp_path, pseudo_label_command(uninterrupted, teacher), {})
    assert job_status(head, first) == "SUCCEEDED"
    job_id = submit(head, tmp_path, pseudo_label_command(interrupted, teacher), {}, wait=False)
    (worker_node,) = node_ids(head, "node_worker") - dead_nodes(head)

    def labelling_on_both_nodes() -> bool:
        """A batch is recorded and a teacher actor of this job runs on the worker node."""
        alive = [a for a in state(head, "actors") if a["state"] == "ALIVE"]
        teachers = {a["node_id"] for a in alive if "Teacher" in (a.get("repr_name") or "")}
        return parts(interrupted) >= 1 and worker_node in teachers

    wait_until(labelling_on_both_nodes, "teacher actor on the worker node", timeout_s=600)
    worker.kill()
    recorded_before = parts(interrupted)
    assert recorded_before < tiles, "the run ended before the node was lost"
    # Two recoveries were seen: Ray Data carries on with the actor left (the lost node's tasks
    # retried), or the dead actor fails the pipeline and a new pool labels the tiles not yet
    # recorded (semisup.pseudo_label). Either way the job ends with every tile labelled.
    assert wait_for_job(head, job_id, timeout_s=900) == "SUCCEEDED"
    logs = job_logs(head, job_id)
    retried = re.search(r"a new pool labels the (\d+) tiles not yet recorded", logs)
    if retried:
        assert recorded_before <= tiles - int(retried.group(1)) < tiles
    summary = json.loads(logs[logs.index('{\n  "store"') : logs.rindex("}") + 1])
    # every tile labelled once: one manifest row per tile, no tile counted twice
    assert summary["tiles_remaining"] == 0 and summary["tiles_processed"] <= tiles
    print(
        f"recorded before the loss: {recorded_before} of {tiles} tiles; "
        + (f"a new pool labelled {retried.group(1)}" if retried else "Ray Data carried on")
    )
    assert_same_pseudo_labels(interrupted, uninterrupted)
