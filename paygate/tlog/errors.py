"""The transparency log's errors: every store raises them (``store_sqlite``, ``store_postgres``,
``store_rules``), the service and the assembly catch them.

The log's HTTP answers (``InvalidLogPath``, ``LogNotFound``, ``LogUnavailable``) stay beside
their handler in :mod:`paygate.tlog.service`: they are gateway errors, and the stores below
never import the server.
"""

from __future__ import annotations

from paygate.errors import PaygateError


class LogStoreError(PaygateError):
    code = "log_unavailable"
    message = "the transparency log's store failed"


class LogOriginMismatch(LogStoreError):
    code = "log_origin_mismatch"
    message = "the log store holds another log (its origin differs)"
