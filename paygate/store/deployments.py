"""Named deployments: ``<deployments_dir>/<name>/config.json`` (directory 0700, file 0600).

The format follows the reference (Obol) gateway's deployment store so an operator's deployments
carry over: the same fields, RFC 3339 UTC timestamps, names ``^[a-z0-9][a-z0-9-]{0,62}$``.
Every write is atomic (a temporary file in the same directory, fsynced, renamed over the old
one, the directory fsynced), so a crash leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from paygate.errors import PaygateError
from paygate.files import replace_atomically
from paygate.upstream.config import UpstreamMode
from paygate.upstream.engines.base import EngineKind

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
CONFIG_FILE = "config.json"
MAX_FILE = 1 << 20  # bytes: a deployment file is small; anything bigger is not ours


class StoreError(PaygateError):
    """The deployment store could not do what was asked."""

    message = "the deployment store could not do what was asked"

    code = "deployment_error"


class InvalidDeploymentName(StoreError):
    """A deployment name is not ``[a-z0-9][a-z0-9-]{0,62}``."""

    message = "a deployment name is [a-z0-9][a-z0-9-]{0,62}"

    code = "invalid_deployment_name"


class DeploymentExists(StoreError):
    message = "a deployment with that name already exists"
    code = "deployment_exists"


class DeploymentNotFound(StoreError):
    message = "no deployment with that name"
    code = "deployment_not_found"


class InvalidDeployment(StoreError):
    """A field value is unusable; the message names the field, never the value."""

    message = "a field value is unusable"

    code = "invalid_deployment"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    """``name`` if it is a valid deployment name; InvalidDeploymentName otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidDeploymentName(
            "a deployment name is 1-63 characters of a-z, 0-9 and '-', starting with a "
            "letter or digit"
        )
    return name


