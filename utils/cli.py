"""What every command-line script shares at its top level: one-line errors and polite stops.

``run_cli(main)`` runs a script's ``main`` and turns the failures a user causes or meets into one
line on stderr and an exit status, instead of a traceback:

- ``InputError`` (bad files, values, flags): ``<script>: error: <message>``, status 2 (as argparse);
- the operating system refusing (a missing file, no permission, a full disk, a read-only file
  system): the file and the reason, status 1;
- Ctrl-C / SIGTERM: ``interrupted``, status 130 / 143 (128 + the signal, as a shell reports it);
  SIGTERM unwinds like Ctrl-C, so a script's ``finally`` blocks remove its temporaries.

Everything else is a bug and keeps its traceback. ``TUSREC_TRACEBACK=1`` shows the traceback of
every failure (for reporting one of ours).

``StopSignals`` turns SIGINT and SIGTERM into a request that a long loop polls between steps, so
training can save its state and stop cleanly; a second signal stops at once.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from utils.errors import InputError

TRACEBACK_ENV = "TUSREC_TRACEBACK"
EXIT_INPUT = 2
EXIT_ENVIRONMENT = 1
# The operating system's refusals that are about the user's files or machine, not our code: reported
# as one line naming the file. (A missing file is also what the readers raise for a wrong path.)
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENAMETOOLONG}


class Interrupted(KeyboardInterrupt):
    """Raised when a stop signal arrives (``signum``: SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def describe_os_error(error: OSError) -> str:
    """``<file>: <reason>`` for an OSError (``[Errno 28] No space left on device: 'x'`` reads worse)."""
    if error.strerror is None:  # raised with our own message, which names the file
        return str(error)
    reason = error.strerror
    if error.errno in (errno.ENOSPC, errno.EDQUOT) and reason == os.strerror(error.errno):
        reason += " (free some space or write elsewhere, then run again)"
    return f"{error.filename}: {reason}" if error.filename is not None else reason


def one_line(text: str) -> str:
    return " ".join(str(text).split()) if "\n" in str(text) else str(text)


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; return the process exit status (0, or the status of the failure above)."""
    program = Path(sys.argv[0]).name or "tusrec"
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so staging folders and temporaries are removed on the way out.
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main(argv)
        return 0
    except InputError as error:
        if show_traceback:
            traceback.print_exc()
        print(f"{program}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as error:
        if not isinstance(error, FILE_ERRORS) and error.errno not in MACHINE_ERRNOS:
            raise
        if show_traceback:
            traceback.print_exc()
        print(f"{program}: error: {one_line(describe_os_error(error))}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        if show_traceback:
            traceback.print_exc()
        print(f"{program}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


class StopSignals:
    """While active, SIGINT and SIGTERM set ``requested`` instead of stopping the process.

    A loop polls ``requested`` between steps and stops where its state is whole (a checkpoint can
    be written). A second signal raises ``Interrupted`` at once, so a stuck step can still be
    stopped. Only the main thread can install handlers; elsewhere (a test runner's worker thread)
    this does nothing and the signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def ignore_stop_signals(*_) -> None:
    """For worker processes (a DataLoader's ``worker_init_fn``): ignore SIGINT and SIGTERM, which
    reach the whole process group; their parent stops them when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
