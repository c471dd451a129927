"""The ``recompose`` console command: dispatch, ``--version``, and the generated docs/cli.md."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from jobs import cli

REPO = Path(__file__).resolve().parents[2]


def test_docs_cli_md_is_generated_from_the_parsers():
    expected = cli.reference_markdown()
    written = (REPO / cli.DOCS_PATH).read_text() if (REPO / cli.DOCS_PATH).exists() else ""
    assert written == expected, (
        f"{cli.DOCS_PATH} is out of date with the commands' parsers; regenerate it from the "
        f"repository root with:\n    .venv/bin/{cli.WRITE_DOCS_COMMAND}"
    )


def test_version_prints_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"recompose {importlib.metadata.version('recompose')}\n"


def test_version_falls_back_to_pyproject_without_an_installed_package(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == expected


def test_unknown_command_exits_2_listing_the_known_ones(capsys):
    assert cli.main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nonsense'" in err
    assert f"known: {', '.join(cli.COMMANDS)}" in err


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_parser_is_named_recompose_command(name):
    assert cli.COMMANDS[name][0] == f"jobs.{name}"
    assert cli.command_parser(name).prog == f"recompose {name}"
