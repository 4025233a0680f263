"""``semisup experiment label-efficiency``: what labels and unlabeled tiles buy, measured.

Two questions, on one store, over several seeds:

1. Learning curve. At each label fraction of the training pool (the store's labeled and
   unlabeled tiles), three students: *labels-only* on the labelled subset, *semi-supervised*
   (that labels-only run as the teacher writes semantic pseudo-labels for the rest of the pool,
   then a student trains with consistency on labelled + pseudo-labelled tiles; optionally a
   second one starts from its teacher's weights, and further self-training rounds relabel the
   pool with the previous round's student and train a new one from scratch), and *full-label*
   on the whole pool.
2. Active learning against random selection. From the same seed set, rounds add tiles picked by
   the student's uncertainty (``semisup.selection``) or at random; each round retrains.

The store's validation tiles are divided by source into a *monitor* half, which training uses
for early stopping and the best checkpoint, and a *test* half, on which every number of the
report is measured: nothing is tuned on the tiles that are reported. Each run lives in
``OUT/runs/NAME`` and is reused when the experiment is run again (resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semisup import columns as C
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
)

LABELS_ONLY, SEMI, FULL = "labels_only", "semi_supervised", "full_label"
SEMI_WARM = "semi_supervised_warm"  # the semi-supervised student starts from its teacher
# the consistency path given the unlabeled tiles' ground truth at confidence 1 (ssl.target
# oracle): the most the machinery can recover; short of ~80 % of the gap, it is broken
ORACLE = "oracle"
SEMI_METHODS = {"scratch": SEMI, "teacher": SEMI_WARM, "oracle": ORACLE}  # by semi_init
# the semi-supervised student with the monitor half's images added to its unlabeled pool: a
# user mapping a region they hold imagery of (never the test half's images)
SEMI_TARGET_AREA = "semi_supervised_target_area"
# round r >= 2 of self-training: the pool relabelled by round r - 1's semi-supervised student,
# then a new student from scratch (ST++, Yang et al. 2022; Noisy Student, Xie et al. 2020)
SEMI_ROUND = "semi_supervised_round_{}"
MIN_ROOM = 0.03  # full − labels-only below this (mIoU): no room for unlabeled tiles to show
RANDOM, ACTIVE = "random", "active"


@dataclass(frozen=True)
class LabelEfficiencySettings:
    """What the experiment measures; the training recipe itself is the ExperimentConfig."""

    fractions: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4)  # of the training pool
    seeds: tuple[int, ...] = (0, 1, 2)  # >= 3 seeds: one run's checkpoints move by 0.03-0.08
    al_start_fraction: float = 1 / 16  # the shared seed set of both selection strategies
    al_rounds: int = 3  # rounds after the seed set
    al_round_fraction: float = 1 / 32  # of the pool, added per round
    al_measure: str = "entropy"
    al_diversity: float = 0.5
    pseudo_label_actors: int = 1
    # where semi-supervised students start: "scratch" (the base, as every other run) and/or
    # "teacher" (a warm start from the labels-only run that made the pseudo-labels); "oracle"
    # adds a run whose consistency targets are the ground truth (no teacher)
    semi_init: tuple[str, ...] = ("scratch",)
    target_area: bool = False  # also a student whose unlabeled pool holds the monitor images
    # semi-supervised rounds from scratch: round 1 learns from the labels-only teacher's
    # pseudo-labels, round r >= 2 from round r - 1's student's
    self_training_rounds: int = 1

    def __post_init__(self) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions: got {self.fractions}, expected values in (0, 1]")
        if not self.seeds:
            raise ConfigError("seeds: expected at least one seed")
        if not 0 < self.al_start_fraction < 1 or not 0 < self.al_round_fraction < 1:
            raise ConfigError("al_start_fraction and al_round_fraction: expected values in (0, 1)")
        if self.al_rounds < 0:
            raise ConfigError(f"al_rounds: got {self.al_rounds}, expected >= 0")
        if self.self_training_rounds < 1:
            raise ConfigError(
                f"self_training_rounds: got {self.self_training_rounds}, expected >= 1"
            )
        if self.self_training_rounds > 1 and "scratch" not in self.semi_init:
            raise ConfigError("self_training_rounds > 1: expected 'scratch' in semi_init")
        unknown = [init for init in self.semi_init if init not in SEMI_METHODS]
        if not self.semi_init or unknown:
            raise ConfigError(
                f"semi_init: got {self.semi_init}, expected one or more of {tuple(SEMI_METHODS)}"
            )


@dataclass(frozen=True)
class ExperimentTiles:
    """Tile ids of the experiment's fixed partition of the store."""

    pool: np.ndarray  # training pool: the store's labeled + unlabeled tiles with labels
    monitor: np.ndarray  # validation tiles used for early stopping
    test: np.ndarray  # validation tiles every reported number is measured on


