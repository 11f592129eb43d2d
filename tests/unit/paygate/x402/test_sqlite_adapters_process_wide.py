"""The SQLite ledger's adapters (None and bool, ledger_sqlite) are registered for the whole
process: every other sqlite3 user in it (the transparency log's store, the batch-settlement
store, a witness, an operator's script) binds through them too. Each kind of value those bind
must bind exactly as it does in an interpreter that never imported the ledger."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import enum, json, sqlite3, sys
if sys.argv[1] == "ledger":
    import paygate.x402.ledger_sqlite  # noqa: F401  (registers its adapters)

class Level(enum.IntEnum):
    LOW = 1

class Flag(enum.IntFlag):
    ON = 4

class Count(int):
    pass

class Text(str):
    pass

values = [None, True, False, 0, 1, -1, 2**63 - 1, 1.5, "", "t", b"\\x00", bytearray(b"b"),
          memoryview(b"m"), Level.LOW, Flag.ON, Count(7), Text("x")]
db = sqlite3.connect(":memory:")
db.execute("CREATE TABLE t (i INTEGER, b BOOLEAN, s TEXT, n)")
bound = []
for value in values:
    row = db.execute("SELECT typeof(?), quote(?)", (value, value)).fetchone()
    db.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (value, value, value, value))
    stored = db.execute(
        "SELECT typeof(i), quote(i), typeof(b), quote(b), typeof(s), quote(s), quote(n)"
        " FROM t WHERE rowid = last_insert_rowid()"
    ).fetchone()
    bound.append([*row, *stored])
db.executemany("INSERT INTO t (n) VALUES (:v)", [{"v": None}, {"v": True}])
bound.append(db.execute("SELECT quote(n) FROM t ORDER BY rowid DESC LIMIT 2").fetchall())
print(json.dumps(bound))
"""


def _bindings(mode: str) -> list[object]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_kind_of_value_binds_as_without_the_ledgers_adapters() -> None:
    plain, with_ledger = _bindings("plain"), _bindings("ledger")
    assert with_ledger == plain
    assert plain[0][:2] == ["null", "NULL"]
    assert plain[1][:2] == ["integer", "1"]
    assert plain[2][:2] == ["integer", "0"]