class Deployment(BaseModel):
    """One named deployment (the reference's fields, plus ``upstream_mode``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    listen: str = "127.0.0.1:8402"
    upstream_url: str = "http://127.0.0.1:11434"
    upstream_mode: UpstreamMode = "attach"
    wallet_address: str | None = None
    price_per_request: Decimal | None = Field(default=None, ge=0)
    price_per_million_tokens: Decimal | None = Field(default=None, ge=0)
    approx_tokens_per_request: int | None = Field(default=None, gt=0)
    chain: str | None = None
    facilitator_url: str | None = None
    container_image: str | None = None
    container_cpus: float | None = Field(default=None, gt=0)
    container_memory: str | None = None
    container_host_port: int | None = Field(default=None, ge=1, le=65535)
    tee_type: str | None = None
    upstream_kind: EngineKind | None = None
    model_path: str | None = None
    model_name: str | None = None
    # The served weights' digest (hex or sha256:hex); serve refuses other weights.
    model_hash: str | None = None
    no_payment_gate: bool = False
    provenance: dict[str, Any] | None = None
    created_at: str = Field(default_factory=_now)
    updated_at: str = Field(default_factory=_now)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("model_hash")
    @classmethod
    def _check_hash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        hexdigest = value.strip().lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ValueError("must be a SHA-256 digest: 64 hex digits, optionally sha256:")
        return "sha256:" + hexdigest

    @property
    def served_model_name(self) -> str | None:
        """The name the weights are served (and their digest checked) under."""
        if self.model_name:
            return self.model_name
        return Path(self.model_path).name if self.model_path else None

    @field_validator("wallet_address")
    @classmethod
    def _check_wallet(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
            raise ValueError("must be a 0x-prefixed 20-byte hex address")
        return value

    def document(self) -> dict[str, Any]:
        """The JSON document (Decimals as strings: prices are never floats)."""
        return self.model_dump(mode="json")


def _describe(exc: ValidationError) -> str:
    fields = sorted({".".join(str(p) for p in err["loc"]) for err in exc.errors()})
    reasons = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        for err in exc.errors(include_input=False)
    )
    return f"invalid {', '.join(fields)}: {reasons}"


def build(name: str, **fields: Any) -> Deployment:
    """A Deployment from untrusted field values; InvalidDeployment/InvalidDeploymentName."""
    check_name(name)
    try:
        return Deployment(name=name, **fields)
    except ValidationError as exc:
        raise InvalidDeployment(_describe(exc)) from None


class DeploymentStore:
    """create / get / list / update / delete over a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def _write(self, deployment: Deployment) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory = self._dir(deployment.name)
        directory.mkdir(exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        data = json.dumps(deployment.document(), indent=2, sort_keys=True).encode() + b"\n"
        replace_atomically(directory / CONFIG_FILE, data)

    def create(self, deployment: Deployment, *, force: bool = False) -> Deployment:
        """Store a new deployment; DeploymentExists unless ``force``."""
        if not force and (self._dir(deployment.name) / CONFIG_FILE).exists():
            raise DeploymentExists(f"deployment {deployment.name} exists (use --force)")
        self._write(deployment)
        return deployment

    def get(self, name: str) -> Deployment:
        path = self._dir(name) / CONFIG_FILE
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE + 1)
        except FileNotFoundError:
            raise DeploymentNotFound(f"no deployment named {name}") from None
        except OSError as exc:
            raise StoreError(f"cannot read deployment {name}: {exc.strerror}") from None
        if len(raw) > MAX_FILE:
            raise InvalidDeployment(f"deployment {name}: file too large")
        try:
            document = json.loads(raw)
            deployment = Deployment.model_validate(document)
        except ValueError:
            raise InvalidDeployment(f"deployment {name}: config.json is not valid") from None
        if deployment.name != name:
            raise InvalidDeployment(f"deployment {name}: its file names {deployment.name}")
        return deployment

    def list(self) -> list[Deployment]:
        """Every readable deployment, alphabetically."""
        if not self.root.is_dir():
            return []
        names = sorted(
            entry.name
            for entry in self.root.iterdir()
            if NAME.fullmatch(entry.name) and (entry / CONFIG_FILE).is_file()
        )
        return [self.get(name) for name in names]

    def update(self, name: str, **changes: Any) -> Deployment:
        """Change fields (``name`` and ``created_at`` stay); sets ``updated_at``."""
        current = self.get(name)
        for fixed in ("name", "created_at", "updated_at"):
            if fixed in changes:
                raise InvalidDeployment(f"{fixed} cannot be changed")
        merged = {**current.document(), **changes, "updated_at": _now()}
        try:
            updated = Deployment.model_validate(merged)
        except ValidationError as exc:
            raise InvalidDeployment(_describe(exc)) from None
        self._write(updated)
        return updated

    def delete(self, name: str) -> None:
        directory = self._dir(name)
        if not (directory / CONFIG_FILE).is_file():
            raise DeploymentNotFound(f"no deployment named {name}")
        shutil.rmtree(directory)


# Deployment field -> Settings field (docs/UPSTREAM.md "Named deployments").
_SETTINGS_FIELDS = {
    "listen": "listen",
    "upstream_url": "upstream_url",
    "upstream_mode": "upstream_mode",
    "container_image": "upstream_image",
    "container_cpus": "upstream_cpus",
    "container_memory": "upstream_memory",
    "upstream_kind": "upstream_kind",
    "model_path": "upstream_model_path",
    "model_name": "upstream_model_name",
    "wallet_address": "pay_to",
    "price_per_request": "price",
    "price_per_million_tokens": "price_per_million_tokens",
    "approx_tokens_per_request": "token_estimate",
    "facilitator_url": "facilitator_url",
}


def settings_overrides(deployment: Deployment, known: set[str]) -> dict[str, Any]:
    """The settings ``paygate serve NAME`` takes from a deployment.

    ``known`` is the set of setting names (``Settings.model_fields``): a field whose setting
    does not exist in this build is left out rather than guessed. ``container_host_port`` is
    never used: a paygate container publishes nothing (docs/UPSTREAM.md).
    """
    out: dict[str, Any] = {}
    for field_name, setting in _SETTINGS_FIELDS.items():
        value = getattr(deployment, field_name)
        if value is not None and setting in known:
            out[setting] = value
    if deployment.chain and "network" in known:
        out["network"] = [deployment.chain]
    if deployment.no_payment_gate:
        out["payment_mode"] = "off"
    if deployment.upstream_mode == "container":
        out["upstream_name"] = f"paygate-{deployment.name}"
    name = deployment.served_model_name
    if deployment.model_hash and name and "expected_model_digests" in known:
        out["expected_model_digests"] = {name: deployment.model_hash}
    return out
