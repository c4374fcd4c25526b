"""Write files so that nothing half-written ever looks complete: temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The temporary file lives in the destination directory so ``os.replace`` is an atomic rename on
    the same file system; its name starts with a dot and ends with ``.partial`` plus ``suffix``
    (default: the destination's own), so writers that dispatch on the extension (numpy appends
    ``.npy`` to other names, pandas infers compression) write exactly where we expect.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial" + (path.suffix if suffix is None else suffix), dir=path.parent
    )
    os.close(handle)
    # mkstemp creates the file owner-only (0600); give it the permissions a plain open() would.
    os.chmod(tmp_name, 0o666 & ~_current_umask())
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
