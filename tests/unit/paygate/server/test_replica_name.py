"""The default replica name kept in the state directory (paygate.server.replica_name)."""

from __future__ import annotations

import json
from pathlib import Path

from paygate.server.replica_name import NAME_FILE, hold_default_name
from paygate.x402.ledger import check_replica


def test_the_name_is_kept_across_starts_and_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = hold_default_name(tmp_path)
    assert first is not None
    check_replica(first.name + ".w64")  # a worker's name is a valid replica too
    assert hold_default_name(tmp_path) is None  # held: the second runs as <hostname>:<pid>
    first.close()
    again = hold_default_name(tmp_path)
    assert again is not None
    assert again.name == first.name
    again.close()


def test_a_damaged_or_foreign_file_gets_a_new_name(tmp_path: Path) -> None:
    held = hold_default_name(tmp_path)
    assert held is not None
    held.close()
    kept = json.loads((tmp_path / NAME_FILE).read_text())
    (tmp_path / NAME_FILE).write_text(json.dumps({**kept, "machine": "another"}))
    copied = hold_default_name(tmp_path)
    assert copied is not None
    assert copied.name != kept["name"]
    copied.close()
    (tmp_path / NAME_FILE).write_text('{"name": "../../etc"')
    damaged = hold_default_name(tmp_path)
    assert damaged is not None
    assert damaged.name not in (kept["name"], copied.name)
    damaged.close()


def test_a_directory_that_cannot_keep_it_falls_back(tmp_path: Path) -> None:
    assert hold_default_name(tmp_path / "missing") is None
