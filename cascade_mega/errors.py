"""The bases of the errors `cascade` prints as one line: what a user can fix (exit 2), and why a
run stopped itself (exit 1).

A wrong key or value, an impossible layout, a truncated dataset or checkpoint, a bad request to a
decoder: each module raises its own subclass (so callers can tell them apart), and the command
line catches this base alone (`cli.py`). A leaf module: it imports nothing, so every layer of the
project, and the decoding core an exported model copies, can raise one.
"""


class UserError(Exception):
    """A problem in what the user gave (config, data, checkpoint, request), said in one message."""


class RunStopped(RuntimeError):
    """A run that stopped itself, with its reason (a non-finite step, a full disk): one line,
    exit 1; the run directory's `exit.json` says 'failed'."""
