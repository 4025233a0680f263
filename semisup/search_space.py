"""Search spaces as plain data: checked against the experiment config, sampled, applied.

A space (see ``tune_spaces``) maps dotted config keys to a distribution description such as
``{"choice": [4, 8]}``, ``{"uniform": [0.0, 1.0]}`` or ``{"tied_to": "student.lora_rank",
"factor": 2.0}``, or to a constant. Everything here is plain Python: ``semisup.tune`` turns the
searched dimensions into Ray Tune distributions, and each trial turns Tune's draw back into an
``ExperimentConfig`` with ``trial_config``. Checking a space builds the config of every corner of
the space (each choice, each range end), so a misspelt key or a value the config rejects fails
before any trial starts, with the key named.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from semisup.config import ConfigError, ExperimentConfig, from_dict, to_dict

LIST_KINDS = ("choice", "grid")  # a list of values
RANGE_KINDS = ("uniform", "loguniform", "randint")  # [low, high]
SEARCHED_KINDS = LIST_KINDS + RANGE_KINDS
FIXED_SECTIONS = ("prep", "ray")  # the store is built once and Ray started once per sweep
MAX_CHECKED_CORNERS = 4096  # beyond this many corners, each key's corners are checked alone


@dataclass(frozen=True)
class Dimension:
    """One key of a space. ``kind`` is a distribution, ``tied_to`` or ``constant``.

    ``values``: the list of a choice or grid, the [low, high] of a range, or the one constant.
    """

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    tied_to: str = ""
    factor: float = 1.0

    @property
    def searched(self) -> bool:
        return self.kind in SEARCHED_KINDS

    def corners(self) -> tuple[Any, ...]:
        """The values a check must try: every listed value, or both ends of a range."""
        if self.kind in ("uniform", "loguniform"):
            return tuple(float(v) for v in self.values)
        return self.values


def config_keys(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a config dataclass, dotted (``"student.lora_rank"``), with its type."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.update(config_keys(hint, f"{prefix}{field.name}."))  # type: ignore[arg-type]
        else:
            keys[f"{prefix}{field.name}"] = hint
    return keys


def parse_space(space: Mapping[str, Any], name: str) -> dict[str, Dimension]:
    """The space's dimensions, with its structure and keys checked (not yet its values)."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"tune space {name!r}: expected a non-empty mapping of config keys")
    known = config_keys()
    dims = {}
    for key, spec in space.items():
        if key not in known:
            section = key.split(".")[0]
            siblings = sorted(k.split(".", 1)[1] for k in known if k.startswith(f"{section}."))
            where = (
                f"known keys of {section}: {', '.join(siblings)}"
                if siblings
                else (f"known sections: {', '.join(sorted({k.split('.')[0] for k in known}))}")
            )
            raise ConfigError(f"tune space {name!r}: unknown config key {key!r}; {where}")
        if key.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(
                f"tune space {name!r}: key {key!r} cannot vary between trials (the store is "
                "built and Ray started once per sweep)"
            )
        dims[key] = _parse_dimension(key, spec, name)
    for dim in dims.values():
        if dim.kind == "tied_to" and dim.tied_to in dims and dims[dim.tied_to].kind == "tied_to":
            raise ConfigError(
                f"tune space {name!r}, key {dim.key!r}: tied to {dim.tied_to!r}, which is itself "
                "tied; tie to a searched key or a constant"
            )
    return dims


