"""Files written whole or not at all: a reader (or a crash) never sees part of one.

    atomic_write(path, data)                 one file: a temporary name in the same folder, a rename
    write_files(folder, {name: data, ...})   a folder changes as one step: before or after, never between
    with staged_directory(folder) as tmp:    a folder written by other code, renamed into place (or swapped)
    discard_directory(folder)                a folder removed as one step (renamed aside, then deleted)
    remove_temporaries(folder)               what a killed writer left in `folder`, removed

Every temporary name is `.<name>.<kind>-<pid>-<8 hex>` beside the `<name>` it becomes or
replaces (kind: tmp, old or trash), so a kill -9 at any instant leaves the old complete file or
folder, or the new complete one, plus at most some temporaries that `remove_temporaries` (or
the next write of the same name) recognises and removes.

Files and folders get the modes a plain `open()` / `mkdir()` would give (the user's umask), not
the 0600/0700 of the temporary-file functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
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


# --- temporary names ----------------------------------------------------------------------------

TEMPORARY_KINDS = ("tmp", "old", "trash")
# `.<name>.<kind>-<pid>-<8 hex>`; also `.<name>.<8 chars>.tmp|.old`, the names earlier versions
# took from tempfile.mkstemp/mkdtemp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<kind>tmp|old|trash)-[0-9]+-[0-9a-f]{8}|[a-z0-9_]{8}\.(?:tmp|old))$")


def temporary_name(name: str, kind: str = "tmp") -> str:
    """A fresh temporary name for a file or folder that becomes (or replaces) `name`, in the same folder.

    Args:
        name: The final name (one path component).
        kind: "tmp" (being written), "old" (the replaced one, being deleted) or "trash" (being
            deleted). Default "tmp".

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in TEMPORARY_KINDS:
        raise ValueError(f"kind must be one of {TEMPORARY_KINDS}, got {kind!r}")
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(name: str, of: str | None = None) -> bool:
    """Whether `name` is a temporary name this module makes (of the final name `of`, if given)."""
    match = _TEMPORARY.match(name)
    return match is not None and (of is None or match["name"] == of)


def remove_temporaries(folder: Path, of: str | None = None) -> list[str]:
    """Remove every temporary file or folder directly inside `folder` (what writers killed
    mid-write left), only those of the final name `of` if given; other entries are not touched.
    A missing folder holds none.

    One kind is put back rather than removed: a previous folder renamed aside (`old`) by a
    replacement that was killed before the new folder took its name (where no atomic exchange
    exists) is the only complete copy, so it gets its name back.

    Returns:
        The names removed, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(entry.name for entry in folder.iterdir() if is_temporary(entry.name, of))
    removed = []
    for name in found:
        match = _TEMPORARY.match(name)
        final = folder / match["name"]
        if match["kind"] == "old" and not final.exists() and (folder / name).is_dir():
            os.rename(folder / name, final)
            continue
        _remove(folder / name)
        removed.append(name)
    return removed


def remove_leftovers(directory: Path) -> None:
    """Remove the temporaries a killed writer of `directory` left beside it (see `remove_temporaries`)."""
    directory = Path(directory)
    remove_temporaries(directory.parent, of=directory.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- writing ------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask), not the
    0600 of a temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temporary_name(path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    tmp = directory.parent / temporary_name(directory.name)
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
    """A temporary folder beside `out` to write into; it becomes `out` when the block succeeds.

    On an error the temporary folder is removed and `out` is untouched. With `overwrite`, an
    existing `out` is swapped with the new folder in one step (Linux `renameat2(RENAME_EXCHANGE)`;
    elsewhere it is renamed aside first) and removed after the new one is in place.

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
    remove_leftovers(out)
    tmp = out.parent / temporary_name(out.name)
    tmp.mkdir(mode=0o777 & ~umask())  # the finished folder gets a plain mkdir's mode
    try:
        yield tmp
        if not out.is_dir() or not any(out.iterdir()):
            os.replace(tmp, out)  # a missing or empty folder: replaced in one step
            return
        if _exchange(tmp, out):
            return  # (tmp now holds the old folder: removed below)
        old = out.parent / temporary_name(out.name, "old")  # a kill from here until out exists again:
        os.replace(out, old)                                # remove_leftovers gives `old` its name back
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous folder back (if that fails too, `old` is kept)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard_directory(folder: Path) -> None:
    """Remove `folder` as one step: it is renamed to a temporary name first, then deleted, so a
    kill at any instant leaves either the whole folder or none of it under its name (plus, at
    worst, a part-deleted temporary that `remove_temporaries` removes). A missing folder is fine."""
    folder = Path(folder)
    trash = folder.parent / temporary_name(folder.name, "trash")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    _remove(trash)  # (a file in the folder's place goes the same way)
