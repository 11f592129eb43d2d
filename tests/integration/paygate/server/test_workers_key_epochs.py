"""`paygate serve --workers 2` with key epochs in one SoftHSM2 token (and in one TPM): both
workers present the same epoch keys, a request sealed to them is served by whichever worker
takes it, a rotation moves both, the previous epoch is served by both within its grace period
and refused by both after it, and the backend holds no epoch key that is not live (none once
the gateway stopped).

Which worker answers is chosen, not hoped for: the other one is paused (SIGSTOP by its own
pid), so only the chosen one accepts on the shared socket; its attestation names it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from paygate_dev.stack import SoftHsmToken, Swtpm

import enclave
from enclave.attestation import binding
from enclave.attestation import tpm as att
from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.shared_epochs import host_lock
from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import TpmEpochVault
from enclave.tlog import entries
from paygate import wire
from paygate.server.epochs import request_rotation
from tests.fixtures.components import free_port, require_binary
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.slow_tpm import SlowTpm, Tabrmd

PAYGATE = str(Path(sys.executable).with_name("paygate"))
HOST = "epoch-host"
WORKERS = {f"{HOST}.w1", f"{HOST}.w2"}
GRACE = 3.0
BODY = json.dumps(CHAT_BODY).encode()
LABEL = "paygate"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def attest(url: str) -> binding.Binding:
    """One attestation on a new connection: the binding (its replica names the worker)."""
    nonce = os.urandom(32)
    response = httpx.get(f"{url}{wire.ATTESTATION_PATH}", params={"nonce": nonce.hex()}, timeout=30)
    assert response.status_code == 200, response.text
    document = response.json()
    bound = binding.parse(document["binding"])
    assert bound.nonce == nonce
    if "tpm" in document:  # each epoch's keys, certified by the AK when they were made
        ak = att.check_ak(_unb64(document["tpm"]["ak_public"]))
        for epoch in bound.epochs:
            for part, point in (("sealing", epoch.sealing_key), ("receipt", epoch.receipt_key)):
                c = document["tpm"]["epochs"][epoch.id][part]
                certified = att.CertifiedKey(
                    _unb64(c["public"]),
                    att.SignedAttest(_unb64(c["attest"]), _unb64(c["signature"])),
                )
                att.check_certified(ak, certified, point, f"epoch {epoch.id} {part}")
    return bound


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def send(url: str, epoch: binding.EpochEntry) -> tuple[int, str | None]:
    """A chat request sealed to ``epoch``'s key, naming it, on a new connection."""
    blob = enclave.seal_v2(epoch.sealing_key, BODY, method="POST", path=CHAT, key_id=epoch.id).blob
    response = httpx.post(
        url + CHAT,
        content=blob,
        headers={"Content-Type": enclave.CONTENT_TYPE, wire.KEY_ID_HEADER: epoch.id},
        timeout=30,
    )
    return response.status_code, response.headers.get(wire.ERROR_HEADER)


@contextlib.contextmanager
def only(worker: int, others: list[int]) -> Iterator[None]:
    """Only ``worker`` accepts: every other worker is paused meanwhile."""
    paused = [pid for pid in others if pid != worker]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)


def token_epochs(token: SoftHsmToken, epochs_dir: Path) -> set[str]:
    """The epochs whose keys the token holds (one name per epoch); read as a worker reads,
    not while another writes the token."""
    vault = Pkcs11EpochVault(token.module_path, token.token_label, token.pin, LABEL)
    with host_lock(epochs_dir):
        return {label.removesuffix("-receipt") for label in vault.labels()}


