"""Writing HDF5 files so that a full disk is an ordinary error, not a crash.

When the HDF5 library's own file driver meets a failed write (no space left on the device, a quota),
the file can no longer be closed: every later flush fails again, and at interpreter exit the library
tries once more and the process dies with a segmentation fault (exit 139), after dozens of chained
h5py tracebacks. So every HDF5 file we write goes through a Python file object (h5py's ``fileobj``
driver) guarded by ``_StopWritingAfterError``: the first failed write raises as usual, every later
write is dropped, so closing succeeds and only the original error, naming the file, reaches the
caller. The half-written file is a temporary (``atomic_path``) and is deleted by the caller.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import h5py


class _StopWritingAfterError(io.RawIOBase):
    """A writable, seekable file whose writes become no-ops after the first failed one."""

    def __init__(self, raw):
        super().__init__()
        self._raw = raw
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._raw.readinto(buffer)

    def write(self, data) -> int:
        if self.error is not None:
            return len(data)
        try:
            return self._raw.write(data)
        except OSError as error:
            self.error = error
            raise

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size=None) -> int:
        if self.error is not None:
            return self._raw.tell() if size is None else size
        return self._raw.truncate(size)

    def flush(self) -> None:
        if self.error is None:
            self._raw.flush()


@contextlib.contextmanager
def writing_hdf5(path):
    """Yield an ``h5py.File`` open for writing at ``path`` (created or truncated).

    A failed write (e.g. ENOSPC) raises OSError naming ``path``, with the file closed; give a
    temporary path (``utils.atomic.atomic_path``) so the incomplete file is removed.
    """
    path = Path(path)
    with open(path, "w+b", buffering=0) as raw:
        guard = _StopWritingAfterError(raw)
        try:
            with h5py.File(guard, "w") as handle:
                yield handle
        except OSError:
            if guard.error is None:
                raise
            error = guard.error
            raise OSError(error.errno, error.strerror, str(path)) from None
        if guard.error is not None:  # HDF5 swallowed the failure (a write during close): still refuse
            error = guard.error
            raise OSError(error.errno, error.strerror, str(path))
