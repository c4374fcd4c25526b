"""The exception for bad input: what the user gave (a file, a value, a flag) is not what was expected.

Command-line scripts print it as one line and exit with status 2 (``utils.cli.run_cli``); any other
exception is a bug and keeps its traceback. It is a ``ValueError``, so callers that catch
``ValueError`` (and the tests' ``pytest.raises(ValueError)``) see it as before.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input; the message names the file or flag, the value and what was expected, on one line."""
