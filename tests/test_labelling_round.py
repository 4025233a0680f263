"""An active-learning round: proposals -> stand-in annotations -> a new label version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from store_factory import SourceSpec, build_store

from semisup import columns as C
from semisup import store as tile_store
from semisup.labelling_round import ground_truth_masks, labelling_round

TILE = 32


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    url = str(tmp_path / "store.zarr")
    build_store(url, [SourceSpec("scene", 64, 96, split=C.UNLABELED)], tile_size=TILE)
    return url, tile_store.read_tile_index(url).to_pandas()


def test_masks_are_the_hidden_ground_truth_of_the_proposed_tiles(
    store: tuple[str, pd.DataFrame], tmp_path: Path
) -> None:
    url, index = store
    picks = [int(index[C.TILE_ID].iloc[4]), int(index[C.TILE_ID].iloc[1])]
    masks = ground_truth_masks(url, picks, tmp_path / "masks")
    labels = tile_store.label_array(tile_store.open_store(url)["scene"])
    assert labels is not None
    for path, tile_id in zip(masks, picks, strict=True):
        tile = index.set_index(C.TILE_ID).loc[tile_id]
        assert path.name == f"scene__r{tile['row']}_c{tile['col']}.png"
        y0, x0 = int(tile["y0"]), int(tile["x0"])
        np.testing.assert_array_equal(
            np.asarray(Image.open(path)), labels[y0 : y0 + TILE, x0 : x0 + TILE]
        )
    with pytest.raises(ValueError, match="no tile 999 in its tile index"):
        ground_truth_masks(url, [999], tmp_path / "none")


def test_a_round_moves_exactly_the_proposed_tiles_to_labeled_once(
    store: tuple[str, pd.DataFrame], tmp_path: Path
) -> None:
    url, index = store
    picks = index[C.TILE_ID].iloc[[0, 3, 5]].tolist()
    select = tmp_path / "select"
    select.mkdir()
    pd.DataFrame({"rank": [1, 2, 3], C.TILE_ID: picks}).to_csv(select / "selection.csv")
    round_one = labelling_round(url, select, tmp_path / "round_1", log=None)
    assert round_one["annotated"] == 3 and round_one["moved_to_labeled"] == 3
    assert round_one["label_version"] == tile_store.label_version(url) == 1
    after = tile_store.read_tile_index(url).to_pandas().set_index(C.TILE_ID)[C.SPLIT]
    assert sorted(after[after == C.LABELED].index) == sorted(picks)
    again = labelling_round(url, select, tmp_path / "round_1", log=None)
    assert again["already_imported"] and tile_store.label_version(url) == 1
    (select / "selection.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no selection; run the select stage first"):
        labelling_round(url, select, tmp_path / "round_2", log=None)
