"""The paygate exception family: every error has a stable machine ``code`` and a safe message."""

from __future__ import annotations


class PaygateError(Exception):
    """Base of paygate's own errors. Messages never carry secrets, bodies or payment headers."""

    code = "paygate_error"
    #: The message when none is given; every subclass states its own.
    message = "paygate failed"

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or (self.message,)))
