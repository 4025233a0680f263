"""A stage handed something it cannot use says so in one line naming it, before any work, and
leaves the store and the run folder as they were; a stage that dies leaves nothing that blocks
the next run."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from store_factory import SourceSpec, build_store

from semisup import columns as C
from semisup.actor_pool import ActorPoolConfig
from semisup.cli import main as semisup_main
from semisup.config import ConfigError, load_config
from semisup.masks import MaskFilter
from semisup.pseudo_label import PARTS_DIR, STATE_ATTR, read_manifest, run_pseudo_label
from semisup.sam import SAM_SPECS, build_sam
from semisup.store import open_store
from semisup.teacher import Teacher, TeacherConfig

# Fast automatic-mode settings on a tiny random SAM; lenient, so that every tile gets masks.
TEACHER = TeacherConfig(
    mode="automatic",
    model_type="tiny",
    points_per_side=2,
    mask_filter=MaskFilter(min_predicted_iou=-1e9, min_stability=0.0),
)
RUN = {"split": None, "batch_size": 2, "pool": ActorPoolConfig(actors=1), "log": None}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes: equal snapshots, equal trees."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def one_error_line(stderr: str, command: str) -> str:
    """The only line on stderr, which must be semisup's one-line error."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"semisup {command}: error: "), stderr
    return lines[0]


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    """Two unlabeled 128×128 sources in 64 px tiles: 8 tiles."""
    path = tmp_path / "small.zarr"
    sources = [
        SourceSpec(name, 128, 128, labeled=False, split=C.UNLABELED, texture="smooth")
        for name in ("a", "b")
    ]
    build_store(str(path), sources, tile_size=64, num_classes=4)
    return path


# ---------------------------------------------------------------------------------------------
# A config file


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("prep:\n  tile_size: 256\n  split_by: [source\nstream:\n  halo: 0\n")
    with pytest.raises(ConfigError, match=rf"^{config}, line 4, column \d+: not valid YAML \("):
        load_config(config)
    out = tmp_path / "run"
    assert semisup_main(["run", "--config", str(config), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "run")
    assert f"{config}, line 4" in line and "Traceback" not in line
    assert not out.exists()  # nothing was started
    with pytest.raises(ConfigError, match=r"override 'prep.tile_size=\[1,': the value is not"):
        load_config(overrides=["prep.tile_size=[1,"])


# ---------------------------------------------------------------------------------------------
# A checkpoint or an adapter: loaded once in the driver, before the store is touched


class NeverConstructed(Teacher):
    """A teacher whose actor must never start: the checkpoint fails before any does."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("a teacher actor started with weights the driver should refuse")


def _other_tiny_checkpoint(path: Path) -> Path:
    other = replace(SAM_SPECS["tiny"], encoder_embed_dim=96, encoder_depth=3)
    torch.save(build_sam(other, image_size=64).state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["sam-of-another-model", "adapter-unreadable"])
def test_a_bad_checkpoint_fails_in_the_driver_and_leaves_the_store(
    small_store: Path, tmp_path: Path, kind: str
) -> None:
    if kind == "sam-of-another-model":
        checkpoint = _other_tiny_checkpoint(tmp_path / "other_tiny.pth")
        teacher = replace(TEACHER, checkpoint=str(checkpoint))
        expected = rf"^checkpoint {checkpoint}: unknown SAM \(embed 96, depth 3\) weights given"
    else:
        checkpoint = tmp_path / "adapter.safetensors"
        checkpoint.write_bytes(b"not a safetensors file")
        teacher = replace(TEACHER, mode="semantic", checkpoint=str(checkpoint))
        expected = rf"^{checkpoint} cannot be read as a safetensors adapter"
    before = snapshot(small_store)
    with pytest.raises(ValueError, match=expected):
        run_pseudo_label(str(small_store), teacher, teacher_cls=NeverConstructed, **RUN)
    assert snapshot(small_store) == before


def test_the_demo_refuses_a_bad_checkpoint_before_its_run_folder_exists(
    tmp_path: Path, capsys
) -> None:
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    out = tmp_path / "demo"
    assert (
        semisup_main(["demo", "--synthetic", "--out", str(out), "--checkpoint", str(checkpoint)])
        == 2
    )
    line = one_error_line(capsys.readouterr().err, "demo")
    assert f"cannot read {checkpoint} as a tensor-only checkpoint" in line
    assert not out.exists()


def test_demo_checkpoint_sets_the_model_type_from_the_weights(tmp_path: Path) -> None:
    from semisup.demo import demo_config, with_checkpoint
    from semisup.pipeline import check_checkpoint

    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("tiny", image_size=256).state_dict(), checkpoint)
    config = with_checkpoint(demo_config(), str(checkpoint))
    assert (config.student.model_type, config.student.checkpoint) == ("tiny", str(checkpoint))
    check_checkpoint(config)  # loads (weights_only) and fits the demo's 256 px tiles


# ---------------------------------------------------------------------------------------------
# A store with an unreadable chunk, read inside Ray's read tasks


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_unreadable_chunk_is_one_line_naming_store_source_array_and_chunk(
    small_store: Path, ray_session: None, capfd
) -> None:
    chunk = small_store / "a" / "image" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"garbage" * 4)
    before = snapshot(small_store)
    capfd.readouterr()
    status = semisup_main(
        [
            "pseudo-label",
            "--store",
            str(small_store),
            "--model",
            "tiny",
            "--actors",
            "1",
            "--points-per-side",
            "2",
            "--batch-size",
            "2",
        ]
    )
    assert status == 2
    line = one_error_line(capfd.readouterr().err, "pseudo-label")
    assert f"store {small_store}: source a, array image, chunk (1, 0) = rows 64-127" in line
    assert "cannot be read" in line
    assert snapshot(small_store) == before  # the arrays and records it had begun are gone


# ---------------------------------------------------------------------------------------------
# A pseudo-label run that dies part-way


class RunDied(Exception):
    """Stands for whatever ends a run part-way: a killed driver, a lost node, Ctrl-C."""


def die_after_first_batch(done: int, total: int) -> None:
    raise RunDied(f"died after {done} of {total} tiles")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_pseudo_label_run_that_died_does_not_block_another_teacher(
    small_store: Path, ray_session: None, tmp_path: Path
) -> None:
    url = str(small_store)
    with pytest.raises(RunDied):
        run_pseudo_label(url, TEACHER, on_progress=die_after_first_batch, **RUN)
    assert read_manifest(url).num_rows > 0  # it died with tiles recorded, not compacted:
    assert (small_store / PARTS_DIR).is_dir()  # its batches are parts, not a finished manifest
    assert open_store(url).attrs[STATE_ATTR] == "running"
    # another teacher (a denser point grid) replaces the partial labels instead of refusing
    summary = run_pseudo_label(url, replace(TEACHER, points_per_side=4), **RUN)
    assert summary["tiles_already_done"] == 0 and summary["tiles_processed"] == 8
    manifest = read_manifest(url).to_pandas()
    assert len(manifest) == 8 and manifest[C.TILE_ID].is_unique
    root = open_store(url)
    assert root.attrs[STATE_ATTR] == "complete"
    assert root.attrs["semisup_pseudo_label"]["teacher"]["points_per_side"] == 4
