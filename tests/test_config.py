"""The experiment config: strict reading, dict round-trips, YAML and --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from semisup.config import (
    ConfigError,
    ExperimentConfig,
    PrepConfig,
    from_dict,
    load_config,
    merge_overrides,
    save_config,
    to_dict,
)


def test_default_config_round_trips_through_plain_dict() -> None:
    config = ExperimentConfig()
    data = to_dict(config)
    assert isinstance(data["prep"], dict) and isinstance(data["prep"]["val_sources"], list)
    assert from_dict(ExperimentConfig, data) == config


def test_modified_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = dataclasses.replace(
        ExperimentConfig(),
        prep=PrepConfig(tile_size=512, overlap=32, val_sources=("tile_6*",), seed=7),
    )
    path = tmp_path / "exp.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_unknown_key_names_the_key() -> None:
    data = to_dict(ExperimentConfig())
    data["prep"]["tile_sise"] = 512
    with pytest.raises(ConfigError, match=r"prep\.tile_sise"):
        from_dict(ExperimentConfig, data)


def test_unknown_section_names_the_section() -> None:
    with pytest.raises(ConfigError, match="'trian'"):
        from_dict(ExperimentConfig, {"trian": {}})


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("prep.tile_size=big", r"prep\.tile_size: got 'big' \(str\), expected int"),
        ("prep.tile_size=true", r"prep\.tile_size: got True"),
        ("prep.split_by=tile", r"prep\.split_by: got 'tile', expected one of"),
        (
            "prep.overlap=256",
            r"prep\.overlap: got 256, expected an integer in \[0, tile_size=256\)",
        ),
        ("prep.labeled_fraction=1.5", r"prep\.labeled_fraction: got 1\.5"),
        ("stream.halo=-1", r"stream\.halo"),
        ("prep.val_sources=tile_6", r"prep\.val_sources: got 'tile_6', expected a list"),
    ],
)
def test_wrong_types_and_values_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_overrides_parse_yaml_values_and_ints_widen_to_float() -> None:
    config = load_config(
        overrides=[
            "prep.tile_size=512",
            "prep.val_fraction=0",
            "prep.val_sources=[a, b]",
            "ray.address=auto",
            "train.lr=2e-3",
        ]
    )
    assert config.train.lr == 0.002
    assert config.prep.tile_size == 512
    assert config.prep.val_fraction == 0.0 and isinstance(config.prep.val_fraction, float)
    assert config.prep.val_sources == ("a", "b")
    assert config.ray.address == "auto"


def test_overrides_apply_after_the_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("prep:\n  tile_size: 512\n  seed: 3\n")
    config = load_config(path, overrides=["prep.seed=4"])
    assert (config.prep.tile_size, config.prep.seed) == (512, 4)
    assert config.stream == ExperimentConfig().stream


def test_malformed_override_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        merge_overrides({}, ["prep.tile_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="'tile_size' is not a section"):
        merge_overrides({"tile_size": 3}, ["tile_size.x=1"])


@pytest.mark.parametrize(
    ("override", "replacement"),
    [
        ("ssl.class_balanced=true", "threshold_mode=freematch"),
        ("stream.shuffle_buffer=64", "permutations"),
    ],
)
def test_retired_keys_say_what_replaced_them(override: str, replacement: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"'{override.split('=')[0]}' is retired: .*{replacement}"
    ):
        load_config(overrides=[override])


def test_ssl_settings_that_cannot_work_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="ssl.distribution_alignment.*offline pseudo-labels"):
        load_config(overrides=["ssl.target=pseudo", "ssl.distribution_alignment=true"])
    with pytest.raises(ConfigError, match="ssl.strong_views: got 3"):
        load_config(overrides=["ssl.strong_views=3"])
    with pytest.raises(ConfigError, match="ssl.threshold_mode: got 'adaptive'"):
        load_config(overrides=["ssl.threshold_mode=adaptive"])