def partition(index: pd.DataFrame) -> ExperimentTiles:
    """Pool, monitor and test tiles of a store's tile index (monitor/test split by source)."""
    usable = index[(index[C.VALID_FRACTION] > 0) & (index[C.LABEL_COVERAGE] > 0)]
    pool = usable[usable[C.SPLIT].isin([C.LABELED, C.UNLABELED])]
    val = usable[usable[C.SPLIT] == C.VAL]
    sources = sorted(val[C.SOURCE].unique())
    if len(sources) < 2:
        raise ValueError(
            f"the store's val split has {len(sources)} source(s); the experiment needs at least 2 "
            "to keep a monitor half for early stopping apart from the test half it reports on"
        )
    monitor_sources = set(sources[::2])  # alternate sources: both halves span the val area
    return ExperimentTiles(
        pool=np.sort(pool[C.TILE_ID].to_numpy()),
        monitor=np.sort(val.loc[val[C.SOURCE].isin(monitor_sources), C.TILE_ID].to_numpy()),
        test=np.sort(val.loc[~val[C.SOURCE].isin(monitor_sources), C.TILE_ID].to_numpy()),
    )


def subset_size(fraction: float, pool: int) -> int:
    """Tiles in ``fraction`` of a pool of ``pool`` tiles (at least one)."""
    return max(1, round(fraction * pool))


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(array),
    }


