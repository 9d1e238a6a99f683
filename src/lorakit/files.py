"""Files written whole or not at all: a reader (or a crash) never sees part of one.

    atomic_write(path, data)                 one file: a temporary name in the same folder, a rename
    write_files(folder, {name: data, ...})   a new folder appears complete or not at all
    with staged_directory(folder) as tmp:    a folder written by other code, renamed into place (or swapped)

Files and folders get the modes a plain `open()` / `mkdir()` would give (the user's umask), not
the 0600/0700 of the temporary-file functions.
"""

from __future__ import annotations

import contextlib
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
    """Write named files into `directory` so that no reader sees part of them.

    A folder that does not exist yet is written whole under a temporary sibling name and renamed
    into place: it appears complete or not at all. Into an existing folder each file is written
    through a temporary name and a rename, in the order given (put the file that marks the folder
    complete, e.g. a config, last).
    """
    directory = Path(directory)
    if directory.is_dir():
        for name, data in files.items():
            atomic_write(directory / name, data)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o777 & ~umask())
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, directory)  # an empty folder created meanwhile is replaced; a full one is an error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
