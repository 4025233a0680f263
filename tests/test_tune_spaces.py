"""Search spaces as plain data: every sample builds a valid config; bad spaces fail by key."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semisup import search_space
from semisup.config import ConfigError, ExperimentConfig, load_config
from tune_spaces import SPACES


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_sample_of_every_space_builds_a_valid_config(name: str) -> None:
    base = ExperimentConfig()
    dims = search_space.check_space(SPACES[name], base, name)
    assert any(dim.searched for dim in dims.values())
    rng = np.random.default_rng(0)
    seen: dict[str, set[object]] = {key: set() for key in dims}
    for _ in range(300):
        drawn = search_space.sample(dims, rng)
        config = search_space.trial_config(base, dims, drawn)
        assert isinstance(config, ExperimentConfig)
        for key, dim in dims.items():
            section, field = key.split(".")
            value = getattr(getattr(config, section), field)
            seen[key].add(value)
            if dim.kind in search_space.LIST_KINDS or dim.kind == "constant":
                assert value in dim.values
            elif dim.kind in search_space.RANGE_KINDS:
                assert dim.values[0] <= value <= dim.values[1]
            else:  # tied: a multiple of the other key in the same trial
                other = getattr(
                    getattr(config, dim.tied_to.split(".")[0]), dim.tied_to.split(".")[1]
                )
                assert value == pytest.approx(other * dim.factor)
    for key, dim in dims.items():  # the draws cover each list and spread over each range
        if dim.kind in search_space.LIST_KINDS:
            assert seen[key] == set(dim.values)
        elif dim.kind in ("uniform", "loguniform"):
            assert len(seen[key]) == 300
            low, high = dim.values
            middle = math.sqrt(low * high) if dim.kind == "loguniform" else (low + high) / 2
            below = sum(v < middle for v in seen[key])
            assert 90 < below < 210


def test_samples_follow_the_base_config_outside_the_space() -> None:
    base = load_config(overrides=["train.lr=1e-3", "student.lora_rank=4"])
    dims = search_space.check_space(SPACES["augment"], base, "augment")
    config = search_space.trial_config(
        base, dims, search_space.sample(dims, np.random.default_rng(1))
    )
    assert config.train.lr == 1e-3 and config.student.lora_rank == 4
    tied = search_space.check_space(
        {"student.lora_alpha": {"tied_to": "student.lora_rank", "factor": 3}}, base, "t"
    )
    assert search_space.trial_config(base, tied, {}).student.lora_alpha == 12.0


def test_lora_rank_space_runs_every_rank_in_lora_mode() -> None:
    dims = search_space.parse_space(SPACES["lora_rank"], "lora_rank")
    ranks = dims["student.lora_rank"]
    assert ranks.kind == "grid" and ranks.values == (4, 8, 16, 32)
    config = search_space.trial_config(ExperimentConfig(), dims, {"student.lora_rank": 16})
    assert (config.student.mode, config.student.lora_rank, config.student.lora_alpha) == (
        "lora",
        16,
        32.0,
    )


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"student.lora_rnak": {"choice": [4, 8]}}, "student.lora_rnak"),
        ({"studnet.lora_rank": 4}, "studnet.lora_rank"),
        ({"train.lr": {"choise": [1e-3]}}, "train.lr"),
        ({"train.lr": {"uniform": [1e-3]}}, "train.lr"),
        ({"train.lr": {"uniform": [1e-2, 1e-3]}}, "train.lr"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "train.lr"),
        ({"student.lora_rank": {"randint": [2, 8.5]}}, "student.lora_rank"),
        ({"student.lora_rank": {"choice": []}}, "student.lora_rank"),
        ({"student.lora_rank": {"uniform": [2, 8]}}, "student.lora_rank"),  # floats for an int
        ({"student.lora_rank": {"choice": [8, 0]}}, "student.lora_rank"),
        ({"student.mode": {"grid": ["lora", "partial"]}}, "student.mode"),
        ({"ssl.confidence_threshold": {"uniform": [0.5, 1.5]}}, "ssl.confidence_threshold"),
        (
            {
                "augment.scale_min": {"uniform": [0.5, 1.2]},
                "augment.scale_max": {"uniform": [1.0, 2]},
            },
            "augment.scale_min",
        ),  # only the corner 1.2 > 1.0 is invalid
        ({"student.lora_alpha": {"tied_to": "student.lora_rnak"}}, "student.lora_alpha"),
        ({"student.lora_alpha": {"tied_to": "student.mode"}}, "student.lora_alpha"),
        (
            {
                "student.lora_alpha": {"tied_to": "train.lr"},
                "train.lr": {"tied_to": "train.epochs"},
            },
            "student.lora_alpha",
        ),
        ({"prep.tile_size": {"choice": [256, 512]}}, "prep.tile_size"),
        ({"train.batch_size": {"choice": [4, 5]}, "train.num_workers": 2}, "train.batch_size"),
    ],
)
def test_bad_spaces_fail_with_the_key_named(space: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        search_space.check_space(space, ExperimentConfig(), "custom")


def test_a_further_check_runs_on_every_corner() -> None:
    corners: list[tuple[int, float]] = []

    def record(config: ExperimentConfig) -> None:
        corners.append((config.student.lora_rank, config.train.lr))
        if config.student.lora_rank > 8 and config.train.lr > 1e-3:
            raise ValueError("too much")

    space = {"student.lora_rank": {"choice": [4, 16]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    with pytest.raises(ConfigError, match="too much"):
        search_space.check_space(space, ExperimentConfig(), "custom", check=record)
    assert sorted(corners) == [(4, 1e-4), (4, 1e-2), (16, 1e-4), (16, 1e-2)]
