"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""


class FairsynthError(Exception):
    """Bad input or an unmet precondition. Jobs print it as one line and exit with code 2."""

    exit_code = 2
