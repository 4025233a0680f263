"""Actor-pool sizing: the default share leaves room for reads, and the flags read back."""

from __future__ import annotations

import argparse

import pytest

from semisup.actor_pool import (
    ActorPoolConfig,
    actor_cpus,
    actor_threads,
    add_actor_pool_arguments,
    share_cpus,
    share_threads,
)


def test_default_share_leaves_one_cpu_and_stays_between_a_tenth_and_one() -> None:
    assert share_cpus(1, 2.0) == 1.0  # 2 cores: one for the actor, one for reads and the driver
    assert share_cpus(2, 2.0) == 0.5
    assert share_cpus(4, 2.0, keep=0.5) == pytest.approx(0.375)
    assert share_cpus(1, 16.0) == 1.0  # never more than a whole CPU per actor
    assert share_cpus(8, 1.0) == 0.1  # never so little that an actor can't be scheduled
    assert (
        share_threads(2, 2.0) == 1 and share_threads(1, 16.0) == 16 and share_threads(4, 2.0) == 1
    )


def test_explicit_values_win_over_the_share() -> None:
    assert actor_cpus(3, 0.25) == 0.25
    assert actor_threads(3, 0.0, 5) == 5
    assert actor_threads(2, 0.5) is None  # on GPU torch keeps its own default


def test_flags_read_back_with_the_role_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    add_actor_pool_arguments(parser, role="scorer", default_actors=3, frees="reads")
    args = parser.parse_args([])
    assert (args.actors, args.gpus_per_actor, args.cpus_per_actor, args.torch_threads) == (
        3,
        0.0,
        None,
        None,
    )
    args = parser.parse_args(["--actors", "2", "--gpus-per-actor", "0.5", "--torch-threads", "4"])
    assert (args.actors, args.gpus_per_actor, args.torch_threads) == (2, 0.5, 4)
    assert "scorer actors (default 3)" in " ".join(parser.format_help().split())
    pool = ActorPoolConfig.from_args(parser.parse_args(["--actors", "2", "--placement", "spread"]))
    assert pool == ActorPoolConfig(actors=2, placement="spread")
    assert "pack the scorer actors" in " ".join(parser.format_help().split())


def test_pool_config_refuses_what_cannot_run_and_says_its_device() -> None:
    assert ActorPoolConfig().device() == "cpu"
    assert ActorPoolConfig(gpus_per_actor=0.5).device() == "auto"
    assert ActorPoolConfig(actors=3, torch_threads=5).threads() == 5
    for bad, message in (
        ({"actors": 0}, "actors must be >= 1, got 0"),
        ({"gpus_per_actor": -1.0}, "gpus_per_actor must be >= 0"),
        ({"placement": "scatter"}, "unknown placement 'scatter'; known: pack, spread"),
    ):
        with pytest.raises(ValueError, match=message):
            ActorPoolConfig(**bad)
