"""``paygate keys create|show|rotate``: make and inspect the appliance's envelope key; ask the
running gateway to start a new key epoch."""

from __future__ import annotations

import argparse
import json
from typing import Any

import enclave
from enclave import p256
from enclave.keys.base import ReceiptSigner
from paygate.cli.options import FieldFlag, FieldFlags, add_action, add_json, command_actions
from paygate.config import load_settings
from paygate.keys import create_key, open_key_backend

# Each backend's settings a flag may set: (flag, setting, what it is).
_BACKEND_FLAGS = {
    "software": (("--key-file", "key_file", "PKCS#8 PEM path"),),
    "pkcs11": (
        ("--pkcs11-module", "pkcs11_module", "module path"),
        ("--token-label", "pkcs11_token_label", "token label"),
        ("--key-label", "pkcs11_key_label", "key label"),
    ),
    "tpm": (
        ("--tcti", "tpm_tcti", "TCTI, e.g. device:/dev/tpmrm0"),
        ("--tpm-key-dir", "tpm_key_dir", "directory of the wrapped key blobs"),
    ),
}
_KEY_FLAGS = FieldFlags(
    FieldFlag("--backend", "key_backend", "key backend", choices=tuple(_BACKEND_FLAGS)),
    *(
        FieldFlag(flag, setting, f"{backend}: {what}")
        for backend, flags in _BACKEND_FLAGS.items()
        for flag, setting, what in flags
    ),
)


def register(sub: Any) -> None:
    key = argparse.ArgumentParser(add_help=False)
    _KEY_FLAGS.add_to(key)
    add_json(key)
    actions = command_actions(sub, "keys", "create or show the envelope key")
    text = "generate a key in the chosen backend (never replaces one)"
    add_action(actions, "create", _create, text, parents=[key])
    add_action(
        actions, "show", _show, "print the public key, backend and algorithms", parents=[key]
    )
    rotate = add_action(
        actions,
        "rotate",
        _rotate,
        "ask the running gateway to start a new key epoch now (key_epoch)",
    )
    rotate.add_argument("--epoch-dir", help="the gateway's key_epoch_dir")
    rotate.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    add_json(rotate)


def _settings(args: argparse.Namespace) -> Any:
    return load_settings(args.config, **_KEY_FLAGS.given(args))


def describe(key: enclave.KeyBackend) -> dict[str, Any]:
    """Public facts about a key: what `keys show` prints and /v1/enclave/pubkey publishes."""
    info = key.info()
    return {
        "backend": info.backend,
        "pubkey": info.public_key.hex(),
        "fingerprint": p256.fingerprint(info.public_key),
        "persistent": info.persistent,
        "label": info.label,
        "algorithms": {"v1": enclave.V1_ALGORITHM, "v2": enclave.V2_SUITE},
        "details": info.details,
        # The receipt-signing key beside it (docs/ATTESTATION.md), when the backend has one.
        "receipt_key": p256.fingerprint(key.receipt_public_key)
        if isinstance(key, ReceiptSigner)
        else None,
    }


def _print(key: enclave.KeyBackend, as_json: bool) -> None:
    facts = describe(key)
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    for name in ("backend", "pubkey", "fingerprint", "persistent", "label", "receipt_key"):
        print(f"{name:12} {facts[name]}")
    print(f"{'v1':12} {facts['algorithms']['v1']}")
    print(f"{'v2':12} {facts['algorithms']['v2']}")
    for name, value in facts["details"].items():
        print(f"{name:12} {value}")


def _create(args: argparse.Namespace) -> int:
    return _print_closed(create_key(_settings(args)), args.json)


def _show(args: argparse.Namespace) -> int:
    return _print_closed(open_key_backend(_settings(args)), args.json)


def _print_closed(key: enclave.KeyBackend, as_json: bool) -> int:
    try:
        _print(key, as_json)
    finally:
        key.close()
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """Write the rotation request into ``key_epoch_dir`` and wait for the new epoch."""
    from pathlib import Path

    from paygate.config import ConfigError
    from paygate.server.epochs import request_rotation

    overrides = {"key_epoch_dir": args.epoch_dir} if args.epoch_dir else {}
    settings = load_settings(args.config, **overrides)
    try:
        status = request_rotation(Path(settings.key_epoch_dir), timeout=args.timeout)
    except (FileNotFoundError, TimeoutError, PermissionError) as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for epoch in status["epochs"]:
        print(f"{epoch['state']:9} {epoch['id']}  not after {epoch['not_after']}")
    return 0
