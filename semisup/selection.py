"""``semisup select``: rank a store's unlabeled tiles by the trained student's uncertainty and
propose the next ones to label.

Tiles stream through Ray Data into a pool of :class:`TileScorer` actors that run the student of a
``semisup train`` run (its best adapter) and pool each uncertainty map of ``semisup.uncertainty``
to one score per tile; ``semisup.diversity.diverse_greedy`` then picks the budget. Outputs in
``--out``::

    selection.csv        rank, tile id, source, pixel window, geo bounds, every measured score
    selection.geojson    the chosen tiles' footprints in the source CRS, for an annotation tool
    contact_sheet.png    the chosen tiles with their uncertainty maps
    scores.csv           every candidate tile with its scores (for plots and other selections)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from semisup import columns as C
from semisup import uncertainty
from semisup.actor_pool import (
    ActorPoolConfig,
    cluster_cpus,
    map_with_pool,
    share_cpus,
    share_threads,
)
from semisup.config import ConfigError, load_config
from semisup.diversity import (
    crs_name,
    diverse_greedy,
    dumps_geojson,
    feature_collection,
    footprint_feature,
)
from semisup.evaluate import run_predictor
from semisup.labelstudio import DEFAULT_IMAGE_ROOT, write_tasks
from semisup.model_input import INFERENCE_BATCH

SCORE_PREFIX = "score_"
FORMATS = ("csv", "labelstudio")  # csv: selection.csv/geojson only; labelstudio: also tasks


class TileScorer:
    """Ray Data callable class: numpy tile batches -> one row per tile with its scores.

    Input columns IMAGE, VALID, SOURCE, TILE_ID (and PSEUDO_LABEL for ``disagreement``); output
    TILE_ID and ``score_<measure>`` float32 per requested measure.
    """

    def __init__(
        self,
        run: str,
        tile_size: int,
        band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
        measures: tuple[str, ...],
        top_fraction: float,
        torch_threads: int,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.predict = run_predictor(Path(run), tile_size)
        self.band_scale, self.measures, self.top_fraction = band_scale, measures, top_fraction

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = score_batch(self.predict, batch, self.band_scale, self.measures, self.top_fraction)
        out = {C.TILE_ID: np.asarray(batch[C.TILE_ID])}
        out.update({SCORE_PREFIX + name: value for name, value in scores.items()})
        return out


def uncertainty_maps(
    predict: Any,
    batch: Mapping[str, Any],
    band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    measures: tuple[str, ...],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({measure: B×S×S map in [0, 1]}, B×S×S valid mask) for one batch of tile columns."""
    from semisup.model_input import prepare_batch

    tensors = prepare_batch(batch, band_scale)
    probabilities = predict(tensors[C.IMAGE]).float().softmax(1)  # B×K×S×S
    maps: dict[str, torch.Tensor] = {}
    if "entropy" in measures:
        maps["entropy"] = uncertainty.entropy_map(probabilities)
    if "margin" in measures:
        maps["margin"] = uncertainty.margin_map(probabilities)
    if "disagreement" in measures:
        maps["disagreement"] = uncertainty.disagreement_map(probabilities, tensors[C.PSEUDO_LABEL])
    if "tta" in measures:
        maps["tta"] = uncertainty.tta_disagreement_map(
            uncertainty.tta_probabilities(predict, tensors[C.IMAGE])
        )
    return maps, tensors[C.VALID]


