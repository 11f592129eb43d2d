"""Epoch keys in a PKCS#11 token: generated inside it, ``C_DestroyObject`` to destroy them.

Each epoch is a key pair labelled ``<key label>-epoch-<n>-<random>`` (and its receipt pair,
``...-receipt``), SENSITIVE and not EXTRACTABLE like the long-lived key. The token keeps no
other copy, so destroying the objects destroys the key. At start every object whose label begins
with ``<key label>-epoch-`` (a previous run's epochs) is destroyed.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from typing import Any

from enclave.errors import KeyBackendError
from enclave.keys.pkcs11 import (
    RECEIPT_SUFFIX,
    Pkcs11Key,
    _acquire_module,
    _binding,
    _find_token,
    _login,
    _logout,
    _release_module,
)

EPOCH_INFIX = "-epoch-"


class Pkcs11EpochVault:
    """Makes epoch keys in the token the long-lived key lives in (same module, token, PIN)."""

    backend = "pkcs11"

    def __init__(self, module_path: str, token_label: str, pin: str, key_label: str) -> None:
        self._module_path = module_path
        self._token = token_label
        self._pin = pin  # kept in memory like the settings keep it: each epoch logs in with it
        self._prefix = key_label + EPOCH_INFIX

    def create(self, key_id: str) -> Pkcs11Key:
        label = f"{self._prefix}{key_id}-{secrets.token_hex(4)}"
        return Pkcs11Key.generate(self._module_path, self._token, self._pin, label, log_key=False)

    def evidence(self, key: Any) -> Mapping[str, Any]:
        return {}  # a token has no attestation of its own (evidence kind none)

    # --- shared between processes (enclave.keys.shared_epochs) -------------------------------

    def reference(self, key: Any, evidence: Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(key, Pkcs11Key)
        return {"label": key.label}

    def _label(self, reference: Mapping[str, Any]) -> str:
        label = reference.get("label")
        if not isinstance(label, str) or not label.startswith(self._prefix):
            raise KeyBackendError("a shared epoch reference is not one of this key's epochs")
        return label

    def load(self, reference: Mapping[str, Any]) -> tuple[Pkcs11Key, Mapping[str, Any]]:
        key = Pkcs11Key.open(
            self._module_path, self._token, self._pin, self._label(reference), log_key=False
        )
        return key, {}

    def release(self, key: Any) -> None:
        key.close()  # this process's session only: the objects stay on the token

    def destroy_reference(self, reference: Mapping[str, Any]) -> None:
        label = self._label(reference)
        self._objects(destroy=True, only={label, label + RECEIPT_SUFFIX})

    def collect(self, pending: list[str], keep: list[Mapping[str, Any]]) -> int:
        """Destroy the objects made as one of ``pending`` (``create``'s names; a label begins
        with the name) but none ``keep`` names: a token may hold other hosts' epochs too."""
        if not pending:
            return 0
        kept = {self._label(reference) for reference in keep}
        kept |= {label + RECEIPT_SUFFIX for label in kept}
        starts = tuple(f"{self._prefix}{name}-" for name in pending)
        return len(self._objects(destroy=True, starts=starts, keep=kept))

    def _objects(
        self,
        *,
        destroy: bool,
        only: set[str] | None = None,
        starts: tuple[str, ...] | None = None,
        keep: set[str] | None = None,
    ) -> set[str]:
        """The labels of every epoch object on the token (or of those in ``only``, or beginning
        with one of ``starts``, but none in ``keep``); with ``destroy`` each is destroyed.
        Joins the module's shared login (a second C_Login would be refused)."""
        pkcs11 = _binding()
        module = _acquire_module(self._module_path)
        found: set[str] = set()
        try:
            with module.lock:
                token = _find_token(module, self._token)
                login = _login(module, token, self._token, self._pin)
                try:
                    session = token.open(rw=destroy)
                    try:
                        for obj in list(session.get_objects()):
                            label = str(obj[pkcs11.Attribute.LABEL])
                            if (
                                label.startswith(self._prefix)
                                and (only is None or label in only)
                                and (starts is None or label.startswith(starts))
                                and (keep is None or label not in keep)
                            ):
                                found.add(label)
                                if destroy:
                                    obj.destroy()
                    finally:
                        with contextlib.suppress(Exception):
                            session.close()
                finally:
                    _logout(module, login)
        except pkcs11.PKCS11Error as exc:
            raise KeyBackendError(
                f"cannot list the token's epoch keys: {type(exc).__name__}"
            ) from None
        finally:
            _release_module(module)
        return found

    def labels(self) -> set[str]:
        """The labels of every epoch object on the token (what a check looks for)."""
        return self._objects(destroy=False)

    def sweep(self) -> int:
        return len(self._objects(destroy=True))
