"""Writing HDF5 files so that a full disk is an ordinary error, not a crash.

When the HDF5 library meets a failed write (no space left on the device, a quota), the file can no
longer be closed: every later flush fails again, a failure inside h5py's object clean-up is
ignored, and the process dies with a segmentation fault (exit 139), at the latest at interpreter
exit, after dozens of chained tracebacks. Two defences, in ``writing_hdf5``:

1. **Reserve the space first.** A writer that knows how many bytes it will write (``reserve``:
   the datasets' sizes) gets them allocated before HDF5 writes anything (``fallocate`` with
   ``FALLOC_FL_KEEP_SIZE``: blocks reserved beyond the end of the still-empty file; HDF5 cuts the
   file to its real size when it closes it). A full disk then fails at once, with ENOSPC naming the
   file, before any work.
2. **Never let HDF5 see a failed write.** The file is written through a Python file object (h5py's
   ``fileobj`` driver) that, after the first failed write, records the error and drops that and
   every later write while reporting success, so HDF5 finishes and closes normally; the recorded
   error, naming the file, is raised when the file is closed. (On file systems without
   ``fallocate`` this is the only defence; with it, it covers another process filling the disk.)

The file written is a temporary (``utils.atomic.atomic_path``), deleted when an error is raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
from pathlib import Path

import h5py

# HDF5's own structures (superblock, object headers, chunk B-trees) beside the datasets' bytes.
RESERVE_OVERHEAD_BYTES = 1 << 20
RESERVE_OVERHEAD_FRACTION = 0.01
_FALLOC_FL_KEEP_SIZE = 1


class _DropWritesAfterError(io.RawIOBase):
    """A writable, seekable file that, after its first failed write, drops writes and reports success."""

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
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                return self._raw.write(data)
            except OSError as error:
                self.error = error
        return size

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


def reserve_space(handle, size: int, path) -> None:
    """Allocate ``size`` bytes for the open file ``handle`` without changing its length.

    Raises OSError (ENOSPC, EDQUOT) naming ``path`` when the disk cannot hold them; does nothing
    where the file system or the C library cannot reserve (the writes then find out).
    """
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux / glibc
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(handle.fileno(), _FALLOC_FL_KEEP_SIZE, 0, int(size)) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(code, f"{os.strerror(code)}: {size / 1e9:.2f} GB are needed for this file", str(path))


@contextlib.contextmanager
def writing_hdf5(path, reserve: int | None = None):
    """Yield an ``h5py.File`` open for writing at ``path`` (created or truncated).

    ``reserve``: the bytes the datasets will hold, if known: that much (plus HDF5's overhead) is
    reserved first, so a full disk fails before any writing. A failed write raises OSError naming
    ``path`` when the file is closed; give a temporary path (``utils.atomic.atomic_path``) so the
    incomplete file is removed.
    """
    path = Path(path)
    with open(path, "w+b", buffering=0) as raw:
        if reserve:
            reserve_space(raw, reserve * (1 + RESERVE_OVERHEAD_FRACTION) + RESERVE_OVERHEAD_BYTES, path)
        guard = _DropWritesAfterError(raw)
        with h5py.File(guard, "w") as handle:
            yield handle
        if guard.error is not None:
            raise OSError(guard.error.errno, guard.error.strerror, str(path))
