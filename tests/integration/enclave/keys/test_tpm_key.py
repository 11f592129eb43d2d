"""TpmKey against a real software TPM (swtpm): the behaviour operators and envelopes rely on."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tpm2_pytss as tss
from cryptography.hazmat.primitives.asymmetric import ec
from paygate_dev.stack import Swtpm

from enclave import p256
from enclave.errors import (
    BackendUnavailable,
    DecryptionError,
    InvalidPublicKey,
    KeyBackendError,
    KeyExists,
    KeyNotFound,
    TpmUnreachable,
)
from enclave.keys.base import KeyBackend
from enclave.keys.tpm import (
    PARENT_TEMPLATE,
    PRIVATE_BLOB,
    PUBLIC_BLOB,
    TpmKey,
    ecdh_key_template,
    parent_template,
)
from tests.fixtures.components import free_port

REPO = Path(__file__).resolve().parents[4]


@contextlib.contextmanager
def esapi(tcti: str) -> Iterator[tss.ESAPI]:
    ctx = tss.ESAPI(tcti)
    try:
        yield ctx
    finally:
        ctx.close()


def transient_handles(tcti: str) -> list[int]:
    """Transient objects in the TPM now, of every client (swtpm has no resource manager)."""
    with esapi(tcti) as ctx:
        _, data = ctx.get_capability(tss.TPM2_CAP.HANDLES, tss.TPM2_HR.TRANSIENT, 64)
        handles = data.data.handles
        return [int(handles[i]) for i in range(handles.count)]


def software_peer() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(p256.CURVE)
    return key, p256.encode_public_key(key.public_key())


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "appliance-key"


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[Swtpm]:
    """The module's swtpm, checked to be free of transient objects before and after each test."""
    assert transient_handles(swtpm.tcti) == [], "an earlier test leaked TPM handles"
    yield swtpm
    assert transient_handles(swtpm.tcti) == [], "this test leaked TPM handles"


@pytest.fixture
def stored_key(tpm: Swtpm, key_dir: Path) -> bytes:
    """A key generated in ``key_dir`` and closed again; returns its public key."""
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        return key.public_key


def test_generate_then_open_in_a_new_object_gives_the_same_key(tpm: Swtpm, key_dir: Path) -> None:
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        public = key.public_key
        assert len(public) == 65
        assert public[0] == 0x04
        p256.load_public_key(public)
        _, peer_pub = software_peer()
        shared = key.ecdh(peer_pub)
    # The ECDH key, the attestation key, the receipt key and the log key: wrapped blobs only.
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(
        [
            *(PRIVATE_BLOB, PUBLIC_BLOB, "ak.priv", "ak.pub"),
            *("log.priv", "log.pub", "receipt.priv", "receipt.pub"),
        ]
    )

    with TpmKey.open(tpm.tcti, key_dir) as reopened:
        assert reopened.public_key == public
        assert reopened.ecdh(peer_pub) == shared
        assert isinstance(reopened, KeyBackend)


def test_key_survives_a_restart_of_the_tpm(
    swtpm_factory: Callable[[], Swtpm], key_dir: Path
) -> None:
    # Its own swtpm: restarting the shared one would disturb the other tests.
    own = swtpm_factory()
    with TpmKey.generate(own.tcti, key_dir) as key:
        public = key.public_key
    own.restart()
    with TpmKey.open(own.tcti, key_dir) as key:
        assert key.public_key == public
        peer, peer_pub = software_peer()
        assert key.ecdh(peer_pub) == peer.exchange(ec.ECDH(), p256.load_public_key(public))
    own.stop()


def test_blobs_are_0600_in_a_0700_directory(tpm: Swtpm, key_dir: Path) -> None:
    old_umask = os.umask(0o022)  # a permissive umask must not leak into the modes
    try:
        TpmKey.generate(tpm.tcti, key_dir).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for name in (PUBLIC_BLOB, PRIVATE_BLOB):
        assert stat.S_IMODE((key_dir / name).stat().st_mode) == 0o600
    assert not [p for p in key_dir.iterdir() if p.name.endswith(".tmp")]