def score_batch(
    predict: Any,
    batch: Mapping[str, Any],
    band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    measures: tuple[str, ...],
    top_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """{measure: B float32 tile scores} for one batch of tile columns.

    A score is the pooled uncertainty of the tile's valid pixels times its valid fraction: the
    share of the tile that is uncertain and worth labelling. Without the factor, slivers of
    imagery at raster edges (mostly padding, and uncertain because of it) win the ranking.
    """
    maps, valid = uncertainty_maps(predict, batch, band_scale, measures)
    valid_fraction = valid.float().flatten(1).mean(1)  # B
    return {
        name: (uncertainty.pool_tile_scores(value, valid, top_fraction) * valid_fraction)
        .numpy()
        .astype(np.float32)
        for name, value in maps.items()
    }


def score_tiles(
    store: str,
    run: Path,
    measures: tuple[str, ...],
    *,
    top_fraction: float = 1.0,
    actors: int = 1,
    batch_size: int = INFERENCE_BATCH,
    tile_ids: list[int] | None = None,
) -> pd.DataFrame:
    """One row per candidate tile: TILE_ID and ``score_<measure>`` columns.

    Candidates are the store's unlabeled tiles, or exactly ``tile_ids`` when given.
    """

    from semisup.data import read_tiles
    from semisup.store import band_scales, store_facts

    facts = store_facts(store)
    band_scale = band_scales(facts)
    columns = [C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID]
    if "disagreement" in measures:
        columns += [C.PSEUDO_LABEL]
    split = C.UNLABELED if tile_ids is None else None
    tiles = read_tiles(store, split=split, columns=columns, tile_ids=tile_ids)
    cpus = cluster_cpus()
    # a fixed pool of scoring actors, each loading the student once; fractional CPUs leave
    # room for the read tasks
    pool = ActorPoolConfig(actors=actors, cpus_per_actor=share_cpus(actors, cpus, keep=0.5))
    scored = map_with_pool(
        tiles,
        TileScorer,
        pool,
        fn_constructor_kwargs={
            "run": str(run.resolve()),
            "tile_size": int(facts["tile_size"]),
            "band_scale": band_scale,
            "measures": measures,
            "top_fraction": top_fraction,
            "torch_threads": share_threads(actors, cpus),
        },
        batch_size=batch_size,
    )
    parts = [pd.DataFrame(b) for b in scored.iter_batches(batch_size=None, batch_format="numpy")]
    if not parts:
        raise ValueError(f"store {store}: no candidate tiles to select from")
    return pd.concat(parts, ignore_index=True)


def _source_crs(store: str) -> dict[str, str | None]:
    from semisup.store import open_store, read_source_meta, read_store_meta

    root = open_store(store)
    return {s: read_source_meta(root, s).crs for s in read_store_meta(root).sources}


def proposals(
    index: pd.DataFrame,
    scores: pd.DataFrame,
    measure: str,
    budget: int,
    *,
    diversity: float,
    radius_px: float,
) -> pd.DataFrame:
    """The chosen rows of the tile index, joined with their scores, with a 1-based ``rank``.

    The candidates are the tiles of ``scores``.
    """
    if SCORE_PREFIX + measure not in scores:
        raise ValueError(f"measure {measure!r} was not scored; scored: {list(scores)}")
    candidates = index.merge(scores, on=C.TILE_ID)
    centres = np.stack(
        [
            candidates[C.Y0] + candidates[C.HEIGHT] / 2,
            candidates[C.X0] + candidates[C.WIDTH] / 2,
        ],
        axis=1,
    )
    order = diverse_greedy(
        candidates[SCORE_PREFIX + measure].to_numpy(),
        candidates[C.SOURCE].astype(str).tolist(),
        centres,
        budget,
        diversity=diversity,
        radius_px=radius_px,
    )
    chosen = candidates.iloc[order].reset_index(drop=True)
    chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
    return chosen


def write_proposals(chosen: pd.DataFrame, store: str, out: Path, measure: str) -> dict[str, Path]:
    """selection.csv and selection.geojson (footprints in the source CRS) under ``out``."""
    crs_by_source = {s: crs_name(wkt) for s, wkt in _source_crs(store).items()}
    chosen = chosen.assign(crs=chosen[C.SOURCE].map(crs_by_source))
    paths = {"csv": out / "selection.csv", "geojson": out / "selection.geojson"}
    chosen.to_csv(paths["csv"], index=False)
    names = set(chosen["crs"].dropna())
    features = [
        footprint_feature(
            (row.minx, row.miny, row.maxx, row.maxy),
            {
                "rank": int(row.rank),
                C.TILE_ID: int(row.tile_id),
                C.SOURCE: str(row.source),
                "score": float(getattr(row, SCORE_PREFIX + measure)),
                "crs": row.crs,
            },
        )
        for row in chosen.itertuples()
    ]
    # one CRS for the file when every chosen tile shares it; otherwise each feature names its own
    collection = feature_collection(features, names.pop() if len(names) == 1 else None)
    paths["geojson"].write_text(dumps_geojson(collection))
    return paths


def contact_sheet(
    chosen: pd.DataFrame, store: str, run: Path, measure: str, path: Path, columns: int = 4
) -> Path:
    """A PNG grid: each chosen tile (as the teacher sees it) beside its uncertainty map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semisup.labelstudio import tile_rgb
    from semisup.store import (
        band_scales,
        open_store,
        read_store_meta,
        read_tile,
        read_window,
        store_facts,
    )

    root = open_store(store)
    size = read_store_meta(root).tile_size
    band_scale = band_scales(store_facts(store))
    predict = run_predictor(run, size)
    rows = max(1, -(-len(chosen) // columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(4 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    with torch.inference_mode():
        for i, row in enumerate(chosen.itertuples()):
            group = root[str(row.source)]
            y0, x0 = int(row.y0), int(row.x0)  # type: ignore[call-overload]
            tile = read_tile(group, y0, x0, size)  # type: ignore[arg-type]
            if measure == "disagreement":
                pseudo = group[C.PSEUDO_LABEL]  # type: ignore[index]
                tile[C.PSEUDO_LABEL] = read_window(pseudo, y0, x0, size, size, C.IGNORE_INDEX)
            batch = {k: v[None] for k, v in tile.items()}
            batch[C.SOURCE] = np.array([row.source])
            maps, _ = uncertainty_maps(predict, batch, band_scale, (measure,))
            image = tile_rgb(tile[C.IMAGE], *band_scale[row.source])
            ax_image, ax_map = axes.flat[2 * i], axes.flat[2 * i + 1]
            ax_image.imshow(image)
            ax_image.set_title(f"#{row.rank} tile {row.tile_id}", fontsize=7)
            nodata = ~tile[C.VALID]  # left unpainted
            shown = np.ma.masked_where(nodata, maps[measure][0].numpy())
            ax_map.imshow(shown, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax_map.set_title(f"{measure} {getattr(row, SCORE_PREFIX + measure):.3f}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


@torch.inference_mode()
def predicted_classes(
    chosen: pd.DataFrame, store: str, run: Path, batch_size: int = INFERENCE_BATCH
) -> dict[int, np.ndarray]:
    """Tile id -> HEIGHT×WIDTH uint8 argmax class map of the run's student over the tile's
    window (the padded tile is predicted, then cropped), ``IGNORE_INDEX`` at nodata."""
    from semisup.model_input import prepare_batch
    from semisup.store import band_scales, open_store, read_store_meta, read_tile, store_facts

    root = open_store(store)
    size = read_store_meta(root).tile_size
    band_scale = band_scales(store_facts(store))
    predict = run_predictor(run, size)
    rows = list(chosen.itertuples())
    classes: dict[int, np.ndarray] = {}
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        tiles = [read_tile(root[str(r.source)], int(r.y0), int(r.x0), size) for r in group]  # type: ignore[arg-type, call-overload]
        batch = {key: np.stack([t[key] for t in tiles]) for key in (C.IMAGE, C.VALID)}
        batch[C.SOURCE] = np.array([str(r.source) for r in group])
        tensors = prepare_batch(batch, band_scale)
        argmax = predict(tensors[C.IMAGE]).argmax(1).to(torch.uint8).numpy()  # B×S×S
        argmax[~batch[C.VALID]] = C.IGNORE_INDEX
        for r, prediction in zip(group, argmax, strict=True):
            classes[int(r.tile_id)] = prediction[: int(r.height), : int(r.width)].copy()  # type: ignore[call-overload]
    return classes


def run_select(
    store: str,
    run: Path,
    budget: int,
    out: Path,
    *,
    measure: str = "entropy",
    diversity: float = 0.5,
    radius_px: float | None = None,
    top_fraction: float = 1.0,
    actors: int = 1,
    sheet: bool = True,
    output_format: str = "csv",
    image_root: str = DEFAULT_IMAGE_ROOT,
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Score the unlabeled tiles, pick ``budget`` of them and write the proposals to ``out``.

    ``output_format`` "labelstudio" also writes ``out``/labelstudio (``labelstudio.write_tasks``):
    the chosen tiles as Label Studio tasks with the student's class maps as pre-annotations.
    """
    from semisup.store import open_store, read_store_meta, read_tile_index

    if measure not in uncertainty.MEASURES:
        raise ValueError(
            f"measure: got {measure!r}, expected one of {', '.join(uncertainty.MEASURES)}"
        )
    if output_format not in FORMATS:
        raise ValueError(f"format: got {output_format!r}, expected one of {', '.join(FORMATS)}")
    if not (run / "best").is_dir() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"run {run}: expected a `semisup train` run folder with config.yaml and best/"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose another --out")
    tile_size = read_store_meta(open_store(store)).tile_size
    measures = tuple(dict.fromkeys(("entropy", "margin", measure)))
    if measure == "disagreement" and C.PSEUDO_LABEL not in _pseudo_arrays(store):
        raise ValueError(
            f"measure 'disagreement' needs the teacher's pseudo-labels in {store}; run "
            "`semisup pseudo-label --mode semantic` first"
        )
    # the run's student is loaded once here: an adapter that cannot be read or does not fit
    # fails in one line before any scoring actor starts
    run_predictor(run, tile_size)
    start = time.perf_counter()
    if log:
        print(f"[select] scoring unlabeled tiles of {store} with {run}/best ...", file=log)
    scores = score_tiles(store, run, measures, top_fraction=top_fraction, actors=actors)
    index = read_tile_index(store).to_pandas()
    chosen = proposals(
        index, scores, measure, budget, diversity=diversity, radius_px=radius_px or 2.0 * tile_size
    )
    out.mkdir(parents=True, exist_ok=True)
    scores.merge(index, on=C.TILE_ID).to_csv(out / "scores.csv", index=False)
    paths = write_proposals(chosen, store, out, measure)
    if sheet and len(chosen):
        paths["contact_sheet"] = contact_sheet(
            chosen, store, run, measure, out / "contact_sheet.png"
        )
    if output_format == "labelstudio":
        tasks = write_tasks(
            store,
            chosen,
            out / "labelstudio",
            image_root=image_root,
            model_version=run.name,
            predictions=predicted_classes(chosen, store, run),
        )
        paths["labelstudio"] = tasks["tasks"]
    summary = {
        "candidates": len(scores),
        "selected": len(chosen),
        "measure": measure,
        "sources": int(chosen[C.SOURCE].nunique()) if len(chosen) else 0,
        "mean_score_selected": float(chosen[SCORE_PREFIX + measure].mean())
        if len(chosen)
        else None,
        "mean_score_all": float(scores[SCORE_PREFIX + measure].mean()),
        "seconds": round(time.perf_counter() - start, 2),
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    if log:
        print(
            f"[select] {summary['selected']} of {summary['candidates']} tiles from "
            f"{summary['sources']} sources -> {paths['csv']}",
            file=log,
        )
    return summary


def _pseudo_arrays(store: str) -> set[str]:
    from semisup.store import open_store, read_store_meta

    root = open_store(store)
    names: set[str] = set()
    for source in read_store_meta(root).sources:
        names |= set(root[source].array_keys())  # type: ignore[union-attr]
    return names


# ---------------------------------------------------------------------------------------------
# Command line

EXAMPLE = "semisup select --run demo_out/student --store demo_out/store.zarr --budget 16 --out demo_out/select"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup select`` flags."""
    parser.add_argument("--run", type=Path, required=True, help="a `semisup train` run folder")
    parser.add_argument(
        "--store",
        default=None,
        help="tile store the run trained on (default: store.zarr beside the run folder)",
    )
    parser.add_argument("--budget", type=int, required=True, help="tiles to propose")
    parser.add_argument("--out", type=Path, required=True, help="folder for the proposals")
    parser.add_argument(
        "--measure",
        default="entropy",
        choices=uncertainty.MEASURES,
        help="uncertainty: entropy, margin, disagreement (student vs the store's pseudo-labels) "
        "or tta (flip/rotation test-time augmentation; 6 forward passes per tile)",
    )
    parser.add_argument(
        "--diversity",
        type=float,
        default=0.5,
        help="0 = top-k by uncertainty; up to 1 = spread picks over places and sources",
    )
    parser.add_argument(
        "--radius-px",
        type=float,
        default=None,
        help="distance over which a pick discounts its neighbours (default: 2 tiles)",
    )
    parser.add_argument(
        "--top-fraction",
        type=float,
        default=1.0,
        help="pool each tile over its most uncertain fraction of valid pixels (default: all)",
    )
    parser.add_argument("--actors", type=int, default=1, help="scoring actors")
    parser.add_argument("--no-sheet", action="store_true", help="skip the PNG contact sheet")
    parser.add_argument(
        "--format",
        default="csv",
        choices=FORMATS,
        help="csv: selection.csv and selection.geojson; labelstudio: also OUT/labelstudio/ "
        "(tile PNGs, tasks.json with the student's prediction as pre-annotation, "
        "label_config.xml) for Label Studio",
    )
    parser.add_argument(
        "--image-root",
        default=DEFAULT_IMAGE_ROOT,
        help="prefix of each task's image URL, before the PNG's name (default: Label Studio "
        "local files with LOCAL_FILES_DOCUMENT_ROOT=OUT/labelstudio)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Score the unlabeled tiles and write the proposals; returns the exit status."""
    from semisup.runtime import ray_runtime

    store = args.store
    if store is None:
        guess = args.run.resolve().parent / "store.zarr"
        if not guess.is_dir():
            raise ConfigError(f"--store not given and {guess} does not exist")
        store = str(guess)
    config = load_config(args.run / "config.yaml") if (args.run / "config.yaml").is_file() else None
    with ray_runtime(config.ray if config else load_config().ray):
        summary = run_select(
            store,
            args.run,
            args.budget,
            args.out,
            measure=args.measure,
            diversity=args.diversity,
            radius_px=args.radius_px,
            top_fraction=args.top_fraction,
            actors=args.actors,
            sheet=not args.no_sheet,
            output_format=args.format,
            image_root=args.image_root,
        )
    print(
        f"proposed {summary['selected']} tiles (mean {summary['measure']} "
        f"{summary['mean_score_selected']:.3f} against {summary['mean_score_all']:.3f} over all "
        f"candidates); see {summary['outputs']['csv']}"
    )
    return 0
