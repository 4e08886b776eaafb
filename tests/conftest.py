"""Fixtures shared by the tests (the command line's, and a stand-in timer for trim)."""

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


@pytest.fixture(autouse=True, scope="session")
def _rounding_without_timings():
    """``velcro.trim``'s default ``channel_multiple="auto"`` times convolutions: slow on a
    shared machine and not deterministic. The suite stands in a timer under which the
    rounded width always wins (the former default, multiples of 8), session-wide so that
    module fixtures get it too; tests/trim/test_widths.py puts its own timers in place and
    runs the real one."""
    from velcro.trim import _widths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_widths, "measure", lambda signature, widths: [1.0, 0.5])
        patch.setattr(_widths, "_measured", {})
        yield
