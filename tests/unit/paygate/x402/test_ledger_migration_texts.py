"""The released migration steps run the same SQL forever: a ledger migrated by an earlier
release and one migrated now must hold the same schema. Each step's statements, per dialect, are
pinned by their SHA-256 (joined by NUL) as released; a new step is appended, never edited."""

from __future__ import annotations

import hashlib

import pytest

from paygate.x402 import ledger_postgres_schema, ledger_sqlite_schema

RELEASED = {
    "sqlite": {
        1: (3, "e8522cec7c6794ca10609afcfd1b395883a7053c03071be71b80be4852f4e2d0"),
        2: (6, "3ef61aa89d460180a0c646b22ea93564b7e6ac772feb31e7f38a4355a241ffea"),
        3: (10, "a9fd8984ab9e4df3d2e2f67052db77b302c908c24aba8f43bddeff779633d9f3"),
        4: (8, "2f56d46d7e558222bf563b1fbf813b030cb81c44382d83a952a8b43bcb844d49"),
        5: (7, "c60f25480578b576f3db1524511df9f3cd080d186e221ef080791bf7f0a404fd"),
        6: (3, "2a9002517d5a03b630ad1f5c8073b0a06bd4fa7a2150847c32f87b0e701718ce"),
        7: (4, "bea5bb23688f2b3c4c2b7b10caa155eb9f71f92a8d88ce8ef7d576cee6bd8695"),
        8: (3, "354f06a92edc08886658aa8a2448eacf3cc3ec97b0cd1b5746341e5eb22c7391"),
        9: (1, "9dc1b651c4cf7ce612a8fc75b67fe70c2255b80e07cbdaa88d92a0e7b06e5cf1"),
        10: (2, "6375b494c6d5b93dfd317ed8935141a5feaab00da06bc2ad2b48c98b4534f71e"),
        11: (2, "5b2e070f978353bb8fa0db959191c322cadd92fb30ad654852d37d8bdbcb3103"),
        12: (1, "b67aab37aa74467fbf5c1ba94add8402c349427863fbfb3183eeec7c2ee77db1"),
        13: (1, "bde02db6dbce8964da1c2ae5c3ebe640288b5a11509d1a8821805df722caa199"),
        14: (1, "92b12ee45a3e445c2f4285fa4e6a8ae34ef620badb60f869f4b9f6a321ca08f2"),
        15: (6, "9e6ae26462d5a7e4d4b59522ca6a831c2b8d14e4b8fa8775b6046c0c21d880ca"),
        16: (4, "072fb93b7b9eacd8bcf0f6707616ac09debae3ab7fd8e9ff91a5d246add65d70"),
        17: (4, "468c93ea9cd2d6746081cb6179e76836db0eca88575ba9fe9a03bcd1c2b9829b"),
    },
    "postgres": {
        1: (3, "15ace1f755611ae0eaf8703d904ff812b0821970032826b6790c3bd58050fd37"),
        2: (4, "bdd2c02ffb964f5a23393ba059b143e71a1497993cc0af5914bf8eb9bf7d4b6a"),
        3: (4, "7660d1197804b1bbb0c570d185510a630e36386ba2f93ad7c4572fae39cc553c"),
        4: (8, "036a5615043c3027b97c2e47babd8695665ab95c3ae8dafb889a73e43212fc96"),
        5: (7, "2e58089f6985ca5b6ee9d79ce3c9094bc8b9d7d8466a936779e8995b2efb7071"),
        6: (3, "1942ff204685aa909d6a4b5b0a4f108fcc77cb565ce432f992d3fb2eae554ab7"),
        7: (4, "791db816421b157b36cc649eb01c2058b2bc56f7cff48c8746234ef155ba5dec"),
        8: (3, "6de188e192a9581a2f1b2bb473a8c9a96e02e3dbdb9e9339d6240e73b0913b3a"),
        9: (1, "ce6bc0d9fc1ea5ce40af64af3e4f569dbb3b84146861628845a7cbdc20d33ff3"),
        10: (2, "6375b494c6d5b93dfd317ed8935141a5feaab00da06bc2ad2b48c98b4534f71e"),
        11: (2, "bd2ce2863f13c58c9facc2ade306fbaf4205513c2e0bc49ef9aa76689bdf2450"),
        12: (1, "feef3d4de3d729c0de40a663617cb3ea836ea41e3cf0a15b32ba4a2255fbf154"),
        13: (1, "bde02db6dbce8964da1c2ae5c3ebe640288b5a11509d1a8821805df722caa199"),
        14: (1, "73e006496a256d7d17abefe87186b35f6f6528fa5f9f46bdcb2a7430e8f51d55"),
        15: (6, "7f9098b62f6203ed48a4b4853185f2e2c4fd7d6a3a31a7f49006c692f21caf4f"),
        16: (4, "8b290c2377635fa26d3477449f354431d07d9499aeb56c1989668b103bc76e86"),
        17: (4, "ede382a658a08c1e574afe7bab5b177907eb0508537683bbb7d6f0d8b8e6505f"),
    },
}
MIGRATIONS = {
    "sqlite": ledger_sqlite_schema.MIGRATIONS,
    "postgres": ledger_postgres_schema.MIGRATIONS,
}


@pytest.mark.parametrize(
    ("dialect", "step"), [(d, s) for d, steps in RELEASED.items() for s in steps]
)
def test_a_released_step_runs_the_sql_it_was_released_with(dialect: str, step: int) -> None:
    statements = MIGRATIONS[dialect][step]
    count, digest = RELEASED[dialect][step]
    assert len(statements) == count
    assert hashlib.sha256("\x00".join(statements).encode()).hexdigest() == digest


def test_both_dialects_have_the_same_steps() -> None:
    assert set(MIGRATIONS["sqlite"]) == set(MIGRATIONS["postgres"])
    assert ledger_sqlite_schema.SCHEMA_VERSION == ledger_postgres_schema.SCHEMA_VERSION
    assert max(MIGRATIONS["sqlite"]) == ledger_sqlite_schema.SCHEMA_VERSION


def test_every_step_is_pinned_in_both_dialects() -> None:
    # A step released unpinned could be edited later without a failing test (11 and
    # PostgreSQL's 15 once were).
    for dialect, steps in RELEASED.items():
        assert set(steps) == set(MIGRATIONS[dialect]), dialect
