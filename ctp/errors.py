"""The one user-facing error type.

Library code raises :class:`CTPError` for anything the user can fix (bad arguments, missing
files, incompatible artifacts). The CLI prints its message as one line on stderr and exits
with status 2; anything else is a bug and keeps its traceback.
"""


class CTPError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
