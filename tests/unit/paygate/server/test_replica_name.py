"""The default replica name kept in the state directory (paygate.server.replica_name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paygate.server import replica_name
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


def test_a_copy_on_another_host_with_the_same_hostname_and_no_machine_id_gets_a_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Containers: no /etc/machine-id (or the image's, the same everywhere) and a fixed
    # hostname; the state volume restored from one backup on two hosts (or shared over a
    # network filesystem whose locks are per host). Only the boot tells the hosts apart.
    monkeypatch.setattr(replica_name, "MACHINE_ID", tmp_path / "no-machine-id")
    held = hold_default_name(tmp_path)
    assert held is not None
    held.close()
    kept = json.loads((tmp_path / NAME_FILE).read_text())
    assert kept["machine"] == ""
    # The same file as the other host made it: same hostname, same (absent) machine id.
    other = {key: value for key, value in kept.items() if key != "boot"}
    (tmp_path / NAME_FILE).write_text(json.dumps({**other, "boot": "another-host-s-boot"}))
    here = hold_default_name(tmp_path)
    assert here is not None
    assert here.name != kept["name"]  # the other host runs under that name, on this ledger
    here.close()
    again = hold_default_name(tmp_path)
    assert again is not None
    assert again.name == here.name  # and a restart on this boot keeps this host's own
    again.close()