def test_existing_directory_is_tightened_to_0700(tpm: Swtpm, key_dir: Path) -> None:
    key_dir.mkdir(mode=0o755)
    key_dir.chmod(0o755)
    TpmKey.generate(tpm.tcti, key_dir).close()
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700


def test_ecdh_equals_software_ecdh_for_random_peers(tpm: Swtpm, key_dir: Path) -> None:
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        ours = p256.load_public_key(key.public_key)
        for _ in range(25):
            peer, peer_pub = software_peer()
            shared = key.ecdh(peer_pub)
            assert len(shared) == 32
            assert shared == peer.exchange(ec.ECDH(), ours)
        # bytearray and memoryview are accepted like bytes
        peer, peer_pub = software_peer()
        assert key.ecdh(bytearray(peer_pub)) == key.ecdh(memoryview(peer_pub))


def test_ecdh_is_safe_from_many_threads(tpm: Swtpm, key_dir: Path) -> None:
    errors: list[BaseException] = []
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        ours = p256.load_public_key(key.public_key)

        def work() -> None:
            try:
                for _ in range(15):
                    peer, peer_pub = software_peer()
                    assert key.ecdh(peer_pub) == peer.exchange(ec.ECDH(), ours)
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.parametrize(
    "point",
    [
        b"\x04" + b"\x01" * 32 + b"\x02" * 32,  # not on the curve
        b"\x04" + b"\x00" * 64,  # "infinity" is not an encodable point
        b"",
        b"\x04" + b"\x01" * 31,  # truncated
        b"\x02" + b"\x00" * 31 + b"\x01",  # compressed form is refused by the wire formats
        b"\x05" + bytes(64),
    ],
    ids=["off-curve", "zero", "empty", "short", "compressed", "bad-prefix"],
)
def test_invalid_peer_point_raises_invalid_public_key(
    tpm: Swtpm, key_dir: Path, point: bytes
) -> None:
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        with pytest.raises(InvalidPublicKey):
            key.ecdh(point)
        # the key keeps working afterwards
        peer, peer_pub = software_peer()
        assert key.ecdh(peer_pub) == peer.exchange(ec.ECDH(), p256.load_public_key(key.public_key))


