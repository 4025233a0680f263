"""Cluster use: configs valid against the real schemas, and `semisup run` as a Ray job.

The job tests start a real Ray head (``ray start --head`` on 127.0.0.1, own ports and temp dir,
token authentication; see tests/ray_head.py), submit the pipeline on cluster/smoke.yaml exactly
as cluster/README.md shows, and stop only what they started.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray_head import BIN, RayHead, ray_head

from semisup.config import load_config
from semisup.pipeline import STAGES, read_manifest
from semisup.submit import DEFAULT_ENV_VARS, DEFAULT_EXCLUDES, job_runtime_env

DEFAULT_STAGES = [name for name, stage in STAGES.items() if stage.default]

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
KUBERAY_SCHEMAS = (
    Path(os.environ.get("SEMISUP_SCHEMAS", REPO_ROOT.parent / "shared" / "schemas")) / "kuberay"
)


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# Configs


def test_launcher_config_validates_against_the_ray_schema() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = read_yaml(CLUSTER / "launcher.yaml")
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks, defaults filled
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"GPU": 0}
    workers = config["available_node_types"]["gpu_worker"]
    assert 0 == workers["min_workers"] < workers["max_workers"] <= config["max_workers"]
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    assert "./cluster" in config["file_mounts"].values()
    assert any(
        "pip install" in command and "semisup" in command for command in config["setup_commands"]
    )
    misspelt = {**config, "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(misspelt, schema)


def crd_schema(name: str) -> dict[str, Any]:
    """The ray.io/v1 schema of a KubeRay CRD, closed: unknown fields are errors.

    Kubernetes prunes unknown fields silently and ``kubectl apply --validate=strict`` rejects
    them; closing every object that lists its properties makes a misspelt key fail here too.
    """
    path = KUBERAY_SCHEMAS / f"ray.io_{name}.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas are absent ({path}; set SEMISUP_SCHEMAS)")
    crd = read_yaml(path)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema  # type: ignore[no-any-return]


def kuberay_validator(name: str) -> Any:
    import jsonschema

    return jsonschema.Draft7Validator(crd_schema(name))


def test_kuberay_manifests_validate_against_the_crds() -> None:
    cluster = read_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    job = read_yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    cluster_validator, job_validator = (
        kuberay_validator("rayclusters"),
        kuberay_validator("rayjobs"),
    )
    cluster_validator.validate(cluster)
    job_validator.validate(job)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # one cluster shape, kept in sync
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "template"
    ]["spec"]["tolerations"]
    head = cluster["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # the job runs `semisup run` on a config that exists and reads strictly
    command = job["spec"]["entrypoint"].split()
    assert command[:3] == ["semisup", "run", "--config"]
    load_config(REPO_ROOT / command[3])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and "/.venv" in runtime_env["excludes"]
    # the check is strict: a misspelt field is an error that names it
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    errors = list(job_validator.iter_errors(misspelt))
    assert errors and "maxReplica" in str(errors[0].message)


def test_runtime_env_example_matches_what_semisup_submit_sends() -> None:
    example = read_yaml(CLUSTER / "runtime_env.yaml")
    assert tuple(example["excludes"]) == DEFAULT_EXCLUDES
    assert example["env_vars"] == DEFAULT_ENV_VARS
    merged = job_runtime_env(REPO_ROOT, {"excludes": ["/scratch"], "env_vars": {"A": "1"}})
    assert merged["working_dir"] == str(REPO_ROOT)
    assert merged["excludes"] == [*DEFAULT_EXCLUDES, "/scratch"]
    assert merged["env_vars"] == {**DEFAULT_ENV_VARS, "A": "1"}


@pytest.mark.parametrize("name", ["smoke.yaml", "smoke_two_nodes.yaml", "dubai.yaml"])
def test_experiment_configs_load_strictly(name: str) -> None:
    config = load_config(CLUSTER / name)
    assert config.name and config.pipeline.out
    assert not config.pipeline.stages or set(config.pipeline.stages) <= set(STAGES)


def test_placement_and_the_wait_for_lost_nodes_are_strict_and_reach_ray_train(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from semisup.config import ConfigError
    from semisup.train import PLACEMENT_STRATEGY, describe_node, failure_config, latest_checkpoint

    two_nodes = load_config(CLUSTER / "smoke_two_nodes.yaml")
    assert two_nodes.ray.placement == "spread" and PLACEMENT_STRATEGY["spread"] == "STRICT_SPREAD"
    assert two_nodes.train.num_workers == two_nodes.pipeline.pseudo_label_actors == 2
    assert load_config().ray.placement == "pack"
    with pytest.raises(ConfigError, match="ray.placement: got 'scatter'"):
        load_config(overrides=["ray.placement=scatter"])
    with pytest.raises(ConfigError, match="train.node_wait_s"):
        load_config(overrides=["train.node_wait_s=0"])
    # startups time out every START_TIMEOUT s: node_wait_s allows this many of them
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    config = failure_config(max_failures=2, node_wait_s=50)
    assert (config.max_failures, config.controller_failure_limit) == (2, 3)
    # the message's checkpoint: the newest, without the URL's credentials
    assert latest_checkpoint(str(tmp_path)) is None
    for name in ("checkpoint_2026-01-02_00-00-00.000001", "checkpoint_2026-01-01_23-59-59.0"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert (
        latest_checkpoint(str(tmp_path))
        == f"{tmp_path}/train/checkpoint_2026-01-02_00-00-00.000001"
    )
    node = {"address": "10.0.0.7", "resources": {"CPU": 8.0, "gpu_worker": 1.0, "node:10.0.0.7": 1}}
    assert describe_node("ab12", node) == "node ab12 (10.0.0.7, resources gpu_worker)"


def test_local_runs_start_their_own_ray_and_jobs_join_theirs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from semisup.config import RayConfig
    from semisup.runtime import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayConfig()) is None  # a new local Ray, never one `ray start` left
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # as `ray job submit` sets it for a job
    assert cluster_address(RayConfig()) == "10.0.0.5:6379"
    assert cluster_address(RayConfig(address="auto")) == "auto"
    assert cluster_address(RayConfig(address="auto"), local=True) is None


# ---------------------------------------------------------------------------------------------
# Jobs on a real Ray head


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as running:
        yield running


def submit_with_ray_cli(head: RayHead, out: Path, submission_id: str) -> str:
    """Exactly the command of cluster/README.md, run from the repository root."""
    return head.ray(
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "semisup",
        "run",
        "--config",
        "cluster/smoke.yaml",
        "--set",
        f"pipeline.out={out}",
        timeout=540,
        cwd=REPO_ROOT,
    )


def job_status(head: RayHead, submission_id: str) -> str:
    """The job's status, as ``ray job status`` reports it."""
    output = head.ray("job", "status", "--address", head.dashboard_url, submission_id)
    for said, status in (
        ("succeeded", "SUCCEEDED"),
        ("was stopped", "STOPPED"),
        ("failed", "FAILED"),
    ):
        if f"Job '{submission_id}' {said}" in output:
            return status
    match = re.search(rf"Status for job '{submission_id}': (\w+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_pipeline_runs_as_a_ray_job_and_a_resubmission_skips_it(
    head: RayHead, tmp_path: Path
) -> None:
    from ray._private.utils import read_ray_address

    # the head does not become what a plain ray.init() on this machine would join
    assert not (read_ray_address() or "").endswith(f":{head.gcs_address.rsplit(':', 1)[1]}")
    out = tmp_path / "smoke"
    job_id = f"smoke-{uuid.uuid4().hex[:8]}"
    submit_with_ray_cli(head, out, job_id)
    assert job_status(head, job_id) == "SUCCEEDED"
    # the run's outputs, from the job's own driver on the cluster
    manifest = read_manifest(out)
    assert {n: r["status"] for n, r in manifest["stages"].items()} == dict.fromkeys(
        DEFAULT_STAGES, "done"
    )
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [row["model"] for row in evaluation["rows"]][1:] == [
        "labels-only (teacher)",
        "semi-supervised (student)",
    ]
    for run in ("teacher", "student"):
        report = json.loads((out / run / "report.json").read_text())
        assert 0 < report["best_miou"] <= 1 and Path(report["best_checkpoint"]).is_file()
    # the logs are retrievable after the job ended, and show the shipped code ran, on the cluster
    logs = head.ray("job", "logs", "--address", head.dashboard_url, job_id)
    assert "[run] joined the Ray cluster at" in logs and "[run] evaluate: done" in logs
    shipped = re.search(r"code: semisup from (\S+)/semisup\n", logs)
    assert shipped, "the run log names the code it runs"
    package = Path(shipped.group(1))  # the working_dir as Ray unpacked it on the node
    assert package.is_relative_to(head.temp_dir) and "working_dir_files" in package.parts
    assert (package / "semisup" / "pipeline.py").is_file() and (package / "cluster").is_dir()
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    # `semisup submit` resubmits the same run: every stage is up to date, exit status 0
    resubmitted = subprocess.run(
        [
            str(BIN / "semisup"),
            "submit",
            "--address",
            head.dashboard_url,
            "--",
            "semisup",
            "run",
            "--config",
            "cluster/smoke.yaml",
            "--set",
            f"pipeline.out={out}",
        ],
        env=head.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resubmitted.returncode == 0, resubmitted.stderr[-3000:]
    for name in DEFAULT_STAGES:
        assert f"[run] {name}: up to date, skipped" in resubmitted.stdout
    assert f"finished: 0 stage(s) ran, {len(DEFAULT_STAGES)} up to date" in resubmitted.stdout
    assert "SUCCEEDED" in resubmitted.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_stopped_mid_way_resumes_when_resubmitted(head: RayHead, tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    first = f"smoke-{uuid.uuid4().hex[:8]}"
    head.ray(
        "job",
        "submit",
        "--no-wait",
        "--address",
        head.dashboard_url,
        "--submission-id",
        first,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "semisup",
        "run",
        "--config",
        "cluster/smoke.yaml",
        "--set",
        f"pipeline.out={out}",
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 400
    while _stage_status(out, "teacher") != "running":
        assert time.monotonic() < deadline and job_status(head, first) in ("PENDING", "RUNNING")
        time.sleep(1)
    head.ray("job", "stop", "--address", head.dashboard_url, first)
    while job_status(head, first) not in ("STOPPED", "FAILED"):
        time.sleep(1)
    stages = read_manifest(out)["stages"]
    assert [stages[n]["status"] for n in ("prep", "stream", "zero-shot")] == ["done"] * 3
    assert stages["teacher"]["status"] == "interrupted"  # SystemExit from Ray's SIGTERM handler
    second = f"smoke-{uuid.uuid4().hex[:8]}"
    submit_with_ray_cli(head, out, second)
    assert job_status(head, second) == "SUCCEEDED"
    logs = head.ray("job", "logs", "--address", head.dashboard_url, second)
    for name in ("prep", "stream", "zero-shot"):
        assert f"[run] {name}: up to date, skipped" in logs
    assert "[run] teacher: resuming the interrupted attempt 1" in logs
    manifest = read_manifest(out)
    assert manifest["stages"]["teacher"]["attempts"] == 2
    assert {n: r["status"] for n, r in manifest["stages"].items()} == dict.fromkeys(
        DEFAULT_STAGES, "done"
    )


def _stage_status(out: Path, name: str) -> str | None:
    try:
        return read_manifest(out)["stages"].get(name, {}).get("status")  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return None
