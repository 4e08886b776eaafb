"""Atomic writes: a file appears whole or not at all, with the mode a Unix tool would give it.

Every output velcro writes goes through :func:`atomic_path`: the data goes to a private
temporary file beside the target, which is renamed onto the target once complete. The
rename gives the file the permissions of ``open(path, "w")``: the umask's for a new file,
the old file's for a replaced one. Inside :func:`atomic_group` the renames wait until the
group ends, so that files that belong together (statistics and their split, a plan and its
tensors, a report and its figures) all appear, or none does.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from velcro.errors import VelcroError

# Renames waiting for the end of the innermost atomic_group; None outside any group.
_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = \
    contextvars.ContextVar("velcro_pending_renames", default=None)
_UMASK_LOCK = threading.Lock()
_DISK_ERRORS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once (the only portable way)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def output_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be replaced by a regular file, or None when it can.

    A folder, a device, a FIFO or a socket is never replaced (writing "into" /dev/null or a
    pipe must not swap it for a file); a missing or unwritable parent folder is named.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        return f"cannot check '{path}': {exc.strerror or exc}"
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            return f"'{path}' is a folder; give a file name"
        if not stat.S_ISREG(info.st_mode):
            return (f"'{path}' is not a regular file (a device, FIFO or socket); give the "
                    "name of a file to write")
    if not parent.is_dir():
        return f"cannot write '{path}': folder '{parent}' does not exist; create it first"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"cannot write '{path}': folder '{parent}' is not writable; choose another "
                "location")
    return None


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be written into the folder ``path`` (created if missing), or None.

    Checked before the work that fills it: a folder that turns out to be a file, or to sit
    in an unwritable place, must not be discovered after minutes of computing.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        if not path.is_dir():
            return f"'{path}' is a file, not a folder; give a folder to write into"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"folder '{path}' is not writable; choose another location"
        return None
    if not existing.is_dir():
        return f"cannot create folder '{path}': '{existing}' is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create folder '{path}': '{existing}' is not writable"
    return None


def _target_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the old file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _write_error(path: Path, exc: OSError) -> VelcroError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _DISK_ERRORS:
        return VelcroError(f"cannot write '{path}': {reason}; free some space or choose "
                           "another location (nothing was written)")
    return VelcroError(f"cannot write '{path}': {reason}; choose a writable location")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an OSError
    while writing (a full disk) becomes a one-line VelcroError naming ``path``. The file gets
    the mode ``open(path, "w")`` would give it. Inside :func:`atomic_group` the rename waits
    for the group's end.

    Example:
        >>> with atomic_path("plan.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    problem = output_problem(path)
    if problem is not None:
        raise VelcroError(problem)
    try:
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                            dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        raise _write_error(path, exc) from None
    os.close(handle)
    tmp = Path(tmp_name)
    pending = _PENDING.get()
    try:
        try:
            yield tmp
            if pending is None:
                _rename(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if pending is not None:
        pending.append((tmp, path))


def _rename(tmp: Path, path: Path) -> None:
    # mkstemp made the file 0600, private while incomplete; now it gets its real mode
    os.chmod(tmp, _target_mode(path))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_group() -> Iterator[None]:
    """Write several files as one: each :func:`atomic_path` inside waits, and all are
    renamed into place when the block ends without error; on error none is, and every
    temporary file is removed. Should a rename fail, the renames before it are undone (the
    files they replaced come back). Groups nest (an inner group joins the outer one).

    A file written inside the group cannot be read back inside it (it is not there yet).

    Example:
        >>> with atomic_group():
        ...     stats.save("cats.stats.safetensors")
        ...     split.save("cats.stats.split.json")
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _PENDING.reset(token)
    # All the data is on disk; what remains are renames, which need no space. The files they
    # replace are kept (hard links) until all renames are done, so that a failed rename can
    # put back the ones done before it: every file is new, or every file is old.
    backups = [_backup(path) for _, path in pending]
    try:
        for index, (tmp, path) in enumerate(pending):
            try:
                _rename(tmp, path)
            except BaseException as exc:
                for later, _ in pending[index:]:
                    with contextlib.suppress(OSError):
                        later.unlink()
                if not isinstance(exc, OSError):
                    raise
                for (_, done), backup in zip(pending[:index], backups, strict=False):
                    _restore(done, backup)
                raise _write_error(path, exc) from None
    finally:
        for backup in backups:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()


def _backup(path: Path) -> Path | None:
    """A hard link to the file ``path`` holds now (None: no file, or links not possible)."""
    if not path.is_file():
        return None
    backup = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.old")
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links: the old file cannot be put back
        return None
    return backup


def _restore(path: Path, backup: Path | None) -> None:
    """Undo a rename of the group: the old file back, or no file where there was none."""
    with contextlib.suppress(OSError):
        if backup is not None:
            os.replace(backup, path)
        else:
            path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
