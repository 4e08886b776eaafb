"""Run `velcro` in a child process whose memory is capped, for tests of memory bombs: if a
bound regresses, the child fails with MemoryError instead of exhausting a shared machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

MEMORY_LIMIT = 3 << 30  # address space: torch, numba and Pillow load in well under 2 GiB


def run_velcro_limited(*args, cwd: Path, limit: int = MEMORY_LIMIT,
                       timeout: float = 300) -> tuple[int, str, str]:
    """``python -m velcro.cli ARGS`` with its address space capped at ``limit`` bytes;
    returns (exit code, stdout, stderr)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "velcro.cli", *map(str, args)], cwd=cwd, preexec_fn=cap,
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": ""})
    return result.returncode, result.stdout, result.stderr
