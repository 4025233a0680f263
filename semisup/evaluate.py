"""A trained run's student, loaded for prediction, and its scores on chosen tiles of a store.

``run_predictor`` rebuilds the best student of a ``semisup train`` run folder (its adapter on the
base the run was trained from); ``evaluate_run`` scores it on any tiles of a store, so a report
or an experiment can measure on tiles that neither training nor early stopping looked at.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import torch

from semisup import columns as C
from semisup.metrics import confusion_matrix, scores

Predictor = Callable[[torch.Tensor], torch.Tensor]
EVALUATION_BATCH: Final = 16  # tiles per forward pass: no gradients, so twice a training batch


def run_predictor(run: Path, image_size: int) -> Predictor:
    """The run's best student: B×3×S×S float images in [0, 1] -> B×K×S×S logits (CPU, eval).

    Built as ``semisup predict --model RUN`` builds it (``window_predictor.resolve_model``): the best
    adapter on the run's ``student.checkpoint``, a random-init base drawn from ``train.seed``.
    """
    from semisup.window_predictor import load_model, resolve_model

    if not (run / "best").is_dir() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"run {run}: expected a `semisup train` run folder with config.yaml and best/"
        )
    semantic = load_model(resolve_model(str(run), workdir=run, tile_size=image_size))
    return semantic


@torch.inference_mode()
def evaluate_run(
    store: str, run: Path, tile_ids: Sequence[int], *, batch_size: int = EVALUATION_BATCH
) -> dict[str, Any]:
    """mIoU, Dice, pixel accuracy and per-class IoU of the run's best student on ``tile_ids``.

    Pixels count where they are valid and labelled. NaN per-class scores (a class absent from
    both truth and prediction) become None so the result is JSON-safe.
    """
    from semisup.data import read_tiles
    from semisup.model_input import prepare_batch
    from semisup.store import band_scales, store_facts

    facts = store_facts(store)
    predict = run_predictor(run, int(facts["tile_size"]))
    scale = band_scales(facts)
    num_classes = int(facts["num_classes"])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    tiles = read_tiles(
        store, columns=[C.IMAGE, C.LABEL, C.VALID, C.SOURCE], tile_ids=list(tile_ids)
    )
    for batch in tiles.iter_batches(batch_size=batch_size, batch_format="numpy"):
        tensors = prepare_batch(batch, scale)
        prediction = predict(tensors[C.IMAGE]).argmax(1)
        confusion += confusion_matrix(prediction, tensors[C.LABEL], num_classes)
    result: dict[str, Any] = dict(scores(confusion))
    for key in ("iou_per_class", "dice_per_class"):
        result[key] = [None if math.isnan(v) else v for v in result[key]]
    result["pixels"] = int(confusion.sum())
    return result