def tiles_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The fewest labelled tiles at which ``curve`` [(tiles, mIoU), ...] reaches ``target``."""
    reached = [tiles for tiles, miou in sorted(curve) if miou >= target - 1e-12]
    return reached[0] if reached else None


def gap_closed(labels_only: float, semi: float, full: float) -> float | None:
    """(semi − labels-only) / (full − labels-only): the share of the label gap SSL recovers."""
    gap = full - labels_only
    return (semi - labels_only) / gap if abs(gap) > 1e-9 else None


class Runner:
    """Runs (or reuses) the experiment's training runs under ``out/runs``."""

    def __init__(
        self,
        store: str,
        out: Path,
        config: ExperimentConfig,
        tiles: ExperimentTiles,
        settings: LabelEfficiencySettings,
        log: Callable[[str], None],
    ) -> None:
        self.store, self.out, self.config, self.tiles = store, out, config, tiles
        self.settings, self.log = settings, log
        self.labelled_by: Path | None = None  # the teacher of the store's pseudo-labels

    def train(
        self,
        name: str,
        labeled: np.ndarray,
        seed: int,
        semi: bool,
        init_from: Path | None = None,
        oracle: bool = False,
        extra_unlabeled: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One student on ``labeled`` (+ the rest of the pool when ``semi``), scored on test.

        ``init_from``: a run folder whose best adapter the student starts from. ``oracle``: the
        consistency targets are the pool's ground truth (``ssl.target=oracle``).
        ``extra_unlabeled``: more unlabeled tiles (the monitor half, for the target-area run).
        """
        from semisup.evaluate import evaluate_run
        from semisup.train import run_training

        run_dir = self.out / "runs" / name
        result_file = run_dir / "test.json"
        if result_file.is_file():
            self.log(f"{name}: done earlier, reused")
            return dict(json.loads(result_file.read_text()))
        if run_dir.exists():  # an interrupted run: start it again from scratch
            import shutil

            shutil.rmtree(run_dir)
        config = self.config
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(
                config.train, seed=seed, init_from=None if init_from is None else str(init_from)
            ),
            ssl=dataclasses.replace(
                config.ssl, enabled=semi, target="oracle" if oracle else config.ssl.target
            ),
        )
        unlabeled = np.setdiff1d(self.tiles.pool, labeled) if semi else np.array([], np.int64)
        if semi and extra_unlabeled is not None:
            unlabeled = np.union1d(unlabeled, extra_unlabeled)
        splits = {
            C.LABELED: labeled.tolist(),
            C.UNLABELED: unlabeled.tolist(),
            C.VAL: self.tiles.monitor.tolist(),
        }
        start = time.perf_counter()
        report = run_training(self.store, config, run_dir, splits=splits)
        test = evaluate_run(self.store, run_dir, self.tiles.test.tolist())
        result = {
            "name": name,
            "seed": seed,
            "labeled_tiles": len(labeled),
            "unlabeled_tiles": len(unlabeled),
            "monitor_miou": report["best_miou"],
            "best_epoch": report["best_epoch"],
            "test_miou": test["miou"],
            "test_iou_per_class": test["iou_per_class"],
            "seconds": round(time.perf_counter() - start, 1),
            "labeled_ids": labeled.tolist(),  # which tiles: a rerun reuses an active pick
        }
        last = report["epochs"][-1]["train"] if report["epochs"] else {}
        for key in ("mask_ratio", "pseudo_accuracy"):  # the consistency term, after ramp-up
            if key in last:
                result[key] = last[key]
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        self.log(f"{name}: test mIoU {test['miou']:.4f} ({result['seconds']} s)")
        return result

    def pseudo_label(self, teacher_run: Path, seed: int) -> None:
        """Semantic pseudo-labels of the whole pool from ``teacher_run`` (replacing earlier ones).

        The store holds one set of pseudo-labels: a teacher's stay until another one's replace
        them, so the semi-supervised runs of one teacher share one labelling pass.
        """
        from semisup.actor_pool import ActorPoolConfig
        from semisup.pseudo_label import run_pseudo_label
        from semisup.teacher import TeacherConfig

        if self.labelled_by == teacher_run:
            return

        teacher = TeacherConfig(
            mode="semantic",
            model_type=self.config.student.model_type,
            checkpoint=str(teacher_run / "best"),
            base_checkpoint=self.config.student.checkpoint,
            seed=seed,
        )
        run_pseudo_label(
            self.store,
            teacher,
            pool=ActorPoolConfig(actors=self.settings.pseudo_label_actors),
            split=[C.LABELED, C.UNLABELED] + ([C.VAL] if self.settings.target_area else []),
            overwrite=True,
            log=None,
        )
        self.labelled_by = teacher_run

    def select(self, run_dir: Path, labeled: np.ndarray, count: int, then: str) -> np.ndarray:
        """``count`` more tiles of the pool, by uncertainty of ``run_dir``'s student.

        When the run ``then`` that trains on the pick has finished earlier, its recorded tiles are
        the pick (scoring again would give the same tiles, at the cost of a pass over the pool).
        """
        from semisup.selection import SCORE_PREFIX, proposals, score_tiles
        from semisup.store import read_tile_index

        done = self.out / "runs" / then / "test.json"
        if done.is_file() and "labeled_ids" in (recorded := json.loads(done.read_text())):
            return np.asarray(recorded["labeled_ids"], dtype=labeled.dtype)
        candidates = np.setdiff1d(self.tiles.pool, labeled)
        measure = self.settings.al_measure
        scores = score_tiles(
            self.store,
            run_dir,
            tuple(dict.fromkeys(("entropy", measure))),
            tile_ids=candidates.tolist(),
        )
        index = read_tile_index(self.store).to_pandas()
        size = int(index[C.HEIGHT].max())
        chosen = proposals(
            index,
            scores,
            measure,
            count,
            diversity=self.settings.al_diversity,
            radius_px=2.0 * size,
        )
        assert SCORE_PREFIX + measure in chosen
        return np.sort(np.concatenate([labeled, chosen[C.TILE_ID].to_numpy()]))


def learning_curve(runner: Runner, seed: int) -> list[dict[str, Any]]:
    """Labels-only, semi-supervised and full-label results of one seed at every fraction."""
    pool, settings = runner.tiles.pool, runner.settings
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool)  # nested subsets: 1/16 ⊂ 1/8 ⊂ 1/4 for one seed
    rows = []
    for fraction in settings.fractions:
        labeled = np.sort(order[: subset_size(fraction, len(pool))])
        tag = f"f{fraction:.4f}_s{seed}"
        only = runner.train(f"labels_only_{tag}", labeled, seed, semi=False)
        rows.append({"method": LABELS_ONLY, "fraction": fraction, **only})
        teacher = runner.out / "runs" / f"labels_only_{tag}"
        for init in settings.semi_init:
            if init == "oracle":
                oracle = runner.train(f"oracle_{tag}", labeled, seed, semi=True, oracle=True)
                rows.append({"method": ORACLE, "fraction": fraction, **oracle})
                continue
            semi_name = f"semi_{tag}" if init == "scratch" else f"semi_warm_{tag}"
            if not (runner.out / "runs" / semi_name / "test.json").is_file():
                runner.pseudo_label(teacher, seed)
            warm = teacher if init == "teacher" else None
            semi = runner.train(semi_name, labeled, seed, semi=True, init_from=warm)
            rows.append({"method": SEMI_METHODS[init], "fraction": fraction, **semi})
            if init == "scratch":
                rows += self_training(runner, labeled, seed, fraction, tag)
        if settings.target_area:
            name = f"semi_target_area_{tag}"
            if not (runner.out / "runs" / name / "test.json").is_file():
                runner.pseudo_label(teacher, seed)
            area = runner.train(
                name, labeled, seed, semi=True, extra_unlabeled=runner.tiles.monitor
            )
            rows.append({"method": SEMI_TARGET_AREA, "fraction": fraction, **area})
    full = runner.train(f"full_s{seed}", pool, seed, semi=False)
    rows.append({"method": FULL, "fraction": 1.0, **full})
    return rows


def self_training(
    runner: Runner, labeled: np.ndarray, seed: int, fraction: float, tag: str
) -> list[dict[str, Any]]:
    """Rounds 2.. of self-training at one fraction: each relabels the pool with the previous
    round's semi-supervised student (run ``semi_TAG`` is round 1) and trains a new student."""
    rows = []
    teacher = runner.out / "runs" / f"semi_{tag}"
    for round_ in range(2, runner.settings.self_training_rounds + 1):
        name = f"semi_r{round_}_{tag}"
        if not (runner.out / "runs" / name / "test.json").is_file():
            runner.pseudo_label(teacher, seed)
        result = runner.train(name, labeled, seed, semi=True)
        rows.append({"method": SEMI_ROUND.format(round_), "fraction": fraction, **result})
        teacher = runner.out / "runs" / name
    return rows


def active_learning(runner: Runner, seed: int) -> list[dict[str, Any]]:
    """Rounds of random and uncertainty selection from one shared seed set (none without
    rounds: ``al_rounds`` 0 measures the learning curve only)."""
    pool, settings = runner.tiles.pool, runner.settings
    if settings.al_rounds == 0:
        return []
    rng = np.random.default_rng(10_000 + seed)
    start = np.sort(rng.permutation(pool)[: subset_size(settings.al_start_fraction, len(pool))])
    step = subset_size(settings.al_round_fraction, len(pool))
    rows = []
    for strategy in (RANDOM, ACTIVE):
        labeled = start
        picker = np.random.default_rng(20_000 + seed)
        for round_ in range(settings.al_rounds + 1):
            name = f"al_{strategy}_r{round_}_s{seed}" if round_ else f"al_start_s{seed}"
            result = runner.train(name, labeled, seed, semi=False)
            rows.append({"strategy": strategy, "round": round_, **result})
            if round_ == settings.al_rounds:
                break
            if strategy == RANDOM:
                rest = np.setdiff1d(pool, labeled)
                more = picker.choice(rest, size=min(step, len(rest)), replace=False)
                labeled = np.sort(np.concatenate([labeled, more]))
            else:
                then = f"al_{strategy}_r{round_ + 1}_s{seed}"
                labeled = runner.select(runner.out / "runs" / name, labeled, step, then)
    return rows


def class_means(per_run: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Mean IoU of each class over runs (None where a class is absent from every run's tiles)."""
    array = np.array([[np.nan if v is None else v for v in run] for run in per_run], np.float64)
    with warnings.catch_warnings():  # an all-NaN column is an absent class, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(array, axis=0)
    return [None if np.isnan(v) else float(v) for v in means]


def ssl_gains(curve: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """Per semi-supervised method and label fraction: what the unlabelled tiles bought.

    ``semi_minus_labels_only`` compares the seed means; ``paired_gain`` summarises the
    per-seed differences (one seed's semi-supervised run against the labels-only run that was
    its teacher, on the same labelled tiles), which cancels the spread between label subsets.
    """
    full = curve.loc[curve["method"] == FULL, "test_miou"].mean()
    only_runs = curve[curve["method"] == LABELS_ONLY].set_index(["fraction", "seed"])["test_miou"]
    gains: dict[str, dict[str, dict[str, Any]]] = {}
    semi_methods = curve["method"].isin([*SEMI_METHODS.values(), SEMI_TARGET_AREA]) | curve[
        "method"
    ].str.startswith(SEMI_ROUND.format(""))
    for (method, fraction), group in curve[semi_methods].groupby(["method", "fraction"]):
        only = only_runs.loc[fraction]
        semi = group.set_index("seed")["test_miou"]
        paired = (semi - only.reindex(semi.index)).dropna()
        gains.setdefault(method, {})[f"{fraction:.4f}"] = {
            "semi_minus_labels_only": float(semi.mean() - only.mean()),
            "paired_gain": summarise(paired.tolist()) if len(paired) else None,
            "semi_over_full": float(semi.mean() / full) if full > 0 else None,
            "gap_closed": gap_closed(float(only.mean()), float(semi.mean()), float(full)),
        }
    return gains


def room(curve: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per label fraction: full-label minus labels-only test mIoU (seed means), the most
    unlabeled tiles can add; below ``MIN_ROOM`` no gain could be told from the seed spread."""
    full = curve.loc[curve["method"] == FULL, "test_miou"].mean()
    only = curve[curve["method"] == LABELS_ONLY].groupby("fraction")["test_miou"].mean()
    return {
        f"{fraction:.4f}": {"gap": float(full - value), "room": bool(full - value >= MIN_ROOM)}
        for fraction, value in only.items()
    }


def analyse(curve: pd.DataFrame, rounds: pd.DataFrame) -> dict[str, Any]:
    """Means and spreads over seeds, the gap closed, and the tiles each strategy needs."""
    result: dict[str, Any] = {"learning_curve": {}, "active_learning": {}}
    for (method, fraction), group in curve.groupby(["method", "fraction"]):
        entry: dict[str, Any] = {
            "test_miou": summarise(group["test_miou"].tolist()),
            "labeled_tiles": int(group["labeled_tiles"].iloc[0]),
        }
        if "test_iou_per_class" in group:
            entry["test_iou_per_class"] = class_means(group["test_iou_per_class"].tolist())
        for key in ("mask_ratio", "pseudo_accuracy"):  # the consistency term's last epoch
            if key in group and group[key].notna().any():
                entry[key] = summarise(group[key].dropna().tolist())
        result["learning_curve"].setdefault(method, {})[f"{fraction:.4f}"] = entry
    result["ssl_gain"] = ssl_gains(curve)
    result["room"] = room(curve)
    if rounds.empty:
        return result
    needed: dict[str, list[int | None]] = {RANDOM: [], ACTIVE: []}
    for _seed, group in rounds.groupby("seed"):
        random_curve = group[group["strategy"] == RANDOM]
        target = float(random_curve.sort_values("round")["test_miou"].iloc[-1])
        for strategy in (RANDOM, ACTIVE):
            points = group[group["strategy"] == strategy]
            curve_points = list(zip(points["labeled_tiles"], points["test_miou"], strict=True))
            needed[strategy].append(tiles_to_reach(curve_points, target))
    for (strategy, round_), group in rounds.groupby(["strategy", "round"]):
        result["active_learning"].setdefault(strategy, {})[str(round_)] = {
            "labeled_tiles": int(group["labeled_tiles"].iloc[0]),
            "test_miou": summarise(group["test_miou"].tolist()),
        }
    reached = [
        (r, a) for r, a in zip(needed[RANDOM], needed[ACTIVE], strict=True) if r and a is not None
    ]
    means = rounds.groupby(["strategy", "labeled_tiles"])["test_miou"].mean()
    mean_target = float(means[RANDOM].sort_index().iloc[-1])
    result["tiles_to_reach_random_final"] = {
        "per_seed": needed,
        "on_mean_curves": {  # the same question asked of the seed-mean curves
            strategy: tiles_to_reach(list(means[strategy].items()), mean_target)
            for strategy in (RANDOM, ACTIVE)
        },
        "label_saving": summarise([1 - a / r for r, a in reached]) if reached else None,
        "active_reached_in_seeds": f"{len(reached)}/{len(needed[RANDOM])}",
    }
    return result


def run_label_efficiency(
    store: str,
    out: Path,
    config: ExperimentConfig,
    settings: LabelEfficiencySettings | None = None,
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Run (or resume) the experiment; writes OUT/report.json, report.md and the plots."""
    from semisup.runtime import ray_runtime
    from semisup.store import read_tile_index

    settings = settings or LabelEfficiencySettings()
    out.mkdir(parents=True, exist_ok=True)
    tiles = partition(read_tile_index(store).to_pandas())

    def say(text: str) -> None:
        if log:
            print(f"[experiment] {text}", file=log, flush=True)

    say(f"pool {len(tiles.pool)} tiles, monitor {len(tiles.monitor)}, test {len(tiles.test)}")
    runner = Runner(store, out, config, tiles, settings, say)
    curve_rows: list[dict[str, Any]] = []
    round_rows: list[dict[str, Any]] = []
    with ray_runtime(config.ray):
        for seed in settings.seeds:
            curve_rows += learning_curve(runner, seed)
            round_rows += active_learning(runner, seed)
    curve, rounds = pd.DataFrame(curve_rows), pd.DataFrame(round_rows)
    curve.drop(columns="labeled_ids", errors="ignore").to_csv(
        out / "learning_curve.csv", index=False
    )
    if not rounds.empty:
        rounds.drop(columns="labeled_ids", errors="ignore").to_csv(
            out / "active_learning.csv", index=False
        )
    report = {
        "store": store,
        "class_names": list(class_names(store)),
        "settings": dataclasses.asdict(settings),
        "tiles": {"pool": len(tiles.pool), "monitor": len(tiles.monitor), "test": len(tiles.test)},
        **analyse(curve, rounds),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_results(curve, rounds, out)
    (out / "report.md").write_text(format_report(report))
    say(f"report in {out / 'report.md'}")
    return report


def class_names(store: str) -> tuple[str, ...]:
    """The store's class names, or ``class i`` where it has none."""
    from semisup.store import open_store, read_store_meta

    meta = read_store_meta(open_store(store))
    return meta.class_names or tuple(f"class {i}" for i in range(meta.num_classes or 0))


def semi_supervised_methods(methods: Iterable[str]) -> list[str]:
    """The semi-supervised methods among ``methods``, in the report's order: the first round,
    the later self-training rounds, the warm start, the target area, the oracle."""
    present = set(methods)
    rounds = sorted(
        (m for m in present if m.startswith(SEMI_ROUND.format(""))),
        key=lambda m: int(m.rsplit("_", 1)[1]),
    )
    order = [SEMI, *rounds, SEMI_WARM, SEMI_TARGET_AREA, ORACLE]
    return [m for m in order if m in present]


def plot_results(curve: pd.DataFrame, rounds: pd.DataFrame, out: Path) -> None:
    """learning_curve.png and active_learning.png: test mIoU, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5, 3.5))
    for method in (LABELS_ONLY, *semi_supervised_methods(curve["method"].unique())):
        if not (curve["method"] == method).any():
            continue
        stats = curve[curve["method"] == method].groupby("labeled_tiles")["test_miou"]
        mean, std = stats.mean(), stats.std().fillna(0)
        ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3, label=method)
    full = curve.loc[curve["method"] == FULL, "test_miou"]
    ax.axhline(full.mean(), color="grey", linestyle="--", label="full_label")
    ax.set(xlabel="labelled tiles", ylabel="test mIoU", xscale="log")
    ax.legend()
    figure.tight_layout()
    figure.savefig(out / "learning_curve.png", dpi=100)
    plt.close(figure)
    if rounds.empty:
        return
    figure, ax = plt.subplots(figsize=(5, 3.5))
    for strategy in (RANDOM, ACTIVE):
        stats = rounds[rounds["strategy"] == strategy].groupby("labeled_tiles")["test_miou"]
        mean, std = stats.mean(), stats.std().fillna(0)
        ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3, label=strategy)
    ax.set(xlabel="labelled tiles", ylabel="test mIoU")
    ax.legend()
    figure.tight_layout()
    figure.savefig(out / "active_learning.png", dpi=100)
    plt.close(figure)


def _stat(stat: dict[str, float] | None, sign: str = "") -> str:
    return "–" if not stat else f"{stat['mean']:{sign}.3f} ± {stat['std']:.3f}"


def per_class_table(curve: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Markdown rows of test IoU per class (mean over seeds) for every method and fraction."""
    rows = [
        (method, key, entry["test_iou_per_class"])
        for method, by_fraction in curve.items()
        for key, entry in sorted(by_fraction.items())
        if entry.get("test_iou_per_class")
    ]
    if not rows:
        return []
    width = len(rows[0][2])
    names = list(names) if len(names) == width else [f"class {i}" for i in range(width)]
    lines = ["### Test IoU per class (mean over seeds)", ""]
    lines += ["| method | label fraction | " + " | ".join(names) + " |"]
    lines += ["|---|---|" + "---|" * width]
    for method, key, ious in rows:
        cells = " | ".join("–" if v is None else f"{v:.3f}" for v in ious)
        lines.append(f"| {method} | {float(key):.4f} | {cells} |")
    return [*lines, ""]


def format_report(report: dict[str, Any]) -> str:
    """The Markdown report: tables of test mIoU (mean ± std over seeds) and the plots."""
    curve = report["learning_curve"]
    seeds = report["settings"]["seeds"]
    lines = [
        "# Label efficiency",
        "",
        f"Store `{report['store']}`: pool {report['tiles']['pool']} tiles, early stopping on "
        f"{report['tiles']['monitor']} monitor tiles, every figure measured on "
        f"{report['tiles']['test']} test tiles never used for training or model selection. "
        f"Mean ± sample std over {len(seeds)} seed(s) {seeds}.",
        "",
        "## Learning curve (test mIoU)",
        "",
        "Gain: semi-supervised minus labels-only, per seed (the same labelled tiles), mean ± "
        "std. Gap closed: (semi − labels-only) / (full − labels-only) on the seed means.",
        "",
        f"Room: full − labels-only on the seed means; below {MIN_ROOM} a fraction has no room "
        "for unlabeled tiles to show a gain. The target-area student also has the monitor "
        "half's images (never the test half's) in its unlabeled pool; the others are strictly "
        "inductive.",
        "",
        "Unlabeled pixels used: the consistency term's mean weight over valid unlabeled pixels "
        "(`mask_ratio`) in the last epoch; their accuracy: the weight-weighted accuracy of its "
        "targets against the pool's ground truth (`pseudo_accuracy`).",
        "",
        "| label fraction | labelled tiles | method | test mIoU | gain | gap closed | of full "
        "| unlabeled pixels used | their accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, only in curve.get(LABELS_ONLY, {}).items():
        gap = report.get("room", {}).get(key)
        room_note = (
            "" if gap is None else f"room {gap['gap']:+.3f}{'' if gap['room'] else ' (no room)'}"
        )
        lines.append(
            f"| {float(key):.4f} | {only['labeled_tiles']} | {LABELS_ONLY} | "
            f"{_stat(only['test_miou'])} | {room_note} | | | | |"
        )
        for method in semi_supervised_methods(curve):
            if key not in curve.get(method, {}):
                continue
            gain, entry = report["ssl_gain"][method][key], curve[method][key]
            closed, share = gain["gap_closed"], gain["semi_over_full"]
            lines.append(
                f"| {float(key):.4f} | {only['labeled_tiles']} | {method} | "
                f"{_stat(entry['test_miou'])} | {_stat(gain['paired_gain'], '+')} | "
                f"{'–' if closed is None else f'{closed:.2f}'} | "
                f"{'–' if share is None else f'{share:.0%}'} | "
                f"{_stat(entry.get('mask_ratio'))} | {_stat(entry.get('pseudo_accuracy'))} |"
            )
    for key, full in curve.get(FULL, {}).items():
        lines.append(
            f"| {float(key):.4f} | {full['labeled_tiles']} | {FULL} | {_stat(full['test_miou'])} "
            "| | | | | |"
        )
    lines += ["", "![learning curve](learning_curve.png)", ""]
    lines += per_class_table(curve, report.get("class_names") or [])
    if not report["active_learning"]:
        return "\n".join(lines)
    lines += ["## Active learning (test mIoU)", ""]
    lines += ["| round | strategy | labelled tiles | test mIoU |", "|---|---|---|---|"]
    for strategy, by_round in report["active_learning"].items():
        for round_, row in sorted(by_round.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {round_} | {strategy} | {row['labeled_tiles']} | {_stat(row['test_miou'])} |"
            )
    reach = report["tiles_to_reach_random_final"]
    on_mean = reach.get("on_mean_curves", {})
    lines += [
        "",
        f"Labelled tiles needed to reach random selection's final mIoU, per seed: random "
        f"{reach['per_seed'][RANDOM]}, active {reach['per_seed'][ACTIVE]} (active reached it in "
        f"{reach['active_reached_in_seeds']} seeds); label saving {_stat(reach['label_saving'])}. "
        f"On the seed-mean curves: random {on_mean.get(RANDOM, '–')}, "
        f"active {on_mean.get(ACTIVE, '–')}.",
        "",
        "![active learning](active_learning.png)",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

EXAMPLE = (
    "semisup experiment label-efficiency --store dubai.zarr --out runs/label_efficiency --seed 0"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup experiment`` flags."""
    parser.add_argument("name", choices=["label-efficiency"], help="the experiment to run")
    parser.add_argument("--store", required=True, help="a labelled tile store (split by source)")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and the report")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument(
        "--fractions", default="0.0625,0.125,0.25", help="label fractions of the training pool"
    )
    parser.add_argument("--al-rounds", type=int, default=3, help="active-learning rounds")
    parser.add_argument(
        "--al-measure",
        default="entropy",
        choices=["entropy", "margin", "tta"],
        help="uncertainty that active learning ranks tiles by",
    )
    parser.add_argument(
        "--semi-init",
        default="scratch",
        metavar="INITS",
        help="where semi-supervised students start, comma-separated: scratch (the base, like "
        "every other run) and/or teacher (a warm start from their labels-only teacher)",
    )
    parser.add_argument(
        "--target-area",
        action="store_true",
        help="also train a semi-supervised student with the monitor half's images in its "
        "unlabeled pool (reported apart from the strictly inductive runs)",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also train, at each fraction, a student whose consistency targets are the pool's "
        "ground truth: the gap the consistency path can close at best",
    )
    parser.add_argument(
        "--self-training-rounds",
        type=int,
        default=1,
        metavar="N",
        help="semi-supervised rounds (default 1): round r >= 2 relabels the pool with round "
        "r - 1's student and trains a new student from scratch",
    )
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Run (or resume) the experiment and print where its report is."""
    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError as err:
        raise ConfigError(f"--fractions {args.fractions!r}: expected numbers like 0.125") from err
    settings = LabelEfficiencySettings(
        fractions=fractions,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        al_rounds=args.al_rounds,
        al_measure=args.al_measure,
        semi_init=tuple(init.strip() for init in args.semi_init.split(","))
        + (("oracle",) if args.oracle else ()),
        target_area=args.target_area,
        self_training_rounds=args.self_training_rounds,
    )
    run_label_efficiency(args.store, args.out, config_from_arguments(args), settings)
    print(f"report: {args.out / 'report.md'}")
    return 0
