"""``semisup tune``: a Ray Tune sweep over a named search space, with ASHA, resumable.

Each trial is a function that trains the student with ``semisup.train.run_training`` (a
``TorchTrainer``) and forwards its per-epoch validation mIoU to Tune, where ASHA stops the
trials that fall behind. The space is checked against the experiment config before any trial
starts. Afterwards the sweep's results are gathered into files beside the Tune experiment.

Output layout (``--out OUT``: a folder or any storage URL Ray accepts)::

    OUT/sweep.json               what was asked: store, space, base config, samples, search
    OUT/tune/                    the Tune experiment (resumable), one folder per trial:
      <trial>/events.out.tfevents.*   Tune's TensorBoard events of the trial
      <trial>/run/                    the trial's training run: config.yaml, report.json/.md,
                                      tensorboard/, best/adapter.safetensors, ray/ checkpoints
    OUT/trials.csv, trials.json  every trial: outcome, parameters, epochs, best validation mIoU
    OUT/summary.md               the same as a Markdown table, with the best trial
    OUT/tune_plot.png            best mIoU against each searched key, and learning curves
    OUT/best_config.yaml         the best trial's config, as ``semisup train --config`` reads it
    OUT/best_adapter.safetensors the best trial's best adapter
    OUT/tune_summary.json        ``run_tune``'s return value

``tensorboard --logdir OUT`` shows every trial's curves side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from semisup import search_space, storage, tune_report
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    from_dict,
    merge_overrides,
    require_segmentation,
    to_dict,
)
from semisup.runtime import API_SERVER_VARIABLE, ray_runtime
from semisup.tune_report import METRIC, TIME_ATTR

EXPERIMENT_NAME = "tune"  # fixed: Tuner.restore finds the sweep by its name under OUT
TRIAL_RUN_DIR = "run"  # the training run's folder inside each trial's folder
SWEEP_FILE = "sweep.json"
DRIVER_CPUS = 0.1  # the trial function only drives a TorchTrainer; its workers ask for their own
SEARCHES = ("random", "optuna")
SYNC_PERIOD_S = 15  # at most this often a trial's working folder is uploaded (remote OUT only)


# ---------------------------------------------------------------------------------------------
# Resources: how many trials fit at once


def trial_demand(config: ExperimentConfig) -> dict[str, float]:
    """Resources one trial holds while it trains: driver, Train workers, one read task."""
    train = config.train
    cpus = DRIVER_CPUS + train.num_workers * (0.0 if train.use_gpu else train.cpus_per_worker)
    demand = {"CPU": cpus + config.stream.read_cpus}
    if train.use_gpu:
        demand["GPU"] = float(train.num_workers)  # one GPU per worker (Ray Train's default)
    return demand


def max_concurrent_trials(cluster: Mapping[str, float], demand: Mapping[str, float]) -> int:
    """How many trials of ``demand`` fit in ``cluster`` at once; an error if not even one."""
    fits = []
    for resource, need in demand.items():
        have = float(cluster.get(resource, 0.0))
        if need > have:
            raise ConfigError(
                f"one trial needs {need:g} {resource} (train.num_workers, "
                f"train.cpus_per_worker, stream.read_cpus, train.use_gpu) but the cluster has "
                f"{have:g}"
            )
        fits.append(math.floor(have / need + 1e-9) if need > 0 else sys.maxsize)
    return max(1, min(fits))


# ---------------------------------------------------------------------------------------------
# Driver side


def resolve_space(space: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, plain data) of a named space of ``tune_spaces``, or of a space given as data."""
    from tune_spaces import SPACES

    if isinstance(space, str):
        if space not in SPACES:
            raise ConfigError(f"unknown tune space {space!r}; known spaces: {', '.join(SPACES)}")
        return space, dict(SPACES[space])
    return "custom", dict(space)


def prepare_sweep(
    store: str, config: ExperimentConfig, space: str | Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, search_space.Dimension], ExperimentConfig]:
    """Check the space and the store against the config before any trial starts.

    Returns (space name, space data, dimensions, the base config of every trial). Trials report
    once per epoch, so step checkpoints (``train.checkpoint_every_steps``) are turned off.
    """
    from semisup.store import store_facts
    from semisup.train import check_store_for

    name, data = resolve_space(space)
    if config.train.checkpoint_every_steps:
        print(
            "[tune] train.checkpoint_every_steps set to 0: trials checkpoint every epoch",
            file=sys.stderr,
        )
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, checkpoint_every_steps=0)
        )
    facts = store_facts(store)
    dims = search_space.check_space(
        data, config, name, check=lambda c: check_store_for(c, facts, store)
    )
    return name, data, dims, config