def test_compressed_encoding_of_a_valid_point_is_refused(tpm: Swtpm, key_dir: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    _, peer_pub = software_peer()
    compressed = p256.load_public_key(peer_pub).public_bytes(
        Encoding.X962, PublicFormat.CompressedPoint
    )
    with TpmKey.generate(tpm.tcti, key_dir) as key, pytest.raises(InvalidPublicKey):
        key.ecdh(compressed)


def _load_stored(ctx: tss.ESAPI, key_dir: Path) -> tuple[tss.ESYS_TR, tss.ESYS_TR]:
    primary = ctx.create_primary(None, parent_template())[0]
    public, _ = tss.TPM2B_PUBLIC.unmarshal((key_dir / PUBLIC_BLOB).read_bytes())
    private, _ = tss.TPM2B_PRIVATE.unmarshal((key_dir / PRIVATE_BLOB).read_bytes())
    return primary, ctx.load(primary, private, public)


def _duplication_policy(ctx: tss.ESAPI) -> tss.ESYS_TR:
    """A policy session satisfying PolicyCommandCode(TPM2_Duplicate)."""
    session = ctx.start_auth_session(
        tss.ESYS_TR.NONE,
        tss.ESYS_TR.NONE,
        tss.TPM2_SE.POLICY,
        tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
        tss.TPM2_ALG.SHA256,
    )
    ctx.policy_command_code(session, tss.TPM2_CC.Duplicate)
    return session


def _try_duplicate(ctx: tss.ESAPI, handle: tss.ESYS_TR, session: tss.ESYS_TR) -> int | None:
    """TPM2_Duplicate of ``handle`` (no new parent, no inner wrapper): the TPM's RC, None if OK."""
    try:
        ctx.duplicate(
            handle,
            tss.ESYS_TR.NULL,
            None,
            tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
            session1=session,
        )
    except tss.TSS2_Exception as exc:
        return int(exc.rc)
    return None


def test_private_key_is_not_exportable(tpm: Swtpm, key_dir: Path, stored_key: bytes) -> None:
    A = tss.TPMA_OBJECT
    public, _ = tss.TPM2B_PUBLIC.unmarshal((key_dir / PUBLIC_BLOB).read_bytes())
    attrs = public.publicArea.objectAttributes
    # The TPM generated it, it may never leave this TPM nor move to another parent ...
    for flag in (A.FIXEDTPM, A.FIXEDPARENT, A.SENSITIVEDATAORIGIN, A.DECRYPT):
        assert attrs & flag, flag
    # ... and it cannot sign (decrypt-only), nor is it a storage key.
    assert not attrs & A.SIGN_ENCRYPT
    assert not attrs & A.RESTRICTED
    assert public.publicArea.parameters.eccDetail.scheme.scheme == tss.TPM2_ALG.ECDH

    with esapi(tpm.tcti) as ctx:
        primary, child = _load_stored(ctx, key_dir)
        sessions: list[tss.ESYS_TR] = []
        twins: list[tss.ESYS_TR] = []
        try:
            # The real key: refused with a password (Duplicate needs the admin/DUP role) ...
            assert _try_duplicate(ctx, child, tss.ESYS_TR.PASSWORD) == tss.TPM2_RC.AUTH_TYPE
            # ... and with a policy session (its empty authPolicy never allows duplication).
            sessions.append(_duplication_policy(ctx))
            rc = _try_duplicate(ctx, child, sessions[-1])
            assert rc is not None
            assert rc & 0xBF == tss.TPM2_RC.POLICY_FAIL & 0xBF  # session-numbered POLICY_FAIL

            # The attributes themselves are what the TPM enforces: a twin with the same template
            # plus a duplication policy is still refused, with TPM_RC_ATTRIBUTES (fixedParent) ...
            trial = ctx.start_auth_session(
                tss.ESYS_TR.NONE,
                tss.ESYS_TR.NONE,
                tss.TPM2_SE.TRIAL,
                tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
                tss.TPM2_ALG.SHA256,
            )
            ctx.policy_command_code(trial, tss.TPM2_CC.Duplicate)
            digest = ctx.policy_get_digest(trial)
            ctx.flush_context(trial)

            twin_template = ecdh_key_template()
            twin_template.publicArea.authPolicy = digest
            priv, pub = ctx.create(primary, None, twin_template)[:2]
            twins.append(ctx.load(primary, priv, pub))
            sessions.append(_duplication_policy(ctx))
            rc = _try_duplicate(ctx, twins[-1], sessions[-1])
            assert rc is not None
            assert rc & 0x0FF == tss.TPM2_RC.ATTRIBUTES  # handle-numbered TPM_RC_ATTRIBUTES

            # ... while, as a control, the same twin without fixedTPM/fixedParent duplicates fine:
            # the refusal above is not an artefact of how this test calls TPM2_Duplicate.
            ctx.flush_context(twins.pop())
            movable = ecdh_key_template()
            movable.publicArea.objectAttributes &= ~(A.FIXEDTPM | A.FIXEDPARENT)
            movable.publicArea.authPolicy = digest
            priv, pub = ctx.create(primary, None, movable)[:2]
            twins.append(ctx.load(primary, priv, pub))
            sessions.append(_duplication_policy(ctx))
            assert _try_duplicate(ctx, twins[-1], sessions[-1]) is None
        finally:
            for handle in [*sessions, *twins, child, primary]:
                with contextlib.suppress(tss.TSS2_Exception):
                    ctx.flush_context(handle)


def test_blobs_are_bound_to_their_tpm(
    swtpm_factory: Callable[[], Swtpm], tpm: Swtpm, key_dir: Path, stored_key: bytes
) -> None:
    # Another TPM (another owner seed) derives another parent and refuses the wrapped blob: a
    # stolen key directory is useless elsewhere.
    other = swtpm_factory()
    with pytest.raises(KeyBackendError) as err:
        TpmKey.open(other.tcti, key_dir)
    assert type(err.value) is KeyBackendError
    assert "load" in str(err.value)
    assert transient_handles(other.tcti) == []
    other.stop()


def test_tampered_blob_is_refused_without_leaking_handles(
    tpm: Swtpm, key_dir: Path, stored_key: bytes
) -> None:
    private = bytearray((key_dir / PRIVATE_BLOB).read_bytes())
    private[-1] ^= 0x01
    (key_dir / PRIVATE_BLOB).write_bytes(bytes(private))
    with pytest.raises(KeyBackendError):
        TpmKey.open(tpm.tcti, key_dir)
    # the `tpm` fixture asserts that the failed open flushed its primary


def test_public_blob_of_another_key_is_refused(tpm: Swtpm, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    TpmKey.generate(tpm.tcti, first).close()
    TpmKey.generate(tpm.tcti, second).close()
    (first / PUBLIC_BLOB).write_bytes((second / PUBLIC_BLOB).read_bytes())
    with pytest.raises(KeyBackendError):
        TpmKey.open(tpm.tcti, first)


def test_garbage_blob_is_refused_before_touching_the_tpm(
    tpm: Swtpm, key_dir: Path, stored_key: bytes
) -> None:
    (key_dir / PUBLIC_BLOB).write_bytes(b"\x00\x05abc")
    with pytest.raises(KeyBackendError) as err:
        TpmKey.open(tpm.tcti, key_dir)
    assert PUBLIC_BLOB in str(err.value)


def test_close_flushes_every_transient_object(tpm: Swtpm, key_dir: Path) -> None:
    key = TpmKey.generate(tpm.tcti, key_dir)
    assert len(transient_handles(tpm.tcti)) == 1  # the key while open; the parent is flushed
    key.ecdh(software_peer()[1])
    key.close()
    assert transient_handles(tpm.tcti) == []
    key.close()  # idempotent
    assert key.closed
    with pytest.raises(KeyBackendError):
        key.ecdh(software_peer()[1])


def test_repeated_open_close_does_not_exhaust_object_memory(
    tpm: Swtpm, key_dir: Path, stored_key: bytes
) -> None:
    # swtpm has 3 transient object slots and no resource manager: one leaked handle per open
    # would fail with 0x902 on the second or third round.
    peer, peer_pub = software_peer()
    expected = peer.exchange(ec.ECDH(), p256.load_public_key(stored_key))
    for _ in range(50):
        with TpmKey.open(tpm.tcti, key_dir) as key:
            assert key.ecdh(peer_pub) == expected
    assert transient_handles(tpm.tcti) == []


def test_generate_twice_raises_key_exists(tpm: Swtpm, key_dir: Path, stored_key: bytes) -> None:
    before = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    with pytest.raises(KeyExists):
        TpmKey.generate(tpm.tcti, key_dir)
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == before


def test_generate_refuses_a_half_written_directory(tpm: Swtpm, key_dir: Path) -> None:
    key_dir.mkdir(mode=0o700)
    (key_dir / PRIVATE_BLOB).write_bytes(b"left over")
    with pytest.raises(KeyExists):
        TpmKey.generate(tpm.tcti, key_dir)
    assert [p.name for p in key_dir.iterdir()] == [PRIVATE_BLOB]


def test_open_from_an_empty_directory_raises_key_not_found(tpm: Swtpm, tmp_path: Path) -> None:
    with pytest.raises(KeyNotFound):
        TpmKey.open(tpm.tcti, tmp_path)
    with pytest.raises(KeyNotFound):
        TpmKey.open(tpm.tcti, tmp_path / "does-not-exist")


def test_open_with_only_one_blob_raises_key_not_found(
    tpm: Swtpm, key_dir: Path, stored_key: bytes
) -> None:
    (key_dir / PRIVATE_BLOB).unlink()
    with pytest.raises(KeyNotFound) as err:
        TpmKey.open(tpm.tcti, key_dir)
    assert PRIVATE_BLOB in str(err.value)


def test_unreachable_tpm_raises_tpm_unreachable_quickly(
    tpm: Swtpm, tmp_path: Path, key_dir: Path, stored_key: bytes
) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TpmUnreachable) as err:
        TpmKey.generate(tcti, tmp_path / "new")
    assert tcti in str(err.value)
    with pytest.raises(TpmUnreachable):
        TpmKey.open(tcti, key_dir)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "new").exists()  # nothing written for a TPM we never reached


