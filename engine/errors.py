"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator


class FairsynthError(Exception):
    """Bad input or an unmet precondition. Jobs print it as one line and exit with code 2."""

    exit_code = 2


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every error behind it: ``__cause__``, ``__context__`` and the ``cause``
    of a Ray task or actor error (an error raised on a worker arrives wrapped in one)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        inner = getattr(err, "cause", None)
        stack += [e for e in (err.__context__, err.__cause__, inner) if isinstance(e, BaseException)]


def find_cause(exc: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    return next((err for err in causes(exc) if match(err)), None)


def disk_full(exc: BaseException) -> OSError | BaseException | None:
    """The error behind ``exc`` that says a disk is full (ENOSPC, or its text where a library
    passed on only the message, as Tune does for a failed trial)."""
    found = find_cause(exc, lambda e: isinstance(e, OSError) and e.errno == errno.ENOSPC)
    if found is None:
        found = find_cause(exc, lambda e: "No space left on device" in str(e) or "[Errno 28]" in str(e))
    return found