def ray_param_space(
    dims: Mapping[str, search_space.Dimension], for_optuna: bool = False
) -> dict[str, Any]:
    """Tune distributions of the searched keys (constants and ties are applied in the trial).

    Optuna takes no grid, so for it a grid becomes a choice.
    """
    space: dict[str, Any] = {}
    for key, dim in dims.items():
        values = list(dim.values)
        if dim.kind == "choice" or (dim.kind == "grid" and for_optuna):
            space[key] = tune.choice(values)
        elif dim.kind == "grid":
            space[key] = tune.grid_search(values)
        elif dim.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif dim.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        elif dim.kind == "randint":
            space[key] = tune.randint(values[0], values[1] + 1)  # Tune's upper end is exclusive
    return space


def run_tune(
    store: str,
    config: ExperimentConfig,
    space: str | Mapping[str, Any],
    out: str | Path,
    *,
    samples: int,
    resume: bool = False,
    search: str = "random",
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    max_concurrent: int | None = None,
) -> dict[str, Any]:
    """Run (or with ``resume``, continue) a sweep of ``space`` over ``config``; see the module.

    ``space``: a name in ``tune_spaces.SPACES`` or plain space data. ``samples``: draws of the
    space (each draw runs every grid value). ASHA (``grace_period`` epochs, ``reduction_factor``)
    stops trials on validation mIoU. ``max_concurrent`` defaults to as many trials as the
    cluster's CPUs and GPUs hold. Returns a JSON-safe summary (also OUT/tune_summary.json).
    """
    out = storage.absolute(out)
    _check_arguments(config, samples, search)
    fs, root = storage.filesystem(out)
    saved = _check_sweep_folder(fs, root, out, resume)
    name, data, dims, config = prepare_sweep(store, config, space)
    request = {
        "store": store,
        "space": name,
        "space_data": data,
        "config": to_dict(config),
        "samples": samples,
        "search": search,
        "grace_period": grace_period,
        "reduction_factor": reduction_factor,
    }
    if saved is not None:  # a resumed sweep continues with what it was asked
        difference = _first_difference(json.loads(json.dumps(request)), saved)
        if difference:
            raise ConfigError(
                f"--resume: the sweep in {out} was started with {difference}; resume it with "
                "the same settings"
            )
    start = time.perf_counter()
    # a local Ray needs its dashboard: Train inside Tune frees a stopped trial's workers through it
    with ray_runtime(dataclasses.replace(config.ray, dashboard=True)):
        _require_dashboard()
        if os.environ.get(API_SERVER_VARIABLE):
            print(
                f"[tune] live trials in the Ray dashboard at {os.environ[API_SERVER_VARIABLE]}",
                file=sys.stderr,
            )
        if not resume:
            storage.write(fs, f"{root}/{SWEEP_FILE}", json.dumps(request, indent=2) + "\n")
        tuner = _tuner(request, config, dims, out, resume, max_concurrent)
        results = tuner.fit()
        records = _collect(results.experiment_path, fs, config, dims)
    experiment = storage.child(out, EXPERIMENT_NAME)
    summary = tune_report.write_outputs(fs, root, out, name, dims, config, records, experiment)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    storage.write(fs, f"{root}/tune_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _first_difference(given: Any, saved: Any, key: str = "") -> str:
    """'KEY=SAVED (not GIVEN)' for the first dotted key whose value differs; '' if none."""
    if isinstance(given, dict) and isinstance(saved, dict):
        for name in sorted(set(given) | set(saved)):
            found = _first_difference(
                given.get(name), saved.get(name), f"{key}.{name}" if key else name
            )
            if found:
                return found
        return ""
    return "" if given == saved else f"{key}={saved!r} (not {given!r})"


def _check_arguments(config: ExperimentConfig, samples: int, search: str) -> None:
    require_segmentation(config, "tune")
    if config.train.num_workers < 1:
        raise ConfigError(
            "train.num_workers: got 0 (the loop in this process), but Tune trials need >= 1: "
            "only Train workers report their epochs to Tune"
        )
    if samples < 1:
        raise ConfigError(f"samples: got {samples}, expected >= 1")
    if search not in SEARCHES:
        raise ConfigError(f"search: got {search!r}, expected one of {', '.join(SEARCHES)}")
    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search 'optuna' needs the optuna package (pip install optuna)")


def _check_sweep_folder(fs: Any, root: str, out: str, resume: bool) -> dict[str, Any] | None:
    """A new sweep needs a fresh OUT; a resumed one a sweep there, whose request is returned."""
    started = storage.exists(fs, f"{root}/{SWEEP_FILE}") or storage.exists(
        fs, f"{root}/{EXPERIMENT_NAME}"
    )
    if started and not resume:
        raise FileExistsError(
            f"{out} already holds a sweep; pass --resume to continue it or choose another --out"
        )
    if not resume:
        return None
    saved = storage.read_json(fs, f"{root}/{SWEEP_FILE}")
    if saved is None:
        raise FileNotFoundError(f"--resume: no sweep to continue in {out} (no {SWEEP_FILE})")
    return dict(saved)


def _require_dashboard() -> None:
    """Fail fast when the Ray dashboard (and its state API) is missing."""
    from ray.util.state import list_nodes

    try:
        # the state API Train's placement-group cleaner queries; served by the dashboard
        list_nodes(limit=1, timeout=30)
    except Exception as err:
        raise ConfigError(
            "Ray Tune with Ray Train needs the Ray dashboard's state API (trials stopped by ASHA "
            "free their workers through it, else the next trial waits forever): start Ray with "
            "include_dashboard=True (ray.dashboard: true), and with several Rays on this "
            "machine set RAY_API_SERVER_ADDRESS to its dashboard URL before it starts "
            f"(semisup.runtime.ray_runtime does both with ray.dashboard: true) ({err})"
        ) from err


def _tuner(
    request: Mapping[str, Any],
    config: ExperimentConfig,
    dims: Mapping[str, search_space.Dimension],
    out: str,
    resume: bool,
    max_concurrent: int | None,
) -> Any:
    """A new Tuner for ``request`` (see ``run_tune``), or the restored one of OUT."""
    import ray
    from ray.tune.schedulers import ASHAScheduler

    name = request["space"]
    demand = trial_demand(config)
    limit = max_concurrent or max_concurrent_trials(ray.cluster_resources(), demand)
    trainable = tune.with_resources(
        # the per-trial function with the sweep's settings bound (stored once in the object store)
        tune.with_parameters(
            train_trial,
            store=request["store"],
            base=to_dict(config),
            space=dict(request["space_data"]),
            name=name,
            out=out,
        ),
        # the trial process itself only drives Train, whose workers reserve their own CPUs/GPUs
        {"CPU": DRIVER_CPUS},
    )
    experiment = storage.child(out, EXPERIMENT_NAME)
    if resume:
        print(f"[tune] resuming the sweep in {experiment}", file=sys.stderr)
        # reloads the trials and the searcher (not the scheduler's rungs); finished trials are
        # not run again, unfinished ones start again and their trainer resumes its checkpoint
        return tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    search_alg = None
    if request["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=METRIC, mode="max")
    print(
        f"[tune] space {name!r}: {', '.join(k for k, d in dims.items() if d.searched)}; "
        f"{request['samples']} sample(s), up to {limit} trial(s) at once, each "
        f"{', '.join(f'{v:g} {k}' for k, v in demand.items())}",
        file=sys.stderr,
    )
    return tune.Tuner(
        trainable,
        param_space=ray_param_space(dims, for_optuna=search_alg is not None),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            # stops trials whose validation mIoU trails the others' at the same epoch
            scheduler=ASHAScheduler(
                time_attr=TIME_ATTR,
                max_t=config.train.epochs,
                grace_period=int(request["grace_period"]),
                reduction_factor=float(request["reduction_factor"]),
                stop_last_trials=False,
            ),
            search_alg=search_alg,
            num_samples=int(request["samples"]),
            max_concurrent_trials=limit,
        ),
        # a fixed experiment name under OUT: Tuner.restore finds the sweep there
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=out,
            callbacks=[TrialProgress()],
            # uploads each trial's working folder (its run, for a remote OUT) to the storage
            sync_config=tune.SyncConfig(sync_artifacts=True, sync_period=SYNC_PERIOD_S),
            verbose=0,
        ),
    )


