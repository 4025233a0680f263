"""Actor pools of Ray Data map stages: what each actor reserves, and the flags that size them.

The teacher (``semisup pseudo-label``), the predictor (``semisup predict``) and the tile scorer
(``semisup select``) each run a fixed pool of actors that load a model once. By default a pool
shares the cluster's CPUs and leaves one CPU to the read tasks and the driver, so reads never
starve behind the actors (on a 2-core machine the pool would otherwise hang).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any, Final

SCHEDULING_STRATEGY = {"pack": "DEFAULT", "spread": "SPREAD"}  # ray.placement -> actors;
# DEFAULT is Ray's own policy: it fills the node it is asked on before using others


@dataclass(frozen=True)
class ActorPoolConfig:
    """The actors of one map stage (the flags of ``add_actor_pool_arguments``)."""

    actors: int = 1
    gpus_per_actor: float = 0.0  # fractions share a GPU; 0: the actors run on CPU
    cpus_per_actor: float | None = None  # None: ``share_cpus``, one CPU left to the reads
    torch_threads: int | None = None  # None: ``share_threads`` on CPU, torch's default on GPU
    placement: str | None = None  # ``pack`` or ``spread`` (ray.placement); None: Ray Data's

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.placement is not None and self.placement not in SCHEDULING_STRATEGY:
            known = ", ".join(SCHEDULING_STRATEGY)
            raise ValueError(f"unknown placement {self.placement!r}; known: {known}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ActorPoolConfig:
        """The pool that ``add_actor_pool_arguments``' flags describe."""
        return cls(
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            torch_threads=args.torch_threads,
            placement=args.placement,
        )

    def cpus(self) -> float:
        """CPUs each actor reserves (``actor_cpus``; reads the connected cluster's size)."""
        return actor_cpus(self.actors, self.cpus_per_actor)

    def threads(self) -> int | None:
        """Torch threads of each actor (``actor_threads``)."""
        return actor_threads(self.actors, self.gpus_per_actor, self.torch_threads)

    def device(self) -> str:
        """The actors' device: ``auto`` (a GPU) when they reserve one, else ``cpu``."""
        return "auto" if self.gpus_per_actor > 0 else "cpu"


ONE_ACTOR: Final = ActorPoolConfig()  # a map stage's default pool


def map_with_pool(dataset: Any, fn_cls: type, pool: ActorPoolConfig, **options: Any) -> Any:
    """``dataset.map_batches(fn_cls, ...)`` on a fixed pool of ``pool.actors`` actors, each
    reserving ``pool.cpus()`` CPUs and ``pool.gpus_per_actor`` GPUs.

    ``pool.placement`` (``ray.placement``): ``spread`` puts the actors on different nodes where
    they fit, ``pack`` on as few as Ray's default policy does; None keeps Ray Data's choice
    (spread).

    The actors are not restarted when they die: the dataset fails instead, and the caller
    decides (``run_pseudo_label`` starts a new pool for the tiles not yet recorded; predict and
    select resume or rerun on the next attempt). Ray Data would restart them by default, and
    Ray 2.60 then logs an error-level line at the first pool of every process ("Actor ... has
    constructor arguments in the object store and max_restarts > 0", ray-project/ray#57733),
    whatever the constructor's arguments: Ray Data passes its own transform by reference.
    ``max_restarts`` is only reachable through ``ray_remote_args`` in Ray 2.60, whose
    deprecation warning is silenced here (Ray is pinned; ``options`` are the other
    ``map_batches`` arguments).
    """
    import ray

    if pool.placement is not None:
        options["scheduling_strategy"] = SCHEDULING_STRATEGY[pool.placement]
    if pool.gpus_per_actor > 0:
        options["num_gpus"] = pool.gpus_per_actor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            fn_cls,
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            max_restarts=0,
            num_cpus=pool.cpus(),
            **options,
        )


def share_cpus(actors: int, cluster_cpus: float, keep: float = 1.0) -> float:
    """CPUs each of ``actors`` reserves when ``keep`` CPUs stay free (between 0.1 and 1)."""
    return min(1.0, max(0.1, (cluster_cpus - keep) / actors))


def share_threads(actors: int, cluster_cpus: float) -> int:
    """Torch threads of each CPU actor: the cluster's whole CPUs split between the actors."""
    return max(1, int(cluster_cpus) // actors)


def cluster_cpus() -> float:
    """CPUs of the Ray cluster this process is connected to."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def actor_cpus(actors: int, cpus_per_actor: float | None = None) -> float:
    """``cpus_per_actor`` when given, otherwise the cluster's share (see ``share_cpus``)."""
    return cpus_per_actor or share_cpus(actors, cluster_cpus())


def actor_threads(
    actors: int, gpus_per_actor: float, torch_threads: int | None = None
) -> int | None:
    """``torch_threads`` when given; None (torch's default) on GPU; else the CPU share."""
    if torch_threads:
        return torch_threads
    return None if gpus_per_actor > 0 else share_threads(actors, cluster_cpus())


def add_actor_pool_arguments(
    parser: argparse.ArgumentParser, *, role: str, default_actors: int, frees: str
) -> None:
    """--actors, --gpus-per-actor, --cpus-per-actor, --torch-threads and --placement
    (``ActorPoolConfig.from_args`` reads them back).

    ``role`` names the actors in the help ("teacher", "predictor"); ``frees`` says what the
    default CPU share leaves room for.
    """
    parser.add_argument(
        "--actors",
        type=int,
        default=default_actors,
        metavar="N",
        help=f"{role} actors (default {default_actors})",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per actor, fractions share a GPU (default 0: CPU)",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        metavar="C",
        help=f"CPUs reserved per actor (default: leave one CPU to {frees})",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        metavar="N",
        help="torch threads per actor (default on CPU: cluster CPUs // actors)",
    )
    parser.add_argument(
        "--placement",
        choices=tuple(SCHEDULING_STRATEGY),
        help=f"pack the {role} actors onto few nodes or spread them over the nodes "
        "(default: Ray Data's, which spreads)",
    )
