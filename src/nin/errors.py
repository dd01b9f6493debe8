"""The one exception type that means "the user asked for something we cannot do".

The command line catches :class:`NinError` and prints its message as a single
line; every other exception is a bug and keeps its traceback.
"""


class NinError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, a bad flag value."""
