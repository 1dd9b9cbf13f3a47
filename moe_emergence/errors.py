"""The one exception type for user mistakes, and how command-line scripts report it.

``ConfigError`` (a ``ValueError``, so callers that catch ``ValueError`` keep working) is raised by the
library for anything the user can fix: a malformed, unknown, mistyped or out-of-range config value, a
base or resume checkpoint that does not fit the config, missing or empty data, an occupied run folder.
Only the command-line layer catches it (``run_cli``): one ``error: ...`` line on stderr and exit status 2.
Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

USER_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A user mistake: bad config, file, checkpoint, data or run folder. The message names what is wrong
    and what is allowed."""


@contextmanager
def as_user_error(what: str, *types: type[BaseException]) -> Iterator[None]:
    """Re-raise ``types`` (default ``ValueError``, ``OSError``) from a library whose documented way to
    reject bad input is a plain ``ValueError`` (e.g. the data package) as ``ConfigError("what: ...")``."""
    catch = types or (ValueError, OSError)
    try:
        yield
    except ConfigError:
        raise
    except catch as e:
        raise ConfigError(f"{what}: {e}") from e


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``; a ``ConfigError`` becomes one ``error:`` line on stderr and exit status 2."""
    try:
        return main(argv)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return USER_ERROR_EXIT
