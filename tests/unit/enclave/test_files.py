"""enclave._files.replace_file: the one way the key-epoch state files (a TPM's epoch handles,
the workers' shared epochs and their pending keys) are rewritten — whole, 0600, through no
link, by several processes at once without writing into each other's text."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from enclave._files import replace_file


def test_a_state_file_is_replaced_whole_with_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "epochs.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    before = os.umask(0)
    try:
        replace_file(target, b'{"handles": [1]}')
    finally:
        os.umask(before)
    assert target.read_bytes() == b'{"handles": [1]}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.json"]  # no temporary left


def test_a_link_planted_where_an_old_writer_put_its_temporary_is_not_followed(
    tmp_path: Path,
) -> None:
    """The TPM vault once wrote through the fixed ``.epochs.json.tmp``: a link planted there
    (to a file elsewhere) is neither written through nor in the way."""
    victim = tmp_path / "elsewhere"
    victim.write_text("untouched")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / ".epochs.json.tmp").symlink_to(victim)
    (keys / f".epochs.json.{os.getpid()}.tmp").symlink_to(victim)
    replace_file(keys / "epochs.json", b"[]")
    assert (keys / "epochs.json").read_bytes() == b"[]"
    assert victim.read_text() == "untouched"


def test_writers_at_once_each_leave_their_whole_text(tmp_path: Path) -> None:
    """Threads of one process (the same pid) writing at once: every reading is one writer's
    whole text, never a mix or a part."""
    target = tmp_path / "shared-epochs.json"
    replace_file(target, json.dumps({"n": -1}).encode())
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for _ in range(50):
                replace_file(target, json.dumps({"n": n, "pad": "x" * 4096}).encode())
                json.loads(target.read_bytes())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert json.loads(target.read_bytes())["n"] in range(4)


def test_a_failed_write_leaves_the_old_text_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "epochs.json"
    target.write_text("old")

    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError, match="No space"):
        replace_file(target, b"new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.json"]
