"""`semisup select` end to end: a trained run scores the unlabeled tiles and proposes a budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.ingest import build_store
from semisup import columns as C
from semisup.cli import main
from semisup.config import load_config
from semisup.selection import SCORE_PREFIX, run_select
from semisup.store import open_store, read_source_meta, read_tile_index
from semisup.synthetic import write_scenes
from semisup.train import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[str, Path]:
    """A georeferenced 5-scene store (64 px tiles, 3 unlabeled sources) and a short debug run."""
    root = tmp_path_factory.mktemp("select")
    images, masks = write_scenes(root, count=5, size=256, seed=21)
    store = build_store(
        [images],
        root / "store.zarr",
        labels=[masks],
        num_classes=5,
        config={"tile_size": 64, "val_sources": ["scene_4"], "labeled_fraction": 0.25, "seed": 2},
        quiet=True,
    ).path
    config = load_config(
        overrides=[
            "student.model_type=tiny",
            "ssl.enabled=false",
            "train.batch_size=4",
            "train.epochs=1",
            "train.steps_per_epoch=6",
            "stream.tiles_per_task=16",
        ]
    )
    run_training(str(store), config, root / "run", debug=True)
    return str(store), root / "run"


@pytest.mark.timeout(400)
def test_selection_respects_the_budget_and_spreads_over_sources(
    trained: tuple[str, Path], tmp_path: Path
) -> None:
    store, run = trained
    summary = run_select(store, run, 6, tmp_path / "sel", measure="entropy", diversity=0.8)
    index = read_tile_index(store).to_pandas()
    chosen = pd.read_csv(tmp_path / "sel" / "selection.csv")
    unlabeled = index[index[C.SPLIT] == C.UNLABELED]
    assert len(chosen) == summary["selected"] == 6
    assert chosen["rank"].tolist() == list(range(1, 7))
    assert set(chosen[C.TILE_ID]) <= set(unlabeled[C.TILE_ID])  # never a labelled or val tile
    assert chosen[C.TILE_ID].is_unique
    assert chosen[C.SOURCE].nunique() == unlabeled[C.SOURCE].nunique() == summary["sources"]
    scores = pd.read_csv(tmp_path / "sel" / "scores.csv")
    assert len(scores) == summary["candidates"] == int((unlabeled["valid_fraction"] > 0).sum())
    values = scores[SCORE_PREFIX + "entropy"]
    assert values.between(0, 1).all() and values.std() > 0  # a real model, not a constant
    assert summary["mean_score_selected"] >= summary["mean_score_all"]
    assert (tmp_path / "sel" / "contact_sheet.png").stat().st_size > 5000
    assert not (tmp_path / "sel" / "labelstudio").exists()  # only with --format labelstudio

    # footprints: the store's geo bounds, which are the source transform applied to the window
    geojson = json.loads((tmp_path / "sel" / "selection.geojson").read_text())
    assert geojson["crs"]["properties"]["name"] == "EPSG:32640"
    root = open_store(store)
    by_id = index.set_index(C.TILE_ID)
    for feature in geojson["features"]:
        tile = by_id.loc[feature["properties"][C.TILE_ID]]
        ring = np.array(feature["geometry"]["coordinates"][0])
        a, b, c, d, e, f = read_source_meta(root, tile[C.SOURCE]).transform  # type: ignore[misc]
        x0, y0, x1, y1 = (
            tile[C.X0],
            tile[C.Y0],
            tile[C.X0] + tile[C.WIDTH],
            tile[C.Y0] + tile[C.HEIGHT],
        )
        xs, ys = [c + a * x0, c + a * x1], [f + e * y0, f + e * y1]
        assert ring[:, 0].min() == pytest.approx(min(xs)) and ring[:, 0].max() == pytest.approx(
            max(xs)
        )
        assert ring[:, 1].min() == pytest.approx(min(ys)) and ring[:, 1].max() == pytest.approx(
            max(ys)
        )
        assert (ring[:, 0].min(), ring[:, 1].min()) == pytest.approx((tile["minx"], tile["miny"]))


@pytest.mark.timeout(400)
def test_select_cli_with_tta_and_clear_errors(
    trained: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, run = trained
    out = tmp_path / "tta"
    argv = [
        "select",
        "--run",
        str(run),
        "--store",
        store,
        "--budget",
        "3",
        "--out",
        str(out),
        "--measure",
        "tta",
        "--no-sheet",
    ]
    assert main(argv) == 0
    chosen = pd.read_csv(out / "selection.csv")
    assert len(chosen) == 3 and chosen[SCORE_PREFIX + "tta"].between(0, 1).all()
    assert not (out / "contact_sheet.png").exists()
    assert main(argv) == 2  # the folder is not empty: nothing is overwritten
    assert "not empty" in capsys.readouterr().err
    bad = [
        "select",
        "--run",
        str(run),
        "--store",
        store,
        "--budget",
        "3",
        "--out",
        str(tmp_path / "d"),
        "--measure",
        "disagreement",
    ]
    assert main(bad) == 2
    assert "pseudo-labels" in capsys.readouterr().err
    assert (
        main(
            [
                "select",
                "--run",
                str(tmp_path),
                "--store",
                store,
                "--budget",
                "3",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "run folder" in capsys.readouterr().err


@pytest.mark.timeout(400)
def test_labelstudio_format_attaches_the_students_class_maps(
    trained: tuple[str, Path], tmp_path: Path
) -> None:
    from semisup.data import read_tiles
    from semisup.evaluate import run_predictor
    from semisup.labelstudio import export_masks, tile_name
    from semisup.model_input import prepare_batch
    from semisup.store import band_scales, store_facts

    store, run = trained
    out = tmp_path / "ls"
    argv = [
        "select",
        "--run",
        str(run),
        "--store",
        store,
        "--budget",
        "3",
        "--out",
        str(out),
        "--no-sheet",
        "--format",
        "labelstudio",
        "--image-root",
        "http://tiles.example/",
    ]
    assert main(argv) == 0
    chosen = pd.read_csv(out / "selection.csv").set_index(C.TILE_ID)
    tasks = json.loads((out / "labelstudio" / "tasks.json").read_text())
    assert [task["data"][C.TILE_ID] for task in tasks] == chosen.index.tolist()
    assert tasks[0]["data"]["image"].startswith("http://tiles.example/")
    # the student's argmax on each tile, read as scoring reads tiles (Ray Data, padded), cropped
    facts = store_facts(store)
    predict = run_predictor(run, int(facts["tile_size"]))
    expected = {}
    tiles = read_tiles(
        store, columns=[C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID], tile_ids=chosen.index.tolist()
    )
    for batch in tiles.iter_batches(batch_size=None, batch_format="numpy"):
        argmax = predict(prepare_batch(batch, band_scales(facts))[C.IMAGE]).argmax(1).numpy()
        argmax[~batch[C.VALID]] = C.IGNORE_INDEX
        for tile_id, classes in zip(batch[C.TILE_ID], argmax, strict=True):
            tile = chosen.loc[tile_id]
            name = tile_name(tile[C.SOURCE], tile[C.ROW], tile[C.COL])
            expected[name] = classes[: tile[C.HEIGHT], : tile[C.WIDTH]]
    accepted = [
        {**task, "annotations": [{"id": 1, "result": task["predictions"][0]["result"]}]}
        for task in tasks
    ]
    (tmp_path / "export.json").write_text(json.dumps(accepted))
    masks = export_masks(tmp_path / "export.json", facts["class_names"])
    assert masks.keys() == expected.keys()
    for name, classes in expected.items():
        assert np.array_equal(masks[name], classes), name


def test_a_sliver_of_imagery_scores_by_its_area() -> None:
    from semisup.selection import score_batch

    def uniform(images):  # type: ignore[no-untyped-def]
        return torch.zeros(images.shape[0], 5, *images.shape[-2:])  # maximal entropy everywhere

    valid = np.ones((2, 8, 8), bool)
    valid[1, 2:] = False  # a tile at the raster's edge: a quarter of it is imagery
    batch = {
        C.IMAGE: np.zeros((2, 8, 8, 3), np.uint8),
        C.VALID: valid,
        C.SOURCE: np.array(["s", "s"]),
    }
    scores = score_batch(uniform, batch, {"s": ((0.0,) * 3, (255.0,) * 3)}, ("entropy",))
    assert scores["entropy"].tolist() == pytest.approx([1.0, 0.25])
