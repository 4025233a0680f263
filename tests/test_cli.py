"""The console script: stages listed, examples in every --help, clean one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from semisup.cli import build_parser, main

STAGES = (
    "prep",
    "info",
    "zero-shot",
    "pseudo-label",
    "train",
    "select",
    "report",
    "experiment",
    "predict",
    "run",
    "submit",
    "demo",
)


def test_top_level_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"    {stage}" in out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_help_shows_an_example(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    out = capsys.readouterr().out
    assert "example" in out and f"semisup {stage}" in out


def test_every_flag_has_help() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[union-attr]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"semisup {name} {action.option_strings[0]} has no help"
                assert all("_" not in flag for flag in action.option_strings), (
                    "flags are kebab-case"
                )


def test_info_on_a_missing_store_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["info", str(tmp_path / "absent.zarr")])
    err = capsys.readouterr().err
    assert status == 2
    assert "absent.zarr" in err and "Traceback" not in err
