"""Named Ray Tune search spaces, one short module per question, as plain Python data.

A space maps dotted experiment-config keys (``student.lora_rank``) to what a trial may take:

- ``{"choice": [a, b, ...]}``: one of the values, drawn at random for each sample;
- ``{"grid": [a, b, ...]}``: every value, in every sample (a sample is one pass over the grid);
- ``{"uniform": [low, high]}`` and ``{"loguniform": [low, high]}``: a float in the range;
- ``{"randint": [low, high]}``: an integer in the range, both ends included;
- ``{"tied_to": "other.key", "factor": f}``: ``f`` times the other key's value in the same trial;
- anything else (a number, a string, ``true``): that value in every trial.

``semisup.search_space`` checks a space against the experiment config before any trial starts
and draws samples from it; ``semisup.tune`` turns it into Ray Tune distributions.
"""

from __future__ import annotations

from typing import Any

from tune_spaces import augment, default, finetune_mode, lora_rank, ssl

SPACES: dict[str, dict[str, Any]] = {
    "lora_rank": lora_rank.SPACE,
    "augment": augment.SPACE,
    "ssl": ssl.SPACE,
    "finetune_mode": finetune_mode.SPACE,
    "default": default.SPACE,
}
