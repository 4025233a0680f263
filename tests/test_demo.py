"""`semisup demo` end to end on generated scenes: every stage runs and its figures add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semisup import columns as C
from semisup.demo import run_demo
from semisup.store import read_tile_index


@pytest.mark.timeout(900)
def test_demo_runs_the_whole_chain_on_generated_scenes(tmp_path: Path, ray_session: None) -> None:
    out = tmp_path / "demo"
    summary = run_demo(out, synthetic=True)
    stages = summary["stages"]
    assert list(stages) == ["prep", "stream", "zero-shot", "teacher", "pseudo-label", "student"]
    assert json.loads((out / "demo_summary.json").read_text())["stages"].keys() == stages.keys()
    index = read_tile_index(str(out / "store.zarr")).to_pandas()
    assert stages["prep"]["sources"] == 4 and stages["prep"]["tiles"] == len(index) == 4 * 9
    assert set(index.loc[index[C.SPLIT] == C.VAL, C.SOURCE]) == {"scene_3"}
    for split in C.SPLITS:
        expected = int(((index[C.SPLIT] == split) & (index["valid_fraction"] > 0)).sum())
        assert stages["stream"][split]["tiles"] == expected > 0
    assert (out / "zero_shot" / "zero_shot.json").is_file()
    unlabeled = int(((index[C.SPLIT] == C.UNLABELED) & (index["valid_fraction"] > 0)).sum())
    assert stages["pseudo-label"]["tiles_processed"] == unlabeled
    for run in ("teacher", "student"):
        report = json.loads((out / run / "report.json").read_text())
        assert 0 < report["best_miou"] <= 1 and Path(report["best_checkpoint"]).is_file()
    assert stages["teacher"]["mode"] == "decoder" and not stages["teacher"]["consistency"]
    assert stages["student"]["mode"] == "lora" and stages["student"]["consistency"]
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(out, synthetic=True)
