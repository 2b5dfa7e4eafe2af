"""Writing files so that nothing is lost or left half-written, and checking where they go.

- :func:`check_writable` tries, before any work, to create a file in the folder a result
  will go to (the only test that holds for every user, root included), and refuses a path
  that is a folder;
- :func:`atomic_write` writes through a temporary file with a unique name in the target
  folder (``.<name>.<random>.partial``), flushed to disk, then renamed over the target: a
  reader sees the old file or the new one, never a part; two writers never share a
  temporary name; the temporary file is removed when writing fails or is interrupted
  (KeyboardInterrupt, and SIGTERM once the CLI has turned it into an exception). The file
  gets the permissions the umask gives a new file, as ``open(path, "w")`` would.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import FastquantError

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: PathLike, what: str) -> Path:
    """``path`` as a Path once its folder exists and takes a new file; FastquantError naming
    ``what`` (for example ``--out``) otherwise. Creates nothing that stays."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FastquantError(f"{what} {path} is a folder, not a file")
    if not folder.is_dir():
        raise FastquantError(f"{what}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise FastquantError(f"{what}: cannot write in folder {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_writable_folder(folder: PathLike, what: str) -> Path:
    """A folder that exists (or can be created, its parent existing) and takes new files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FastquantError(f"{what} {folder} is a file, not a folder")
    target = folder if folder.is_dir() else folder.parent if str(folder.parent) else Path(".")
    if not target.is_dir():
        raise FastquantError(f"{what}: folder {target} does not exist")
    check_writable(target / ".fastquant-write-check", what)
    return folder


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path beside ``path``, then put it
    in place atomically. Returns ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FastquantError(f"{path} is a folder, not a file")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    except OSError as exc:
        raise FastquantError(f"cannot write {path} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