def _collect(
    experiment_path: str,
    fs: Any,
    config: ExperimentConfig,
    dims: Mapping[str, search_space.Dimension],
) -> list[tune_report.TrialRecord]:
    """One record per trial, from Tune's saved experiment state and each trial's report."""
    from ray.tune import ExperimentAnalysis

    # the trials as Tune last saved them, with their status and sampled config
    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=fs)
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        run = f"{trial.path}/{TRIAL_RUN_DIR}"
        # the trainer's own report; what Tune received when the report has not reached a remote
        # storage (a trial's files are uploaded every SYNC_PERIOD_S and when it ends)
        report: dict[str, Any] | None = storage.read_json(
            fs, f"{run}/report.json"
        ) or tune_report.report_from_tune_results(frames.get(trial.trial_id))
        adapter = f"{run}/best/adapter.safetensors"
        epochs = report["epochs"] if report else []
        failed = trial.status == "ERROR"
        records.append(
            tune_report.TrialRecord(
                trial_id=trial.trial_id,
                outcome=tune_report.outcome(
                    trial.status, report, config.train.epochs, failed=failed
                ),
                params=search_space.assignment(config, dims, trial.config),
                epochs_done=len(epochs),
                best_miou=report["best_miou"] if report and epochs else None,
                best_epoch=report["best_epoch"] if report and epochs else None,
                curve=[e["miou"] for e in epochs],
                train_loss=[e["train"].get("loss", math.nan) for e in epochs],
                trial_path=str(trial.path),
                best_adapter=adapter if storage.exists(fs, adapter) else None,
                error=_error_text(fs, trial) if failed else None,
            )
        )
    return records


