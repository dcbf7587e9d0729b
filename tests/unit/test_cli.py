"""The command line: dispatch, -v at either level, help for every command."""

from __future__ import annotations

import pytest

from refproxy.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("argv,level", [(["run"], 0), (["-v", "run"], 1), (["run", "-vv"], 2)])
def test_verbosity_before_or_after_the_command(argv, level):
    assert build_parser().parse_args(argv).verbose == level


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: refproxy " + command in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_errors_are_one_line_with_the_command(tmp_path, capsys):
    assert main(["render", "--manifests", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refproxy render: error:") and "Traceback" not in err
