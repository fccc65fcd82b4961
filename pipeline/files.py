"""Writing outputs safely: to a temporary name in the same folder, then renamed into place; and
locks, so that two runs never write one folder at once."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import PipelineError

TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")  # what atomic_write names its temporary files


# The errors of a folder or disk that cannot take a write: one line naming the file, not a traceback.
WRITE_FAULTS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def cannot_write(path: Path, error: OSError) -> PipelineError:
    return PipelineError(f"{path}: cannot write ({error.strerror or error})")


def atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(binary file)` to a temporary name beside `path`, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in WRITE_FAULTS:
            raise cannot_write(path, e) from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a folder we cannot write holds no temporary file of ours


def check_writable(*folders: Path) -> None:
    """Fail now, in one line, if files cannot be created in each folder (or, where it does not
    exist yet, in the nearest folder above it): before hours of work, not after. Creates nothing."""
    for folder in folders:
        folder = Path(folder)
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        probe = existing / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb"):
                pass
            probe.unlink()
        except OSError as e:
            raise cannot_write(folder, e) from None


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"  # strict JSON: no NaN, no Infinity
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold a lock on `folder` (the file `.<folder>.lock` beside it) for the block: exclusive for a
    run that replaces the folder, shared for runs that each add their own files to it. A conflicting
    holder makes this raise PipelineError at once instead of waiting."""
    folder = Path(folder)
    lock = folder.parent / f".{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise cannot_write(lock, e) from None
    with f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{folder}: another run is writing it; wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temp_files(folder: Path, any_writer: bool) -> int:
    """Remove atomic_write's temporary files left by killed runs: all of them (`any_writer`: no
    other run can be writing), or those whose process is gone."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp-*"):
        match = TEMP_NAME.match(path.name)
        if match and (any_writer or not _alive(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