def _parse_dimension(key: str, spec: Any, name: str) -> Dimension:
    where = f"tune space {name!r}, key {key!r}"
    if not isinstance(spec, Mapping):
        return Dimension(key, "constant", (spec,))
    kinds = [k for k in spec if k in (*SEARCHED_KINDS, "tied_to")]
    extra = sorted(set(spec) - {*kinds, "factor"})
    if len(kinds) != 1 or extra or ("factor" in spec and kinds != ["tied_to"]):
        raise ConfigError(
            f"{where}: got {dict(spec)!r}, expected one of {{choice: [...]}}, {{grid: [...]}}, "
            "{uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}, "
            "{tied_to: KEY, factor: F} or a constant"
        )
    kind, value = kinds[0], spec[kinds[0]]
    if kind == "tied_to":
        factor = spec.get("factor", 1.0)
        if not isinstance(value, str) or value not in config_keys() or value == key:
            raise ConfigError(f"{where}: tied_to {value!r} is not another config key")
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ConfigError(f"{where}: factor {factor!r} is not a number")
        return Dimension(key, kind, tied_to=value, factor=factor)
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {value!r}")
    if kind in RANGE_KINDS:
        low_high_ok = (
            len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and value[0] <= value[1]
        )
        if not low_high_ok:
            raise ConfigError(f"{where}: {kind} needs [low, high] with low <= high, got {value!r}")
        if kind == "loguniform" and value[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {value!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{where}: randint needs integer ends, got {value!r}")
    return Dimension(key, kind, tuple(value))


def assignment(
    config: ExperimentConfig, dims: Mapping[str, Dimension], searched: Mapping[str, Any]
) -> dict[str, Any]:
    """Every key's value in one trial: ``searched`` (Tune's draw), constants and ties.

    A key tied to one outside the space follows ``config``'s value. Numpy scalars from a
    sampler become plain Python numbers, so the config accepts them.
    """
    values = {key: _plain(searched[key]) for key, dim in dims.items() if dim.searched}
    values.update({key: dim.values[0] for key, dim in dims.items() if dim.kind == "constant"})
    for key, dim in dims.items():
        if dim.kind == "tied_to":
            section, field = dim.tied_to.split(".", 1)
            base = values.get(dim.tied_to, getattr(getattr(config, section), field))
            if isinstance(base, bool) or not isinstance(base, int | float):
                raise ConfigError(
                    f"key {key!r} is tied to {dim.tied_to!r}, whose value {base!r} is not a number"
                )
            values[key] = base * dim.factor
    return values


def apply(config: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """``config`` with each dotted key of ``values`` replaced, read back strictly."""
    data = to_dict(config)
    for key, value in values.items():
        section, field = key.split(".", 1)
        data[section][field] = value
    return from_dict(ExperimentConfig, data)


def trial_config(
    config: ExperimentConfig, dims: Mapping[str, Dimension], searched: Mapping[str, Any]
) -> ExperimentConfig:
    """The experiment config of one trial."""
    return apply(config, assignment(config, dims, searched))


def check_space(
    space: Mapping[str, Any],
    config: ExperimentConfig,
    name: str,
    check: Callable[[ExperimentConfig], None] | None = None,
) -> dict[str, Dimension]:
    """Parse ``space`` and build the config of each of its corners; the first failure names it.

    ``check``: a further test of each corner's config (e.g. that the store has what it needs),
    raising ``ConfigError`` or ``ValueError``.
    """
    dims = parse_space(space, name)
    for searched in _corners(dims):
        try:
            values = assignment(config, dims, searched)
            corner = apply(config, values)
            if check is not None:
                check(corner)
        except (ConfigError, ValueError) as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in searched.items())
            raise ConfigError(
                f"tune space {name!r} gives an invalid config ({shown}): {err}"
            ) from err
    return dims


def _corners(dims: Mapping[str, Dimension]) -> Iterator[dict[str, Any]]:
    """Every combination of the searched keys' corners, or each key's corners alone if too many."""
    searched = [dim for dim in dims.values() if dim.searched]
    if math.prod(len(dim.corners()) for dim in searched) <= MAX_CHECKED_CORNERS:
        for combo in itertools.product(*(dim.corners() for dim in searched)):
            yield {dim.key: value for dim, value in zip(searched, combo, strict=True)}
        return
    first = {dim.key: dim.corners()[0] for dim in searched}
    for dim in searched:
        for value in dim.corners():
            yield {**first, dim.key: value}


def sample(dims: Mapping[str, Dimension], rng: np.random.Generator) -> dict[str, Any]:
    """One random draw of the searched keys (a grid is drawn like a choice)."""
    drawn: dict[str, Any] = {}
    for key, dim in dims.items():
        if dim.kind in LIST_KINDS:
            drawn[key] = dim.values[int(rng.integers(len(dim.values)))]
        elif dim.kind == "uniform":
            drawn[key] = float(rng.uniform(*dim.values))
        elif dim.kind == "loguniform":
            drawn[key] = float(np.exp(rng.uniform(*np.log(dim.values))))
        elif dim.kind == "randint":
            drawn[key] = int(rng.integers(dim.values[0], dim.values[1] + 1))
    return drawn


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
