"""The prep command line: flags, help, exit codes, ``python -m data_prep``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import add_arguments, config_from_args, run_cli
from semisup.config import PrepConfig
from semisup.store import open_store, read_store_meta, read_tile_index

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semisup prep")
    add_arguments(parser)
    return parser


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("tile_1", "tile_2"):
        for name in ("p1", "p2"):
            (tmp_path / folder / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / "masks").mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (40, 40, 3), np.uint8)
            Image.fromarray(image).save(tmp_path / folder / "images" / f"{name}.jpg")
            mask = np.where(rng.random((40, 40, 1)) < 0.5, [60, 16, 152], [132, 41, 246])
            Image.fromarray(mask.astype(np.uint8)).save(tmp_path / folder / "masks" / f"{name}.png")
    (tmp_path / "colors.json").write_text(json.dumps({"#3C1098": 0, "#8429F6": 1}))
    return tmp_path


def _argv(scene: Path, *extra: str) -> list[str]:
    return [
        str(scene / "tile_1" / "images"),
        str(scene / "tile_2" / "images"),
        "--labels",
        str(scene / "tile_1" / "masks"),
        str(scene / "tile_2" / "masks"),
        "--label-colors",
        str(scene / "colors.json"),
        "--out",
        str(scene / "s.zarr"),
        *extra,
    ]


def test_help_shows_a_working_example_and_every_flag_is_kebab_case_with_help() -> None:
    parser = _parser()
    text = parser.format_help()
    assert "semisup prep ../shared/data/dubai/tile_{1,2}/images" in text
    assert '"#3C1098": 0' in text  # the example's colour map is spelled out
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert all(
                flag.startswith("--") and flag[2:].replace("-", "").isalnum() and flag.islower()
                for flag in action.option_strings
            ), action.option_strings


def test_flags_left_out_keep_prep_config_defaults(scene: Path) -> None:
    assert config_from_args(_parser().parse_args(_argv(scene))) == PrepConfig()
    args = _parser().parse_args(
        _argv(
            scene,
            "--tile-size",
            "32",
            "--overlap",
            "8",
            "--split-by",
            "folder",
            "--val-sources",
            "tile_2*",
            "--seed",
            "3",
        )
    )
    assert config_from_args(args) == PrepConfig(
        tile_size=32, overlap=8, split_by="folder", val_sources=("tile_2*",), seed=3
    )


def test_repeated_list_flags_add_up(scene: Path) -> None:
    args = _parser().parse_args(
        _argv(
            scene,
            "--val-sources",
            "tile_2*",
            "--val-sources",
            "tile_3*",
            "tile_4*",
            "--labels",
            "a",
            "--labels",
            "b",
        )
    )
    assert config_from_args(args).val_sources == ("tile_2*", "tile_3*", "tile_4*")
    assert args.labels[2:] == ["a", "b"] and len(args.labels) == 4
    assert len(_parser().parse_args(_argv(scene)).labels) == 2  # the default is not shared


def test_run_builds_the_store(scene: Path) -> None:
    args = _parser().parse_args(
        _argv(
            scene,
            "--tile-size",
            "16",
            "--split-by",
            "folder",
            "--val-sources",
            "tile_2*",
            "--class-names",
            "building,land",
            "--labeled-fraction",
            "1",
        )
    )
    assert run_cli(args) == 0
    meta = read_store_meta(open_store(str(scene / "s.zarr")))
    assert meta.class_names == ("building", "land") and meta.num_classes == 2
    index = read_tile_index(str(scene / "s.zarr")).to_pandas()
    assert set(index.loc[index.split == "val", "source"].str[:6]) == {"tile_2"}
    assert set(index.loc[index.split == "labeled", "source"].str[:6]) == {"tile_1"}


def test_errors_are_one_line_with_exit_status(
    scene: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(_parser().parse_args(_argv(scene, "--tile-size", "16", "--overlap", "16"))) == 2
    err = capsys.readouterr().err
    assert "semisup prep: error: prep.overlap" in err and "Traceback" not in err
    (scene / "tile_2" / "masks" / "p2.png").unlink()
    assert run_cli(_parser().parse_args(_argv(scene))) == 1
    err = capsys.readouterr().err
    assert "no label for" in err and "p2.jpg" in err
    assert not (scene / "s.zarr").exists()


def test_python_m_data_prep_builds_then_is_up_to_date(scene: Path) -> None:
    command = [sys.executable, "-m", "data_prep", *_argv(scene, "--tile-size", "16")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "[1/4] tile_1__images__p1" in first.stderr and "wrote" in first.stderr
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0 and "up to date" in second.stderr


def test_config_file_and_set_overrides_give_defaults_that_flags_override(
    scene: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (scene / "exp.yaml").write_text("prep:\n  tile_size: 32\n  seed: 5\n")
    args = _parser().parse_args(
        _argv(scene, "--config", str(scene / "exp.yaml"), "--set", "prep.seed=6", "--overlap", "8")
    )
    config = config_from_args(args)
    assert (config.tile_size, config.seed, config.overlap) == (32, 6, 8)
    assert run_cli(args) == 0
    assert read_store_meta(open_store(str(scene / "s.zarr"))).tile_size == 32
    bad = _parser().parse_args(_argv(scene, "--set", "prep.tile_sise=64"))
    assert run_cli(bad) == 2
    assert "prep.tile_sise" in capsys.readouterr().err


def test_label_colors_takes_a_known_name_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semisup.known_imagery import DUBAI_COLOURS, colour_map

    monkeypatch.chdir(tmp_path)
    assert colour_map("dubai") == DUBAI_COLOURS
    assert colour_map("maps/other.json") == "maps/other.json" and colour_map(None) is None
    (tmp_path / "dubai").write_text("{}")  # a file of that name is the user's own map
    assert colour_map("dubai") == "dubai"
