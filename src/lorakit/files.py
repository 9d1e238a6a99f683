"""Files written whole or not at all: a reader (or a crash) never sees part of one.

    atomic_write(path, data)                 one file: a temporary name in the same folder, a rename
    write_files(folder, {name: data, ...})   a folder changes as one step: before or after, never between
    with staged_directory(folder) as tmp:    a folder written by other code, renamed into place (or swapped)

Files and folders get the modes a plain `open()` / `mkdir()` would give (the user's umask), not
the 0600/0700 of the temporary-file functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process umask (read from /proc where it can be, since setting it to read it is racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask), not the
    0600 of a temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write named files into `directory` as one change: a reader, or a crash at any instant,
    sees the folder as it was before or as it is after, never a mix.

    The new folder is built whole under a temporary sibling name: the files given, plus hard
    links to every other entry already in `directory` (another adapter's subfolder, a
    tokenizer, a trainer's state), which are kept. It then takes the old folder's place: by a
    rename when there was none (or an empty one), by an atomic exchange of the two folders
    (Linux `renameat2(RENAME_EXCHANGE)`) when there was one. Where the exchange is not
    available, each file is replaced through a temporary name instead, in the order given (put
    the file that marks the folder complete, e.g. a config, last). Temporary folders a killed
    writer left beside `directory` are removed first.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    tmp = directory.parent / f"{_TMP_PREFIX.format(name=directory.name)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o777 & ~umask())
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if not directory.is_dir() or not any(directory.iterdir()):
            os.rename(tmp, directory)  # a missing or empty folder: replaced in one step
            return
        for entry in directory.iterdir():
            if entry.name not in files:
                _link_tree(entry, tmp / entry.name)
        os.chmod(tmp, directory.stat().st_mode & 0o7777)
        if not _exchange(tmp, directory):
            for name, data in files.items():
                atomic_write(directory / name, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old folder


_TMP_PREFIX = ".{name}.tmp-"


def remove_leftovers(directory: Path) -> None:
    """Remove the temporary folders a killed `write_files` left beside `directory`."""
    for leftover in directory.parent.glob(f"{glob.escape(_TMP_PREFIX.format(name=directory.name))}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _link_tree(source: Path, target: Path) -> None:
    """`target` holding the same files as `source`, by hard links (a copy where links fail)."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # no such call, or not on this filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to ask
        return None


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; renamed to `out` when the block succeeds.

    On an error the temporary folder is removed and `out` is untouched. With `overwrite`, an
    existing `out` is first renamed aside and removed only after the new folder is in place.

    Args:
        out: The folder to create.
        overwrite: Replace an existing non-empty `out`. Default False.

    Yields:
        The temporary folder (empty).

    Raises:
        ValueError: `out` is a file, or a non-empty folder and `overwrite` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())  # the finished folder gets a plain mkdir's mode, not mkdtemp's 0700
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)  # put the previous folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
