"""A training checkpoint restores everything that decides the run's future, strictly (Ray-free)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semisup.ema import ema_update, make_ema_teacher
from semisup.sampling import DataPosition
from semisup.student import build_student
from semisup.train_state import (
    STATE_FILE,
    CheckpointError,
    Trainables,
    TrainState,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)

POSITIONS = {"labeled": DataPosition(1, 2), "unlabeled": DataPosition(0, 5)}


def _trainables(seed: int, steps: int) -> Trainables:
    """A tiny decoder-mode student after ``steps`` AdamW steps, with its EMA teacher."""
    torch.manual_seed(seed)
    model = build_student("tiny", 5, 64, mode="decoder")
    teacher = make_ema_teacher(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimizer.step()
        ema_update(teacher, model, 0.9)
    ssl = {"class_confidence": torch.rand(5), "class_count": torch.zeros(5, dtype=torch.int64)}
    return Trainables(model, optimizer, teacher, ssl)


def _save(tmp_path: Path) -> tuple[Trainables, TrainState]:
    saved = _trainables(seed=0, steps=2)
    state = TrainState(
        step=13,
        epoch=1,
        best_score=0.4,
        best_epoch=0,
        stale_epochs=1,
        history=[{"epoch": 0, "miou": 0.4}],
        epoch_sums={"loss": 3.0},
        epoch_steps=3,
    )
    torch.manual_seed(123)
    save_checkpoint(tmp_path, state, saved, POSITIONS)
    return saved, state


def test_a_checkpoint_restores_weights_optimiser_teacher_ssl_rng_and_progress(
    tmp_path: Path,
) -> None:
    saved, state = _save(tmp_path)
    expected_draw = torch.rand(4)  # what the generator gives right after the save
    fresh = _trainables(seed=0, steps=1)  # the same frozen base, as a resumed run rebuilds it
    before = {k: v.clone() for k, v in trainable_state(fresh.model).items()}
    restored = load_checkpoint(tmp_path, fresh, lambda step: POSITIONS)
    assert restored == state
    legacy = TrainState.from_json('{"best_miou": 0.3, "reference_miou": 0.2}')  # older runs
    assert legacy == TrainState(best_score=0.3, reference_score=0.2)
    assert torch.equal(torch.rand(4), expected_draw)
    for name, value in trainable_state(saved.model).items():
        assert torch.equal(trainable_state(fresh.model)[name], value), name
    assert any(not torch.equal(before[k], v) for k, v in trainable_state(fresh.model).items())
    teacher_state, fresh_teacher = saved.teacher.state_dict(), fresh.teacher.state_dict()  # type: ignore[union-attr]
    assert all(
        torch.equal(fresh_teacher[k], teacher_state[k]) for k in trainable_state(saved.model)
    )
    for name, value in saved.ssl_state.items():
        assert torch.equal(fresh.ssl_state[name], value)
    old, new = saved.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert old["param_groups"] == new["param_groups"]
    for key, slot in old["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(new["state"][key][name]), torch.as_tensor(value))
    # and the next optimiser step of both is the same
    for trainables in (saved, fresh):
        trainables.optimizer.zero_grad()
        torch.manual_seed(5)
        trainables.model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        trainables.optimizer.step()
    after_saved, after_fresh = trainable_state(saved.model), trainable_state(fresh.model)
    assert all(torch.equal(after_fresh[k], v) for k, v in after_saved.items())


def test_a_checkpoint_that_does_not_fit_the_run_is_refused_by_name(tmp_path: Path) -> None:
    _save(tmp_path)
    with pytest.raises(CheckpointError, match="saved data position"):
        load_checkpoint(tmp_path, _trainables(1, 0), lambda step: {"labeled": DataPosition(0, 0)})
    no_teacher = _trainables(1, 0)
    no_teacher.teacher = None
    with pytest.raises(CheckpointError, match="has an EMA teacher"):
        load_checkpoint(tmp_path, no_teacher, lambda step: POSITIONS)
    other_ssl = _trainables(1, 0)
    other_ssl.ssl_state = {"class_confidence": torch.zeros(5)}
    with pytest.raises(CheckpointError, match="unexpected ssl key 'class_count'"):
        load_checkpoint(tmp_path, other_ssl, lambda step: POSITIONS)
    path = tmp_path / STATE_FILE
    saved = torch.load(path, weights_only=True)
    name = next(iter(saved["model"]))
    del saved["model"][name]
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=f"model key '{name}' is missing"):
        load_checkpoint(tmp_path, _trainables(1, 0), lambda step: POSITIONS)
    saved["model"][name] = torch.zeros(1)
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=f"model key '{name}' has shape"):
        load_checkpoint(tmp_path, _trainables(1, 0), lambda step: POSITIONS)
    del saved["optimizer"]
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="checkpoint key 'optimizer' is missing"):
        load_checkpoint(tmp_path, _trainables(1, 0), lambda step: POSITIONS)
