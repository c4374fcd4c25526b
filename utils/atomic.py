"""Write files so that nothing half-written ever looks complete: temporary name, then rename.

Every temporary is hidden (its name starts with a dot), sits beside its destination and ends in
``.partial`` (plus the destination's suffix). While its writer lives, it holds an advisory lock
(``flock``) on the temporary; the kernel drops the lock when the process dies, however it dies
(SIGKILL, a lost machine). So a temporary that can be locked belongs to a dead writer:
``remove_stale_temporaries`` deletes those left by killed runs, and the writers call it first, so a
killed run's leftovers (a 12 GB staging folder of DDFs, a half-saved checkpoint) are gone after the
next run writing the same destination.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial"
OLD = ".old"  # a result moved aside while its replacement is put in place


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The temporary file lives in the destination directory so ``os.replace`` is an atomic rename on
    the same file system; its name starts with a dot and ends with ``.partial`` plus ``suffix``
    (default: the destination's own), so writers that dispatch on the extension (numpy appends
    ``.npy`` to other names, pandas infers compression) write exactly where we expect. Temporaries
    of ``path`` left by killed runs are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=PARTIAL + (path.suffix if suffix is None else suffix), dir=path.parent
    )
    tmp_path = Path(tmp_name)
    try:
        _lock(handle)  # held until this writer is done: the temporary is not stale
        # mkstemp creates the file owner-only (0600); give it the permissions a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as error:
        tmp_path.unlink(missing_ok=True)
        if error.errno is not None and error.filename in (None, str(tmp_path)):
            # Name the destination (pandas' write on a full disk names no file; others the temporary).
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        os.close(handle)


@contextlib.contextmanager
def locked_temporary_folder(path, suffix: str = PARTIAL):
    """Create a hidden folder beside ``path`` (``.<name>.XXXX<suffix>``, mode as ``mkdir`` makes it)
    and hold its lock while the block runs; yields its Path. The caller renames or removes it."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    # mkdtemp makes it owner-only (0700); a result folder gets what a plain mkdir gives (0755 usually).
    os.chmod(folder, 0o777 & ~_current_umask())
    handle = os.open(folder, os.O_RDONLY)
    try:
        _lock(handle)  # the lock is on the inode: it stays with the folder when it is renamed
        yield folder
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty, locked temporary folder beside ``path``; on success it replaces ``path`` (a
    folder, whose old contents are deleted), on any error it is deleted and ``path`` stays as it was.

    ``rename`` cannot replace a non-empty folder, so an existing ``path`` is first moved into a
    locked ``.old`` temporary: for an instant nothing is at ``path``, which is never mistaken for a
    complete result. A run killed in that instant has its old result put back by the next one, and
    every temporary of ``path`` left by killed runs is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path, marker=OLD):
        if not path.exists() and (stale / "previous").is_dir():
            os.replace(stale / "previous", path)
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(path)
    with locked_temporary_folder(path) as staging:
        try:
            yield staging
            if path.exists():
                with locked_temporary_folder(path, suffix=OLD) as old:
                    os.replace(path, old / "previous")
                    os.replace(staging, path)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the temporaries of ``path`` (``.<name>.*.partial*`` files and folders) whose writer has
    died; returns what was removed."""
    removed = []
    for entry in stale_temporaries(path):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def stale_temporaries(path, marker: str = PARTIAL) -> Iterator[Path]:
    """Yield the hidden temporaries of ``path`` (``.<name>.*`` with ``marker`` after the name) whose
    writer has died, each while holding its lock (so no other cleaner acts on it meanwhile).

    A temporary whose lock cannot be taken is a live writer's and is skipped, as is everything on a
    file system without ``flock`` support.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        if marker not in entry.name[len(path.name) + 2:]:
            continue
        try:
            handle = os.open(entry, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            if _try_lock(handle):
                yield entry
        finally:
            os.close(handle)


def _lock(handle: int) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: nothing marks the temporary live, so nothing removes it
        pass


def _try_lock(handle: int) -> bool:
    """True if the lock was free (the writer is gone); False if held, or if locks are not supported."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