def _error_text(fs: Any, trial: Any) -> str:
    path = f"{trial.path}/error.txt"
    if not storage.exists(fs, path):
        return "failed (no error.txt)"
    with fs.open_input_stream(path) as stream:
        lines = stream.readall().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "failed"


# ---------------------------------------------------------------------------------------------
# Trial side


def train_trial(
    params: dict[str, Any],
    *,
    store: str,
    base: dict[str, Any],
    space: dict[str, Any],
    name: str,
    out: str,
) -> None:
    """One Tune trial: the student trained on Ray Train with this trial's config.

    The run folder sits in the trial's folder (for a remote OUT, in the trial's working folder,
    which Tune uploads); a trial restarted by a resumed sweep continues from its latest
    checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from semisup.train import run_training

    config = search_space.trial_config(
        from_dict(ExperimentConfig, base), search_space.parse_space(space, name), params
    )
    # the trial's folder name (get_trial_dir is its staging copy in this Ray session's temp dir)
    trial_name = Path(tune.get_context().get_trial_dir()).name
    if storage.is_local(out):
        run_dir = Path(storage.child(out, EXPERIMENT_NAME, trial_name, TRIAL_RUN_DIR))
    else:  # keep the Train checkpoints on the storage, where a resumed sweep finds them
        run_dir = Path.cwd() / TRIAL_RUN_DIR
        train_storage = config.train.storage or storage.child(
            out, EXPERIMENT_NAME, trial_name, "train"
        )
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, storage=train_storage)
        )
    run_training(
        store,
        config,
        run_dir,
        resume=(run_dir / "config.yaml").exists(),
        # forwards each epoch's metrics from the Train workers to this Tune trial
        callbacks=[TuneReportCallback()],
    )


class TrialProgress(tune.Callback):
    """One stderr line per trial epoch and per trial end (Tune's own table is turned off)."""

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if METRIC in result:
            print(
                f"[tune] {trial.trial_id} epoch {result.get(TIME_ATTR)}: val mIoU "
                f"{result[METRIC]:.4f}",
                file=sys.stderr,
                flush=True,
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[tune] {trial.trial_id} finished", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[tune] {trial.trial_id} failed", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup tune`` flags."""
    from tune_spaces import SPACES

    parser.add_argument("--store", help="tile store (path or fsspec URL); from OUT with --resume")
    parser.add_argument(
        "--space", choices=sorted(SPACES), help="named search space of tune_spaces/"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="sweep folder, or any storage URL Ray accepts (s3://, gs://, ...)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="draws of the space (each runs every grid value once); default 1",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep in --out; finished trials are not run again",
    )
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default=None,
        help="how trials are drawn: random/grid (default) or optuna (needs the optuna package)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="epochs every trial runs before ASHA may stop it (default 1)",
    )
    parser.add_argument(
        "--reduction-factor",
        type=float,
        default=None,
        help="ASHA keeps about 1/FACTOR of the trials at each rung (default 2)",
    )
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Run (or resume) the sweep and print its summary; returns the exit status."""
    saved: dict[str, Any] = {}
    if args.resume:  # settings not given again are those the sweep was started with
        fs, root = storage.filesystem(args.out)
        saved = storage.read_json(fs, f"{root}/{SWEEP_FILE}") or {}
    elif not args.store or not args.space:
        raise ConfigError("--store and --space are needed to start a sweep")
    if args.config is not None or "config" not in saved:
        config = config_from_arguments(args)
    else:  # --set overrides apply to the sweep's own config (and must not change it)
        config = from_dict(ExperimentConfig, merge_overrides(saved["config"], args.overrides))
    summary = run_tune(
        args.store or saved.get("store", ""),
        config,
        args.space or saved.get("space", ""),
        args.out,
        samples=args.samples or saved.get("samples", 1),
        resume=args.resume,
        search=args.search or saved.get("search", "random"),
        grace_period=args.grace_period or saved.get("grace_period", 1),
        reduction_factor=args.reduction_factor or saved.get("reduction_factor", 2.0),
    )
    print(
        f"best validation mIoU {summary['best_miou']} (trial {summary['best_trial']}); "
        f"summary in {summary['summary_md']}, plot in {summary['plot']}"
    )
    return 0