def test_tpm_gone_while_open_gives_a_generic_backend_error(
    swtpm_factory: Callable[[], Swtpm], key_dir: Path
) -> None:
    own = swtpm_factory()
    key = TpmKey.generate(own.tcti, key_dir)
    own.stop()
    started = time.monotonic()
    with pytest.raises(KeyBackendError) as err:
        key.ecdh(software_peer()[1])
    assert type(err.value) is KeyBackendError
    assert str(err.value) == "TPM ECDH failed"
    key.close()  # still safe: best-effort flushes, no exception
    assert key.closed
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("tcti", ["nosuchtcti:whatever", "device:/nonexistent/tpm0", ""])
def test_bad_tcti_raises_tpm_unreachable(tmp_path: Path, tcti: str) -> None:
    with pytest.raises(TpmUnreachable):
        TpmKey.generate(tcti, tmp_path / "k")


def test_info_describes_the_key_without_secrets(tpm: Swtpm, key_dir: Path) -> None:
    with TpmKey.generate(tpm.tcti, key_dir) as key:
        info = key.info()
        assert info.backend == "tpm"
        assert info.persistent is True
        assert info.public_key == key.public_key
        assert info.label == "appliance-key"
        assert info.details == {
            "tcti": tpm.tcti,
            "key_dir": str(key_dir),
            "parent_template": PARENT_TEMPLATE,
        }
        assert "TpmKey(" in repr(key)


