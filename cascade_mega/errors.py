"""The one base of the errors a user can fix: `cascade` prints them as one line and exits 2.

A wrong key or value, an impossible layout, a truncated dataset or checkpoint, a bad request to a
decoder: each module raises its own subclass (so callers can tell them apart), and the command
line catches this base alone (`cli.py`). A leaf module: it imports nothing, so every layer of the
project, and the decoding core an exported model copies, can raise one.
"""


class UserError(Exception):
    """A problem in what the user gave (config, data, checkpoint, request), said in one message."""
