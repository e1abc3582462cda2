"""The one exception type that means "the user asked for something that cannot work".

The CLI prints its message as a single line and exits non-zero; anything else that
escapes is a bug and keeps its traceback. Standard library only, importable from every
layer.
"""


class GitcapError(Exception):
    """A user-facing error: bad input, a missing file, an impossible combination."""