def test_open_v1_works_with_the_tpm_backend(tpm: Swtpm, key_dir: Path) -> None:
    from enclave.envelope_v1 import open_v1, seal_v1

    with TpmKey.generate(tpm.tcti, key_dir) as key:
        message = b'{"model": "m", "prompt": "hello from a sealed request"}'
        blob = seal_v1(key.public_key, message)
        assert open_v1(key, blob) == message
        tampered = bytearray(blob)
        tampered[-1] ^= 0x01
        with pytest.raises(DecryptionError):
            open_v1(key, bytes(tampered))
        # sealed to a different key: the same uniform error
        with pytest.raises(DecryptionError):
            open_v1(key, seal_v1(software_peer()[1], message))


def test_module_imports_and_reports_a_missing_binding(tmp_path: Path) -> None:
    # A host without tpm2-pytss: importing the module works; using it says how to install.
    code = (
        "import sys; sys.modules['tpm2_pytss'] = None\n"
        "from enclave.keys.tpm import TpmKey\n"
        "from enclave.errors import BackendUnavailable\n"
        "try:\n"
        f"    TpmKey.open('device:/dev/tpmrm0', {str(tmp_path)!r})\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tpm2-pytss is not installed: pip install 'paygate[tpm]'"
    assert BackendUnavailable.code == "backend_unavailable"
