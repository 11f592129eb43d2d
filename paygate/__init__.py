import sys as _sys

#: The interpreter's recursion limit when paygate was first imported. py_ecc (pulled in by
#: eth-account and web3) raises it to 100,000 at import: deep recursion in C code (the standard
#: json parser, for one) then overflows the C stack and kills the process instead of raising
#: RecursionError. The entry points put it back once their imports are done.
STARTUP_RECURSION_LIMIT: int = min(_sys.getrecursionlimit(), 1000)


def restore_recursion_limit() -> None:
    """Undo a dependency's raised recursion limit (call after the heavy imports)."""
    if _sys.getrecursionlimit() != STARTUP_RECURSION_LIMIT:
        _sys.setrecursionlimit(STARTUP_RECURSION_LIMIT)
