"""The log store's errors: both stores and their rules raise them, the service and the
assembly catch them. (The log routes' HTTP answers are gateway errors: they stay with their
handler in :mod:`paygate.tlog.service`, since nothing below the service imports the server.)
"""

from __future__ import annotations

from paygate.errors import PaygateError


class LogStoreError(PaygateError):
    code = "log_unavailable"
    message = "the transparency log's store failed"


class LogOriginMismatch(LogStoreError):
    code = "log_origin_mismatch"
    message = "the log store holds another log (its origin differs)"
