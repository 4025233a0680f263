"""`semisup demo` end to end on generated scenes: every stage runs and its figures add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semisup import columns as C
from semisup.demo import run_demo
from semisup.store import read_tile_index


@pytest.mark.timeout(300)
def test_demo_on_generated_scenes(tmp_path: Path, ray_session: None) -> None:
    out = tmp_path / "demo"
    summary = run_demo(out, synthetic=True)
    assert (
        json.loads((out / "demo_summary.json").read_text())["stages"].keys()
        == summary["stages"].keys()
    )
    index = read_tile_index(str(out / "store.zarr")).to_pandas()
    prep = summary["stages"]["prep"]
    assert prep["sources"] == 4 and prep["tiles"] == len(index) == 4 * 9  # 768 px = 3×3 tiles
    assert set(index[C.SPLIT]) == {C.LABELED, C.UNLABELED, C.VAL}
    assert set(index.loc[index[C.SPLIT] == C.VAL, C.SOURCE]) == {"scene_3"}
    for split in C.SPLITS:
        streamed = summary["stages"]["stream"][split]["tiles"]
        expected = int(((index[C.SPLIT] == split) & (index["valid_fraction"] > 0)).sum())
        assert streamed == expected > 0