def test_two_workers_serve_one_set_of_epoch_keys_through_a_rotation(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    token = softhsm_token
    Pkcs11Key.generate(token.module_path, token.token_label, token.pin, LABEL).close()
    backend = {
        **token.env(),
        "PAYGATE_KEY_BACKEND": "pkcs11",
        "PAYGATE_PKCS11_MODULE": token.module_path,
        "PAYGATE_PKCS11_TOKEN_LABEL": token.token_label,
        "PAYGATE_PKCS11_KEY_LABEL": LABEL,
        "PAYGATE_PKCS11_PIN": token.pin,
    }
    stderr = serve_through_rotation(
        backend, tmp_path, lambda: token_epochs(token, tmp_path / "epochs")
    )
    assert token.pin not in stderr  # the PIN never reaches the logs


def test_two_workers_serve_one_set_of_tpm_epoch_keys_through_a_rotation(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    """The same in one TPM (swtpm behind tpm2-abrmd): each worker loads the epoch's persistent
    handles, and its attestation carries the AK's certifications made by the worker that
    created them."""
    dbus = require_binary("dbus-daemon", "dbus")
    abrmd = require_binary("tpm2-abrmd", "tpm2-abrmd")
    tpm = swtpm_factory()
    key_dir = tmp_path / "tpm-key"
    with TpmKey.generate(tpm.tcti, key_dir):
        pass  # swtpm serves one connection at a time: this one closes before the broker's
    with SlowTpm(tpm.port, 0.0) as relay:
        broker = Tabrmd(relay.tcti, tmp_path / "tabrmd", dbus=dbus, abrmd=abrmd).start()
        try:
            os.environ.update(broker.env)
            backend = {
                "PAYGATE_KEY_BACKEND": "tpm",
                "PAYGATE_TPM_TCTI": broker.client_tcti,
                "PAYGATE_TPM_KEY_DIR": str(key_dir),
                "PAYGATE_ATTESTATION": "tpm",
            }

            def handles() -> set[str]:
                # Read as a worker reads: not between a worker's eviction and its listing.
                with host_lock(tmp_path / "epochs"):
                    listed = json.loads((key_dir / "epochs.json").read_text())["handles"]
                    with TpmKey.open(broker.client_tcti, key_dir) as base:
                        vault = TpmEpochVault(base)
                        held = [h for h in listed if vault.present(h)]
                assert held == listed  # listed exactly while the TPM holds it
                return {f"epoch {i}" for i in range(len(held) // 2)}

            serve_through_rotation(backend, tmp_path, handles)
        finally:
            os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
            broker.stop()


def serve_through_rotation(
    backend: dict[str, str], tmp_path: Path, epoch_objects: Callable[[], set[str]]
) -> str:
    """Two workers through a rotation (module docstring); ``epoch_objects``: the epochs whose
    keys the backend holds. Returns the gateway's stderr."""
    epochs_dir = tmp_path / "epochs"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        **backend,
        "PAYGATE_KEY_EPOCH": "600",
        "PAYGATE_KEY_EPOCH_GRACE": f"{GRACE:g}",
        "PAYGATE_KEY_EPOCH_DIR": str(epochs_dir),
        "PAYGATE_REPLICA_ID": HOST,
        "PAYGATE_ATTESTATION_RATE_PER_MINUTE": "100000",
        "PAYGATE_ATTESTATION_GLOBAL_RATE_PER_MINUTE": "100000",
    }
    with ThreadedStack() as fake:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
             "--upstream-url", fake.fake_url],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(_children(proc.pid)) < 2 or not _live(url):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.1)
            pids = _children(proc.pid)
            # Both workers answer (new connections until each has), with the same epoch keys.
            seen: dict[str, tuple[binding.EpochEntry, ...]] = {}
            while set(seen) != WORKERS:
                assert time.monotonic() < deadline, seen
                bound = attest(url)
                assert bound.replica is not None
                seen[bound.replica] = bound.epochs
            assert len(set(seen.values())) == 1, seen
            (first,) = seen[f"{HOST}.w1"]
            assert first.id.endswith("@" + HOST)  # the host's key, not one worker's
            assert len(epoch_objects()) == 1  # one epoch on the token, not one per worker

            # Sealed to the attested key: served by either worker, whichever takes it.
            answered = {}
            for pid in pids:
                with only(pid, pids):
                    answered[attest(url).replica] = pid
                    assert send(url, first) == (200, None)
            assert set(answered) == WORKERS

            # A rotation (asked as `paygate keys rotate` asks): both workers move to it.
            status = request_rotation(epochs_dir, 20.0)
            assert status["key_id"] != first.id
            for pid in pids:
                with only(pid, pids):
                    bound = attest(url)
                    assert [e.id for e in bound.epochs] == [status["key_id"], first.id]
                    new = bound.epochs[0]
                    assert send(url, new) == (200, None)
                    assert send(url, first) == (200, None)  # the previous, within its grace
            assert len(epoch_objects()) == 2

            # After the grace period: the previous epoch is refused by both, destroyed once.
            retire_by = time.monotonic() + GRACE + 20
            while len(epoch_objects()) != 1:
                assert time.monotonic() < retire_by, "the previous epoch was never destroyed"
                time.sleep(0.2)
            for pid in pids:
                with only(pid, pids):
                    assert [e.id for e in attest(url).epochs] == [new.id]
                    assert send(url, first) == (410, "key_epoch_retired")
                    assert send(url, new) == (200, None)
            shared = json.loads((epochs_dir / "shared-epochs.json").read_text())
            assert [e["id"] for e in shared["epochs"]] == [new.id]
            assert sorted(m[0] for m in shared["members"]) == sorted(pids)

            # A worker killed outright is restarted and joins the live epoch: it neither sweeps
            # it from under the other worker nor makes one of its own.
            victim, survivor = pids
            os.kill(victim, signal.SIGKILL)
            restarted = time.monotonic() + 60
            while True:
                workers = _children(proc.pid)
                if len(workers) == 2 and victim not in workers:
                    break
                assert time.monotonic() < restarted, "the worker was not restarted"
                time.sleep(0.05)
            (replacement,) = set(workers) - {survivor}
            while True:  # until the replacement has joined (it listens once it has)
                with only(replacement, workers):
                    if _live(url):
                        break
                assert time.monotonic() < restarted, "the replacement never served"
            for pid in (replacement, survivor):
                with only(pid, workers):
                    assert [e.id for e in attest(url).epochs] == [new.id]
                    assert send(url, new) == (200, None)
            assert len(epoch_objects()) == 1
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            if proc.stderr is not None:
                proc.stderr.close()
    assert proc.returncode == 0, stderr
    # The last worker to stop destroyed every epoch: the backend holds none.
    assert epoch_objects() == set()
    return stderr


def _live(url: str) -> bool:
    try:
        return httpx.get(url + "/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_memory_epoch_keys_are_refused_with_several_workers(tmp_path: Path) -> None:
    """Software keys live in one process's memory: refused before anything listens, with the
    one stable line, and nothing written to the epoch directory."""
    key = tmp_path / "key.pem"
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    env: dict[str, Any] = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_FILE": str(key),
        "PAYGATE_KEY_EPOCH": "60",
        "PAYGATE_KEY_EPOCH_GRACE": "10",
        "PAYGATE_KEY_EPOCH_DIR": str(tmp_path / "epochs"),
    }
    done = subprocess.run(
        [PAYGATE, "serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
         "--upstream-url", "http://127.0.0.1:9"],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "workers > 1 with key_epoch needs key_backend pkcs11 or tpm" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert not (tmp_path / "epochs").exists()


def test_each_epoch_of_the_host_is_one_key_epoch_entry_in_the_log(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """With a transparency log, the same run: every epoch is one event of the host, so it is
    one key-epoch entry (and one "started" line), appended by the worker that made it, not one
    per worker that adopted it (nor again by a restarted worker joining it)."""
    token = softhsm_token
    Pkcs11Key.generate(token.module_path, token.token_label, token.pin, LABEL).close()
    ledger = tmp_path / "ledger.db"
    backend = {
        **token.env(),
        "PAYGATE_KEY_BACKEND": "pkcs11",
        "PAYGATE_PKCS11_MODULE": token.module_path,
        "PAYGATE_PKCS11_TOKEN_LABEL": token.token_label,
        "PAYGATE_PKCS11_KEY_LABEL": LABEL,
        "PAYGATE_PKCS11_PIN": token.pin,
        "PAYGATE_TRANSPARENCY_LOG": "true",
        "PAYGATE_LOG_ORIGIN": "workers.test/v1/log",
        "PAYGATE_LEDGER_PATH": str(ledger),
    }
    stderr = serve_through_rotation(
        backend, tmp_path, lambda: token_epochs(token, tmp_path / "epochs")
    )
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT data FROM tlog_entries ORDER BY idx").fetchall()
    logged = [entries.parse(bytes(data)) for (data,) in rows]
    epochs = [(e["sealing_key"], e["receipt_key"]) for e in logged if e["type"] == "key-epoch"]
    # The first epoch and the one `paygate keys rotate` asked for: each once.
    assert len(epochs) == len(set(epochs)) == 2, epochs
    assert stderr.count("started (number") == 1, stderr  # the rotation, by one worker


def _logged_epochs(ledger: Path) -> list[tuple[str, str]]:
    """The keys of every key-epoch entry in the log (read while the gateway writes it)."""
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        rows = db.execute("SELECT data FROM tlog_entries ORDER BY idx").fetchall()
    logged = [entries.parse(bytes(data)) for (data,) in rows]
    return [(e["sealing_key"], e["receipt_key"]) for e in logged if e["type"] == "key-epoch"]


def test_an_epoch_whose_maker_is_killed_before_logging_it_is_logged_by_another_worker(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """Clients seal only to keys the log announces. The worker that made an epoch is killed
    (SIGKILL) after the shared state lists the epoch and before it appended the epoch's
    key-epoch entry: another worker appends it, once, without waiting for the next rotation,
    and marks it told (no worker appends it again)."""
    token = softhsm_token
    Pkcs11Key.generate(token.module_path, token.token_label, token.pin, LABEL).close()
    ledger = tmp_path / "ledger.db"
    epochs_dir = tmp_path / "epochs"
    marker = tmp_path / "stalled-maker"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        **token.env(),
        "PAYGATE_KEY_BACKEND": "pkcs11",
        "PAYGATE_PKCS11_MODULE": token.module_path,
        "PAYGATE_PKCS11_TOKEN_LABEL": token.token_label,
        "PAYGATE_PKCS11_KEY_LABEL": LABEL,
        "PAYGATE_PKCS11_PIN": token.pin,
        "PAYGATE_TRANSPARENCY_LOG": "true",
        "PAYGATE_LOG_ORIGIN": "workers.test/v1/log",
        "PAYGATE_LEDGER_PATH": str(ledger),
        "PAYGATE_KEY_EPOCH": "600",  # no scheduled rotation during the test
        "PAYGATE_KEY_EPOCH_GRACE": "60",  # the previous epoch stays listed meanwhile
        "PAYGATE_KEY_EPOCH_DIR": str(epochs_dir),
        "PAYGATE_REPLICA_ID": HOST,
    }
    state_path = epochs_dir / "shared-epochs.json"
    with ThreadedStack() as fake:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.epoch_teller_child", str(marker), "serve",
             "--workers", "2", "--listen", f"127.0.0.1:{port}", "--upstream-url", fake.fake_url],
            env=env, cwd=Path(__file__).parents[4], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(_children(proc.pid)) < 2 or not _live(url):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.1)
            pids = _children(proc.pid)
            # Both workers serve (each has started its rotation loop, which at its start drops
            # a rotation request left by a previous run).
            seen: set[str | None] = set()
            while seen != WORKERS:
                assert time.monotonic() < deadline, seen
                seen.add(attest(url).replica)
            first = json.loads(state_path.read_text())["epochs"][0]
            while not _logged_epochs(ledger):  # by the worker that made it, at its start
                assert time.monotonic() < deadline, "the first epoch was never logged"
                time.sleep(0.1)
            assert _logged_epochs(ledger) == [(first["sealing_key"], first["receipt_key"])]

            status = request_rotation(epochs_dir, 20.0)  # the state lists it: status follows
            while not marker.exists() or not marker.read_text():
                assert time.monotonic() < deadline, "no worker made the requested epoch"
                time.sleep(0.05)
            maker = int(marker.read_text())
            assert maker in pids
            state = json.loads(state_path.read_text())
            made = state["epochs"][0]
            assert made["id"] == status["key_id"]
            keys = (made["sealing_key"], made["receipt_key"])
            assert keys not in _logged_epochs(ledger)

            os.kill(maker, signal.SIGKILL)  # between the state's write and the entry's append
            told_by = time.monotonic() + 30
            while keys not in _logged_epochs(ledger):
                assert time.monotonic() < told_by, "the killed maker's epoch was never logged"
                time.sleep(0.2)
            # Both epochs marked told: the first by its maker after its start, the new one by
            # the worker that took its telling over.
            while len(list(epochs_dir.glob("shared-epochs.told-*"))) != 2:
                assert time.monotonic() < told_by, "the epoch was logged but never marked told"
                time.sleep(0.1)
            after = json.loads(state_path.read_text())
            # No rotation was needed: the same epoch is current, and it is logged once.
            assert after["number"] == state["number"]
            assert after["epochs"][0]["id"] == made["id"]
            assert _logged_epochs(ledger).count(keys) == 1
            assert after["epochs"][1]["id"] == first["id"]
            assert after["epochs"][0]["teller"] != made["teller"]  # the taker's now
            # Whichever worker answers attests the keys the log now announces.
            assert attest(url).epochs[0].id == made["id"]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            if proc.stderr is not None:
                proc.stderr.close()
    assert proc.returncode == 0, stderr
    assert "was not told by the worker that made it" in stderr
    assert "Traceback" not in stderr
    assert token.pin not in stderr
    assert token_epochs(token, epochs_dir) == set()
