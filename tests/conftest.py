"""Fixtures shared by the command-line tests."""

import pytest

from velcro.cli import main


@pytest.fixture
def cli(ws, monkeypatch, capsys):
    """Run `velcro ARGS` in process on the module's workspace ``ws`` (a fixture of the test
    module, see cli_workspace.build); returns (exit code, stdout, stderr)."""
    monkeypatch.syspath_prepend(str(ws.module_dir))

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
