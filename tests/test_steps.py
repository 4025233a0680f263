"""The training step's pieces: batch preparation, consistency targets, one optimiser step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semisup import columns as C
from semisup.config import AugmentConfig, SslConfig
from semisup.ema import make_ema_teacher
from semisup.model_input import prepare_batch
from semisup.steps import (
    StepRecipe,
    combine_targets,
    compute_losses,
    train_step,
    unlabeled_targets,
    validation_counts,
)
from semisup.student import build_student
from semisup.synthetic import generate_scene
from semisup.thresholds import initial_statistics


def test_prepare_batch_scales_bands_and_ignores_invalid_pixels() -> None:
    image = np.full((1, 4, 4, 1), 1000, np.uint16)
    image[0, 0, 0, 0] = 3000
    valid = np.ones((1, 4, 4), bool)
    valid[0, 3, 3] = False
    batch = {
        C.IMAGE: image,
        C.VALID: valid,
        C.SOURCE: np.array(["s"], object),
        C.LABEL: np.ones((1, 4, 4), np.uint8),
        C.CONFIDENCE: np.ones((1, 4, 4), np.float32),
    }
    out = prepare_batch(batch, {"s": ((0.0,), (2000.0,))})
    assert out[C.IMAGE].shape == (1, 3, 4, 4) and out[C.IMAGE].dtype == torch.float32
    assert out[C.IMAGE][0, :, 1, 1].tolist() == [0.5, 0.5, 0.5]  # one band replicated
    assert out[C.IMAGE][0, 0, 0, 0] == 1.0  # clipped above band_high
    assert out[C.LABEL][0, 3, 3] == C.IGNORE_INDEX and out[C.LABEL][0, 0, 0] == 1
    assert out[C.LABEL].dtype == torch.int64 and out[C.CONFIDENCE][0, 3, 3] == 0


def test_combined_targets_keep_agreement_and_penalise_confident_disagreement() -> None:
    pseudo = torch.tensor([1, 1, 2, C.IGNORE_INDEX])
    pseudo_conf = torch.tensor([0.9, 0.9, 0.6, 0.0])
    ema = torch.tensor([1, 3, 4, 0])
    ema_conf = torch.tensor([0.97, 0.8, 0.99, 0.7])
    label, confidence = combine_targets(pseudo, pseudo_conf, ema, ema_conf)
    assert label.tolist() == [1, 1, 4, 0]
    assert confidence.tolist() == pytest.approx([0.97, 0.9 * 0.2, 0.99 * 0.4, 0.7])


def test_targets_need_what_they_name() -> None:
    weak = {C.IMAGE: torch.rand(1, 3, 8, 8), C.VALID: torch.ones(1, 8, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match="needs an EMA teacher"):
        unlabeled_targets(weak, None, SslConfig(target="ema"))
    with pytest.raises(ValueError, match="needs pseudo-labels"):
        unlabeled_targets(weak, None, SslConfig(target="pseudo"))


def _scene_batch(size: int = 64) -> dict[str, torch.Tensor]:
    images, labels = zip(*(generate_scene(size, seed=s) for s in range(4)), strict=True)
    return {
        C.IMAGE: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255,
        C.LABEL: torch.from_numpy(np.stack(labels)).long(),
        C.VALID: torch.ones(4, size, size, dtype=torch.bool),
    }


def test_steps_lower_the_loss_and_move_the_ema_teacher() -> None:
    torch.manual_seed(0)
    model = build_student("tiny", 5, 64, mode="decoder")
    teacher = make_ema_teacher(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    recipe = StepRecipe(SslConfig(target="ema", ema_momentum=0.9), AugmentConfig(), 5)
    labeled, unlabeled = _scene_batch(), _scene_batch()
    unlabeled.pop(C.LABEL)
    losses = [
        train_step(model, optimizer, labeled, unlabeled, teacher=teacher, recipe=recipe, step=step)[
            "loss_sup"
        ]
        for step in range(25)
    ]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    moved = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all("image_encoder" not in k for k in moved)  # frozen encoder stays put
    confusion, _ = validation_counts(model, labeled, 5, bins=10)
    assert confusion.sum() == labeled[C.LABEL].numel()


def test_without_unlabeled_tiles_there_is_no_consistency_term() -> None:
    torch.manual_seed(0)
    model = build_student("tiny", 5, 64, mode="decoder")
    recipe = StepRecipe(SslConfig(enabled=False), AugmentConfig(), 5)
    parts = compute_losses(
        model, _scene_batch(), _scene_batch(), teacher=None, recipe=recipe, step=0
    )
    assert "loss_cons" not in parts and torch.equal(parts["loss"], parts["loss_sup"])


def _real_tiles(
    dubai_dir: Path, parts: tuple[str, ...], size: int = 128
) -> dict[str, torch.Tensor]:
    """Crops of real Dubai images with their labels, as a prepared batch."""
    from PIL import Image

    from semisup.known_imagery import DUBAI_COLOURS

    images, labels = [], []
    for part in parts:
        rgb = np.asarray(Image.open(dubai_dir / "tile_1" / "images" / f"image_part_{part}.jpg"))
        mask = np.asarray(
            Image.open(dubai_dir / "tile_1" / "masks" / f"image_part_{part}.png").convert("RGB")
        ).astype(np.int64)
        codes = (mask[..., 0] << 16) | (mask[..., 1] << 8) | mask[..., 2]
        label = np.full(codes.shape, C.IGNORE_INDEX, dtype=np.int64)
        for colour, class_id in DUBAI_COLOURS.items():
            label[codes == int(colour[1:], 16)] = class_id
        images.append(rgb[:size, :size])
        labels.append(label[:size, :size])
    return {
        C.IMAGE: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255,
        C.LABEL: torch.from_numpy(np.stack(labels)),
        C.VALID: torch.ones(len(parts), size, size, dtype=torch.bool),
    }


@pytest.mark.parametrize("mode", ["freematch", "flexmatch", "softmatch"])
def test_on_real_tiles_an_adaptive_threshold_lets_a_weak_teacher_teach(
    dubai_dir: Path, mode: str
) -> None:
    """A random-weight EMA teacher: a fixed 0.95 cut keeps nothing, an adaptive one keeps
    pixels, and the consistency term then moves the student."""
    torch.manual_seed(0)
    model = build_student("tiny", 5, 128, mode="decoder")
    teacher = make_ema_teacher(model)
    labeled = _real_tiles(dubai_dir, ("001", "002"))
    unlabeled = _real_tiles(dubai_dir, ("003", "004"))  # LABEL stays: it measures the targets
    ratios = {}
    for threshold_mode in ("fixed", mode):
        ssl = SslConfig(target="ema", threshold_mode=threshold_mode, ramp_up_steps=0)  # type: ignore[arg-type]
        recipe = StepRecipe(ssl, AugmentConfig(), 5)
        state = initial_statistics(5)
        for step in range(3):  # the statistics settle over a few steps
            parts = compute_losses(
                model,
                labeled,
                unlabeled,
                teacher=teacher,
                recipe=recipe,
                step=step,
                ssl_state=state,
            )
        ratios[threshold_mode] = float(parts["mask_ratio"])
    assert ratios["fixed"] < 0.01 < ratios[mode]
    assert 0 <= float(parts["pseudo_correct"]) <= float(parts["pseudo_judged"]) <= 1
    model.zero_grad()
    parts["loss_cons"].backward()
    grads = [
        p.grad.abs().sum() for p in model.parameters() if p.requires_grad and p.grad is not None
    ]
    assert grads and float(sum(grads)) > 0


def test_the_feature_stream_is_half_the_consistency_term_and_trains_the_decoder() -> None:
    """UniMatch's feature perturbation: the weak view's encoder features, channel-dropped,
    against the same target; the consistency term becomes half image views, half this."""
    torch.manual_seed(0)
    model = build_student("tiny", 5, 64, mode="decoder")
    teacher = make_ema_teacher(model)
    labeled, unlabeled = _scene_batch(), _scene_batch()
    unlabeled.pop(C.LABEL)
    losses = {}
    for rate in (0.0, 0.5):
        ssl = SslConfig(
            target="ema", threshold_mode="softmatch", feature_dropout=rate, ramp_up_steps=0
        )
        torch.manual_seed(1)  # the same strong views in both runs
        model.zero_grad()
        losses[rate] = compute_losses(
            model,
            labeled,
            unlabeled,
            teacher=teacher,
            recipe=StepRecipe(ssl, AugmentConfig(), 5),
            step=0,
        )
    views, both = losses[0.0], losses[0.5]
    assert "loss_feature" not in views and float(both["loss_feature"].detach()) > 0
    value = {name: float(both[name].detach()) for name in ("loss_cons", "loss_feature")}
    assert value["loss_cons"] == pytest.approx(
        0.5 * (float(views["loss_cons"].detach()) + value["loss_feature"]), rel=1e-5
    )
    both["loss_feature"].backward()
    decoder = [
        p.grad for n, p in model.named_parameters() if "mask_decoder" in n and p.grad is not None
    ]
    assert decoder and float(sum(g.abs().sum() for g in decoder)) > 0
    image = unlabeled[C.IMAGE]
    model.eval()  # dropout is a training perturbation only
    assert torch.equal(model(image, feature_dropout=0.5), model(image))
    model.train()
    assert not torch.allclose(model(image, feature_dropout=0.5), model(image))
